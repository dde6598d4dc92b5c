// Package background is the work that no request asks for: the scheduler,
// which rotates tunnels when their schedule or a bulk job says, and the
// periodic pass, which resolves lost outcomes and looks for keys changed
// outside this engine. It calls the rotation engine for every change to a
// tunnel, and spends Cloudflare calls only while the mount's budget keeps a
// reserve for operators' own requests.
package background

import (
	"context"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Budget is the mount's count of Cloudflare calls (*cloudflare.Budget).
type Budget interface {
	// Limit is the most calls in any window, and the window.
	Limit() (int, time.Duration)
	// Free is how many calls may be sent now, and, when none, how long
	// until one may (0: unknown).
	Free() (int, time.Duration)
}

// Config is what a Worker is made of.
type Config struct {
	Engine *rotation.Engine
	// Now is the clock; time.Now when nil.
	Now    func() time.Time
	Logger hclog.Logger
	// Connect is the engine's: the edge and settings of this moment.
	Connect func(ctx context.Context, s logical.Storage) (rotation.Conn, error)
	// MayWrite says whether this node may change storage (not a
	// performance standby or secondary): the background works only there.
	MayWrite func() bool
	Budget   Budget
	// After is how the scheduler sleeps, between passes and for the budget
	// within one, with time.After's contract; time.After when nil. A test
	// passes its own to see how long the scheduler means to sleep and to
	// wake it when it chooses.
	After func(d time.Duration) <-chan time.Time
	// Census counts the mount's tunnels (store.Census): the worker counts
	// its own writes through it, recounts in the scheduler's repair walk
	// and writes the counts down. Nil: one of the worker's own.
	Census *store.Census
}

// Worker is one mount's background work. It is safe for concurrent use.
type Worker struct {
	engine   *rotation.Engine
	now      func() time.Time
	logger   hclog.Logger
	connect  func(ctx context.Context, s logical.Storage) (rotation.Conn, error)
	mayWrite func() bool
	budget   Budget
	after    func(d time.Duration) <-chan time.Time
	census   *store.Census

	// schedMu guards scheduler, which runs on the node that may write
	// storage, from Start to Stop.
	schedMu   sync.Mutex
	scheduler *scheduler
	// jobsMu serialises updates of bulk job records.
	jobsMu sync.Mutex
	// driftMu guards lastDriftSweep, when the drift sweep (sweep.go) last
	// finished. It is memory only: a new process sweeps at once (the census
	// keeps it for status reads, on every node).
	driftMu        sync.Mutex
	lastDriftSweep time.Time
}

// New returns a Worker that does nothing until Start (the scheduler) or
// Periodic (the sweep) is called.
func New(cfg Config) *Worker {
	w := &Worker{engine: cfg.Engine, now: cfg.Now, logger: cfg.Logger, connect: cfg.Connect, mayWrite: cfg.MayWrite, budget: cfg.Budget, after: cfg.After, census: cfg.Census}
	if w.now == nil {
		w.now = time.Now
	}
	if w.after == nil {
		w.after = time.After
	}
	if w.logger == nil {
		w.logger = hclog.NewNullLogger()
	}
	if w.census == nil {
		w.census = store.NewCensus(store.CensusConfig{Now: w.now, Logger: w.logger, MayWrite: w.mayWrite})
	}
	return w
}

// observe is s with the worker's record writes counted by the census.
func (w *Worker) observe(s logical.Storage) logical.Storage {
	return w.census.Observe(s)
}

// Start starts the scheduler over s, on the node that may write. It keeps
// nothing in memory between passes: each pass reads what is due from
// storage, so a new process picks up where the last one stopped.
func (w *Worker) Start(s logical.Storage) {
	if !w.mayWrite() {
		return
	}
	w.schedMu.Lock()
	defer w.schedMu.Unlock()
	if w.scheduler == nil {
		w.scheduler = newScheduler(w, w.observe(s))
		w.scheduler.start()
	}
}

// Stop stops the scheduler, the rotation in progress included, and waits
// for it (unmount, or the plugin stopping).
func (w *Worker) Stop() {
	w.schedMu.Lock()
	sc := w.scheduler
	w.scheduler = nil
	w.schedMu.Unlock()
	if sc != nil {
		sc.stop()
	}
}

// Hold stops the scheduler and puts one over s in its place that runs only
// when Pass is called: tests work the schedule one pass at a time, with
// nothing working it behind their back.
func (w *Worker) Hold(s logical.Storage) {
	// The held scheduler takes the running one's place in one step, so
	// that a Start while the old loop winds down finds a scheduler there
	// and starts no loop nothing could stop.
	w.schedMu.Lock()
	running := w.scheduler
	w.scheduler = newScheduler(w, w.observe(s))
	w.schedMu.Unlock()
	if running != nil {
		running.stop()
	}
}

// Pass runs one scheduler pass now, as the loop would, and returns how
// long the loop would sleep after it; false when there is no scheduler.
func (w *Worker) Pass(ctx context.Context) (time.Duration, bool) {
	w.schedMu.Lock()
	sc := w.scheduler
	w.schedMu.Unlock()
	if sc == nil {
		return 0, false
	}
	return sc.pass(ctx), true
}

// Poke wakes the scheduler after rotations were queued.
func (w *Worker) Poke() {
	w.schedMu.Lock()
	defer w.schedMu.Unlock()
	if w.scheduler != nil {
		w.scheduler.poke()
	}
}
