package e2e

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestPluginKilledBetweenGenerateAndStore kills the plugin process after
// Cloudflare generated a key and before the engine stored it. The next read,
// through the plugin process Vault starts again, must not serve the lost
// rotation's predecessor as current: it reconciles with Cloudflare and hands
// out the edge's key.
func TestPluginKilledBetweenGenerateAndStore(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	path := "cloudflare-ipsec/psk/" + account + "/" + tunnel

	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, v.rootToken, "write", "-f", path)

	sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{AfterCommit: true, Delay: 20 * time.Second})
	writeDone := make(chan cliResult, 1)
	go func() { writeDone <- v.vault(t, v.rootToken, "write", "-f", path) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		// The creation key, the first rotation's, the faulted one's.
		if edge, _ := sim.Tunnel(account, tunnel); len(edge.GeneratedPSKs) == 3 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	edge, _ := sim.Tunnel(account, tunnel)
	if len(edge.GeneratedPSKs) != 3 {
		t.Fatalf("the edge has %d keys; the faulted rotation did not commit", len(edge.GeneratedPSKs))
	}
	pids := pluginPIDs(t)
	if len(pids) == 0 {
		t.Fatal("no plugin process found to kill")
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatalf("kill plugin %d: %v", pid, err)
		}
	}
	if res := <-writeDone; res.code == 0 {
		t.Fatal("the write whose plugin was killed reported success")
	}

	// Vault starts the plugin again on the mount's next request. Until the
	// lost rotation's settle window ends (2 x request_timeout + 10s from
	// its start) reads say rotation_unknown; then the next one heals.
	var read map[string]any
	deadline = time.Now().Add(45 * time.Second)
	for time.Now().Before(deadline) {
		res := v.run(t, "json", v.rootToken, "read", path)
		if res.code == 0 {
			read = decodeJSON(t, res.stdout)
			if field(t, read, "state") == "current" {
				break
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	if read == nil {
		t.Fatal("the mount did not come back after the plugin was killed")
	}
	edge, _ = sim.Tunnel(account, tunnel)
	if field(t, read, "state") != "current" || field(t, read, "psk") != edge.PSK {
		t.Fatalf("after the kill: state %v, key is the edge's: %v", field(t, read, "state"), field(t, read, "psk") == edge.PSK)
	}
	if got := fmt.Sprint(field(t, read, "version")); got != "2" {
		t.Errorf("version = %s, want 2 (the healing rotation)", got)
	}
	if n := len(edge.GeneratedPSKs); n != 4 {
		t.Errorf("edge has had %d keys, want 4 (creation, rotation, lost rotation, heal)", n)
	}
	if len(pluginPIDs(t)) == 0 || !strings.Contains(v.log(), "reconciled") {
		t.Error("the server log does not show the restarted plugin reconciling")
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}
