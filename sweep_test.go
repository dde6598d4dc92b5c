package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// backgroundPass runs the backend's periodic function once, as Vault does
// every minute, without moving the clock.
func backgroundPass(t *testing.T, env *testEnv) {
	t.Helper()
	if err := env.b.periodic(context.Background(), &logical.Request{Storage: env.storage}); err != nil {
		t.Fatalf("background pass: %v", err)
	}
}

// TestKeysChangedOutsideTheEngineAreFoundAndHealedOnce is the issue's
// second sequence: a key regenerated at Cloudflare's dashboard (or by
// Terraform, another mount, a restored snapshot) left the record current for
// ever. The drift sweep finds it and heals it; found again at the very next
// look, it is marked stale and not healed, so two mounts cannot rotate one
// tunnel in a loop.
func TestKeysChangedOutsideTheEngineAreFoundAndHealedOnce(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	assertCurrent(t, env, "after the drift sweep healed")

	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	generations := env.generations()
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	reason, _ := meta.Data["state_reason"].(string)
	if meta.Data["state"] != store.StateStale || !strings.Contains(reason, "changed outside this engine") || !strings.Contains(reason, "another mount") {
		t.Fatalf("drift found again at the next look: state %v, reason %q", meta.Data["state"], reason)
	}
	if env.generations() != generations {
		t.Error("the engine healed a tunnel that another mount apparently rotates: a loop")
	}
	assertHonest(t, env)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	assertCurrent(t, env, "after the operator's write")
}

// TestDriftCheckOffFindsNothing: drift_check_interval=0 turns the sweep off,
// and it then spends no Cloudflare call.
func TestDriftCheckOffFindsNothing(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": 0}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	calls := env.sim.TotalCalls()
	env.clock.Advance(24 * time.Hour)
	backgroundPass(t, env)
	if env.sim.TotalCalls() != calls {
		t.Errorf("the sweep called Cloudflare %d times with drift checks off", env.sim.TotalCalls()-calls)
	}
}

// TestOneFailingTunnelNeverStopsTheBackground is the third
// sequence: the first unresolved tunnel (in storage order) was deleted at
// Cloudflare, or its account answers 403. Every other unresolved tunnel must
// still be resolved in the same pass; the deleted one leaves the unresolved
// set as tunnel_gone, and the failing one backs off with its reason shown.
func TestOneFailingTunnelNeverStopsTheBackground(t *testing.T) {
	for _, tc := range []struct {
		name string
		// fail breaks the first tunnel's reconciliation.
		fail      func(env *testEnv, tunnel string)
		wantState string
	}{
		{"deleted at Cloudflare", func(env *testEnv, tunnel string) { env.sim.DeleteTunnel(env.account, tunnel) }, "tunnel_gone"},
		{"refused with 403", func(env *testEnv, _ string) {
			env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusForbidden,
				Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}})
		}, store.StateStale},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			ids := []string{env.tunnel.ID, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID}
			sort.Strings(ids)
			for _, id := range ids {
				path := "psk/" + env.account + "/" + id
				env.must(env.request(logical.UpdateOperation, path, nil))
				// A lost answer after the key changed: each is unresolved.
				env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 500, AfterCommit: true})
				if _, err := env.request(logical.UpdateOperation, path, nil); err == nil {
					t.Fatal("the faulted rotation succeeded")
				}
			}
			env.clock.Advance(time.Hour) // past every settle window
			tc.fail(env, ids[0])
			backgroundPass(t, env)

			// From storage: a read of the path would reconcile by itself.
			for _, id := range ids[1:] {
				env.tunnel.ID = id
				rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: id})
				if err != nil || rec == nil || rec.State != "current" || rec.PSK != env.edge().PSK {
					t.Fatalf("tunnel behind a failing one is not current with the edge's key after the pass (err %v)", err)
				}
			}
			env.tunnel.ID = ids[0]
			meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
			if tc.wantState == "tunnel_gone" {
				if meta.Data["state"] != "tunnel_gone" || len(meta.Warnings) == 0 {
					t.Fatalf("deleted tunnel: state %v, warnings %v", meta.Data["state"], meta.Warnings)
				}
				if keys, _ := env.storage.List(context.Background(), store.UnresolvedPrefix); len(keys) != 0 {
					t.Errorf("a tunnel gone at Cloudflare is still in the unresolved set: %v", keys)
				}
				calls := env.sim.Calls(cloudflaresim.OpTunnelGet)
				env.clock.Advance(time.Hour)
				backgroundPass(t, env)
				if env.sim.Calls(cloudflaresim.OpTunnelGet) != calls {
					t.Errorf("the background still reconciles a tunnel that is gone")
				}
				return
			}
			// Refused: the reason shows, and the next try waits.
			if meta.Data["failures"] != 1 || !strings.Contains(meta.Data["last_failure"].(string), "HTTP 403") || meta.Data["retry_at"] == "" {
				t.Fatalf("refused tunnel: failures %v, last_failure %v, retry_at %v", meta.Data["failures"], meta.Data["last_failure"], meta.Data["retry_at"])
			}
			calls := env.sim.TotalCalls()
			env.clock.Advance(30 * time.Second)
			backgroundPass(t, env)
			if env.sim.TotalCalls() != calls {
				t.Error("the background retried a failing tunnel before its backoff ended")
			}
			env.clock.Advance(time.Minute)
			backgroundPass(t, env)
			assertCurrent(t, env, "after the refusal passed and the backoff ended")
		})
	}
}

// A reviewer's sequence; it failed on the code before its fix.
// TestARefusedDriftHealLeavesTheRecordStale: the drift sweep finds a key
// changed outside the engine and heals by rotateLocked with the *current*
// record as "previous". Cloudflare refuses that psk_generate (a 4xx, a 429 or
// the mount's budget: NoEffect), and restore() writes the current record
// back: Vault says current for a key the edge does not use, until the next
// sweep an interval later (and again after it, if the refusal repeats).
func TestARefusedDriftHealLeavesTheRecordStale(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 409,
		Errors: []cloudflaresim.Message{{Code: 1003, Message: "tunnel is being modified"}}})
	generates := env.sim.Calls(cloudflaresim.OpPSKGenerate)
	env.clock.Advance(time.Hour)
	backgroundPass(t, env)
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != generates+1 {
		t.Fatalf("the sweep did not try to heal the drift")
	}
	rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID})
	if err != nil || rec == nil {
		t.Fatalf("record: %v", err)
	}
	if rec.State == store.StateCurrent && rec.PSK != env.edge().PSK {
		t.Fatalf("drift found, heal refused: record is %q for a key the edge does not use (edge key generated %s, stored %s)",
			rec.State, store.FormatTime(env.edge().PSKGeneratedOn), store.FormatTime(rec.LastGeneratedOn))
	}
}

// secondMount is another mount of the engine (own storage, own scheduler-less
// backend) against the same simulator, token and tunnel, on the same clock.
func secondMount(t *testing.T, env *testEnv) *testEnv {
	t.Helper()
	conf := logical.TestBackendConfig()
	conf.StorageView = &logical.InmemStorage{}
	logs := &syncBuffer{}
	conf.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: logs})
	b := newBackend()
	b.now = env.clock.Now
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	other := *env
	other.b, other.storage, other.logs = b, conf.StorageView, logs
	other.must(other.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": env.simURL, "request_timeout": "2s",
	}))
	return &other
}

// A reviewer's sequence; it failed on the code before its fix.
// TestTwoMountsOnOneTunnelStopRotatingEachOther: the heal limit defers a
// heal by two intervals; it does not stop it. Mount A is blocked at the
// second look, but its stale record's RetryAt comes due and A heals again;
// B's own LastHealedAt is by then two intervals old, so B heals back. Each
// two intervals both mounts generate a key nobody asked for, for ever.
func TestTwoMountsOnOneTunnelStopRotatingEachOther(t *testing.T) {
	a := newConfiguredEnv(t)
	b := secondMount(t, a)
	for _, m := range []*testEnv{a, b} {
		m.must(m.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
		m.must(m.request(logical.UpdateOperation, m.pskPath(), nil))
	}
	var after2 int
	for round := 1; round <= 8; round++ {
		a.clock.Advance(10 * time.Minute)
		backgroundPass(t, a)
		backgroundPass(t, b)
		t.Logf("round %d: edge generations %d", round, a.generations())
		if round == 2 {
			after2 = a.generations()
		}
	}
	if a.generations() != after2 {
		t.Fatalf("two mounts on one tunnel: %d more keys generated after the loop was detected (round 2); the heal limit only slows the loop",
			a.generations()-after2)
	}
}

// TestTheDriftSweepWaitsForATunnelWhoseLockIsHeld: the sweep passed over a
// tunnel whose lock was taken and then marked itself done for the whole
// drift_check_interval. The lock is taken not only by a rotation (after
// which the stored key is the edge's) but by a schedule write, which changes
// no key: a key changed at the edge then went unfound for an interval (an
// hour by default). The sweep now waits for the lock. The schedule write is
// held inside its storage Put, and released once the sweep waits for the
// tunnel's lock (seen in the lock's count of holders and waiters, not
// guessed from time).
func TestTheDriftSweepWaitsForATunnelWhoseLockIsHeld(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	self := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}

	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	hooked := &hookStorage{Storage: env.storage}
	hooked.onPut = func(e *logical.StorageEntry) error {
		if e.Key == self.StorageKey() {
			once.Do(func() { close(entered); <-release })
		}
		return nil
	}
	done := make(chan error, 1)
	go func() {
		_, err := env.b.HandleRequest(context.Background(), &logical.Request{
			Operation: logical.UpdateOperation, Path: env.pskPath() + "/schedule",
			Data: map[string]any{"rotation_period": "720h"}, Storage: hooked,
		})
		done <- err
	}()
	<-entered // the schedule write holds the tunnel's lock

	env.clock.Advance(10 * time.Minute)
	swept, sweepErr := make(chan struct{}), make(chan error, 1)
	go func() {
		defer close(swept)
		sweepErr <- env.b.periodic(context.Background(), &logical.Request{Storage: env.storage})
	}()
	for env.b.engine.LockHolders(self) < 2 {
		select {
		case <-swept:
			t.Fatal("the sweep finished while the tunnel's lock was held: it passed over the tunnel")
		default:
			runtime.Gosched()
		}
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("schedule write: %v", err)
	}
	<-swept
	if err := <-sweepErr; err != nil {
		t.Fatalf("background pass: %v", err)
	}
	rec, err := store.ReadRecord(context.Background(), env.storage, self)
	if err != nil || rec == nil {
		t.Fatalf("record: %v, %v", rec, err)
	}
	if rec.State != store.StateCurrent || rec.PSK != env.edge().PSK {
		t.Fatalf("state %s, key is the edge's: %v: the sweep did not find the drift on a tunnel whose schedule was being written",
			rec.State, rec.PSK == env.edge().PSK)
	}
	if rec.RotationPeriod != 720*time.Hour {
		t.Errorf("the schedule write was lost: rotation_period %s", rec.RotationPeriod)
	}
}

// TestAHeldTunnelsReasonDoesNotGrow: a tunnel held for drift found again
// right after a heal is looked at hourly by the background. Each look must
// leave its state_reason as it was: it said why the tunnel is held, and
// appending that again on every look grew the stored record without bound.
func TestAHeldTunnelsReasonDoesNotGrow(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	held := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)).Data["state_reason"].(string)
	if !strings.Contains(held, "another mount") {
		t.Fatalf("the tunnel is not held: %q", held)
	}
	for i := 0; i < 3; i++ {
		env.clock.Advance(store.FailureBackoffMax + time.Minute)
		backgroundPass(t, env)
	}
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if reason := meta.Data["state_reason"].(string); meta.Data["state"] != store.StateStale || reason != held {
		t.Fatalf("after three hourly looks: state %v, reason of %d characters (was %d): %q", meta.Data["state"], len(reason), len(held), reason)
	}
}

// TestARefusedWriteOfATunnelHeldForDriftKeepsItHeld (review of fd4a21b): as
// TestARefusedWriteOfAHeldTunnelKeepsItHeld, for a tunnel held because drift
// came back right after a heal (HealHeld: another mount or tool rotates it
// too). The operator's write clears HealHeld in the pending record;
// Cloudflare refuses it; edgeUnchanged holds the edge's key against the
// record's EdgeKeyBefore, which a drift-stale record does not hold (zero: a
// record finish stored has none), so nothing is proven, the record is left
// rotation_unknown, and reconciliation then heals it (mayHeal allows any
// rotation_unknown): the engine rotates the contested tunnel by itself
// again, the loop the hold is there to stop. Before fd4a21b a refusal put
// the held record back.
//
// It printed (on fd4a21b..5e7e70f):
//
//	after the refused write: state rotation_unknown, heal_held false: the hold is gone
//	after a refused write of a tunnel held for drift the background generated 1 key(s)
func TestARefusedWriteOfATunnelHeldForDriftKeepsItHeld(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	if rec := storedRecord(t, env); rec == nil || !rec.HealHeld || rec.State != store.StateStale {
		t.Fatalf("setup: not held for drift: %+v", rec)
	}
	generations := env.generations()

	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: http.StatusConflict,
		Errors: []cloudflaresim.Message{{Code: 1003, Message: "tunnel is being modified"}}})
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	t.Logf("refused write: status %d: %s", httpStatus(resp, err), errorText(resp, err))
	if env.generations() != generations {
		t.Fatal("the refusal generated a key: the test's premise does not hold")
	}
	if rec := storedRecord(t, env); rec == nil || !rec.HealHeld || rec.State != store.StateStale {
		t.Errorf("after the refused write: state %s, heal_held %v: the hold is gone", rec.State, rec.HealHeld)
	}
	for i := 0; i < 3; i++ {
		runBackgroundPass(t, env)
		_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
	}
	if n := env.generations() - generations; n != 0 {
		t.Fatalf("after a refused write of a tunnel held for drift the background generated %d key(s)", n)
	}
}

// rotatingDuringAListing puts a front at base_url (config, drift sweep
// every 10m) that, once armed, answers the next tunnel listing as Cloudflare
// did, but only after an operator's write of env's tunnel has stored a new
// key: the listing shows the key the write replaced. It returns the arming
// switch and the write's error.
func rotatingDuringAListing(t *testing.T, env *testEnv) (*atomic.Bool, *error) {
	t.Helper()
	var armed atomic.Bool
	var writeErr error
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !armed.Load() || r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/ipsec_tunnels") {
			env.sim.ServeHTTP(w, r)
			return
		}
		armed.Store(false)
		listing := httptest.NewRecorder()
		env.sim.ServeHTTP(listing, r)
		resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
		if err == nil && resp != nil && resp.IsError() {
			err = resp.Error()
		}
		writeErr = err
		for k, v := range listing.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(listing.Code)
		_, _ = w.Write(listing.Body.Bytes())
	}))
	t.Cleanup(front.Close)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": front.URL + "/client/v4", "request_timeout": "2s", "drift_check_interval": "10m",
	}))
	return &armed, &writeErr
}

// TestARotationBetweenTheSweepsListingAndItsLookIsNotDrift (review of
// fd4a21b): the drift sweep lists an account's tunnels once, then looks at
// each managed tunnel under its lock (CompareWithEdge waits for a rotation
// in flight). A rotation that stores its key between the listing and the
// look (an operator's write, or the scheduler, which runs beside the sweep:
// for a large fleet the look at a tunnel comes minutes after the listing)
// leaves the listing showing the key the rotation replaced. Before fd4a21b
// an edge key older than the stored one was in sync; since "an older edge
// key is drift" (TestAnOlderEdgeKeyIsDrift) the sweep marks the new key
// stale and heals it: a key nobody asked for, and the tunnel down again
// until its routers have it (twice within two drift_check_intervals and the
// tunnel is held as if another mount rotated it). An operator's tunnels/
// listing does the same (CheckSync marks the record stale; the next read
// heals it).
//
// It printed (on fd4a21b..5e7e70f):
//
//	--- FAIL: .../drift_sweep
//	    generated 1 key(s) after a rotation that finished between a listing and the look at the tunnel
//	--- FAIL: .../tunnels_list,_then_a_read,_whole_seconds
//	    generated 1 key(s) after a rotation that finished between a listing and the look at the tunnel
func TestARotationBetweenTheSweepsListingAndItsLookIsNotDrift(t *testing.T) {
	for _, tc := range []struct {
		name      string
		precision time.Duration
		look      func(env *testEnv)
	}{
		{"drift sweep", 0, func(env *testEnv) { backgroundPass(t, env) }},
		// At microseconds the read finds the stored key by its time and
		// calls it current again; at whole seconds it cannot, and heals.
		{"tunnels list, then a read, whole seconds", time.Second, func(env *testEnv) {
			env.must(env.request(logical.ListOperation, "tunnels/"+env.account, nil))
			_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t)
			env.sim.SetTimestampPrecision(tc.precision)
			armed, writeErr := rotatingDuringAListing(t, env)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			env.clock.Advance(10 * time.Minute)

			armed.Store(true)
			generations := env.generations()
			tc.look(env)
			if *writeErr != nil || env.generations() < generations+1 {
				t.Fatalf("setup: the rotation during the listing did not happen: %v", *writeErr)
			}
			if n := env.generations() - generations - 1; n != 0 {
				t.Errorf("generated %d key(s) after a rotation that finished between a listing and the look at the tunnel", n)
			}
			assertCurrent(t, env, "afterwards")
		})
	}
}

// TestTheSweepRecordsAKeysProofOncePerKey (review of fd4a21b): refreshFacts
// now also writes KeySeenAt from a listing dated well past the stored key.
// For a fleet that is a write per tunnel on the first sweep past the key's
// minute and none after: 100 tunnels, sweeps every 10m, count the writes of
// records. It held: 100, then 0, 0 (at microsecond precision, where the
// proof is not needed: sameGeneration already decides).
func TestTheSweepRecordsAKeysProofOncePerKey(t *testing.T) {
	const n = 100
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	for i := 0; i < n; i++ {
		id := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID
		env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+id, nil))
	}
	hook := &hookStorage{Storage: env.storage}
	env.storage = hook
	var mu sync.Mutex
	writes := 0
	hook.onPut = func(e *logical.StorageEntry) error {
		if strings.HasPrefix(e.Key, store.PSKPrefix) {
			mu.Lock()
			writes++
			mu.Unlock()
		}
		return nil
	}
	var perSweep []int
	for i := 0; i < 3; i++ {
		env.clock.Advance(10 * time.Minute)
		mu.Lock()
		writes = 0
		mu.Unlock()
		backgroundPass(t, env)
		mu.Lock()
		perSweep = append(perSweep, writes)
		mu.Unlock()
	}
	t.Logf("records written per sweep: %v", perSweep)
	if perSweep[0] > n || perSweep[1] != 0 || perSweep[2] != 0 {
		t.Errorf("records written per sweep: %v, want at most %d, then none", perSweep, n)
	}
}
