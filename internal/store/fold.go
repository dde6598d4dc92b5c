package store

// Writing the census: the background folds what changed into the entry
// (Fold), and the mount's cleanup writes it closed (Close). Each is one
// Get (whose the entry is), a Put of each list that changed
// (census_lists.go; all three at Close) and one Put of the entry, and only
// when something changed.

import (
	"context"

	"github.com/hashicorp/vault/sdk/logical"
)

// Fold refills the lists that lost a tunnel while more of their kind
// exist (listed.go), at every call: the background's passes, so a status
// read never does. Then it writes the counts to the census entry when they
// changed since the last write, at most every CensusFoldEvery, and at once
// after a recount; before that it drops from the census the bulk jobs that
// have finished.
func (c *Census) Fold(ctx context.Context, s logical.Storage) error {
	c.foldMu.Lock()
	defer c.foldMu.Unlock()
	if err := c.ensureLoaded(ctx, s); err != nil {
		return err
	}
	if err := c.refillLists(ctx, s); err != nil {
		return err
	}
	c.mu.Lock()
	now := c.now()
	due := c.gen != c.foldedGen && (now.Sub(c.foldedAt) >= CensusFoldEvery || c.countedAt.After(c.foldedAt))
	c.mu.Unlock()
	if !due {
		return nil
	}
	if err := c.pruneBulk(ctx, s); err != nil {
		c.logger.Warn("the census could not look at the bulk jobs; it tries again at its next write", "error", err)
	}
	return c.write(ctx, s, false)
}

// Close writes the counts closed, with every change counted, so that the
// next process to keep them takes them as they are. Later changes load the
// census again.
func (c *Census) Close(ctx context.Context) error {
	c.foldMu.Lock()
	defer c.foldMu.Unlock()
	c.mu.Lock()
	s, loaded := c.storage, c.loaded
	c.mu.Unlock()
	if !loaded || !c.mayWrite() {
		return nil
	}
	err := c.write(ctx, s, true)
	c.mu.Lock()
	c.loaded = false
	c.mu.Unlock()
	return err
}

// write stores the census, closed or open, if this process still owns it.
// When another has written it since (another node that took over, or an
// operator), this one loads it again instead.
func (c *Census) write(ctx context.Context, s logical.Storage, closed bool) error {
	// One that does not decode is taken as none, and overwritten.
	stored, err := c.readEntry(ctx, s)
	if err != nil {
		return err
	}
	c.mu.Lock()
	if stored != nil && stored.Owner != c.owner {
		c.loaded, c.walk = false, nil
		c.mu.Unlock()
		c.logger.Warn("the census was written by another process since this one loaded it; it loads it again")
		return nil
	}
	c.mu.Unlock()
	if err := c.refillLists(ctx, s); err != nil {
		return err
	}
	c.mu.Lock()
	now := c.now().UTC()
	e := &censusEntry{Owner: c.owner, Closed: closed, Exact: c.exact, CountedAt: c.countedAt, AsOf: now,
		Counts: c.live.clone(), Drift: c.drift, Bulk: c.bulkStatuses(), Schedule: c.schedule, ScheduleAt: c.scheduleAt}
	lists, gen := c.cloneListed(), c.gen
	c.mu.Unlock()
	// The lists first: an entry closed is never taken with lists older
	// than it (one left open has its lists refilled anyway).
	if err := c.writeLists(ctx, s, e.Owner, lists, closed); err != nil {
		return err
	}
	if err := writeCensusEntry(ctx, s, e); err != nil {
		return err
	}
	c.mu.Lock()
	c.foldedGen, c.foldedAt = gen, now
	c.mu.Unlock()
	return nil
}
