package e2e

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestAFailingBulkJobFinishesOnRaftWithASmallEntryLimit: on a Vault whose
// Raft storage refuses entries over 128 KiB (operators lower
// max_entry_size from its 1 MiB default), a bulk rotation of 2,000 tunnels
// whose every rotation fails (the API token has no rights on the account
// any more) finishes with all 2,000 counted as failed, a new job of the
// account is accepted afterwards, and another account's scheduled rotation
// happens meanwhile. A job that kept every failure in its one record could
// not store it past about a thousand failures, and its scheduler retried
// that entry for ever: the job never finished, every new job of the account
// was a 409, and no later schedule of any account ran.
func TestAFailingBulkJobFinishesOnRaftWithASmallEntryLimit(t *testing.T) {
	const fleet = 2000
	sim, baseURL, secrets, token, account := newEdge(t)
	other := cloudflaresim.NewID()
	otherTunnel := sim.AddTunnel(other, cloudflaresim.Tunnel{}).ID
	// The token the mount ends up with may act on the other account only.
	otherOnly := sim.AddToken(cloudflaresim.Token{Accounts: []string{other}})
	var tunnels []string
	for i := 0; i < fleet; i++ {
		tunnels = append(tunnels, sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID)
	}

	v := startRaftServer(t, secrets, "  max_entry_size = 131072\n")
	root := v.rootToken
	v.mountEngine(t, baseURL, token.Value)
	// Budget enough that the budget is not what the test waits for.
	v.mustVault(t, root, "write", "cloudflare-ipsec/config", "rate_limit=1200", "rate_limit_window=1s")

	// Every tunnel stored in Vault while the token may still act on the
	// account, a few writers at once.
	start := time.Now()
	var wg sync.WaitGroup
	work := make(chan string)
	errs := make(chan string, fleet)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for tun := range work {
				// A write the budget refuses (429) is tried again.
				for attempt := 0; ; attempt++ {
					status, err := post(v, root, "cloudflare-ipsec/psk/"+account+"/"+tun)
					if err == nil && status == http.StatusOK {
						break
					}
					if err != nil || status != http.StatusTooManyRequests || attempt == 20 {
						errs <- fmt.Sprintf("write tunnel %s: HTTP %d (%v)", tun, status, err)
						break
					}
					time.Sleep(time.Second)
				}
			}
		}()
	}
	for _, tun := range tunnels {
		work <- tun
	}
	close(work)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(secrets.redact(e))
	}
	t.Logf("%d tunnels stored in %s", fleet, time.Since(start).Round(time.Second))

	// The other account's tunnel rotates every minute; then the mount's
	// token loses its rights on the first account, and the job starts.
	v.mustVault(t, root, "write", "cloudflare-ipsec/config", "min_rotation_period=1m")
	v.mustVault(t, root, "write", "cloudflare-ipsec/psk/"+other+"/"+otherTunnel, "rotation_period=1m")
	v.mustVault(t, root, "write", "cloudflare-ipsec/config", "api_token="+otherOnly.Value)
	queued := v.mustVaultJSON(t, root, "write", "-f", "cloudflare-ipsec/rotate/"+account)
	if fmt.Sprint(field(t, queued, "queued")) != fmt.Sprint(fleet) {
		t.Fatalf("queued = %v, want %d", field(t, queued, "queued"), fleet)
	}

	start = time.Now()
	// Typically half a minute; Raft's fsyncs on a busy machine make it
	// more (each failed rotation stores its record twice and its result).
	deadline := start.Add(3 * time.Minute)
	var progress map[string]any
	for {
		progress = v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/rotate/"+account)
		if fmt.Sprint(field(t, progress, "remaining")) == "0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the job did not finish within 3m: queued %v, done %v, failed_count %v, skipped_count %v, remaining %v",
				field(t, progress, "queued"), field(t, progress, "done"), field(t, progress, "failed_count"),
				field(t, progress, "skipped_count"), field(t, progress, "remaining"))
		}
		time.Sleep(time.Second)
	}
	t.Logf("the job finished in %s", time.Since(start).Round(time.Second))
	listed, _ := field(t, progress, "failed").([]any)
	if fmt.Sprint(field(t, progress, "failed_count")) != fmt.Sprint(fleet) || fmt.Sprint(field(t, progress, "done")) != "0" ||
		fmt.Sprint(field(t, progress, "skipped_count")) != "0" || len(listed) != 100 {
		t.Errorf("progress of the finished job: done %v, failed_count %v, skipped_count %v, %d failed tunnels listed (want 100)",
			field(t, progress, "done"), field(t, progress, "failed_count"), field(t, progress, "skipped_count"), len(listed))
	}

	// The other account's schedule ran.
	for deadline := time.Now().Add(90 * time.Second); ; {
		read := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/metadata/"+other+"/"+otherTunnel)
		if fmt.Sprint(field(t, read, "version")) != "1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the other account's tunnel, rotation_period 1m, was not rotated by its schedule: %v", read["data"])
		}
		time.Sleep(2 * time.Second)
	}
	if edge, _ := sim.Tunnel(other, otherTunnel); len(edge.GeneratedPSKs) < 3 {
		t.Errorf("the other account's tunnel has %d keys at the edge, want a scheduled one after the write's", len(edge.GeneratedPSKs))
	}

	// A new job of the account is accepted, not refused as still running.
	if status, body := v.api(t, root, "POST", "cloudflare-ipsec/rotate/"+account, map[string]any{}); status != http.StatusOK {
		t.Errorf("a new bulk job after the last finished: HTTP %d %v", status, secrets.redact(fmt.Sprint(body["errors"])))
	}

	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

// post writes path with no fields and returns the status, for a goroutine
// other than the test's (which may not call t.Fatal); the answer, which
// carries a key, is dropped.
func post(v *vaultServer, token, path string) (int, error) {
	req, err := http.NewRequest("POST", v.addr+"/v1/"+path, strings.NewReader("{}"))
	if err != nil {
		return 0, err
	}
	req.Header.Set("X-Vault-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, err = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, err
}
