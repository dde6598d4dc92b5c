package rotation

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/schedule"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// ErrNotStored is a change asked of a tunnel Vault holds no key for.
var ErrNotStored = errors.New("no psk is stored for this tunnel")

// Forget removes t's record, its unresolved mark and its place in the
// schedule. The tunnel at Cloudflare is not touched. While the last
// rotation's outcome is unknown and Cloudflare may still act on it, it is
// refused with a *SettlingError: forgetting the record would forget the
// settle window with it, and the next write would send a psk_generate that
// the abandoned request could still overtake.
//
// It returns the record it forgot (nil: none), so that the caller can warn
// of what went with it: a pending key (ForgotPendingKey), which the edge may
// use, is forgotten without being finished once its window has passed.
func (e *Engine) Forget(ctx context.Context, s logical.Storage, t store.Tunnel) (*store.Record, error) {
	defer e.Lock(t)()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		return nil, err
	}
	if rec != nil && rec.SendsMayLand(e.now()) {
		// Any state: a key Vault made and finished may still be re-set by
		// a late request, which the next write's different key must wait
		// out too.
		return nil, sendsMayLand(t, rec)
	}
	if err := store.ForgetRecord(ctx, s, t, rec); err != nil {
		return nil, err
	}
	switch {
	case PendingIsStoredKey(rec):
		e.TunnelLogger(t).Info("psk forgotten while the stored key was being set again (a validate_only, or a late landing's) with an unknown outcome")
	case ForgotPendingKey(rec):
		e.TunnelLogger(t).Warn("psk forgotten with a pending key the edge may use")
	default:
		e.TunnelLogger(t).Info("psk forgotten")
	}
	return rec, nil
}

// ForgotPendingKey reports whether rec, forgotten, held a key Vault made
// that Cloudflare never confirmed (pending, or found gone while pending):
// the edge may use it, and no one holds it now.
func ForgotPendingKey(rec *store.Record) bool { return rec != nil && rec.PendingPSK != "" }

// PendingIsStoredKey reports whether rec's pending key is its stored key: a
// validate_only's (validate.go), or the stored key set again after the edge
// re-dated it (lateLanding). No new key was sent: the edge uses the stored
// key or one changed outside this engine.
func PendingIsStoredKey(rec *store.Record) bool {
	return ForgotPendingKey(rec) && rec.PendingPSK == rec.PSK
}

// Reschedule stores sched as t's schedule without rotating its key or
// calling Cloudflare. A rotation in flight holds the tunnel's lock, so it is
// waited for (at most about request_timeout) rather than raced. A schedule
// alone never makes a tunnel's first key: without a record it fails with an
// error that wraps ErrNotStored. floor is config min_rotation_period.
func (e *Engine) Reschedule(ctx context.Context, s logical.Storage, t store.Tunnel, sched schedule.Schedule, floor time.Duration) (*store.Record, error) {
	defer e.Lock(t)()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		return nil, fmt.Errorf("%w: %s: write psk/%s/%s, which rotates the tunnel and takes the same schedule fields",
			ErrNotStored, t, t.AccountID, t.TunnelID)
	}
	return e.reschedule(ctx, s, t, rec, sched, floor)
}

// reschedule stores sched as t's schedule and moves its schedule entry,
// without a rotation. The caller holds t's lock and passes the record read
// under it. It stores as a rotation does (store.SaveScheduled), so that a
// storage failure can leave a stale entry but never a record whose next
// rotation has no entry. floor is config min_rotation_period: the next
// rotation is never less than that after the stored key (nextAfterChange).
func (e *Engine) reschedule(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record, sched schedule.Schedule, floor time.Duration) (*store.Record, error) {
	updated := *rec
	updated.RotationPeriod, updated.RotationSchedule, updated.RotationWindow = sched.Period, sched.Cron, sched.Window
	updated.NextRotation, updated.WindowEnds, updated.ScheduleNote = time.Time{}, time.Time{}, ""
	if sched.Set() {
		// The floor counts from the last time the edge's key may have
		// changed: the stored key's, or a later attempt whose outcome is
		// not known yet (a heal of it follows, and must not be followed
		// within the floor by the new schedule's time).
		lastKey := rec.StoredAt
		if (rec.State == store.StateRotationUnknown || rec.State == store.StatePending) && rec.RotationStartedAt.After(lastKey) {
			lastKey = rec.RotationStartedAt
		}
		updated.NextRotation, updated.WindowEnds = sched.NextAfterChange(lastKey, e.now(), floor)
		if rec.Failures > 0 && updated.NextRotation.Before(rec.RetryAt) {
			// The background is backing off from failed attempts: a new
			// schedule does not bring the next one forward.
			updated.NextRotation = rec.RetryAt
		}
	}
	notes, err := store.SaveScheduled(ctx, s, &updated, rec.NextRotation, false)
	if err != nil {
		return nil, err
	}
	log := e.TunnelLogger(t)
	for _, note := range notes {
		log.Warn("after a schedule change", "error", note)
	}
	if !updated.NextRotation.IsZero() {
		e.scheduled()
	}
	log.Info("rotation schedule changed", "rotation_period", updated.RotationPeriod, "rotation_schedule", updated.RotationSchedule,
		"rotation_window", updated.RotationWindow, "next_rotation", store.FormatTime(updated.NextRotation))
	return &updated, nil
}
