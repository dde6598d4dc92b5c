package store

import (
	"context"
	"fmt"
	"math/rand"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// countingStorage counts the Gets of records that reach it.
type countingStorage struct {
	logical.Storage
	recordGets atomic.Int64
}

func (s *countingStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	if strings.HasPrefix(key, PSKPrefix) {
		s.recordGets.Add(1)
	}
	return s.Storage.Get(ctx, key)
}

// TestARotationCostsTheCensusNoRead: a rotation reads its record, then
// writes it twice (begun, then stored). Each write replaces what the
// request read or wrote last, so the census needs no Get of its own: it
// used to cost two, about 0.5 ms per rotation through the plugin's storage.
func TestARotationCostsTheCensusNoRead(t *testing.T) {
	ctx := context.Background()
	raw := &countingStorage{Storage: &logical.InmemStorage{}}
	c := newTestCensus(censusBase)
	tun := tunnelOf(1)
	if err := WriteRecord(ctx, c.ObserveRequest(raw), tun, &Record{State: StateCurrent, PSK: "k"}); err != nil {
		t.Fatal(err)
	}
	s := c.ObserveRequest(raw) // the next request's storage
	before := raw.recordGets.Load()
	rec, err := ReadRecord(ctx, s, tun)
	if err != nil || rec == nil {
		t.Fatalf("read: %v, %v", rec, err)
	}
	rec.State = StateRotationUnknown
	if err := WriteRecord(ctx, s, tun, rec); err != nil {
		t.Fatal(err)
	}
	rec.State, rec.PSK = StateCurrent, "k2"
	if err := WriteRecord(ctx, s, tun, rec); err != nil {
		t.Fatal(err)
	}
	if n := raw.recordGets.Load() - before; n != 1 {
		t.Errorf("a read and two writes of one record made %d record Gets, want 1 (the request's own)", n)
	}
	view, err := c.View(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	checkView(t, view, raw.Storage, false, "after the rotation")
}

// TestTheMemoIsNeverStale: many requests' storages read and write a few
// tunnels, interleaved (each request reads, then writes, what another may
// have written meanwhile), and the counts stay exact at every step. A memo
// used after another write of its stripe would count a change from a
// record storage no longer held.
func TestTheMemoIsNeverStale(t *testing.T) {
	ctx := context.Background()
	raw := &logical.InmemStorage{}
	c := newTestCensus(censusBase)
	rng := rand.New(rand.NewSource(7))
	requests := make([]logical.Storage, 6)
	for i := range requests {
		requests[i] = c.ObserveRequest(raw)
	}
	for step := 0; step < 600; step++ {
		s := requests[rng.Intn(len(requests))]
		i := rng.Intn(5) // few tunnels, so that memos go stale often
		if rng.Intn(3) == 0 {
			if _, err := ReadRecord(ctx, s, tunnelOf(i)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		change(t, rng, s, i)
		view, err := c.View(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		checkView(t, view, raw, false, fmt.Sprintf("step %d", step))
	}
}

// TestARequestAsksTheNodesStateOnce: whether this node may write is, in a
// plugin, a call to Vault (its replication state). A PSK read must not
// pay it at all, and a rotation's writes pay it once per request, not per
// write. (A read paid it with every Get once the memo came: the PSK read
// measured about 10% slower against a KV read.)
func TestARequestAsksTheNodesStateOnce(t *testing.T) {
	ctx := context.Background()
	raw := &logical.InmemStorage{}
	var asked atomic.Int64
	c := NewCensus(CensusConfig{Now: func() time.Time { return censusBase }, MayWrite: func() bool { asked.Add(1); return true }})
	tun := tunnelOf(1)
	if err := WriteRecord(ctx, raw, tun, &Record{State: StateCurrent, PSK: "k"}); err != nil {
		t.Fatal(err)
	}
	read := c.ObserveRequest(raw)
	for i := 0; i < 3; i++ {
		if rec, err := ReadRecord(ctx, read, tun); err != nil || rec == nil {
			t.Fatalf("read: %v, %v", rec, err)
		}
	}
	if n := asked.Load(); n != 0 {
		t.Errorf("three reads asked the node's state %d times, want 0", n)
	}
	write := c.ObserveRequest(raw)
	rec, _ := ReadRecord(ctx, write, tun)
	for _, state := range []string{StateRotationUnknown, StateCurrent} {
		rec.State = state
		if err := WriteRecord(ctx, write, tun, rec); err != nil {
			t.Fatal(err)
		}
	}
	if n := asked.Load(); n != 1 {
		t.Errorf("a request's two writes asked the node's state %d times, want 1", n)
	}
}
