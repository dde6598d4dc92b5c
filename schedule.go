package main

// Scheduled and bulk rotation.
//
// The schedule is kept in storage as one empty entry per due rotation,
// due/<minute>/<account>.<tunnel>, where <minute> is the Unix minute at or
// after which the rotation is due. Listing due/ gives the minutes in time
// order without reading a record, so a mount that tracks a great many
// tunnels starts at once, and the scheduler only ever holds one batch of due
// rotations in memory. Times are rounded up to the minute, so nothing is
// rotated before it is due, after a restart included; a rotation that fell
// due while Vault was down is simply found in a past minute and done at the
// paced rate.
//
// One scheduler per mount works the schedule off on the node that may write
// storage, one rotation at a time, and only while the mount's budget (config
// rate_limit) has more than a reserve left, so operators' own writes are not
// starved by the fleet.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
)

const (
	duePrefix = "due/"
	// dueBatch bounds the due rotations held in memory at once.
	dueBatch = 500
	// retryFailedAfter is when a failed scheduled rotation is tried again.
	retryFailedAfter = time.Minute
	rotateEventType  = "cloudflare-ipsec/psk-rotate"
)

// dueEntry is the value of a due/ entry; Bulk marks rotations queued by
// rotate/<account>, whose progress that path reports.
type dueEntry struct {
	Bulk bool `json:"bulk,omitempty"`
}

// dueItem is one due rotation as loaded from storage.
type dueItem struct {
	key    string
	minute int64
	tunnel tunnelRef
}

func dueMinute(at time.Time, roundUp bool) int64 {
	m := at.Unix() / 60
	if roundUp && (at.Unix()%60 != 0 || at.Nanosecond() != 0) {
		m++
	}
	return m
}

func dueKey(minute int64, t tunnelRef) string {
	return fmt.Sprintf("%s%010d/%s.%s", duePrefix, minute, t.AccountID, t.TunnelID)
}

// scheduleRotation records that t is due at at (bulk: due now, for a job).
func scheduleRotation(ctx context.Context, s logical.Storage, t tunnelRef, at time.Time, bulk bool) error {
	entry, err := logical.StorageEntryJSON(dueKey(dueMinute(at, !bulk), t), dueEntry{Bulk: bulk})
	if err != nil {
		return err
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("schedule rotation of %s: %w", t, err)
	}
	return nil
}

func unscheduleRotation(ctx context.Context, s logical.Storage, t tunnelRef, at time.Time) error {
	if err := s.Delete(ctx, dueKey(dueMinute(at, true), t)); err != nil {
		return fmt.Errorf("unschedule rotation of %s: %w", t, err)
	}
	return nil
}

// loadDue returns up to dueBatch rotations due by now, oldest minute first,
// and the time the next later minute falls due (zero when none).
func loadDue(ctx context.Context, s logical.Storage, now time.Time) ([]dueItem, time.Time, error) {
	minutes, err := s.List(ctx, duePrefix)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("list due rotations: %w", err)
	}
	sort.Strings(minutes)
	current := now.Unix() / 60
	var items []dueItem
	for _, m := range minutes {
		minute, err := strconv.ParseInt(strings.TrimSuffix(m, "/"), 10, 64)
		if err != nil {
			continue
		}
		if minute > current {
			return items, time.Unix(minute*60, 0), nil
		}
		keys, err := s.List(ctx, duePrefix+m)
		if err != nil {
			return nil, time.Time{}, fmt.Errorf("list due rotations: %w", err)
		}
		for _, k := range keys {
			account, tunnel, ok := strings.Cut(k, ".")
			if !ok {
				continue
			}
			items = append(items, dueItem{key: duePrefix + m + k, minute: minute, tunnel: tunnelRef{AccountID: account, TunnelID: tunnel}})
			if len(items) == dueBatch {
				return items, time.Time{}, nil
			}
		}
	}
	return items, time.Time{}, nil
}

// scheduler works off one mount's due rotations.
type scheduler struct {
	b       *backend
	storage logical.Storage
	// mu makes each pass exclusive, so a test's drain and the loop never
	// work the same entry twice.
	mu     sync.Mutex
	wake   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}
}

func newScheduler(b *backend, s logical.Storage) *scheduler {
	return &scheduler{b: b, storage: s, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// start runs the scheduler until stop.
func (sc *scheduler) start() {
	ctx, cancel := context.WithCancel(context.Background())
	sc.cancel = cancel
	go sc.run(ctx)
}

// stop ends the loop and waits for the rotation in progress to finish.
func (sc *scheduler) stop() {
	if sc.cancel == nil {
		return
	}
	sc.cancel()
	<-sc.done
}

// poke wakes the loop early, after new rotations were queued.
func (sc *scheduler) poke() {
	select {
	case sc.wake <- struct{}{}:
	default:
	}
}

func (sc *scheduler) run(ctx context.Context) {
	defer close(sc.done)
	for ctx.Err() == nil {
		wait := sc.pass(ctx)
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-sc.wake:
			timer.Stop()
		case <-timer.C:
		}
	}
}

// pass works off what is due now and returns how long to sleep before the
// next pass.
func (sc *scheduler) pass(ctx context.Context) time.Duration {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	b := sc.b
	if !b.mayWrite() {
		return time.Minute
	}
	client, cfg, err := b.cloudflareClient(ctx, sc.storage)
	if err != nil {
		return time.Minute
	}
	items, next, err := loadDue(ctx, sc.storage, b.now())
	if err != nil {
		b.Logger().Warn("scheduler could not load due rotations", "error", err)
		return 10 * time.Second
	}
	for _, item := range items {
		if wait := sc.awaitBudget(ctx); wait > 0 {
			return wait
		}
		if ctx.Err() != nil {
			return 0
		}
		if wait := sc.rotateDue(ctx, client, cfg, item); wait > 0 {
			return wait
		}
	}
	if len(items) == dueBatch {
		return 0
	}
	if next.IsZero() {
		return time.Minute
	}
	return max(time.Until(next)+time.Second, time.Second)
}

// awaitBudget returns how long to wait before the scheduler may spend a
// call: it keeps a reserve of the budget for operators' own requests.
func (sc *scheduler) awaitBudget(ctx context.Context) time.Duration {
	limit, _ := sc.b.budget.Limit()
	reserve := max(limit/20, 1)
	if limit <= 2 {
		reserve = 0
	}
	for {
		free, wait := sc.b.budget.Free()
		if free > reserve {
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
		case <-time.After(wait):
		}
	}
}

// rotateDue rotates one due tunnel. It returns a wait when the pass should
// stop (Cloudflare or the budget said no), else 0.
func (sc *scheduler) rotateDue(ctx context.Context, client *cloudflare.Client, cfg *configRecord, item dueItem) time.Duration {
	b, s, t := sc.b, sc.storage, item.tunnel
	entry, err := s.Get(ctx, item.key)
	if err != nil || entry == nil {
		return 0
	}
	var due dueEntry
	_ = entry.DecodeJSON(&due)

	lock := lockFor(b, t)
	lock.Lock()
	defer lock.Unlock()
	rec, err := readPSKRecord(ctx, s, t)
	if err != nil {
		b.Logger().Warn("scheduler could not read a record", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
		return 0
	}
	scheduled := rec != nil && rec.RotationPeriod > 0 && !rec.NextRotation.IsZero() && dueMinute(rec.NextRotation, true) == item.minute
	if rec == nil || !due.Bulk && !scheduled {
		// Forgotten, or rescheduled since: the entry is stale.
		_ = s.Delete(ctx, item.key)
		return 0
	}
	trigger := "schedule"
	if due.Bulk {
		trigger = "bulk"
	}
	if !rec.current() {
		if rec, err = b.reconcileLocked(ctx, s, client, cfg, t, rec, false); err == nil && rec == nil {
			_ = s.Delete(ctx, item.key)
			return 0
		}
	}
	if err == nil {
		_, err = b.rotateLocked(ctx, s, client, t, rec, rec.RotationPeriod, trigger)
	}
	if err != nil {
		if wait := stopWait(err); wait > 0 {
			return wait
		}
		b.Logger().Warn("scheduled rotation failed", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "trigger", trigger, "error", err)
		if due.Bulk {
			b.recordBulkResult(ctx, s, t, err)
		} else {
			b.retryScheduledLater(ctx, s, t)
		}
		_ = s.Delete(ctx, item.key)
		return 0
	}
	// The rotation scheduled the next one in a later minute.
	_ = s.Delete(ctx, item.key)
	if due.Bulk {
		b.recordBulkResult(ctx, s, t, nil)
	}
	return 0
}

// retryScheduledLater moves a failed scheduled rotation a little into the
// future. The caller holds t's lock.
func (b *backend) retryScheduledLater(ctx context.Context, s logical.Storage, t tunnelRef) {
	rec, err := readPSKRecord(ctx, s, t)
	if err != nil || rec == nil || rec.RotationPeriod == 0 {
		return
	}
	rec.NextRotation = b.now().Add(retryFailedAfter).UTC()
	if err := scheduleRotation(ctx, s, t, rec.NextRotation, false); err == nil {
		err = writePSKRecord(ctx, s, t, rec)
		if err != nil {
			b.Logger().Warn("could not reschedule a failed rotation", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
		}
	}
}

// stopWait returns how long to pause the scheduler for an error that means
// "not now" (a 429, Cloudflare's block, the mount's budget), else 0.
func stopWait(err error) time.Duration {
	var apiErr *cloudflare.APIError
	if errors.As(err, &apiErr) && apiErr.RateLimited() {
		return max(apiErr.RetryAfter, time.Second)
	}
	var blocked *cloudflare.BlockedError
	if errors.As(err, &blocked) {
		return max(blocked.RetryAfter, time.Second)
	}
	var budgetErr *cloudflare.BudgetError
	if errors.As(err, &budgetErr) {
		return max(budgetErr.RetryAfter, 10*time.Millisecond)
	}
	return 0
}

// sendRotateEvent tells subscribers (Vault Enterprise's event bus) that a
// tunnel has a new key. The event carries no secret. On Vault Community
// there is no bus and the call does nothing.
func (b *backend) sendRotateEvent(ctx context.Context, rec *pskRecord, trigger string) {
	err := logical.SendEvent(ctx, b, rotateEventType,
		"account_id", rec.AccountID,
		"tunnel_id", rec.TunnelID,
		"version", strconv.Itoa(rec.Version),
		"last_generated_on", formatTime(rec.LastGeneratedOn),
		"trigger", trigger)
	if err != nil && !errors.Is(err, framework.ErrNoEvents) {
		b.Logger().Debug("could not send rotation event", "error", err)
	}
}

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
	if err != nil || entry == nil {
		return nil, err
	}
	job := new(bulkJob)
	if err := json.Unmarshal(entry.Value, job); err != nil {
		return nil, fmt.Errorf("decode bulk job of account %s: %w", account, err)
	}
	return job, nil
}

func writeBulkJob(ctx context.Context, s logical.Storage, account string, job *bulkJob) error {
	entry, err := logical.StorageEntryJSON(bulkJobKey(account), job)
	if err != nil {
		return err
	}
	return s.Put(ctx, entry)
}

// recordBulkResult counts one bulk rotation as done or failed.
func (b *backend) recordBulkResult(ctx context.Context, s logical.Storage, t tunnelRef, rotateErr error) {
	b.bulkMu.Lock()
	defer b.bulkMu.Unlock()
	job, err := readBulkJob(ctx, s, t.AccountID)
	if err != nil || job == nil {
		return
	}
	if rotateErr == nil {
		job.Done++
	} else {
		if job.Failed == nil {
			job.Failed = map[string]string{}
		}
		job.Failed[t.TunnelID] = rotateErr.Error()
	}
	if err := writeBulkJob(ctx, s, t.AccountID, job); err != nil {
		b.Logger().Warn("could not record bulk progress", "account_id", t.AccountID, "error", err)
	}
}
