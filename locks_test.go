package main

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// neighbourOf returns a tunnel of t's account that is not t but that a
// striped lock set of locksutil's size would give t's lock: the two share a
// lock only if the engine's locks are striped.
func neighbourOf(t *testing.T, of store.Tunnel) store.Tunnel {
	t.Helper()
	want := locksutil.LockIndexForKey(of.StorageKey())
	for i := 0; i < 100000; i++ {
		n := store.Tunnel{AccountID: of.AccountID, TunnelID: cloudflaresim.NewID()}
		if locksutil.LockIndexForKey(n.StorageKey()) == want {
			return n
		}
	}
	t.Fatal("no tunnel id shares a lock stripe with the test tunnel")
	return store.Tunnel{}
}

// unresolvedButUnchanged leaves the test tunnel rotation_unknown past its
// settle window while the edge still uses the stored key: the next
// reconciliation, wherever it comes from, makes it current again without a
// new key.
func unresolvedButUnchanged(t *testing.T, env *testEnv) {
	t.Helper()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 502})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the faulted rotation succeeded")
	}
	env.clock.Advance(time.Hour)
}

// TestAnotherTunnelsRotationDoesNotHideThisOne: the tunnel locks were 256
// hashed stripes, and reads and the background only try a lock, so a tunnel
// was skipped, and its reader told "a rotation of this tunnel is in
// progress", whenever any other tunnel in its stripe was rotating (during a
// bulk job, most of them). A tunnel's lock is its own.
func TestAnotherTunnelsRotationDoesNotHideThisOne(t *testing.T) {
	for _, via := range []string{"read", "metadata read", "background pass"} {
		t.Run(via, func(t *testing.T) {
			env := newConfiguredEnv(t)
			unresolvedButUnchanged(t, env)
			self := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
			unlock := env.b.lockTunnel(neighbourOf(t, self))
			defer unlock()

			var warnings []string
			switch via {
			case "read":
				warnings = env.must(env.request(logical.ReadOperation, env.pskPath(), nil)).Warnings
			case "metadata read":
				warnings = env.must(env.request(logical.ReadOperation, env.metaPath(), nil)).Warnings
			case "background pass":
				backgroundPass(t, env)
			}
			if strings.Contains(strings.Join(warnings, " "), "in progress") {
				t.Errorf("told that a rotation of this tunnel is in progress while another tunnel rotates: %v", warnings)
			}
			rec, err := store.ReadRecord(context.Background(), env.storage, self)
			if err != nil || rec == nil {
				t.Fatalf("record: %v, %v", rec, err)
			}
			if rec.State != store.StateCurrent || rec.PSK != env.edge().PSK {
				t.Fatalf("state %s after the %s: the tunnel was skipped because another tunnel held a shared lock", rec.State, via)
			}
		})
	}
}

// TestTheDriftSweepDoesNotSkipATunnelWhoseNeighbourRotates: the sweep tried
// each tunnel's lock and passed over it when the lock was taken, and then
// marked itself done, so drift on a tunnel that merely shared a lock stripe
// with a rotating one waited another drift_check_interval.
func TestTheDriftSweepDoesNotSkipATunnelWhoseNeighbourRotates(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	self := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
	unlock := env.b.lockTunnel(neighbourOf(t, self))
	defer unlock()

	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	rec, err := store.ReadRecord(context.Background(), env.storage, self)
	if err != nil || rec == nil {
		t.Fatalf("record: %v, %v", rec, err)
	}
	if rec.State != store.StateCurrent || rec.PSK != env.edge().PSK {
		t.Fatalf("state %s, stored key is the edge's: %v: the sweep skipped a tunnel whose lock stripe another tunnel held",
			rec.State, rec.PSK == env.edge().PSK)
	}
}

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
