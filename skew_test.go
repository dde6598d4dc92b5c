package main

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// newSkewedEnv is newConfiguredEnv with the simulator's clock skew ahead of
// the engine's (negative: behind, so Vault's clock runs ahead of
// Cloudflare's) and its timestamps at precision. The test tunnel is created
// afresh under that clock: a tunnel created before the skew would carry a
// key dated on the other clock, a world that does not exist.
func newSkewedEnv(t *testing.T, skew, precision time.Duration) *testEnv {
	t.Helper()
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": "1s"}))
	clock := env.clock
	env.sim.SetClock(func() time.Time { return clock.Now().Add(skew) })
	env.sim.SetTimestampPrecision(precision)
	env.tunnel = env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{})
	return env
}

// storedRecord reads the test tunnel's record from storage, without the
// reconciliation a read through the API would do.
func storedRecord(t *testing.T, env *testEnv) *store.Record {
	t.Helper()
	rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID})
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// assertHealedOrFlagged is the guarantee after a first rotation whose key
// Cloudflare made: the record is kept, and it is either current with the
// edge's key (healed) or not current with a reason (flagged). Never gone,
// never current for another key.
func assertHealedOrFlagged(t *testing.T, env *testEnv, when string) {
	t.Helper()
	rec := storedRecord(t, env)
	edge := env.edge()
	switch {
	case rec == nil:
		t.Fatalf("%s: the record is gone, and the edge uses a key nobody holds (%d key(s) generated)", when, env.generations())
	case rec.Current() && (rec.PSK != edge.PSK || !rec.LastGeneratedOn.Equal(edge.PSKGeneratedOn)):
		t.Fatalf("%s: current for a key the edge does not use", when)
	case !rec.Current() && rec.StateReason == "":
		t.Fatalf("%s: state %s without a reason", when, rec.State)
	}
	resp, err := env.request(logical.ReadOperation, env.metaPath(), nil)
	if status := httpStatus(resp, err); status != http.StatusOK {
		t.Fatalf("%s: metadata read: status %d: %s", when, status, errorText(resp, err))
	}
}

// TestAValidationKeyIsKeptWhenVaultsClockIsAhead: Vault's clock 10 s ahead of
// Cloudflare's, and a validate_only whose query string is dropped on the
// way, so Cloudflare generates and activates a key. The edge's key was made
// "before" the request started by Vault's clock, which the old code took to
// mean the edge still had its old key: it discarded the live key and put the
// old one back as current.
func TestAValidationKeyIsKeptWhenVaultsClockIsAhead(t *testing.T) {
	env := newSkewedEnv(t, -10*time.Second, 0)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{IgnoreValidateOnly: true})
	resp := env.must(validateOnly(env))
	if resp.Data["stored"] != true {
		t.Errorf("validate_only that generated a key: stored %v, want true", resp.Data["stored"])
	}
	rec := storedRecord(t, env)
	if rec == nil || (rec.Current() && rec.PSK != env.edge().PSK) {
		t.Fatal("after a validate_only that generated a key, Vault says current for a key the edge does not use")
	}
	assertCurrent(t, env, "after a validate_only that generated a key")
	if got := env.generations(); got != 2 {
		t.Errorf("edge generated %d keys, want 2 (rotation, validation turned generation)", got)
	}
}

// TestALostFirstRotationIsNeverForgottenWhenVaultsClockIsAhead: Vault's
// clock 10 s ahead of Cloudflare's, and a tunnel's first rotation whose
// answer is lost after Cloudflare made the key. The old code found the
// edge's key older than the rotation's start by Vault's clock, judged the
// rotation never to have happened and deleted the record: the edge held a
// key nobody had, a read returned nothing, and no sweep looked again.
func TestALostFirstRotationIsNeverForgottenWhenVaultsClockIsAhead(t *testing.T) {
	for name, fault := range map[string]cloudflaresim.Fault{
		"5xx after commit":    {Status: 500, AfterCommit: true},
		"hangup after commit": {Hangup: true, AfterCommit: true},
	} {
		t.Run(name, func(t *testing.T) {
			env := newSkewedEnv(t, -10*time.Second, 0)
			env.sim.FailNext(cloudflaresim.OpPSKGenerate, fault)
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if httpStatus(resp, err) != http.StatusBadGateway {
				t.Fatalf("lost first rotation: status %d: %s", httpStatus(resp, err), errorText(resp, err))
			}
			if env.generations() != 1 {
				t.Fatalf("the fault did not generate a key (%d)", env.generations())
			}
			env.clock.Advance(time.Minute) // past the settle window
			resp, err = env.request(logical.ReadOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status == http.StatusNoContent || status == http.StatusNotFound && storedRecord(t, env) == nil {
				t.Fatalf("read after the settle window: status %d and no record, while the edge uses a key nobody holds", status)
			}
			assertHealedOrFlagged(t, env, "after the read")
			runBackgroundPass(t, env)
			assertHealedOrFlagged(t, env, "after a background pass")
			assertHonest(t, env)
		})
	}
}

// TestTheGuaranteeHoldsWhateverTheClocks plays the guarantee's sequences
// (rotation_test.go, validate_test.go, sweep_test.go) with Cloudflare's
// clock a minute behind Vault's to a minute ahead, at microsecond and at
// whole-second timestamps. After each has settled (past every settle
// window, a background pass), Vault holds the edge's key as current, or,
// where a first rotation never happened, holds nothing and the edge still
// has the key it was created with; and the edge generated no more keys than
// the sequence asked for plus the heals the rules allow. Each case says its
// bound: at whole seconds, a key that the stored one shares its second with
// (nothing proves the second had passed before the attempt) counts as a
// change and is healed, which is at most one key more.
func TestTheGuaranteeHoldsWhateverTheClocks(t *testing.T) {
	type bounds struct{ min, max int }
	cases := []struct {
		name string
		// run plays the sequence on a fresh env; the test settles it.
		run func(t *testing.T, env *testEnv)
		// fine and coarse bound the keys the edge generates, at
		// microsecond and at whole-second precision.
		fine, coarse bounds
		// mayForget: the sequence's only rotation may turn out never to
		// have happened, and then nothing is stored.
		mayForget bool
	}{
		{
			// Rotation, lost rotation (made), heal.
			name: "lost answer after commit, later rotation",
			run: func(t *testing.T, env *testEnv) {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
				mustFail(t, env, cloudflaresim.Fault{Status: 500, AfterCommit: true})
			},
			fine: bounds{3, 3}, coarse: bounds{3, 3},
		},
		{
			// Lost first rotation (made), heal.
			name: "lost answer after commit, first rotation",
			run: func(t *testing.T, env *testEnv) {
				mustFail(t, env, cloudflaresim.Fault{Hangup: true, AfterCommit: true})
			},
			fine: bounds{2, 2}, coarse: bounds{2, 2},
		},
		{
			// Rotation, and a lost rotation that made nothing; at whole
			// seconds the edge's unchanged key shares the stored key's
			// second, and the stored key is too fresh to prove it: one heal.
			name: "lost answer before commit, later rotation",
			run: func(t *testing.T, env *testEnv) {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
				mustFail(t, env, cloudflaresim.Fault{Status: 500})
			},
			fine: bounds{1, 1}, coarse: bounds{1, 2},
		},
		{
			// A lost first rotation that made nothing: forgotten, unless
			// (whole seconds) the tunnel's key dates from the second of the
			// read before the rotation, which cannot prove it unchanged:
			// then the rotation asked for is healed in.
			name: "lost answer before commit, first rotation",
			run: func(t *testing.T, env *testEnv) {
				mustFail(t, env, cloudflaresim.Fault{Status: 500})
			},
			fine: bounds{0, 0}, coarse: bounds{0, 1}, mayForget: true,
		},
		{
			// As above, the lost rotation sent long after the stored one
			// (storedProofMargin: node clocks, and a clock stepped across
			// its band): Vault's clock alone (StoredAt against
			// RotationStartedAt) proves an unchanged whole-second key
			// unchanged. No heal.
			name: "lost answer before commit, later rotation long after the last",
			run: func(t *testing.T, env *testEnv) {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
				env.clock.Advance(3 * time.Minute) // more than rotation.storedProofMargin
				mustFail(t, env, cloudflaresim.Fault{Status: 500})
			},
			fine: bounds{1, 1}, coarse: bounds{1, 1},
		},
		{
			// A lost first rotation that made nothing, of a tunnel made
			// more than dateProofMargin before: the Date of the read before
			// the rotation, that far past the key's, proves the key
			// unchanged, whatever clock stamped it. Forgotten.
			name: "lost answer before commit, first rotation of a tunnel two minutes old",
			run: func(t *testing.T, env *testEnv) {
				env.clock.Advance(2 * time.Minute) // more than rotation.dateProofMargin
				mustFail(t, env, cloudflaresim.Fault{Status: 500})
			},
			fine: bounds{0, 0}, coarse: bounds{0, 0}, mayForget: true,
		},
		{
			// Rotation, validation turned generation (stored at once); at
			// whole seconds a validation key in the stored key's second is
			// undecided: rotation_unknown, then healed.
			name: "validate_only with the query string dropped",
			run: func(t *testing.T, env *testEnv) {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
				env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{IgnoreValidateOnly: true})
				_, _ = validateOnly(env)
			},
			fine: bounds{2, 2}, coarse: bounds{2, 3},
		},
		{
			name: "validate_only with the query string dropped, first for the tunnel",
			run: func(t *testing.T, env *testEnv) {
				env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{IgnoreValidateOnly: true})
				_, _ = validateOnly(env)
			},
			fine: bounds{1, 1}, coarse: bounds{1, 2},
		},
		{
			// Rotation, the abandoned request carried out late (2 s after it
			// arrived, so in a later second), heal.
			name: "abandoned request processed late",
			run: func(t *testing.T, env *testEnv) {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
				mustFail(t, env, cloudflaresim.Fault{ProcessAfter: 2 * time.Second})
				env.sim.WaitIdle()
			},
			fine: bounds{3, 3}, coarse: bounds{3, 3},
		},
		{
			// Rotation, a key made outside Vault, the drift sweep's heal.
			// The outside key comes two seconds later: one in the stored
			// key's second cannot be found by anyone (README, Drift).
			name: "key changed outside Vault",
			run: func(t *testing.T, env *testEnv) {
				env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m"}))
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
				env.clock.Advance(2 * time.Second)
				env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
			},
			fine: bounds{3, 3}, coarse: bounds{3, 3},
		},
	}
	for _, precision := range []time.Duration{time.Microsecond, time.Second} {
		for _, skew := range []time.Duration{-time.Minute, -10 * time.Second, 0, 10 * time.Second, time.Minute} {
			for _, tc := range cases {
				t.Run(fmt.Sprintf("%s/precision %s/Cloudflare %+ds", tc.name, precision, int(skew.Seconds())), func(t *testing.T) {
					env := newSkewedEnv(t, skew, precision)
					tc.run(t, env)
					runBackgroundPass(t, env)

					rec := storedRecord(t, env)
					switch {
					case rec == nil && tc.mayForget && env.generations() == 0:
						// Never rotated, and the edge has its first key.
					case rec == nil:
						t.Fatalf("no record, and the edge generated %d key(s)", env.generations())
					default:
						assertCurrent(t, env, "after the sequence settled")
					}
					assertHonest(t, env)
					want := tc.fine
					if precision == time.Second {
						want = tc.coarse
					}
					if got := env.generations(); got < want.min || got > want.max {
						t.Errorf("the edge generated %d key(s), want %d to %d", got, want.min, want.max)
					}
				})
			}
		}
	}
}

// mustFail writes the test tunnel with fault on its psk_generate and
// checks that the write failed.
func mustFail(t *testing.T, env *testEnv, fault cloudflaresim.Fault) {
	t.Helper()
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, fault)
	if resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil); httpStatus(resp, err) < 500 {
		t.Fatalf("the faulted write: status %d: %s", httpStatus(resp, err), errorText(resp, err))
	}
}
