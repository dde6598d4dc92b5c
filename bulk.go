package main

// Bulk rotation jobs: the progress record of rotate/<account> (path_rotate.go).
// The rotations themselves are due/ entries of the job's minute, keyed with
// bulkSuffix (due.go), worked off by the scheduler (scheduler.go).
//
// Progress is counted so that it is exact after any failure: the job keeps
// the tunnels that failed or were skipped, and no count of those done (an
// entry whose delete failed is met again, and a counter would count it
// twice; a list of every tunnel done would not fit one storage entry for a
// large account). Done is what is neither failed, skipped nor still queued:
// queued - entries left - failed - skipped.
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

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	// bulkQueueLimit bounds how long rotate/ spends writing a job's entries
	// (one storage Put each); whatever is written by then is the job.
	bulkQueueLimit = 2 * time.Minute
	// bulkQueueAbandoned is when a job still marked queueing is taken to
	// have lost its writer: well past bulkQueueLimit, so never while the
	// writer may still be at work.
	bulkQueueAbandoned = 10 * time.Minute
)

// bulkJob is the progress of rotate/<account>.
type bulkJob struct {
	StartedAt time.Time `json:"started_at"`
	// Minute is the due/ minute that holds the job's entries.
	Minute int64 `json:"minute"`
	Queued int   `json:"queued"`
	// Queueing is set while rotate/ writes the job's entries.
	Queueing bool `json:"queueing,omitempty"`
	// Failed maps each tunnel whose rotation failed to why; Skipped each
	// tunnel that was not rotated because it is gone (deleted in Vault, or
	// unknown to Cloudflare).
	Failed  map[string]string `json:"failed"`
	Skipped map[string]string `json:"skipped,omitempty"`
}

// counted reports whether the job has already accounted for tunnel's
// rotation: its entry, met again, is finished without a call.
func (j *bulkJob) counted(tunnel string) bool {
	_, failed := j.Failed[tunnel]
	_, skipped := j.Skipped[tunnel]
	return failed || skipped
}

// bulkProgress is a job's progress as the read of rotate/<account> reports
// it; Done + Failed + Skipped + Remaining = Queued.
type bulkProgress struct {
	Queued, Done, Failed, Skipped, Remaining int
}

// abandoned reports whether the job is still marked queueing long after
// its writer must have finished or given up.
func (j *bulkJob) abandoned(now time.Time) bool {
	return j.Queueing && now.Sub(j.StartedAt) > bulkQueueAbandoned
}

// progress counts the job's entries still queued, those it has not already
// counted (one whose delete failed may linger).
func (j *bulkJob) progress(ctx context.Context, s logical.Storage, account string, now time.Time) (bulkProgress, error) {
	left, err := countBulkEntries(ctx, s, j.Minute, account, j.counted)
	if err != nil {
		return bulkProgress{}, err
	}
	p := bulkProgress{Queued: j.Queued, Failed: len(j.Failed), Skipped: len(j.Skipped)}
	if j.Queueing {
		// None of its entries has been worked yet.
		if j.abandoned(now) {
			p.Queued = left + p.Failed + p.Skipped
		}
		p.Remaining = max(p.Queued-p.Failed-p.Skipped, 0)
		return p, nil
	}
	p.Done = max(p.Queued-left-p.Failed-p.Skipped, 0)
	p.Remaining = max(p.Queued-p.Done-p.Failed-p.Skipped, 0)
	return p, nil
}

func bulkJobKey(account string) string { return "bulk/" + account }

func readBulkJob(ctx context.Context, s logical.Storage, account string) (*bulkJob, error) {
	entry, err := s.Get(ctx, bulkJobKey(account))
	if err != nil {
		return nil, fmt.Errorf("read bulk job of account %s: %w", account, err)
	}
	if entry == nil {
		return nil, nil
	}
	job := new(bulkJob)
	if err := entry.DecodeJSON(job); err != nil {
		return nil, fmt.Errorf("decode bulk job of account %s: %w", account, err)
	}
	return job, nil
}

func writeBulkJob(ctx context.Context, s logical.Storage, account string, job *bulkJob) error {
	entry, err := logical.StorageEntryJSON(bulkJobKey(account), job)
	if err != nil {
		return fmt.Errorf("encode bulk job of account %s: %w", account, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store bulk job of account %s: %w", account, err)
	}
	return nil
}

// recordBulkResult counts t's rotation as failed (skipped: as skipped),
// with reason, in the job of minute; a job since replaced by a newer one is
// left alone. Recording the same tunnel again changes nothing.
func (b *backend) recordBulkResult(ctx context.Context, s logical.Storage, t tunnelRef, minute int64, skipped bool, reason string) error {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := readBulkJob(ctx, s, t.AccountID)
	if err != nil || job == nil || job.Minute != minute || job.counted(t.TunnelID) {
		return err
	}
	results := &job.Failed
	if skipped {
		results = &job.Skipped
	}
	if *results == nil {
		*results = map[string]string{}
	}
	(*results)[t.TunnelID] = reason
	return writeBulkJob(ctx, s, t.AccountID, job)
}

// startBulkJob records a new job of n rotations for account, queueing, in a
// minute of its own: the current one, or the one after the last job's when
// that was in this minute too, so that an entry of the last job that lingers
// (its delete failed) is never counted as this job's.
func (b *backend) startBulkJob(ctx context.Context, s logical.Storage, account string, now time.Time, n int) (*bulkJob, error) {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	prev, err := readBulkJob(ctx, s, account)
	if err != nil {
		return nil, err
	}
	// Checked again under the lock that the job is written under: two
	// writes of rotate/ at once start one job.
	if err := b.refuseWhileRunning(ctx, s, account, prev); err != nil {
		return nil, err
	}
	minute := dueMinute(now, false)
	if prev != nil && prev.Minute >= minute {
		minute = prev.Minute + 1
	}
	job := &bulkJob{StartedAt: now.UTC(), Minute: minute, Queued: n, Queueing: true}
	if err := writeBulkJob(ctx, s, account, job); err != nil {
		return nil, err
	}
	return job, nil
}

// refuseWhileRunning refuses a new job of account while job (its last, nil
// when none) has rotations left: a second job would queue the same tunnels
// again and replace the record that counts the first.
func (b *backend) refuseWhileRunning(ctx context.Context, s logical.Storage, account string, job *bulkJob) error {
	if job == nil {
		return nil
	}
	p, err := job.progress(ctx, s, account, b.now())
	if err != nil {
		return err
	}
	if p.Remaining == 0 {
		return nil
	}
	return logical.CodedError(http.StatusConflict, fmt.Sprintf(
		"a bulk rotation of account %s started at %s is still running (queued %d, done %d, failed %d, skipped %d, remaining %d): "+
			"nothing was queued; read rotate/%s for its progress, and write again once remaining is 0",
		account, formatTime(job.StartedAt), p.Queued, p.Done, p.Failed, p.Skipped, p.Remaining, account))
}

// finishQueueing records that the job of minute has its written entries,
// all it will have, and may be worked.
func (b *backend) finishQueueing(ctx context.Context, s logical.Storage, account string, minute int64, written int) error {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := readBulkJob(ctx, s, account)
	if err != nil || job == nil || job.Minute != minute {
		return err
	}
	job.Queued, job.Queueing = written, false
	return writeBulkJob(ctx, s, account, job)
}

// closeAbandoned ends the queueing of a job of minute that lost its writer:
// none of its entries has been worked, so those present are all it has.
func (b *backend) closeAbandoned(ctx context.Context, s logical.Storage, account string, minute int64) error {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := readBulkJob(ctx, s, account)
	if err != nil || job == nil || job.Minute != minute || !job.abandoned(b.now()) {
		return err
	}
	written, err := countBulkEntries(ctx, s, minute, account, func(string) bool { return false })
	if err != nil {
		return err
	}
	b.Logger().Warn("a bulk rotation was left half queued; it counts the entries that were written",
		"account_id", account, "planned", job.Queued, "queued", written)
	job.Queued, job.Queueing = written, false
	return writeBulkJob(ctx, s, account, job)
}
