package background

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// parkedDeletes is storage whose Delete of key removes it, then waits for
// release: stored, not yet counted.
type parkedDeletes struct {
	logical.Storage
	key              string
	reached, release chan struct{}
}

func (p *parkedDeletes) Delete(ctx context.Context, key string) error {
	err := p.Storage.Delete(ctx, key)
	if key == p.key {
		close(p.reached)
		<-p.release
	}
	return err
}

// TestWalkTheRepairWalkWaitsForAWriteInFlightAcrossPasses: with a record's deletion stored and not yet counted when the
// repair walk lists it, a scheduler pass's repairSchedule returns (it
// neither blocks nor ends the walk), a later pass finishes it once the
// deletion is counted, and the census then counts what storage holds,
// exact. Passes.
func TestWalkTheRepairWalkWaitsForAWriteInFlightAcrossPasses(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
	w := newWorker(true)
	w.now = func() time.Time { return now }
	raw := &logical.InmemStorage{}
	x := store.Tunnel{AccountID: "00000000000000000000000000000000", TunnelID: "00000000000000000000000000000006"}
	p := &parkedDeletes{Storage: raw, key: x.StorageKey(), reached: make(chan struct{}), release: make(chan struct{})}
	s := w.observe(p)
	for _, id := range []string{"00000000000000000000000000000001", x.TunnelID, "00000000000000000000000000000009"} {
		tun := store.Tunnel{AccountID: x.AccountID, TunnelID: id}
		rec := &store.Record{AccountID: tun.AccountID, TunnelID: tun.TunnelID, PSK: "k", Version: 1, State: store.StateCurrent, StoredAt: now}
		if err := store.WriteRecord(ctx, s, tun, rec); err != nil {
			t.Fatal(err)
		}
	}
	sc := newScheduler(w, s)
	deleted := make(chan error, 1)
	go func() { deleted <- s.Delete(ctx, x.StorageKey()) }()
	<-p.reached
	sc.repairSchedule(ctx)
	if !sc.repairing {
		t.Fatal("the repair walk ended with a deletion uncounted")
	}
	close(p.release)
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	sc.repairSchedule(ctx)
	if sc.repairing {
		t.Fatal("the repair walk did not finish on the next pass")
	}
	view, err := w.census.View(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if got := view.Counts.Tunnels(); got != 2 || !view.Exact {
		t.Fatalf("census counts %d tunnels (exact %v), want 2, exact", got, view.Exact)
	}
}
