package main

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// stuckEvents is an event bus that takes an event and does not answer
// until the test lets it: Vault's side of SendEvent slow or gone, at the
// moment a mount is unmounted or the plugin stops.
type stuckEvents struct {
	once    sync.Once
	taken   chan struct{}
	release chan struct{}
}

func (s *stuckEvents) SendEvent(ctx context.Context, _ logical.EventType, _ *logical.EventData) error {
	s.once.Do(func() { close(s.taken) })
	select {
	case <-s.release:
	case <-ctx.Done():
	}
	return ctx.Err()
}

// TestCleanDoesNotWaitForAnEventThatCannotLand (review of issue 15): Clean
// now waits for every rotation event on its way (34483e7, for a test's
// sake), and the events are sent with context.Background(), so nothing
// bounds that wait: an event bus that does not answer holds Clean (unmount,
// seal, plugin reload) for as long as it does not. Before the restructure
// Clean stopped the scheduler and returned; an event was fire and forget.
// The bound below is only the failure's: Clean that does not wait returns
// at once.
//
// On the code as reviewed it printed:
//
//	clean_test.go: Clean has not returned 10s after it was called: it waits
//	for a rotation event Vault's event bus does not take
func TestCleanDoesNotWaitForAnEventThatCannotLand(t *testing.T) {
	env := newConfiguredEnv(t)
	bus := &stuckEvents{taken: make(chan struct{}), release: make(chan struct{})}
	// Registered after newTestEnv's Cleanup, so it runs first: the test's
	// own Clean call then returns, whatever this one found.
	t.Cleanup(func() { close(bus.release) })
	conf := logical.TestBackendConfig()
	conf.StorageView, conf.Logger, conf.EventsSender = env.storage, env.b.Logger(), bus
	if err := env.b.Backend.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}

	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	<-bus.taken // the rotation's event is on its way, and stuck

	cleaned := make(chan struct{})
	go func() {
		defer close(cleaned)
		env.b.Cleanup(context.Background())
	}()
	select {
	case <-cleaned:
	case <-time.After(10 * time.Second):
		t.Error("Clean has not returned 10s after it was called: it waits for a rotation event Vault's event bus does not take")
	}
}

// TestTheDocsCheckHoldsWhereverTheRepositoryIsCloned (review of issue 15,
// the docs merge 5e7e70f): TestDocsNameNothingOutsideTheRepository takes
// the repository's parent directory for a path of this machine, and the
// README's example output names a file under /tmp (the log of make dev).
// A clone directly under /tmp (a CI workspace, a reviewer's scratch copy)
// therefore fails the unit suite though the docs did not change: the test
// judges where it runs, not what the docs say. Found running the root
// package from a copy of the tree in /tmp/rev15_mut.
//
// On the code as reviewed it printed:
//
//	docs_test.go:321: README.md:59 names "/tmp", which is outside the repository
func TestTheDocsCheckHoldsWhereverTheRepositoryIsCloned(t *testing.T) {
	clone, err := os.MkdirTemp("/tmp", "clone")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(clone) })
	for _, page := range markdownFiles(t) {
		b, err := os.ReadFile(page)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(clone, filepath.Dir(page)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(clone, page), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Chdir(clone)
	TestDocsNameNothingOutsideTheRepository(t)
}

// TestCleanStillStopsTheScheduler (review of issue 15): the restructure
// dropped TestCleanStopsTheScheduler, which held the backend's Clean to
// stopping the scheduler loop; TestStopEndsTheLoop (internal/background)
// holds only Worker.Stop. With Stop taken out of the backend's clean, the
// whole root package still passed (only this machine's docs check failed,
// see above). This passes on the code as reviewed: it puts the Clean path
// back under a test.
func TestCleanStillStopsTheScheduler(t *testing.T) {
	env := newConfiguredEnv(t)
	loop := startLoop(t, env)
	loop.asked(t) // the loop is running: its first pass has ended
	env.b.Cleanup(context.Background())
	if _, ok := env.b.background.Pass(context.Background()); ok {
		t.Error("a scheduler is still in place after Clean")
	}
}
