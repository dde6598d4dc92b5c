package background

// Bulk rotation jobs: rotate/<account> queues them (QueueAccount), the
// scheduler works their due/ entries (scheduler.go), and internal/store
// keeps their records and results.
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
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

// recordBulkResult counts t's rotation as failed (skipped: as skipped),
// with reason, in the job of minute: one small entry of its own. A job since
// replaced by a newer one is left alone. Recording the same tunnel again
// changes nothing.
func (w *Worker) recordBulkResult(ctx context.Context, s logical.Storage, t store.Tunnel, minute int64, skipped bool, reason string) error {
	w.jobsMu.Lock()
	defer w.jobsMu.Unlock()
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

// markRetrying records that the job of minute retries t, whose key
// Cloudflare did not apply, with Cloudflare's reason: one small entry of
// its own, shown in rotate/'s progress. A job since replaced is left alone.
func (w *Worker) markRetrying(ctx context.Context, s logical.Storage, t store.Tunnel, minute int64, result store.BulkResult) error {
	w.jobsMu.Lock()
	defer w.jobsMu.Unlock()
	job, err := store.ReadBulkJob(ctx, s, t.AccountID)
	if err != nil || job == nil || job.Minute != minute {
		return err
	}
	entry, err := logical.StorageEntryJSON(store.RetryingKey(t.AccountID, minute, t.TunnelID), result)
	if err != nil {
		return fmt.Errorf("encode bulk retry of %s: %w", t, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("record the bulk rotation retry of %s: %w", t, err)
	}
	return nil
}

// clearRetrying removes t's retrying mark from the job of minute, once it
// is done or counted. A mark that stays is not shown (Progress holds it
// against the entries left) and goes with the job's other results.
func (w *Worker) clearRetrying(ctx context.Context, s logical.Storage, t store.Tunnel, minute int64) {
	if err := s.Delete(ctx, store.RetryingKey(t.AccountID, minute, t.TunnelID)); err != nil {
		w.engine.TunnelLogger(t).Warn("could not remove a bulk rotation's retrying mark", "error", err)
	}
}

// startBulkJob records a new job of n rotations for account, queueing, in a
// minute of its own: the current one, or the one after the last job's when
// that was in this minute too, so that an entry of the last job that lingers
// (its delete failed) is never counted as this job's.
func (w *Worker) startBulkJob(ctx context.Context, s logical.Storage, account string, job *store.BulkJob) (*store.BulkJob, error) {
	w.jobsMu.Lock()
	defer w.jobsMu.Unlock()
	prev, err := store.ReadBulkJob(ctx, s, account)
	if err != nil {
		return nil, err
	}
	// Checked again under the lock that the job is written under: two
	// writes of rotate/ at once start one job.
	if err := w.refuseWhileRunning(ctx, s, account, prev); err != nil {
		return nil, err
	}
	minute := store.DueMinute(job.StartedAt, false)
	switch {
	case prev != nil && prev.Queued == 0 && !prev.Queueing:
		// A job that queued nothing left no entry and no result behind:
		// its minute may be this one's too. Taking the one after it, a
		// script that polls rotate/ with an older_than nothing matches
		// would push every later job a minute further into the future.
		minute = max(minute, prev.Minute)
	case prev != nil && prev.Minute >= minute:
		minute = prev.Minute + 1
	}
	job.Minute, job.Queueing = minute, true
	if err := store.WriteBulkJob(ctx, s, account, job); err != nil {
		return nil, err
	}
	// A status read shows the job while it runs.
	w.census.NoteBulkJob(ctx, s, account, job.StartedAt, job.Queued)
	return job, nil
}

// refuseWhileRunning refuses a new job of account while job (its last, nil
// when none) has rotations left: a second job would queue the same tunnels
// again and replace the record that counts the first.
func (w *Worker) refuseWhileRunning(ctx context.Context, s logical.Storage, account string, job *store.BulkJob) error {
	if job == nil {
		return nil
	}
	p, _, err := job.Progress(ctx, s, account, w.now())
	if err != nil {
		return err
	}
	if p.Remaining == 0 {
		return nil
	}
	return &JobRunningError{Account: account, StartedAt: job.StartedAt, Progress: p}
}

// JobRunningError refuses a bulk job of an account whose last job still
// has rotations left.
type JobRunningError struct {
	Account   string
	StartedAt time.Time
	Progress  store.BulkProgress
}

func (e *JobRunningError) Error() string {
	p := e.Progress
	return fmt.Sprintf("a bulk rotation of account %s started at %s is still running (queued %d, done %d, failed %d, skipped %d, remaining %d): "+
		"nothing was queued; read rotate/%s for its progress, and write again once remaining is 0",
		e.Account, store.FormatTime(e.StartedAt), p.Queued, p.Done, p.Failed, p.Skipped, p.Remaining, e.Account)
}

// finishQueueing records that the job of minute has its written entries,
// all it will have, and may be worked.
func (w *Worker) finishQueueing(ctx context.Context, s logical.Storage, account string, minute int64, written int) error {
	w.jobsMu.Lock()
	defer w.jobsMu.Unlock()
	job, err := store.ReadBulkJob(ctx, s, account)
	if err != nil || job == nil || job.Minute != minute {
		return err
	}
	job.Queued, job.Queueing = written, false
	return store.WriteBulkJob(ctx, s, account, job)
}

// closeAbandoned ends the queueing of a job of minute that lost its writer:
// none of its entries has been worked, so those present are all it has.
func (w *Worker) closeAbandoned(ctx context.Context, s logical.Storage, account string, minute int64) error {
	w.jobsMu.Lock()
	defer w.jobsMu.Unlock()
	job, err := store.ReadBulkJob(ctx, s, account)
	if err != nil || job == nil || job.Minute != minute || !job.Abandoned(w.now()) {
		return err
	}
	written, err := store.CountBulkEntries(ctx, s, minute, account, func(string) bool { return false })
	if err != nil {
		return err
	}
	// Listed tunnels it skipped when queued (bulkTargets) are results of
	// its own, and its only ones: none of its entries was worked.
	results, err := job.Results(ctx, s, account)
	if err != nil {
		return err
	}
	written += len(results.Failed) + len(results.Skipped)
	w.logger.Warn("a bulk rotation was left half queued; it counts the entries that were written",
		"account_id", account, "planned", job.Queued, "queued", written)
	job.Queued, job.Queueing = written, false
	return store.WriteBulkJob(ctx, s, account, job)
}

// BulkOptions are what rotate/<account> asks of a bulk job.
type BulkOptions struct {
	// OlderThan, when set, queues only the tunnels whose key was stored
	// longer ago.
	OlderThan time.Duration
	// IncludeUnmanaged also queues the tunnels Cloudflare lists (one list
	// call) that Vault does not manage yet: each is given its first key,
	// as a first write would, and comes under management.
	IncludeUnmanaged bool
}

// bulkTarget is one tunnel a job queues; listed is set for a tunnel Vault
// does not manage yet. skip says why a listed tunnel is counted skipped
// when the job is queued, with no entry (its t.TunnelID is then only a
// name for its result: listedName).
type bulkTarget struct {
	t      store.Tunnel
	listed *store.ListedTunnel
	skip   string
}

// bulkTargets lists the tunnels of account that a bulk rotation queues:
// every stored one, or (olderThan) those whose key was stored longer ago;
// and, with edge (the account as Cloudflare lists it), every listed tunnel
// Vault holds no record of, with its router facts as checked (ListedFacts).
//
// A listed tunnel whose id is not in the canonical form every path
// requires (store.CheckIdentifier) is skipped: its record would be a key
// that no path serves, writes or forgets, under an id Cloudflare may also
// answer to in its canonical form, which Vault could then manage with
// another key.
func (w *Worker) bulkTargets(ctx context.Context, s logical.Storage, account string, opts BulkOptions, edge []cloudflare.TunnelState, now time.Time) ([]bulkTarget, error) {
	tunnels, err := s.List(ctx, store.PSKPrefix+account+"/")
	if err != nil {
		return nil, fmt.Errorf("list tunnels of account %s: %w", account, err)
	}
	var targets []bulkTarget
	managed := make(map[string]bool, len(tunnels))
	for _, id := range tunnels {
		managed[id] = true
		t := store.Tunnel{AccountID: account, TunnelID: id}
		if opts.OlderThan > 0 {
			rec, err := store.ReadRecord(ctx, s, t)
			if err != nil {
				return nil, err
			}
			if rec == nil || now.Sub(rec.StoredAt) < opts.OlderThan {
				continue
			}
		}
		targets = append(targets, bulkTarget{t: t})
	}
	for i := range edge {
		e := &edge[i]
		if e.ID == "" {
			continue
		}
		if store.CheckIdentifier("tunnel_id", e.ID) != "" {
			name := listedName(e.ID)
			if !managed[name] {
				managed[name] = true
				targets = append(targets, bulkTarget{t: store.Tunnel{AccountID: account, TunnelID: name}, skip: fmt.Sprintf(
					"cloudflare listed it under the id %s, not in the canonical form, 32 lower-case hexadecimal characters (%d characters), "+
						"which no path of the engine accepts: it was not taken under management", shownListedID(e.ID), len(e.ID))})
			}
			continue
		}
		if managed[e.ID] {
			continue
		}
		managed[e.ID] = true // a listing that names a tunnel twice queues it once
		t := store.Tunnel{AccountID: account, TunnelID: e.ID}
		// Checked and bounded as a record's facts are: the entry is
		// stored until the job works it, and storage bounds its entries.
		targets = append(targets, bulkTarget{t: t, listed: &store.ListedTunnel{
			KeyGeneratedOn: e.PSKLastGeneratedOn, ListedAt: e.Date, Facts: w.engine.ListedFacts(t, e),
		}})
	}
	return targets, nil
}

// listedName names a listed tunnel whose id is not canonical in its
// job's results: "listed-" and the hex of the first 16 bytes of the id's
// SHA-256. The name is a storage key's last element, and an escaped id is
// not safe there whatever is escaped: Vault's file backend refuses a key
// holding ".." (a parent reference), so an id such as "0..0" made the
// result's Put fail and stopped the job's queueing. Hex is safe in every
// backend, bounded, and, with its prefix, never a canonical id that Vault
// may manage. The id itself is shown in the result's reason
// (shownListedID).
func listedName(id string) string {
	sum := sha256.Sum256([]byte(id))
	return "listed-" + hex.EncodeToString(sum[:16])
}

// shownListedID is a listed id as a skipped result's reason shows it:
// quoted with every byte outside printable ASCII escaped, and cut to
// maxShownListedID bytes of the id, so that whatever a listing holds the
// reason is small and shown safely.
func shownListedID(id string) string {
	const maxShownListedID = 64
	if len(id) > maxShownListedID {
		return strconv.QuoteToASCII(id[:maxShownListedID]) + "…"
	}
	return strconv.QuoteToASCII(id)
}

// queueBulkEntries writes the entries of a job of minute (and the results
// of the targets it skips), within store.BulkQueueLimit, and returns how
// many it wrote: all of them, or those before the first entry that failed,
// less the skipped results it could not record.
//
// A skipped result that cannot be recorded is logged and left out of the
// count (nothing of it is stored, so the job would count it done), and
// queueing goes on: it stands for a tunnel the job does not rotate, and
// the tunnels listed after it must not wait for the next job.
func (w *Worker) queueBulkEntries(ctx context.Context, s logical.Storage, targets []bulkTarget, minute int64, queuedAt time.Time) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, store.BulkQueueLimit)
	defer cancel()
	written := 0
	for _, target := range targets {
		if err := ctx.Err(); err != nil {
			return written, fmt.Errorf("queueing stopped after %s: %w", store.BulkQueueLimit, err)
		}
		if target.skip != "" {
			if err := w.recordBulkResult(ctx, s, target.t, minute, true, target.skip); err != nil {
				w.logger.Warn("could not record a skipped tunnel of a bulk rotation; it is left out of the job's count",
					"account_id", target.t.AccountID, "name", target.t.TunnelID, "error", err)
				continue
			}
			written++
			continue
		}
		due := store.DueEntry{Bulk: true, QueuedAt: queuedAt.UTC(), Unmanaged: target.listed}
		if err := store.WriteBulkEntry(ctx, s, target.t, minute, due); err != nil {
			return written, err
		}
		written++
	}
	return written, nil
}

// listUnmanaged is the account as Cloudflare lists it, when opts asks for
// the tunnels Vault does not manage (one call); nil otherwise.
func (w *Worker) listUnmanaged(ctx context.Context, s logical.Storage, account string, opts BulkOptions) ([]cloudflare.TunnelState, error) {
	if !opts.IncludeUnmanaged {
		return nil, nil
	}
	conn, err := w.connect(ctx, s)
	if err != nil {
		return nil, err
	}
	edge, err := conn.Edge.ListTunnels(ctx, account)
	if err != nil {
		return nil, fmt.Errorf("list the tunnels of account %s at Cloudflare (include_unmanaged): nothing was queued: %w", account, err)
	}
	return edge, nil
}

// ExpectedFinish estimates when n more rotations will be done at the pace
// the budget allows: a call each, or, with keys Vault makes, a call per
// batch of set_batch_size.
func (w *Worker) ExpectedFinish(ctx context.Context, s logical.Storage, n int) time.Time {
	calls := n
	if conn, err := w.connect(ctx, s); err == nil && conn.Settings.KeySource == store.KeySourceVault {
		size := max(conn.Settings.SetBatchSize, 1)
		calls = (n + size - 1) / size
	}
	limit, window := w.budget.Limit()
	return w.now().Add(time.Duration(calls) * window / time.Duration(limit)).UTC()
}

// BulkQueued is what a new bulk job queued: Queued tunnels, Unmanaged of
// them not managed by Vault before, Skipped of those counted skipped at once
// (listed under an id not in the canonical form).
type BulkQueued struct {
	Queued, Unmanaged, Skipped int
}

// QueueAccount starts a bulk job of account: every tunnel of it whose key
// Vault stores, or (OlderThan) those whose key was stored longer ago, and
// (IncludeUnmanaged) every tunnel Cloudflare lists that Vault does not
// manage, is queued for the scheduler, which rotates them paced under the
// budget. While the account's last job still has rotations left it fails
// with a *JobRunningError and queues nothing.
func (w *Worker) QueueAccount(ctx context.Context, s logical.Storage, account string, opts BulkOptions) (BulkQueued, error) {
	// Refused before the account's records are read; startBulkJob checks
	// again, under its lock.
	last, err := store.ReadBulkJob(ctx, s, account)
	if err != nil {
		return BulkQueued{}, err
	}
	if err := w.refuseWhileRunning(ctx, s, account, last); err != nil {
		return BulkQueued{}, err
	}
	edge, err := w.listUnmanaged(ctx, s, account, opts)
	if err != nil {
		return BulkQueued{}, err
	}
	now := w.now()
	targets, err := w.bulkTargets(ctx, s, account, opts, edge, now)
	if err != nil {
		return BulkQueued{}, err
	}
	unmanaged, skipped := 0, 0
	for _, target := range targets {
		if target.listed != nil || target.skip != "" {
			unmanaged++
		}
		if target.skip != "" {
			skipped++
		}
	}
	if skipped > 0 {
		w.logger.Warn("cloudflare listed tunnels under ids that are not in the canonical form; the bulk rotation skips them",
			"account_id", account, "skipped", skipped)
	}
	job, err := w.startBulkJob(ctx, s, account, &store.BulkJob{StartedAt: now.UTC(), Queued: len(targets), IncludeUnmanaged: opts.IncludeUnmanaged, Unmanaged: unmanaged})
	if err != nil {
		return BulkQueued{}, fmt.Errorf("record bulk rotation of account %s: %w", account, err)
	}
	written, qerr := w.queueBulkEntries(ctx, s, targets, job.Minute, now)
	// Recorded whatever the caller does meanwhile: the entries are stored.
	ferr := w.finishQueueing(context.WithoutCancel(ctx), s, account, job.Minute, written)
	w.Poke()
	// A job that could not record the end of its queueing stays marked
	// queueing until it is taken as abandoned; the scheduler then counts
	// its entries and works them.
	abandonedAt := store.FormatTime(job.StartedAt.Add(store.BulkQueueAbandoned))
	if qerr != nil {
		err := fmt.Errorf("queue bulk rotation of account %s: %d of %d tunnels were queued, and the job rotates and counts those only: %w",
			account, written, len(targets), qerr)
		if ferr != nil {
			err = fmt.Errorf("%w; recording how many also failed (%v), so they wait until %s", err, ferr, abandonedAt)
		}
		return BulkQueued{}, err
	}
	if ferr != nil {
		return BulkQueued{}, fmt.Errorf("queue bulk rotation of account %s: all %d tunnels were queued, but the job could not record that, so they wait until %s: %w",
			account, len(targets), abandonedAt, ferr)
	}
	return BulkQueued{Queued: written, Unmanaged: unmanaged, Skipped: skipped}, nil
}
