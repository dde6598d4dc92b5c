package rotation

import (
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// TestMayHealAndTheSettleRule (review of issue 15): the issue asks for the
// decisions (judgeEdge, mayHeal, the settle rule) to be pure with table
// tests; judgeEdge has one (judge_test.go), mayHeal and the settle rule
// had none. This one passes on the code as reviewed: the rules are as they
// were at 473d7c8 (rotation.go's mayHeal, settleWindow, psk_record.go's
// settling).
func TestMayHealAndTheSettleRule(t *testing.T) {
	now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	e := New(Config{Now: func() time.Time { return now }})
	hourly := Settings{DriftInterval: time.Hour, RequestTimeout: 30 * time.Second}
	for _, tc := range []struct {
		name     string
		settings Settings
		rec      store.Record
		want     bool
	}{
		{"never healed", hourly, store.Record{State: store.StateStale}, true},
		{"held", hourly, store.Record{State: store.StateRotationUnknown, HealHeld: true}, false},
		{"its own rotation's unknown outcome, healed a minute ago", hourly, store.Record{State: store.StateRotationUnknown, LastHealedAt: now.Add(-time.Minute)}, true},
		{"drift within two intervals of a heal", hourly, store.Record{State: store.StateStale, LastHealedAt: now.Add(-2*time.Hour + time.Second)}, false},
		{"drift two intervals after a heal", hourly, store.Record{State: store.StateStale, LastHealedAt: now.Add(-2 * time.Hour)}, true},
		{"drift sweep off", Settings{}, store.Record{State: store.StateStale, LastHealedAt: now}, true},
	} {
		if got := e.mayHeal(tc.settings, &tc.rec); got != tc.want {
			t.Errorf("mayHeal, %s: %v, want %v", tc.name, got, tc.want)
		}
	}

	if w := settleWindow(hourly); w != 70*time.Second {
		t.Errorf("settle window of a 30s request_timeout: %s, want 2×30s + %s", w, settleMargin)
	}
	rec := store.Record{State: store.StateRotationUnknown, SettleUntil: now}
	for _, tc := range []struct {
		at   time.Time
		want bool
	}{{now.Add(-time.Nanosecond), true}, {now, false}, {now.Add(time.Second), false}} {
		if got := rec.Settling(tc.at); got != tc.want {
			t.Errorf("settling at settle_until%+v: %v, want %v", tc.at.Sub(now), got, tc.want)
		}
	}
	if (&store.Record{State: store.StateStale, SettleUntil: now}).Settling(now.Add(-time.Second)) {
		t.Error("a stale record settles")
	}
}
