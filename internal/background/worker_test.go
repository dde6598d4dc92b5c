package background

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
)

// unconfigured connects to nothing: a mount whose config is not written.
func unconfigured(context.Context, logical.Storage) (rotation.Conn, error) {
	return rotation.Conn{}, errors.New("not configured")
}

type fullBudget struct{}

func (fullBudget) Limit() (int, time.Duration) { return 600, 5 * time.Minute }
func (fullBudget) Free() (int, time.Duration)  { return 600, 0 }

func newWorker(mayWrite bool) *Worker {
	engine := rotation.New(rotation.Config{Connect: unconfigured})
	return New(Config{Engine: engine, Connect: unconfigured, MayWrite: func() bool { return mayWrite }, Budget: fullBudget{}})
}

// TestStopEndsTheLoop: Stop (the backend's Clean, at unmount or when the
// plugin stops) returns only once the scheduler's loop has returned, and a
// Worker without a loop has no pass to run.
func TestStopEndsTheLoop(t *testing.T) {
	w := newWorker(true)
	w.Start(&logical.InmemStorage{})
	w.schedMu.Lock()
	sc := w.scheduler
	w.schedMu.Unlock()
	if sc == nil {
		t.Fatal("Start started no scheduler on a node that may write")
	}
	w.Stop()
	select {
	case <-sc.done:
	default:
		t.Fatal("the scheduler loop is still running after Stop returned")
	}
	if _, ok := w.Pass(context.Background()); ok {
		t.Error("a pass ran after Stop")
	}
}

// TestAStandbyRunsNoScheduler: a performance standby or secondary forwards
// writes and may not change storage; it starts no scheduler and its
// periodic pass does nothing.
func TestAStandbyRunsNoScheduler(t *testing.T) {
	w := newWorker(false)
	w.Start(&logical.InmemStorage{})
	if _, ok := w.Pass(context.Background()); ok {
		t.Fatal("a standby started a scheduler")
	}
	if err := w.Periodic(context.Background(), &logical.InmemStorage{}); err != nil {
		t.Fatalf("a standby's periodic pass: %v", err)
	}
}
