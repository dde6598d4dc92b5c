package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestStatusCountsAScheduledAnUnknownAndAGoneTunnel is the scenario
// on a real Vault: one tunnel on a schedule, one whose rotation outcome is
// unknown, one that Cloudflare no longer has (found by Vault's own
// periodic drift check). status counts each where it belongs, lists the
// gone one for an operator, and holds none of the keys. A token of
// docs/policies/monitoring.hcl reads status and nothing else, and
// docs/examples/check-status.sh turns it into one line and an exit status.
func TestStatusCountsAScheduledAnUnknownAndAGoneTunnel(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	scheduled := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	unknown := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	gone := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	psk := func(id string) string { return "cloudflare-ipsec/psk/" + account + "/" + id }

	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, token.Value)
	// A settle window of over ten minutes keeps the unknown outcome unknown
	// for the test's length; the drift check runs at every periodic call.
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "request_timeout=5m", "drift_check_interval=1m")
	v.mustVault(t, v.rootToken, "write", psk(scheduled), "rotation_period=24h")
	v.mustVault(t, v.rootToken, "write", "-f", psk(unknown))
	v.mustVault(t, v.rootToken, "write", "-f", psk(gone))
	monitor := monitoringToken(t, v, secrets)
	if code, line := runCheck(t, v, monitor); code != 0 || !strings.HasPrefix(line, "CF-IPSEC OK - cloudflare-ipsec: 3 tunnels, 1 scheduled") {
		t.Errorf("check of a healthy mount: exit %d: %s", code, line)
	}

	sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 500, AfterCommit: true})
	if res := v.vault(t, v.rootToken, "write", "-f", psk(unknown)); res.code == 0 {
		t.Fatal("the faulted rotation reported success")
	}
	sim.DeleteTunnel(account, gone)

	// Vault calls the periodic function about once a minute; its drift
	// check finds the deleted tunnel. Only status is read meanwhile: a read
	// of the tunnels would look at Cloudflare by itself.
	var status map[string]any
	for deadline := time.Now().Add(150 * time.Second); ; time.Sleep(time.Second) {
		status = v.mustVaultJSON(t, monitor, "read", "cloudflare-ipsec/status")["data"].(map[string]any)
		if status["states"].(map[string]any)["tunnel_gone"] == 1.0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the deleted tunnel is not counted gone after 150s: %v", status["states"])
		}
	}
	want := map[string]any{"current": 1.0, "pending": 0.0, "rotation_unknown": 1.0, "stale": 0.0, "tunnel_gone": 1.0}
	if status["tunnels"] != 3.0 || !sameMap(status["states"].(map[string]any), want) || status["scheduled"] != 1.0 ||
		status["counts_exact"] != true || status["failing_count"] != 0.0 || status["overdue"] != 0.0 {
		t.Errorf("status: %v", status)
	}
	attention := status["attention"].([]any)
	if status["attention_count"] != 1.0 || len(attention) != 1 {
		t.Fatalf("attention: %v", attention)
	}
	if item := attention[0].(map[string]any); item["tunnel_id"] != gone || item["account_id"] != account || item["state"] != "tunnel_gone" || item["reason"] == "" {
		t.Errorf("attention item: %v", item)
	}
	if status["drift_found"] != 1.0 || status["last_drift_check"] == "" {
		t.Errorf("drift: found %v, checked %v", status["drift_found"], status["last_drift_check"])
	}
	meta := v.mustVaultJSON(t, v.rootToken, "read", "cloudflare-ipsec/metadata/"+account+"/"+scheduled)["data"].(map[string]any)
	next, _ := time.Parse(time.RFC3339Nano, meta["next_rotation"].(string))
	if status["next_rotation"] != next.Truncate(time.Minute).UTC().Format(time.RFC3339Nano) {
		t.Errorf("next_rotation %v, want the minute of %v", status["next_rotation"], meta["next_rotation"])
	}

	// No key in the answer, as the CLI prints it or as the API sends it.
	out := v.mustRun(t, "json", monitor, "read", "cloudflare-ipsec/status")
	_, raw := v.api(t, monitor, http.MethodGet, "cloudflare-ipsec/status", nil)
	for _, id := range []string{scheduled, unknown} {
		edge, _ := sim.Tunnel(account, id)
		if edge.PSK == "" || strings.Contains(out, edge.PSK) {
			t.Fatal("status holds a tunnel's key")
		}
	}
	api, err := json.Marshal(raw)
	if err != nil {
		t.Fatal(err)
	}
	assertNoSecretsIn(t, secrets, "the status answer", out)
	assertNoSecretsIn(t, secrets, "the status answer over the API", string(api))

	// The monitoring policy reads status and nothing else.
	for _, path := range []string{psk(scheduled), "cloudflare-ipsec/metadata/" + account + "/" + scheduled, "cloudflare-ipsec/config", "cloudflare-ipsec/rotate/" + account} {
		if code, _ := v.api(t, monitor, http.MethodGet, path, nil); code != http.StatusForbidden {
			t.Errorf("monitoring token: GET %s answered %d, want 403", path, code)
		}
	}
	if code, _ := v.api(t, monitor, http.MethodPost, psk(scheduled), map[string]any{}); code != http.StatusForbidden {
		t.Errorf("monitoring token: a write of psk/ answered %d, want 403", code)
	}
	code, line := runCheck(t, v, monitor)
	if code != 1 || !strings.HasPrefix(line, "CF-IPSEC WARNING - cloudflare-ipsec: 1 tunnel_gone (first: "+account+"/"+gone+" tunnel_gone); 3 tunnels") {
		t.Errorf("check: exit %d: %s", code, line)
	}

	// A plugin reload cleans the backend up, which writes the census
	// closed; the new backend takes its counts, and the last drift check,
	// as they are (its scheduler's first pass recounts them at once too,
	// so counted_at moves on).
	v.mustVault(t, v.rootToken, "plugin", "reload", "-plugin="+pluginName)
	reloaded := v.mustVaultJSON(t, monitor, "read", "cloudflare-ipsec/status")["data"].(map[string]any)
	for _, k := range []string{"tunnels", "states", "scheduled", "attention_count", "counts_exact", "last_drift_check", "drift_found"} {
		if fmt.Sprint(reloaded[k]) != fmt.Sprint(status[k]) {
			t.Errorf("after a plugin reload %s is %v, was %v", k, reloaded[k], status[k])
		}
	}
	// The new backend found them closed: it would have said so otherwise.
	if strings.Contains(v.log(), "the census counts are not exact") {
		t.Error("after a plugin reload the census was taken as left open")
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

func sameMap(a, b map[string]any) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}

// monitoringToken is a token with docs/policies/monitoring.hcl only.
func monitoringToken(t *testing.T, v *vaultServer, secrets *secretSet) string {
	t.Helper()
	policy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "monitoring.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(v.dir, "monitoring.hcl"), string(policy))
	v.mustVault(t, v.rootToken, "policy", "write", "cf-ipsec-monitoring", filepath.Join(v.dir, "monitoring.hcl"))
	tok := strings.TrimSpace(v.mustVault(t, v.rootToken, "token", "create", "-field=token", "-policy=cf-ipsec-monitoring"))
	secrets.add(tok)
	return tok
}

// runCheck runs docs/examples/check-status.sh as a monitoring system would,
// with token, and returns its exit status and its one line.
func runCheck(t *testing.T, v *vaultServer, token string) (int, string) {
	t.Helper()
	if _, err := exec.LookPath("jq"); err != nil {
		t.Fatal("docs/examples/check-status.sh needs jq, which is not installed")
	}
	cmd := exec.Command("sh", filepath.Join("..", "docs", "examples", "check-status.sh"))
	cmd.Env = append(baseEnv(), "VAULT_ADDR="+v.addr, "VAULT_TOKEN="+token, "HOME="+v.dir,
		"PATH="+filepath.Dir(suite.vaultBin)+string(os.PathListSeparator)+os.Getenv("PATH"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if exitErr, ok := err.(*exec.ExitError); ok {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	out := stdout.String()
	if strings.Count(out, "\n") != 1 || stderr.Len() != 0 {
		t.Errorf("the check printed %q and %q on stderr, want one line and nothing else", v.secrets.redact(out), v.secrets.redact(stderr.String()))
	}
	return code, strings.TrimSpace(out)
}
