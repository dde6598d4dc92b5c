package rotation

import (
	"runtime"
	"sync"
	"testing"
)

// TestTunnelLocksAreOwnAndForgotten: one tunnel's lock never blocks
// another's, a held lock refuses a second taker until released, and a lock
// nobody holds or waits for is forgotten, so memory follows the tunnels in
// use. Many goroutines on a few tunnels prove mutual exclusion under -race.
func TestTunnelLocksAreOwnAndForgotten(t *testing.T) {
	l := newTunnelLocks()
	unlockA := l.lock("a")
	if _, ok := l.tryLock("a"); ok {
		t.Fatal("a held lock was taken twice")
	}
	unlockB, ok := l.tryLock("b")
	if !ok {
		t.Fatal("another key's lock is taken while a is held")
	}
	unlockB()
	unlockA()
	if n := l.size(); n != 0 {
		t.Fatalf("%d locks remembered after every holder released", n)
	}

	const workers, rounds = 16, 200
	counters := map[string]*int{"x": new(int), "y": new(int), "z": new(int)}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				key := []string{"x", "y", "z"}[(w+i)%3]
				if i%2 == 0 {
					unlock := l.lock(key)
					*counters[key]++ // a data race here if two hold one key
					unlock()
					continue
				}
				if unlock, ok := l.tryLock(key); ok {
					*counters[key]++
					unlock()
				}
			}
		}(w)
	}
	wg.Wait()
	if n := l.size(); n != 0 {
		t.Fatalf("%d locks remembered after every holder released", n)
	}
	if *counters["x"]+*counters["y"]+*counters["z"] < workers*rounds/2 {
		t.Fatal("blocking lock calls were lost")
	}
}

// TestAHeldTunnelLockHandsOverToItsWaiter a waiter
// counted on a held lock keeps it from being forgotten when its holder
// releases; a failed tryLock leaves no reference behind; once the waiter
// releases, nothing is remembered. Waiting is observed through the lock's
// reference count, not through time.
func TestAHeldTunnelLockHandsOverToItsWaiter(t *testing.T) {
	l := newTunnelLocks()
	unlockA := l.lock("k")
	got := make(chan func())
	go func() { got <- l.lock("k") }()
	for {
		l.mu.Lock()
		refs := l.locks["k"].refs
		l.mu.Unlock()
		if refs == 2 {
			break
		}
		// The waiter has not counted itself in yet.
		runtime.Gosched()
	}
	if _, ok := l.tryLock("k"); ok {
		t.Fatal("tryLock took a held lock")
	}
	l.mu.Lock()
	refs := l.locks["k"].refs
	l.mu.Unlock()
	if refs != 2 {
		t.Fatalf("refs = %d after a failed tryLock, want 2 (holder and waiter)", refs)
	}
	unlockA()
	unlockB := <-got
	if l.size() != 1 {
		t.Fatalf("%d locks remembered while the waiter holds one, want 1", l.size())
	}
	if _, ok := l.tryLock("k"); ok {
		t.Fatal("the waiter's lock was forgotten and made anew: two holders")
	}
	unlockB()
	if l.size() != 0 {
		t.Fatalf("%d locks remembered after every holder released", l.size())
	}
}
