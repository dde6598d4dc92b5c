package background

// The scheduler: one per mount, on the node that may write storage, from
// Initialize to Clean. It works off the schedule (internal/store/due.go) one
// rotation at a time, and only while the mount's budget (config rate_limit)
// has more than a reserve left, so operators' own writes are not starved by
// the fleet.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

const (
	// repairPerPass bounds the records one pass reads for the repair walk
	// (repairSchedule), so a mount with a great many tunnels still starts
	// at once and no pass is held up for long.
	repairPerPass = 1000
	// repairEvery is how often a new repair walk starts. Each walk reads
	// every record (seal-wrapped storage, so not free), and it only has work
	// after a storage failure, so it is paced: a lost entry is back within
	// repairEvery plus the walk's own passes.
	repairEvery = 10 * time.Minute
	// maxSleep bounds a pass's sleep, however far the next known rotation
	// is: entries are also written behind the loop's back (the repair walk,
	// a record replicated from another node), and those must not wait for a
	// rotation due next month.
	maxSleep = time.Minute
	// minSleep keeps the loop from spinning on a rotation due a moment
	// from now.
	minSleep = 10 * time.Millisecond
	// BulkCleanEvery is how often the results of replaced bulk jobs are
	// looked for (a List of accounts that have results, and of their
	// jobs' minutes), and bulkCleanPerPass how many one pass removes: a
	// job's results outlive it by that much at worst, and no pass is held
	// up for long by a large one.
	BulkCleanEvery   = 10 * time.Minute
	bulkCleanPerPass = 1000
)

// scheduler works off one mount's due rotations.
type scheduler struct {
	w       *Worker
	storage logical.Storage
	// mu serialises passes: the loop's and those a test runs directly
	// must never work the same entry twice.
	mu     sync.Mutex
	wake   chan struct{}
	cancel context.CancelFunc
	// done is closed when the loop has returned, or, for a held
	// scheduler that never ran one, when it is stopped: either way it
	// reads as stopped. doneOnce guards the close.
	done     chan struct{}
	doneOnce sync.Once

	// The repair walk, in memory only: a new process starts with a walk.
	// repairing is set while a walk is under way (its place is the
	// census's), repairStarted when it began. Guarded by mu.
	repairing     bool
	repairStarted time.Time
	// When the results of replaced bulk jobs were last cleaned, and
	// whether some were left for the next pass. Guarded by mu.
	cleanedAt time.Time
	cleanMore bool
	// fitted is, by account, the batch size of keys Cloudflare last took
	// after refusing a larger one (batch.go). Guarded by mu.
	fitted map[string]fittedSize
	// summarizedAt is when the schedule was last summarized for status
	// reads (summarizeSchedule). Guarded by mu.
	summarizedAt time.Time
}

func newScheduler(w *Worker, s logical.Storage) *scheduler {
	return &scheduler{w: w, storage: s, wake: make(chan struct{}, 1), done: make(chan struct{}), fitted: map[string]fittedSize{}}
}

// start runs the scheduler until stop.
func (sc *scheduler) start() {
	ctx, cancel := context.WithCancel(context.Background())
	sc.cancel = cancel
	go sc.run(ctx)
}

// stop cancels the loop, the rotation in progress included, and waits until
// the loop has returned. A rotation cancelled half way is left as any
// interrupted rotation is: rotation_unknown, resolved by reconciliation.
func (sc *scheduler) stop() {
	if sc.cancel == nil {
		sc.finished()
		return
	}
	sc.cancel()
	<-sc.done
}

// finished marks the scheduler stopped.
func (sc *scheduler) finished() { sc.doneOnce.Do(func() { close(sc.done) }) }

// poke wakes the loop early, after new rotations were queued.
func (sc *scheduler) poke() {
	select {
	case sc.wake <- struct{}{}:
	default:
	}
}

func (sc *scheduler) run(ctx context.Context) {
	defer sc.finished()
	for ctx.Err() == nil {
		wait := sc.pass(ctx)
		select {
		case <-ctx.Done():
			return
		case <-sc.wake:
		case <-sc.w.after(wait):
		}
	}
}

// pass works off what is due now and returns how long to sleep before the
// next pass.
func (sc *scheduler) pass(ctx context.Context) time.Duration {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	w := sc.w
	if !w.mayWrite() {
		return time.Minute
	}
	sc.housekeeping(ctx)
	// Nothing can rotate without config; the entries wait for it. Each item
	// connects again (sc.connect): the client is cached, and a pass can run
	// for minutes, over which config/rotate-root can kill the token.
	if _, err := w.connect(ctx, sc.storage); err != nil {
		return time.Minute
	}
	p := &passState{held: map[heldJob]bool{}}
	// One batch in memory at a time, each loaded after the last key of the
	// one before: entries the pass keeps (settling, not due until later in
	// their minute, a job still queueing or held) never stop it from
	// reaching later ones, another account's schedule among them.
	after := ""
	for {
		items, next, err := store.LoadDue(ctx, sc.storage, w.now(), after)
		if err != nil {
			w.logger.Warn("scheduler could not load due rotations", "error", err)
			return 10 * time.Second
		}
		p.earliest(next)
		if wait, stop := sc.workBatch(ctx, p, items); stop {
			return wait
		}
		if len(items) < store.DueBatch {
			return sc.sleepUntil(p.wake, maxSleep)
		}
		after = items[len(items)-1].Key
		if wait, stop := sc.scheduledAhead(ctx, p, items[len(items)-1].Minute); stop {
			return wait
		}
		if !p.keptDue.IsZero() && !w.now().Before(p.keptDue) {
			// A rotation this pass met before it was due, later in its
			// minute, is due now: start again from the first entry, so
			// that it waits a batch behind a long bulk job, not the rest
			// of the pass. It is worked then, so this happens once for it.
			after, p = "", &passState{held: map[heldJob]bool{}}
		}
		// A paced bulk run is one long pass: between batches, as at a
		// pass's start.
		if !w.mayWrite() {
			return time.Minute
		}
		sc.housekeeping(ctx)
	}
}

// scheduledAhead works, between two batches of a long pass, the scheduled
// rotations of the minutes after the batch's that have come due by now: a
// bulk job's entries fill the minute it was queued in, and a rotation due a
// minute later would otherwise wait behind all of them, and miss its
// rotation_window. They are met again when the pass gets to their minute,
// finished by then.
func (sc *scheduler) scheduledAhead(ctx context.Context, p *passState, batchMinute int64) (time.Duration, bool) {
	if store.DueMinute(sc.w.now(), false) <= batchMinute {
		return 0, false
	}
	items, err := store.LoadScheduledAfter(ctx, sc.storage, sc.w.now(), batchMinute)
	if err != nil {
		sc.w.logger.Warn("scheduler could not load the rotations due after a long run of bulk entries", "error", err)
		return 0, false
	}
	return sc.workBatch(ctx, p, items)
}

// passState is what a pass learns as it goes.
type passState struct {
	// held are the bulk jobs whose result could not be recorded, or whose
	// finished entry could not be removed, in this pass: their other
	// entries wait for the next pass, so that a storage failure costs one
	// Cloudflare call a pass, not one per entry, and every other entry is
	// still worked.
	held map[heldJob]bool
	// wake is the earliest time something loaded or listed falls due.
	wake time.Time
	// keptDue is the earliest time a scheduled rotation the pass kept,
	// because it was not due yet in its minute, falls due.
	keptDue time.Time
}

// earliest makes at the pass's wake time if it comes first.
func (p *passState) earliest(at time.Time) {
	if !at.IsZero() && (p.wake.IsZero() || at.Before(p.wake)) {
		p.wake = at
	}
}

// workBatch works one batch of due entries. stop, with how long to sleep,
// ends the pass: Cloudflare or the budget said "not now", or the pass was
// cancelled.
func (sc *scheduler) workBatch(ctx context.Context, p *passState, items []store.DueItem) (wait time.Duration, stop bool) {
	// With keys Vault makes, a bulk job's entries are gathered into
	// batches, one Set call each (batch.go); the rest one at a time.
	conn, setsKeys := sc.setsKeys(ctx)
	g := newSetGather()
	for _, item := range items {
		if item.Bulk && p.held[heldJobOf(item)] {
			continue
		}
		if item.Bulk && setsKeys {
			if wait, stop := sc.gather(ctx, p, g, conn, item); stop {
				g.release()
				return wait, true
			}
			continue
		}
		if wait, stop := sc.flushHolding(ctx, p, g, item.Tunnel); stop {
			g.release()
			return wait, true
		}
		if wait := sc.awaitBudget(ctx); wait > 0 {
			g.release()
			return wait, true
		}
		if ctx.Err() != nil {
			g.release()
			return 0, true
		}
		outcome := sc.rotateDue(ctx, item)
		if outcome.postpone > 0 {
			g.release()
			return outcome.postpone, true
		}
		sc.settle(ctx, p, item, outcome)
	}
	return sc.flushAll(ctx, p, g)
}

// settle records what became of a worked entry in the pass, and removes a
// finished one from the schedule.
func (sc *scheduler) settle(ctx context.Context, p *passState, item store.DueItem, outcome dueOutcome) {
	w := sc.w
	p.earliest(outcome.notBefore)
	// (A bulk entry kept until later, a retry or a batch's pending key, is
	// no scheduled rotation met early: it does not restart the pass.)
	if !item.Bulk && !outcome.finished && !outcome.holdJob && !outcome.notBefore.IsZero() &&
		(p.keptDue.IsZero() || outcome.notBefore.Before(p.keptDue)) {
		p.keptDue = outcome.notBefore
	}
	if outcome.holdJob && item.Bulk {
		p.held[heldJobOf(item)] = true
	}
	if !outcome.finished {
		return
	}
	// The one place a worked entry leaves the schedule. An entry whose
	// delete fails is met again on a later pass, and is finished then
	// without a second rotation (rotateBulk; a scheduled rotation has
	// moved its record on): never forgotten in silence, never worked
	// twice. The rest of its job waits, as for a result that could not
	// be recorded.
	if err := sc.storage.Delete(ctx, item.Key); err != nil {
		w.logger.Warn("scheduler could not remove a finished entry", "entry", item.Key, "error", err)
		p.earliest(w.now().Add(storageRetry))
		if item.Bulk {
			p.held[heldJobOf(item)] = true
		}
	}
}

// housekeeping is what a pass does besides rotating, before it loads a
// batch: the repair walk (before loading, so an entry put back is worked at
// once when its time has come) and removing the results of replaced bulk
// jobs. Both are paced by their own clocks.
func (sc *scheduler) housekeeping(ctx context.Context) {
	sc.repairSchedule(ctx)
	sc.cleanBulkResults(ctx)
	sc.summarizeSchedule(ctx)
	// At most every store.CensusFoldEvery, and only if something changed:
	// what a standby's status read shows.
	if err := sc.w.census.Fold(ctx, sc.storage); err != nil {
		sc.w.logger.Warn("could not write the census; it tries again next pass", "error", err)
	}
}

// summarizeSchedule tells the census, at most every
// store.CensusFoldEvery, how many scheduled rotations are overdue and when
// the next is: a status read shows it, and must not list the schedule
// itself (store.SummarizeSchedule says why).
func (sc *scheduler) summarizeSchedule(ctx context.Context) {
	now := sc.w.now()
	if !sc.summarizedAt.IsZero() && now.Sub(sc.summarizedAt) < store.CensusFoldEvery {
		return
	}
	sum, err := store.SummarizeSchedule(ctx, sc.storage, now)
	if err != nil {
		sc.w.logger.Warn("could not summarize the schedule for status reads; it tries again next pass", "error", err)
		return
	}
	sc.summarizedAt = now
	sc.w.census.NoteSchedule(ctx, sc.storage, sum, now)
}

// storageRetry is how soon a pass comes back for an entry kept because
// storage failed.
const storageRetry = 10 * time.Second

// heldJob names a bulk job by its account and minute.
type heldJob struct {
	account string
	minute  int64
}

func heldJobOf(item store.DueItem) heldJob { return heldJob{item.Tunnel.AccountID, item.Minute} }

// cleanBulkResults removes some results of replaced bulk jobs (jobs.go),
// every BulkCleanEvery, and on the next pass again while there are more.
func (sc *scheduler) cleanBulkResults(ctx context.Context) {
	now := sc.w.now()
	if !sc.cleanMore && !sc.cleanedAt.IsZero() && now.Sub(sc.cleanedAt) < BulkCleanEvery {
		return
	}
	sc.cleanedAt = now
	more, err := store.CleanBulkResults(ctx, sc.storage, bulkCleanPerPass)
	if err != nil {
		sc.w.logger.Warn("scheduler could not remove the results of replaced bulk rotations; it tries again later", "error", err)
	}
	sc.cleanMore = more
}

// sleepUntil is how long the loop sleeps to wake at wake (zero: nothing
// known), at most limit and at most maxSleep. The loop's timer never fires
// early, and the record decides anyway, so waking at the due time to the
// millisecond rotates on time and never before.
func (sc *scheduler) sleepUntil(wake time.Time, limit time.Duration) time.Duration {
	limit = min(limit, maxSleep)
	if wake.IsZero() {
		return limit
	}
	return min(max(wake.Sub(sc.w.now()), minSleep), limit)
}

// repairSchedule puts back the schedule entries that storage failed to
// keep. A tunnel's record (RotationPeriod, NextRotation) is the truth about
// its schedule and its due/ entry only an index, written beside it; when that
// write fails (a rotation logs it and goes on: the key is stored, which is
// what matters), nothing would ever rotate the tunnel again. The walk reads
// at most repairPerPass records per pass, resuming after the last one; a new
// walk starts at the scheduler's first pass and then every repairEvery.
// The census (store.Census) counts every record as the walk reads it, and
// when the walk has read the last one its counts replace the census's: the
// counts are exact again after anything that made them wrong.
//
// It takes no tunnel lock: it only ever adds an entry, and an entry that a
// concurrent rotation made stale (the record moved on meanwhile) is dropped
// by the scheduler when its minute comes, as any stale entry is.
func (sc *scheduler) repairSchedule(ctx context.Context) {
	now := sc.w.now()
	if !sc.repairing {
		if !sc.repairStarted.IsZero() && now.Sub(sc.repairStarted) < repairEvery {
			return
		}
		sc.repairing, sc.repairStarted = true, now
		sc.w.census.StartWalk()
	}
	var failed *store.Tunnel
	done, err := sc.w.census.WalkStep(ctx, sc.storage, repairPerPass, func(t store.Tunnel, rec *store.Record) error {
		err := sc.repairEntry(ctx, t, rec)
		if err != nil {
			failed = &t
		}
		return err
	})
	// A record that cannot be read or checked is passed over (and logged),
	// so one corrupt record cannot stop every walk at the same place; the
	// pass stops there, so a storage outage is not a thousand warnings.
	switch {
	case err != nil && failed != nil:
		sc.w.engine.TunnelLogger(*failed).Warn("schedule repair could not check a tunnel", "error", err)
	case err != nil:
		sc.w.logger.Warn("schedule repair could not read the records; it resumes next pass", "error", err)
	}
	if done {
		sc.repairing = false
	}
}

// repairEntry writes t's due/ entry when its record, rec, has a next
// rotation and the entry is missing.
func (sc *scheduler) repairEntry(ctx context.Context, t store.Tunnel, rec *store.Record) error {
	if rec == nil || !rec.Scheduled() || rec.NextRotation.IsZero() || rec.State == store.StateTunnelGone {
		return nil
	}
	// An entry an older version wrote, a minute later, is still honoured.
	for _, key := range store.ScheduleKeys(rec.NextRotation, t) {
		entry, err := sc.storage.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("read schedule entry %s: %w", key, err)
		}
		if entry != nil {
			return nil
		}
	}
	if err := store.ScheduleRotation(ctx, sc.storage, t, rec.NextRotation); err != nil {
		return err
	}
	sc.w.engine.TunnelLogger(t).Warn("the next rotation had no schedule entry; restored it", "next_rotation", store.FormatTime(rec.NextRotation))
	return nil
}

// awaitBudget returns how long to wait before the scheduler may spend a
// call: it keeps a reserve of the budget for operators' own requests.
func (sc *scheduler) awaitBudget(ctx context.Context) time.Duration {
	for {
		ok, wait := sc.w.backgroundBudget()
		if ok {
			return 0
		}
		if wait <= 0 {
			wait = 50 * time.Millisecond
		}
		// Short waits are slept here, so a paced bulk run is one pass.
		if wait > 2*time.Second {
			return wait
		}
		select {
		case <-ctx.Done():
			return time.Second
		case <-sc.w.after(wait):
		}
	}
}

// dueOutcome is what became of one due entry.
type dueOutcome struct {
	// finished: the entry is done with (rotated, failed for good and
	// rescheduled or counted, or stale) and leaves the schedule.
	finished bool
	// postpone, when set, ends the pass and keeps the entry: Cloudflare or
	// the budget said "not now".
	postpone time.Duration
	// notBefore, when set, keeps the entry: the rotation falls due later
	// in the entry's minute, or storage failed, and the pass wakes then.
	notBefore time.Time
	// holdJob keeps the entry and every other entry of its bulk job for
	// the rest of the pass: the job cannot be read or be worked yet, or
	// its result could not be recorded.
	holdJob bool
}

var (
	dueFinished = dueOutcome{finished: true}
	// dueKept leaves the entry for a later pass: storage failed, or the
	// tunnel cannot be worked yet.
	dueKept = dueOutcome{}
	// dueHeld leaves the entry, and the rest of its job, for a later pass.
	dueHeld = dueOutcome{holdJob: true}
)

// rotateDue works one due entry and says what becomes of it.
func (sc *scheduler) rotateDue(ctx context.Context, item store.DueItem) dueOutcome {
	log := sc.w.engine.TunnelLogger(item.Tunnel)
	due, err := store.ReadDueEntry(ctx, sc.storage, item.Key)
	switch {
	case errors.Is(err, store.ErrCorruptDueEntry):
		log.Warn("schedule entry does not decode; the tunnel's record decides", "error", err)
	case err != nil:
		log.Warn("scheduler could not read a schedule entry", "error", err)
		return dueKept
	}
	if due == nil {
		return dueFinished
	}
	if item.Bulk || due.Bulk {
		return sc.rotateBulk(ctx, item, due)
	}
	return sc.rotateScheduled(ctx, item)
}

// rotateScheduled works a tunnel's scheduled rotation.
func (sc *scheduler) rotateScheduled(ctx context.Context, item store.DueItem) dueOutcome {
	w, s, t := sc.w, sc.storage, item.Tunnel
	log := w.engine.TunnelLogger(t)
	defer w.engine.Lock(t)()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		log.Warn("scheduler could not read a record", "error", err)
		return dueKept
	}
	if rec == nil || !rec.Scheduled() || !store.EntryMatches(rec.NextRotation, item.Minute) || rec.State == store.StateTunnelGone {
		// Forgotten, rescheduled since, or gone at Cloudflare (a write, or
		// the drift sweep once Cloudflare lists it again, brings it back
		// with a schedule entry of its own): the entry is stale.
		return dueFinished
	}
	now := w.now()
	if now.Before(rec.NextRotation) {
		// Entries are loaded by the minute; the record says the second.
		return dueOutcome{notBefore: rec.NextRotation}
	}
	if !rec.WindowEnds.IsZero() && now.After(rec.WindowEnds) {
		return sc.missedWindow(ctx, t, rec, now)
	}
	if rec.Settling(w.now()) {
		// The last rotation's outcome is unknown and Cloudflare may still
		// carry out its request: a generate now could be overtaken by it,
		// and Vault would call current a key the edge replaced a moment
		// later. No call; the entry waits until the record has settled.
		return dueKept
	}
	conn, err := sc.connect(ctx)
	if err != nil {
		return dueOutcome{postpone: time.Minute}
	}
	_, err = w.engine.RotateNow(ctx, s, conn, t, rec, rotation.TriggerSchedule)
	if outcome, notNow := notNowOutcome(err); notNow {
		return outcome
	}
	switch {
	case err == nil:
		// The rotation scheduled the next one.
		return dueFinished
	case rotation.TunnelGone(err):
		// The tunnel is gone: no more retries, hourly or otherwise.
		if latest, rerr := store.ReadRecord(ctx, s, t); rerr == nil && latest != nil {
			if _, merr := w.engine.MarkGone(ctx, s, t, latest); merr != nil {
				log.Warn("could not record that the tunnel is gone", "error", merr)
				return dueKept
			}
		}
		return dueFinished
	}
	log.Warn("scheduled rotation failed", "error", err)
	if rerr := w.engine.RetryLater(ctx, s, t, err); rerr != nil {
		// The entry is the tunnel's only place in the schedule until a
		// replacement is stored: keep it, and the next pass tries again.
		log.Warn("could not reschedule a failed rotation; its schedule entry is kept", "error", rerr)
		return dueKept
	}
	return dueFinished
}

// missedWindow moves a scheduled rotation that could not start within its
// rotation_window (the budget was spent, the last rotation was settling or
// kept failing, Vault was down) to the schedule's next time, and says so in
// the record (schedule_note): a rotation outside the maintenance window it
// was planned for would take the tunnel down when nobody expects it. Nothing
// is sent to Cloudflare. The caller holds t's lock.
func (sc *scheduler) missedWindow(ctx context.Context, t store.Tunnel, rec *store.Record, now time.Time) dueOutcome {
	w, s := sc.w, sc.storage
	log := w.engine.TunnelLogger(t)
	sched := rec.Schedule()
	scheduledFor := rec.WindowEnds.Add(-sched.Window)
	why := "the scheduler could not start it in time (the budget was spent, the last rotation was still settling, or Vault was down)"
	if rec.Failures > 0 {
		why = fmt.Sprintf("%d attempt(s) failed, the last: %s", rec.Failures, rec.LastFailure)
	}
	conn, err := w.connect(ctx, s)
	if err != nil {
		log.Warn("could not read min_rotation_period to move a rotation that missed its window; its schedule entry is kept", "error", err)
		return dueKept
	}
	floor := conn.Settings.MinRotationPeriod
	moved := *rec
	moved.NextRotation, moved.WindowEnds = sched.NextAfterRotation(rec.StoredAt, now, floor)
	next := "none: the schedule has no later time"
	if !moved.NextRotation.IsZero() {
		next = store.FormatTime(moved.NextRotation)
	}
	moved.ScheduleNote = fmt.Sprintf("the rotation scheduled for %s could not start within rotation_window (%s) of it: %s; it waits for the next scheduled time, %s",
		store.FormatTime(scheduledFor), sched.Window, why, next)
	// The entry being worked is the pass's to remove once this is stored.
	if _, err := store.SaveScheduled(ctx, s, &moved, time.Time{}, false); err != nil {
		log.Warn("could not move a rotation that missed its window; its schedule entry is kept", "error", err)
		return dueKept
	}
	log.Warn("scheduled rotation missed its window; waiting for the next scheduled time",
		"scheduled_for", store.FormatTime(scheduledFor), "next_rotation", store.FormatTime(moved.NextRotation))
	// Finished, and the pass wakes for the next time, which may be within
	// the minute.
	return dueOutcome{finished: true, notBefore: moved.NextRotation}
}

// rotateBulk works a bulk job's rotation of one tunnel. The job counts each
// tunnel once (jobs.go), however often a pass meets its entry: an entry
// whose delete failed is met again, and must neither rotate nor count twice.
func (sc *scheduler) rotateBulk(ctx context.Context, item store.DueItem, due *store.DueEntry) dueOutcome {
	w, s, t := sc.w, sc.storage, item.Tunnel
	tracked, queuedAt, outcome, done := sc.bulkEntryOfItsJob(ctx, item, due)
	if done {
		return outcome
	}
	defer w.engine.Lock(t)()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		w.engine.TunnelLogger(t).Warn("scheduler could not read a record", "error", err)
		return dueKept
	}
	if rec == nil && due.Unmanaged != nil {
		return sc.rotateUnmanaged(ctx, item, due, tracked)
	}
	if rec == nil {
		return sc.countBulk(ctx, item, tracked, true, reasonDeleted)
	}
	if !queuedAt.IsZero() && rec.StoredAt.After(queuedAt) {
		// A key was stored since the job was queued: by this job, on a pass
		// whose delete of the entry failed, or by anyone else. Either way
		// the rotation asked for has happened; it counts as done.
		return dueFinished
	}
	if rec.Settling(w.now()) {
		return dueKept // as for a scheduled rotation
	}
	conn, err := sc.connect(ctx)
	if err != nil {
		return dueOutcome{postpone: time.Minute}
	}
	rotated, err := w.engine.RotateNow(ctx, s, conn, t, rec, rotation.TriggerBulk)
	return sc.bulkRotated(ctx, item, tracked, rotated, err, bulkTexts{
		noKey:  "not stored in Vault any more: its only rotation turned out never to have happened, so Vault held no key for it",
		failed: "bulk rotation failed"})
}

// bulkTexts are what bulkRotated says: noKey the reason an entry is
// skipped when its rotation left no key, failed what is logged when the
// rotation failed.
type bulkTexts struct{ noKey, failed string }

// bulkRotated is what becomes of a bulk job's entry once its tunnel's
// rotation returned rotated and err.
func (sc *scheduler) bulkRotated(ctx context.Context, item store.DueItem, tracked bool, rotated *store.Record, err error, say bulkTexts) dueOutcome {
	if outcome, notNow := notNowOutcome(err); notNow {
		return outcome
	}
	switch {
	case err == nil && rotated == nil:
		return sc.countBulk(ctx, item, tracked, true, say.noKey)
	case err == nil:
		return dueFinished
	case rotation.TunnelGone(err):
		// A 404 of the tunnel's own (not of the Set operation, which is
		// the account's).
		return sc.countBulk(ctx, item, tracked, true, reasonGone)
	}
	sc.w.engine.TunnelLogger(item.Tunnel).Warn(say.failed, "error", err)
	return sc.countBulk(ctx, item, tracked, false, err.Error())
}

// The reasons a bulk job shows for a tunnel it skipped.
const (
	reasonGone    = "no longer exists at Cloudflare (deleted, or out of the API token's reach)"
	reasonDeleted = "not stored in Vault any more: its key was deleted after the job was queued"
)

// rotateUnmanaged gives a tunnel Vault did not manage when its job was
// queued (include_unmanaged) its first key, as a first write does, from
// what the job's listing said of it. The caller holds t's lock.
func (sc *scheduler) rotateUnmanaged(ctx context.Context, item store.DueItem, due *store.DueEntry, tracked bool) dueOutcome {
	conn, err := sc.connect(ctx)
	if err != nil {
		return dueOutcome{postpone: time.Minute}
	}
	rotated, err := sc.w.engine.RotateUnmanaged(ctx, sc.storage, conn, item.Tunnel, listedState(item.Tunnel, due), rotation.TriggerBulk)
	// No key made would be a validation only: cannot happen for a bulk
	// rotation.
	return sc.bulkRotated(ctx, item, tracked, rotated, err, bulkTexts{
		noKey: "no key was made", failed: "bulk rotation of a tunnel not managed before failed"})
}

// bulkEntryOfItsJob holds a bulk entry against the job it belongs to.
// tracked says the entry is the current job's, which counts it (an entry
// of an older version, without the key suffix, is worked without being
// counted), and queuedAt when it was queued. done says the entry needs no
// rotation now, and outcome what becomes of it: its job was replaced, is
// still being queued, already counted it, or cannot be read.
func (sc *scheduler) bulkEntryOfItsJob(ctx context.Context, item store.DueItem, due *store.DueEntry) (tracked bool, queuedAt time.Time, outcome dueOutcome, done bool) {
	w, s, t := sc.w, sc.storage, item.Tunnel
	log := w.engine.TunnelLogger(t)
	retry := dueOutcome{holdJob: true, notBefore: w.now().Add(storageRetry)}
	job, err := store.ReadBulkJob(ctx, s, t.AccountID)
	if err != nil {
		log.Warn("scheduler could not read a bulk job; its entries wait for the next pass", "error", err)
		return false, time.Time{}, retry, true
	}
	// tracked: the entry is the current job's, which counts it. An entry of
	// an older version (no key suffix) is worked without being counted.
	tracked = job != nil && job.Minute == item.Minute
	if item.Bulk && !tracked {
		// The job that queued it was replaced by a newer one, which is only
		// allowed once it had worked every entry: this one was counted, and
		// its delete failed.
		return false, time.Time{}, dueFinished, true
	}
	if tracked && job.Abandoned(w.now()) {
		if err := w.closeAbandoned(ctx, s, t.AccountID, item.Minute); err != nil {
			log.Warn("scheduler could not close a bulk job left half queued", "error", err)
			return tracked, time.Time{}, retry, true
		}
		job.Queueing = false
	}
	if tracked && job.Queueing {
		// rotate/ is still writing the job's entries: working one now
		// would make the count inexact until it has finished. It pokes
		// the scheduler when it has.
		return tracked, time.Time{}, dueHeld, true
	}
	if tracked {
		counted, err := job.Counted(ctx, s, t.AccountID, t.TunnelID)
		if err != nil {
			log.Warn("scheduler could not read a bulk job's results; its entries wait for the next pass", "error", err)
			return tracked, time.Time{}, retry, true
		}
		if counted {
			return tracked, time.Time{}, dueFinished, true
		}
	}
	queuedAt = due.QueuedAt
	if queuedAt.IsZero() && tracked {
		queuedAt = job.StartedAt // an entry that does not decode
	}
	return tracked, queuedAt, dueOutcome{}, false
}

// notNowOutcome says what becomes of an entry whose rotation was not made
// because it may not be made now: the last rotation still settles (the entry
// waits), or Cloudflare or the budget said "not now" (the pass stops). notNow
// is false for success and for any other failure.
func notNowOutcome(err error) (outcome dueOutcome, notNow bool) {
	switch {
	case err == nil:
		return dueOutcome{}, false
	case rotation.IsSettling(err):
		return dueKept, true
	case cloudflare.RetryAfter(err) > 0:
		return dueOutcome{postpone: cloudflare.RetryAfter(err)}, true
	}
	return dueOutcome{}, false
}

// countBulk records a bulk item that failed or was skipped in its job, and
// says what becomes of its entry.
func (sc *scheduler) countBulk(ctx context.Context, item store.DueItem, tracked, skipped bool, reason string) dueOutcome {
	if !tracked {
		return dueFinished
	}
	if err := sc.w.recordBulkResult(ctx, sc.storage, item.Tunnel, item.Minute, skipped, reason); err != nil {
		// Not counted: the entry stays, or the job would count it as done.
		// The rest of the job waits for the next pass, which tries this
		// entry again; other entries do not wait.
		sc.w.engine.TunnelLogger(item.Tunnel).Warn("could not record a bulk rotation's result; its entry is kept, and the rest of its job waits for the next pass", "error", err)
		return dueOutcome{holdJob: true, notBefore: sc.w.now().Add(storageRetry)}
	}
	return dueFinished
}

// connect returns the connection to Cloudflare of this moment, not of the
// pass's start: a pass can run for minutes, and after a config write or
// config/rotate-root the cached client is rebuilt with the new token.
// Without one (config unreadable or deleted) the rotation waits.
func (sc *scheduler) connect(ctx context.Context) (rotation.Conn, error) {
	conn, err := sc.w.connect(ctx, sc.storage)
	if err != nil {
		sc.w.logger.Warn("scheduler has no Cloudflare client; rotations wait", "error", err)
	}
	return conn, err
}
