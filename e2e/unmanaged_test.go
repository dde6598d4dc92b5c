package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestAnAccountComesUnderVaultInOneCommand is issue 16's last "done when"
// on a real Vault, with key_source vault: an account of 300 tunnels Vault
// does not manage comes under Vault with one
// rotate/<account> include_unmanaged=true, in at most 20 calls that change
// keys, although Cloudflare refuses some tunnels the first time
// (unapplied_psks) and takes at most 64 keys a call (413 above that, so the
// first batch of 100 is halved). Afterwards every tunnel's key is both on
// the edge and in Vault, current, with its router facts from the listing.
func TestAnAccountComesUnderVaultInOneCommand(t *testing.T) {
	const fleet = 300
	sim, baseURL, secrets, token, account := newEdge(t)
	// Seven tunnels refuse every key until the test lets them: the first
	// time each is sent, Cloudflare leaves it in unapplied_psks.
	const reason = "tunnel is being reconfigured"
	var ids, refused []string
	for i := 0; i < fleet; i++ {
		tun := cloudflaresim.Tunnel{Name: fmt.Sprintf("site_%03d", i), CustomerEndpoint: "198.51.100.7"}
		if i%40 == 7 && len(refused) < 7 {
			tun.RefusePSK = reason
		}
		ids = append(ids, sim.AddTunnel(account, tun).ID)
		if tun.RefusePSK != "" {
			refused = append(refused, ids[i])
		}
	}
	sim.SetPSKBatchLimit(64)

	v := startDevServer(t, secrets)
	root := v.rootToken
	auditLog := filepath.Join(v.dir, "audit.log")
	v.mustVault(t, root, "audit", "enable", "file", "file_path="+auditLog)
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, root, "write", "cloudflare-ipsec/config", "key_source=vault")
	keyCalls := func() int { return sim.Calls(cloudflaresim.OpPSKSet) + sim.Calls(cloudflaresim.OpPSKGenerate) }
	before, reads := keyCalls(), sim.Calls(cloudflaresim.OpTunnelGet)

	start := time.Now()
	queued := v.mustVaultJSON(t, root, "write", "cloudflare-ipsec/rotate/"+account, "include_unmanaged=true")
	if fmt.Sprint(field(t, queued, "queued")) != fmt.Sprint(fleet) || fmt.Sprint(field(t, queued, "unmanaged")) != fmt.Sprint(fleet) {
		t.Fatalf("answer: queued %v, unmanaged %v", field(t, queued, "queued"), field(t, queued, "unmanaged"))
	}
	// Every other tunnel is done, and the refused ones are shown retrying
	// with Cloudflare's reason; then Cloudflare takes keys for them again.
	progress := waitProgress(t, v, account, fleet-len(refused), time.Minute)
	retrying, _ := field(t, progress, "retrying").([]any)
	if fmt.Sprint(field(t, progress, "retrying_count")) != fmt.Sprint(len(refused)) || len(retrying) != len(refused) {
		t.Fatalf("progress with the refused tunnels: %v", progress["data"])
	}
	for _, r := range retrying {
		if entry, _ := r.(map[string]any); entry["reason"] != reason || entry["retry_at"] == "" {
			t.Errorf("retrying entry %v", r)
		}
	}
	for _, id := range refused {
		sim.EditOutOfBand(account, id, func(tun *cloudflaresim.Tunnel) { tun.RefusePSK = "" })
	}
	progress = waitProgress(t, v, account, fleet, 2*time.Minute)
	t.Logf("300 tunnels under Vault in %s, %d calls that change keys", time.Since(start).Round(100*time.Millisecond), keyCalls()-before)
	if fmt.Sprint(field(t, progress, "failed_count")) != "0" || fmt.Sprint(field(t, progress, "retrying_count")) != "0" {
		t.Fatalf("progress: %v", progress["data"])
	}
	if n := keyCalls() - before; n > 20 {
		t.Errorf("%d calls that change keys, want at most 20", n)
	}
	if n := sim.Calls(cloudflaresim.OpTunnelGet) - reads; n != 0 {
		t.Errorf("%d tunnel reads: the listing says all a first key needs", n)
	}

	for i, id := range ids {
		status, read := v.api(t, root, "GET", "cloudflare-ipsec/psk/"+account+"/"+id, nil)
		edge, _ := sim.Tunnel(account, id)
		data, _ := read["data"].(map[string]any)
		if status != http.StatusOK || data["state"] != "current" || data["psk"] != edge.PSK || data["key_source"] != "vault" ||
			data["name"] != fmt.Sprintf("site_%03d", i) || data["customer_endpoint"] != "198.51.100.7" {
			t.Fatalf("tunnel %s: HTTP %d, state %v, key is the edge's: %v, key_source %v, name %v",
				id, status, data["state"], data["psk"] == edge.PSK, data["key_source"], data["name"])
		}
		if len(edge.GeneratedPSKs) != 2 {
			t.Errorf("tunnel %s was given %d keys, want 1", id, len(edge.GeneratedPSKs)-1)
		}
	}

	audit, err := os.ReadFile(auditLog)
	if err != nil {
		t.Fatal(err)
	}
	assertNoSecretsIn(t, secrets, "the audit log", string(audit))
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

// waitProgress reads rotate/<account> until done reaches done, and
// returns that progress; it fails the test after limit.
func waitProgress(t *testing.T, v *vaultServer, account string, done int, limit time.Duration) map[string]any {
	t.Helper()
	for deadline := time.Now().Add(limit); ; {
		progress := v.mustVaultJSON(t, v.rootToken, "read", "cloudflare-ipsec/rotate/"+account)
		if fmt.Sprint(field(t, progress, "done")) == fmt.Sprint(done) {
			return progress
		}
		if time.Now().After(deadline) {
			t.Fatalf("done did not reach %d within %s: %v", done, limit, progress["data"])
		}
		time.Sleep(500 * time.Millisecond)
	}
}
