package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Third skeptic of issue 16 (key_source vault), on i16-core at 85a4807
// (b952503, f3c4369, 33dda05, 02cce40).

// TestANewKeyInheritsAnEarlierKeysLateLandingBound: b952503 made
// lingering keep a.previous.LateLandingUntil on every record it stores,
// and lingering runs in finish() too, for a DIFFERENT key. K1 was finished
// while its abandoned request could still land (a lost answer, a resend),
// so its record holds LateLandingUntil = the window's end on Cloudflare's
// clock + dateProofMargin (61s). Once K1's window closes a write sets K2;
// K2's request was answered and no request of K2 is out, yet K2's record
// inherits K1's bound, which still lies ~60s ahead. A key changed outside
// the engine within that minute is then taken for "the stored key
// re-dated by the engine's own late request": a listing (tunnels/) leaves
// the record current instead of marking it stale, and every read serves
// K2 as current while the edge uses the outside key (until the drift
// sweep; with heal_stale_psk off the sweep then says "the edge probably
// uses the stored key, re-dated", which is false). Before b952503 K2's
// record had no bound and the listing marked it stale at once.
//
// Printed on 85a4807:
//
//	K2's record inherits K1's late-landing bound: late_landing_until is 1m0s after K2's
//	  last_generated_on, and no request of K2 can land
//	after a listing saw the outside key: read state current, the key is the edge's: false
//	  (listing in_sync false)
func TestANewKeyInheritsAnEarlierKeysLateLandingBound(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	// K1: the edge takes the request and processes it late; the engine
	// gives up, and a read finishes K1 with the same key (lingering).
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the held write succeeded")
	}
	env.sim.WaitAccepted()
	assertCurrent(t, env, "the read that finishes K1")
	k1 := env.storedRecord()
	if k1.LateLandingUntil.IsZero() {
		t.Fatal("K1 has no late-landing bound: the scenario needs one")
	}

	// K1's window closes (its abandoned request never lands); a write sets K2.
	env.clock.Advance(k1.SettleUntil.Sub(env.clock.Now()) + time.Second)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	k2 := env.storedRecord()
	if k2.PSK == k1.PSK || k2.State != store.StateCurrent {
		t.Fatalf("the write did not store K2: state %s", k2.State)
	}
	if k2.LateLandingUntil.After(k2.LastGeneratedOn) {
		t.Errorf("K2's record inherits K1's late-landing bound: late_landing_until is %v after K2's last_generated_on, and no request of K2 can land",
			k2.LateLandingUntil.Sub(k2.LastGeneratedOn).Round(time.Second))
	}

	// 10s later the key is changed outside the engine; a listing sees it.
	env.clock.Advance(10 * time.Second)
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	list := env.must(env.request(logical.ListOperation, "tunnels/"+env.account, nil))
	info := list.Data["key_info"].(map[string]any)[env.tunnel.ID].(map[string]any)
	read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
	if read.Data["state"] == store.StateCurrent && read.Data["psk"] != env.edge().PSK {
		t.Errorf("after a listing saw the outside key: read state current, the key is the edge's: false (listing in_sync %v)", info["in_sync"])
	}
}

// TestALostValidationIsWrittenCurrentBeforeItIsJudged:
// finishValidation writes the dropped validation back as current, clears
// the unresolved mark, and only then holds the record against the edge it
// has already read (compareLocked). If storage fails on the write that
// records the verdict (stale), the record stays current although the read
// in hand showed the edge using another key; the read that did it answers
// state current with the stored key (a warning aside), and so does every
// read after, and the background leaves it alone (current: the unresolved
// mark is cleared) until the drift sweep. A crash between the two writes
// does the same. (The record was current before the validation too, with
// the drift unseen: so this is no worse than before the validation, but
// the engine has just seen the drift and still serves current.)
//
// Printed on 85a4807:
//
//	the read that judged the lost validation (storage failed on the verdict): state current,
//	  the key is the edge's: false
//	the next read: state current, the key is the edge's: false
func TestALostValidationIsWrittenCurrentBeforeItIsJudged(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"heal_stale_psk": false}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.clock.Advance(time.Minute)
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID) // changed outside the engine

	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	if rec := env.storedRecord(); rec.State != store.StatePending {
		t.Fatalf("after the lost validation: state %s", rec.State)
	}
	storage := &failingStorage{Storage: env.storage}
	env.storage = storage
	storage.setFailPut(func(e *logical.StorageEntry) bool {
		return strings.HasPrefix(e.Key, store.PSKPrefix) && strings.Contains(string(e.Value), `"state":"`+store.StateStale+`"`)
	})
	resp, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	storage.setFailPut(nil)
	if err == nil && resp != nil && resp.Data["state"] == store.StateCurrent && resp.Data["psk"] != env.edge().PSK {
		t.Errorf("the read that judged the lost validation (storage failed on the verdict): state current, the key is the edge's: false")
	}
	resp, err = env.request(logical.ReadOperation, env.pskPath(), nil)
	if err == nil && resp != nil && resp.Data["state"] == store.StateCurrent && resp.Data["psk"] != env.edge().PSK {
		t.Errorf("the next read: state current, the key is the edge's: false")
	}
}

// noDateWriter passes an answer on without any Date header (a proxy at
// base_url that drops it), so the engine must stand in its own clock.
type noDateWriter struct {
	http.ResponseWriter
	wrote bool
}

func (n *noDateWriter) WriteHeader(code int) {
	if !n.wrote {
		n.wrote = true
		n.Header()["Date"] = nil // nil: net/http adds none either
	}
	n.ResponseWriter.WriteHeader(code)
}

func (n *noDateWriter) Write(b []byte) (int, error) {
	if !n.wrote {
		n.WriteHeader(http.StatusOK)
	}
	return n.ResponseWriter.Write(b)
}

// TestALostValidationLandingLateUnderSkewMakesNoKey (held:
// harmless): issue 18's clocks. Vault's clock 60s ahead of or behind
// Cloudflare's, whole-second times, and no Date header anywhere (so
// finishValidation carries the validation's window over to Cloudflare's
// clock with Vault's own clock). A validate_only whose query string is
// dropped on the way is carried out late, as a real Set of the stored key,
// near the end of its window, after a read dropped the lost validation.
// The drift sweep then finds the stored key re-dated and, healing on, sets
// it again: no new key, current, honest; a write waits for the window.
func TestALostValidationLandingLateUnderSkewMakesNoKey(t *testing.T) {
	for _, skew := range []time.Duration{time.Minute, -time.Minute} {
		t.Run(fmt.Sprintf("cloudflare %v ahead", skew), func(t *testing.T) {
			env := newVaultKeysEnv(t)
			env.clock.freeze()
			clock := env.clock
			env.sim.SetClock(func() time.Time { return clock.Now().Add(skew) })
			env.sim.SetTimestampPrecision(time.Second)
			env.tunnel = env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{})
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				env.sim.ServeHTTP(&noDateWriter{ResponseWriter: w}, r)
			}))
			t.Cleanup(srv.Close)
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{
				"api_token": env.token.Value, "base_url": srv.URL + cloudflaresim.BasePath, "drift_check_interval": "1m",
			}))
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			if !env.storedRecord().KeySeenAt.IsZero() {
				t.Fatal("an answer carried a Date header: the proxy does not drop it")
			}
			env.clock.Advance(5 * time.Minute)
			keys := env.distinctNewKeys()

			start := env.clock.Now()
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{IgnoreValidateOnly: true, ProcessAfter: time.Hour})
			if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
				t.Fatal("the held validation succeeded")
			}
			env.sim.WaitAccepted()
			assertKeyCurrent(t, env, "the read that drops the lost validation")
			window := env.storedRecord().SettleUntil
			// Just inside the window, the dropped query string's request lands.
			env.clock.Advance(window.Sub(start) - 500*time.Millisecond)
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status != http.StatusConflict {
				t.Errorf("a write inside the validation's window: status %d, want 409", status)
			}
			env.sim.ProcessLateNow()
			assertKeyCurrent(t, env, "after the late landing")
			redated, sets := env.edge().PSKGeneratedOn, env.sim.Calls(cloudflaresim.OpPSKSet)
			if bound := env.storedRecord().LateLandingUntil; !redated.After(env.storedRecord().LastGeneratedOn) || redated.After(bound) {
				t.Errorf("the late landing re-dated the key to %v: outside (stored, late_landing_until %v]", redated, bound)
			}
			env.clock.Advance(time.Minute)
			backgroundPass(t, env) // the drift sweep
			if env.sim.Calls(cloudflaresim.OpPSKSet) != sets+1 {
				t.Errorf("the drift sweep sent %d Set requests, want 1 (the stored key set again)", env.sim.Calls(cloudflaresim.OpPSKSet)-sets)
			}
			assertHonest(t, env)
			rec := env.storedRecord()
			if rec.State != store.StateCurrent {
				t.Errorf("after the sweep: state %s (%s)", rec.State, rec.StateReason)
			}
			if n := env.distinctNewKeys(); n != keys {
				t.Errorf("the edge was given %d new keys, want %d", n-keys, 0)
			}
		})
	}
}

// TestAWriteThatFindsDriftAfterALostValidationMakesOneKey (held:
// harmless): healing on, a validation's answer is lost, and minutes later
// (past its late-landing bound) the key is changed outside the engine. The
// operator's write is the first to meet the pending validation: it finds
// drift (compareNoHeal marks it stale, no heal key) and then sets exactly
// one new key, current. With the key changed outside BEFORE the
// validation (a re-date within the bound), the stored key is set again
// (lateLanding: no key) and the write still sets exactly one new key.
func TestAWriteThatFindsDriftAfterALostValidationMakesOneKey(t *testing.T) {
	for _, before := range []bool{false, true} {
		t.Run(fmt.Sprintf("changed outside before the validation %v", before), func(t *testing.T) {
			env := newVaultKeysEnv(t)
			env.clock.freeze()
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			env.clock.Advance(time.Minute)
			if before {
				env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
			}
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
			if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
				t.Fatal("validation with a 503 succeeded")
			}
			env.clock.Advance(5 * time.Minute)
			if !before {
				env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
			}
			keys := env.distinctNewKeys()
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status != http.StatusOK {
				t.Fatalf("the operator's write: status %d (%s)", status, errorText(resp, err))
			}
			if n := env.distinctNewKeys() - keys; n != 1 {
				t.Errorf("the write gave the edge %d new keys, want 1", n)
			}
			assertKeyCurrent(t, env, "after the write")
			assertHonest(t, env)
		})
	}
}

// TestAResendCloudflareRefusedStillOpensAWindow was here: a
// resend refused before any processing (a 429, or the engine's budget)
// keeps the window finishPending pushed on for it. Accepted, and
// documented in docs/failure-modes.md ("Keys Vault makes").

// TestALostValidationWhoseTunnelReadFails (held: harmless): a
// validation's answer is lost after its query string was dropped (the
// stored key set again, re-dated). The read that meets it cannot read the
// tunnel: a 500 leaves it pending (nothing served as current, nothing
// sent), a write meanwhile is refused, and a 404 records it tunnel_gone
// without a pending key. Honest at each step; no key made, no Set sent.
func TestALostValidationWhoseTunnelReadFails(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.clock.Advance(time.Minute)
	keys := env.distinctNewKeys()
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable, AfterCommit: true, IgnoreValidateOnly: true})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)

	failReads := func() { // a read of a tunnel is retried twice on a 5xx
		for range 3 {
			env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusInternalServerError})
		}
	}
	failReads()
	read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
	if read.Data["state"] != store.StatePending || len(read.Warnings) == 0 {
		t.Errorf("a read whose look at the tunnel failed: state %v, warnings %d", read.Data["state"], len(read.Warnings))
	}
	if rec := env.storedRecord(); rec.State != store.StatePending {
		t.Errorf("after the failed look: stored state %s", rec.State)
	}
	failReads()
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if status := httpStatus(resp, err); status == http.StatusOK {
		t.Error("a write went on although the lost validation could not be judged")
	}
	env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusNotFound})
	env.request(logical.ReadOperation, env.pskPath(), nil)
	if rec := env.storedRecord(); rec.State != store.StateTunnelGone || rec.PendingPSK != "" {
		t.Errorf("after a 404: state %s, pending key kept: %v", rec.State, rec.PendingPSK != "")
	}
	assertHonest(t, env)
	if n := env.sim.Calls(cloudflaresim.OpPSKSet) - sets; n != 0 {
		t.Errorf("%d Set requests after the lost validation, want 0", n)
	}
	if n := env.distinctNewKeys(); n != keys {
		t.Errorf("the edge was given %d new keys", n-keys)
	}
}

// TestAReturnedTunnelsOwnLateLandingIsHealedWithANewKey: MarkGone
// keeps LateLandingUntil ("no different key before it ends"), but
// ReturnGone never looks at it. K1 was finished while its abandoned
// request was still out; the request lands and re-dates K1 (the edge
// uses K1, Vault's key). The tunnel is then recorded gone for a while (a
// listing or a read without it: a 404 can pass) and listed again. The
// sweep's ReturnGone judges the re-dated K1 by its time alone, "changed
// outside this engine", and heals it with a new key, although the edge
// used Vault's key. The same re-date met by the drift sweep on a current
// record sets K1 again and makes no key
// (TestALateLandingNeverMakesAReadCallAStaleKeyCurrent). Pre-existing
// (ReturnGone predates these commits); no window is shortened.
//
// Printed on 85a4807:
//
//	the edge was given 3 different keys, want 2 (K0, K1): a heal replaced K1, which the edge used
func TestAReturnedTunnelsOwnLateLandingIsHealedWithANewKey(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the held write succeeded")
	}
	env.sim.WaitAccepted()
	assertCurrent(t, env, "the read that finishes K1")
	k1 := env.edge().PSK
	env.clock.Advance(time.Second)
	env.sim.ProcessLateNow() // K1's abandoned request lands: K1 re-dated
	if env.edge().PSK != k1 {
		t.Fatal("the late landing changed the key")
	}

	// Recorded gone for a while (as a listing without it, or a 404, records it).
	tun := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
	if _, err := env.b.engine.MarkGone(context.Background(), env.storage, tun, env.storedRecord()); err != nil {
		t.Fatal(err)
	}
	env.clock.Advance(time.Minute)
	backgroundPass(t, env) // the drift sweep lists it again: ReturnGone
	if rec := env.storedRecord(); rec.State == store.StateTunnelGone {
		t.Fatal("the sweep did not return the tunnel")
	}
	if n := env.distinctNewKeys(); n != 2 {
		t.Errorf("the edge was given %d different keys, want 2 (K0, K1): a heal replaced K1, which the edge used (state %s, K1 stored: %v)",
			n, env.storedRecord().State, env.storedRecord().PSK == k1)
	}
	assertHonest(t, env)
}
