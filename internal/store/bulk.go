package store

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	// BulkQueueLimit bounds how long rotate/ spends writing a job's entries
	// (one storage Put each); whatever is written by then is the job.
	BulkQueueLimit = 2 * time.Minute
	// BulkQueueAbandoned is when a job still marked queueing is taken to
	// have lost its writer: well past BulkQueueLimit, so never while the
	// writer may still be at work.
	BulkQueueAbandoned = 10 * time.Minute

	BulkResultPrefix = "bulkresult/"
	failedSuffix     = ".failed"
	skippedSuffix    = ".skipped"
	retryingSuffix   = ".retrying"
	// MaxBulkReason bounds the reason kept for a failed or skipped tunnel
	// (an error from Cloudflare can carry a long message), so that every
	// result entry is small whatever went wrong.
	MaxBulkReason = 1024
	// BulkListed bounds the tunnels a read of rotate/<account> lists as
	// failed, and as skipped, so that its answer stays small for any job;
	// the counts say how many there are in all.
	BulkListed = 100
)

// BulkJob is the progress of rotate/<account>.
type BulkJob struct {
	StartedAt time.Time `json:"started_at"`
	// Minute is the due/ minute that holds the job's entries, and names
	// its results (BulkResultKey).
	Minute int64 `json:"minute"`
	Queued int   `json:"queued"`
	// Queueing is set while rotate/ writes the job's entries.
	Queueing bool `json:"queueing,omitempty"`
	// IncludeUnmanaged: the job also took the tunnels Cloudflare listed
	// that Vault did not manage (Unmanaged of them).
	IncludeUnmanaged bool `json:"include_unmanaged,omitempty"`
	Unmanaged        int  `json:"unmanaged,omitempty"`
	// LegacyFailed and LegacySkipped are the results a version before
	// result entries kept in the record (tunnel to reason). They are still
	// counted, beside the job's result entries, and never added to: a job
	// started by that version and finished by this one counts each tunnel
	// once, in one or the other.
	LegacyFailed  map[string]string `json:"failed,omitempty"`
	LegacySkipped map[string]string `json:"skipped,omitempty"`
}

// BulkResult is the value of a result entry.
type BulkResult struct {
	Reason string `json:"reason"`
	// Attempts and RetryAt, for a tunnel the job retries (RetryingKey):
	// how often Cloudflare did not apply its key, and when it is sent
	// again.
	Attempts int       `json:"attempts,omitempty"`
	RetryAt  time.Time `json:"retry_at,omitzero"`
}

func BulkResultsPrefix(account string, minute int64) string {
	return fmt.Sprintf("%s%s/%010d/", BulkResultPrefix, account, minute)
}

// BulkResultKey is where the job of minute records that tunnel failed
// (skipped: was skipped).
func BulkResultKey(account string, minute int64, tunnel string, skipped bool) string {
	suffix := failedSuffix
	if skipped {
		suffix = skippedSuffix
	}
	return BulkResultsPrefix(account, minute) + tunnel + suffix
}

// RetryingKey is where the job of minute records that it retries tunnel
// (Cloudflare did not apply its key), with Cloudflare's reason. Such a
// tunnel is not counted: it is still remaining, and the entry goes when it
// is done or counted as failed.
func RetryingKey(account string, minute int64, tunnel string) string {
	return BulkResultsPrefix(account, minute) + tunnel + retryingSuffix
}

// counted reports whether the job has already accounted for tunnel's
// rotation: its entry, met again, is finished without a call. Two Gets at
// most, whatever the job's size.
func (j *BulkJob) Counted(ctx context.Context, s logical.Storage, account, tunnel string) (bool, error) {
	if _, ok := j.LegacyFailed[tunnel]; ok {
		return true, nil
	}
	if _, ok := j.LegacySkipped[tunnel]; ok {
		return true, nil
	}
	for _, skipped := range []bool{false, true} {
		key := BulkResultKey(account, j.Minute, tunnel, skipped)
		entry, err := s.Get(ctx, key)
		if err != nil {
			return false, fmt.Errorf("read bulk result %s: %w", key, err)
		}
		if entry != nil {
			return true, nil
		}
	}
	return false, nil
}

// BulkResults are the tunnels a job counted as failed and as skipped.
type BulkResults struct {
	Failed, Skipped map[string]bool
	// Retrying are the tunnels the job retries (RetryingKey): not counted.
	Retrying map[string]bool
}

func (r BulkResults) Counted(tunnel string) bool { return r.Failed[tunnel] || r.Skipped[tunnel] }

// results lists the job's failed and skipped tunnels: one List, and those
// an older version kept in the record.
func (j *BulkJob) Results(ctx context.Context, s logical.Storage, account string) (BulkResults, error) {
	r := BulkResults{Failed: map[string]bool{}, Skipped: map[string]bool{}, Retrying: map[string]bool{}}
	for tunnel := range j.LegacyFailed {
		r.Failed[tunnel] = true
	}
	for tunnel := range j.LegacySkipped {
		r.Skipped[tunnel] = true
	}
	keys, err := s.List(ctx, BulkResultsPrefix(account, j.Minute))
	if err != nil {
		return BulkResults{}, fmt.Errorf("list the results of the bulk rotation of account %s: %w", account, err)
	}
	for _, k := range keys {
		if tunnel, ok := strings.CutSuffix(k, failedSuffix); ok {
			r.Failed[tunnel] = true
		} else if tunnel, ok := strings.CutSuffix(k, skippedSuffix); ok {
			r.Skipped[tunnel] = true
		} else if tunnel, ok := strings.CutSuffix(k, retryingSuffix); ok {
			r.Retrying[tunnel] = true
		}
	}
	return r, nil
}

// listResults returns the first BulkListed of tunnels (failed or skipped
// ones of the job), in tunnel id order, each with its reason: at most
// BulkListed Gets.
func (j *BulkJob) ListResults(ctx context.Context, s logical.Storage, account string, tunnels map[string]bool, skipped bool) ([]map[string]any, error) {
	ids := make([]string, 0, len(tunnels))
	for tunnel := range tunnels {
		ids = append(ids, tunnel)
	}
	sort.Strings(ids)
	ids = ids[:min(len(ids), BulkListed)]
	legacy := j.LegacyFailed
	if skipped {
		legacy = j.LegacySkipped
	}
	out := make([]map[string]any, 0, len(ids))
	for _, tunnel := range ids {
		reason, ok := legacy[tunnel]
		// A reason an older version kept is bounded as new ones are.
		reason = BoundReason(reason)
		if !ok {
			key := BulkResultKey(account, j.Minute, tunnel, skipped)
			entry, err := s.Get(ctx, key)
			if err != nil {
				return nil, fmt.Errorf("read bulk result %s: %w", key, err)
			}
			var result BulkResult
			if entry != nil {
				if err := entry.DecodeJSON(&result); err != nil {
					return nil, fmt.Errorf("decode bulk result %s: %w", key, err)
				}
			}
			reason = result.Reason
		}
		out = append(out, map[string]any{"tunnel_id": tunnel, "reason": reason})
	}
	return out, nil
}

// ListRetrying returns the first BulkListed of tunnels (retried ones of
// the job), in tunnel id order, each with Cloudflare's reason, how often
// its key was not applied and when it is sent again: at most BulkListed
// Gets.
func (j *BulkJob) ListRetrying(ctx context.Context, s logical.Storage, account string, tunnels map[string]bool) ([]map[string]any, error) {
	ids := make([]string, 0, len(tunnels))
	for tunnel := range tunnels {
		ids = append(ids, tunnel)
	}
	sort.Strings(ids)
	out := make([]map[string]any, 0, min(len(ids), BulkListed))
	for _, tunnel := range ids[:min(len(ids), BulkListed)] {
		key := RetryingKey(account, j.Minute, tunnel)
		entry, err := s.Get(ctx, key)
		if err != nil {
			return nil, fmt.Errorf("read bulk result %s: %w", key, err)
		}
		var result BulkResult
		if entry != nil {
			if err := entry.DecodeJSON(&result); err != nil {
				return nil, fmt.Errorf("decode bulk result %s: %w", key, err)
			}
		}
		out = append(out, map[string]any{"tunnel_id": tunnel, "reason": result.Reason, "attempts": result.Attempts, "retry_at": FormatTime(result.RetryAt)})
	}
	return out, nil
}

// BoundReason cuts reason to at most MaxBulkReason bytes, on a character
// boundary, and says that it did.
func BoundReason(reason string) string {
	const cut = " …(cut)"
	if len(reason) <= MaxBulkReason {
		return reason
	}
	end := MaxBulkReason - len(cut)
	for end > 0 && !utf8.RuneStart(reason[end]) {
		end--
	}
	return reason[:end] + cut
}

// BulkProgress is a job's progress as the read of rotate/<account> reports
// it; Done + Failed + Skipped + Remaining = Queued.
type BulkProgress struct {
	Queued, Done, Failed, Skipped, Remaining int
	// Retrying counts the remaining tunnels the job retries because
	// Cloudflare did not apply their key.
	Retrying int
}

// abandoned reports whether the job is still marked queueing long after
// its writer must have finished or given up.
func (j *BulkJob) Abandoned(now time.Time) bool {
	return j.Queueing && now.Sub(j.StartedAt) > BulkQueueAbandoned
}

// progress counts the job's entries still queued, those it has not already
// counted (one whose delete failed may linger), and returns the job's
// results with it. Two Lists: the job's minute and its results.
func (j *BulkJob) Progress(ctx context.Context, s logical.Storage, account string, now time.Time) (BulkProgress, BulkResults, error) {
	r, err := j.Results(ctx, s, account)
	if err != nil {
		return BulkProgress{}, BulkResults{}, err
	}
	entries, err := BulkEntriesLeft(ctx, s, j.Minute, account)
	if err != nil {
		return BulkProgress{}, BulkResults{}, err
	}
	left := 0
	for tunnel := range entries {
		if !r.Counted(tunnel) {
			left++
		}
	}
	for tunnel := range r.Retrying {
		// A mark whose removal failed, of a tunnel done or counted since,
		// is not a retry.
		if !entries[tunnel] || r.Counted(tunnel) {
			delete(r.Retrying, tunnel)
		}
	}
	p := BulkProgress{Queued: j.Queued, Failed: len(r.Failed), Skipped: len(r.Skipped), Retrying: len(r.Retrying)}
	if j.Queueing {
		// None of its entries has been worked yet.
		if j.Abandoned(now) {
			p.Queued = left + p.Failed + p.Skipped
		}
		p.Remaining = max(p.Queued-p.Failed-p.Skipped, 0)
		return p, r, nil
	}
	p.Done = max(p.Queued-left-p.Failed-p.Skipped, 0)
	p.Remaining = max(p.Queued-p.Done-p.Failed-p.Skipped, 0)
	return p, r, nil
}

// bulkPrefix holds one job record per account, bulk/<account>.
const bulkPrefix = "bulk/"

func BulkJobKey(account string) string { return bulkPrefix + account }

// RunningBulkJob returns account's bulk job and its progress while it has
// rotations left (or is still being queued); false when there is none or
// it has finished. A Get and two Lists at most.
func RunningBulkJob(ctx context.Context, s logical.Storage, account string, now time.Time) (*BulkJob, BulkProgress, bool, error) {
	job, err := ReadBulkJob(ctx, s, account)
	if err != nil || job == nil {
		return nil, BulkProgress{}, false, err
	}
	p, _, err := job.Progress(ctx, s, account, now)
	if err != nil {
		return nil, BulkProgress{}, false, err
	}
	return job, p, job.Queueing || p.Remaining > 0, nil
}

func ReadBulkJob(ctx context.Context, s logical.Storage, account string) (*BulkJob, error) {
	entry, err := s.Get(ctx, BulkJobKey(account))
	if err != nil {
		return nil, fmt.Errorf("read bulk job of account %s: %w", account, err)
	}
	if entry == nil {
		return nil, nil
	}
	job := new(BulkJob)
	if err := entry.DecodeJSON(job); err != nil {
		return nil, fmt.Errorf("decode bulk job of account %s: %w", account, err)
	}
	return job, nil
}

func WriteBulkJob(ctx context.Context, s logical.Storage, account string, job *BulkJob) error {
	entry, err := logical.StorageEntryJSON(BulkJobKey(account), job)
	if err != nil {
		return fmt.Errorf("encode bulk job of account %s: %w", account, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store bulk job of account %s: %w", account, err)
	}
	return nil
}

// CleanBulkResults removes the result entries of jobs since replaced by a
// newer job of their account, at most limit of them, and reports whether
// any are left. Only the scheduler records results, and it calls this
// between entries, so no result is being written meanwhile; a job's minute
// only ever grows, so results of an earlier minute are never read again.
func CleanBulkResults(ctx context.Context, s logical.Storage, limit int) (more bool, err error) {
	accounts, err := s.List(ctx, BulkResultPrefix)
	if err != nil {
		return false, fmt.Errorf("list bulk results: %w", err)
	}
	for _, a := range accounts {
		account, ok := strings.CutSuffix(a, "/")
		if !ok {
			continue
		}
		job, err := ReadBulkJob(ctx, s, account)
		if err != nil {
			return false, err
		}
		minutes, err := s.List(ctx, BulkResultPrefix+a)
		if err != nil {
			return false, fmt.Errorf("list bulk results of account %s: %w", account, err)
		}
		for _, m := range minutes {
			minute, err := strconv.ParseInt(strings.TrimSuffix(m, "/"), 10, 64)
			if err != nil || job != nil && minute >= job.Minute {
				continue
			}
			prefix := BulkResultPrefix + a + m
			keys, err := s.List(ctx, prefix)
			if err != nil {
				return false, fmt.Errorf("list bulk results %s: %w", prefix, err)
			}
			for _, k := range keys {
				if limit == 0 {
					return true, nil
				}
				if err := s.Delete(ctx, prefix+k); err != nil {
					return false, fmt.Errorf("remove bulk result %s: %w", prefix+k, err)
				}
				limit--
			}
		}
	}
	return false, nil
}
