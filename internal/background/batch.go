package background

// Bulk jobs with keys Vault makes (config key_source vault): the scheduler
// gathers a job's due entries into batches of up to set_batch_size tunnels
// and has the rotation engine set each batch's keys in one Set call
// (internal/rotation/batch.go): one call of the budget per batch, not per
// tunnel. Every tunnel of a batch is locked, and its record read, before the
// batch is begun, and released once the batch has been judged.
//
// What becomes of a tunnel's entry:
//   - stored: done, as a single rotation is;
//   - unapplied: the tunnel keeps its key (Vault's record as it was); the job
//     marks it retrying, with Cloudflare's reason (shown in rotate/'s
//     progress), and sends it again after a backoff (bulkRetryStart,
//     doubling), and counts it failed after bulkAttempts;
//   - pending (the answer lost or proving nothing): the entry waits; when
//     the job meets it again it sends the key written ahead again, in a
//     batch with the job's other tunnels (one call for all, judged as the
//     engine's finish path judges a resend), unless a read or a write
//     finished it first (the background pass, which would send each key in
//     a call of its own, leaves a first send's pending key to the job for a
//     settle window: the record's RetryAt, with no failure counted); the
//     same key needs no settle window, so it goes at the job's next pass;
//     a key whose resend keeps failing backs
//     off (the record's RetryAt) and is counted failed after bulkAttempts,
//     and the finish path goes on with it;
//   - a tunnel whose last key may still land (SettleUntil) waits, as for a
//     single rotation; one that is not current takes the single path
//     (rotateBulk), which learns its outcome first.

import (
	"context"
	"fmt"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

const (
	// bulkRetryStart is how long a job waits before it sends again a key
	// Cloudflare did not apply, doubling with each refusal up to
	// bulkRetryMax. Cloudflare's reasons are mostly passing (a tunnel
	// being reconfigured), and the job is not over while it retries.
	bulkRetryStart = 15 * time.Second
	bulkRetryMax   = 4 * time.Minute
	// bulkAttempts is how many times a job sends a tunnel's key before it
	// counts the tunnel failed: about eight minutes of retries, so that a
	// tunnel Cloudflare keeps refusing does not hold the account's next
	// job (refused while this one has tunnels remaining) for long.
	bulkAttempts = 6
	// retrySlack is how much before its retry time a refused tunnel may be
	// sent again: the tunnels of one batch are refused moments apart, and
	// without it each would be retried in a call of its own.
	retrySlack = 5 * time.Second
	// fittedFor is how long a batch size Cloudflare's refusals taught is
	// kept for an account's later batches.
	fittedFor = time.Hour
)

// setMember is one tunnel gathered for a batch: its lock is held.
type setMember struct {
	item    store.DueItem
	due     *store.DueEntry
	tracked bool
	rec     *store.Record
	unlock  func()
	// resend: rec is pending with this job's key, sent again.
	resend bool
}

// setGather holds the batches being gathered in a pass, one per job, and
// which tunnels they hold the lock of.
type setGather struct {
	jobs    map[heldJob][]*setMember
	order   []heldJob
	tunnels map[store.Tunnel]heldJob
}

func newSetGather() *setGather {
	return &setGather{jobs: map[heldJob][]*setMember{}, tunnels: map[store.Tunnel]heldJob{}}
}

// holds reports whether a gathered batch holds t's lock: the pass must send
// that batch before it works another entry of t, which takes the lock.
func (g *setGather) holds(t store.Tunnel) (heldJob, bool) {
	job, ok := g.tunnels[t]
	return job, ok
}

// take removes job's batch from the gathering and returns its members.
func (g *setGather) take(job heldJob) []*setMember {
	members := g.jobs[job]
	delete(g.jobs, job)
	for _, m := range members {
		delete(g.tunnels, m.item.Tunnel)
	}
	for i, j := range g.order {
		if j == job {
			g.order = append(g.order[:i], g.order[i+1:]...)
			break
		}
	}
	return members
}

// release unlocks every gathered tunnel, unworked: their entries stay.
func (g *setGather) release() {
	for len(g.order) > 0 {
		for _, m := range g.take(g.order[0]) {
			m.unlock()
		}
	}
}

// setsKeys reports whether the mount's bulk jobs set keys Vault makes.
func (sc *scheduler) setsKeys(ctx context.Context) (rotation.Conn, bool) {
	conn, err := sc.w.connect(ctx, sc.storage)
	return conn, err == nil && conn.Settings.KeySource == store.KeySourceVault
}

// batchSize is how many keys of account go in one Set call: config
// set_batch_size, or less where Cloudflare refused that many lately.
func (sc *scheduler) batchSize(conn rotation.Conn, account string) int {
	size := conn.Settings.SetBatchSize
	if size <= 0 {
		size = rotation.DefaultSetBatchSize
	}
	if f, ok := sc.fitted[account]; ok && sc.w.now().Sub(f.at) < fittedFor {
		size = min(size, f.size)
	}
	return size
}

// gather takes one bulk entry of a vault-keyed mount: it is worked at once
// when it needs no batch, or added to its job's batch, which is sent when
// full. stop ends the pass (the budget, or Cloudflare, said "not now").
func (sc *scheduler) gather(ctx context.Context, p *passState, g *setGather, conn rotation.Conn, item store.DueItem) (time.Duration, bool) {
	if wait, stop := sc.flushHolding(ctx, p, g, item.Tunnel); stop {
		return wait, true
	}
	m, outcome, route := sc.prepareSet(ctx, item)
	switch route {
	case routeDone:
		sc.settle(ctx, p, item, outcome)
		return 0, false
	case routeSingle:
		if wait := sc.awaitBudget(ctx); wait > 0 || ctx.Err() != nil {
			return max(wait, time.Second), true
		}
		outcome = sc.rotateDue(ctx, item)
		if outcome.postpone > 0 {
			return outcome.postpone, true
		}
		sc.settle(ctx, p, item, outcome)
		return 0, false
	}
	job := heldJobOf(item)
	if _, ok := g.jobs[job]; !ok {
		g.order = append(g.order, job)
	}
	g.jobs[job] = append(g.jobs[job], m)
	g.tunnels[item.Tunnel] = job
	if len(g.jobs[job]) < sc.batchSize(conn, item.Tunnel.AccountID) {
		return 0, false
	}
	return sc.flush(ctx, p, g, job)
}

// flushAll sends every batch still gathered, in the order their jobs came.
func (sc *scheduler) flushAll(ctx context.Context, p *passState, g *setGather) (time.Duration, bool) {
	for len(g.order) > 0 {
		if wait, stop := sc.flush(ctx, p, g, g.order[0]); stop {
			return wait, true
		}
	}
	return 0, false
}

// flushHolding sends the gathered batch that holds t's lock, if any,
// before an entry of t is worked: a tunnel's scheduled rotation of a later
// minute can be loaded with its bulk entry, and would wait for ever for a
// lock its own pass holds.
func (sc *scheduler) flushHolding(ctx context.Context, p *passState, g *setGather, t store.Tunnel) (time.Duration, bool) {
	if job, ok := g.holds(t); ok {
		return sc.flush(ctx, p, g, job)
	}
	return 0, false
}

// flush sends job's gathered batch and settles each entry.
func (sc *scheduler) flush(ctx context.Context, p *passState, g *setGather, job heldJob) (time.Duration, bool) {
	members := g.take(job)
	unlockAll := func() {
		for _, m := range members {
			m.unlock()
		}
	}
	if wait := sc.awaitBudget(ctx); wait > 0 || ctx.Err() != nil {
		unlockAll()
		g.release()
		return max(wait, time.Second), true
	}
	conn, err := sc.connect(ctx)
	if err != nil {
		unlockAll()
		g.release()
		return time.Minute, true
	}
	tunnels := make([]rotation.BatchTunnel, len(members))
	for i, m := range members {
		tunnels[i] = rotation.BatchTunnel{Tunnel: m.item.Tunnel, Previous: m.rec, Listed: listedState(m.item.Tunnel, m.due), Resend: m.resend}
	}
	report := sc.w.engine.SetKeys(ctx, sc.storage, conn, tunnels, rotation.TriggerBulk)
	if report.Fitted > 0 {
		sc.fitted[job.account] = fittedSize{size: report.Fitted, at: sc.w.now()}
	}
	var postpone time.Duration
	for i, m := range members {
		outcome := sc.setOutcome(ctx, m, report.Results[i])
		m.unlock()
		postpone = max(postpone, outcome.postpone)
		sc.settle(ctx, p, m.item, outcome)
	}
	if postpone > 0 {
		g.release()
		return postpone, true
	}
	return 0, false
}

// fittedSize is a batch size Cloudflare took after refusing a larger one.
type fittedSize struct {
	size int
	at   time.Time
}

// listedState is what the entry's listing said of a tunnel Vault did not
// manage, as the engine takes it; nil for a managed tunnel.
func listedState(t store.Tunnel, due *store.DueEntry) *cloudflare.TunnelState {
	l := due.Unmanaged
	if l == nil {
		return nil
	}
	return &cloudflare.TunnelState{
		ID: t.TunnelID, Name: l.Facts.Name, CloudflareEndpoint: l.Facts.CloudflareEndpoint, CustomerEndpoint: l.Facts.CustomerEndpoint,
		InterfaceAddress: l.Facts.InterfaceAddress, InterfaceAddress6: l.Facts.InterfaceAddress6, CustomFQDNID: l.Facts.CustomFQDNID,
		IPsecID: l.Facts.IPsecID, PSKLastGeneratedOn: l.KeyGeneratedOn, Date: l.ListedAt,
	}
}

// setRoute is how an entry is worked on a vault-keyed mount.
type setRoute int

const (
	// routeBatch: into its job's batch (the lock is held).
	routeBatch setRoute = iota
	// routeDone: nothing to send; the outcome says what becomes of it.
	routeDone
	// routeSingle: the single path (rotateDue), as with Cloudflare's keys.
	routeSingle
)

// prepareSet decides how a bulk entry is worked, and for a batch returns
// the member, its tunnel locked.
func (sc *scheduler) prepareSet(ctx context.Context, item store.DueItem) (*setMember, dueOutcome, setRoute) {
	w, s, t := sc.w, sc.storage, item.Tunnel
	due, err := store.ReadDueEntry(ctx, s, item.Key)
	switch {
	case err != nil:
		return nil, dueOutcome{}, routeSingle // rotateDue reads it again and decides
	case due == nil:
		return nil, dueFinished, routeDone
	}
	tracked, queuedAt, outcome, done := sc.bulkEntryOfItsJob(ctx, item, due)
	if done {
		return nil, outcome, routeDone
	}
	if now := w.now(); now.Before(due.RetryAt.Add(-retrySlack)) {
		return nil, dueOutcome{notBefore: due.RetryAt.Add(-retrySlack)}, routeDone
	}
	unlock := w.engine.Lock(t)
	rec, err := store.ReadRecord(ctx, s, t)
	m := &setMember{item: item, due: due, tracked: tracked, rec: rec, unlock: unlock}
	route, outcome := sc.routeOf(ctx, m, queuedAt, err)
	if route != routeBatch {
		unlock()
		m.unlock = nil
	}
	return m, outcome, route
}

// routeOf decides by the tunnel's record (m.rec, read under its lock;
// readErr its failure) how its bulk entry is worked.
func (sc *scheduler) routeOf(ctx context.Context, m *setMember, queuedAt time.Time, readErr error) (setRoute, dueOutcome) {
	now, item, due, tracked, rec := sc.w.now(), m.item, m.due, m.tracked, m.rec
	switch {
	case readErr != nil:
		sc.w.engine.TunnelLogger(item.Tunnel).Warn("scheduler could not read a record", "error", readErr)
		return routeDone, dueKept
	case rec == nil && due.Unmanaged == nil:
		return routeDone, sc.countBulk(ctx, item, tracked, true, reasonDeleted)
	case rec == nil:
		return routeBatch, dueOutcome{}
	case !queuedAt.IsZero() && rec.StoredAt.After(queuedAt):
		return routeDone, dueFinished // rotated since it was queued (rotateBulk says why)
	case rec.State == store.StatePending && !queuedAt.IsZero() && !rec.RotationStartedAt.Before(queuedAt) &&
		rec.PendingTrigger != string(rotation.TriggerValidate):
		// The job's own key, pending: it is this tunnel's rotation, sent
		// again (the same key needs no settle window), in a batch. A
		// validation's whose answer was lost, started after the job was
		// queued too, is not: its key is the stored one, which must never
		// be sent for real (validate.go). It goes the single path below
		// (RotateNow: finishValidation, then the job's new key).
		switch {
		case rec.PendingPSK == "":
			return routeSingle, dueOutcome{}
		case rec.Failures > 0 && now.Before(rec.RetryAt):
			// A resend failed: back off. (Without a failure, RetryAt
			// only keeps the background pass off the job's key.)
			return routeDone, dueOutcome{notBefore: rec.RetryAt}
		case rec.Failures >= bulkAttempts:
			return routeDone, sc.countBulk(ctx, item, tracked, false, "the key Vault made is pending, and sending it again kept failing: "+
				rec.LastFailure+"; the background pass goes on sending the same key")
		}
		m.resend = true
		return routeBatch, dueOutcome{}
	case rec.SendsMayLand(now):
		return routeDone, dueOutcome{notBefore: rec.SettleUntil}
	case !rec.Current():
		return routeSingle, dueOutcome{}
	}
	return routeBatch, dueOutcome{}
}

// setOutcome says what becomes of a batch member's entry after the batch.
func (sc *scheduler) setOutcome(ctx context.Context, m *setMember, r rotation.BatchResult) dueOutcome {
	item := m.item
	log := sc.w.engine.TunnelLogger(item.Tunnel)
	switch r.Outcome {
	case rotation.BatchStored:
		if m.due.Attempts > 0 {
			sc.w.clearRetrying(ctx, sc.storage, item.Tunnel, item.Minute)
		}
		return dueFinished
	case rotation.BatchGone:
		return sc.countBulk(ctx, item, m.tracked, true, reasonGone+": "+r.Reason)
	case rotation.BatchUnapplied:
		return sc.retryUnapplied(ctx, m, r.Reason)
	case rotation.BatchPending:
		if wait := cloudflare.RetryAfter(r.Err); wait > 0 {
			return dueOutcome{postpone: wait}
		}
		log.Warn("bulk rotation's outcome is unknown; the key written ahead finishes it", "error", r.Err)
		return dueOutcome{notBefore: sc.w.now().Add(storageRetry)}
	case rotation.BatchNotSent:
		log.Warn("bulk rotation's key was not sent; tried again later", "error", r.Err)
		return dueOutcome{notBefore: sc.w.now().Add(storageRetry)}
	}
	if outcome, notNow := notNowOutcome(r.Err); notNow {
		if rotation.IsSettling(r.Err) {
			outcome.notBefore = sc.w.now().Add(storageRetry)
		}
		return outcome
	}
	log.Warn("bulk rotation failed", "error", r.Err)
	return sc.countBulk(ctx, item, m.tracked, false, r.Err.Error())
}

// retryUnapplied marks a tunnel whose key Cloudflare did not apply as
// retrying, with the reason, and has its entry sent again after a backoff;
// after bulkAttempts it is counted failed.
func (sc *scheduler) retryUnapplied(ctx context.Context, m *setMember, reason string) dueOutcome {
	w, item := sc.w, m.item
	attempts := m.due.Attempts + 1
	if attempts >= bulkAttempts || !m.tracked {
		outcome := sc.countBulk(ctx, item, m.tracked, false, fmt.Sprintf(
			"cloudflare did not apply the key Vault made, %d times; the last reason: %s; the tunnel keeps its key", attempts, reason))
		if outcome.finished && m.due.Attempts > 0 {
			w.clearRetrying(ctx, sc.storage, item.Tunnel, item.Minute)
		}
		return outcome
	}
	backoff := bulkRetryStart
	for i := 1; i < attempts && backoff < bulkRetryMax; i++ {
		backoff *= 2
	}
	retryAt := w.now().Add(min(backoff, bulkRetryMax)).UTC()
	result := store.BulkResult{Reason: store.BoundReason(reason), Attempts: attempts, RetryAt: retryAt}
	due := *m.due
	due.Attempts, due.RetryAt = attempts, retryAt
	if err := w.markRetrying(ctx, sc.storage, item.Tunnel, item.Minute, result); err != nil {
		w.engine.TunnelLogger(item.Tunnel).Warn("could not record a bulk rotation's retry", "error", err)
		return dueOutcome{holdJob: true, notBefore: w.now().Add(storageRetry)}
	}
	if err := store.WriteBulkEntry(ctx, sc.storage, item.Tunnel, item.Minute, due); err != nil {
		// The entry keeps its last retry time: it is sent again sooner.
		w.engine.TunnelLogger(item.Tunnel).Warn("could not record when a bulk rotation is retried", "error", err)
	}
	w.engine.TunnelLogger(item.Tunnel).Info("cloudflare did not apply the key of a bulk rotation; retrying later",
		"reason", reason, "attempts", attempts, "retry_at", store.FormatTime(retryAt))
	return dueOutcome{notBefore: retryAt}
}
