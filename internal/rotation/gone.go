package rotation

// A tunnel recorded gone that Cloudflare lists again.
//
// One 404 records tunnel_gone (MarkGone), and a 404 can pass: a tunnel
// deleted and restored, an API token that lost its account for a while.
// Nothing spends a call on a gone tunnel, so without a way back its schedule
// would stop for good. The drift sweep lists every managed account's
// tunnels anyway; a gone tunnel it finds listed again it hands to ReturnGone
// (at most once a day each: internal/background's sweep).

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// ReturnGone returns t, recorded tunnel_gone, to management now that
// Cloudflare lists it again (listed: what the listing says of it; nil: not
// listed, and nothing is done). The listing only prompts a look: it may be
// older than the 404 that recorded the tunnel gone (a scheduled rotation
// between the sweep's listing and this look), so the tunnel is read again
// under its lock, after that 404, and only that answer can bring it back.
//
// Its key is then judged by Cloudflare's times (judgeReturn). The record is
// current again only where they prove that the edge still uses the stored
// key. Where they prove another key, the edge uses a key Vault does not
// hold, as after drift: the record is stale and, with heal_stale_psk,
// healed (mayHeal decides, as for drift); a key re-dated within
// LateLandingUntil, which MarkGone keeps (not where another key's attempt
// was outstanding: judgeReturn), may be the engine's own late
// request and is judged as the drift sweep judges it (lateLanding: the
// stored key set again where healing is allowed, no new key). Where they
// prove nothing (a key of the stored key's own whole second, with no later
// answer on record that showed the stored key), the record is stale and
// held: no key is made that nobody asked for, and an operator's write or
// the next scheduled rotation ends it. A record whose first rotation never
// resolved (no key stored) is judged as reconciliation would have judged
// it: removed if that rotation never happened, healed if it did.
//
// A record found gone with a key Vault made pending (MarkGone keeps it) is
// finished with that key first, as any pending record.
//
// Either way its schedule is restored, an entry for its next rotation,
// which the scheduler works as after a restart: at once if it fell due
// meanwhile (past its rotation_window, at the next scheduled time). A heal
// schedules afresh, as any rotation does.
//
// It stamps GoneLookedAt, by which the sweep paces its looks, and returns
// whether the record is current afterwards. It waits for t's lock, as
// CompareWithEdge does.
func (e *Engine) ReturnGone(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, listed *cloudflare.TunnelState) (bool, error) {
	if listed == nil {
		return false, nil
	}
	defer e.Lock(t)()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil || rec == nil || rec.State != store.StateTunnelGone {
		// Written, forgotten or returned since the sweep read it.
		return false, err
	}
	back := *rec
	back.GoneLookedAt = e.now().UTC()
	edge, err := conn.Edge.GetTunnel(ctx, t.AccountID, t.TunnelID)
	if cloudflare.NotFound(err) {
		// Still gone: the listing was older than the 404. Looked at all
		// the same, for the sweep's pace.
		return false, store.WriteRecord(ctx, s, t, &back)
	}
	if err != nil {
		return false, fmt.Errorf("read %s, recorded gone and listed at Cloudflare again: %w", t, err)
	}
	back.Facts = e.edgeFacts(t, edge, rec.Facts)
	back.ClearFailures()
	log := e.TunnelLogger(t)
	if back.PendingPSK != "" {
		// Found gone while a key Vault made was pending: the edge may use
		// it. Finished with the same key first, as any pending key, and
		// the echo decides, not Cloudflare's times; its schedule with it.
		log.Info("tunnel recorded gone with a pending key is listed at Cloudflare again; setting the pending key again")
		if err := e.restoreSchedule(ctx, s, t, &back); err != nil {
			return false, err
		}
		finished, err := e.finishPending(ctx, s, conn, t, &back)
		return err == nil && finished.Current(), err
	}

	switch verdict, reason := judgeReturn(&back, edge); verdict {
	case edgeNeverRotated:
		log.Info("tunnel recorded gone is listed at Cloudflare again; its first rotation never happened, so nothing is stored")
		return false, store.ForgetRecord(ctx, s, t, &back)
	case edgeUsesStoredKey:
		return true, e.returnCurrent(ctx, s, t, &back, edge)
	case edgeReDated:
		// As the drift sweep meets it on a current record (compareLocked):
		// the stored key set again where healing is allowed, which makes
		// no key; stale, saying why, where it is not.
		log.Info("tunnel recorded gone is listed at Cloudflare again with its key re-dated within the time the engine's own request may land",
			"edge_generated_on", store.FormatTime(edge.PSKLastGeneratedOn))
		if err := e.restoreSchedule(ctx, s, t, &back); err != nil {
			return false, err
		}
		if err := e.lateLanding(ctx, s, conn, t, &back, edge); err != nil {
			return false, err
		}
		latest, err := store.ReadRecord(ctx, s, t)
		return err == nil && latest != nil && latest.Current(), err
	case edgeUndecided:
		log.Warn("tunnel recorded gone is listed at Cloudflare again; Cloudflare's times cannot tell its key from the stored one",
			"edge_generated_on", store.FormatTime(edge.PSKLastGeneratedOn))
		if err := e.restoreSchedule(ctx, s, t, &back); err != nil {
			return false, err
		}
		back.HealHeld = true
		_, err := e.markStale(ctx, s, t, &back, reason, e.now().Add(store.FailureBackoffMax))
		return false, err
	default:
		log.Warn("tunnel recorded gone is listed at Cloudflare again with a key Vault does not hold",
			"edge_generated_on", store.FormatTime(edge.PSKLastGeneratedOn))
		back.StateReason = reason
		return e.returnChanged(ctx, s, conn, t, &back, edge)
	}
}

// For a returned tunnel only: edgeUndecided, Cloudflare's times cannot
// tell the edge's key from the stored one; edgeReDated, the edge dates the
// key later than the stored one, but no later than a request of the
// engine's own carrying the stored key may have set it again
// (LateLandingUntil, which MarkGone keeps).
const (
	edgeUndecided edgeVerdict = -1
	edgeReDated   edgeVerdict = -2
)

// judgeReturn judges the key of a tunnel recorded gone that Cloudflare
// lists again. A record with a key is judged by that key's time and the
// last answer that showed it (KeySeenAt); one without is the unresolved
// first rotation it was when it was found gone, judged as reconciliation
// judges it (judgeEdge). A key re-dated within LateLandingUntil is
// edgeReDated, as for the drift sweep. The bound is there only where the
// record was found gone current (or stale, or pending with the stored key:
// a validation), with no attempt of another key outstanding: MarkGone drops
// it from a rotation_unknown record, whose attempt's key the edge may use,
// dated within it. Such a record is judged as before the bound was read: a
// later key is a change, healed as drift.
func judgeReturn(rec *store.Record, edge *cloudflare.TunnelState) (edgeVerdict, string) {
	const prefix = "the tunnel was recorded gone and Cloudflare lists it again; "
	if rec.PSK == "" {
		unresolved := *rec
		unresolved.State = store.StateRotationUnknown
		verdict, reason := judgeEdge(&unresolved, edge.PSKLastGeneratedOn)
		return verdict, prefix + reason
	}
	if !rec.AnswerHeld && edge.PSKLastGeneratedOn.After(rec.LastGeneratedOn) && !edge.PSKLastGeneratedOn.After(rec.LateLandingUntil) {
		// Maybe the engine's own late request, maybe a change outside it:
		// judged as the drift sweep judges it (lateLanding), not healed
		// with a new key. (A record held for an answer's key of the wrong
		// form stays held: returnChanged.)
		return edgeReDated, ""
	}
	switch keyChangeSince(edge.PSKLastGeneratedOn, rec.LastGeneratedOn, rec.KeySeenAt, false) {
	case keyUnchanged:
		return edgeUsesStoredKey, ""
	case keyChanged:
		return edgeChanged, prefix + fmt.Sprintf("Cloudflare's key was generated at %s, not when the stored key was (%s): it was changed outside this engine, so the stored key is not the one the edge uses",
			keyTime(edge.PSKLastGeneratedOn), store.OrNever(rec.LastGeneratedOn))
	}
	return edgeUndecided, prefix + fmt.Sprintf("Cloudflare's key was generated at %s, in the same whole second as the stored key, and no answer on record proves that second had passed when the stored key was last seen: "+
		"the edge may use the stored key or another made in that second. Not healed, since no rotation was asked for: an operator's write, or the next scheduled rotation, gives the tunnel a key Vault holds",
		store.FormatTime(edge.PSKLastGeneratedOn))
}

// returnCurrent records a returned tunnel whose edge still uses the stored
// key as current, with its schedule.
func (e *Engine) returnCurrent(ctx context.Context, s logical.Storage, t store.Tunnel, back *store.Record, edge *cloudflare.TunnelState) error {
	back.State, back.StateReason = store.StateCurrent, ""
	if edge.Date.After(back.KeySeenAt) {
		back.KeySeenAt = edge.Date
	}
	// The entry first, then the record (SaveScheduled): an entry whose
	// record is still gone is dropped by the scheduler, while a record
	// whose next rotation had no entry would wait for the repair walk.
	if _, err := store.SaveScheduled(ctx, s, back, time.Time{}, false); err != nil {
		return fmt.Errorf("return %s, listed at Cloudflare again, to its schedule: %w", t, err)
	}
	if !back.NextRotation.IsZero() {
		e.scheduled()
	}
	e.TunnelLogger(t).Info("tunnel recorded gone is listed at Cloudflare again with the stored key; returned to its schedule",
		"next_rotation", store.FormatTime(back.NextRotation))
	return nil
}

// restoreSchedule puts back the entry of a returned tunnel's next rotation,
// before the record leaves tunnel_gone, as SaveScheduled orders it.
func (e *Engine) restoreSchedule(ctx context.Context, s logical.Storage, t store.Tunnel, back *store.Record) error {
	if back.NextRotation.IsZero() {
		return nil
	}
	if err := store.ScheduleRotation(ctx, s, t, back.NextRotation); err != nil {
		return fmt.Errorf("return %s, listed at Cloudflare again, to its schedule: %w", t, err)
	}
	e.scheduled()
	return nil
}

// returnChanged records a returned tunnel whose edge uses a key Vault does
// not hold (back.StateReason says why): stale, with its schedule, and healed where heal_stale_psk and
// mayHeal allow. A tunnel held for a key of the wrong form stays held: only
// an operator's write makes a key for it (holdWrongKey).
func (e *Engine) returnChanged(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, back *store.Record, edge *cloudflare.TunnelState) (bool, error) {
	reason := back.StateReason
	// A heal below replaces the entry with its own.
	if err := e.restoreSchedule(ctx, s, t, back); err != nil {
		return false, err
	}
	heal := conn.Settings.HealStalePSK && !back.AnswerHeld
	if heal && !e.mayHeal(conn.Settings, back) {
		_, err := e.holdHealing(ctx, s, t, back, reason)
		return false, err
	}
	// Stale first, then healed, as compareLocked does: a heal that
	// Cloudflare refuses puts back the record it started from, and that
	// must say the stored key is not the edge's. The background looks
	// again at once where healing is on, or after an hour.
	retryAt := e.now()
	if !heal {
		retryAt = retryAt.Add(store.FailureBackoffMax)
	}
	stale, err := e.markStale(ctx, s, t, back, reason, retryAt)
	if err != nil || !heal {
		return false, err
	}
	healing := *stale
	healing.EdgeKeyBefore, healing.EdgeKeyBeforeSeenAt, healing.EdgeKeyForeign = edge.PSKLastGeneratedOn, edge.Date, true
	_, err = e.rotateLocked(ctx, s, conn, t, &healing, TriggerHeal)
	return err == nil, err
}
