package background

import (
	"runtime"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
)

// gatedMayWrite is a MayWrite that holds the call it is told to hold (by
// its order) until the test releases it, and says true to every other:
// how a test stops a scheduler loop inside its pass, where Stop must wait
// for it.
type gatedMayWrite struct {
	mu       sync.Mutex
	calls    int
	holdCall int
	entered  chan struct{}
	release  chan struct{}
}

func (g *gatedMayWrite) mayWrite() bool {
	g.mu.Lock()
	g.calls++
	held := g.calls == g.holdCall
	g.mu.Unlock()
	if held {
		close(g.entered)
		<-g.release
	}
	return true
}

// TestHoldRacingStartLeavesNoLoopBehind (review of issue 15): Hold is
// Stop, then, under the lock again, a new scheduler put in place. Stop
// releases the lock while it waits for the old loop to return, and a Start
// (Vault's Initialize) in that gap finds no scheduler and starts a loop;
// Hold then overwrites it without stopping it. That loop works the schedule
// behind the test's back for ever: Stop, and the backend's Clean, can no
// longer reach it. Deterministic: the old loop is held inside its pass (in
// MayWrite) until the new loop is running.
//
// On the code as reviewed it printed:
//
//	hold_test.go: a loop Start began while Hold waited for the old one
//	is still running after Stop: Hold replaced it without stopping it
func TestHoldRacingStartLeavesNoLoopBehind(t *testing.T) {
	gate := &gatedMayWrite{holdCall: 2, entered: make(chan struct{}), release: make(chan struct{})}
	engine := rotation.New(rotation.Config{Connect: unconfigured})
	w := New(Config{Engine: engine, Connect: unconfigured, MayWrite: gate.mayWrite, Budget: fullBudget{}})
	s := &logical.InmemStorage{}

	w.Start(s) // MayWrite call 1; the loop's first pass makes call 2 and is held there
	<-gate.entered
	first := w.current()

	held := make(chan struct{})
	go func() {
		defer close(held)
		w.Hold(s)
	}()
	// Hold's Stop has taken the old loop out and waits for it to return.
	for w.current() == first {
		runtime.Gosched()
	}

	w.Start(s) // Initialize, now: a new loop starts
	second := w.current()
	if second == nil || second == first {
		t.Fatal("Start started no loop while Hold waited")
	}
	close(gate.release)
	<-held

	w.Stop()
	select {
	case <-second.done:
	default:
		t.Error("a loop Start began while Hold waited for the old one is still running after Stop: Hold replaced it without stopping it")
		second.stop() // leave nothing running behind the test
	}
}

// current is the Worker's scheduler, read under its lock.
func (w *Worker) current() *scheduler {
	w.schedMu.Lock()
	defer w.schedMu.Unlock()
	return w.scheduler
}
