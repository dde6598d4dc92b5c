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

// TestASpentQuotaIsABlock: an answer whose Ratelimit header says no calls
// remain refuses every call until Cloudflare's window resets, as a 429's
// block does, so BlockedUntil says so and the hook is told, to store it
// where a new process finds it. A count with calls left, or one that ends
// before the block in force, tells nothing; a newer answer that finds the
// window reset lifts it.
func TestASpentQuotaIsABlock(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	b := NewBudget(10, time.Minute, func() time.Time { return now })
	var told []time.Time
	b.SetOnBlock(func(until time.Time) {
		if !b.BlockedUntil().Equal(until) {
			t.Errorf("hook told %s while the Budget says %s", until, b.BlockedUntil())
		}
		told = append(told, until)
	})

	b.Observe(5, 40*time.Second)
	if len(told) != 0 || !b.BlockedUntil().IsZero() {
		t.Fatalf("calls left: hook told %v, BlockedUntil %s", told, b.BlockedUntil())
	}
	b.Observe(0, 40*time.Second)
	if len(told) != 1 || !told[0].Equal(now.Add(40*time.Second)) || !b.BlockedUntil().Equal(told[0]) {
		t.Fatalf("none left: hook told %v, BlockedUntil %s, want now+40s", told, b.BlockedUntil())
	}
	if ok, _ := b.TryTake(); ok {
		t.Fatal("a call was allowed with none left")
	}
	b.Block(now.Add(20 * time.Second))
	if len(told) != 1 {
		t.Errorf("a 429 block that ends before the spent quota's reset told the hook: %v", told)
	}
	b.Block(now.Add(time.Minute))
	if len(told) != 2 || !told[1].Equal(now.Add(time.Minute)) {
		t.Errorf("a later 429 block: hook told %v, want now+1m last", told)
	}
	b.Observe(0, time.Hour)
	if len(told) != 3 || !told[2].Equal(now.Add(maxBlock)) {
		t.Errorf("a reset an hour away: hook told %v, want the cap now+%s last", told, maxBlock)
	}

	fresh := NewBudget(10, time.Minute, func() time.Time { return now })
	fresh.Observe(0, 30*time.Second)
	fresh.Observe(7, 50*time.Second)
	if !fresh.BlockedUntil().IsZero() {
		t.Errorf("after an answer that found the window reset, BlockedUntil = %s", fresh.BlockedUntil())
	}
	fresh.Observe(0, 30*time.Second)
	now = now.Add(31 * time.Second)
	if !fresh.BlockedUntil().IsZero() {
		t.Errorf("after the reset, BlockedUntil = %s", fresh.BlockedUntil())
	}
}
