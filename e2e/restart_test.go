package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestPSKSurvivesRestart stores a key on a server with file storage, stops
// the server, starts and unseals it again, and reads the same key back; the
// restarted mount must also rotate as before.
func TestPSKSurvivesRestart(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	path := "cloudflare-ipsec/psk/" + account + "/" + tunnel

	dir := t.TempDir()
	port := freePort(t)
	first := startFileServer(t, dir, port, secrets)
	var init struct {
		UnsealKeys []string `json:"unseal_keys_b64"`
		RootToken  string   `json:"root_token"`
	}
	out := first.mustRun(t, "json", "", "operator", "init", "-key-shares=1", "-key-threshold=1")
	if err := json.Unmarshal([]byte(out), &init); err != nil || len(init.UnsealKeys) != 1 {
		t.Fatalf("decode operator init output: %v", err)
	}
	secrets.add(init.UnsealKeys[0])
	secrets.add(init.RootToken)
	unseal := func(v *vaultServer) {
		v.mustVault(t, "", "operator", "unseal", init.UnsealKeys[0])
		waitActive(t, v)
		v.rootToken = init.RootToken
	}
	unseal(first)
	first.mountEngine(t, baseURL, token.Value)
	first.mustVault(t, init.RootToken, "write", "-f", path)
	before := first.mustVaultJSON(t, init.RootToken, "read", path)
	edge, _ := sim.Tunnel(account, tunnel)
	if field(t, before, "psk") != edge.PSK {
		t.Fatal("before the restart Vault does not hold the edge's key")
	}
	firstLog := first.log()
	first.stop()

	second := startFileServer(t, dir, port, secrets)
	if res := second.vault(t, init.RootToken, "read", path); res.code == 0 {
		t.Fatal("a sealed server served the key")
	}
	unseal(second)
	after := second.mustVaultJSON(t, init.RootToken, "read", path)
	for _, k := range []string{"psk", "version", "last_generated_on", "stored_at"} {
		if fmt.Sprint(field(t, after, k)) != fmt.Sprint(field(t, before, k)) {
			t.Errorf("after the restart %s changed", k)
		}
	}
	second.mustVault(t, init.RootToken, "write", "-f", path)
	rotated := second.mustVaultJSON(t, init.RootToken, "read", path)
	edge, _ = sim.Tunnel(account, tunnel)
	if field(t, rotated, "psk") != edge.PSK || fmt.Sprint(field(t, rotated, "version")) != "2" {
		t.Error("the restarted mount does not rotate as before")
	}

	assertNoSecretsIn(t, secrets, "the first server's log", firstLog)
	assertNoSecretsIn(t, secrets, "the second server's log", second.log())
	assertNoDataRace(t, firstLog+second.log())
}

// waitActive waits until the server is unsealed and active.
func waitActive(t testing.TB, v *vaultServer) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(v.addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("vault at %s did not become active", v.addr)
}
