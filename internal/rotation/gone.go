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
// Cloudflare lists it again; edge is what the listing says of it (nil:
// not listed, and nothing is done). Its key is judged by the rules that
// judge any record that is not current (judgeEdge): the record is current
// again only where Cloudflare's times prove that the edge still uses the
// stored key. Otherwise the edge uses a key Vault does not hold, as after
// drift: the record is stale and, with heal_stale_psk, healed (mayHeal
// decides, as for drift). Either way its schedule is restored, an entry
// for its next rotation, which the scheduler works as after a restart: at
// once if it fell due meanwhile (past its rotation_window, at the next
// scheduled time). A heal schedules afresh, as any rotation does.
//
// It stamps GoneLookedAt, by which the sweep paces its looks, and returns
// whether the record is current afterwards. It waits for t's lock, as
// CompareWithEdge does.
func (e *Engine) ReturnGone(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, edge *cloudflare.TunnelState) (bool, error) {
	if edge == nil {
		return false, nil
	}
	defer e.Lock(t)()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil || rec == nil || rec.State != store.StateTunnelGone {
		// Written, forgotten or returned since the sweep read it.
		return false, err
	}
	log := e.TunnelLogger(t)
	back := *rec
	back.GoneLookedAt = e.now().UTC()
	back.Facts = e.edgeFacts(t, edge, rec.Facts)
	back.ClearFailures()

	verdict, reason := judgeEdge(&back, edge.PSKLastGeneratedOn)
	if verdict == edgeUsesStoredKey {
		back.State, back.StateReason = store.StateCurrent, ""
		if edge.Date.After(back.KeySeenAt) {
			back.KeySeenAt = edge.Date
		}
		// The entry first, then the record (SaveScheduled): an entry whose
		// record is still gone is dropped by the scheduler, while a record
		// whose next rotation had no entry would wait for the repair walk.
		if _, err := store.SaveScheduled(ctx, s, &back, time.Time{}, false); err != nil {
			return false, fmt.Errorf("return %s, listed at Cloudflare again, to its schedule: %w", t, err)
		}
		if !back.NextRotation.IsZero() {
			e.scheduled()
		}
		log.Info("tunnel recorded gone is listed at Cloudflare again with the stored key; returned to its schedule",
			"next_rotation", store.FormatTime(back.NextRotation))
		return true, nil
	}

	// The edge uses a key Vault does not hold (edgeNeverRotated cannot
	// come of a record that is not rotation_unknown).
	reason = "the tunnel was recorded gone and Cloudflare lists it again; " + reason
	log.Warn("tunnel recorded gone is listed at Cloudflare again with a key Vault does not hold",
		"edge_generated_on", store.FormatTime(edge.PSKLastGeneratedOn))
	if !back.NextRotation.IsZero() {
		// Before the record leaves tunnel_gone, as SaveScheduled orders
		// it; a heal below replaces the entry with its own.
		if err := store.ScheduleRotation(ctx, s, t, back.NextRotation); err != nil {
			return false, fmt.Errorf("return %s, listed at Cloudflare again, to its schedule: %w", t, err)
		}
		defer e.scheduled()
	}
	// A tunnel held for a key of the wrong form stays held: only an
	// operator's write makes a key for it (holdWrongKey).
	heal := conn.Settings.HealStalePSK && !back.AnswerHeld
	if heal && !e.mayHeal(conn.Settings, &back) {
		_, err := e.holdHealing(ctx, s, t, &back, reason)
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
	stale, err := e.markStale(ctx, s, t, &back, reason, retryAt)
	if err != nil || !heal {
		return false, err
	}
	healing := *stale
	healing.EdgeKeyBefore, healing.EdgeKeyBeforeSeenAt, healing.EdgeKeyForeign = edge.PSKLastGeneratedOn, edge.Date, true
	_, err = e.rotateLocked(ctx, s, conn, t, &healing, TriggerHeal)
	return err == nil, err
}
