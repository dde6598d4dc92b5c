package store

// The bulk jobs a status read shows: a job is noted when it starts, and
// each write of the census (Fold, at most every CensusFoldEvery) counts the
// progress of the noted jobs and drops those that have finished. Counting a
// job's progress lists its minute of the schedule, which holds every entry
// it has left: a status read must not do that, however large the job.

import (
	"context"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// BulkStatus is a running bulk job as a status read shows it.
type BulkStatus struct {
	AccountID string    `json:"account_id"`
	StartedAt time.Time `json:"started_at"`
	Queued    int       `json:"queued"`
	Done      int       `json:"done"`
	Failed    int       `json:"failed"`
	Skipped   int       `json:"skipped"`
	Remaining int       `json:"remaining"`
	// AsOf is when the progress was counted.
	AsOf time.Time `json:"as_of"`
}

// bulkState is a noted job: its status, and the gen at which it was last
// noted.
type bulkState struct {
	noted  uint64
	status BulkStatus
}

// bulkStatuses are the noted jobs' statuses, by account. The caller holds
// mu.
func (c *Census) bulkStatuses() []BulkStatus {
	out := make([]BulkStatus, 0, len(c.bulk))
	for _, account := range sortedKeys(c.bulk) {
		out = append(out, c.bulk[account].status)
	}
	return out
}

// NoteBulkJob records that account's bulk job of queued rotations started
// at startedAt, so that a status read shows it.
func (c *Census) NoteBulkJob(ctx context.Context, s logical.Storage, account string, startedAt time.Time, queued int) {
	if err := c.ensureLoaded(ctx, s); err != nil {
		c.logger.Warn("could not record the bulk job in the census", "error", err)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.bulk[account] = &bulkState{noted: c.gen, status: BulkStatus{AccountID: account, StartedAt: startedAt.UTC(),
		Queued: queued, Remaining: queued, AsOf: c.now().UTC()}}
}

// pruneBulk counts the progress of the noted jobs, and drops those that
// have finished; after a lost process, or a recount, it looks at every
// account that has a job, so that one started just before is not missed.
func (c *Census) pruneBulk(ctx context.Context, s logical.Storage) error {
	c.mu.Lock()
	noted := make(map[string]uint64, len(c.bulk))
	for account, b := range c.bulk {
		noted[account] = b.noted
	}
	unsure := c.bulkUnsure
	c.mu.Unlock()
	accounts := sortedKeys(noted)
	if unsure {
		listed, err := s.List(ctx, bulkPrefix)
		if err != nil {
			return err
		}
		for _, a := range listed {
			if _, ok := noted[a]; !ok && !strings.HasSuffix(a, "/") {
				accounts = append(accounts, a)
			}
		}
		sort.Strings(accounts)
	}
	found := map[string]*BulkStatus{}
	for _, account := range accounts {
		job, p, running, err := RunningBulkJob(ctx, s, account, c.now())
		if err != nil {
			return err
		}
		found[account] = nil
		if running {
			found[account] = &BulkStatus{AccountID: account, StartedAt: job.StartedAt, Queued: p.Queued, Done: p.Done,
				Failed: p.Failed, Skipped: p.Skipped, Remaining: p.Remaining, AsOf: c.now().UTC()}
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for account, status := range found {
		b, ok := c.bulk[account]
		if ok && b.noted != noted[account] {
			continue // noted again meanwhile: a job started since is kept as noted
		}
		switch {
		case status != nil:
			if !ok {
				c.gen++
				b = &bulkState{noted: c.gen}
				c.bulk[account] = b
			}
			// Written again when the progress changed, not only its time.
			was, now := b.status, *status
			was.AsOf, now.AsOf = time.Time{}, time.Time{}
			if was != now {
				c.gen++
			}
			b.status = *status
		case ok:
			delete(c.bulk, account)
			c.gen++
		}
	}
	if unsure {
		c.bulkUnsure = false
	}
	return nil
}
