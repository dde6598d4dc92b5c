package main

// Bulk rotation jobs: the progress record of rotate/<account> (path_rotate.go).
// The rotations themselves are due/ entries of the job's minute, keyed with
// bulkSuffix (due.go), worked off by the scheduler (scheduler.go).
//
// Progress is counted so that it is exact after any failure: the job keeps
// the tunnels that failed or were skipped, and no count of those done (an entry whose delete
// failed is met again, and a counter would count it twice; a list of every
// tunnel done would not fit one storage entry for a large account). Done is
// what is neither failed, skipped nor still queued:
// queued - entries left - failed - skipped.

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// bulkJob is the progress of rotate/<account>.
type bulkJob struct {
	StartedAt time.Time `json:"started_at"`
	// Minute is the due/ minute that holds the job's entries.
	Minute int64 `json:"minute"`
	Queued int   `json:"queued"`
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

// progress counts the job's entries still queued, those it has not already
// counted (one whose delete failed may linger).
func (j *bulkJob) progress(ctx context.Context, s logical.Storage, account string) (bulkProgress, error) {
	left, err := countBulkEntries(ctx, s, j.Minute, account, j.counted)
	if err != nil {
		return bulkProgress{}, err
	}
	p := bulkProgress{Queued: j.Queued, Failed: len(j.Failed), Skipped: len(j.Skipped)}
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
