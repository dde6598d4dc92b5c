package cloudflare

import (
	"math/rand"
	"testing"
	"time"
)

// TestBudgetHoldsInEveryWindow takes calls as fast as the budget allows at
// random moments and checks that no window, wherever it starts, holds more
// than the limit, and that the budget is not left idle when it allows calls.
func TestBudgetHoldsInEveryWindow(t *testing.T) {
	cases := []struct {
		limit  int
		window time.Duration
	}{{1, time.Second}, {10, time.Second}, {600, 5 * time.Minute}, {7, 3 * time.Second}}
	for _, tc := range cases {
		now := time.Unix(1_700_000_000, 0)
		b := NewBudget(tc.limit, tc.window, func() time.Time { return now })
		rng := rand.New(rand.NewSource(int64(tc.limit)))
		var taken []time.Time
		for i := 0; i < tc.limit*20; i++ {
			now = now.Add(time.Duration(rng.Int63n(int64(tc.window) / int64(tc.limit) * 2)))
			free, _ := b.Free()
			ok, wait := b.TryTake()
			if ok != (free > 0) {
				t.Fatalf("limit %d: Free said %d, TryTake said %v", tc.limit, free, ok)
			}
			if ok {
				taken = append(taken, now)
				continue
			}
			if wait <= 0 || wait > tc.window+inFlightMargin(tc.window) {
				t.Fatalf("limit %d: refused with wait %s", tc.limit, wait)
			}
		}
		for i := range taken {
			n := 0
			for j := i; j < len(taken) && taken[j].Sub(taken[i]) < tc.window; j++ {
				n++
			}
			if n > tc.limit {
				t.Fatalf("limit %d per %s: %d calls in the window starting at call %d", tc.limit, tc.window, n, i)
			}
		}
		if len(taken) < tc.limit*5 {
			t.Errorf("limit %d: only %d of %d attempts allowed; the budget sits idle", tc.limit, len(taken), tc.limit*20)
		}
	}
}

func TestBudgetResizeKeepsRecentCalls(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	b := NewBudget(5, time.Minute, func() time.Time { return now })
	for i := 0; i < 5; i++ {
		if ok, _ := b.TryTake(); !ok {
			t.Fatal("refused inside the limit")
		}
	}
	b.Resize(3, time.Minute)
	if ok, _ := b.TryTake(); ok {
		t.Fatal("a smaller budget forgot the calls already made")
	}
	b.Resize(10, time.Minute)
	if free, _ := b.Free(); free != 7 {
		t.Fatalf("free = %d after growing to 10 with 3 on record, want 7", free)
	}
}
