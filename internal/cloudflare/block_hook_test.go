package cloudflare

import (
	"testing"
	"time"
)

// TestOnBlockIsToldOfEveryExtension: the hook hears of a block each time it
// is extended, with the block's end as the Budget keeps it (capped), never
// when an answer would shorten it, and is called without the Budget's lock
// held (it may ask the Budget about the block). RestoreBlock applies a block
// already on record without telling the hook again.
func TestOnBlockIsToldOfEveryExtension(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	b := NewBudget(10, time.Minute, func() time.Time { return now })
	var told []time.Time
	b.SetOnBlock(func(until time.Time) {
		if !b.BlockedUntil().Equal(until) {
			t.Errorf("hook told %s while the Budget says %s", until, b.BlockedUntil())
		}
		told = append(told, until)
	})

	cases := []struct {
		name  string
		block time.Duration
		want  []time.Duration // ends told so far, from now
	}{
		{"first block", 2 * time.Minute, []time.Duration{2 * time.Minute}},
		{"a shorter one", time.Minute, []time.Duration{2 * time.Minute}},
		{"a longer one", 5 * time.Minute, []time.Duration{2 * time.Minute, 5 * time.Minute}},
		{"past the cap", time.Hour, []time.Duration{2 * time.Minute, 5 * time.Minute, maxBlock}},
	}
	for _, tc := range cases {
		b.Block(now.Add(tc.block))
		if len(told) != len(tc.want) {
			t.Fatalf("%s: hook told %d times, want %d", tc.name, len(told), len(tc.want))
		}
		for i, w := range tc.want {
			if !told[i].Equal(now.Add(w)) {
				t.Errorf("%s: hook %d told %s, want now+%s", tc.name, i, told[i], w)
			}
		}
	}

	fresh := NewBudget(10, time.Minute, func() time.Time { return now })
	fresh.SetOnBlock(func(time.Time) { t.Error("RestoreBlock told the hook") })
	fresh.RestoreBlock(now.Add(3 * time.Minute))
	if got := fresh.Blocked(); got != 3*time.Minute {
		t.Errorf("restored block lasts %s, want 3m", got)
	}
	fresh.RestoreBlock(now.Add(24 * time.Hour))
	if got := fresh.Blocked(); got != maxBlock {
		t.Errorf("a restored block of a day lasts %s, want the cap %s", got, maxBlock)
	}
	now = now.Add(time.Hour)
	if !fresh.BlockedUntil().IsZero() || fresh.Blocked() != 0 {
		t.Errorf("after the block: BlockedUntil %s, Blocked %s", fresh.BlockedUntil(), fresh.Blocked())
	}
}
