package rotation

// A validate_only write asks Cloudflare to check a psk_generate without
// generating (?validate_only=true). The engine cannot trust that the query
// string arrives: a proxy or gateway on the way that drops it turns the
// validation into a real generation, and Cloudflare activates a key that
// nobody would hold. So a validation is run under the same protocol as a
// rotation (generate in rotate.go): the tunnel's lock is held, the
// record is written rotation_unknown before the call, and only the answer
// decides what happened:
//
//   - no key in the answer: a validation; the record is put back as it was;
//   - a key in the answer: Cloudflare generated it (the query was dropped)
//     or merely showed one; the edge is asked (its key time before the
//     request was read first). A key in use there, generated when the
//     answer says and provably not the key the edge had before, is stored
//     as a rotation (version+1, current; a schedule restarts from it) and
//     the caller is warned; where the edge provably still has its earlier
//     key the answer's key is discarded; anything else leaves the tunnel
//     rotation_unknown, as below;
//   - a refusal (4xx, rate limit, not sent): nothing happened; the record is
//     put back;
//   - anything else (no answer, a 5xx, a malformed answer): the outcome is
//     unknown; the record stays rotation_unknown and reconciliation learns
//     from Cloudflare's tunnel record whether the key changed, and heals.
//
// It is the rotation protocol always, not only when a record exists: a
// tunnel's first key is as lost as any other if the query is dropped.

import (
	"context"
	"fmt"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

// Validate is a validate_only write of t. It returns the record it
// stored when Cloudflare's answer carried a key (see above), nil when it only
// validated; and, for key_source vault, a note on how it validated.
func (e *Engine) Validate(ctx context.Context, s logical.Storage, t store.Tunnel) (*store.Record, string, error) {
	// As before a rotation (beginWrite): while the last one still settles,
	// a validation that turned into a generation could be overtaken by the
	// abandoned request, so it is refused (409).
	conn, rec, unlock, err := e.beginWrite(ctx, s, t, false)
	if err != nil {
		return nil, "", err
	}
	defer unlock()
	if e.keySource(conn.Settings).Name() == store.KeySourceVault {
		note, err := e.validateVault(ctx, &attempt{s: s, conn: conn, t: t, previous: rec, sched: rec.Schedule(), trigger: TriggerValidate})
		if err != nil {
			return nil, "", fmt.Errorf("validate setting a key for %s: %w", t, err)
		}
		return nil, note, nil
	}
	stored, err := e.generate(ctx, &attempt{s: s, conn: conn, t: t, previous: rec, sched: rec.Schedule(), trigger: TriggerValidate})
	if err != nil {
		if outcomeUnknown(err) {
			err = fmt.Errorf("%w; the outcome is unknown (a dropped query string would have made it a generation), "+
				"so the tunnel is marked %s until reconciliation learns from Cloudflare whether its key changed", err, store.StateRotationUnknown)
		}
		return nil, "", fmt.Errorf("validate psk generation for %s: %w", t, err)
	}
	if stored != nil {
		e.TunnelLogger(t).Warn("cloudflare generated a psk for a validate_only request; stored as a rotation", "version", stored.Version)
	}
	return stored, "", nil
}

// With key_source vault a validation never makes a key, and never changes
// the edge by itself: it sends the stored key, the one the edge uses,
// through the Set operation with ?validate_only=true, and nothing else.
// Should something on the way drop the query string, the edge takes the key
// it already has, which is harmless, but re-dated. So the stored key is
// written ahead as pending, as for a rotation, until the answer decides.
// Should the answer be lost, that pending record is never finished by
// sending its key for real, as a rotation's is: that would change the edge,
// and replace a key changed outside this engine even with heal_stale_psk
// off. It is dropped instead, and the drift rules decide (finishValidation).
//
// An answer that dates the tunnel's key later than the stored one cannot
// tell which happened: the query string dropped (the edge uses the stored
// key, re-dated), or the key changed outside this engine before (the edge
// uses another). A real Set of the stored key would settle it, but that
// changes the edge, which a validation must not do: with heal_stale_psk off
// (or the tunnel held from healing, HealHeld) it would replace a key the
// operator chose not to have replaced. So nothing more is sent. The record
// is put back with the answer's time as LateLandingUntil, the bound up to
// which a re-dated key may be the engine's own, and the drift rules decide
// at the next drift sweep (lateLanding): the stored key set again where
// healing is allowed, the tunnel stale saying why where it is not; a key
// dated later still is drift as ever. The caller is told so.
//
// Without a key Vault holds as the edge's (no record, or one not current)
// nothing is sent that could set a key: the tunnel is read (it exists, the
// token reaches it).
const (
	noteValidatedBySet  = "Cloudflare validated setting the stored key (Set operation, validate_only): no key was made or changed"
	noteValidatedByRead = "Vault holds no key that is the edge's for this tunnel, so no key was sent: the tunnel was read instead " +
		"(it exists and the API token reaches it); the Set operation itself was not validated"
	noteDatedLater = "Cloudflare validated setting the stored key, but its answer dated the tunnel's key later than the stored one: " +
		"something on the way may have dropped the query string, which set the stored key again (harmless), or the key was changed outside this engine. " +
		"Cloudflare's answer cannot tell which, and a validation changes nothing at the edge: the drift sweep decides, by heal_stale_psk " +
		"(the stored key set again where healing is allowed, the tunnel marked stale where it is not)"
)

// validateVault is a validation with key_source vault (see above). It
// returns the note for the caller.
func (e *Engine) validateVault(ctx context.Context, a *attempt) (string, error) {
	rec := a.previous
	if rec == nil || !rec.Current() || rec.PSK == "" {
		if _, err := a.conn.Edge.GetTunnel(ctx, a.t.AccountID, a.t.TunnelID); err != nil {
			return "", fmt.Errorf("read the tunnel: %w", err)
		}
		return noteValidatedByRead, nil
	}
	a.key, a.source = rec.PSK, rec.KeySource
	if err := e.begin(ctx, a); err != nil {
		return "", err
	}
	res, err := a.conn.Edge.SetPSKs(ctx, a.t.AccountID, []cloudflare.PSKToSet{{TunnelID: a.t.TunnelID, PSK: a.key}}, true)
	if err != nil {
		return "", e.setFailed(ctx, a, err)
	}
	r, _ := res.Tunnel(a.t.TunnelID)
	switch r.Outcome {
	case cloudflare.PSKApplied:
		if !r.LastGeneratedOn.After(rec.LastGeneratedOn) {
			e.restore(ctx, a.s, a.t, a.previous)
			return noteValidatedBySet, nil
		}
		e.TunnelLogger(a.t).Warn("a validate_only answer dated the stored key later than Vault knew it; nothing more is sent, the drift sweep decides",
			"edge_generated_on", store.FormatTime(r.LastGeneratedOn))
		// The validation was answered, so it cannot land later: the record
		// as it was, with the answer's time as the bound up to which a
		// re-dated key may be the engine's own.
		bounded := *rec
		bounded.LateLandingUntil = later(rec.LateLandingUntil, r.LastGeneratedOn.UTC())
		if err := store.WriteRecord(ctx, a.s, a.t, &bounded); err != nil {
			return "", fmt.Errorf("record the validation's answer for %s: %w", a.t, err)
		}
		if err := store.ClearUnresolved(ctx, a.s, a.t); err != nil {
			e.TunnelLogger(a.t).Warn("could not clear an unresolved mark", "error", err)
		}
		return noteDatedLater, nil
	case cloudflare.PSKUnapplied:
		return "", e.keyUnapplied(ctx, a, r.Reason)
	}
	return "", e.keepPending(ctx, a, &cloudflare.MalformedResponseError{Op: cloudflare.OpSetPSKs, Reason: r.Reason})
}

// finishValidation ends a validation with key_source vault whose answer was
// lost (rec: pending, PendingTrigger validate, its key the stored one), for
// a read, a write or the background pass. Nothing is sent that could set a
// key. The pending validation is dropped: the tunnel is read, and the
// record as it was before the validation (current: validateVault wrote it
// ahead only for a current record) is held against the edge as the drift
// sweep holds it (judgeCurrent). Only the verdict is written, in one
// write: until then the record stays pending. The same key time is the
// stored key, in sync; a time re-dated no later than the validation's
// request may have re-dated it (its query string dropped) is a late
// landing (lateLanding: the stored key set again where healing is allowed,
// the tunnel stale where it is not); a later one is drift, and so is an
// earlier one: this read is the record's own, taken after the stored key
// was seen, never an out-of-date listing (sighting.fresh). heal is the
// caller's: an operator's write or a rotation, which replaces the key
// next, makes no key to heal drift on the way (compareNoHeal).
//
// The validation's request may still land until SettleUntil, and set the
// stored key again: the window is kept (no different key before it ends),
// and carried over to Cloudflare's clock as the bound for a re-dated key
// (LateLandingUntil), extended, never shortened.
func (e *Engine) finishValidation(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, rec *store.Record, heal bool) (*store.Record, error) {
	dropped := *rec
	dropped.State, dropped.StateReason, dropped.RotationStartedAt = store.StateCurrent, "", time.Time{}
	dropped.PendingPSK, dropped.PendingTrigger = "", ""
	dropped.ClearFailures()
	edge, err := conn.Edge.GetTunnel(ctx, t.AccountID, t.TunnelID)
	if err != nil && !cloudflare.NotFound(err) {
		err = fmt.Errorf("end the validation of %s whose answer was lost: read the tunnel: %w", t, err)
		if cloudflare.RetryAfter(err) == 0 {
			// Pending records are not noted by the background
			// (ReconcileInBackground): back off here, as a resend does.
			failed := *rec
			failed.NoteFailure(e.now(), err)
			if werr := store.WriteRecord(context.WithoutCancel(ctx), s, t, &failed); werr != nil {
				e.TunnelLogger(t).Warn("could not record a failed look at the edge", "error", werr)
			}
			return &failed, err
		}
		return rec, err
	}
	answered := e.now()
	if err == nil && !edge.Date.IsZero() {
		answered = edge.Date
	}
	// Up to where, by Cloudflare's clock, the validation's request may have
	// re-dated the stored key: its window's end, however long ago. Without
	// a Date (none, or a 404's, which carries none here) this node's clock
	// stands in: dateProofMargin allows for clocks apart.
	dropped.LateLandingUntil = later(rec.LateLandingUntil, answered.UTC().Add(rec.SettleUntil.Sub(e.now())+dateProofMargin))
	if !dropped.SendsMayLand(e.now()) {
		dropped.SettleUntil = time.Time{}
	}
	if err != nil {
		// A 404 can pass: the bound is kept with the record (MarkGone), so
		// that a return judges a re-dated key as the drift sweep would
		// have (judgeReturn), not as a change outside the engine.
		gone, werr := e.MarkGone(ctx, s, t, &dropped)
		if werr != nil {
			return rec, werr
		}
		return gone, fmt.Errorf("end the validation of %s whose answer was lost: %w", t, err)
	}
	dropped = e.refreshed(t, &dropped, edge)
	e.TunnelLogger(t).Info("a validation whose answer was lost is dropped; the stored key is held against the edge")
	mode := compareDrift
	if !heal {
		mode = compareNoHeal
	}
	// The verdict first, and only the verdict is written: the record stays
	// pending (and marked unresolved) until then, so a storage failure or a
	// crash on the way leaves it pending, never current for a key the read
	// in hand showed the edge does not use.
	// The read was taken under the lock, after the stored key was seen
	// (fresh): a key other than the stored one in it is drift, never an
	// out-of-date listing, even dated before the stored key (Cloudflare's
	// clock stepped back; the validation's own look before it may already
	// have seen it, EdgeKeyForeign) and whatever its Date says.
	_, recorded, err := e.judgeCurrent(ctx, s, conn, t, &dropped, sighting{edge: edge, mode: mode, fresh: true})
	if err == nil && !recorded {
		// In sync (or nothing concluded): current, as before the validation.
		if err := store.WriteRecord(ctx, s, t, &dropped); err != nil {
			return rec, fmt.Errorf("end the validation of %s whose answer was lost: %w", t, err)
		}
		if err := store.ClearUnresolved(ctx, s, t); err != nil {
			e.TunnelLogger(t).Warn("could not clear an unresolved mark", "error", err)
		}
		return &dropped, nil
	}
	latest, rerr := store.ReadRecord(context.WithoutCancel(ctx), s, t)
	if rerr != nil || latest == nil {
		latest = rec
	}
	if err != nil {
		return latest, fmt.Errorf("end the validation of %s whose answer was lost: %w", t, err)
	}
	return latest, nil
}
