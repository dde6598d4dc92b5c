package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestEngineOnDevServer walks the engine's whole interface on one dev server,
// in the order an operator meets it. Subtests share the server and build on
// each other; the last ones search every log for secrets.
func TestEngineOnDevServer(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	var tunnels []string
	for i := 0; i < 3; i++ {
		tunnels = append(tunnels, sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID)
	}
	otherAccount := cloudflaresim.NewID()
	otherTunnel := sim.AddTunnel(otherAccount, cloudflaresim.Tunnel{}).ID
	psk := func(acc, tun string) string { return "cloudflare-ipsec/psk/" + acc + "/" + tun }
	meta := func(acc, tun string) string { return "cloudflare-ipsec/metadata/" + acc + "/" + tun }
	edgeKey := func(acc, tun string) string {
		tn, ok := sim.Tunnel(acc, tun)
		if !ok {
			t.Fatalf("tunnel %s missing from the simulator", tun)
		}
		return tn.PSK
	}

	v := startDevServer(t, secrets)
	root := v.rootToken
	auditLog := filepath.Join(v.dir, "audit.log")
	v.mustVault(t, root, "audit", "enable", "file", "file_path="+auditLog)
	v.mountEngine(t, baseURL, token.Value)

	t.Run("secrets list shows the running version and checksum", func(t *testing.T) {
		mounts := v.mustVaultJSON(t, root, "secrets", "list", "-detailed")
		mount, ok := mounts["cloudflare-ipsec/"].(map[string]any)
		if !ok {
			t.Fatalf("cloudflare-ipsec/ is not mounted")
		}
		if mount["running_plugin_version"] != suite.version {
			t.Errorf("running version = %v, want %s", mount["running_plugin_version"], suite.version)
		}
		if mount["running_sha256"] != suite.pluginSHA {
			t.Errorf("running sha256 = %v, want the registered %s", mount["running_sha256"], suite.pluginSHA)
		}
	})

	t.Run("config read shows verification, never the token", func(t *testing.T) {
		cfg := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/config")
		if field(t, cfg, "token_id") != token.ID || field(t, cfg, "token_status") != "active" {
			t.Errorf("config = %v", cfg["data"])
		}
		if field(t, cfg, "api_token") != nil {
			t.Error("config read returns api_token")
		}
	})

	t.Run("config refuses a token Cloudflare rejects", func(t *testing.T) {
		res := v.vault(t, root, "write", "cloudflare-ipsec/config", "api_token=not-a-valid-token-0123456789abcdef")
		if res.code == 0 || !strings.Contains(res.stderr, "Code: 400") || !strings.Contains(res.stderr, "code 9109") {
			t.Fatalf("exit %d, stderr:\n%s", res.code, secrets.redact(res.stderr))
		}
		cfg := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/config")
		if field(t, cfg, "token_id") != token.ID {
			t.Error("a refused config write replaced the stored config")
		}
	})

	t.Run("rotate answers with metadata only and read returns the edge's key", func(t *testing.T) {
		for version := 1; version <= 2; version++ {
			out := v.mustRun(t, "json", root, "write", "-f", psk(account, tunnels[0]))
			key := edgeKey(account, tunnels[0])
			if strings.Contains(out, key) || strings.Contains(out, `"psk"`) {
				t.Fatal("the write response shows the key")
			}
			read := v.mustVaultJSON(t, root, "read", psk(account, tunnels[0]))
			if field(t, read, "psk") != key {
				t.Fatalf("vault read returns a key that differs from the edge's (rotation %d)", version)
			}
			if got := field(t, read, "version"); fmt.Sprint(got) != fmt.Sprint(version) {
				t.Errorf("version = %v, want %d", got, version)
			}
			status, body := v.api(t, root, "GET", psk(account, tunnels[0]), nil)
			if status != http.StatusOK || field(t, body, "psk") != key {
				t.Fatalf("HTTP API read: status %d, key matches edge: %v", status, field(t, body, "psk") == key)
			}
			md := v.mustVaultJSON(t, root, "read", meta(account, tunnels[0]))
			if field(t, md, "psk") != nil {
				t.Fatal("metadata shows the key")
			}
			for _, k := range []string{"account_id", "tunnel_id", "last_generated_on", "version", "stored_at"} {
				if fmt.Sprint(field(t, md, k)) != fmt.Sprint(field(t, read, k)) {
					t.Errorf("metadata %s = %v, read says %v", k, field(t, md, k), field(t, read, k))
				}
			}
		}
	})

	t.Run("a deny on a tunnel cannot be spelt around in upper case", func(t *testing.T) {
		// Vault matches policy paths case-sensitively: the engine must not
		// take an upper-case id for the lower-case one a policy denies.
		denied, other := tunnels[1], tunnels[0]
		v.mustVault(t, root, "write", "-f", psk(account, denied))
		v.mustVault(t, root, "write", "-f", psk(account, other))
		policy := fmt.Sprintf(`path "cloudflare-ipsec/psk/%s/*" { capabilities = ["read", "create", "update"] }
path "cloudflare-ipsec/psk/%s/%s" { capabilities = ["deny"] }
`, account, account, denied)
		writeFile(t, filepath.Join(v.dir, "deny-one.hcl"), policy)
		v.mustVault(t, root, "policy", "write", "cf-ipsec-deny-one", filepath.Join(v.dir, "deny-one.hcl"))
		tok := v.mustVault(t, root, "token", "create", "-field=token", "-policy=cf-ipsec-deny-one")
		secrets.add(tok)
		keyBefore := edgeKey(account, denied)
		generated := sim.Calls(cloudflaresim.OpPSKGenerate)

		if res := v.vault(t, tok, "read", psk(account, denied)); res.code == 0 || !strings.Contains(res.stderr, "Code: 403") {
			t.Fatalf("read of the denied tunnel: exit %d, want 403:\n%s", res.code, secrets.redact(res.stderr))
		}
		if res := v.vault(t, tok, "read", "-field=psk", psk(account, other)); res.code != 0 {
			t.Fatalf("read of an allowed tunnel: exit %d:\n%s", res.code, secrets.redact(res.stderr))
		}
		for _, c := range []struct {
			args []string
			want string
		}{
			// The policy's allow matches these paths: only the engine can
			// refuse them.
			{[]string{"read", psk(account, strings.ToUpper(denied))}, "Code: 400"},
			{[]string{"write", "-f", psk(account, strings.ToUpper(denied))}, "Code: 400"},
			// No rule names an upper-case account: Vault refuses first.
			{[]string{"read", psk(strings.ToUpper(account), denied)}, "Code: 403"},
		} {
			res := v.vault(t, tok, c.args...)
			if res.code == 0 || !strings.Contains(res.stderr, c.want) {
				t.Errorf("%v with an upper-case id: exit %d, want %s:\n%s", c.args[0], res.code, c.want, secrets.redact(res.stderr))
			}
			if c.want == "Code: 400" && !strings.Contains(res.stderr, "lower-case") {
				t.Errorf("%v with an upper-case id: the refusal does not ask for lower case:\n%s", c.args[0], secrets.redact(res.stderr))
			}
			if strings.Contains(res.stdout+res.stderr, keyBefore) {
				t.Fatalf("%v with an upper-case id printed the denied tunnel's key", c.args[0])
			}
		}
		if edgeKey(account, denied) != keyBefore || sim.Calls(cloudflaresim.OpPSKGenerate) != generated {
			t.Error("a write with an upper-case id rotated the denied tunnel")
		}
	})

	t.Run("validate_only stores nothing", func(t *testing.T) {
		before := edgeKey(account, tunnels[2])
		out := v.mustVaultJSON(t, root, "write", psk(account, tunnels[2]), "validate_only=true")
		if field(t, out, "stored") != false || field(t, out, "validate_only") != true {
			t.Fatalf("validate_only answer = %v", out["data"])
		}
		if res := v.vault(t, root, "read", psk(account, tunnels[2])); res.code != 2 {
			t.Errorf("read after validate_only: exit %d, want 2 (nothing stored)", res.code)
		}
		if edgeKey(account, tunnels[2]) != before {
			t.Error("validate_only changed the edge's key")
		}
	})

	t.Run("list accounts and tunnels", func(t *testing.T) {
		v.mustVault(t, root, "write", "-f", psk(otherAccount, otherTunnel))
		accounts := v.mustRun(t, "json", root, "list", "cloudflare-ipsec/psk")
		for _, a := range []string{account, otherAccount} {
			if !strings.Contains(accounts, `"`+a+`/"`) {
				t.Errorf("account %s missing from %s", a, accounts)
			}
		}
		listed := v.mustRun(t, "json", root, "list", "cloudflare-ipsec/psk/"+account)
		for _, tun := range tunnels[:2] {
			if !strings.Contains(listed, `"`+tun+`"`) {
				t.Errorf("tunnel %s missing from %s", tun, listed)
			}
		}
		if strings.Contains(listed, tunnels[2]) {
			t.Error("a tunnel with nothing stored is listed")
		}
	})

	t.Run("bad input is a 400 that names the problem and calls nothing", func(t *testing.T) {
		calls := sim.TotalCalls()
		cases := map[string][]string{
			"short tunnel id":  {"write", "-f", psk(account, "abc")},
			"non-hex account":  {"write", "-f", psk("z"+account[1:], tunnels[0])},
			"long tunnel id":   {"read", psk(account, tunnels[0]+"00")},
			"dot dot":          {"read", meta(account, "..x")},
			"bad id on delete": {"delete", psk(account, "nope")},
		}
		for name, args := range cases {
			res := v.vault(t, root, args...)
			if res.code != 2 || !strings.Contains(res.stderr, "Code: 400") || !strings.Contains(res.stderr, "32 lower-case hexadecimal characters") {
				t.Errorf("%s: exit %d, stderr:\n%s", name, res.code, secrets.redact(res.stderr))
			}
		}
		if sim.TotalCalls() != calls {
			t.Errorf("bad input reached Cloudflare %d times", sim.TotalCalls()-calls)
		}
	})

	t.Run("a Cloudflare refusal is a 400 with Cloudflare's status, code and message", func(t *testing.T) {
		res := v.vault(t, root, "write", "-f", psk(account, cloudflaresim.NewID()))
		for _, want := range []string{"Code: 400", "HTTP 404", "code 1002", "ipsec tunnel not found", "tunnel "} {
			if !strings.Contains(res.stderr, want) {
				t.Errorf("stderr does not say %q:\n%s", want, secrets.redact(res.stderr))
			}
		}
		// A 503 leaves the outcome unknown, and its tunnel refuses new
		// keys until the settle window ends: a tunnel of its own keeps the
		// rest of the suite clear of it.
		spare := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
		v.mustVault(t, root, "write", "-f", psk(account, spare))
		sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 503, Errors: []cloudflaresim.Message{{Code: 1000, Message: "edge unavailable"}}})
		res = v.vault(t, root, "write", "-f", psk(account, spare))
		for _, want := range []string{"Code: 502", "HTTP 503", "code 1000", "edge unavailable", spare} {
			if !strings.Contains(res.stderr, want) {
				t.Errorf("stderr does not say %q:\n%s", want, secrets.redact(res.stderr))
			}
		}
		read := v.mustVaultJSON(t, root, "read", psk(account, spare))
		if field(t, read, "psk") != edgeKey(account, spare) || field(t, read, "state") != "rotation_unknown" {
			t.Errorf("after a failed rotation: state %v, key is the edge's: %v", field(t, read, "state"), field(t, read, "psk") == edgeKey(account, spare))
		}
		retry := v.vault(t, root, "write", "-f", psk(account, spare))
		if !strings.Contains(retry.stderr, "Code: 409") || !strings.Contains(retry.stderr, "until") {
			t.Errorf("a retry inside the settle window: stderr:\n%s", secrets.redact(retry.stderr))
		}
	})

	t.Run("rate limit and timeout reach the caller as 429 and 504", func(t *testing.T) {
		sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 429, RetryAfter: 2})
		res := v.vault(t, root, "write", "-f", psk(account, tunnels[0]))
		for _, want := range []string{"Code: 429", "HTTP 429", "code 971", "retry after 2s"} {
			if !strings.Contains(res.stderr, want) {
				t.Errorf("stderr does not say %q:\n%s", want, secrets.redact(res.stderr))
			}
		}
		// While Cloudflare's block lasts, nothing more is sent.
		calls := sim.TotalCalls()
		res = v.vault(t, root, "write", "-f", psk(account, tunnels[0]))
		if !strings.Contains(res.stderr, "Code: 429") || !strings.Contains(res.stderr, "not sent") || sim.TotalCalls() != calls {
			t.Errorf("inside the block: calls %d, stderr:\n%s", sim.TotalCalls()-calls, secrets.redact(res.stderr))
		}
		time.Sleep(2 * time.Second) // the block Cloudflare announced

		// request_timeout is 5s; the simulator holds its answer longer. A
		// timeout's outcome is unknown: a tunnel of its own, as above.
		spare := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
		v.mustVault(t, root, "write", "-f", psk(account, spare))
		sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Delay: 8 * time.Second})
		start := time.Now()
		res = v.vault(t, root, "write", "-f", psk(account, spare))
		if !strings.Contains(res.stderr, "Code: 504") || !strings.Contains(res.stderr, "deadline exceeded") {
			t.Errorf("stderr:\n%s", secrets.redact(res.stderr))
		}
		if waited := time.Since(start); waited > 7*time.Second {
			t.Errorf("the request took %s; request_timeout is 5s", waited)
		}
	})

	t.Run("an account-owned token is verified at its account", func(t *testing.T) {
		owned := sim.AddToken(cloudflaresim.Token{OwnerAccount: account})
		calls := sim.Calls(cloudflaresim.OpAccountTokenVerify)
		v.mustVault(t, root, "write", "cloudflare-ipsec/config", "api_token="+owned.Value, "token_account_id="+account)
		cfg := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/config")
		if field(t, cfg, "token_id") != owned.ID || field(t, cfg, "token_account_id") != account {
			t.Errorf("config = %v", cfg["data"])
		}
		if sim.Calls(cloudflaresim.OpAccountTokenVerify) != calls+1 {
			t.Error("the account's verify endpoint was not called")
		}
		v.mustVault(t, root, "write", "-f", psk(account, tunnels[0]))
		// Back to the user token for the rest of the suite.
		v.mustVault(t, root, "write", "cloudflare-ipsec/config", "api_token="+token.Value, "token_account_id=")
	})

	t.Run("policies separate who administers, who rotates and who reads", func(t *testing.T) {
		operatorPolicy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "operator.hcl"))
		if err != nil {
			t.Fatal(err)
		}
		provisionerPolicy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "provisioner.hcl"))
		if err != nil {
			t.Fatal(err)
		}
		adminPolicy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "admin.hcl"))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(v.dir, "admin.hcl"), string(adminPolicy))
		v.mustVault(t, root, "policy", "write", "cf-ipsec-admin", filepath.Join(v.dir, "admin.hcl"))
		admin := v.mustVault(t, root, "token", "create", "-field=token", "-policy=cf-ipsec-admin")
		secrets.add(admin)
		writeFile(t, filepath.Join(v.dir, "operator.hcl"), string(operatorPolicy))
		writeFile(t, filepath.Join(v.dir, "provisioner.hcl"), strings.ReplaceAll(string(provisionerPolicy), "ACCOUNT_ID", account))
		v.mustVault(t, root, "policy", "write", "cf-ipsec-operator", filepath.Join(v.dir, "operator.hcl"))
		v.mustVault(t, root, "policy", "write", "cf-ipsec-provisioner", filepath.Join(v.dir, "provisioner.hcl"))
		operator := v.mustVault(t, root, "token", "create", "-field=token", "-policy=cf-ipsec-operator")
		provisioner := v.mustVault(t, root, "token", "create", "-field=token", "-policy=cf-ipsec-provisioner")
		secrets.add(operator)
		secrets.add(provisioner)

		cases := []struct {
			who     string
			token   string
			args    []string
			allowed bool
		}{
			{"operator", operator, []string{"write", "-f", psk(account, tunnels[0])}, true},
			{"operator", operator, []string{"read", meta(account, tunnels[0])}, true},
			{"operator", operator, []string{"list", "cloudflare-ipsec/metadata/" + account}, true},
			{"operator", operator, []string{"read", psk(account, tunnels[0])}, false},
			{"operator", operator, []string{"read", "cloudflare-ipsec/config"}, false},
			{"operator", operator, []string{"write", "cloudflare-ipsec/config", "request_timeout=9"}, false},
			{"operator", operator, []string{"delete", psk(account, tunnels[0])}, false},
			{"operator", operator, []string{"read", "cloudflare-ipsec/status"}, true},
			{"provisioner", provisioner, []string{"read", psk(account, tunnels[0])}, true},
			{"provisioner", provisioner, []string{"write", "-f", psk(account, tunnels[0])}, false},
			{"provisioner", provisioner, []string{"read", psk(otherAccount, otherTunnel)}, false},
			{"provisioner", provisioner, []string{"read", meta(account, tunnels[0])}, false},
			{"provisioner", provisioner, []string{"read", "cloudflare-ipsec/config"}, false},
			{"provisioner", provisioner, []string{"read", "cloudflare-ipsec/status"}, false},
			{"admin", admin, []string{"read", "cloudflare-ipsec/config"}, true},
			{"admin", admin, []string{"write", "cloudflare-ipsec/config", "request_timeout=5s"}, true},
			{"admin", admin, []string{"list", "cloudflare-ipsec/tunnels/" + account}, true},
			{"admin", admin, []string{"read", meta(account, tunnels[0])}, true},
			{"admin", admin, []string{"read", "cloudflare-ipsec/status"}, true},
			{"admin", admin, []string{"read", psk(account, tunnels[0])}, false},
			{"admin", admin, []string{"write", "-f", psk(account, tunnels[0])}, false},
		}
		for _, c := range cases {
			res := v.vault(t, c.token, c.args...)
			if c.allowed && res.code != 0 {
				t.Errorf("%s %v: exit %d, want allowed:\n%s", c.who, c.args[:2], res.code, secrets.redact(res.stderr))
			}
			if !c.allowed && (res.code == 0 || !strings.Contains(res.stderr, "Code: 403")) {
				t.Errorf("%s %v: exit %d, want 403:\n%s", c.who, c.args[:2], res.code, secrets.redact(res.stderr))
			}
		}
		// The provisioner reads the key the operator's rotation put there.
		read := v.mustVaultJSON(t, provisioner, "read", psk(account, tunnels[0]))
		if field(t, read, "psk") != edgeKey(account, tunnels[0]) {
			t.Error("the provisioner reads a key that differs from the edge's")
		}
	})

	t.Run("Vault Agent renders the key into a router config", func(t *testing.T) {
		renderWithAgent(t, v, secrets, account, tunnels[0], edgeKey(account, tunnels[0]))
	})

	t.Run("concurrent rotations and reads over the HTTP API", func(t *testing.T) {
		concurrentRotations(t, v, sim, account, tunnels[1])
	})

	t.Run("delete forgets the key in Vault only", func(t *testing.T) {
		before, _ := sim.Tunnel(account, tunnels[1])
		calls := sim.TotalCalls()
		v.mustVault(t, root, "delete", psk(account, tunnels[1]))
		if res := v.vault(t, root, "read", psk(account, tunnels[1])); res.code != 2 {
			t.Errorf("read after delete: exit %d, want 2", res.code)
		}
		after, _ := sim.Tunnel(account, tunnels[1])
		if after.PSK != before.PSK || sim.TotalCalls() != calls {
			t.Error("delete touched the tunnel at Cloudflare")
		}
	})

	t.Run("deleting config stops rotation but keeps stored keys readable", func(t *testing.T) {
		v.mustVault(t, root, "delete", "cloudflare-ipsec/config")
		if res := v.vault(t, root, "read", "cloudflare-ipsec/config"); res.code != 2 {
			t.Errorf("config read after delete: exit %d, want 2", res.code)
		}
		calls := sim.TotalCalls()
		res := v.vault(t, root, "write", "-f", psk(account, tunnels[0]))
		if !strings.Contains(res.stderr, "Code: 400") || !strings.Contains(res.stderr, "not configured") {
			t.Errorf("rotation without config:\n%s", secrets.redact(res.stderr))
		}
		if sim.TotalCalls() != calls {
			t.Error("Cloudflare was called without config")
		}
		read := v.mustVaultJSON(t, root, "read", psk(account, tunnels[0]))
		if field(t, read, "psk") != edgeKey(account, tunnels[0]) {
			t.Error("the stored key is gone or stale after config was deleted")
		}
		v.mustVault(t, root, "write", "cloudflare-ipsec/config", "api_token="+token.Value, "base_url="+baseURL, "request_timeout=5s")
	})

	t.Run("path help and the generated OpenAPI cover every path", func(t *testing.T) {
		help := v.mustVault(t, root, "path-help", psk(account, tunnels[0]))
		for _, want := range []string{"validate_only", "does not touch the tunnel", "32 lower-case hexadecimal characters"} {
			if !strings.Contains(help, want) {
				t.Errorf("path-help does not mention %q", want)
			}
		}
		status, doc := v.api(t, root, "GET", "sys/internal/specs/openapi", nil)
		if status != http.StatusOK {
			t.Fatalf("openapi: status %d", status)
		}
		paths, _ := doc["paths"].(map[string]any)
		want := pathsFromDocs(t)
		if len(want) < 10 {
			t.Fatalf("only %d paths read from docs/paths.md", len(want))
		}
		for p, ops := range want {
			item, ok := paths[p].(map[string]any)
			if !ok {
				t.Errorf("OpenAPI lacks %s", p)
				continue
			}
			for _, op := range ops {
				o, ok := item[op].(map[string]any)
				if !ok {
					t.Errorf("OpenAPI %s lacks %s", p, op)
					continue
				}
				if id, _ := o["operationId"].(string); !strings.HasPrefix(id, "cloudflare-ipsec-") {
					t.Errorf("OpenAPI %s %s operationId %q lacks the engine's prefix", p, op, id)
				}
			}
		}
	})

	t.Run("no secret reaches the audit log or the server log", func(t *testing.T) {
		audit, err := os.ReadFile(auditLog)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(audit), psk(account, tunnels[0])[len("cloudflare-ipsec/"):]) {
			t.Fatal("the audit log does not record the psk reads: the search below would prove nothing")
		}
		assertNoSecretsIn(t, secrets, "the audit log", string(audit))
		assertNoSecretsIn(t, secrets, "the server log", v.log())
		assertNoDataRace(t, v.log())
	})
}

// renderWithAgent runs Vault Agent once with a template that writes the PSK
// into a strongSwan-style secrets file, as a router provisioning job would.
func renderWithAgent(t *testing.T, v *vaultServer, secrets *secretSet, account, tunnel, wantKey string) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	token := v.mustVault(t, v.rootToken, "token", "create", "-field=token", "-policy=cf-ipsec-provisioner")
	secrets.add(token)
	writeFile(t, tokenFile, token)
	template := fmt.Sprintf(`{{ with secret "cloudflare-ipsec/psk/%s/%s" -}}
# tunnel {{ .Data.tunnel_id }}, key version {{ .Data.version }}
203.0.113.1 : PSK "{{ .Data.psk }}"
{{ end }}`, account, tunnel)
	writeFile(t, filepath.Join(dir, "ipsec.secrets.tpl"), template)
	dest := filepath.Join(dir, "ipsec.secrets")
	writeFile(t, filepath.Join(dir, "agent.hcl"), fmt.Sprintf(`
vault { address = %q }
auto_auth {
  method "token_file" {
    config = { token_file_path = %q }
  }
}
template {
  source      = %q
  destination = %q
  perms       = "0600"
}
exit_after_auth = true
`, v.addr, tokenFile, filepath.Join(dir, "ipsec.secrets.tpl"), dest))

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, suite.vaultBin, "agent", "-config="+filepath.Join(dir, "agent.hcl"))
	cmd.Env = append(baseEnv(), "HOME="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vault agent: %v\n%s", err, secrets.redact(string(out)))
	}
	assertNoSecretsIn(t, secrets, "Vault Agent's output", string(out))
	rendered, err := os.ReadFile(dest)
	if err != nil {
		t.Fatalf("agent rendered nothing: %v\n%s", err, secrets.redact(string(out)))
	}
	if !strings.Contains(string(rendered), `: PSK "`+wantKey+`"`) {
		t.Fatalf("rendered file does not hold the edge's key:\n%s", secrets.redact(string(rendered)))
	}
}

// concurrentRotations sends many rotations and reads of one tunnel at once
// through the HTTP API: afterwards Vault must hold the edge's key, and no
// reader may have seen a key the edge never had.
func concurrentRotations(t *testing.T, v *vaultServer, sim *cloudflaresim.Server, account, tunnel string) {
	const writers, readers, readsEach = 16, 4, 10
	path := "cloudflare-ipsec/psk/" + account + "/" + tunnel
	startStatus, start := v.api(t, v.rootToken, "GET", path, nil)
	startVersion := 0
	if startStatus == http.StatusOK {
		startVersion = int(field(t, start, "version").(float64))
	}
	startGenerations := 0
	if tn, ok := sim.Tunnel(account, tunnel); ok {
		startGenerations = len(tn.GeneratedPSKs)
	}

	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	var seen []string
	for i := 0; i < writers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if status, _ := v.api(t, v.rootToken, "POST", path, map[string]any{}); status != http.StatusOK {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("write: HTTP %d", status))
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < readers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < readsEach; j++ {
				status, body := v.api(t, v.rootToken, "GET", path, nil)
				mu.Lock()
				if status == http.StatusOK {
					seen = append(seen, field(t, body, "psk").(string))
				} else if status != http.StatusNotFound {
					failures = append(failures, fmt.Sprintf("read: HTTP %d", status))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
	edge, _ := sim.Tunnel(account, tunnel)
	status, final := v.api(t, v.rootToken, "GET", path, nil)
	if status != http.StatusOK || field(t, final, "psk") != edge.PSK {
		t.Fatal("after concurrent rotations Vault does not hold the edge's key")
	}
	if got := int(field(t, final, "version").(float64)); got != startVersion+writers {
		t.Errorf("version = %d, want %d", got, startVersion+writers)
	}
	if got := len(edge.GeneratedPSKs) - startGenerations; got != writers {
		t.Errorf("edge generated %d keys, want %d", got, writers)
	}
	real := map[string]bool{}
	for _, k := range edge.GeneratedPSKs {
		real[k] = true
	}
	for _, k := range seen {
		if !real[k] {
			t.Fatal("a reader saw a key the edge never had")
		}
	}
}

// pathsFromDocs reads every path and its operations from docs/paths.md
// (which a unit test keeps equal to what the backend declares) and names
// them as Vault's OpenAPI document does.
func pathsFromDocs(t *testing.T) map[string][]string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "docs", "paths.md"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{}
	var current string
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "## `"); ok {
			current = "/cloudflare-ipsec/" + strings.TrimSuffix(rest, "`")
			for _, seg := range strings.Split(current, "/") {
				if strings.HasPrefix(seg, ":") {
					current = strings.Replace(current, seg, "{"+seg[1:]+"}", 1)
				}
			}
			continue
		}
		if current == "" || !strings.HasPrefix(line, "| ") {
			continue
		}
		op := strings.TrimSpace(strings.Split(line, "|")[1])
		method := map[string]string{"read": "get", "create": "post", "update": "post", "delete": "delete", "list": "get"}[op]
		if method == "" {
			continue
		}
		key := current
		if op == "list" {
			key += "/"
		}
		if !slices.Contains(want[key], method) {
			want[key] = append(want[key], method)
		}
	}
	return want
}
