package main

// Bulk rotation jobs: the progress record of rotate/<account> (path_rotate.go).
// The rotations themselves are due/ entries marked bulk (due.go), worked off
// by the scheduler (scheduler.go), which counts each one here.

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// bulkJob is the progress of rotate/<account>.
type bulkJob struct {
	StartedAt time.Time         `json:"started_at"`
	Queued    int               `json:"queued"`
	Done      int               `json:"done"`
	Failed    map[string]string `json:"failed"`
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

// recordBulkResult counts one bulk rotation as done or failed.
func (b *backend) recordBulkResult(ctx context.Context, s logical.Storage, t tunnelRef, rotateErr error) {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := readBulkJob(ctx, s, t.AccountID)
	if err == nil && job != nil {
		if rotateErr == nil {
			job.Done++
		} else {
			if job.Failed == nil {
				job.Failed = map[string]string{}
			}
			job.Failed[t.TunnelID] = rotateErr.Error()
		}
		err = writeBulkJob(ctx, s, t.AccountID, job)
	}
	if err != nil {
		b.Logger().Warn("could not record bulk progress", "account_id", t.AccountID, "error", err)
	}
}
