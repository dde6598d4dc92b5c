package e2e

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// routerTemplates are the router templates of docs/examples, each rendered to
// the golden file of the same name (with .golden) under testdata/templates.
var routerTemplates = []string{"swanctl.conf.tpl", "vyos.vbash.tpl", "ios-xe.cfg.tpl", "junos.set.tpl"}

// TestRouterTemplatesRenderThroughAgent renders every router template of
// docs/examples with a real Vault Agent, authenticated by AppRole as
// docs/examples/agent.hcl is, against tunnels whose ids, names and addresses
// are fixed, and compares each file with its golden copy, the keys replaced
// by placeholders. A field renamed in the engine or in a template fails here
// (Agent runs with error_on_missing_key, as the example does), not on a
// router. UPDATE_GOLDEN=1 rewrites the golden files; review the diff. The
// tunnels are goldenTunnels.
func TestRouterTemplatesRenderThroughAgent(t *testing.T) {
	sim, baseURL, secrets, token, _ := newEdge(t)
	account, tunnels := goldenAccount, goldenTunnels()
	var ids []string
	for _, tun := range tunnels {
		ids = append(ids, sim.AddTunnel(account, tun).ID)
	}

	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, token.Value)
	for _, id := range ids {
		v.mustVault(t, root, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+id)
	}
	placeholders := edgeKeyPlaceholders(t, sim, secrets, account, ids)

	dir := t.TempDir()
	roleID, secretID := approleForProvisioner(t, v, secrets, account)
	writeFile(t, filepath.Join(dir, "role-id"), roleID)
	writeFile(t, filepath.Join(dir, "secret-id"), secretID)
	var stanzas strings.Builder
	for _, name := range routerTemplates {
		source, err := filepath.Abs(filepath.Join("..", "docs", "examples", name))
		if err != nil {
			t.Fatal(err)
		}
		// exec as the example has it; here it only leaves a mark, to prove
		// that Agent accepts the stanza and runs it after the render.
		fmt.Fprintf(&stanzas, `
template {
  source               = %q
  destination          = %q
  perms                = "0600"
  error_on_missing_key = true
  exec {
    command = ["touch", %q]
    timeout = "10s"
  }
}
`, source, filepath.Join(dir, "out", name), filepath.Join(dir, "out", name+".reloaded"))
	}
	writeFile(t, filepath.Join(dir, "agent.hcl"), fmt.Sprintf(`
vault { address = %q }
auto_auth {
  method "approle" {
    mount_path = "auth/approle"
    config = {
      role_id_file_path   = %q
      secret_id_file_path = %q
    }
  }
}
template_config { exit_on_retry_failure = true }
%s
exit_after_auth = true
`, v.addr, filepath.Join(dir, "role-id"), filepath.Join(dir, "secret-id"), stanzas.String()))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, suite.vaultBin, "agent", "-config="+filepath.Join(dir, "agent.hcl"))
	// A space after the comma, as people write lists.
	cmd.Env = append(baseEnv(), "HOME="+dir, "CF_ACCOUNT_ID="+account, "CF_TUNNEL_IDS="+strings.Join(ids, ", "))
	out, err := cmd.CombinedOutput()
	assertNoSecretsIn(t, secrets, "Vault Agent's output", string(out))
	if err != nil {
		t.Fatalf("vault agent: %v\n%s", err, secrets.redact(string(out)))
	}

	for _, name := range routerTemplates {
		t.Run(name, func(t *testing.T) {
			dest := filepath.Join(dir, "out", name)
			info, err := os.Stat(dest)
			if err != nil {
				t.Fatalf("Agent rendered nothing: %v", err)
			}
			if info.Mode().Perm() != 0o600 {
				t.Errorf("rendered with mode %v, want 0600: the file holds keys", info.Mode().Perm())
			}
			if _, err := os.Stat(dest + ".reloaded"); err != nil {
				t.Errorf("Agent did not run the template's exec: %v", err)
			}
			raw, err := os.ReadFile(dest)
			if err != nil {
				t.Fatal(err)
			}
			rendered := string(raw)
			for key, placeholder := range placeholders {
				rendered = strings.ReplaceAll(rendered, key, placeholder)
			}
			compareGolden(t, secrets, name, rendered)
		})
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

// goldenAccount and goldenTunnels are the edge every golden file of
// testdata/templates was rendered from: fixed ids, names and addresses, so
// that a render is the same from run to run but for the keys. The three
// tunnels take each branch the templates have: an ipsec_id from
// psk_generate's answer and IPv6 (1), a custom FQDN id (2), neither, no
// customer endpoint and a /30 (3).
const goldenAccount = "7c5dae5552338874e5053f2534d2767a"

func goldenTunnels() []cloudflaresim.Tunnel {
	return []cloudflaresim.Tunnel{
		{ID: "b43e68fb724678a6ebe1602d52e4bad1", Name: "site_a_1", CloudflareEndpoint: "162.159.66.1",
			CustomerEndpoint: "198.51.100.7", InterfaceAddress: "10.252.2.34/31",
			InterfaceAddress6: "2606:54c1:7:0:a9fe:12d2:1:200/127", IPsecID: "12345_b43e68fb724678a6ebe1602d52e4bad1"},
		{ID: "32b427943ea14f4159760e8479c2194d", Name: "site_a_2", CloudflareEndpoint: "172.64.244.68",
			CustomerEndpoint: "198.51.100.7", InterfaceAddress: "10.252.2.36/31",
			CustomFQDNID: "site-a." + goldenAccount + ".custom.ipsec.cloudflare.com"},
		{ID: "78c3e151b2e7d9d9f8a19a91e21a9e65", Name: "site_a_3", CloudflareEndpoint: "162.159.67.1",
			InterfaceAddress: "10.252.2.41/30"},
	}
}

// edgeKeyPlaceholders returns what each tunnel's key at the edge, and its
// base64 form, becomes in the golden files, and adds the base64 forms to
// secrets (the keys are there already, as the simulator issued them).
func edgeKeyPlaceholders(t testing.TB, sim *cloudflaresim.Server, secrets *secretSet, account string, ids []string) map[string]string {
	t.Helper()
	placeholders := map[string]string{}
	for _, id := range ids {
		tun, ok := sim.Tunnel(account, id)
		if !ok || tun.PSK == "" {
			t.Fatalf("tunnel %s has no key at the edge", id)
		}
		encoded := base64.StdEncoding.EncodeToString([]byte(tun.PSK))
		secrets.add(encoded)
		placeholders[encoded] = fmt.Sprintf("<base64 of the key of %s>", tun.Name)
		placeholders[tun.PSK] = fmt.Sprintf("<key of %s>", tun.Name)
	}
	return placeholders
}

// approleForProvisioner sets up AppRole as a production Agent would use it:
// a role that carries only the provisioner policy of docs/policies for the
// account. It returns the role id and a secret id (a secret).
func approleForProvisioner(t testing.TB, v *vaultServer, secrets *secretSet, account string) (string, string) {
	t.Helper()
	policy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "provisioner.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(v.dir, "provisioner.hcl"), strings.ReplaceAll(string(policy), "ACCOUNT_ID", account))
	v.mustVault(t, v.rootToken, "policy", "write", "cf-ipsec-provisioner", filepath.Join(v.dir, "provisioner.hcl"))
	v.mustVault(t, v.rootToken, "auth", "enable", "approle")
	v.mustVault(t, v.rootToken, "write", "auth/approle/role/router", "token_policies=cf-ipsec-provisioner", "token_ttl=10m")
	roleID := strings.TrimSpace(v.mustVault(t, v.rootToken, "read", "-field=role_id", "auth/approle/role/router/role-id"))
	secretID := strings.TrimSpace(v.mustVault(t, v.rootToken, "write", "-f", "-field=secret_id", "auth/approle/role/router/secret-id"))
	if roleID == "" || secretID == "" {
		t.Fatal("AppRole gave no role id or secret id")
	}
	secrets.add(secretID)
	return roleID, secretID
}

// compareGolden compares a rendered template, keys already replaced by
// placeholders, with testdata/templates/<name>.golden, or rewrites that file
// when UPDATE_GOLDEN=1. A difference is reported line by line, with every
// known secret and every key-like token the golden file does not hold
// redacted: a template that mangled a key must not print it.
func compareGolden(t *testing.T, secrets *secretSet, name, rendered string) {
	t.Helper()
	golden := filepath.Join("testdata", "templates", name+".golden")
	if strings.Contains(rendered, "<no value>") {
		t.Errorf("the template rendered a field the read did not return (<no value>)")
	}
	if os.Getenv("UPDATE_GOLDEN") == "1" {
		if leaked := secrets.redact(rendered); leaked != rendered {
			t.Fatalf("a key survived the placeholders; %s not written", golden)
		}
		mkdir(t, filepath.Dir(golden))
		if err := os.WriteFile(golden, []byte(rendered), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if !matchesGolden(t, secrets, golden, rendered) {
		t.Errorf("%s differs from the rendered template (UPDATE_GOLDEN=1 rewrites it; review the diff)", golden)
	}
}

// matchesGolden reports whether rendered is the golden file's text, and
// reports each of the first ten lines that differ, redacted as compareGolden
// says. It never writes the file.
func matchesGolden(t *testing.T, secrets *secretSet, golden, rendered string) bool {
	t.Helper()
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (UPDATE_GOLDEN=1 writes it)", err)
	}
	if rendered == string(want) {
		return true
	}
	got, exp := strings.Split(rendered, "\n"), strings.Split(string(want), "\n")
	shown := 0
	for i := 0; i < max(len(got), len(exp)) && shown < 10; i++ {
		var g, w string
		if i < len(got) {
			g = redactUnknownTokens(secrets.redact(got[i]), string(want))
		}
		if i < len(exp) {
			w = exp[i]
		}
		if g != w {
			t.Errorf("%s line %d:\n got  %q\n want %q", golden, i+1, g, w)
			shown++
		}
	}
	return false
}

var keyLike = regexp.MustCompile(`[A-Za-z0-9+/=_-]{16,}`)

// redactUnknownTokens hides every long token of key-like characters that
// the golden file does not contain (ids and addresses it does contain).
func redactUnknownTokens(line, golden string) string {
	return keyLike.ReplaceAllStringFunc(line, func(tok string) string {
		if strings.Contains(golden, tok) {
			return tok
		}
		return "[REDACTED TOKEN]"
	})
}

// TestRouterTemplatesCarryOrRefuseAnyKey renders each router template with a
// real Vault Agent from reads whose key no Cloudflare answer could bring into
// Vault (the engine refuses any key that is not letters and digits): a quote,
// a backslash, a space, a single quote, "?", a line break, a leading $9$. A
// key Vault makes itself one day could hold them. Each template must either
// carry the key exactly, in its router's syntax, or refuse to render, and then
// Agent writes nothing: no key may end a quoted string or add a command of
// its own. The reads come from a KV mount that holds what the engine's read
// returns with the key replaced; each template's path is rewritten to it.
func TestRouterTemplatesCarryOrRefuseAnyKey(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	tun := sim.AddTunnel(account, cloudflaresim.Tunnel{Name: "site_a_1", CustomerEndpoint: "198.51.100.7"})
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, root, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+tun.ID)
	data, ok := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/psk/"+account+"/"+tun.ID)["data"].(map[string]any)
	if !ok {
		t.Fatal("the engine's read has no data")
	}
	v.mustVault(t, root, "secrets", "enable", "-path=anykey", "-version=1", "kv")

	keys, expect := anyKeys(), anyKeyExpectations()

	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "token"), root)
	for name, key := range keys {
		secrets.add(key)
		secrets.add(base64.StdEncoding.EncodeToString([]byte(key)))
		hostile := map[string]any{}
		for k, val := range data {
			hostile[k] = val
		}
		hostile["psk"] = key
		if status, _ := v.api(t, root, "PUT", "anykey/psk/"+account+"/"+tun.ID, hostile); status != 204 && status != 200 {
			t.Fatalf("write the key %q to KV: HTTP %d", name, status)
		}
		for _, tpl := range routerTemplates {
			t.Run(tpl+" with "+name, func(t *testing.T) {
				want := expect[tpl]
				raw, err := os.ReadFile(filepath.Join("..", "docs", "examples", tpl))
				if err != nil {
					t.Fatal(err)
				}
				run := filepath.Join(dir, strings.ReplaceAll(tpl+" "+name, " ", "_"))
				mkdir(t, run)
				source := strings.ReplaceAll(string(raw), `"cloudflare-ipsec/psk/`, `"anykey/psk/`)
				if source == string(raw) {
					t.Fatal("the template reads no cloudflare-ipsec/psk/ path to rewrite")
				}
				writeFile(t, filepath.Join(run, "source.tpl"), source)
				dest := filepath.Join(run, "out")
				writeFile(t, filepath.Join(run, "agent.hcl"), fmt.Sprintf(`
vault { address = %q }
auto_auth {
  method "token_file" {
    config = { token_file_path = %q }
  }
}
template_config { exit_on_retry_failure = true }
template {
  source               = %q
  destination          = %q
  error_on_missing_key = true
}
exit_after_auth = true
`, v.addr, filepath.Join(dir, "token"), filepath.Join(run, "source.tpl"), dest))
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				cmd := exec.CommandContext(ctx, suite.vaultBin, "agent", "-config="+filepath.Join(run, "agent.hcl"))
				cmd.Env = append(baseEnv(), "HOME="+run, "CF_ACCOUNT_ID="+account, "CF_TUNNEL_IDS="+tun.ID)
				out, err := cmd.CombinedOutput()
				assertNoSecretsIn(t, secrets, "Vault Agent's output", string(out))
				rendered, readErr := os.ReadFile(dest)
				if !slices.Contains(want.carried, name) {
					// Agent's output cannot be searched for the reason:
					// consul-template redacts every value of the read from
					// its errors, the empty ones too, which puts a marker
					// between any two characters.
					if err == nil || readErr == nil {
						t.Fatalf("the template rendered a key it cannot carry (Agent: %v; file: %v)", err, readErr)
					}
					return
				}
				if err != nil || readErr != nil {
					t.Fatalf("vault agent: %v (file: %v)\n%s", err, readErr, secrets.redact(string(out)))
				}
				if strings.Contains(string(rendered), "intruder") {
					t.Error("the key's text reached the rendered file outside its quoting")
				}
				if got := want.decode(t, string(rendered)); got != key {
					t.Errorf("the rendered key is not the key read (%d characters, want %d)", len(got), len(key))
				}
			})
		}
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
}

// The keys no Cloudflare answer could bring into Vault, by what they hold,
// with which each router template is rendered from a KV mount.
const (
	quotes    = "quotes, a backslash, a space and ?"
	lineBreak = "a line break"
	encrypted = "a leading $9$"
)

func anyKeys() map[string]string {
	return map[string]string{
		quotes:    `Ab1"c\d e'f?g"` + `\`,
		lineBreak: "Ab1\"\nset system login user intruder class super-user",
		encrypted: "$9$Ab1cdefghijklmnop",
	}
}

// keyExpectation is what a router template must do with each of anyKeys:
// carried lists the keys it renders exactly (decode takes the key back out of
// the rendered file); a key not listed must be refused.
type keyExpectation struct {
	carried []string
	decode  func(t *testing.T, rendered string) string
}

// anyKeyExpectations holds a keyExpectation for each of routerTemplates.
func anyKeyExpectations() map[string]keyExpectation {
	fromBase64 := func(pattern string) func(t *testing.T, rendered string) string {
		re := regexp.MustCompile(pattern)
		return func(t *testing.T, rendered string) string {
			m := re.FindStringSubmatch(rendered)
			if m == nil {
				t.Fatalf("no line matches %s", pattern)
			}
			b, err := base64.StdEncoding.DecodeString(m[1])
			if err != nil {
				t.Fatalf("the key is not base64: %v", err)
			}
			return string(b)
		}
	}
	junosKey := regexp.MustCompile(`(?m)^set security ike policy cf-ike-pol-1 pre-shared-key ascii-text "((?:[^"\\]|\\.)*)"$`)
	junosEscape := regexp.MustCompile(`\\(.)`)
	return map[string]keyExpectation{
		"swanctl.conf.tpl": {carried: []string{quotes, lineBreak, encrypted}, decode: fromBase64(`(?m)^    secret = 0s(\S+)$`)},
		"vyos.vbash.tpl":   {carried: []string{quotes, lineBreak, encrypted}, decode: fromBase64(`(?m)^set vpn ipsec authentication psk cf1 secret '([A-Za-z0-9+/=]+)'$`)},
		"junos.set.tpl": {carried: []string{quotes}, decode: func(t *testing.T, rendered string) string {
			for i, line := range strings.Split(strings.TrimSuffix(rendered, "\n"), "\n") {
				if !strings.HasPrefix(line, "set ") && !strings.HasPrefix(line, "delete ") {
					t.Errorf("line %d is not a set or delete statement", i+1)
				}
			}
			m := junosKey.FindStringSubmatch(rendered)
			if m == nil {
				t.Fatal("no pre-shared-key statement holds one quoted string")
			}
			return junosEscape.ReplaceAllString(m[1], "$1")
		}},
		"ios-xe.cfg.tpl": {},
	}
}
