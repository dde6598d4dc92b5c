package store

// The walk under record writes in flight (walk.go's top comment), from the
// skeptic's review of the fix that makes it read such a record only once
// its change is counted: sequences that try to make the walk's final
// counts differ from what storage holds, or make it wait forever. Every
// sequence is fixed by channels (storage operations parked after they are
// made), never by timing.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// gate parks an operation: reached is closed when it gets there, and it
// goes on when release is closed.
type gate struct{ reached, release chan struct{} }

func newGate() *gate { return &gate{reached: make(chan struct{}), release: make(chan struct{})} }

// gated is storage whose operations on chosen keys can be parked after
// they are made, fail, or panic; and whose List can fail once.
type gated struct {
	logical.Storage
	mu          sync.Mutex
	afterDelete map[string]*gate
	afterPut    map[string]*gate
	deleteErr   map[string]error  // fails without deleting
	putErr      map[string]error  // stores, then fails
	deletePanic map[string]bool   // deletes, then panics
	listErr     map[string]error  // one List of that prefix fails
	beforeGet   map[string]func() // called once before a Get of the key
}

func newGated() *gated {
	return &gated{Storage: &logical.InmemStorage{}, afterDelete: map[string]*gate{}, afterPut: map[string]*gate{},
		deleteErr: map[string]error{}, putErr: map[string]error{}, deletePanic: map[string]bool{}, listErr: map[string]error{}, beforeGet: map[string]func(){}}
}

func (g *gated) parkDelete(key string) *gate {
	g.mu.Lock()
	defer g.mu.Unlock()
	p := newGate()
	g.afterDelete[key] = p
	return p
}

func (g *gated) parkPut(key string) *gate {
	g.mu.Lock()
	defer g.mu.Unlock()
	p := newGate()
	g.afterPut[key] = p
	return p
}

func (g *gated) Delete(ctx context.Context, key string) error {
	g.mu.Lock()
	p, fail, boom := g.afterDelete[key], g.deleteErr[key], g.deletePanic[key]
	delete(g.afterDelete, key)
	delete(g.deleteErr, key)
	delete(g.deletePanic, key)
	g.mu.Unlock()
	if fail != nil {
		return fail
	}
	err := g.Storage.Delete(ctx, key)
	if boom {
		panic("injected: storage panicked after deleting")
	}
	if p != nil {
		close(p.reached)
		<-p.release
	}
	return err
}

func (g *gated) Put(ctx context.Context, e *logical.StorageEntry) error {
	g.mu.Lock()
	p, fail := g.afterPut[e.Key], g.putErr[e.Key]
	delete(g.afterPut, e.Key)
	delete(g.putErr, e.Key)
	g.mu.Unlock()
	err := g.Storage.Put(ctx, e)
	if p != nil {
		close(p.reached)
		<-p.release
	}
	if fail != nil {
		return fail
	}
	return err
}

func (g *gated) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	g.mu.Lock()
	f := g.beforeGet[key]
	delete(g.beforeGet, key)
	g.mu.Unlock()
	if f != nil {
		f()
	}
	return g.Storage.Get(ctx, key)
}

func (g *gated) List(ctx context.Context, prefix string) ([]string, error) {
	g.mu.Lock()
	fail := g.listErr[prefix]
	delete(g.listErr, prefix)
	g.mu.Unlock()
	if fail != nil {
		return nil, fail
	}
	return g.Storage.List(ctx, prefix)
}

func currentRecord(tun Tunnel) *Record {
	return &Record{AccountID: tun.AccountID, TunnelID: tun.TunnelID, PSK: "k", Version: 1, State: StateCurrent, StoredAt: censusBase}
}

func staleRecord(tun Tunnel) *Record {
	return &Record{AccountID: tun.AccountID, TunnelID: tun.TunnelID, PSK: "k", Version: 2, State: StateStale, StateReason: "edge differs", StoredAt: censusBase}
}

// writeAll stores a current record for each tunnel through s.
func writeAll(t *testing.T, s logical.Storage, tunnels ...Tunnel) {
	t.Helper()
	for _, tun := range tunnels {
		if err := WriteRecord(context.Background(), s, tun, currentRecord(tun)); err != nil {
			t.Fatal(err)
		}
	}
}

// async runs f in a goroutine; the returned channel gives its error.
func async(f func() error) chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

// step is one WalkStep that must not fail.
func step(t *testing.T, c *Census, s logical.Storage, n int) bool {
	t.Helper()
	done, err := c.WalkStep(context.Background(), s, n, nil)
	if err != nil {
		t.Fatal(err)
	}
	return done
}

// finishWalk steps the walk to its end, failing if it takes more than
// limit steps.
func finishWalk(t *testing.T, c *Census, s logical.Storage, n, limit int) {
	t.Helper()
	for i := 0; ; i++ {
		if i == limit {
			t.Fatalf("the walk did not finish in %d steps", limit)
		}
		if step(t, c, s, n) {
			return
		}
	}
}

// exactly fails unless the census counts what raw holds and says so
// (exact) or says it may not (!exact).
func exactly(t *testing.T, c *Census, s, raw logical.Storage, exact bool, when string) {
	t.Helper()
	view, err := c.View(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := truth(t, raw)
	if diff := sameCounts(view.Counts, want); diff != "" && (view.Exact || exact) {
		t.Fatalf("%s: %s (exact %v)", when, diff, view.Exact)
	}
	if view.Exact != exact {
		t.Fatalf("%s: exact %v, want %v", when, view.Exact, exact)
	}
}

// distinctStripes fails unless each tunnel has a stripe of its own.
func distinctStripes(t *testing.T, c *Census, tunnels ...Tunnel) {
	t.Helper()
	seen := map[*censusStripe]Tunnel{}
	for _, tun := range tunnels {
		if u, ok := seen[c.stripe(tun)]; ok {
			t.Fatalf("%s and %s share a stripe: pick others", tun, u)
		}
		seen[c.stripe(tun)] = tun
	}
}

// TestWalkADeleteInFlightAcrossTwoListings: x is deleted from storage
// (not yet counted) before the walk's first listing, which stops short of
// x; the second listing, which covers x's place, does not list it, and
// the walk reads past it; only then is the deletion counted. Walked one
// record a step. Also: the step that finds only x left waits (false, nil)
// instead of blocking. Passes: the second listing adds x (still changing),
// and the walk reads it after the change is counted.
func TestWalkADeleteInFlightAcrossTwoListings(t *testing.T) {
	ctx := context.Background()
	g := newGated()
	c := newTestCensus(censusBase)
	s := c.Observe(g)
	a, b, x, d := tunnelOf(0), tunnelOf(3), tunnelOf(6), tunnelOf(9)
	distinctStripes(t, c, a, b, x, d)
	writeAll(t, s, a, b, x, d)
	p := g.parkDelete(x.StorageKey())
	deleted := async(func() error { return s.Delete(ctx, x.StorageKey()) })
	<-p.reached
	c.StartWalk()
	step(t, c, s, 1) // lists a; x beyond: not added
	step(t, c, s, 1) // lists b
	step(t, c, s, 1) // lists d (x is gone), adds x (changing); reads d
	if step(t, c, s, 1) {
		t.Fatal("the walk finished with x's deletion uncounted")
	}
	c.mu.Lock()
	batch := append([]Tunnel(nil), c.walk.batch...)
	c.mu.Unlock()
	if len(batch) != 1 || batch[0] != x {
		t.Fatalf("batch %v, want only x waiting", batch)
	}
	close(p.release)
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	finishWalk(t, c, s, 1, 10)
	exactly(t, c, s, g.Storage, true, "after the walk")
}

// TestWalkACreateStoredAfterTheListingCountedAfterTheWalkPassed: x is
// created in storage after the listing of its part of the keys (so not
// listed, and not changing at the listing's end), and the creation is
// counted only after the walk has read past it. Passes: the change is
// applied to the walk's count (cursor beyond x), once.
func TestWalkACreateStoredAfterTheListingCountedAfterTheWalkPassed(t *testing.T) {
	ctx := context.Background()
	g := newGated()
	c := newTestCensus(censusBase)
	s := c.Observe(g)
	a, x, d := tunnelOf(0), tunnelOf(6), tunnelOf(9)
	distinctStripes(t, c, a, x, d)
	writeAll(t, s, a, d)
	c.StartWalk()
	step(t, c, s, 1) // lists a, reads it
	// The walk lists d; just before it reads d, x is created in storage
	// (not listed, not changing when the listing ended), and parked.
	var created chan error
	p := g.parkPut(x.StorageKey())
	g.beforeGet[d.StorageKey()] = func() {
		created = async(func() error { return WriteRecord(ctx, s, x, staleRecord(x)) })
		<-p.reached
	}
	step(t, c, s, 1) // lists d; reads d
	if created == nil {
		t.Fatal("the walk did not read d")
	}
	close(p.release)
	if err := <-created; err != nil {
		t.Fatal(err)
	}
	finishWalk(t, c, s, 1, 10)
	exactly(t, c, s, g.Storage, true, "after the walk")
}

// TestWalkTheSameTunnelChangedAgainWhileTheWalkWaits: x deleted before
// the listing (parked), then, while the walk waits for it, created again
// (parked), deleted again: each change in flight across steps.
func TestWalkTheSameTunnelChangedAgainWhileTheWalkWaits(t *testing.T) {
	ctx := context.Background()
	g := newGated()
	c := newTestCensus(censusBase)
	s := c.Observe(g)
	a, x, d := tunnelOf(0), tunnelOf(6), tunnelOf(9)
	distinctStripes(t, c, a, x, d)
	writeAll(t, s, a, x, d)
	p := g.parkDelete(x.StorageKey())
	op := async(func() error { return s.Delete(ctx, x.StorageKey()) })
	<-p.reached
	c.StartWalk()
	if step(t, c, s, 10) { // reads a and d, waits for x
		t.Fatal("finished with x in flight")
	}
	close(p.release)
	if err := <-op; err != nil {
		t.Fatal(err)
	}
	p = g.parkPut(x.StorageKey())
	op = async(func() error { return WriteRecord(ctx, s, x, staleRecord(x)) })
	<-p.reached
	if step(t, c, s, 10) {
		t.Fatal("finished with x in flight")
	}
	close(p.release)
	if err := <-op; err != nil {
		t.Fatal(err)
	}
	p = g.parkDelete(x.StorageKey())
	op = async(func() error { return s.Delete(ctx, x.StorageKey()) })
	<-p.reached
	if step(t, c, s, 10) {
		t.Fatal("finished with x in flight")
	}
	close(p.release)
	if err := <-op; err != nil {
		t.Fatal(err)
	}
	finishWalk(t, c, s, 10, 10)
	exactly(t, c, s, g.Storage, true, "after the walk")
}

// collidingWith is a tunnel of account 0 other than t under t's stripe.
func collidingWith(t *testing.T, c *Census, tun Tunnel, after bool) Tunnel {
	t.Helper()
	for i := 0; i < 100000; i += 3 {
		u := tunnelOf(i)
		if u != tun && c.stripe(u) == c.stripe(tun) && tun.less(u) == after {
			return u
		}
	}
	t.Fatal("no colliding tunnel")
	return Tunnel{}
}

// TestWalkTunnelsSharingAStripe: y, under x's stripe, is deleted before
// the listing and parked; the walk lists x (and adds y). Reading x needs
// the stripe y's writer holds, so the step blocks (as before the change)
// rather than waiting; once y's writer goes on, counts are exact. Then
// the other way round: x (first in key order) changing, y after it.
func TestWalkTunnelsSharingAStripe(t *testing.T) {
	ctx := context.Background()
	for _, yAfter := range []bool{true, false} {
		g := newGated()
		c := newTestCensus(censusBase)
		s := c.Observe(g)
		x := tunnelOf(3000)
		y := collidingWith(t, c, x, yAfter)
		writeAll(t, s, tunnelOf(0), x, y, tunnelOf(999999))
		p := g.parkDelete(y.StorageKey())
		op := async(func() error { return s.Delete(ctx, y.StorageKey()) })
		<-p.reached
		c.StartWalk()
		walked := async(func() error {
			for i := 0; i < 20; i++ {
				done, err := c.WalkStep(ctx, s, 10, nil)
				if err != nil || done {
					return err
				}
			}
			return errors.New("the walk did not finish in 20 steps")
		})
		close(p.release)
		if err := <-op; err != nil {
			t.Fatal(err)
		}
		if err := <-walked; err != nil {
			t.Fatal(err)
		}
		exactly(t, c, s, g.Storage, true, fmt.Sprintf("y after x %v", yAfter))
	}
}

// TestWalkAFailedOrPanickingWriteDoesNotHoldTheWalk: a Delete that
// fails, a Put that stores then fails, and a Delete whose storage panics
// after deleting (recovered by the caller) leave no tunnel marked
// changing: the walk finishes.
func TestWalkAFailedOrPanickingWriteDoesNotHoldTheWalk(t *testing.T) {
	ctx := context.Background()
	g := newGated()
	c := newTestCensus(censusBase)
	s := c.Observe(g)
	a, x, y, z := tunnelOf(0), tunnelOf(6), tunnelOf(9), tunnelOf(12)
	writeAll(t, s, a, x, y, z)
	g.deleteErr[x.StorageKey()] = errors.New("injected: refused")
	if err := s.Delete(ctx, x.StorageKey()); err == nil {
		t.Fatal("no error")
	}
	g.putErr[y.StorageKey()] = errors.New("injected: stored, but said no")
	if err := WriteRecord(ctx, s, y, staleRecord(y)); err == nil {
		t.Fatal("no error")
	}
	g.deletePanic[z.StorageKey()] = true
	func() {
		defer func() { _ = recover() }()
		_ = s.Delete(ctx, z.StorageKey())
	}()
	for i := range c.stripes {
		if p := c.stripes[i].changing.Load(); p != nil {
			t.Fatalf("stripe %d still says %s is changing", i, *p)
		}
	}
	c.StartWalk()
	finishWalk(t, c, s, 1, 20)
	// The walk read every record after those writes: exact again.
	exactly(t, c, s, g.Storage, true, "after the walk")
}

// TestWalkStartWalkWhileAWalkWaits: a walk waits for x's deletion; a new
// walk is started, lists while x is still in flight, and finishes after.
func TestWalkStartWalkWhileAWalkWaits(t *testing.T) {
	ctx := context.Background()
	g := newGated()
	c := newTestCensus(censusBase)
	s := c.Observe(g)
	a, x, d := tunnelOf(0), tunnelOf(6), tunnelOf(9)
	distinctStripes(t, c, a, x, d)
	writeAll(t, s, a, x, d)
	p := g.parkDelete(x.StorageKey())
	op := async(func() error { return s.Delete(ctx, x.StorageKey()) })
	<-p.reached
	c.StartWalk()
	if step(t, c, s, 10) {
		t.Fatal("finished with x in flight")
	}
	c.StartWalk()
	if step(t, c, s, 10) {
		t.Fatal("finished with x in flight")
	}
	close(p.release)
	if err := <-op; err != nil {
		t.Fatal(err)
	}
	finishWalk(t, c, s, 10, 10)
	exactly(t, c, s, g.Storage, true, "after the walk")
}

// TestWalkAListingFailsWhileADeleteIsInFlight: x's deletion is stored
// and parked; the listing of its part fails; the deletion is counted
// before the listing is tried again (variant: after).
func TestWalkAListingFailsWhileADeleteIsInFlight(t *testing.T) {
	ctx := context.Background()
	for _, countedBeforeRetry := range []bool{true, false} {
		g := newGated()
		c := newTestCensus(censusBase)
		s := c.Observe(g)
		a, b, x, d := tunnelOf(0), tunnelOf(3), tunnelOf(6), tunnelOf(9)
		distinctStripes(t, c, a, b, x, d)
		writeAll(t, s, a, b, x, d)
		c.StartWalk()
		step(t, c, s, 1) // a
		step(t, c, s, 1) // b
		p := g.parkDelete(x.StorageKey())
		op := async(func() error { return s.Delete(ctx, x.StorageKey()) })
		<-p.reached
		g.listErr[PSKPrefix+a.AccountID+"/"] = errors.New("injected: list failed")
		if _, err := c.WalkStep(ctx, s, 1, nil); err == nil {
			t.Fatal("the listing did not fail")
		}
		if countedBeforeRetry {
			close(p.release)
			if err := <-op; err != nil {
				t.Fatal(err)
			}
		}
		step(t, c, s, 1) // lists d (and x if still changing), reads d
		if !countedBeforeRetry {
			close(p.release)
			if err := <-op; err != nil {
				t.Fatal(err)
			}
		}
		finishWalk(t, c, s, 1, 10)
		exactly(t, c, s, g.Storage, true, fmt.Sprintf("counted before the retry %v", countedBeforeRetry))
	}
}

// TestWalkARequestsMemoWithADeleteInFlight: the deleting request's
// storage (ObserveRequest) read x first, so the census takes what x was
// from its memo; the deletion is stored before the listing and counted
// after the walk read past x.
func TestWalkARequestsMemoWithADeleteInFlight(t *testing.T) {
	ctx := context.Background()
	g := newGated()
	c := newTestCensus(censusBase)
	bg := c.Observe(g)
	req := c.ObserveRequest(g)
	a, x, d := tunnelOf(0), tunnelOf(6), tunnelOf(9)
	distinctStripes(t, c, a, x, d)
	writeAll(t, bg, a, x, d)
	if _, err := ReadRecord(ctx, req, x); err != nil {
		t.Fatal(err)
	}
	p := g.parkDelete(x.StorageKey())
	op := async(func() error { return req.Delete(ctx, x.StorageKey()) })
	<-p.reached
	c.StartWalk()
	if step(t, c, bg, 10) {
		t.Fatal("finished with x in flight")
	}
	close(p.release)
	if err := <-op; err != nil {
		t.Fatal(err)
	}
	finishWalk(t, c, bg, 10, 10)
	exactly(t, c, bg, g.Storage, true, "after the walk")
}
