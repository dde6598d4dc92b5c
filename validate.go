package main

// A validate_only write asks Cloudflare to check a psk_generate without
// generating (?validate_only=true). The engine cannot trust that the query
// string arrives: a proxy or gateway on the way that drops it turns the
// validation into a real generation, and Cloudflare activates a key that
// nobody would hold. So a validation is run under the same protocol as a
// rotation (rotation.go): the tunnel's lock is held, the record is written
// rotation_unknown before the call, and only the answer decides what
// happened:
//
//   - no key in the answer: a validation; the record is put back as it was;
//   - a key in the answer: Cloudflare generated it, and it is live at the
//     edge; it is stored as a rotation (version+1, current) and the caller
//     is warned;
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

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
)

// generatedAnywayWarning is what the caller of a validation that generated
// a key is told.
const generatedAnywayWarning = "Cloudflare generated a key although validate_only was asked " +
	"(a proxy or gateway on the way may have dropped the query string): it is stored as a rotation, version %d, " +
	"and is the key the edge uses now; give it to the router"

// validateRotationSafely is a validate_only write of t. It returns the
// record it stored when Cloudflare's answer carried a key (see above), nil
// when it only validated.
func (b *backend) validateRotationSafely(ctx context.Context, s logical.Storage, t tunnelRef) (*pskRecord, error) {
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
		// As before a rotation: learn what became of the last one first,
		// without healing (this is a validation). Marking the record
		// pending now would overwrite the start of that rotation.
		if rec, err = b.reconcileLocked(ctx, s, client, cfg, t, rec, false); err != nil {
			return nil, fmt.Errorf("learn the outcome of the last rotation of %s before validating: %w", t, err)
		}
		if rec != nil && rec.State == stateRotationUnknown {
			// Too soon to tell: a validation that turned into a generation
			// could be overtaken by the abandoned request.
			until := rec.SettleUntil
			if until.IsZero() {
				until = rec.RotationStartedAt.Add(settleWindow(cfg))
			}
			return nil, &settlingError{tunnel: t, until: until}
		}
	}

	pending := &pskRecord{AccountID: t.AccountID, TunnelID: t.TunnelID}
	if rec != nil {
		copied := *rec
		pending = &copied
	}
	pending.State = stateRotationUnknown
	pending.RotationStartedAt = b.now().UTC()
	pending.SettleUntil = pending.RotationStartedAt.Add(settleWindow(cfg))
	pending.StateReason = fmt.Sprintf("a validate_only request started at %s and has not finished "+
		"(if the query string was dropped on the way, Cloudflare generates a key)", formatTime(pending.RotationStartedAt))
	if err := markUnresolved(ctx, s, t); err != nil {
		return nil, err
	}
	if err := writePSKRecord(ctx, s, t, pending); err != nil {
		// The marker alone is harmless: reconciliation finds the record
		// as it was and clears it.
		return nil, err
	}

	generated, err := client.GeneratePSK(ctx, t.AccountID, t.TunnelID, true)
	if err != nil {
		if cloudflare.NoEffect(err) {
			b.restore(ctx, s, t, rec)
			return nil, fmt.Errorf("validate psk generation for %s: %w", t, err)
		}
		pending.StateReason = fmt.Sprintf("the validate_only request started at %s failed with an unknown outcome (%v): "+
			"if the query string was dropped on the way, Cloudflare may already use a key Vault does not hold",
			formatTime(pending.RotationStartedAt), err)
		if werr := writePSKRecord(ctx, s, t, pending); werr != nil {
			b.tunnelLogger(t).Warn("could not record a validation's unknown outcome", "error", werr)
		}
		return nil, fmt.Errorf("validate psk generation for %s: %w; the outcome is unknown (a dropped query string would have made it a generation), "+
			"so the tunnel is marked %s until reconciliation learns from Cloudflare whether its key changed", t, err, stateRotationUnknown)
	}
	if generated.PSK == "" {
		b.restore(ctx, s, t, rec)
		return nil, nil
	}

	// The edge uses this key now. The schedule is kept as it was (the
	// caller asked for no rotation, and a validate_only write cannot set
	// rotation_period): the next scheduled rotation comes at its time.
	stored := *pending
	stored.PSK = generated.PSK
	stored.LastGeneratedOn = generated.LastGeneratedOn.UTC()
	stored.Version = pending.Version + 1
	stored.StoredAt = b.now().UTC()
	stored.State, stored.StateReason = stateCurrent, ""
	stored.RotationStartedAt, stored.SettleUntil = time.Time{}, time.Time{}
	stored.clearFailures()
	if err := b.storeGenerated(ctx, s, t, &stored); err != nil {
		return nil, err
	}
	go b.sendRotateEvent(context.WithoutCancel(ctx), &stored, "validate_only")
	if err := clearUnresolved(ctx, s, t); err != nil {
		// The record is current; a marker left behind is cleared by the
		// next background pass.
		b.tunnelLogger(t).Warn("could not clear an unresolved mark", "error", err)
	}
	b.tunnelLogger(t).Warn("cloudflare generated a psk for a validate_only request; stored as a rotation", "version", stored.Version)
	return &stored, nil
}

// validateOnlyResponse is the answer to a validate_only write: what was
// validated, and, when Cloudflare generated a key anyway, the stored key's
// metadata (never the key) with a warning.
func validateOnlyResponse(t tunnelRef, stored *pskRecord) *logical.Response {
	if stored == nil {
		return &logical.Response{Data: map[string]any{
			"account_id":    t.AccountID,
			"tunnel_id":     t.TunnelID,
			"validate_only": true,
			"stored":        false,
		}}
	}
	data := stored.metadata()
	data["validate_only"] = true
	data["stored"] = true
	resp := &logical.Response{Data: data}
	resp.AddWarning(fmt.Sprintf(generatedAnywayWarning, stored.Version))
	return resp
}
