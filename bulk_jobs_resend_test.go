package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// TestBulkALostValidationIsTakenForTheJobsOwnKey: a bulk rotation
// (rotate/:account, key_source vault) is queued; before the job reaches a
// tunnel, an operator's validate_only write of that tunnel loses its answer,
// leaving the stored key written ahead as pending (PendingTrigger validate).
// The job's routeOf takes any pending record started after the job was
// queued for "the job's own key" and resends PendingPSK in a batch
// (resendBatched turns the validate trigger into a write): the stored,
// old key is Set for real (which a lost validation must never do:
// validate.go), finishSameKey stores it current, and the job counts the
// tunnel done. The fleet rotation reports every tunnel rotated while this
// one still has the key it had before the job: at the moment of a
// suspected compromise, the one key the operator asked to replace is kept,
// and progress says otherwise.
//
// Printed on 4a1561a:
//
//	the job's progress <nil> (done 3, failed 0) and the tunnel is current version 1, yet the edge
//	still uses the key it had before the bulk rotation: the lost validation's stored key was sent
//	for real and counted as the job's rotation
//	Set calls: 2; keys the edge was given since its creation: 1 (the stored key set again counts)
//
// and the same for "during the retry backoff" (Set calls: 3).
func TestBulkALostValidationIsTakenForTheJobsOwnKey(t *testing.T) {
	// "before the job's pass": the validation lands between the queueing
	// and the job's first pass; "during the retry backoff": the tunnel's
	// first send was unapplied (its key put back, the entry retried with
	// backoff) and the validation lands while the job waits to retry it.
	for _, tc := range []string{"before the job's pass", "during the retry backoff"} {
		t.Run(tc, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			ids := managedFleet(t, env, 3)
			before := env.edge().PSK
			env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
			if tc == "during the retry backoff" {
				env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{ids[0]: "tunnel is being reconfigured"}})
				drain(t, env)
				if rec := record(t, env, ids[0]); rec.State != store.StateCurrent || env.edge().PSK != before {
					t.Fatalf("after the unapplied send: state %s", rec.State)
				}
			}
			env.clock.Advance(time.Second)
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
			if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
				t.Fatal("validation with a 503 succeeded")
			}
			if rec := record(t, env, ids[0]); rec.State != store.StatePending || rec.PendingTrigger != "validate_only" {
				t.Fatalf("after the lost validation: state %s, trigger %s", rec.State, rec.PendingTrigger)
			}
			for i := 0; i < 10 && progressOf(t, env)["remaining"] != 0; i++ {
				drain(t, env)
				env.clock.Advance(15 * time.Second)
			}
			p := progressOf(t, env)
			if p["remaining"] != 0 {
				t.Fatalf("the job did not end: %v", p)
			}
			rec := record(t, env, ids[0])
			if env.edge().PSK == before {
				t.Errorf("the job's progress %v (done %v, failed %v) and the tunnel is %s version %d, "+
					"yet the edge still uses the key it had before the bulk rotation: the lost validation's stored key was sent for real and counted as the job's rotation",
					p["state"], p["done"], p["failed_count"], rec.State, rec.Version)
				t.Logf("Set calls: %d; keys the edge was given since its creation: %d (the stored key set again counts)", env.sim.Calls(cloudflaresim.OpPSKSet), len(env.edge().GeneratedPSKs)-1)
			}
		})
	}
}

// distinctKeysOf is how many different keys tunnel id was given after the
// one it was created with.
func distinctKeysOf(env *testEnv, id string) int {
	edge, _ := env.sim.Tunnel(env.account, id)
	seen := map[string]bool{}
	for _, k := range edge.GeneratedPSKs[1:] {
		seen[k] = true
	}
	return len(seen)
}

// TestBulkALostBatchOutlivesASwitchOrARestart: a batch's answer is lost
// (its keys pending, RetryAt a settle window on, left to the job); then the
// mount is switched to key_source cloudflare, or the plugin restarts. The
// pending keys must still be finished, each tunnel with exactly one new key
// (the one written ahead), and the job must end.
func TestBulkALostBatchOutlivesASwitchOrARestart(t *testing.T) {
	for _, tc := range []string{"switch to cloudflare", "restart"} {
		t.Run(tc, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			ids := managedFleet(t, env, 6)
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
			env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
			drain(t, env)
			if rec := record(t, env, ids[1]); rec.State != store.StatePending {
				t.Fatalf("after the lost answer: state %s", rec.State)
			}
			switch tc {
			case "switch to cloudflare":
				env.must(env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "cloudflare"}))
			case "restart":
				env = restartOver(t, env)
			}
			for i := 0; i < 20 && progressOf(t, env)["remaining"] != 0; i++ {
				env.clock.Advance(30 * time.Second)
				drain(t, env)
				backgroundPass(t, env)
			}
			if p := progressOf(t, env); p["remaining"] != 0 {
				t.Fatalf("the job did not end: %v", p)
			}
			for _, id := range ids {
				rec := record(t, env, id)
				edge, _ := env.sim.Tunnel(env.account, id)
				if rec.State != store.StateCurrent || rec.PSK != edge.PSK || distinctKeysOf(env, id) != 1 {
					t.Errorf("tunnel %s: state %s, key is the edge's: %v, new keys on the edge: %d", id, rec.State, rec.PSK == edge.PSK, distinctKeysOf(env, id))
				}
			}
			t.Logf("progress %v, Set calls %d, generate calls %d", progressOf(t, env), env.sim.Calls(cloudflaresim.OpPSKSet), env.sim.Calls(cloudflaresim.OpPSKGenerate))
		})
	}
}

// TestBulkALostBatchKeyIsCountedFailedForOldFailures: a current record
// carries the failures of its scheduled rotation (RetryLater notes each on
// the current record: 6 after about a day of a refused psk_generate); begin
// copies them into the bulk job's pending record and nothing clears them.
// The batch's answer is lost: keepForJob sets RetryAt a settle window on "no
// failure counted", but routeOf reads the old count: the job backs off as
// if a resend had failed, and then counts the tunnel failed ("sending it
// again kept failing", quoting last week's failure) without ever having
// sent its key again. The key is finished later by someone else; the job's
// progress says failed for a tunnel it never retried. (The seeded count
// is what RetryLater leaves on a current record: NoteFailure, SaveScheduled;
// only a success clears it. Fewer old failures delay the job's resend by a
// settle window and shorten its attempts.)
//
// Printed on 4a1561a:
//
//	a tunnel whose batch answer was lost is counted failed by the job (Set calls: 2, the lost
//	batch and 1 more): [map[reason:the key Vault made is pending, and sending it again kept
//	failing: cloudflare psk_generate: HTTP 403: code 10000: Authentication error (a week ago);
//	the background pass goes on sending the same key tunnel_id:...]]
func TestBulkALostBatchKeyIsCountedFailedForOldFailures(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 4)
	tun := store.Tunnel{AccountID: env.account, TunnelID: ids[0]}
	rec := record(t, env, ids[0])
	rec.Failures, rec.LastFailure, rec.RetryAt = 6, "cloudflare psk_generate: HTTP 403: code 10000: Authentication error (a week ago)", env.clock.Now().Add(-time.Minute).UTC()
	if err := store.WriteRecord(context.Background(), env.storage, tun, rec); err != nil {
		t.Fatal(err)
	}
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	for i := 0; i < 20 && progressOf(t, env)["remaining"] != 0; i++ {
		env.clock.Advance(15 * time.Second)
		drain(t, env)
	}
	p := progressOf(t, env)
	if p["failed_count"] != 0 {
		t.Errorf("a tunnel whose batch answer was lost is counted failed by the job (Set calls: %d, the lost batch and %d more): %v",
			env.sim.Calls(cloudflaresim.OpPSKSet), env.sim.Calls(cloudflaresim.OpPSKSet)-1, p["failed"])
	}
}

// TestBulkAWriteToAJobsPendingTunnel: a batch's answer is lost; an
// operator writes one of its tunnels before the job comes back. Whatever
// the write answers, the edge must end with keys someone asked for (the
// job's, then at most the operator's), Vault current with the edge's, and
// the job must end with that tunnel done.
func TestBulkAWriteToAJobsPendingTunnel(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 4)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	env.clock.Advance(time.Second)
	resp, err := env.request(logical.UpdateOperation, "psk/"+env.account+"/"+ids[0], nil)
	t.Logf("the write: status %d, warnings %v, state %v", httpStatus(resp, err), respWarnings(resp), respField(resp, "state"))
	for i := 0; i < 20 && progressOf(t, env)["remaining"] != 0; i++ {
		env.clock.Advance(15 * time.Second)
		drain(t, env)
		backgroundPass(t, env)
	}
	p := progressOf(t, env)
	if p["remaining"] != 0 || p["done"] != 4 {
		t.Errorf("progress %v", p)
	}
	rec := record(t, env, ids[0])
	edge, _ := env.sim.Tunnel(env.account, ids[0])
	t.Logf("tunnel: state %s version %d, keys the edge was given %d", rec.State, rec.Version, distinctKeysOf(env, ids[0]))
	if rec.State != store.StateCurrent || rec.PSK != edge.PSK || distinctKeysOf(env, ids[0]) > 2 {
		t.Errorf("tunnel: state %s, key is the edge's %v, new keys %d", rec.State, rec.PSK == edge.PSK, distinctKeysOf(env, ids[0]))
	}
}

func respWarnings(resp *logical.Response) []string {
	if resp == nil {
		return nil
	}
	return resp.Warnings
}

func respField(resp *logical.Response, k string) any {
	if resp == nil {
		return nil
	}
	return resp.Data[k]
}

// TestBulkAJobsResendProcessedLate: the batch's answer is lost, and so is
// the answer to the job's batched resend, which Cloudflare processes late
// (within one request_timeout of the caller giving up, the engine's own
// rule). Meanwhile a read finishes the key and an operator tries a new
// one: the resend's window (windowFromSend) must hold the write back, or
// the late resend puts the old key back under a current record.
func TestBulkAJobsResendProcessedLate(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	const timeout = 30 * time.Second
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": "30s"}))
	ids := managedFleet(t, env, 2)
	proxy := newSetProxy(t, env, timeout, func(n int, body []byte) bool { return n == 1 || n == 2 })
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	for i := 0; i < 5; i++ {
		proxy.mu.Lock()
		held := len(proxy.held)
		proxy.mu.Unlock()
		if held == 2 {
			break
		}
		env.clock.Advance(15 * time.Second)
		drain(t, env)
	}
	proxy.mu.Lock()
	held := len(proxy.held)
	proxy.mu.Unlock()
	if held != 2 {
		t.Fatalf("%d Set requests held, want 2 (the batch, the job's resend)", held)
	}
	resentAt := env.clock.Now().Add(-timeout) // the proxy moved the clock on by the timeout
	rec := record(t, env, ids[0])
	t.Logf("after the lost resend: state %s, failures %d, settle_until %s after the resend", rec.State, rec.Failures, rec.SettleUntil.Sub(resentAt))
	// The last second in which Cloudflare may still process the resend.
	env.clock.Advance(resentAt.Add(2*timeout - time.Second).Sub(env.clock.Now()))
	for _, id := range ids {
		read := env.must(env.request(logical.ReadOperation, "psk/"+env.account+"/"+id, nil))
		if read.Data["state"] != store.StateCurrent {
			t.Fatalf("after the read: state %v", read.Data["state"])
		}
	}
	write, err := env.request(logical.UpdateOperation, "psk/"+env.account+"/"+ids[0], nil)
	if err != nil || write.IsError() {
		t.Logf("the operator's write was refused (the guarantee holds): status %d", httpStatus(write, err))
		return
	}
	proxy.deliver(t, 1)
	edge, _ := env.sim.Tunnel(env.account, ids[0])
	read := env.must(env.request(logical.ReadOperation, "psk/"+env.account+"/"+ids[0], nil))
	if read.Data["state"] == store.StateCurrent && read.Data["psk"] != edge.PSK {
		t.Fatalf("Vault serves a key the edge does not use as current: the job's late resend landed after the operator's key")
	}
}

// TestBulkAListedIDWithDotsIsSkippedWithoutStoppingTheJob: a listed id
// that is not canonical is recorded skipped under listedName, which
// path-escapes it but leaves "." as it is: an id holding ".." makes a
// result key that Vault's file storage backend refuses ("path cannot
// contain parent references": sdk physical/file validatePath; the storage
// here plays it). The job must still queue and rotate the account's other
// tunnels.
//
// Printed on 4a1561a:
//
//	rotate/: status 500, ... error queue bulk rotation of account ...: 3 of 7 tunnels were queued,
//	and the job rotates and counts those only: record the bulk rotation result of tunnel 0..0 of
//	account ...: injected storage failure
//	progress map[... done:3 ... queued:3 remaining:0 ... skipped:[] skipped_count:0 ... unmanaged:4]:
//	want the 6 canonical tunnels done
//	the unmanaged tunnel ... listed after the odd id was not taken under management (record <nil>, <nil>)
//	(three times)
func TestBulkAListedIDWithDotsIsSkippedWithoutStoppingTheJob(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 3)
	// Listed first (the listing is sorted by id), before the unmanaged ones.
	env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{ID: "0..0", Name: "dots"})
	var unmanaged []string
	for i := 0; i < 3; i++ {
		unmanaged = append(unmanaged, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID)
	}
	storage := &failingStorage{Storage: env.storage}
	storage.setFailPut(func(e *logical.StorageEntry) bool { return strings.Contains(e.Key, "..") })
	env.storage = storage
	resp, err := env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": true})
	t.Logf("rotate/: status %d, warnings %v, error %v", httpStatus(resp, err), respWarnings(resp), errorText(resp, err))
	for i := 0; i < 3; i++ {
		drain(t, env)
		env.clock.Advance(time.Minute)
	}
	p := progressOf(t, env)
	t.Logf("progress %v", p)
	if p["done"] != 6 || p["remaining"] != 0 {
		t.Errorf("progress %v: want the 6 canonical tunnels done", p)
	}
	assertFleetCurrent(t, env, ids, 0, store.KeySourceVault)
	for _, id := range unmanaged {
		if rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: id}); err != nil || rec == nil {
			t.Errorf("the unmanaged tunnel %s listed after the odd id was not taken under management (record %v, %v)", id, rec, err)
		}
	}
}
