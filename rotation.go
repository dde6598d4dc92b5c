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
// background, on the node that may write storage.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
)

const (
	// storeAttempts is how often a value that exists nowhere else is
	// offered to storage before the engine gives up on it.
	storeAttempts = 4
	// storeDeadline bounds the storing of a value that exists nowhere else.
	storeDeadline = 10 * time.Second
	// reconcilePerPass bounds the background work of one periodic call.
	reconcilePerPass = 100
)

// settleWindow is how long after a rotation started an unchanged key at
// Cloudflare is not yet proof that the rotation did not happen: a request
// abandoned at request_timeout may still be processed behind it.
func settleWindow(cfg *configRecord) time.Duration { return 2 * cfg.RequestTimeout }

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
		if notGenerated(err) {
			b.restore(ctx, s, t, previous)
		} else {
			pending.StateReason = fmt.Sprintf("the rotation started at %s failed with an unknown outcome (%v): Cloudflare may already use a key Vault does not hold",
				formatTime(pending.RotationStartedAt), err)
			if werr := writePSKRecord(ctx, s, t, pending); werr != nil {
				b.Logger().Warn("could not record a rotation's unknown outcome", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", werr)
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
			b.Logger().Warn("could not schedule the next rotation", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
		}
	}
	if err := b.storeGenerated(ctx, s, t, rec); err != nil {
		return nil, err
	}
	if !pending.NextRotation.IsZero() && !pending.NextRotation.Equal(rec.NextRotation) {
		if err := unscheduleRotation(ctx, s, t, pending.NextRotation); err != nil {
			b.Logger().Warn("could not drop a superseded schedule entry", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
		}
	}
	// Events are best effort and go to Vault over a round trip of their
	// own, so they do not hold up the answer.
	go b.sendRotateEvent(context.WithoutCancel(ctx), rec, trigger)
	if err := clearUnresolved(ctx, s, t); err != nil {
		// The record is current; a marker left behind is cleared by the
		// next background pass.
		b.Logger().Warn("could not clear an unresolved mark", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
	}
	b.Logger().Info("psk rotated", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "version", rec.Version)
	return rec, nil
}

// notGenerated reports whether err proves Cloudflare generated nothing: it
// refused the request, or the request was never sent. Any other failure
// (no answer, a 5xx, a malformed answer, "success": false) may have come
// after Cloudflare changed the key.
func notGenerated(err error) bool {
	var apiErr *cloudflare.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Rejected() || apiErr.RateLimited()
	}
	var blocked *cloudflare.BlockedError
	var budgetErr *cloudflare.BudgetError
	return errors.As(err, &blocked) || errors.As(err, &budgetErr)
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
		b.Logger().Warn("could not restore a record after a refused rotation", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
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
	b.Logger().Error("cloudflare activated a new psk that vault could not store", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
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
			b.Logger().Info("first rotation never happened; record removed", "account_id", t.AccountID, "tunnel_id", t.TunnelID)
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
		b.Logger().Info("reconciled: cloudflare's key is the stored one", "account_id", t.AccountID, "tunnel_id", t.TunnelID)
		return &resolved, nil
	}

	// Cloudflare generated a key after the stored one: the stored key is
	// not the edge's, and the tunnel is down until both sides share one.
	if heal {
		b.Logger().Warn("reconciled: cloudflare's key is newer than the stored one; generating a new key", "account_id", t.AccountID, "tunnel_id", t.TunnelID)
		return b.rotateLocked(ctx, s, client, t, rec, rec.RotationPeriod, "heal")
	}
	stale := *rec
	stale.State = stateStale
	stale.StateReason = fmt.Sprintf("Cloudflare's key was generated at %s, after the stored key (%s): the stored key is not the one the edge uses",
		formatTime(edge.PSKLastGeneratedOn), orNever(rec.LastGeneratedOn))
	if err := writePSKRecord(ctx, s, t, &stale); err != nil {
		return rec, err
	}
	b.Logger().Warn("reconciled: stored psk is stale", "account_id", t.AccountID, "tunnel_id", t.TunnelID)
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

func orNever(t time.Time) string {
	if t.IsZero() {
		return "none stored"
	}
	return formatTime(t)
}

// reconcileUnresolved is the backend's PeriodicFunc: it works off the
// tunnels marked unresolved, on the node that may write storage only. A
// tunnel whose lock is taken (a rotation in flight) is left for the next pass.
func (b *backend) reconcileUnresolved(ctx context.Context, req *logical.Request) error {
	if !b.mayWrite() {
		return nil
	}
	client, cfg, err := b.cloudflareClient(ctx, req.Storage)
	if errors.Is(err, errNotConfigured) {
		return nil
	}
	if err != nil {
		return err
	}
	tunnels, err := listUnresolved(ctx, req.Storage)
	if err != nil {
		return err
	}
	if len(tunnels) > reconcilePerPass {
		tunnels = tunnels[:reconcilePerPass]
	}
	for _, t := range tunnels {
		if err := b.reconcileInBackground(ctx, req.Storage, client, cfg, t); err != nil {
			b.Logger().Warn("background reconciliation failed", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "error", err)
			if notGenerated(err) {
				return nil // rate limited or over budget: the next pass goes on
			}
		}
	}
	return nil
}

func (b *backend) reconcileInBackground(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t tunnelRef) error {
	lock := lockFor(b, t)
	if !lock.TryLock() {
		return nil
	}
	defer lock.Unlock()
	rec, err := readPSKRecord(ctx, s, t)
	if err != nil {
		return err
	}
	if rec == nil || rec.current() {
		return clearUnresolved(ctx, s, t)
	}
	_, err = b.reconcileLocked(ctx, s, client, cfg, t, rec, cfg.HealStalePSK)
	return err
}

func listUnresolved(ctx context.Context, s logical.Storage) ([]tunnelRef, error) {
	accounts, err := s.List(ctx, unresolvedPrefix)
	if err != nil {
		return nil, fmt.Errorf("list unresolved tunnels: %w", err)
	}
	var out []tunnelRef
	for _, a := range accounts {
		tunnels, err := s.List(ctx, unresolvedPrefix+a)
		if err != nil {
			return nil, fmt.Errorf("list unresolved tunnels: %w", err)
		}
		for _, tun := range tunnels {
			out = append(out, tunnelRef{AccountID: a[:len(a)-1], TunnelID: tun})
		}
	}
	return out, nil
}
