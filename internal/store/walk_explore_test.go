package store

import (
	"context"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// walkCtxKey marks the walk's context, so that storage hooks fire only
// for the walk's own listings and reads, never inside a writer.
type walkCtxKey struct{}

// explored is storage for TestWalkExploreWalkInterleavings: every record
// write it is told of is parked after it is stored; the walk's listings
// (after they are made) and record reads (before) call hook.
type explored struct {
	logical.Storage
	mu    sync.Mutex
	parks map[string]*gate
	hook  func(op, key string)
	// faults: the next write of a key fails ("stored": stored, then an
	// error; "refused": not stored), and the walk's next record listing
	// fails (failList).
	faults   map[string]string
	failList bool
}

func (e *explored) fault(key string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	f := e.faults[key]
	delete(e.faults, key)
	return f
}

func (e *explored) park(key string) *gate {
	e.mu.Lock()
	defer e.mu.Unlock()
	g := newGate()
	e.parks[key] = g
	return g
}

func (e *explored) parked(key string) {
	e.mu.Lock()
	g := e.parks[key]
	delete(e.parks, key)
	e.mu.Unlock()
	if g != nil {
		close(g.reached)
		<-g.release
	}
}

func (e *explored) Put(ctx context.Context, entry *logical.StorageEntry) error {
	f := e.fault(entry.Key)
	var err error
	if f != "refused" {
		err = e.Storage.Put(ctx, entry)
	}
	e.parked(entry.Key)
	if f != "" {
		return fmt.Errorf("injected: %s", f)
	}
	return err
}

func (e *explored) Delete(ctx context.Context, key string) error {
	f := e.fault(key)
	var err error
	if f != "refused" {
		err = e.Storage.Delete(ctx, key)
	}
	e.parked(key)
	if f != "" {
		return fmt.Errorf("injected: %s", f)
	}
	return err
}

func (e *explored) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	if ctx.Value(walkCtxKey{}) != nil && strings.HasPrefix(key, PSKPrefix) && e.hook != nil {
		e.hook("get", key)
	}
	return e.Storage.Get(ctx, key)
}

func (e *explored) List(ctx context.Context, prefix string) ([]string, error) {
	out, err := e.Storage.List(ctx, prefix)
	if ctx.Value(walkCtxKey{}) != nil && e.hook != nil {
		switch {
		case strings.HasPrefix(prefix, PSKPrefix):
			e.hook("list", prefix)
			e.mu.Lock()
			fail := e.failList
			e.failList = false
			e.mu.Unlock()
			if fail {
				return nil, fmt.Errorf("injected: list %s failed", prefix)
			}
		case strings.HasPrefix(prefix, AttentionPrefix):
			// The walk has counted every record and checks the index,
			// taking each entry's stripe: every write is let go first.
			e.hook("index", prefix)
		}
	}
	return out, err
}

// inflight is a record write stored and parked before it is counted.
type inflight struct {
	g     *gate
	done  chan error
	fault string
}

// TestWalkExploreWalkInterleavings: seeded random schedules of record
// writes and deletes (each parked between storing and counting, released
// at a chosen moment: between steps, just after a listing, just before a
// record read), through a background and a request storage, with walk
// steps of 1 to 3 records, over counts first made wrong behind the
// census's back. At the end, with every write counted, the counts must be
// what storage holds, and exact. Tunnels have stripes of their own, so
// that a parked writer never blocks the walk (sharing is
// TestWalkTunnelsSharingAStripe).
func TestWalkExploreWalkInterleavings(t *testing.T) {
	exploreWalk(t, false)
}

// TestWalkExploreWalkInterleavingsWithFaults: the same, with storage
// faults (a record write stored and then said to fail, one refused, a
// failed listing of the walk) and walks started again at random. Whatever
// the counts say to be exact must be what storage holds; and a walk after
// the faults makes them exact.
func TestWalkExploreWalkInterleavingsWithFaults(t *testing.T) {
	exploreWalk(t, true)
}

func exploreWalk(t *testing.T, faults bool) {
	ctx := context.Background()
	walkCtx := context.WithValue(ctx, walkCtxKey{}, true)
	probe := newTestCensus(censusBase)
	var tunnels []Tunnel
	seen := map[*censusStripe]bool{}
	for i := 0; len(tunnels) < 10; i++ {
		if tun := tunnelOf(i); !seen[probe.stripe(tun)] {
			seen[probe.stripe(tun)] = true
			tunnels = append(tunnels, tun)
		}
	}
	seeds := 400
	if testing.Short() {
		seeds = 50
	}
	for seed := int64(1); seed <= int64(seeds); seed++ {
		rng := rand.New(rand.NewSource(seed))
		e := &explored{Storage: &logical.InmemStorage{}, parks: map[string]*gate{}, faults: map[string]string{}}
		c := newTestCensus(censusBase)
		bg := c.Observe(e)
		req := c.ObserveRequest(e)
		for i := 0; i < 6; i++ {
			tun := tunnels[rng.Intn(len(tunnels))]
			if err := WriteRecord(ctx, bg, tun, randomRecord(rng, tun)); err != nil {
				t.Fatal(err)
			}
		}
		for i := 0; i < 4; i++ { // behind the census's back
			tun := tunnels[rng.Intn(len(tunnels))]
			if rng.Intn(3) == 0 {
				_ = e.Storage.Delete(ctx, tun.StorageKey())
			} else if err := WriteRecord(ctx, e.Storage, tun, randomRecord(rng, tun)); err != nil {
				t.Fatal(err)
			}
		}
		flying := map[Tunnel]*inflight{}
		var trace []string
		start := func(reading Tunnel) {
			var free []Tunnel
			for _, tun := range tunnels {
				if flying[tun] == nil && tun != reading {
					free = append(free, tun)
				}
			}
			if len(free) == 0 {
				return
			}
			tun := free[rng.Intn(len(free))]
			s := bg
			if rng.Intn(2) == 0 {
				s = req
				if rng.Intn(2) == 0 {
					_, _ = ReadRecord(ctx, s, tun) // the memo
				}
			}
			del := rng.Intn(3) == 0
			rec := randomRecord(rng, tun)
			fault := ""
			if faults && rng.Intn(6) == 0 {
				fault = []string{"stored", "refused"}[rng.Intn(2)]
				e.faults[tun.StorageKey()] = fault
			}
			f := &inflight{g: e.park(tun.StorageKey()), done: make(chan error, 1)}
			go func() {
				if del {
					f.done <- s.Delete(ctx, tun.StorageKey())
				} else {
					f.done <- WriteRecord(ctx, s, tun, rec)
				}
			}()
			<-f.g.reached
			flying[tun] = f
			f.fault = fault
			trace = append(trace, fmt.Sprintf("stored %s del=%v fault=%q", tun.TunnelID[28:], del, fault))
		}
		counted := func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.walk == nil || c.walk.counted
		}
		release := func(all bool) {
			for _, tun := range tunnels {
				if f := flying[tun]; f != nil && (all || rng.Intn(2) == 0) {
					close(f.g.release)
					if err := <-f.done; (err != nil) != (f.fault != "") {
						t.Fatalf("seed %d: write of %s (fault %q): %v", seed, tun, f.fault, err)
					}
					delete(flying, tun)
					trace = append(trace, "counted "+tun.TunnelID[28:])
					if !all {
						return
					}
				}
			}
		}
		// calm: after many steps no new write starts, nor a new walk, so
		// that writes kept in flight step after step cannot starve it.
		calm := false
		act := func(reading Tunnel) {
			for n := rng.Intn(3); n > 0; n-- {
				if rng.Intn(2) == 0 && !counted() && !calm {
					start(reading)
				} else {
					release(false)
				}
			}
		}
		e.hook = func(op, key string) {
			var reading Tunnel
			if op == "get" {
				reading, _ = recordTunnel(key)
			}
			trace = append(trace, op+" "+key[len(key)-4:])
			if op == "index" {
				release(true)
				return
			}
			act(reading)
		}
		act(Tunnel{})
		c.StartWalk()
		for steps := 0; ; steps++ {
			if steps > 500 {
				c.mu.Lock()
				w := *c.walk
				c.mu.Unlock()
				var changing []string
				for i := range c.stripes {
					if p := c.stripes[i].changing.Load(); p != nil {
						changing = append(changing, p.TunnelID[28:])
					}
				}
				var inFlight []string
				for tun := range flying {
					inFlight = append(inFlight, tun.TunnelID[28:])
				}
				t.Fatalf("seed %d: the walk did not finish: batch %v cursor %v complete %v counted %v; stripes changing %v; writes in flight %v; last of the trace:\n%s",
					seed, w.batch, w.cursor, w.complete, w.counted, changing, inFlight, strings.Join(trace[max(0, len(trace)-30):], "\n"))
			}
			calm = steps > 200
			if faults && !calm && rng.Intn(20) == 0 {
				c.StartWalk()
				trace = append(trace, "start walk")
			}
			if faults && !calm && rng.Intn(8) == 0 {
				e.failList = true
			}
			done, err := c.WalkStep(walkCtx, bg, 1+rng.Intn(3), nil)
			if err != nil && !(faults && strings.Contains(err.Error(), "injected")) {
				t.Fatal(err)
			}
			if err != nil {
				trace = append(trace, "step: "+err.Error())
			}
			trace = append(trace, fmt.Sprintf("step done=%v", done))
			if done {
				break
			}
			act(Tunnel{})
		}
		e.hook = nil
		for _, tun := range tunnels {
			if f := flying[tun]; f != nil {
				close(f.g.release)
				if err := <-f.done; (err != nil) != (f.fault != "") {
					t.Fatalf("seed %d: write of %s (fault %q): %v", seed, tun, f.fault, err)
				}
			}
		}
		view, err := c.View(ctx, bg)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := truth(t, e.Storage)
		if diff := sameCounts(view.Counts, want); diff != "" && view.Exact || !faults && !view.Exact {
			t.Fatalf("seed %d: exact %v: %s\n%s", seed, view.Exact, diff, strings.Join(trace, "\n"))
		}
		if faults {
			c.StartWalk()
			finishWalk(t, c, bg, 5, 20)
			exactly(t, c, bg, e.Storage, true, fmt.Sprintf("seed %d: a walk after the faults", seed))
		}
	}
}
