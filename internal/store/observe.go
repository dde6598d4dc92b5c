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
// without a call at each of the protocol's writes. Its price is one Get per
// record write (two per rotation), and a Put of the attention/ entry only
// when a tunnel starts or stops needing attention or its reason changes.
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
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Observe returns s with every record write counted by c. Observing
// storage that c already observes returns it as it is.
func (c *Census) Observe(s logical.Storage) logical.Storage {
	if o, ok := s.(*observed); ok && o.c == c {
		return s
	}
	return &observed{Storage: s, c: c}
}

type observed struct {
	logical.Storage
	c *Census
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
	if !ok || !o.c.mayWrite() {
		return o.Storage.Put(ctx, entry)
	}
	return o.c.put(ctx, o.Storage, t, entry)
}

func (o *observed) Delete(ctx context.Context, key string) error {
	t, ok := recordTunnel(key)
	if !ok || !o.c.mayWrite() {
		return o.Storage.Delete(ctx, key)
	}
	return o.c.delete(ctx, o.Storage, t)
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

// put stores entry, t's record, and counts the change.
func (c *Census) put(ctx context.Context, s logical.Storage, t Tunnel, entry *logical.StorageEntry) error {
	defer c.lockTunnel(t)()
	loadErr := c.ensureLoaded(ctx, s)
	old, known := c.before(ctx, s, t)
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
		c.taint()
		return err
	}
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
func (c *Census) delete(ctx context.Context, s logical.Storage, t Tunnel) error {
	defer c.lockTunnel(t)()
	loadErr := c.ensureLoaded(ctx, s)
	old, known := c.before(ctx, s, t)
	if err := s.Delete(ctx, t.StorageKey()); err != nil {
		c.taint()
		return err
	}
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
