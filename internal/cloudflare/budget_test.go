package cloudflare

import (
	"math/rand"
	"sync"
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

// TestBudgetObserve plays Cloudflare's counts (Observe) against the
// budget's own cap. After each step Free must report the smaller of the
// two, and when that is none, TryTake must refuse with the same wait.
func TestBudgetObserve(t *testing.T) {
	type step struct {
		advance  time.Duration
		observe  bool
		remain   int
		reset    time.Duration
		take     int // calls taken, each of which must be allowed
		wantFree int
		wantWait time.Duration
	}
	obs := func(remain int, reset time.Duration, wantFree int, wantWait time.Duration) step {
		return step{observe: true, remain: remain, reset: reset, wantFree: wantFree, wantWait: wantWait}
	}
	cases := []struct {
		name  string
		limit int
		steps []step
	}{
		// While Cloudflare's count binds, Free says when its window resets.
		{"Cloudflare has less left than the cap", 100, []step{
			obs(3, time.Minute, 3, time.Minute),
			{take: 2, wantFree: 1, wantWait: time.Minute},
			{take: 1, wantFree: 0, wantWait: time.Minute},
			{advance: 30 * time.Second, wantFree: 0, wantWait: 30 * time.Second},
			// The reset passed: only the cap counts again.
			{advance: 30 * time.Second, wantFree: 97},
		}},
		{"nothing left", 100, []step{
			obs(0, 30*time.Second, 0, 30*time.Second),
			{advance: 30 * time.Second, wantFree: 100},
		}},
		{"the cap is tighter", 10, []step{
			obs(50, time.Minute, 10, 0),
			{take: 10, wantFree: 0, wantWait: time.Minute + inFlightMargin(time.Minute)},
		}},
		{"both spent: the later wait", 2, []step{
			{take: 2, wantFree: 0, wantWait: time.Minute + inFlightMargin(time.Minute)},
			obs(0, 5*time.Minute, 0, 5*time.Minute),
		}},
		{"no cap still follows Cloudflare", 0, []step{
			obs(2, time.Minute, 2, time.Minute),
			{take: 2, wantFree: 0, wantWait: time.Minute},
			{advance: time.Minute, wantFree: 1 << 30},
		}},
		{"a newer answer replaces an older one", 100, []step{
			obs(3, time.Minute, 3, time.Minute),
			obs(40, 2*time.Minute, 40, 2*time.Minute),
			{take: 1, wantFree: 39, wantWait: 2 * time.Minute},
		}},
		{"reset past the bound", 100, []step{
			obs(0, 100*365*24*time.Hour, 0, wantMaxBlock),
			{advance: wantMaxBlock, wantFree: 100},
		}},
		{"unusable counts are ignored", 100, []step{
			obs(-1, time.Minute, 100, 0),
			obs(5, 0, 100, 0),
			obs(5, -time.Second, 100, 0),
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			now := time.Unix(1_700_000_000, 0)
			b := NewBudget(tc.limit, time.Minute, func() time.Time { return now })
			for i, s := range tc.steps {
				now = now.Add(s.advance)
				if s.observe {
					b.Observe(s.remain, s.reset)
				}
				for j := 0; j < s.take; j++ {
					if ok, wait := b.TryTake(); !ok {
						t.Fatalf("step %d: call %d refused (wait %s)", i, j+1, wait)
					}
				}
				free, wait := b.Free()
				if free != s.wantFree || wait != s.wantWait {
					t.Fatalf("step %d: Free() = %d, %s; want %d, %s", i, free, wait, s.wantFree, s.wantWait)
				}
				if free == 0 {
					if ok, wait := b.TryTake(); ok || wait != s.wantWait {
						t.Fatalf("step %d: TryTake() = %v, %s after Free() = 0, %s", i, ok, wait, s.wantWait)
					}
				}
			}
		})
	}
}

// TestBudgetObserveCountsCallsInFlight: an answer counts the call it
// answers, perhaps not those sent after it, so they are still subtracted;
// and an answer that arrives after a newer one is ignored.
func TestBudgetObserveCountsCallsInFlight(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	b := NewBudget(100, time.Minute, func() time.Time { return now })
	first, err := b.take()
	if err != nil {
		t.Fatal(err)
	}
	second, err := b.take() // sent before the first's answer arrived
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		seq      uint64
		remain   int
		wantFree int
	}{
		{first, 10, 9},   // the second call may not be in Cloudflare's 10
		{second, 8, 8},   // now it is
		{first, 10, 8},   // late: older than what is known
		{second, 50, 50}, // the same call's answer again: the latest word
	}
	for i, s := range steps {
		b.observe(s.seq, s.remain, time.Minute)
		if free, _ := b.Free(); free != s.wantFree {
			t.Fatalf("step %d: Free() = %d, want %d", i, free, s.wantFree)
		}
	}
}

// TestBudgetIsSafeForConcurrentUse takes, observes and reads from many
// goroutines at once, for the race detector.
func TestBudgetIsSafeForConcurrentUse(t *testing.T) {
	b := NewBudget(1000, time.Minute, nil)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				if seq, err := b.take(); err == nil {
					b.observe(seq, 500-i, time.Minute)
				}
				b.Observe(400, time.Minute)
				b.Free()
				b.Resize(1000-i, time.Minute)
			}
		}()
	}
	wg.Wait()
	if free, _ := b.Free(); free > 400 {
		t.Errorf("Free() = %d after Cloudflare said at most 400 remain", free)
	}
}

// TestFreeSaysWhenCloudflaresWindowResets: when Cloudflare's count is what
// limits the calls, no call frees up before its window resets, so Free says
// when that is and a caller keeping a reserve sleeps instead of polling.
func TestFreeSaysWhenCloudflaresWindowResets(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	b := NewBudget(100, time.Minute, func() time.Time { return now })
	b.Observe(3, 40*time.Second)
	free, wait := b.Free()
	if free != 3 || wait != 40*time.Second {
		t.Fatalf("Free() = %d, %s; want 3, 40s (Cloudflare's count binds until its reset)", free, wait)
	}
	b.Observe(90, 40*time.Second)
	if free, wait := b.Free(); free != 90 || wait != 40*time.Second {
		t.Fatalf("Free() = %d, %s; want 90, 40s", free, wait)
	}
	b.Observe(200, 40*time.Second)
	if free, wait := b.Free(); free != 100 || wait != 0 {
		t.Fatalf("Free() = %d, %s; want 100, 0 (the cap binds, and frees as it goes)", free, wait)
	}
}

// TestBudgetUsedCountsTheCallsOfTheWindow: what a status read shows of the
// budget, the calls of the window that ends now, goes back down as calls
// leave the window.
func TestBudgetUsedCountsTheCallsOfTheWindow(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	b := NewBudget(10, time.Minute, func() time.Time { return now })
	for i := 0; i < 3; i++ {
		b.TryTake()
		now = now.Add(20 * time.Second)
	}
	if got := b.Used(); got != 3 {
		t.Fatalf("Used = %d right after three calls within a minute, want 3", got)
	}
	now = now.Add(5 * time.Second) // the first call left the window and its margin
	if got := b.Used(); got != 2 {
		t.Fatalf("Used = %d once the first call left the window, want 2", got)
	}
	if got := NewBudget(0, 0, nil).Used(); got != 0 {
		t.Fatalf("Used without a cap = %d, want 0", got)
	}
}
