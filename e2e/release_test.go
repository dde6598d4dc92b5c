package e2e

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestReleaseBuildAndRootRotation follows the README: build a release with
// scripts/release.sh, register it by the checksum in SHA256SUMS with its
// version, enable it pinned to that version, and rotate the root token. The
// old token must be refused by Cloudflare afterwards, and neither value may
// appear in any response, log line or audit entry.
func TestReleaseBuildAndRootRotation(t *testing.T) {
	const version = "v0.0.9-e2e"
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	build := exec.Command("scripts/release.sh", version)
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("release build: %v\n%s", err, out)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Join(root, "dist", version)) })
	binary := "vault-plugin-secrets-cloudflare-ipsec_" + version + "_linux_amd64"
	sums, err := os.ReadFile(filepath.Join(root, "dist", version, "SHA256SUMS"))
	if err != nil {
		t.Fatal(err)
	}
	var sha string
	for _, line := range strings.Split(string(sums), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[1] == binary {
			sha = f[0]
		}
	}
	if sha == "" {
		t.Fatalf("SHA256SUMS has no line for %s", binary)
	}
	pluginDir := t.TempDir()
	body, err := os.ReadFile(filepath.Join(root, "dist", version, binary))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(pluginDir, binary), string(body))
	if err := os.Chmod(filepath.Join(pluginDir, binary), 0o755); err != nil {
		t.Fatal(err)
	}

	sim, baseURL, secrets, token, account := newEdge(t)
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	v := startDevServerWith(t, secrets, "trace", pluginDir)
	rootToken := v.rootToken
	auditLog := filepath.Join(v.dir, "audit.log")
	v.mustVault(t, rootToken, "audit", "enable", "file", "file_path="+auditLog)

	v.mustVault(t, rootToken, "plugin", "register", "-sha256="+sha, "-version="+version, "-command="+binary, "secret", pluginName)
	v.mustVault(t, rootToken, "secrets", "enable", "-path=cloudflare-ipsec", "-plugin-version="+version, pluginName)
	mounts := v.mustVaultJSON(t, rootToken, "secrets", "list", "-detailed")
	mount := mounts["cloudflare-ipsec/"].(map[string]any)
	if mount["plugin_version"] != version || mount["running_plugin_version"] != version || mount["running_sha256"] != sha {
		t.Fatalf("mount: version %v, running %v, sha matches: %v", mount["plugin_version"], mount["running_plugin_version"], mount["running_sha256"] == sha)
	}
	v.mustVault(t, rootToken, "write", "cloudflare-ipsec/config", "api_token="+token.Value, "base_url="+baseURL)
	v.mustVault(t, rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+tunnel)

	out := v.mustRun(t, "json", rootToken, "write", "-f", "cloudflare-ipsec/config/rotate-root")
	rotated := decodeJSON(t, out)
	if field(t, rotated, "token_id") != token.ID || field(t, rotated, "last_rotated") == "" {
		t.Fatalf("rotate-root answer = %v", rotated["data"])
	}
	rolled, _ := sim.TokenByID(token.ID)
	if rolled.Value == token.Value {
		t.Fatal("the token was not rolled at Cloudflare")
	}

	// The old value is refused by Cloudflare now.
	req, _ := http.NewRequest("GET", baseURL+"/user/tokens/verify", nil)
	req.Header.Set("Authorization", "Bearer "+token.Value)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("the old token still works at Cloudflare: HTTP %d", resp.StatusCode)
	}
	// The engine goes on with the new one.
	v.mustVault(t, rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+tunnel)
	cfg := v.mustVaultJSON(t, rootToken, "read", "cloudflare-ipsec/config")
	if field(t, cfg, "last_rotated") != field(t, rotated, "last_rotated") || field(t, cfg, "token_status") != "active" {
		t.Errorf("config after rotate-root = %v", cfg["data"])
	}
	v.mustVault(t, rootToken, "plugin", "reload", "-plugin="+pluginName)
	v.mustVault(t, rootToken, "read", "cloudflare-ipsec/psk/"+account+"/"+tunnel)

	audit, err := os.ReadFile(auditLog)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(audit), "config/rotate-root") {
		t.Fatal("the audit log does not record rotate-root: the search below would prove nothing")
	}
	for what, text := range map[string]string{"the rotate-root response": out, "the audit log": string(audit), "the server log": v.log()} {
		assertNoSecretsIn(t, secrets, what, text)
	}
	if !strings.Contains(strings.Join(sim.IssuedSecrets(), " "), rolled.Value) {
		t.Fatal("the rolled value is not among the secrets searched for")
	}
}
