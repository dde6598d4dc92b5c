package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Fourth skeptic of issue 16 (key_source vault), on i16-core at 87c16bc
// (0f275ec, d22d6e9, 50053d1, a97b2b9, 87c16bc).

// newVaultHandClockedEnv is newHandClockedEnv (Cloudflare's clock by hand,
// at precision) with key_source vault and Vault's clock frozen.
func newVaultHandClockedEnv(t *testing.T, created time.Time, precision time.Duration) (*testEnv, *edgeClock) {
	t.Helper()
	env, edge := newHandClockedEnv(t, created, precision)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "vault"}))
	return env, edge
}

// TestLostValidationWrittenCurrentOverAnOlderEdgeKey: d22d6e9
// says "Only the verdict is stored ... never `current` for a key the edge
// was just seen not to use". finishValidation reads the tunnel itself,
// under the lock, long after the stored key was seen, and hands that read
// to judgeCurrent, whose "an older key in a listing taken before the
// stored key was seen: nothing concluded" branch (listedAfter) is meant
// for a sweep's listing only. When the read's Date is not after
// KeySeenAt it concludes nothing, and finishValidation then writes the
// record current. An edge key dated before the stored one is another key
// (TestAnOlderEdgeKeyIsDrift: Cloudflare's clock steps back, here 5 s;
// the same clock then stamps the read's Date, so it is not after
// KeySeenAt either). Any answer without a Date header (KeySeenAt zero, or
// the read's Date missing) does the same.
//
// Printed on 87c16bc:
//
//	after the lost validation was judged: stored state current, the edge uses the stored key: false
//	  (edge key dated 5s before the stored one; the validation's read showed it)
//	a psk read answers state current with a key the edge does not use
//
// It prints the same with internal/rotation and path_psk.go of 85a4807
// (compareLocked after writing current): not new, but d22d6e9's claim.
func TestLostValidationWrittenCurrentOverAnOlderEdgeKey(t *testing.T) {
	base := time.Now().Truncate(time.Second).Add(100 * time.Millisecond)
	env, edge := newVaultHandClockedEnv(t, base.Add(-100*time.Second), time.Second)
	edge.set(base)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	k1 := env.storedRecord()

	edge.set(base.Add(-5 * time.Second)) // Cloudflare's clock steps back 5 s
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	edge.set(base.Add(-4 * time.Second))
	env.clock.Advance(time.Second)

	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	if rec := env.storedRecord(); rec.State != store.StatePending {
		t.Fatalf("after the lost validation: state %s", rec.State)
	}
	env.request(logical.ReadOperation, env.pskPath(), nil) // judges the lost validation
	rec := env.storedRecord()
	if rec.Current() && rec.PSK != env.edge().PSK {
		t.Errorf("after the lost validation was judged: stored state current, the edge uses the stored key: false (edge key dated %v before the stored one; the validation's read showed it)",
			k1.LastGeneratedOn.Sub(env.edge().PSKGeneratedOn))
	}
	resp, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	if err == nil && resp != nil && resp.Data["state"] == store.StateCurrent && resp.Data["psk"] != env.edge().PSK {
		t.Errorf("a psk read answers state current with a key the edge does not use")
	}
}

// TestOlderEdgeKeyWithoutDateIsNeverDrift: judgeCurrent's
// listedAfter needs a Date on the look and a KeySeenAt on the record;
// without either it concludes nothing for an edge key dated before the
// stored one, for a sweep's listing and for finishValidation's own read.
// Behind a proxy at base_url that drops Date (the case
// TestALostValidationLandingLateUnderSkewMakesNoKey builds, and
// finishValidation's "no Date: this node's clock stands in" serves), or for
// a record stored before KeySeenAt existed, an outside key dated before
// the stored one (Cloudflare's clock stepped back 5 s, as in
// TestAnOlderEdgeKeyIsDrift) is never found: a lost validation's read
// writes it current, and every drift sweep after, minutes later with
// Cloudflare's clock well past the stored key, leaves it current.
//
// Printed on 87c16bc:
//
//	after the lost validation was judged: stored state current, the edge uses the stored key: false
//	after a drift sweep 2m later: stored state current, the edge uses the stored key: false
//	after a drift sweep 1h later: stored state current, the edge uses the stored key: false
//	psk/<account>/<tunnel>: state current but the key is not the edge's
//	psk/<account>/<tunnel>: state current but last_generated_on <X> is not the edge's
//	metadata/<account>/<tunnel>: state current but last_generated_on <X> is not the edge's
//
// (It prints the same at 85a4807's internal/rotation: compareLocked had the
// same listedAfter guard. The lost validation's half is d22d6e9's claim.)
func TestOlderEdgeKeyWithoutDateIsNeverDrift(t *testing.T) {
	base := time.Now().Truncate(time.Second).Add(100 * time.Millisecond)
	env, edge := newVaultHandClockedEnv(t, base.Add(-100*time.Second), time.Second)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		env.sim.ServeHTTP(&noDateWriter{ResponseWriter: w}, r)
	}))
	t.Cleanup(srv.Close)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": srv.URL + cloudflaresim.BasePath, "drift_check_interval": "1m",
	}))
	edge.set(base)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if !env.storedRecord().KeySeenAt.IsZero() {
		t.Fatal("setup: an answer carried a Date header")
	}

	edge.set(base.Add(-5 * time.Second)) // Cloudflare's clock steps back 5 s
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	edge.set(base.Add(-4 * time.Second))
	env.clock.Advance(time.Second)

	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	env.request(logical.ReadOperation, env.pskPath(), nil) // judges the lost validation
	check := func(when string) {
		t.Helper()
		if rec := env.storedRecord(); rec.Current() && rec.PSK != env.edge().PSK {
			t.Errorf("%s: stored state current, the edge uses the stored key: false", when)
		}
	}
	check("after the lost validation was judged")
	for _, d := range []time.Duration{2 * time.Minute, time.Hour} {
		env.clock.Advance(d)
		edge.set(base.Add(d))
		lists := env.sim.Calls(cloudflaresim.OpTunnelList)
		backgroundPass(t, env)
		if env.sim.Calls(cloudflaresim.OpTunnelList) == lists {
			t.Fatal("setup: the drift sweep did not run")
		}
		check(fmt.Sprintf("after a drift sweep %v later", d))
	}
	assertHonest(t, env)
}

// TestOwnLandingDatedEarlierIsHealedWithANewKey, the skeptic's
// next test, was left out as a known limit that predates key_source vault
// (it prints the same at 85a4807's internal/rotation), documented in
// docs/failure-modes.md (Keys Vault makes): with Cloudflare's clock stepped
// back 5 s, a validate_only whose query string was dropped sets the stored
// key again dated before its first time; the read that judges the lost
// validation takes that for an outside change and (heal_stale_psk on)
// heals it with a new key, although the edge used Vault's key throughout.
//
// TestOlderEdgeKeyWithoutDateIsNeverDrift above was to be left out
// too, but passes since the lost validation's own read no longer takes
// listedAfter's "nothing concluded" (finishValidation's sighting is fresh).
// Its other half stays a documented limit: without a Date header (or
// KeySeenAt), and no validation to read the tunnel, the drift sweep never
// finds an outside key dated before the stored one.

// TestReturnedTunnelChangedOutsideWithinItsBound (held: honest):
// 50053d1 judges a returned tunnel's key re-dated within LateLandingUntil
// as the engine's own late landing (lateLanding). Here it is not: K1 was
// finished while its abandoned request was out (bound ~ window + 61 s),
// the tunnel was recorded gone, and 1 s later the key was changed OUTSIDE
// the engine (the abandoned request never lands). With heal_stale_psk off
// the return marks it stale and sends nothing (the outside key stays, no
// read says current); with it on the stored key K1 is set again, which
// makes no key and is what healing allows (a heal would replace the
// outside key too), and the record is current for the key the edge then
// uses. The stale reason with healing off says "the edge probably uses
// the stored key, re-dated", which is a guess here, but the state is
// honest.
func TestReturnedTunnelChangedOutsideWithinItsBound(t *testing.T) {
	for _, heal := range []bool{false, true} {
		t.Run(fmt.Sprintf("heal %v", heal), func(t *testing.T) {
			env := newVaultKeysEnv(t)
			env.clock.freeze()
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{"heal_stale_psk": heal, "drift_check_interval": "1m"}))
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
			if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
				t.Fatal("the held write succeeded")
			}
			env.sim.WaitAccepted()
			assertCurrent(t, env, "the read that finishes K1")
			k1 := env.storedRecord()
			tun := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
			if _, err := env.b.engine.MarkGone(context.Background(), env.storage, tun, k1); err != nil {
				t.Fatal(err)
			}
			env.clock.Advance(time.Second)
			outside, _ := env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
			if outside.PSKGeneratedOn.After(k1.LateLandingUntil) {
				t.Fatal("setup: the outside change is past the bound")
			}
			keys, sets := env.distinctNewKeys(), env.sim.Calls(cloudflaresim.OpPSKSet)
			env.clock.Advance(time.Minute)
			backgroundPass(t, env) // the drift sweep lists it again: ReturnGone
			rec := env.storedRecord()
			t.Logf("returned: state %s, Set requests %d, reason: %s", rec.State, env.sim.Calls(cloudflaresim.OpPSKSet)-sets, rec.StateReason)
			if n := env.distinctNewKeys() - keys; n != 0 {
				t.Errorf("the return gave the edge %d new keys", n)
			}
			if !heal {
				if rec.State != store.StateStale || env.edge().PSK != outside.PSK || env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
					t.Errorf("heal off: state %s, the outside key replaced: %v", rec.State, env.edge().PSK != outside.PSK)
				}
			} else if !rec.Current() || env.edge().PSK != k1.PSK {
				t.Errorf("heal on: state %s, the edge uses K1: %v", rec.State, env.edge().PSK == k1.PSK)
			}
			assertHonest(t, env)
		})
	}
}

// TestCrashBetweenVerdictAndClearingTheMark (held: harmless):
// finishValidation's in-sync path writes the record current and then
// clears the unresolved mark; a crash between leaves a current record
// marked unresolved. The background pass clears the mark and sends
// nothing; reads serve the stored key, which is the edge's.
func TestCrashBetweenVerdictAndClearingTheMark(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.clock.Advance(time.Minute)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	assertKeyCurrent(t, env, "the read that drops the lost validation")
	tun := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
	if err := store.MarkUnresolved(context.Background(), env.storage, tun); err != nil { // the crash: the mark was never cleared
		t.Fatal(err)
	}
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	env.clock.Advance(time.Minute)
	backgroundPass(t, env)
	if keys, err := env.storage.List(context.Background(), store.UnresolvedPrefix+env.account+"/"); err != nil || len(keys) != 0 {
		t.Errorf("after a background pass: unresolved marks %v (%v)", keys, err)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet) - sets; n != 0 {
		t.Errorf("the background pass sent %d Set requests", n)
	}
	assertKeyCurrent(t, env, "after the background pass")
}

// TestReturnedTunnelRevertsALostRotationToTheOldKey: 50053d1's
// edgeReDated applies LateLandingUntil to any returned record with a key.
// But begin copies the previous record into an attempt's record, bound
// included, so a record found gone while ANOTHER key's rotation was
// unresolved (rotation_unknown, key_source cloudflare: a mount switched
// from vault, as the issue asks to support) still carries the old key's
// bound. K1 was finished while its abandoned request was out (bound:
// window end + 61 s); the mount switches to key_source cloudflare; once
// K1's window closes the operator rotates (K1 compromised, say):
// Cloudflare generates K2, the answer is lost (rotation_unknown); the
// reconciling read gets a 404 (tunnel_gone). When the tunnel is listed
// again the edge has K2, dated within K1's bound, so ReturnGone takes it
// for K1 re-dated by the engine's own late request and sets K1 AGAIN on
// the edge: the operator's rotation is silently undone and the retired key
// is the edge's once more (Vault says current for it, which is then true).
// K1's abandoned request never landed. Before 50053d1 the return healed
// K2 with a new key.
//
// Printed on 87c16bc:
//
//	after the return: the edge uses K1 again, the key the operator's rotation replaced (state current, Set requests since the rotation: 1)
func TestReturnedTunnelRevertsALostRotationToTheOldKey(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"heal_stale_psk": true, "drift_check_interval": "1m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the held write succeeded")
	}
	env.sim.WaitAccepted()
	assertCurrent(t, env, "the read that finishes K1")
	k1 := env.storedRecord()

	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "cloudflare"}))
	env.clock.Advance(k1.SettleUntil.Sub(env.clock.Now()) + time.Second)
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: http.StatusServiceUnavailable, AfterCommit: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the rotation with a lost answer succeeded")
	}
	k2 := env.edge()
	if k2.PSK == k1.PSK || k2.PSKGeneratedOn.After(k1.LateLandingUntil) {
		t.Fatalf("setup: K2 was not generated within K1's bound (K2 new: %v)", k2.PSK != k1.PSK)
	}
	if rec := env.storedRecord(); rec.State != store.StateRotationUnknown {
		t.Fatalf("setup: after the lost rotation: state %s", rec.State)
	}
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)

	env.clock.Advance(env.storedRecord().SettleUntil.Sub(env.clock.Now()) + time.Second)
	env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusNotFound})
	env.request(logical.ReadOperation, env.pskPath(), nil) // reconciliation meets a 404
	if rec := env.storedRecord(); rec.State != store.StateTunnelGone {
		t.Fatalf("setup: after the 404: state %s", rec.State)
	}
	env.clock.Advance(time.Minute)
	backgroundPass(t, env) // the drift sweep lists it again: ReturnGone
	rec := env.storedRecord()
	if env.edge().PSK == k1.PSK {
		t.Errorf("after the return: the edge uses K1 again, the key the operator's rotation replaced (state %s, Set requests since the rotation: %d)",
			rec.State, env.sim.Calls(cloudflaresim.OpPSKSet)-sets)
	}
	assertHonest(t, env)
}
