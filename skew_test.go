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

// TestJudgeEdge decides records by Cloudflare's times alone: every case is
// judged at Vault clock skews from a minute behind to a minute ahead of
// Cloudflare's, and must come out the same at each. Times in the records
// are built as the engine writes them: Cloudflare's (last_generated_on, an
// answer's Date) on Cloudflare's clock, Vault's (StoredAt,
// RotationStartedAt) on Vault's, skew apart.
func TestJudgeEdge(t *testing.T) {
	// cf is Cloudflare's time of the key the edge had before the attempt.
	fine := time.Date(2030, 1, 2, 3, 4, 5, 123456000, time.UTC)
	coarse := fine.Truncate(time.Second)
	type shape struct {
		first   bool // a first rotation: Vault holds no key
		foreign bool // the edge's key before the attempt was not the stored one
		// storedFor is how long before the attempt the stored key was
		// stored, by Vault's clock.
		storedFor time.Duration
		// seenAfter is when, after before, Cloudflare dated the answer
		// that showed before; negative: no Date.
		seenAfter time.Duration
	}
	cases := []struct {
		name   string
		before time.Time
		shape  shape
		// edge is the edge's key time now, relative to before.
		edge time.Duration
		want edgeVerdict
	}{
		{"µs, later: unchanged", fine, shape{storedFor: time.Second, seenAfter: -1}, 0, edgeUsesStoredKey},
		{"µs, later: a newer key", fine, shape{storedFor: time.Second, seenAfter: -1}, time.Microsecond, edgeChanged},
		{"µs, later: an older key", fine, shape{storedFor: time.Second, seenAfter: -1}, -time.Second, edgeChanged},
		{"µs, later, stored a minute before: a newer key", fine, shape{storedFor: time.Minute, seenAfter: -1}, time.Second, edgeChanged},
		{"µs, first: unchanged", fine, shape{first: true, seenAfter: -1}, 0, edgeNeverRotated},
		{"µs, first: a newer key", fine, shape{first: true, seenAfter: 0}, 3 * time.Second, edgeChanged},
		{"µs, first: an older key", fine, shape{first: true, seenAfter: 0}, -time.Minute, edgeChanged},
		{"µs, heal: unchanged", fine, shape{foreign: true, storedFor: time.Hour, seenAfter: time.Hour}, 0, edgeChanged},
		{"µs, heal: a newer key", fine, shape{foreign: true, storedFor: time.Hour, seenAfter: time.Hour}, time.Second, edgeChanged},

		{"1s, later, just stored, no Date: unchanged is undecided", coarse, shape{storedFor: time.Second, seenAfter: -1}, 0, edgeChanged},
		{"1s, later, just stored, Date in the key's second: undecided", coarse, shape{storedFor: time.Second, seenAfter: 0}, 0, edgeChanged},
		{"1s, later, just stored, Date a second on: unchanged", coarse, shape{storedFor: time.Second, seenAfter: time.Second}, 0, edgeUsesStoredKey},
		{"1s, later, stored 10s before: undecided (node clocks)", coarse, shape{storedFor: settleMargin, seenAfter: -1}, 0, edgeChanged},
		{"1s, later, stored 11s before, no Date: unchanged", coarse, shape{storedFor: settleMargin + time.Second, seenAfter: -1}, 0, edgeUsesStoredKey},
		{"1s, later: a newer key", coarse, shape{storedFor: time.Hour, seenAfter: time.Hour}, time.Second, edgeChanged},
		{"1s, later: an older key", coarse, shape{storedFor: time.Hour, seenAfter: time.Hour}, -time.Second, edgeChanged},
		{"1s, first, no Date: undecided", coarse, shape{first: true, seenAfter: -1}, 0, edgeChanged},
		{"1s, first, Date in the key's second: undecided", coarse, shape{first: true, seenAfter: 0}, 0, edgeChanged},
		{"1s, first, Date a second on: unchanged", coarse, shape{first: true, seenAfter: time.Second}, 0, edgeNeverRotated},
		{"1s, first, Date a day on: unchanged", coarse, shape{first: true, seenAfter: 24 * time.Hour}, 0, edgeNeverRotated},
		{"1s, first: a newer key", coarse, shape{first: true, seenAfter: time.Hour}, time.Second, edgeChanged},
		{"1s, heal, Date a second on: unchanged is still not Vault's", coarse, shape{foreign: true, storedFor: time.Hour, seenAfter: time.Second}, 0, edgeChanged},
	}
	for _, skew := range []time.Duration{-time.Minute, -10 * time.Second, 0, 10 * time.Second, time.Minute} {
		for _, tc := range cases {
			// Vault's clock reads skew more than Cloudflare's; the attempt
			// starts a few seconds after the before-key was seen.
			started := tc.before.Add(skew + 3*time.Second)
			if tc.shape.seenAfter > 0 {
				started = started.Add(tc.shape.seenAfter)
			}
			rec := &store.Record{State: store.StateRotationUnknown, RotationStartedAt: started, EdgeKeyBefore: tc.before, EdgeKeyForeign: tc.shape.foreign}
			if tc.shape.seenAfter >= 0 {
				rec.EdgeKeyBeforeSeenAt = tc.before.Truncate(time.Second).Add(tc.shape.seenAfter)
			}
			if !tc.shape.first {
				rec.PSK, rec.StoredAt = "stored", started.Add(-tc.shape.storedFor)
				rec.LastGeneratedOn, rec.KeySeenAt = tc.before, rec.EdgeKeyBeforeSeenAt
				if tc.shape.foreign {
					rec.LastGeneratedOn = tc.before.Add(-time.Hour)
				}
			}
			got, why := judgeEdge(rec, tc.before.Add(tc.edge))
			if got != tc.want {
				t.Errorf("%s, Vault %s ahead: verdict %d, want %d", tc.name, skew, got, tc.want)
			}
			if got == edgeChanged && why == "" {
				t.Errorf("%s, Vault %s ahead: changed without a reason", tc.name, skew)
			}
		}
	}

	// Records whose last attempt is resolved: the edge uses the stored key
	// only where its time proves it.
	stored := store.Record{PSK: "stored", LastGeneratedOn: coarse, StoredAt: coarse.Add(time.Hour)}
	for _, tc := range []struct {
		name  string
		state string
		edit  func(*store.Record)
		edge  time.Time
		want  edgeVerdict
	}{
		{"gone and back, µs, same key", store.StateTunnelGone, func(r *store.Record) { r.LastGeneratedOn = fine }, fine, edgeUsesStoredKey},
		{"gone and back, 1s, no Date", store.StateTunnelGone, nil, coarse, edgeChanged},
		{"gone and back, 1s, Date a second on", store.StateTunnelGone, func(r *store.Record) { r.KeySeenAt = coarse.Add(time.Second) }, coarse, edgeUsesStoredKey},
		{"gone and back, a newer key", store.StateTunnelGone, nil, coarse.Add(time.Second), edgeChanged},
		{"stale, a newer key", store.StateStale, nil, coarse.Add(time.Minute), edgeChanged},
		{"stale, an older key", store.StateStale, nil, coarse.Add(-time.Minute), edgeChanged},
		{"stale first rotation", store.StateStale, func(r *store.Record) { r.PSK, r.LastGeneratedOn = "", time.Time{} }, coarse, edgeChanged},
		{"keyless tunnel, first rotation did nothing", store.StateRotationUnknown, func(r *store.Record) { *r = store.Record{State: store.StateRotationUnknown} }, time.Time{}, edgeNeverRotated},
		{"keyless tunnel, first rotation made a key", store.StateRotationUnknown, func(r *store.Record) { *r = store.Record{State: store.StateRotationUnknown} }, coarse, edgeChanged},
		{"the edge lost its key", store.StateRotationUnknown, func(r *store.Record) { r.EdgeKeyBefore = r.LastGeneratedOn }, time.Time{}, edgeChanged},
	} {
		rec := stored
		rec.State = tc.state
		if tc.edit != nil {
			tc.edit(&rec)
		}
		if got, _ := judgeEdge(&rec, tc.edge); got != tc.want {
			t.Errorf("%s: verdict %d, want %d", tc.name, got, tc.want)
		}
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
			// As above, the lost rotation sent 15 s after the stored one:
			// Vault's clock alone (StoredAt against RotationStartedAt)
			// proves an unchanged whole-second key unchanged. No heal.
			name: "lost answer before commit, later rotation 15s after the last",
			run: func(t *testing.T, env *testEnv) {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
				env.clock.Advance(15 * time.Second)
				mustFail(t, env, cloudflaresim.Fault{Status: 500})
			},
			fine: bounds{1, 1}, coarse: bounds{1, 1},
		},
		{
			// A lost first rotation that made nothing, of a tunnel made 2 s
			// before: the Date of the read before the rotation, a second
			// past the key's, proves the key unchanged. Forgotten.
			name: "lost answer before commit, first rotation of a tunnel 2s old",
			run: func(t *testing.T, env *testEnv) {
				env.clock.Advance(2 * time.Second)
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

// TestRecordsStoredBeforeTheDateFieldsStillResolve: a record written before
// KeySeenAt, EdgeKeyBeforeSeenAt and EdgeKeyForeign existed decodes, and its
// unresolved rotation is judged against the stored key: at whole seconds,
// by StoredAt against RotationStartedAt, both Vault's.
func TestRecordsStoredBeforeTheDateFieldsStillResolve(t *testing.T) {
	env := newConfiguredEnv(t)
	tun := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
	old := `{"account_id":"` + env.account + `","tunnel_id":"` + env.tunnel.ID + `","psk":"stored-key",` +
		`"last_generated_on":"2030-01-02T03:04:05Z","version":3,"stored_at":"2030-01-02T03:04:15Z",` +
		`"state":"rotation_unknown","state_reason":"a rotation started","rotation_started_at":"2030-01-02T04:00:00Z",` +
		`"settle_until":"2030-01-02T04:00:12Z","edge_key_before":"2030-01-02T03:04:05Z","retry_at":"0001-01-01T00:00:00Z",` +
		`"last_healed_at":"0001-01-01T00:00:00Z","rotation_period":0,"next_rotation":"0001-01-01T00:00:00Z","facts":{}}`
	if err := env.storage.Put(context.Background(), &logical.StorageEntry{Key: tun.StorageKey(), Value: []byte(old)}); err != nil {
		t.Fatal(err)
	}
	rec := storedRecord(t, env)
	if rec == nil || rec.PSK != "stored-key" || !rec.KeySeenAt.IsZero() || !rec.EdgeKeyBeforeSeenAt.IsZero() || rec.EdgeKeyForeign {
		t.Fatalf("old record decoded as %+v", rec)
	}
	if got, _ := judgeEdge(rec, rec.LastGeneratedOn); got != edgeUsesStoredKey {
		t.Errorf("unchanged whole-second key, stored an hour before the rotation: verdict %d, want the stored key", got)
	}
	if got, _ := judgeEdge(rec, rec.LastGeneratedOn.Add(time.Second)); got != edgeChanged {
		t.Errorf("a newer key: verdict %d, want changed", got)
	}
}
