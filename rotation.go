package main

// Rotation that never loses a PSK.
//
// Cloudflare activates a generated key before it answers and never shows it
// again, so any failure between "Cloudflare generated" and "Vault stored"
// leaves a live tunnel whose key nobody holds. The engine therefore writes
// the tunnel's record as rotation_unknown (and marks the tunnel unresolved)
// before it calls Cloudflare, and sets it back to current only once the new
// key is stored. Whatever happens in between, a crash included, the record
// says that Vault may not hold the edge's key.
//
// Reconciliation resolves an unknown outcome from Cloudflare's tunnel
// record: psk_metadata.last_generated_on equal to the stored key's means the
// rotation did not happen; a later time means it did, the stored key is
// stale, and (heal_stale_psk, on by default) a new key is generated and
// stored. It runs on the next read or write of the tunnel and in the
// background (sweep.go), on the node that may write storage.
//
// Why not the SDK's write-ahead log (framework.PutWAL and WALRollback), as
// Vault's database engine uses for credentials it makes itself: a WAL entry
// carries what is needed to undo or redo an operation, and here the one thing
// that matters, the new key, is made by Cloudflare and exists nowhere until
// its answer arrives. No entry written before the call could carry it, and
// nothing can undo a generation. The record-plus-marker is the equivalent: it
// is written before the call, says that the outcome is unknown, and is
// resolved from the edge's own account of the tunnel instead of from a log.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
)

const (
	// storeAttempts is how often a value that exists nowhere else is
	// offered to storage before the engine gives up on it.
	storeAttempts = 4
	// storeDeadline bounds the storing of a value that exists nowhere else.
	storeDeadline = 10 * time.Second
	// rotateEventType is the event a stored rotation sends.
	rotateEventType = "cloudflare-ipsec/psk-rotate"
)

// settleMargin widens a settle window for what the request_timeout does not
// cover: the storage writes between the window's start and the call, and
// the difference between the clocks of the node that started a rotation and
// the node that later reconciles it.
const settleMargin = 10 * time.Second

// settleWindow is how long after a rotation started an abandoned request of
// it may still change the edge's key: the caller gives up at
// request_timeout, and Cloudflare, which does not say how long it may still
// process a request after that, is assumed to take no longer than one more
// request_timeout. The window is fixed when the rotation starts (SettleUntil
// in the record), so a later change of request_timeout does not move it.
func settleWindow(cfg *configRecord) time.Duration { return 2*cfg.RequestTimeout + settleMargin }

// edgeClockMargin allows for the difference between this node's clock and
// Cloudflare's, and for last_generated_on's precision (Cloudflare promises
// none finer than a second), when the edge's time of generation is compared
// with the time a rotation started.
const edgeClockMargin = 5 * time.Second

// settlingError refuses a new key while the last rotation's outcome is
// unknown and Cloudflare may still act on it: a new psk_generate now could be
// overtaken by the abandoned one, and Vault would call current a key the edge
// replaced a moment later.
type settlingError struct {
	tunnel tunnelRef
	until  time.Time
}

func (e *settlingError) Error() string {
	return fmt.Sprintf("the last rotation of %s has an unknown outcome, and Cloudflare may still process its request until %s "+
		"(a request abandoned at request_timeout can still be carried out): no new key is asked for before then; "+
		"reads warn meanwhile, and the engine resolves the outcome from Cloudflare after that time",
		e.tunnel, formatTime(e.until))
}

// rotateOnWrite is an operator's write: it generates a new key for t and
// stores it. period, when set, replaces the tunnel's rotation period. The
// tunnel's lock is held from before the Cloudflare call until the key is
// stored, so concurrent rotations of one tunnel leave Vault with the key
// Cloudflare generated last.
func (b *backend) rotateOnWrite(ctx context.Context, s logical.Storage, t tunnelRef, period *time.Duration) (*pskRecord, error) {
	client, cfg, err := b.cloudflareClient(ctx, s)
	if err != nil {
		return nil, err
	}
	lock := b.tunnelLock(t)
	lock.Lock()
	defer lock.Unlock()

	rec, err := readPSKRecord(ctx, s, t)
	if err != nil {
		return nil, err
	}
	if rec != nil && !rec.current() {
		// A psk_generate after an unknown outcome is sent only once
		// Cloudflare has told what became of the last one: this write is the
		// operator's, so it does not heal (it rotates anyway), but it must
		// not act on a guess.
		if rec, err = b.reconcileLocked(ctx, s, client, cfg, t, rec, false); err != nil {
			return nil, fmt.Errorf("learn the outcome of the last rotation of %s: %w", t, err)
		}
	}
	next := time.Duration(0)
	if rec != nil {
		next = rec.RotationPeriod
	}
	if period != nil {
		next = *period
	}
	rotated, err := b.rotateLocked(ctx, s, client, t, rec, next, "write")
	if err != nil {
		if cloudflare.IsCloudflare(err) && !cloudflare.NoEffect(err) {
			err = fmt.Errorf("%w; the outcome is unknown, so the tunnel is marked %s until reconciliation learns from Cloudflare whether its key changed", err, stateRotationUnknown)
		}
		return nil, fmt.Errorf("generate psk for %s: %w", t, err)
	}
	return rotated, nil
}

// validateRotation asks Cloudflare to validate a psk_generate for t without
// generating a key (validate_only=true).
func (b *backend) validateRotation(ctx context.Context, s logical.Storage, t tunnelRef) error {
	client, _, err := b.cloudflareClient(ctx, s)
	if err != nil {
		return err
	}
	if _, err := client.GeneratePSK(ctx, t.AccountID, t.TunnelID, true); err != nil {
		return fmt.Errorf("validate psk generation for %s: %w", t, err)
	}
	return nil
}

// rotateLocked generates a new key for t and stores it, with period as the
// tunnel's rotation period from now on (0: none). The caller holds t's lock
// and passes the tunnel's record as read under it (nil when none). trigger
// says who asked (write, schedule, bulk, heal) for the rotation event.
func (b *backend) rotateLocked(ctx context.Context, s logical.Storage, client *cloudflare.Client, t tunnelRef, previous *pskRecord, period time.Duration, trigger string) (*pskRecord, error) {
	pending := &pskRecord{AccountID: t.AccountID, TunnelID: t.TunnelID}
	if previous != nil {
		copied := *previous
		pending = &copied
	}
	pending.State = stateRotationUnknown
	pending.RotationStartedAt = b.now().UTC()
	pending.StateReason = fmt.Sprintf("a rotation started at %s and has not finished", formatTime(pending.RotationStartedAt))
	if err := markUnresolved(ctx, s, t); err != nil {
		return nil, err
	}
	if err := writePSKRecord(ctx, s, t, pending); err != nil {
		return nil, err
	}

	generated, err := client.GeneratePSK(ctx, t.AccountID, t.TunnelID, false)
	if err != nil {
		if cloudflare.NoEffect(err) {
			b.restore(ctx, s, t, previous)
		} else {
			pending.StateReason = fmt.Sprintf("the rotation started at %s failed with an unknown outcome (%v): Cloudflare may already use a key Vault does not hold",
				formatTime(pending.RotationStartedAt), err)
			if werr := writePSKRecord(ctx, s, t, pending); werr != nil {
				b.tunnelLogger(t).Warn("could not record a rotation's unknown outcome", "error", werr)
			}
		}
		return nil, err
	}

	rec := &pskRecord{
		AccountID:       t.AccountID,
		TunnelID:        t.TunnelID,
		PSK:             generated.PSK,
		LastGeneratedOn: generated.LastGeneratedOn.UTC(),
		Version:         pending.Version + 1,
		StoredAt:        b.now().UTC(),
		State:           stateCurrent,
		RotationPeriod:  period,
	}
	if period > 0 {
		rec.NextRotation = rec.StoredAt.Add(period)
		// Scheduled before the record is stored: an entry without a due
		// record is dropped by the scheduler, a due record without an
		// entry would never rotate.
		if err := scheduleRotation(ctx, s, t, rec.NextRotation, false); err != nil {
			b.tunnelLogger(t).Warn("could not schedule the next rotation", "error", err)
		}
	}
	if err := b.storeGenerated(ctx, s, t, rec); err != nil {
		return nil, err
	}
	if !pending.NextRotation.IsZero() && !pending.NextRotation.Equal(rec.NextRotation) {
		if err := unscheduleRotation(ctx, s, t, pending.NextRotation); err != nil {
			b.tunnelLogger(t).Warn("could not drop a superseded schedule entry", "error", err)
		}
	}
	// Events are best effort and go to Vault over a round trip of their
	// own, so they do not hold up the answer.
	go b.sendRotateEvent(context.WithoutCancel(ctx), rec, trigger)
	if err := clearUnresolved(ctx, s, t); err != nil {
		// The record is current; a marker left behind is cleared by the
		// next background pass.
		b.tunnelLogger(t).Warn("could not clear an unresolved mark", "error", err)
	}
	b.tunnelLogger(t).Info("psk rotated", "version", rec.Version)
	return rec, nil
}

// restore puts back the record a rotation that certainly did not happen had
// replaced. A failure leaves the record rotation_unknown, which
// reconciliation resolves.
func (b *backend) restore(ctx context.Context, s logical.Storage, t tunnelRef, previous *pskRecord) {
	var err error
	switch {
	case previous == nil:
		err = forgetPSKRecord(ctx, s, t, nil)
	default:
		err = writePSKRecord(ctx, s, t, previous)
		if err == nil && previous.current() {
			err = clearUnresolved(ctx, s, t)
		}
	}
	if err != nil {
		b.tunnelLogger(t).Warn("could not restore a record after a refused rotation", "error", err)
	}
}

// storeGenerated stores a key Cloudflare has already activated. Storage is
// retried, because giving up loses the key; when it still fails the record
// stays rotation_unknown, so the next write or reconciliation heals it.
func (b *backend) storeGenerated(ctx context.Context, s logical.Storage, t tunnelRef, rec *pskRecord) error {
	entry, err := logical.StorageEntryJSON(t.storageKey(), rec)
	if err == nil {
		if err = putRetrying(ctx, s, entry); err == nil {
			return nil
		}
	}
	b.tunnelLogger(t).Error("cloudflare activated a new psk that vault could not store", "error", err)
	return fmt.Errorf("cloudflare generated and activated a new psk for %s, but Vault could not store it (%w); "+
		"the tunnel is marked rotation_unknown and the next write, read or background reconciliation will generate and store a new key", t, err)
}

// reconcileLocked resolves a record that is not current by asking
// Cloudflare when the tunnel's key was generated. heal allows it to generate
// a new key when the stored one turns out stale. The caller holds t's lock.
// It returns the record as it stands afterwards: nil when the tunnel's only
// rotation turned out never to have happened.
func (b *backend) reconcileLocked(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t tunnelRef, rec *pskRecord, heal bool) (*pskRecord, error) {
	if rec.current() {
		return rec, nil
	}
	edge, err := client.GetTunnel(ctx, t.AccountID, t.TunnelID)
	if err != nil {
		return rec, fmt.Errorf("reconcile %s: %w", t, err)
	}

	if edge.PSKLastGeneratedOn.Equal(rec.LastGeneratedOn) {
		if rec.State == stateRotationUnknown && b.now().Before(rec.RotationStartedAt.Add(settleWindow(cfg))) {
			// Too soon to tell: an abandoned request may still land.
			return rec, nil
		}
		if rec.PSK == "" {
			b.tunnelLogger(t).Info("first rotation never happened; record removed")
			return nil, forgetPSKRecord(ctx, s, t, rec)
		}
		resolved := *rec
		resolved.State, resolved.StateReason, resolved.RotationStartedAt = stateCurrent, "", time.Time{}
		if err := writePSKRecord(ctx, s, t, &resolved); err != nil {
			return rec, err
		}
		if err := clearUnresolved(ctx, s, t); err != nil {
			return &resolved, err
		}
		b.tunnelLogger(t).Info("reconciled: cloudflare's key is the stored one")
		return &resolved, nil
	}

	// Cloudflare generated a key after the stored one: the stored key is
	// not the edge's, and the tunnel is down until both sides share one.
	if heal {
		b.tunnelLogger(t).Warn("reconciled: cloudflare's key is newer than the stored one; generating a new key")
		return b.rotateLocked(ctx, s, client, t, rec, rec.RotationPeriod, "heal")
	}
	stale := *rec
	stale.State = stateStale
	stale.StateReason = fmt.Sprintf("Cloudflare's key was generated at %s, after the stored key (%s): the stored key is not the one the edge uses",
		formatTime(edge.PSKLastGeneratedOn), orNever(rec.LastGeneratedOn))
	if err := writePSKRecord(ctx, s, t, &stale); err != nil {
		return rec, err
	}
	b.tunnelLogger(t).Warn("reconciled: stored psk is stale")
	return &stale, nil
}

// putRetrying stores an entry that exists nowhere else (a key Cloudflare
// already activated, a token value Cloudflare already rolled): a storage
// error is retried with backoff before it is given up on.
func putRetrying(ctx context.Context, s logical.Storage, entry *logical.StorageEntry) error {
	// The caller giving up (a client that disconnects, a deadline that
	// passes just after Cloudflare answered) must not stop the value being
	// stored: it is detached from the caller's cancellation, with a bound
	// of its own.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeDeadline)
	defer cancel()
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := s.Put(ctx, entry)
		if err == nil || attempt == storeAttempts {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff *= 2
	}
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
