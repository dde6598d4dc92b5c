package store

// How the census sees every record change: the storage the engine and the
// background are given is wrapped (Observe), and each Put or Delete of a
// record reads the record it replaces first, under the tunnel's stripe.
// What the two differ by is applied to the counts, and the attention/ index
// is moved with it. Nothing else is touched: every other key passes
// through as it is.
//
// Observing storage rather than the rotation protocol's steps keeps the
// census exact whoever writes a record, a write path added later included,
// without a call at each of the protocol's writes. Its price would be one
// Get per record write (two per rotation, about 0.5 ms through the
// plugin's storage; docs/benchmarks.md). A request's storage (ObserveRequest) saves them: it remembers
// the records it last read or wrote (the memo), since the engine reads a
// record before it writes it, and as long as no record write of the
// tunnel's stripe came between, what it read is what the write replaces.
// The memo lives as long as the request (the periodic function's drift
// sweep is a request too, of a few seconds): only a write that bypasses
// the census (sys/raw, another plugin version) in that time could make it
// wrong. The scheduler's storage lives as long as the process, so it keeps
// no memo and reads what each write replaces: the walk that makes the
// counts exact after such a write must never be handed a stale one.
// A Put of the attention/ entry is made only when a tunnel starts or stops
// needing attention or its reason changes.
//
// The index entry is written before the record that needs it and removed
// after the record that no longer does, so that a crash leaves an entry
// too many, never one too few (the walk removes it). Index writes are best
// effort: a status view must never stop a rotation, so a failure is logged
// and the walk repairs it. Until it has, the counts are marked not exact:
// a list refilled from a wrong index (listed.go) would be wrong too.

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Observe returns s with every record write counted by c: for storage that
// lives long (the background's). Observing storage that c already observes
// returns it as it is.
func (c *Census) Observe(s logical.Storage) logical.Storage {
	if o, ok := s.(*observed); ok && o.c == c {
		return s
	}
	return &observed{Storage: s, c: c}
}

// ObserveRequest is Observe for one request's storage, which remembers
// the records it reads and writes so that the census need not read them
// again (see the memo above).
func (c *Census) ObserveRequest(s logical.Storage) logical.Storage {
	if o, ok := s.(*observed); ok && o.c == c {
		return s
	}
	return &observed{Storage: s, c: c, memoOn: true}
}

type observed struct {
	logical.Storage
	c *Census

	// memoMu guards memo: the records this storage last read or wrote,
	// by key, with their stripe's write count at the time. Bounded by
	// memoMax: a wrapper that reads many records (the background's)
	// forgets them all and starts again.
	memoMu sync.Mutex
	memo   map[string]memoRecord
	// memoOn: a request's storage (ObserveRequest), which keeps a memo.
	memoOn bool

	// mayWriteOnce, mayWriteAns: a request's storage asks the census's
	// mayWrite once (mayWrite).
	mayWriteOnce sync.Once
	mayWriteAns  bool
}

// mayWrite is the census's. A request's storage asks it once: in a plugin
// the answer is a call to Vault over the plugin's channel (the node's
// replication state), as costly as a storage Get, and a request is over
// long before a node's state changes. The background's storage, which
// lives as long as the process, asks at every write.
func (o *observed) mayWrite() bool {
	if !o.memoOn {
		return o.c.mayWrite()
	}
	o.mayWriteOnce.Do(func() { o.mayWriteAns = o.c.mayWrite() })
	return o.mayWriteAns
}

// memoRecord is a record as storage held it while its stripe's write count
// was writes (nil value: no record).
type memoRecord struct {
	value  []byte
	writes uint64
}

// memoMax bounds a wrapper's memo. A request reads and writes a handful of
// records; the background's wrapper reads many, and only its last few
// matter.
const memoMax = 64

// Get is the storage's, remembering a record it reads.
func (o *observed) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	// A read asks nothing of the node's state: a memo is only ever used by
	// a write, which asks (mayWrite).
	t, ok := recordTunnel(key)
	if !ok || !o.memoOn {
		return o.Storage.Get(ctx, key)
	}
	// The count before the read: a write that lands between makes it
	// stale, and the memo is not used (a Get again), never wrong.
	writes := o.c.stripe(t).writes.Load()
	entry, err := o.Storage.Get(ctx, key)
	if err == nil {
		var value []byte
		if entry != nil {
			value = entry.Value
		}
		o.remember(key, value, writes)
	}
	return entry, err
}

func (o *observed) remember(key string, value []byte, writes uint64) {
	if !o.memoOn {
		return
	}
	o.memoMu.Lock()
	defer o.memoMu.Unlock()
	if o.memo == nil || len(o.memo) >= memoMax {
		o.memo = make(map[string]memoRecord, 2)
	}
	o.memo[key] = memoRecord{value: append([]byte(nil), value...), writes: writes}
}

func (o *observed) forget(key string) {
	o.memoMu.Lock()
	defer o.memoMu.Unlock()
	delete(o.memo, key)
}

// recall returns the record storage holds under key as the memo has it,
// if no record write of its stripe came since; the caller holds the stripe.
func (o *observed) recall(key string, st *censusStripe) (*Record, bool) {
	o.memoMu.Lock()
	m, ok := o.memo[key]
	o.memoMu.Unlock()
	if !ok || m.writes != st.writes.Load() {
		return nil, false
	}
	if m.value == nil {
		return nil, true
	}
	rec := new(Record)
	if err := (&logical.StorageEntry{Value: m.value}).DecodeJSON(rec); err != nil {
		return nil, false
	}
	return rec, true
}

// recordTunnel is the tunnel whose record key is key (false: not a record).
func recordTunnel(key string) (Tunnel, bool) {
	rest, ok := strings.CutPrefix(key, PSKPrefix)
	if !ok {
		return Tunnel{}, false
	}
	account, tunnel, ok := strings.Cut(rest, "/")
	if !ok || account == "" || tunnel == "" || strings.Contains(tunnel, "/") {
		return Tunnel{}, false
	}
	return Tunnel{AccountID: account, TunnelID: tunnel}, true
}

func (o *observed) Put(ctx context.Context, entry *logical.StorageEntry) error {
	t, ok := recordTunnel(entry.Key)
	if !ok || !o.mayWrite() {
		return o.Storage.Put(ctx, entry)
	}
	return o.c.put(ctx, o, t, entry)
}

func (o *observed) Delete(ctx context.Context, key string) error {
	t, ok := recordTunnel(key)
	if !ok || !o.mayWrite() {
		return o.Storage.Delete(ctx, key)
	}
	return o.c.delete(ctx, o, t)
}

// before reads the record a change replaces. ok is false when it cannot be
// known (storage failed, or the record does not decode): the change is
// made, and the counts are marked not exact.
func (c *Census) before(ctx context.Context, s logical.Storage, t Tunnel) (*Record, bool) {
	rec, err := ReadRecord(ctx, s, t)
	if err != nil {
		c.logger.Warn("the census could not read the record a write replaces; its counts are not exact until the next walk", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
		return nil, false
	}
	return rec, true
}

// replaced is the record a write of t through o replaces: from o's memo
// when nothing was written to t's stripe since o read or wrote it, else
// read from storage. The caller holds the stripe.
func (c *Census) replaced(ctx context.Context, o *observed, t Tunnel, st *censusStripe) (*Record, bool) {
	if rec, ok := o.recall(t.StorageKey(), st); ok {
		return rec, true
	}
	return c.before(ctx, o.Storage, t)
}

// written notes a write of t's record through o (value nil: deleted; ok
// false: storage failed, and what it holds is not known): the stripe's
// count moves on, and o remembers what it wrote. The caller holds the
// stripe.
func (o *observed) written(t Tunnel, st *censusStripe, value []byte, ok bool) {
	writes := st.writes.Add(1)
	if ok {
		o.remember(t.StorageKey(), value, writes)
	} else {
		o.forget(t.StorageKey())
	}
}

// put stores entry, t's record, and counts the change.
func (c *Census) put(ctx context.Context, o *observed, t Tunnel, entry *logical.StorageEntry) error {
	st := c.stripe(t)
	st.Lock()
	defer st.Unlock()
	st.changing.Store(&t)
	defer st.changing.Store(nil)
	s := o.Storage
	loadErr := c.ensureLoaded(ctx, s)
	old, known := c.replaced(ctx, o, t, st)
	rec := new(Record)
	if err := entry.DecodeJSON(rec); err != nil {
		rec, known = nil, false
	}
	oldKind, oldEntry := attentionOf(old)
	newKind, newEntry := attentionOf(rec)
	if known && newKind != "" && (newKind != oldKind || newEntry != oldEntry) {
		c.putAttention(ctx, s, t, newKind, newEntry)
	}
	if err := s.Put(ctx, entry); err != nil {
		// Perhaps stored after all: nothing can tell.
		o.written(t, st, nil, false)
		c.taint()
		return err
	}
	o.written(t, st, entry.Value, true)
	// Out of the index before the change is applied: a refill of the
	// lists (listed.go) must not list it again.
	if known && oldKind != "" && oldKind != newKind {
		c.deleteAttention(ctx, s, t, oldKind)
	}
	if !known || loadErr != nil {
		c.taint()
		return nil
	}
	c.apply(ctx, t, old, rec)
	return nil
}

// delete removes t's record and counts it gone.
func (c *Census) delete(ctx context.Context, o *observed, t Tunnel) error {
	st := c.stripe(t)
	st.Lock()
	defer st.Unlock()
	st.changing.Store(&t)
	defer st.changing.Store(nil)
	s := o.Storage
	loadErr := c.ensureLoaded(ctx, s)
	old, known := c.replaced(ctx, o, t, st)
	if err := s.Delete(ctx, t.StorageKey()); err != nil {
		o.written(t, st, nil, false)
		c.taint()
		return err
	}
	o.written(t, st, nil, true)
	if kind, _ := attentionOf(old); kind != "" {
		c.deleteAttention(ctx, s, t, kind)
	}
	if !known || loadErr != nil {
		c.taint()
		return nil
	}
	c.apply(ctx, t, old, nil)
	return nil
}

// apply counts t's change from old to rec (nil: none).
func (c *Census) apply(ctx context.Context, t Tunnel, old, rec *Record) {
	if w, ok := ctx.Value(driftWatchKey{}).(*DriftWatch); ok && old != nil && old.Current() && rec != nil &&
		(rec.State == StateStale || rec.State == StateTunnelGone) {
		w.add()
	}
	before, after := tallyOf(old), tallyOf(rec)
	oldKind, oldEntry := attentionOf(old)
	newKind, newEntry := attentionOf(rec)
	if before.equal(after) && oldEntry == newEntry {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// A rotation scheduled before the earliest the scheduler last found
	// is the next one now; one that moves later waits for the scheduler's
	// next look (a status read must not list the schedule).
	if next := after.next.Truncate(time.Minute); !next.IsZero() && (c.schedule.Next.IsZero() || next.Before(c.schedule.Next)) {
		c.schedule.Next = next
	}
	c.live.add(before, -1)
	c.live.add(after, 1)
	c.gen++
	if oldKind != "" && oldKind != newKind {
		c.listedDrop(oldKind, t)
	}
	if newKind != "" {
		c.listedPut(newKind, AttentionItem{AccountID: t.AccountID, TunnelID: t.TunnelID, AttentionEntry: newEntry})
	}
	if c.walk != nil {
		c.walk.changed(t, before, after)
	}
}

func (c *Census) putAttention(ctx context.Context, s logical.Storage, t Tunnel, kind string, e AttentionEntry) {
	entry, err := logical.StorageEntryJSON(t.attentionKey(kind), e)
	if err == nil {
		err = s.Put(ctx, entry)
	}
	if err != nil {
		c.taint()
		c.logger.Warn("could not index a tunnel that needs attention; the counts are not exact until the scheduler's next walk adds it", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
	}
}

func (c *Census) deleteAttention(ctx context.Context, s logical.Storage, t Tunnel, kind string) {
	if err := s.Delete(ctx, t.attentionKey(kind)); err != nil {
		c.taint()
		c.logger.Warn("could not remove a tunnel from the attention index; the counts are not exact until the scheduler's next walk removes it", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
	}
}
