package main

// Bulk rotation jobs: the progress record of rotate/<account> (path_rotate.go).
// The rotations themselves are due/ entries of the job's minute, keyed with
// store.BulkSuffix (due.go), worked off by the scheduler (scheduler.go).
//
// Progress is counted so that it is exact after any failure: the job keeps
// the tunnels that failed or were skipped, and no count of those done (an
// entry whose delete failed is met again, and a counter would count it
// twice; a list of every tunnel done would not fit one storage entry for a
// large account). Done is what is neither failed, skipped nor still queued:
// queued - entries left - failed - skipped.
//
// Each failed or skipped tunnel is an entry of its own,
// bulkresult/<account>/<minute>/<tunnel>.failed (or .skipped), beside the
// job's small, fixed-size record bulk/<account>: recording one is a Put of a
// few hundred bytes (the reason is bounded, store.MaxBulkReason), whether it is
// already counted two Gets, and counting them one List. Raft refuses an
// entry over max_entry_size (1 MiB by default, often less), so a job that
// kept its results in its one record, rewritten at each failure, could not
// record more than a few thousand, and did O(n²) work to get there. The
// results of a job replaced by a newer one are removed by the scheduler
// (store.CleanBulkResults), a bounded number per pass.
//
// The job record is written before its entries (Queueing set) and the
// scheduler works none of them until it is cleared, so that every entry
// belongs to a recorded job and the count holds while the entries are
// written too. A job still queueing long after it started lost its writer
// (the process stopped half way): it counts the entries that were written.

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

// recordBulkResult counts t's rotation as failed (skipped: as skipped),
// with reason, in the job of minute: one small entry of its own. A job since
// replaced by a newer one is left alone. Recording the same tunnel again
// changes nothing.
func (b *backend) recordBulkResult(ctx context.Context, s logical.Storage, t store.Tunnel, minute int64, skipped bool, reason string) error {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := store.ReadBulkJob(ctx, s, t.AccountID)
	if err != nil || job == nil || job.Minute != minute {
		return err
	}
	if counted, err := job.Counted(ctx, s, t.AccountID, t.TunnelID); err != nil || counted {
		return err
	}
	key := store.BulkResultKey(t.AccountID, minute, t.TunnelID, skipped)
	entry, err := logical.StorageEntryJSON(key, store.BulkResult{Reason: store.BoundReason(reason)})
	if err != nil {
		return fmt.Errorf("encode bulk result of %s: %w", t, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("record the bulk rotation result of %s: %w", t, err)
	}
	return nil
}

// startBulkJob records a new job of n rotations for account, queueing, in a
// minute of its own: the current one, or the one after the last job's when
// that was in this minute too, so that an entry of the last job that lingers
// (its delete failed) is never counted as this job's.
func (b *backend) startBulkJob(ctx context.Context, s logical.Storage, account string, now time.Time, n int) (*store.BulkJob, error) {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	prev, err := store.ReadBulkJob(ctx, s, account)
	if err != nil {
		return nil, err
	}
	// Checked again under the lock that the job is written under: two
	// writes of rotate/ at once start one job.
	if err := b.refuseWhileRunning(ctx, s, account, prev); err != nil {
		return nil, err
	}
	minute := store.DueMinute(now, false)
	if prev != nil && prev.Minute >= minute {
		minute = prev.Minute + 1
	}
	job := &store.BulkJob{StartedAt: now.UTC(), Minute: minute, Queued: n, Queueing: true}
	if err := store.WriteBulkJob(ctx, s, account, job); err != nil {
		return nil, err
	}
	return job, nil
}

// refuseWhileRunning refuses a new job of account while job (its last, nil
// when none) has rotations left: a second job would queue the same tunnels
// again and replace the record that counts the first.
func (b *backend) refuseWhileRunning(ctx context.Context, s logical.Storage, account string, job *store.BulkJob) error {
	if job == nil {
		return nil
	}
	p, _, err := job.Progress(ctx, s, account, b.now())
	if err != nil {
		return err
	}
	if p.Remaining == 0 {
		return nil
	}
	return logical.CodedError(http.StatusConflict, fmt.Sprintf(
		"a bulk rotation of account %s started at %s is still running (queued %d, done %d, failed %d, skipped %d, remaining %d): "+
			"nothing was queued; read rotate/%s for its progress, and write again once remaining is 0",
		account, store.FormatTime(job.StartedAt), p.Queued, p.Done, p.Failed, p.Skipped, p.Remaining, account))
}

// finishQueueing records that the job of minute has its written entries,
// all it will have, and may be worked.
func (b *backend) finishQueueing(ctx context.Context, s logical.Storage, account string, minute int64, written int) error {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := store.ReadBulkJob(ctx, s, account)
	if err != nil || job == nil || job.Minute != minute {
		return err
	}
	job.Queued, job.Queueing = written, false
	return store.WriteBulkJob(ctx, s, account, job)
}

// closeAbandoned ends the queueing of a job of minute that lost its writer:
// none of its entries has been worked, so those present are all it has.
func (b *backend) closeAbandoned(ctx context.Context, s logical.Storage, account string, minute int64) error {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := store.ReadBulkJob(ctx, s, account)
	if err != nil || job == nil || job.Minute != minute || !job.Abandoned(b.now()) {
		return err
	}
	written, err := store.CountBulkEntries(ctx, s, minute, account, func(string) bool { return false })
	if err != nil {
		return err
	}
	b.Logger().Warn("a bulk rotation was left half queued; it counts the entries that were written",
		"account_id", account, "planned", job.Queued, "queued", written)
	job.Queued, job.Queueing = written, false
	return store.WriteBulkJob(ctx, s, account, job)
}
