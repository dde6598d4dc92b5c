package e2e

import (
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestARetryInsideTheSettleWindowIsRefused plays the first sequence
// on a real server: a write times out, Cloudflare processes the abandoned
// request after the caller gave up, and the operator retries at once. The
// retry is a 409 that says until when and sends nothing; once the window
// has passed, a read serves the key the edge uses.
func TestARetryInsideTheSettleWindowIsRefused(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	path := "cloudflare-ipsec/psk/" + account + "/" + tunnel

	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "request_timeout=1s")
	v.mustVault(t, v.rootToken, "write", "-f", path)

	sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{ProcessAfter: 2 * time.Second})
	if res := v.vault(t, v.rootToken, "write", "-f", path); res.code == 0 {
		t.Fatal("the abandoned write reported success")
	}
	generates := sim.Calls(cloudflaresim.OpPSKGenerate)
	retry := v.vault(t, v.rootToken, "write", "-f", path)
	if retry.code == 0 || !strings.Contains(retry.stderr, "Code: 409") || !strings.Contains(retry.stderr, "until") {
		t.Fatalf("retry inside the settle window: exit %d: %s", retry.code, secrets.redact(retry.stderr))
	}
	if sim.Calls(cloudflaresim.OpPSKGenerate) != generates {
		t.Fatal("the retry sent a psk_generate while the abandoned one could still land")
	}
	sim.WaitIdle() // the abandoned request is processed now

	// Honest meanwhile: never current for a key the edge does not use.
	read := v.mustVaultJSON(t, v.rootToken, "read", "cloudflare-ipsec/metadata/"+account+"/"+tunnel)
	if state := field(t, read, "state"); state != "rotation_unknown" {
		t.Fatalf("inside the settle window: state %v", state)
	}
	// The window is 2 x request_timeout + 10s from the attempt's start.
	read = waitForState(t, v, path, "current", 30*time.Second)
	if edge, _ := sim.Tunnel(account, tunnel); field(t, read, "psk") != edge.PSK {
		t.Fatal("after the settle window: state current, but the key is not the edge's")
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

// TestTheBackgroundKeepsTheGuarantee plays the sequences two to four
// on a real server, resolved by Vault's own periodic call without any read
// of the tunnels involved:
//   - gone: unresolved, then deleted at Cloudflare; it sorts first among the
//     unresolved, so a pass that stopped at it would leave the others;
//   - lost: a rotation whose answer was lost after Cloudflare changed the key;
//   - drifted: its key regenerated outside Vault (the dashboard, say);
//   - prekeyed: a tunnel created with a key whose first rotation failed
//     before Cloudflare acted: nothing may be generated for it, ever.
func TestTheBackgroundKeepsTheGuarantee(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	ids := []string{
		sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID,
		sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID,
	}
	sort.Strings(ids)
	gone, lost := ids[0], ids[1]
	drifted := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	prekeyed := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	psk := func(id string) string { return "cloudflare-ipsec/psk/" + account + "/" + id }
	meta := func(id string) string { return "cloudflare-ipsec/metadata/" + account + "/" + id }
	generations := func(id string) int { edge, _ := sim.Tunnel(account, id); return len(edge.GeneratedPSKs) }

	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "request_timeout=1s", "drift_check_interval=1m")
	for _, id := range []string{gone, lost, drifted} {
		v.mustVault(t, v.rootToken, "write", "-f", psk(id))
	}
	for _, id := range []string{gone, lost} {
		sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 500, AfterCommit: true})
		if res := v.vault(t, v.rootToken, "write", "-f", psk(id)); res.code == 0 {
			t.Fatal("the faulted rotation reported success")
		}
	}
	prekeyedBefore := generations(prekeyed)
	sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 500})
	if res := v.vault(t, v.rootToken, "write", "-f", psk(prekeyed)); res.code == 0 {
		t.Fatal("the faulted first rotation reported success")
	}
	sim.DeleteTunnel(account, gone)
	sim.RegenerateOutOfBand(account, drifted)
	lostBefore, driftedBefore := generations(lost), generations(drifted)

	// Vault's periodic call comes about once a minute; the settle windows
	// (2 x 1s + 10s) end first. Watch the edge, not Vault: a read would
	// reconcile by itself and prove nothing of the background.
	deadline := time.Now().Add(150 * time.Second)
	for time.Now().Before(deadline) && (generations(lost) == lostBefore || generations(drifted) == driftedBefore) {
		time.Sleep(time.Second)
	}
	if generations(lost) == lostBefore || generations(drifted) == driftedBefore {
		t.Fatalf("the background did not heal within 150s: lost +%d, drifted +%d", generations(lost)-lostBefore, generations(drifted)-driftedBefore)
	}

	for _, id := range []string{lost, drifted} {
		read := v.mustVaultJSON(t, v.rootToken, "read", psk(id))
		edge, _ := sim.Tunnel(account, id)
		if field(t, read, "state") != "current" || field(t, read, "psk") != edge.PSK {
			t.Errorf("%s: state %v, key is the edge's: %v", id, field(t, read, "state"), field(t, read, "psk") == edge.PSK)
		}
	}
	goneMeta := v.mustVaultJSON(t, v.rootToken, "read", meta(gone))
	if state := field(t, goneMeta, "state"); state != "tunnel_gone" {
		t.Errorf("deleted tunnel: state %v", state)
	}
	status, _ := v.api(t, v.rootToken, http.MethodGet, psk(prekeyed), nil)
	if status != http.StatusNotFound {
		t.Errorf("pre-keyed tunnel whose first rotation never happened: read status %d, want 404", status)
	}
	if got := generations(prekeyed); got != prekeyedBefore {
		t.Errorf("the engine generated %d key(s) nobody asked for on the pre-keyed tunnel", got-prekeyedBefore)
	}
	// A provisioning tool's view: every managed tunnel still there is in
	// sync after the background's work.
	status, list := v.api(t, v.rootToken, "LIST", "cloudflare-ipsec/tunnels/"+account, nil)
	if status != http.StatusOK {
		t.Fatalf("LIST tunnels: status %d", status)
	}
	info, _ := list["data"].(map[string]any)["key_info"].(map[string]any)
	for _, id := range []string{lost, drifted} {
		if tun, _ := info[id].(map[string]any); tun["in_sync"] != true {
			t.Errorf("tunnels listing: %s in_sync %v", id, tun["in_sync"])
		}
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

// waitForState reads path until its state is want, for at most limit.
func waitForState(t *testing.T, v *vaultServer, path, want string, limit time.Duration) map[string]any {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		read := v.mustVaultJSON(t, v.rootToken, "read", path)
		if field(t, read, "state") == want {
			return read
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: state %v after %s, want %s", path, field(t, read, "state"), limit, want)
		}
		time.Sleep(time.Second)
	}
}

// TestALostFirstRotationSurvivesClockSkew: Cloudflare's clock 10 s behind
// Vault's, then 10 s ahead, and a tunnel's first rotation whose answer is
// lost after Cloudflare made the key. Vault never compares its own clock
// with Cloudflare's times, so however they disagree the tunnel ends healed
// (current, with the edge's key) or flagged (not current, with a reason);
// the record is never deleted while the edge holds a key nobody has (with
// Vault 10 s ahead, the code before this test did just that: the metadata
// read answered 404 and no sweep looked at the tunnel again).
func TestALostFirstRotationSurvivesClockSkew(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "request_timeout=1s")

	for _, skew := range []time.Duration{-10 * time.Second, 10 * time.Second} {
		sim.SetClock(func() time.Time { return time.Now().Add(skew) })
		// Created under the skewed clock, as a tunnel at Cloudflare is.
		tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
		psk := "cloudflare-ipsec/psk/" + account + "/" + tunnel
		meta := "cloudflare-ipsec/metadata/" + account + "/" + tunnel

		sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 500, AfterCommit: true})
		if res := v.vault(t, v.rootToken, "write", "-f", psk); res.code == 0 {
			t.Fatalf("Cloudflare %s: the lost first rotation reported success", skew)
		}
		if edge, _ := sim.Tunnel(account, tunnel); len(edge.GeneratedPSKs) != 2 {
			t.Fatalf("Cloudflare %s: the faulted rotation did not make a key", skew)
		}

		// The settle window is 2 x request_timeout + 10s from the start;
		// each read after it reconciles. Until then metadata says
		// rotation_unknown; afterwards healed or flagged, never gone.
		deadline := time.Now().Add(45 * time.Second)
		for {
			status, read := v.api(t, v.rootToken, http.MethodGet, meta, nil)
			if status != http.StatusOK {
				t.Fatalf("Cloudflare %s: metadata read: status %d while the edge holds the lost rotation's key", skew, status)
			}
			data, _ := read["data"].(map[string]any)
			state, reason := data["state"], data["state_reason"]
			if state == "current" {
				got := v.mustVaultJSON(t, v.rootToken, "read", psk)
				if edge, _ := sim.Tunnel(account, tunnel); field(t, got, "psk") != edge.PSK {
					t.Fatalf("Cloudflare %s: state current, but the key is not the edge's", skew)
				}
				break
			}
			if state != "rotation_unknown" && reason != "" {
				break // flagged, with a reason
			}
			if time.Now().After(deadline) {
				t.Fatalf("Cloudflare %s: state %v after 45s (%v)", skew, state, reason)
			}
			time.Sleep(time.Second)
		}
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}
