package rotation

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// reconcileLocked resolves a record that is not current by asking
// Cloudflare when the tunnel's key was generated. heal allows it to generate
// a new key when the stored one turns out stale. The caller holds t's lock.
// It returns the record as it stands afterwards: nil when the tunnel's only
// rotation turned out never to have happened. While the record's last
// rotation is still settling it returns a *SettlingError and asks Cloudflare
// nothing: no answer could settle the question before then.
func (e *Engine) reconcileLocked(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, rec *store.Record, heal bool) (*store.Record, error) {
	if rec.Current() || rec.HeldByAnswer() {
		// A held record waits for an operator's write, which generates
		// anyway; nothing Cloudflare says now would release it.
		return rec, nil
	}
	if rec.PendingPSK != "" && (rec.State == store.StatePending || rec.State == store.StateTunnelGone) {
		if Trigger(rec.PendingTrigger) == TriggerValidate {
			// A validation's stored key, whose answer was lost: never
			// sent for real (validate.go).
			return e.finishValidation(ctx, s, conn, t, rec, heal)
		}
		// A key Vault made and wrote ahead: the same key finishes it, at
		// once, whatever key_source says now (vaultkeys.go). A tunnel
		// recorded gone keeps its pending key (MarkGone): written again, it
		// is finished with that key first.
		return e.finishPending(ctx, s, conn, t, rec)
	}
	// A held tunnel whose validation's outcome was lost is judged, and
	// marked stale (held still) if the edge changed, but never healed: no
	// key is made for it but by an operator's write.
	heal = heal && !rec.AnswerHeld
	log := e.TunnelLogger(t)
	if rec.Settling(e.now()) {
		return rec, &SettlingError{tunnel: t, until: rec.SettleUntil}
	}
	edge, err := conn.Edge.GetTunnel(ctx, t.AccountID, t.TunnelID)
	if cloudflare.NotFound(err) {
		gone, werr := e.MarkGone(ctx, s, t, rec)
		if werr != nil {
			return rec, werr
		}
		return gone, fmt.Errorf("reconcile %s: %w", t, err)
	}
	if err != nil {
		return rec, fmt.Errorf("reconcile %s: %w", t, err)
	}

	verdict, reason := judgeEdge(rec, edge.PSKLastGeneratedOn)
	switch verdict {
	case edgeNeverRotated:
		log.Info("first rotation never happened; nothing is stored")
		return nil, store.ForgetRecord(ctx, s, t, rec)
	case edgeUsesStoredKey:
		return e.resolveStored(ctx, s, t, rec, edge)
	}

	// The edge uses a key Vault does not hold: the tunnel is down until
	// both sides share one.
	if rec.State == store.StateStale {
		reason = rec.StateReason // still what it was found to be
	}
	if heal {
		if e.mayHeal(conn.Settings, rec) {
			log.Warn("reconciled: cloudflare's key is not the stored one; generating a new key")
			// The heal replaces the edge's key, which Vault does not hold:
			// if Cloudflare refuses it, the record put back must still say
			// so (EdgeKeyForeign), or its next judgement would find the
			// edge "unchanged" since EdgeKeyBefore and call the stored key
			// current.
			healing := *rec
			healing.EdgeKeyBefore, healing.EdgeKeyBeforeSeenAt, healing.EdgeKeyForeign = edge.PSKLastGeneratedOn, edge.Date, true
			return e.rotateLocked(ctx, s, conn, t, &healing, TriggerHeal)
		}
		return e.holdHealing(ctx, s, t, rec, reason)
	}
	return e.markStale(ctx, s, t, rec, reason, e.now().Add(store.FailureBackoffMax))
}

// resolveStored records that the edge uses rec's stored key (edge, dated
// by Cloudflare, said so): current again.
func (e *Engine) resolveStored(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record, edge *cloudflare.TunnelState) (*store.Record, error) {
	resolved := *rec
	resolved.State, resolved.StateReason, resolved.RotationStartedAt = store.StateCurrent, "", time.Time{}
	if !rec.SendsMayLand(e.now()) {
		// A window still open (a tunnel recorded gone while a request of
		// a key Vault made was out) is kept: no different key before it
		// ends.
		resolved.SettleUntil = time.Time{}
	}
	resolved.ClearFailures()
	if edge.Date.After(resolved.KeySeenAt) {
		// A later answer that shows the stored key in use: a proof
		// for the next rotation's judgement (keyChangeSince).
		resolved.KeySeenAt = edge.Date
	}
	if err := store.WriteRecord(ctx, s, t, &resolved); err != nil {
		return rec, err
	}
	if err := store.ClearUnresolved(ctx, s, t); err != nil {
		return &resolved, err
	}
	e.TunnelLogger(t).Info("reconciled: cloudflare's key is the stored one")
	return &resolved, nil
}

// holdHealing records drift the engine will not heal by itself (see
// mayHeal): the record is stale and held until an operator writes it.
func (e *Engine) holdHealing(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record, reason string) (*store.Record, error) {
	held := *rec
	if !(rec.HealHeld && rec.State == store.StateStale) {
		// Said once: a tunnel already held keeps its reason, which the
		// background's hourly look would otherwise append again each time.
		reason += "; not healed: the engine already healed this tunnel within the last two drift_check_intervals, so another mount or tool rotates it too. " +
			"A tunnel must belong to one mount: the engine leaves it stale until an operator writes this path"
	}
	held.HealHeld = true
	return e.markStale(ctx, s, t, &held, reason, e.now().Add(store.FailureBackoffMax))
}

// markStale records that the edge uses a key Vault does not hold. The
// background looks at the tunnel again at retryAt: when healing is allowed
// again, or (healing off) after store.FailureBackoffMax, to find out whether the
// tunnel is gone meanwhile.
func (e *Engine) markStale(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record, reason string, retryAt time.Time) (*store.Record, error) {
	stale := *rec
	stale.State, stale.StateReason = store.StateStale, reason
	stale.RotationStartedAt, stale.PendingPSK, stale.PendingTrigger = time.Time{}, "", ""
	if !rec.SendsMayLand(e.now()) {
		// A window still open is kept: a request of a key Vault made may
		// still land, and no different key may be sent before it ends.
		stale.SettleUntil = time.Time{}
	}
	stale.ClearFailures()
	stale.RetryAt = retryAt.UTC()
	if err := store.MarkUnresolved(ctx, s, t); err != nil {
		return rec, err
	}
	if err := store.WriteRecord(ctx, s, t, &stale); err != nil {
		return rec, err
	}
	e.TunnelLogger(t).Warn("stored psk is stale", "reason", reason)
	return &stale, nil
}

// MarkGone records that Cloudflare no longer knows the tunnel. The last key
// is kept, never served as current, and the tunnel leaves the unresolved
// set: there is nothing left to reconcile until someone writes it again or
// the drift sweep finds it listed again (ReturnGone, which judges a record
// found gone before its first rotation resolved as that rotation).
//
// A 404 can pass (gone.go), so nothing the record holds against a request
// still out is dropped: the window in which a request of a key Vault made
// may land (SettleUntil, LateLandingUntil: no different key before it
// ends), and a pending key, which the edge may use and which is finished
// with the same key first once the tunnel is back (a write, ReturnGone).
//
// Except the stored key's LateLandingUntil on a record found gone while
// rotation_unknown: begin copied it into the record of an attempt of
// ANOTHER key (psk_generate's), which was sent only once the stored key's
// requests could no longer land (its settle window had closed). The edge
// may then use that attempt's key, dated within the bound, and a return
// that took it for the stored key re-dated would set the replaced key
// again (judgeReturn): the bound no longer speaks for the edge's key.
func (e *Engine) MarkGone(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record) (*store.Record, error) {
	gone := *rec
	gone.State = store.StateTunnelGone
	if rec.State == store.StateRotationUnknown {
		gone.LateLandingUntil = time.Time{}
	}
	gone.StateReason = fmt.Sprintf("Cloudflare answered at %s that the tunnel does not exist (deleted, or the API token lost its account): the stored key is kept but is not in use",
		store.FormatTime(e.now()))
	if gone.PendingPSK != "" {
		gone.StateReason += fmt.Sprintf("; a key Vault made was being set when it was found gone (a rotation started at %s), and the edge may use it: "+
			"should the tunnel be back, that key is set again first", store.FormatTime(gone.RotationStartedAt))
	} else {
		gone.RotationStartedAt = time.Time{}
	}
	gone.ClearFailures()
	if err := store.WriteRecord(ctx, s, t, &gone); err != nil {
		return rec, err
	}
	if err := store.ClearUnresolved(ctx, s, t); err != nil {
		return &gone, err
	}
	e.TunnelLogger(t).Warn("tunnel no longer exists at cloudflare")
	return &gone, nil
}

// Resolve is a read's reconciliation: a record that is not current (and
// not gone) is held against Cloudflare, and healed where heal_stale_psk
// allows, within request_timeout, so the reader gets the key the edge uses
// or an honest state. It never waits for a rotation in flight: the record
// is returned as it stands, with a warning. The warnings say what could not
// be done; the record returned is what storage holds afterwards (nil: the
// tunnel's only rotation never happened and its record was removed).
func (e *Engine) Resolve(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record) (*store.Record, []string) {
	unlock, ok := e.TryLock(t)
	if !ok {
		return rec, []string{"a rotation of this tunnel is in progress"}
	}
	defer unlock()
	conn, err := e.connect(ctx, s)
	if err != nil {
		return rec, []string{fmt.Sprintf("could not reconcile with Cloudflare: %v", err)}
	}
	// A reader waits at most request_timeout for reconciliation as a whole,
	// healing included, however many calls it takes.
	ctx, cancel := context.WithTimeout(ctx, conn.Settings.RequestTimeout)
	defer cancel()
	// Re-read under the lock: a rotation may have finished since.
	latest, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		return rec, []string{err.Error()}
	}
	if latest == nil || latest.Current() || latest.State == store.StateTunnelGone {
		return latest, nil
	}
	if now := e.now(); latest.Settling(now) || (now.Before(latest.RetryAt) && latest.State != store.StatePending) {
		// Nothing Cloudflare says can settle it yet, or the background is
		// backing off: the state's own warning says until when. A pending
		// key is finished at once whatever retry_at says: that paces the
		// background (a failed scheduled rotation stamps it too), not a
		// reader, who would otherwise be served a key the edge may no
		// longer use while one Set would tell. The budget bounds it, as
		// any call.
		return latest, nil
	}
	resolved, err := e.reconcileLocked(ctx, s, conn, t, latest, conn.Settings.HealStalePSK)
	if err != nil {
		if resolved == nil {
			resolved = latest
		}
		return resolved, []string{fmt.Sprintf("could not reconcile with Cloudflare: %v", err)}
	}
	return resolved, nil
}

// ReconcileInBackground reconciles one unresolved tunnel and says whether it
// asked Cloudflare. A failure other than "not now" is noted on the record,
// so the tunnel is retried with backoff and the reason shows in metadata.
func (e *Engine) ReconcileInBackground(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel) (bool, error) {
	unlock, ok := e.TryLock(t)
	if !ok {
		return false, nil
	}
	defer unlock()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		return false, err
	}
	if rec == nil || rec.Current() || rec.State == store.StateTunnelGone {
		return false, store.ClearUnresolved(ctx, s, t)
	}
	now := e.now()
	if rec.Settling(now) || now.Before(rec.RetryAt) || rec.HeldByAnswer() {
		// A held record waits for an operator (rotate.go, holdWrongKey).
		return false, nil
	}
	_, err = e.reconcileLocked(ctx, s, conn, t, rec, conn.Settings.HealStalePSK)
	if err == nil || TunnelGone(err) || cloudflare.RetryAfter(err) > 0 {
		// Resolved, gone (recorded as such), or "not now", which is no
		// fault of the tunnel's.
		return true, err
	}
	// The record may have changed under reconcileLocked (a heal that
	// failed): note the failure on what is stored now.
	if latest, rerr := store.ReadRecord(ctx, s, t); rerr == nil && latest != nil && !latest.Current() && latest.State != store.StatePending {
		// (A pending record's failed resend noted itself: keepPending.)
		latest.NoteFailure(e.now(), err)
		if werr := store.WriteRecord(ctx, s, t, latest); werr != nil {
			e.TunnelLogger(t).Warn("could not record a failed reconciliation", "error", werr)
		}
	}
	return true, err
}

// compareLocked holds a current record against the edge's view of its
// tunnel (nil: Cloudflare does not list it) and records what it finds: a key
// generated after the stored one makes the record stale (and, with heal,
// heals it if the tunnel was not healed within drift_check_interval); a
// tunnel Cloudflare no longer has makes it tunnel_gone. It returns whether
// the stored key is the edge's. A record that is not current is
// reconciliation's to resolve. The caller holds t's lock.
func (e *Engine) compareLocked(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, edge *cloudflare.TunnelState, mode compareMode) (bool, error) {
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil || rec == nil {
		return false, err
	}
	if edge != nil {
		// The caller's listing or read also says what a router needs of the
		// tunnel: keep it current at no extra call, whatever the key's state.
		if rec, err = e.refreshFacts(ctx, s, t, rec, edge); err != nil {
			return false, err
		}
	}
	if !rec.Current() {
		return false, nil
	}
	if edge == nil {
		_, err := e.MarkGone(ctx, s, t, rec)
		return false, err
	}
	inSync, _, err := e.judgeCurrent(ctx, s, conn, t, rec, sighting{edge: edge, mode: mode})
	return inSync, err
}

// sighting is what judgeCurrent holds a record against: the edge's view of
// the tunnel, and who looks (compareMode). fresh says that the view was
// read under the tunnel's lock after the stored key was seen
// (finishValidation's own read), so it cannot be older than the record: an
// edge key dated before the stored one is another key, whatever the
// answers' Date headers say (none, or a clock stepped back).
type sighting struct {
	edge  *cloudflare.TunnelState
	mode  compareMode
	fresh bool
}

// judgeCurrent holds rec, a record whose stored key is taken as the edge's,
// against the edge (compareLocked) and records a verdict other than "in
// sync": stale, healed, or the stored key set again (lateLanding). It
// returns whether the stored key is the edge's, and whether it wrote a
// record; where it wrote none (in sync, or nothing concluded) what storage
// holds is the caller's. rec need not be stored yet (finishValidation
// judges the record it is about to write, and writes only the verdict).
func (e *Engine) judgeCurrent(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, rec *store.Record, seen sighting) (inSync, recorded bool, err error) {
	edge, mode := seen.edge, seen.mode
	heal := mode == compareDrift && conn.Settings.HealStalePSK
	if edge.PSKLastGeneratedOn.Equal(rec.LastGeneratedOn) {
		return true, false, nil
	}
	if edge.PSKLastGeneratedOn.After(rec.LastGeneratedOn) && !edge.PSKLastGeneratedOn.After(rec.LateLandingUntil) {
		// Re-dated within the time a request of the engine's own, carrying
		// the stored key, may still land: maybe no change of key at all. A
		// listing concludes nothing (in_sync false).
		if mode == compareListing {
			return false, false, nil
		}
		return false, true, e.lateLanding(ctx, s, conn, t, rec, edge)
	}
	if edge.PSKLastGeneratedOn.Before(rec.LastGeneratedOn) && !seen.fresh && !listedAfter(edge, rec) {
		// An older key in a listing taken before the stored key was seen
		// (a rotation stored between the listing and this look): the
		// listing is out of date, not the record. Nothing is concluded.
		return false, false, nil
	}
	// Another time, later or earlier, is another key (keyChangeSince).
	reason := fmt.Sprintf("Cloudflare's key was generated at %s, not when the stored key was (%s): it was changed outside this engine",
		store.FormatTime(edge.PSKLastGeneratedOn), store.FormatTime(rec.LastGeneratedOn))
	if heal && !e.mayHeal(conn.Settings, rec) {
		_, err = e.holdHealing(ctx, s, t, rec, reason)
		return false, true, err
	}
	// Stale first, then healed: a heal that Cloudflare refuses puts back
	// the record it started from, and that must not be the current one.
	// The background looks at the tunnel again at once where healing is on
	// (a listing, which never heals, leaves that to the next read or pass),
	// or, healing off, after an hour.
	retryAt := e.now()
	if !conn.Settings.HealStalePSK {
		retryAt = retryAt.Add(store.FailureBackoffMax)
	}
	stale, err := e.markStale(ctx, s, t, rec, reason, retryAt)
	if err != nil || !heal {
		return false, true, err
	}
	e.TunnelLogger(t).Warn("key changed outside this engine; generating a new key", "edge_generated_on", store.FormatTime(edge.PSKLastGeneratedOn))
	healing := *stale
	healing.EdgeKeyBefore, healing.EdgeKeyBeforeSeenAt, healing.EdgeKeyForeign = edge.PSKLastGeneratedOn, edge.Date, true
	_, err = e.rotateLocked(ctx, s, conn, t, &healing, TriggerHeal)
	return err == nil, true, err
}

// listedAfter reports whether Cloudflare's answer that described the tunnel
// (edge, dated by its Date header) came after the answer that showed the
// stored key (KeySeenAt), both by Cloudflare's clock. Without both dates it
// is not known, and false.
func listedAfter(edge *cloudflare.TunnelState, rec *store.Record) bool {
	return !edge.Date.IsZero() && !rec.KeySeenAt.IsZero() && edge.Date.After(rec.KeySeenAt)
}

// CheckSync holds a managed tunnel's record against what Cloudflare just
// said of it, as the drift sweep does, and records a key changed outside
// this engine at once (stale; a read or the background heals it). A listing
// never generates a key itself, and does not wait for a rotation in flight:
// that tunnel shows in_sync false until it is stored.
func (e *Engine) CheckSync(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, edge *cloudflare.TunnelState) (bool, error) {
	unlock, ok := e.TryLock(t)
	if !ok {
		return false, nil
	}
	defer unlock()
	return e.compareLocked(ctx, s, conn, t, edge, compareListing)
}

// CompareWithEdge is the drift sweep's look at one tunnel (compareLocked).
// It waits for a tunnel whose lock is taken instead of passing over it: the
// sweep marks itself done afterwards, and a tunnel passed over would go
// unchecked for a whole interval. The holder is a rotation (bounded by
// request_timeout) or a storage-only change such as a schedule write.
func (e *Engine) CompareWithEdge(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, edge *cloudflare.TunnelState) (bool, error) {
	defer e.Lock(t)()
	return e.compareLocked(ctx, s, conn, t, edge, compareDrift)
}

// compareMode is who holds a record against the edge: a listing
// (tunnels/), which never sends anything, the drift sweep, which heals
// where heal_stale_psk allows, or a caller that replaces the key next.
type compareMode int

const (
	compareListing compareMode = iota
	compareDrift
	// compareNoHeal holds a record against the edge as the drift sweep
	// does, but makes no key to heal drift: the tunnel is marked stale.
	// It is for a caller that replaces the key next (an operator's write,
	// a scheduled or bulk rotation: finishValidation), which would
	// otherwise make two keys where one was asked for. A re-dated key
	// within LateLandingUntil is still set again where healing is
	// allowed (lateLanding): that makes no key.
	compareNoHeal
)

// lateLanding deals with a current record whose key the edge re-dated
// within LateLandingUntil: a request of the engine's carrying the stored key
// (abandoned earlier and landed late, or a validate_only whose query string
// was dropped) may have set it again, and then the edge uses the stored
// key; or the key changed outside this engine. Cloudflare's times cannot
// tell which. (A listing concludes nothing: compareLocked.) The drift rules
// decide, as for drift: where healing is allowed (heal_stale_psk, and
// mayHeal: not held, not healed within two drift_check_intervals) the
// drift sweep sets the stored key again, which makes it the edge's key
// whichever it was and makes no new key (written ahead as pending, so a
// lost answer is finished like any); where it is held, the tunnel is held
// stale (holdHealing); with heal_stale_psk off it sends nothing and marks
// the tunnel stale, saying why.
func (e *Engine) lateLanding(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, rec *store.Record, edge *cloudflare.TunnelState) error {
	why := fmt.Sprintf("Cloudflare's key was generated at %s, after the stored key (%s) but no later than a request of the engine's own carrying the stored key may have set it again (%s: "+
		"a request that landed late, or a validate_only whose query string was dropped)",
		store.FormatTime(edge.PSKLastGeneratedOn), store.FormatTime(rec.LastGeneratedOn), store.FormatTime(rec.LateLandingUntil))
	if !conn.Settings.HealStalePSK {
		_, err := e.markStale(ctx, s, t, rec, why+": the edge probably uses the stored key, re-dated, but Cloudflare's times cannot prove it, and with heal_stale_psk off "+
			"the engine sends nothing. Write this path for a new key, or turn heal_stale_psk on to have the stored key set again", e.now().Add(store.FailureBackoffMax))
		return err
	}
	if !e.mayHeal(conn.Settings, rec) {
		// Another mount or tool may rotate this tunnel: setting the stored
		// key again would replace its key, as a heal would.
		_, err := e.holdHealing(ctx, s, t, rec, why+": the edge probably uses the stored key, re-dated, but Cloudflare's times cannot prove it")
		return err
	}
	pending := *rec
	now := e.now().UTC()
	pending.State, pending.PendingPSK, pending.PendingTrigger = store.StatePending, rec.PSK, string(TriggerHeal)
	pending.RotationStartedAt = now
	pending.StateReason = why + ": the stored key is being set again, which makes it the edge's key whichever it was"
	if err := store.MarkUnresolved(ctx, s, t); err != nil {
		return err
	}
	if err := store.WriteRecord(ctx, s, t, &pending); err != nil {
		return err
	}
	e.TunnelLogger(t).Info("key re-dated at the edge within the time the engine's own request may land; setting the stored key again",
		"edge_generated_on", store.FormatTime(edge.PSKLastGeneratedOn))
	_, err := e.finishPending(ctx, s, conn, t, &pending)
	return err
}

// RotateNow rotates t, after learning the outcome of its last rotation when
// that is unknown. The caller holds t's lock (a bulk job's or the
// scheduler's item takes it first). It returns the record as it
// stands afterwards: nil when reconciliation found that the tunnel's only
// rotation never happened and removed its record.
//
// A pending key finished on the way (a new key stored, a version on) is the
// rotation the trigger asked for: the edge was given a new key, and the
// schedule moved on from it (finish). Another now would be a second key
// for one request, which nobody asked for. A pending record finished with
// the key it already held (a late landing set again: no new key) is not,
// and the rotation goes on.
func (e *Engine) RotateNow(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, rec *store.Record, trigger Trigger) (*store.Record, error) {
	if !rec.Current() {
		before := rec
		var err error
		if rec, err = e.reconcileLocked(ctx, s, conn, t, rec, false); err != nil || rec == nil {
			return rec, err
		}
		if before.PendingPSK != "" && rec.Current() && rec.Version > before.Version {
			return rec, nil
		}
	}
	return e.rotateLocked(ctx, s, conn, t, rec, trigger)
}

// IsSettling reports whether err refused a call because the tunnel's last
// rotation may still change the edge's key (rotate.go's SettlingError):
// the entry waits, as for a record found settling before the call.
func IsSettling(err error) bool {
	var settling *SettlingError
	return errors.As(err, &settling)
}

// RetryLater moves a failed scheduled rotation into the future, by
// the record's backoff (noteFailure: 1m, doubling, at most 1h), so that a
// tunnel that always fails costs a call an hour, not one a minute, and its
// metadata says how often and why it failed (a stored rotation clears that).
// The caller holds t's lock. It returns an error when the new time
// could not be stored, entry and record both: the caller then keeps the old
// entry, which is deleted only once its replacement and the record that
// points at it are stored, so a storage failure can delay a schedule but
// never lose it.
func (e *Engine) RetryLater(ctx context.Context, s logical.Storage, t store.Tunnel, cause error) error {
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		return err
	}
	if rec == nil || !rec.Scheduled() {
		return nil
	}
	rec.NoteFailure(e.now(), cause)
	rec.NextRotation = rec.RetryAt
	// The entry being worked is the caller's to remove.
	if _, err := store.SaveScheduled(ctx, s, rec, time.Time{}, false); err != nil {
		return fmt.Errorf("reschedule the failed rotation of %s: %w", t, err)
	}
	return nil
}
