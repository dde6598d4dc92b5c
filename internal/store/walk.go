package store

// The recount: a walk over every record, in key order and bounded steps
// (the scheduler's repair walk drives it, internal/background), that counts
// each record as it reads it and replaces the counts with its own when it
// has read the last one.
//
// Records change while the walk goes on, and each change must end up in
// the walk's count exactly once. A change to a record the walk has already
// read is applied to the walk's count as to the live one. A change to a
// record it has yet to read is not: it reads the record as the change left
// it. The one case between: a record created after the walk listed its part
// of the keys, which the walk would pass over, is added to the listed keys,
// so that it is read too. Reading a record and a change to it are
// serialised by the tunnel's stripe, and what the walk has listed and read
// by the census's lock, so that every change falls on one side.
//
// A change is stored before it is counted, so one more case lies between:
// a record deleted just before a listing, not listed, whose deletion is
// counted only after the walk has read past it, would be taken out of a
// count it was never in. So every record whose change is under way when a
// listing ends (the stripes say which) is added to the listed keys, and
// the walk reads it once the change is counted; it reads the others
// meanwhile, and waits for the next step if only such records are left.

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/hashicorp/vault/sdk/logical"
)

// censusWalk is a recount under way. Guarded by Census.mu.
type censusWalk struct {
	acc Counts
	// cursor is the greatest record read; batch the keys listed and not
	// read yet, in order (one added later may sort before cursor);
	// batchEnd the last key listed, and complete whether the listing
	// reached the last record.
	cursor   Tunnel
	batch    []Tunnel
	batchEnd Tunnel
	complete bool
	// listing: a batch is being listed; pending are the records changed
	// meanwhile beyond cursor, looked for in it once it is listed.
	listing bool
	pending []Tunnel
	// tainted: a change could not be counted for sure during the walk.
	tainted bool
	// counted: every record was read and the counts replaced; the walk
	// goes on through the attention/ index (kind, after).
	counted    bool
	indexKind  int
	indexAfter Tunnel
}

// less orders tunnels as their records' keys sort.
func (t Tunnel) less(u Tunnel) bool {
	return t.AccountID < u.AccountID || t.AccountID == u.AccountID && t.TunnelID < u.TunnelID
}

func (w *censusWalk) find(t Tunnel) (int, bool) {
	i := sort.Search(len(w.batch), func(i int) bool { return !w.batch[i].less(t) })
	return i, i < len(w.batch) && w.batch[i] == t
}

func (w *censusWalk) insert(t Tunnel) {
	i, found := w.find(t)
	if found {
		return
	}
	w.batch = append(w.batch, Tunnel{})
	copy(w.batch[i+1:], w.batch[i:])
	w.batch[i] = t
}

func (w *censusWalk) remove(t Tunnel) {
	if i, found := w.find(t); found {
		w.batch = append(w.batch[:i], w.batch[i+1:]...)
	}
}

// changed takes in a change of t's record from before to after, made while
// the walk is under way (see the top of this file).
func (w *censusWalk) changed(t Tunnel, before, after tally) {
	if w.counted {
		return
	}
	_, listed := w.find(t)
	switch {
	case listed:
		// The walk reads it as it is now.
	case !w.cursor.less(t):
		w.acc.add(before, -1)
		w.acc.add(after, 1)
	case w.listing:
		w.pending = append(w.pending, t)
	case w.complete || !w.batchEnd.less(t):
		// Created after its part of the keys was listed.
		w.insert(t)
	}
}

// StartWalk starts a new recount, dropping any under way.
func (c *Census) StartWalk() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.walk = &censusWalk{}
}

// WalkStep goes on with the recount (a new one if none is under way): it
// reads up to n records, and calls visit with each after counting it, or,
// once every record is counted, checks up to n attention/ entries. done
// says the walk is over. A record that cannot be read stops the step with
// the error, and is passed over: it is not counted, and the counts are not
// exact until the next walk. An error of visit stops the step too.
//
// The walk never depends on the census: it is the scheduler's repair walk,
// which puts back lost schedule entries, and was that before it counted.
// When the census cannot be loaded it walks on, its count marked not exact.
func (c *Census) WalkStep(ctx context.Context, s logical.Storage, n int, visit func(Tunnel, *Record) error) (bool, error) {
	loadErr := c.ensureLoaded(ctx, s)
	if loadErr != nil {
		c.logger.Warn("the census could not be loaded; the walk goes on without it, and its counts are not exact", "error", loadErr)
	}
	c.mu.Lock()
	if c.walk == nil {
		c.walk = &censusWalk{}
	}
	w := c.walk
	w.tainted = w.tainted || loadErr != nil
	c.mu.Unlock()
	for i := 0; i < n; i++ {
		t, next, err := c.nextToRead(ctx, s, w, n)
		if err != nil {
			return false, err
		}
		switch next {
		case walkWait:
			return false, nil
		case walkCounted:
			return c.checkIndex(ctx, s, w, n-i)
		}
		rec, err := c.read(ctx, s, w, t)
		if err != nil {
			return false, err
		}
		if visit != nil && rec != nil {
			if err := visit(t, rec); err != nil {
				return false, err
			}
		}
	}
	return false, nil
}

// walkNext is what the walk does next.
type walkNext int

const (
	// walkRead: read the record nextToRead returned.
	walkRead walkNext = iota
	// walkWait: every record listed and not read yet is being changed;
	// the walk goes on at its next step.
	walkWait
	// walkCounted: every record is counted.
	walkCounted
)

// nextToRead is the next record the walk reads, listing the next n keys
// when those listed are read; walkCounted when every record is counted
// (the counts are then replaced by the walk's).
func (c *Census) nextToRead(ctx context.Context, s logical.Storage, w *censusWalk, n int) (Tunnel, walkNext, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if w.counted {
		return Tunnel{}, walkCounted, nil
	}
	if len(w.batch) == 0 && !w.complete {
		w.listing, w.pending = true, nil
		after := w.cursor
		c.mu.Unlock()
		tunnels, complete, err := ListRecordsAfter(ctx, s, after, n)
		c.mu.Lock()
		w.listing = false
		if err != nil {
			// What changed meanwhile is beyond the cursor: the next
			// listing finds it.
			w.pending = nil
			return Tunnel{}, walkRead, err
		}
		w.batch, w.complete = tunnels, complete
		if len(tunnels) > 0 {
			w.batchEnd = tunnels[len(tunnels)-1]
		}
		inRange := func(p Tunnel) bool { return w.cursor.less(p) && (complete || !w.batchEnd.less(p)) }
		for _, p := range w.pending {
			if inRange(p) {
				w.insert(p)
			}
		}
		w.pending = nil
		for i := range c.stripes {
			if p := c.stripes[i].changing.Load(); p != nil && inRange(*p) {
				w.insert(*p)
			}
		}
	}
	for _, t := range w.batch {
		if !c.changing(t) {
			return t, walkRead, nil
		}
	}
	if len(w.batch) > 0 {
		return Tunnel{}, walkWait, nil
	}
	// Unloaded, there are no counts to replace: a load replaces them. The
	// counts are exact now, but not said to be until the index and the
	// lists are checked too (checkIndex): a list may still be wrong.
	if c.walk == w && c.loaded {
		c.live, c.exact = w.acc, c.exact && !w.tainted
		c.gen++
		// The walk's count is the live one from now on; a bulk job started
		// by a process that stopped before it was written is looked for.
		w.acc, c.bulkUnsure = Counts{}, true
	}
	w.counted = true
	return Tunnel{}, walkCounted, nil
}

// read reads t for the walk, counts it and checks its attention/ entry,
// under t's stripe. nil: the record is gone.
func (c *Census) read(ctx context.Context, s logical.Storage, w *censusWalk, t Tunnel) (*Record, error) {
	defer c.lockTunnel(t)()
	rec, err := ReadRecord(ctx, s, t)
	c.mu.Lock()
	w.remove(t)
	if w.cursor.less(t) {
		w.cursor = t
	}
	if err != nil {
		w.tainted = true
	} else {
		w.acc.add(tallyOf(rec), 1)
	}
	c.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("count %s: %w", t, err)
	}
	if kind, want := attentionOf(rec); kind != "" {
		c.repairAttention(ctx, s, t, kind, want)
	}
	return rec, nil
}

// repairAttention puts back t's attention/ entry where it is missing or
// says something else (the record was written around the census), and what
// its list says of t. The caller holds t's stripe.
func (c *Census) repairAttention(ctx context.Context, s logical.Storage, t Tunnel, kind string, want AttentionEntry) {
	if got, err := readAttention(ctx, s, t, kind); err == nil && got != nil && *got == want {
		return
	}
	c.putAttention(ctx, s, t, kind, want)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.changedKind(kind)
	if i, found := c.listedFind(kind, t); found {
		c.listed[kind][i].AttentionEntry = want
	}
}

// checkIndex removes up to n attention/ entries whose tunnel does not (or
// no longer) belong there, kind after kind; true when it has been through
// them all. Then the lists are read again from the index, which is now
// what the records say.
func (c *Census) checkIndex(ctx context.Context, s logical.Storage, w *censusWalk, n int) (bool, error) {
	for n > 0 && w.indexKind < len(AttentionKinds) {
		kind := AttentionKinds[w.indexKind]
		tunnels, err := listAttention(ctx, s, kind)
		if err != nil {
			return false, err
		}
		i := sort.Search(len(tunnels), func(i int) bool { return w.indexAfter.less(tunnels[i]) })
		tunnels = tunnels[i:]
		for _, t := range tunnels[:min(len(tunnels), n)] {
			// Passed over if it cannot be checked, as a record is.
			w.indexAfter = t
			n--
			if err := c.checkEntry(ctx, s, t, kind); err != nil {
				return false, err
			}
		}
		if w.indexAfter == (Tunnel{}) || len(tunnels) == 0 || w.indexAfter == tunnels[len(tunnels)-1] {
			w.indexKind, w.indexAfter = w.indexKind+1, Tunnel{}
		}
	}
	if w.indexKind < len(AttentionKinds) {
		return false, nil
	}
	c.mu.Lock()
	if c.walk != w || !c.loaded {
		c.mu.Unlock()
		return true, nil
	}
	// The index is what the records say: the lists are read again from
	// it, and only then are the counts and lists said to be exact. A
	// refill that fails is tried again at the next step.
	for _, kind := range AttentionKinds {
		c.refill[kind] = max(c.refill[kind], refillMissing)
	}
	c.mu.Unlock()
	if err := c.refillLists(ctx, s); err != nil {
		return false, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.walk == w {
		c.walk, c.exact, c.countedAt = nil, !w.tainted, c.now().UTC()
		c.gen++
	}
	return true, nil
}

// checkEntry removes t's attention/ entry of kind, and takes it off the
// list, unless t's record needs that kind of attention.
func (c *Census) checkEntry(ctx context.Context, s logical.Storage, t Tunnel, kind string) error {
	defer c.lockTunnel(t)()
	rec, err := ReadRecord(ctx, s, t)
	if err != nil {
		return err
	}
	if got, _ := attentionOf(rec); got == kind {
		return nil
	}
	if err := s.Delete(ctx, t.attentionKey(kind)); err != nil {
		// A refill may list it: not exact until a walk removes it.
		c.taint()
		return fmt.Errorf("remove %s from the attention index: %w", t, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.listedDrop(kind, t)
	return nil
}

// listTunnelsAfter returns up to n tunnels under prefix
// (<prefix><account>/<tunnel>), in key order, after after (the zero
// Tunnel: from the first); complete says that it reached the last.
func listTunnelsAfter(ctx context.Context, s logical.Storage, prefix string, after Tunnel, n int) ([]Tunnel, bool, error) {
	accounts, err := s.List(ctx, prefix)
	if err != nil {
		return nil, false, fmt.Errorf("list %s: %w", prefix, err)
	}
	sort.Strings(accounts)
	var out []Tunnel
	for _, a := range accounts {
		account, ok := strings.CutSuffix(a, "/")
		if !ok || account < after.AccountID {
			continue
		}
		tunnels, err := s.List(ctx, prefix+a)
		if err != nil {
			return nil, false, fmt.Errorf("list %s%s: %w", prefix, a, err)
		}
		sort.Strings(tunnels)
		for _, tunnel := range tunnels {
			if strings.HasSuffix(tunnel, "/") || account == after.AccountID && tunnel <= after.TunnelID {
				continue
			}
			if len(out) == n {
				return out, false, nil
			}
			out = append(out, Tunnel{AccountID: account, TunnelID: tunnel})
		}
	}
	return out, true, nil
}
