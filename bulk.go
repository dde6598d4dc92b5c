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
// Each failed or skipped tunnel is an entry of its own,
// bulkresult/<account>/<minute>/<tunnel>.failed (or .skipped), beside the
// job's small, fixed-size record bulk/<account>: recording one is a Put of a
// few hundred bytes (the reason is bounded, maxBulkReason), whether it is
// already counted two Gets, and counting them one List. Raft refuses an
// entry over max_entry_size (1 MiB by default, often less), so a job that
// kept its results in its one record, rewritten at each failure, could not
// record more than a few thousand, and did O(n²) work to get there. The
// results of a job replaced by a newer one are removed by the scheduler
// (cleanBulkResults), a bounded number per pass.
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
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

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

	bulkResultPrefix = "bulkresult/"
	failedSuffix     = ".failed"
	skippedSuffix    = ".skipped"
	// maxBulkReason bounds the reason kept for a failed or skipped tunnel
	// (an error from Cloudflare can carry a long message), so that every
	// result entry is small whatever went wrong.
	maxBulkReason = 1024
	// bulkListed bounds the tunnels a read of rotate/<account> lists as
	// failed, and as skipped, so that its answer stays small for any job;
	// the counts say how many there are in all.
	bulkListed = 100
)

// bulkJob is the progress of rotate/<account>.
type bulkJob struct {
	StartedAt time.Time `json:"started_at"`
	// Minute is the due/ minute that holds the job's entries, and names
	// its results (bulkResultKey).
	Minute int64 `json:"minute"`
	Queued int   `json:"queued"`
	// Queueing is set while rotate/ writes the job's entries.
	Queueing bool `json:"queueing,omitempty"`
	// LegacyFailed and LegacySkipped are the results a version before
	// result entries kept in the record (tunnel to reason). They are still
	// counted, beside the job's result entries, and never added to: a job
	// started by that version and finished by this one counts each tunnel
	// once, in one or the other.
	LegacyFailed  map[string]string `json:"failed,omitempty"`
	LegacySkipped map[string]string `json:"skipped,omitempty"`
}

// bulkResult is the value of a result entry.
type bulkResult struct {
	Reason string `json:"reason"`
}

func bulkResultsPrefix(account string, minute int64) string {
	return fmt.Sprintf("%s%s/%010d/", bulkResultPrefix, account, minute)
}

// bulkResultKey is where the job of minute records that tunnel failed
// (skipped: was skipped).
func bulkResultKey(account string, minute int64, tunnel string, skipped bool) string {
	suffix := failedSuffix
	if skipped {
		suffix = skippedSuffix
	}
	return bulkResultsPrefix(account, minute) + tunnel + suffix
}

// counted reports whether the job has already accounted for tunnel's
// rotation: its entry, met again, is finished without a call. Two Gets at
// most, whatever the job's size.
func (j *bulkJob) counted(ctx context.Context, s logical.Storage, account, tunnel string) (bool, error) {
	if _, ok := j.LegacyFailed[tunnel]; ok {
		return true, nil
	}
	if _, ok := j.LegacySkipped[tunnel]; ok {
		return true, nil
	}
	for _, skipped := range []bool{false, true} {
		key := bulkResultKey(account, j.Minute, tunnel, skipped)
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

// bulkResults are the tunnels a job counted as failed and as skipped.
type bulkResults struct {
	failed, skipped map[string]bool
}

func (r bulkResults) counted(tunnel string) bool { return r.failed[tunnel] || r.skipped[tunnel] }

// results lists the job's failed and skipped tunnels: one List, and those
// an older version kept in the record.
func (j *bulkJob) results(ctx context.Context, s logical.Storage, account string) (bulkResults, error) {
	r := bulkResults{failed: map[string]bool{}, skipped: map[string]bool{}}
	for tunnel := range j.LegacyFailed {
		r.failed[tunnel] = true
	}
	for tunnel := range j.LegacySkipped {
		r.skipped[tunnel] = true
	}
	keys, err := s.List(ctx, bulkResultsPrefix(account, j.Minute))
	if err != nil {
		return bulkResults{}, fmt.Errorf("list the results of the bulk rotation of account %s: %w", account, err)
	}
	for _, k := range keys {
		if tunnel, ok := strings.CutSuffix(k, failedSuffix); ok {
			r.failed[tunnel] = true
		} else if tunnel, ok := strings.CutSuffix(k, skippedSuffix); ok {
			r.skipped[tunnel] = true
		}
	}
	return r, nil
}

// listResults returns the first bulkListed of tunnels (failed or skipped
// ones of the job), in tunnel id order, each with its reason: at most
// bulkListed Gets.
func (j *bulkJob) listResults(ctx context.Context, s logical.Storage, account string, tunnels map[string]bool, skipped bool) ([]map[string]any, error) {
	ids := make([]string, 0, len(tunnels))
	for tunnel := range tunnels {
		ids = append(ids, tunnel)
	}
	sort.Strings(ids)
	ids = ids[:min(len(ids), bulkListed)]
	legacy := j.LegacyFailed
	if skipped {
		legacy = j.LegacySkipped
	}
	out := make([]map[string]any, 0, len(ids))
	for _, tunnel := range ids {
		reason, ok := legacy[tunnel]
		if !ok {
			key := bulkResultKey(account, j.Minute, tunnel, skipped)
			entry, err := s.Get(ctx, key)
			if err != nil {
				return nil, fmt.Errorf("read bulk result %s: %w", key, err)
			}
			var result bulkResult
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

// boundReason cuts reason to at most maxBulkReason bytes, on a character
// boundary, and says that it did.
func boundReason(reason string) string {
	const cut = " …(cut)"
	if len(reason) <= maxBulkReason {
		return reason
	}
	end := maxBulkReason - len(cut)
	for end > 0 && !utf8.RuneStart(reason[end]) {
		end--
	}
	return reason[:end] + cut
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
// counted (one whose delete failed may linger), and returns the job's
// results with it. Two Lists: the job's minute and its results.
func (j *bulkJob) progress(ctx context.Context, s logical.Storage, account string, now time.Time) (bulkProgress, bulkResults, error) {
	r, err := j.results(ctx, s, account)
	if err != nil {
		return bulkProgress{}, bulkResults{}, err
	}
	left, err := countBulkEntries(ctx, s, j.Minute, account, r.counted)
	if err != nil {
		return bulkProgress{}, bulkResults{}, err
	}
	p := bulkProgress{Queued: j.Queued, Failed: len(r.failed), Skipped: len(r.skipped)}
	if j.Queueing {
		// None of its entries has been worked yet.
		if j.abandoned(now) {
			p.Queued = left + p.Failed + p.Skipped
		}
		p.Remaining = max(p.Queued-p.Failed-p.Skipped, 0)
		return p, r, nil
	}
	p.Done = max(p.Queued-left-p.Failed-p.Skipped, 0)
	p.Remaining = max(p.Queued-p.Done-p.Failed-p.Skipped, 0)
	return p, r, nil
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
// with reason, in the job of minute: one small entry of its own. A job since
// replaced by a newer one is left alone. Recording the same tunnel again
// changes nothing.
func (b *backend) recordBulkResult(ctx context.Context, s logical.Storage, t tunnelRef, minute int64, skipped bool, reason string) error {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := readBulkJob(ctx, s, t.AccountID)
	if err != nil || job == nil || job.Minute != minute {
		return err
	}
	if counted, err := job.counted(ctx, s, t.AccountID, t.TunnelID); err != nil || counted {
		return err
	}
	key := bulkResultKey(t.AccountID, minute, t.TunnelID, skipped)
	entry, err := logical.StorageEntryJSON(key, bulkResult{Reason: boundReason(reason)})
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
	p, _, err := job.progress(ctx, s, account, b.now())
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

// cleanBulkResults removes the result entries of jobs since replaced by a
// newer job of their account, at most limit of them, and reports whether
// any are left. Only the scheduler records results, and it calls this
// between entries, so no result is being written meanwhile; a job's minute
// only ever grows, so results of an earlier minute are never read again.
func cleanBulkResults(ctx context.Context, s logical.Storage, limit int) (more bool, err error) {
	accounts, err := s.List(ctx, bulkResultPrefix)
	if err != nil {
		return false, fmt.Errorf("list bulk results: %w", err)
	}
	for _, a := range accounts {
		account, ok := strings.CutSuffix(a, "/")
		if !ok {
			continue
		}
		job, err := readBulkJob(ctx, s, account)
		if err != nil {
			return false, err
		}
		minutes, err := s.List(ctx, bulkResultPrefix+a)
		if err != nil {
			return false, fmt.Errorf("list bulk results of account %s: %w", account, err)
		}
		for _, m := range minutes {
			minute, err := strconv.ParseInt(strings.TrimSuffix(m, "/"), 10, 64)
			if err != nil || job != nil && minute >= job.Minute {
				continue
			}
			prefix := bulkResultPrefix + a + m
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
