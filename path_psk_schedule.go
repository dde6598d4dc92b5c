package main

import (
	"context"
	"fmt"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathPSKSchedule changes when a tunnel is rotated without rotating it. A
// write of psk/ always rotates, and a rotation takes the tunnel down until
// the router has the new key: an operator who only means to move the next
// rotation into a maintenance window must not cause one. This path never
// calls Cloudflare, so the guarantee (Vault never generates a key nobody
// asked for) holds whatever is written here, and a policy can let a team
// reschedule without letting it rotate.
func pathPSKSchedule(b *backend) []*framework.Path {
	fields := map[string]*framework.FieldSchema{}
	for name, schema := range scheduleFields {
		fields[name] = schema
	}
	for name, schema := range tunnelFields {
		fields[name] = schema
	}
	write := forwardedOperation(b.writeSchedule, "write", "Change a tunnel's rotation schedule, without rotating its key or calling Cloudflare.")
	return []*framework.Path{
		{
			Pattern:        "psk/" + accountSegment + "/" + tunnelSegment + "/schedule",
			DisplayAttrs:   &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "psk-schedule"},
			Fields:         fields,
			ExistenceCheck: b.pskExists,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback:     b.readSchedule,
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
					Summary:      "Read a tunnel's rotation schedule.",
				},
				logical.CreateOperation: write,
				logical.UpdateOperation: write,
			},
			HelpSynopsis:    pathPSKScheduleHelpSynopsis,
			HelpDescription: pathPSKScheduleHelpDescription,
		},
	}
}

func (b *backend) readSchedule(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	// The stored record as it is: the schedule does not depend on the
	// key's state, so nothing is reconciled (psk/ and metadata/ reads do).
	rec, err := store.ReadRecord(ctx, req.Storage, t)
	if err != nil || rec == nil {
		return nil, err
	}
	return &logical.Response{Data: scheduleData(rec, b.now())}, nil
}

// writeSchedule stores a tunnel's new schedule. It is not refused while
// the tunnel's last rotation settles (409 on a write or delete of psk/):
// that refusal keeps a new psk_generate from being overtaken by an abandoned
// one, and keeps the settle window from being forgotten with the record;
// this write asks Cloudflare for nothing and leaves the record's state and
// window as they are. A rotation in flight holds the tunnel's lock, so the
// write waits for it (at most about request_timeout) rather than race it.
func (b *backend) writeSchedule(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	floor, err := b.minRotationPeriod(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	sched, problem := requestedSchedule(d, b.now(), floor)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	if resp := rejectUnknownFields(req, d); resp != nil {
		return resp, nil
	}
	if sched == nil {
		return logical.ErrorResponse("give rotation_period or rotation_schedule (with rotation_window if wanted): " +
			"this path only changes the schedule; rotation_period=0 turns it off"), nil
	}
	updated, err := b.engine.Reschedule(ctx, req.Storage, t, *sched, floor)
	if err != nil {
		return failure(err)
	}
	resp := &logical.Response{Data: scheduleData(updated, b.now())}
	if updated.State == store.StateTunnelGone && sched.Set() {
		resp.AddWarning(fmt.Sprintf("state %s: the scheduler does not rotate a tunnel Cloudflare no longer knows; "+
			"the schedule applies once the tunnel is back: the drift sweep returns it if Cloudflare lists it again, or a write of psk/%s/%s does at once",
			store.StateTunnelGone, t.AccountID, t.TunnelID))
	}
	return resp, nil
}

// scheduleData is what the schedule path answers: the schedule, when it
// next rotates the tunnel, and ttl as a read of psk/ gives it.
func scheduleData(rec *store.Record, now time.Time) map[string]any {
	data := map[string]any{
		"account_id":        rec.AccountID,
		"tunnel_id":         rec.TunnelID,
		"rotation_period":   int(rec.RotationPeriod.Seconds()),
		"rotation_schedule": rec.RotationSchedule,
		"rotation_window":   int(rec.RotationWindow.Seconds()),
		"next_rotation":     store.FormatTime(rec.NextRotation),
		"schedule_note":     rec.ScheduleNote,
	}
	if ttl, ok := readTTL(rec, now); ok {
		data["ttl"] = ttl
	}
	return data
}

const pathPSKScheduleHelpSynopsis = `Change when a tunnel's PSK is rotated, without rotating it.`

const pathPSKScheduleHelpDescription = `
psk/<account_id>/<tunnel_id>/schedule is the rotation schedule of a tunnel
whose key Vault holds. Writing it never calls Cloudflare and never rotates the
key: it only moves the tunnel's next scheduled rotation. A write of
psk/<account_id>/<tunnel_id> takes the same fields, and rotates.

write (create/update): one of
  rotation_period: rotate the tunnel every period (at least config
  min_rotation_period, 1h by default; 0 turns scheduled rotation off). The
  next rotation is one period after the stored key's (stored_at), or, when
  that has already passed, one period from now: a schedule change alone
  never has the key rotated at once; write psk/<account_id>/<tunnel_id> to
  rotate now.
  rotation_schedule: rotate it at the times of a standard 5-field cron
  expression (minute hour day-of-month month day-of-week, in UTC; it takes
  no time zone), such as "0 2 * * 6" for Saturdays at 02:00 UTC, whose
  successive times are never closer than min_rotation_period; its next
  time that is at least min_rotation_period after stored_at (a switch from
  "0 * * * *" to "1 * * * *" just after a rotation does not rotate again a
  minute later);
  "" turns scheduled rotation off; with
  rotation_window: a rotation that cannot start within this long after its
  scheduled time waits for the next scheduled time (schedule_note says so;
  at least 1m; omitted: no window).
  Both rotation_period and rotation_schedule, rotation_window without
  rotation_schedule, or neither: 400; a schedule shorter than
  min_rotation_period: 400 naming it, nothing stored. A tunnel whose scheduled rotations keep
  failing is still tried no earlier than its retry_at. 404 when Vault holds
  no key for the tunnel: a schedule alone never makes a first key. The write
  is accepted while the last rotation's outcome is unknown (no 409 as on
  psk/): it asks Cloudflare for nothing and leaves the state and settle_until
  as they are; a rotation in progress is waited for.

read: the schedule, without the key and without asking Cloudflare:
  account_id, tunnel_id   the tunnel's ids
  rotation_period         seconds between scheduled rotations (0: none, or a
                          rotation_schedule)
  rotation_schedule       the cron expression ("": none)
  rotation_window         seconds after a scheduled time within which its
                          rotation must start (0: no window)
  next_rotation           when the next scheduled rotation is due ("" when none)
  ttl                     while a schedule will rotate the tunnel: whole
                          seconds until next_rotation, rounded up, at least 1
  schedule_note           why the last scheduled time passed without a
                          rotation, until the next rotation is stored
  404 when Vault holds no key for the tunnel.

Writes are forwarded to the active node. docs/policies/operator.hcl grants
this path; a policy with only this path lets a team reschedule but not
rotate: it can never have a tunnel rotated at once, and can make the
scheduler rotate each tunnel at most once per min_rotation_period (each
rotation an outage until the tunnel's routers have the new key), or turn
scheduled rotation off or put it off.
`
