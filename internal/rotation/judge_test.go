package rotation

import (
	"encoding/json"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

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
		{"1s, later, just stored, Date a second on: undecided (the Date may be another clock's)", coarse, shape{storedFor: time.Second, seenAfter: time.Second}, 0, edgeChanged},
		{"1s, later, just stored, Date past the margin: unchanged", coarse, shape{storedFor: time.Second, seenAfter: dateProofMargin}, 0, edgeUsesStoredKey},
		{"1s, later, stored 10s before: undecided (node clocks)", coarse, shape{storedFor: settleMargin, seenAfter: -1}, 0, edgeChanged},
		{"1s, later, stored 11s before: undecided (a clock step)", coarse, shape{storedFor: settleMargin + time.Second, seenAfter: -1}, 0, edgeChanged},
		{"1s, later, stored past the margin, no Date: unchanged", coarse, shape{storedFor: storedProofMargin, seenAfter: -1}, 0, edgeUsesStoredKey},
		{"1s, later: a newer key", coarse, shape{storedFor: time.Hour, seenAfter: time.Hour}, time.Second, edgeChanged},
		{"1s, later: an older key", coarse, shape{storedFor: time.Hour, seenAfter: time.Hour}, -time.Second, edgeChanged},
		{"1s, first, no Date: undecided", coarse, shape{first: true, seenAfter: -1}, 0, edgeChanged},
		{"1s, first, Date in the key's second: undecided", coarse, shape{first: true, seenAfter: 0}, 0, edgeChanged},
		{"1s, first, Date a second on: undecided (the Date may be another clock's)", coarse, shape{first: true, seenAfter: time.Second}, 0, edgeChanged},
		{"1s, first, Date past the margin: unchanged", coarse, shape{first: true, seenAfter: dateProofMargin}, 0, edgeNeverRotated},
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
		{"gone and back, 1s, Date a second on", store.StateTunnelGone, func(r *store.Record) { r.KeySeenAt = coarse.Add(time.Second) }, coarse, edgeChanged},
		{"gone and back, 1s, Date past the margin", store.StateTunnelGone, func(r *store.Record) { r.KeySeenAt = coarse.Add(dateProofMargin) }, coarse, edgeUsesStoredKey},
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

// TestRecordsStoredBeforeTheDateFieldsStillResolve: a record written before
// KeySeenAt, EdgeKeyBeforeSeenAt and EdgeKeyForeign existed decodes, and its
// unresolved rotation is judged against the stored key: at whole seconds,
// by StoredAt against RotationStartedAt, both Vault's.
func TestRecordsStoredBeforeTheDateFieldsStillResolve(t *testing.T) {
	old := `{"account_id":"023e105f4ecef8ad9ca31a8372d0c353","tunnel_id":"c4a7362d577a6c3019a474fd6f485821","psk":"stored-key",` +
		`"last_generated_on":"2030-01-02T03:04:05Z","version":3,"stored_at":"2030-01-02T03:04:15Z",` +
		`"state":"rotation_unknown","state_reason":"a rotation started","rotation_started_at":"2030-01-02T04:00:00Z",` +
		`"settle_until":"2030-01-02T04:00:12Z","edge_key_before":"2030-01-02T03:04:05Z","retry_at":"0001-01-01T00:00:00Z",` +
		`"last_healed_at":"0001-01-01T00:00:00Z","rotation_period":0,"next_rotation":"0001-01-01T00:00:00Z","facts":{}}`
	rec := new(store.Record)
	if err := json.Unmarshal([]byte(old), rec); err != nil {
		t.Fatal(err)
	}
	if rec.PSK != "stored-key" || !rec.KeySeenAt.IsZero() || !rec.EdgeKeyBeforeSeenAt.IsZero() || rec.EdgeKeyForeign {
		t.Fatalf("old record decoded as %+v", rec)
	}
	if got, _ := judgeEdge(rec, rec.LastGeneratedOn); got != edgeUsesStoredKey {
		t.Errorf("unchanged whole-second key, stored an hour before the rotation: verdict %d, want the stored key", got)
	}
	if got, _ := judgeEdge(rec, rec.LastGeneratedOn.Add(time.Second)); got != edgeChanged {
		t.Errorf("a newer key: verdict %d, want changed", got)
	}
}
