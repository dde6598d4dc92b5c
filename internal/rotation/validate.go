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

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

// Validate is a validate_only write of t. It returns the record it
// stored when Cloudflare's answer carried a key (see above), nil when it only
// validated.
func (e *Engine) Validate(ctx context.Context, s logical.Storage, t store.Tunnel) (*store.Record, error) {
	// As before a rotation (beginWrite): while the last one still settles,
	// a validation that turned into a generation could be overtaken by the
	// abandoned request, so it is refused (409).
	conn, rec, unlock, err := e.beginWrite(ctx, s, t)
	if err != nil {
		return nil, err
	}
	defer unlock()
	stored, err := e.generate(ctx, &attempt{s: s, conn: conn, t: t, previous: rec, sched: rec.Schedule(), trigger: TriggerValidate})
	if err != nil {
		if outcomeUnknown(err) {
			err = fmt.Errorf("%w; the outcome is unknown (a dropped query string would have made it a generation), "+
				"so the tunnel is marked %s until reconciliation learns from Cloudflare whether its key changed", err, store.StateRotationUnknown)
		}
		return nil, fmt.Errorf("validate psk generation for %s: %w", t, err)
	}
	if stored != nil {
		e.TunnelLogger(t).Warn("cloudflare generated a psk for a validate_only request; stored as a rotation", "version", stored.Version)
	}
	return stored, nil
}
