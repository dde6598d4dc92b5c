package e2e

// Policies against every spelling of a path or a parameter, on a real
// Vault: what Vault's ACL decides must be what the engine acts on.

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// rawRequest sends one HTTP/1.1 request whose request line is exactly
// method and target, so that no client cleans or re-encodes the path. It
// returns the status and the body (with a redirect's Location in front).
func rawRequest(t *testing.T, addr, method, target, token, body string) (int, string) {
	t.Helper()
	hostport := strings.TrimPrefix(addr, "http://")
	conn, err := net.Dial("tcp", hostport)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nX-Vault-Token: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s",
		method, target, hostport, token, len(body), body)
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("Location") + " " + string(b)
}

// TestPathSpellingsNeverReachADeniedTunnel with the issue's
// policy (the account's tunnels allowed, one denied), no other spelling of
// the denied tunnel's path, sent byte for byte past any client, reads its
// key or rotates it: trailing and doubled slashes, dot segments, encoded
// slashes and dots, percent-encoded hex, NUL, spaces, newlines,
// backslashes, an upper-case mount, query parameters naming the tunnel,
// the schedule and metadata sub-paths, and the LIST verb. Vault's HTTP
// layer redirects unclean paths (307) before any policy check, so the
// path Vault authorises is the path the engine gets; whatever else reaches
// the engine is refused by its id check or matches no route.
func TestPathSpellingsNeverReachADeniedTunnel(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	denied := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	other := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, token.Value)
	psk := func(acc, tun string) string { return "cloudflare-ipsec/psk/" + acc + "/" + tun }
	v.mustVault(t, root, "write", "-f", psk(account, denied))
	v.mustVault(t, root, "write", "-f", psk(account, other))
	policy := fmt.Sprintf(`path "cloudflare-ipsec/psk/%[1]s/*" { capabilities = ["read", "create", "update", "list"] }
path "cloudflare-ipsec/psk/%[1]s/%[2]s" { capabilities = ["deny"] }
path "cloudflare-ipsec/metadata/%[1]s/*" { capabilities = ["read", "list"] }
path "cloudflare-ipsec/metadata/%[1]s/%[2]s" { capabilities = ["deny"] }
`, account, denied)
	writeFile(t, filepath.Join(v.dir, "deny.hcl"), policy)
	v.mustVault(t, root, "policy", "write", "deny", filepath.Join(v.dir, "deny.hcl"))
	tok := strings.TrimSpace(v.mustVault(t, root, "token", "create", "-field=token", "-policy=deny"))
	secrets.add(tok)
	edge := func() string {
		tn, _ := sim.Tunnel(account, denied)
		return tn.PSK
	}
	key := edge()

	var encoded strings.Builder
	for _, c := range []byte(denied) {
		fmt.Fprintf(&encoded, "%%%02X", c)
	}
	pre := "/v1/cloudflare-ipsec/psk/" + account + "/"
	targets := []string{
		pre + denied,
		pre + denied + "/",
		pre + denied + "//",
		pre + denied + "/.",
		"/v1/cloudflare-ipsec/psk/" + account + "//" + denied,
		pre + "./" + denied,
		pre + other + "/../" + denied,
		pre + "%2e/" + denied,
		pre + other + "%2f..%2f" + denied,
		pre + other + "%2F%2E%2E%2F" + denied,
		pre + encoded.String(),
		pre + "%" + fmt.Sprintf("%02X", denied[0]) + denied[1:],
		"/v1/cloudflare-ipsec//psk/" + account + "/" + denied,
		"/v1//cloudflare-ipsec/psk/" + account + "/" + denied,
		"/v1/./cloudflare-ipsec/psk/" + account + "/" + denied,
		pre + denied + "%00",
		pre + denied + "%20",
		pre + "%20" + denied,
		pre + denied + "%0a",
		pre + denied + "%2F",
		pre + denied + "\\",
		"/v1/cloudflare-ipsec/psk/" + account + "\\" + denied,
		"/v1/cloudflare-ipsec/psk/" + account + "%5c" + denied,
		pre + denied + "?list=true",
		pre + denied + "?tunnel=" + other,
		pre + other + "?tunnel=" + denied,
		pre + strings.ToUpper(denied),
		pre + strings.ToUpper(denied) + "/schedule",
		"/v1/CLOUDFLARE-IPSEC/psk/" + account + "/" + denied,
		"/v1/cloudflare-ipsec/metadata/" + account + "/" + denied,
		"/v1/cloudflare-ipsec/metadata/" + account + "/" + denied + "/",
		"/v1/cloudflare-ipsec/metadata/" + account + "/" + strings.ToUpper(denied),
	}
	generated := sim.Calls(cloudflaresim.OpPSKGenerate)
	for _, method := range []string{"GET", "LIST", "POST", "PUT"} {
		for _, target := range targets {
			body := ""
			if method == "POST" || method == "PUT" {
				body = "{}"
			}
			status, answer := rawRequest(t, v.addr, method, target, tok, body)
			if strings.Contains(answer, key) {
				t.Errorf("%s %s (%d) returned the denied tunnel's key", method, target, status)
			}
			if k := edge(); k != key {
				t.Fatalf("%s %s (%d) rotated the denied tunnel", method, target, status)
			}
			if status == http.StatusOK && !strings.Contains(target, "?tunnel=") && strings.Contains(answer, `"psk"`) {
				t.Errorf("%s %s answered 200 with a key", method, target)
			}
		}
	}
	// Only the writes that name the other tunnel in the path rotate it.
	if n := sim.Calls(cloudflaresim.OpPSKGenerate) - generated; n != 2 {
		t.Errorf("psk_generate called %d times, want 2 (POST and PUT of psk/<A>/<other>?tunnel=<denied>, which rotate <other>)", n)
	}
}

// TestADeniedTokenAccountIDCannotBeSpeltAround: the same class of bypass
// as a path's, on the one id the engine takes outside a path. Vault matches
// a policy's denied_parameters values case-sensitively; the engine trimmed
// and lower-cased config's token_account_id, so a policy that lets an
// administrator write config but denies token_account_id=<B> was escaped by
// writing <B> in upper case, and config read token_account_id=<B>. The
// engine now refuses it with a 400 and config is unchanged.
func TestADeniedTokenAccountIDCannotBeSpeltAround(t *testing.T) {
	sim, baseURL, secrets, token, _ := newEdge(t)
	forbidden := cloudflaresim.NewID()
	owned := sim.AddToken(cloudflaresim.Token{OwnerAccount: forbidden})
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, token.Value)
	policy := fmt.Sprintf(`path "cloudflare-ipsec/config" {
  capabilities = ["read", "update"]
  denied_parameters = { "token_account_id" = [%q] }
}
`, forbidden)
	writeFile(t, filepath.Join(v.dir, "admin-not-b.hcl"), policy)
	v.mustVault(t, root, "policy", "write", "admin-not-b", filepath.Join(v.dir, "admin-not-b.hcl"))
	tok := strings.TrimSpace(v.mustVault(t, root, "token", "create", "-field=token", "-policy=admin-not-b"))
	secrets.add(tok)

	res := v.vault(t, tok, "write", "cloudflare-ipsec/config", "api_token="+owned.Value, "token_account_id="+forbidden)
	if res.code == 0 || !strings.Contains(res.stderr, "Code: 403") {
		t.Fatalf("the policy does not deny token_account_id=<B> itself: exit %d\n%s", res.code, secrets.redact(res.stderr))
	}
	res = v.vault(t, tok, "write", "cloudflare-ipsec/config", "api_token="+owned.Value, "token_account_id="+strings.ToUpper(forbidden))
	cfg := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/config")
	if got := field(t, cfg, "token_account_id"); got == forbidden {
		t.Fatalf("token_account_id=<B in upper case> was accepted (exit %d) and config now reads token_account_id=<B>, "+
			"which the policy denies", res.code)
	}
	if res.code == 0 || !strings.Contains(res.stderr, "Code: 400") || !strings.Contains(res.stderr, "lower-case") {
		t.Errorf("exit %d, want a 400 asking for lower case:\n%s", res.code, secrets.redact(res.stderr))
	}
}
