package main

import (
	"context"
	"fmt"
	"net/http"

	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

func pathPSK(b *backend) []*framework.Path {
	fields := map[string]*framework.FieldSchema{
		"validate_only": {
			Type:        framework.TypeBool,
			Description: "Only ask Cloudflare to validate the request (?validate_only=true): no key is generated and nothing is stored. Not with a schedule field.",
			Default:     false,
		},
	}
	for name, schema := range scheduleFields {
		fields[name] = schema
	}
	for name, schema := range tunnelFields {
		fields[name] = schema
	}
	rotate := forwardedOperation(b.rotateTunnel, "rotate", "Generate a new PSK at Cloudflare and store it.")
	return []*framework.Path{
		{
			Pattern:        "psk/" + accountSegment + "/" + tunnelSegment,
			DisplayAttrs:   &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "psk"},
			Fields:         fields,
			ExistenceCheck: b.pskExists,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback:     b.readPSK,
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
					Summary:      "Read a tunnel's stored PSK and its metadata.",
				},
				logical.CreateOperation: rotate,
				logical.UpdateOperation: rotate,
				logical.DeleteOperation: forwardedOperation(b.deletePSK, "delete",
					"Forget a tunnel's PSK in Vault. The tunnel at Cloudflare is not touched."),
			},
			HelpSynopsis:    pathPSKHelpSynopsis,
			HelpDescription: pathPSKHelpDescription,
		},
		listTunnelsPath(b, "psk/", "psks", pathPSKListHelpSynopsis),
		listAccountsPath(b, "psk/", "psk-accounts", pathPSKListHelpSynopsis),
	}
}

// listTunnelsPath lists the tunnels of one account that have a stored PSK.
func listTunnelsPath(b *backend, prefix, suffix, synopsis string) *framework.Path {
	return &framework.Path{
		Pattern:      prefix + accountSegment + "/?$",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: suffix},
		Fields:       map[string]*framework.FieldSchema{"account": tunnelFields["account"]},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ListOperation: &framework.PathOperation{
				Callback:     b.listTunnels,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "list"},
			},
		},
		HelpSynopsis:    synopsis,
		HelpDescription: pathPSKListHelpDescription,
	}
}

// listAccountsPath lists the accounts that have at least one stored PSK.
func listAccountsPath(b *backend, prefix, suffix, synopsis string) *framework.Path {
	return &framework.Path{
		Pattern:      prefix + "?$",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: suffix},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ListOperation: &framework.PathOperation{
				Callback:     b.listAccounts,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "list"},
			},
		},
		HelpSynopsis:    synopsis,
		HelpDescription: pathPSKListHelpDescription,
	}
}

func (b *backend) pskExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		// The handler reports the problem; existence does not matter.
		return false, nil
	}
	rec, err := store.ReadRecord(ctx, req.Storage, t)
	return rec != nil, err
}

func (b *backend) readPSK(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	rec, warnings, err := b.readResolving(ctx, req.Storage, t)
	if err != nil || rec == nil {
		return nil, err
	}
	if rec.PSK == "" {
		return nil, logical.CodedError(http.StatusNotFound, fmt.Sprintf(
			"no psk is stored for %s: its first rotation has an unknown outcome (%s); write this path to generate one", t, rec.StateReason))
	}
	data := readData(rec, b.now())
	data["psk"] = rec.PSK
	return &logical.Response{Data: data, Warnings: warnings}, nil
}

// readResolving reads a tunnel's record and, when it is not current and
// this node may write, reconciles it first, so that a reader is handed the
// edge's key whenever Cloudflare can tell which that is. A reader never waits
// for a rotation in flight: it gets the record as it stands, with a warning.
func (b *backend) readResolving(ctx context.Context, s logical.Storage, t store.Tunnel) (*store.Record, []string, error) {
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil || rec == nil || rec.Current() {
		return rec, nil, err
	}
	var problems []string
	if b.mayWrite() {
		rec, problems = b.engine.Resolve(ctx, s, t, rec)
		if rec == nil {
			return nil, nil, nil
		}
	}
	return rec, append(problems, rotation.StateWarnings(rec)...), nil
}

// rotateTunnel is a write of psk/<account>/<tunnel>: it checks the request
// and hands it to the rotation engine (internal/rotation/rotate.go), which
// generates and stores the key.
func (b *backend) rotateTunnel(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	// The path first: a caller with a wrong id must learn that, whatever
	// the body says.
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
	validateOnly := d.Get("validate_only").(bool)
	if resp := rejectUnknownFields(req, d); resp != nil {
		return resp, nil
	}
	if validateOnly && sched != nil {
		// A validation stores nothing, so the schedule would be silently
		// dropped: the caller believes the tunnel is scheduled when it is not.
		return logical.ErrorResponse("validate_only=true cannot be combined with rotation_period, rotation_schedule or rotation_window: " +
			"a validation stores nothing, so the schedule would be ignored; write it without validate_only, " +
			"or to psk/<account_id>/<tunnel_id>/schedule to change it without rotating"), nil
	}

	if validateOnly {
		stored, note, err := b.engine.Validate(ctx, req.Storage, t)
		if err != nil {
			return failure(err)
		}
		resp := validateOnlyResponse(t, stored)
		if note != "" {
			resp.Data["validated_by"] = note
		}
		return resp, nil
	}
	rotated, err := b.engine.Write(ctx, req.Storage, t, sched)
	if err != nil {
		return failure(err)
	}
	return &logical.Response{Data: readData(rotated, b.now())}, nil
}

func (b *backend) deletePSK(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	forgotten, err := b.engine.Forget(ctx, req.Storage, t)
	if err != nil {
		return failure(err)
	}
	if warning := rotation.ForgetWarning(t, forgotten); warning != "" {
		return &logical.Response{Warnings: []string{warning}}, nil
	}
	return nil, nil
}

func (b *backend) listAccounts(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	keys, err := req.Storage.List(ctx, store.PSKPrefix)
	if err != nil {
		return nil, fmt.Errorf("list accounts: %w", err)
	}
	return logical.ListResponse(keys), nil
}

func (b *backend) listTunnels(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	account, problem := store.ParseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	keys, err := req.Storage.List(ctx, store.PSKPrefix+account+"/")
	if err != nil {
		return nil, fmt.Errorf("list tunnels of account %s: %w", account, err)
	}
	return logical.ListResponse(keys), nil
}

const pathPSKHelpSynopsis = `Rotate, read or forget the pre-shared key of one Cloudflare IPsec tunnel.`

const pathPSKHelpDescription = `
psk/<account_id>/<tunnel_id> holds the pre-shared key (PSK) of one Cloudflare
Magic WAN / Magic Transit IPsec tunnel. Both ids are Cloudflare identifiers
in their canonical form, 32 lower-case hexadecimal characters; any other
spelling, upper case included, is refused with 400 on every path (Vault
matches policy paths case-sensitively, so each id has one spelling only).

write (create/update): gives the tunnel a new PSK. With config key_source
  cloudflare (the default) Cloudflare generates it
  (POST /accounts/<account_id>/magic/ipsec_tunnels/<tunnel_id>/psk_generate);
  with key_source vault the engine makes it, writes it ahead into the
  record (state pending) and sets it with Cloudflare's Set operation
  (POST /accounts/<account_id>/magic/ipsec_tunnels/psk); psk_generate is
  then never called. A key Cloudflare does not apply is a 400 with its
  reason, and nothing changes. Cloudflare activates the key on its edge at
  once, so the router must be given the new key. The key is stored in Vault
  and the response carries only its metadata, never the key. With
  key_source vault, a write of a pending tunnel first finishes it with its
  own key, and a different key is refused with 409 while a request of the
  engine's abandoned earlier may still land (until settle_until). Should
  Cloudflare not apply that resend (unapplied_psks), the write fails with
  its reason until settle_until has passed, and then sets its new key.
  A schedule (omitted: the tunnel keeps its own) is one of:
  rotation_period: rotate the tunnel again every period (at least config
  min_rotation_period, 1h by default; 0 turns scheduled rotation off);
  rotation_schedule: rotate it at the times of a standard 5-field cron
  expression (minute hour day-of-month month day-of-week, in UTC; it takes
  no time zone), such as "0 2 * * 6" for Saturdays at 02:00 UTC, whose
  successive times are never closer than min_rotation_period;
  "" turns scheduled rotation off; with
  rotation_window: a rotation that cannot start within this long after its
  scheduled time (the budget spent, Vault down) waits for the next scheduled
  time instead of taking the tunnel down outside its maintenance window, and
  schedule_note says so (at least 1m; 0 or omitted: no window).
  rotation_period and rotation_schedule together are refused (400), as is
  rotation_window without rotation_schedule, and a schedule shorter than
  min_rotation_period (the 400 names it; nothing is sent or stored). A
  schedule stored before an administrator raised min_rotation_period is
  kept, but after each rotation its next one is held back to
  min_rotation_period after the stored key. Give the two tunnels of a site
  different times, so that a site never loses both at once. To change a
  schedule without rotating, write psk/<account_id>/<tunnel_id>/schedule.
  validate_only=true: Cloudflare only validates the request; no key is
  generated and nothing is stored. It cannot be combined with a schedule
  field (400), which it would ignore. Because a proxy or gateway
  that drops the query string turns it into a real generation, it is run
  like a rotation: if Cloudflare's answer carries a key anyway, that key is
  live at the edge and is stored as a rotation (the answer has stored=true,
  the new version and a warning); if the answer is lost, the tunnel is
  marked rotation_unknown until reconciliation resolves it.
  With key_source vault no key is made and the validation itself changes
  nothing at the edge: the stored key, the edge's, is sent through the Set
  operation with validate_only, and without a stored current key the
  tunnel is only read. An answer that dates the tunnel's key later than the
  stored one (a dropped query string set that same key again, or the key
  was changed outside the engine: Cloudflare cannot say which) sends
  nothing more; the next drift sweep decides by heal_stale_psk (the stored
  key set again where healing is allowed, stale where it is not). A lost
  answer leaves the tunnel pending, but its key is not sent again for
  real: the next read, write or background pass reads the tunnel and the
  same drift rules decide. validated_by says which was done.

read: returns psk and its metadata:
  account_id, tunnel_id   the tunnel's ids
  last_generated_on       Cloudflare's time of generation of the stored key
  version                 1 for the first key this engine stored, +1 per rotation
  key_source              who made the stored key: cloudflare (psk_generate)
                          or vault (made by the engine, set with the Set
                          operation); "" while no key is stored
  stored_at               when Vault stored the key
  state                   current: the stored key is the one the edge uses;
                          rotation_unknown: a rotation's outcome is not known
                          yet, the edge may use a newer key;
                          pending: a key Vault made was written ahead and
                          Cloudflare has not confirmed it; the edge uses it
                          or the stored key, which is still the one served.
                          A read finishes it by sending the same key again;
                          stale: the edge uses a key Vault does not hold;
                          tunnel_gone: Cloudflare no longer has the tunnel
                          (the drift sweep returns it to management, at most
                          once a day, if Cloudflare lists it again)
  state_reason            why the state is not current ("" when it is)
  rotation_started_at     when the unresolved rotation began ("" when none)
  rotation_period         seconds between scheduled rotations (0: none, or a
                          rotation_schedule)
  rotation_schedule       the cron expression the tunnel is rotated by ("": none)
  rotation_window         with rotation_schedule: seconds after a scheduled time
                          within which its rotation must start (0: no window)
  next_rotation           when the next scheduled rotation is due ("" when none)
  schedule_note           why the last scheduled time passed without a
                          rotation (its window was missed), until the next
                          rotation is stored ("" when none)
  ttl                     only while a schedule will rotate the tunnel: whole
                          seconds until next_rotation, rounded up, at least 1
                          (also when due or overdue). As for Vault's database
                          and LDAP static roles, Vault Agent reads the secret
                          again ttl+1 seconds later, so a template holds the
                          new key a second or two after a scheduled rotation
  last_vault_rotation     when Vault last stored a key (stored_at), the field
                          Vault's static credentials use for it
  settle_until            for rotation_unknown: until when Cloudflare may still
                          act on that rotation; no new key is asked for before.
                          With key_source vault, in any state: until when a
                          request of the engine's carrying the same key may
                          still land; no different key is sent before
  failures, last_failure, retry_at
                          the background's consecutive failed attempts on this
                          tunnel, the last one's reason, and when it tries again
  name, cloudflare_endpoint, customer_endpoint, interface_address,
  interface_address6, custom_fqdn_id, ipsec_id
                          what a router's configuration needs of the tunnel,
                          as Cloudflare last said ("" where it said nothing):
                          its name, the anycast address the router connects
                          to, the router's public address, Cloudflare's side
                          of the inside subnet (/31 or /30; IPv6 /127), the
                          custom IKE identity (custom_remote_identities.fqdn_id)
                          and the IKE id a psk_generate answer carried. Kept
                          from the tunnel's first rotation and refreshed by
                          the drift sweep and by tunnels/ reads: no rotation
                          and no read calls Cloudflare for them
  customer_interface_address, customer_interface_address6
                          the router's side of the inside subnet: the other
                          address of interface_address's /31 or /30 (of
                          interface_address6's /127), with its prefix length
  A read of a tunnel that is not current, on the node that may write, first
  asks Cloudflare what became of the last rotation, unless nothing could
  settle it yet (before settle_until), the background is backing off
  (retry_at; a pending key is sent again at once all the same), or the
  tunnel is gone; it warns whenever the state is not current. 404
  when no key is stored.

delete: forgets the key in Vault only. It does not touch the tunnel at
  Cloudflare, which keeps using its current key. While the last rotation's
  outcome is unknown and Cloudflare may still act on it (until
  settle_until), a delete is refused with 409 like a write; so is it while
  a request of a key Vault made may still land. A pending key is forgotten
  with the record once that has passed, without being sent again: the
  edge may use it, so the delete's answer warns (read the path first to
  finish it with its key, or write it afterwards to give the tunnel a key
  Vault holds). Where the pending key is the stored one (a validate_only
  whose answer was lost), the warning says that no new key was sent.

For a policy that may see rotation state but not keys, use
metadata/<account_id>/<tunnel_id>.
`

const pathPSKListHelpSynopsis = `List the accounts, or the tunnels of an account, that have a stored PSK.`

const pathPSKListHelpDescription = `
LIST on the prefix returns the account ids that have at least one stored PSK
(each with a trailing slash); LIST on <prefix>/<account_id>/ returns the tunnel
ids of that account that have one.
`
