package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
)

// Path segments are matched loosely and checked in the handlers, so that a
// malformed identifier gets a 400 that says what is wrong instead of a 404.
const (
	accountSegment = `(?P<account>[^/]+)`
	tunnelSegment  = `(?P<tunnel>[^/]+)`
)

var tunnelFields = map[string]*framework.FieldSchema{
	"account": {
		Type:        framework.TypeString,
		Description: "Cloudflare account ID (32 hexadecimal characters).",
		Required:    true,
	},
	"tunnel": {
		Type:        framework.TypeString,
		Description: "Cloudflare IPsec tunnel ID (32 hexadecimal characters).",
		Required:    true,
	},
}

func pathPSK(b *backend) []*framework.Path {
	fields := map[string]*framework.FieldSchema{
		"rotation_period": {
			Type:        framework.TypeDurationSecond,
			Description: "Rotate this tunnel again every period (at least 1m); 0 turns scheduled rotation off; omitted keeps the current setting.",
		},
		"validate_only": {
			Type:        framework.TypeBool,
			Description: "Only ask Cloudflare to validate the request (?validate_only=true): no key is generated and nothing is stored.",
			Default:     false,
		},
	}
	for name, schema := range tunnelFields {
		fields[name] = schema
	}
	rotate := &framework.PathOperation{
		Callback:                    b.rotateTunnel,
		ForwardPerformanceStandby:   true,
		ForwardPerformanceSecondary: true,
		DisplayAttrs:                &framework.DisplayAttributes{OperationVerb: "rotate"},
		Summary:                     "Generate a new PSK at Cloudflare and store it.",
	}
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
				logical.DeleteOperation: &framework.PathOperation{
					Callback:                    b.deletePSK,
					ForwardPerformanceStandby:   true,
					ForwardPerformanceSecondary: true,
					DisplayAttrs:                &framework.DisplayAttributes{OperationVerb: "delete"},
					Summary:                     "Forget a tunnel's PSK in Vault. The tunnel at Cloudflare is not touched.",
				},
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

// tunnelFromRequest reads and normalises the path's identifiers. It returns a
// problem to show the caller, or "".
func tunnelFromRequest(d *framework.FieldData) (tunnelRef, string) {
	account, problem := normaliseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return tunnelRef{}, problem
	}
	tunnel, problem := normaliseIdentifier("tunnel", d.Get("tunnel").(string))
	if problem != "" {
		return tunnelRef{}, problem
	}
	return tunnelRef{AccountID: account, TunnelID: tunnel}, ""
}

func (b *backend) pskExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		// The handler reports the problem; existence does not matter.
		return false, nil
	}
	rec, err := readPSKRecord(ctx, req.Storage, t)
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
	data := rec.metadata()
	data["psk"] = rec.PSK
	return &logical.Response{Data: data, Warnings: warnings}, nil
}

// readResolving reads a tunnel's record and, when it is not current and
// this node may write, reconciles it first, so that a reader is handed the
// edge's key whenever Cloudflare can tell which that is. A reader never waits
// for a rotation in flight: it gets the record as it stands, with a warning.
func (b *backend) readResolving(ctx context.Context, s logical.Storage, t tunnelRef) (*pskRecord, []string, error) {
	rec, err := readPSKRecord(ctx, s, t)
	if err != nil || rec == nil || rec.current() {
		return rec, nil, err
	}
	var problems []string
	if b.mayWrite() {
		rec, problems = b.tryReconcile(ctx, s, t, rec)
		if rec == nil {
			return nil, nil, nil
		}
	}
	return rec, append(problems, stateWarnings(rec)...), nil
}

func (b *backend) tryReconcile(ctx context.Context, s logical.Storage, t tunnelRef, rec *pskRecord) (*pskRecord, []string) {
	lock := lockFor(b, t)
	if !lock.TryLock() {
		return rec, []string{"a rotation of this tunnel is in progress"}
	}
	defer lock.Unlock()
	client, cfg, err := b.cloudflareClient(ctx, s)
	if err != nil {
		return rec, []string{fmt.Sprintf("could not reconcile with Cloudflare: %v", err)}
	}
	// A reader waits at most request_timeout for reconciliation as a whole,
	// healing included, however many calls it takes.
	ctx, cancel := context.WithTimeout(ctx, cfg.RequestTimeout)
	defer cancel()
	// Re-read under the lock: a rotation may have finished since.
	latest, err := readPSKRecord(ctx, s, t)
	if err != nil {
		return rec, []string{err.Error()}
	}
	if latest == nil || latest.current() {
		return latest, nil
	}
	resolved, err := b.reconcileLocked(ctx, s, client, cfg, t, latest, cfg.HealStalePSK)
	if err != nil {
		if resolved == nil {
			resolved = latest
		}
		return resolved, []string{fmt.Sprintf("could not reconcile with Cloudflare: %v", err)}
	}
	return resolved, nil
}

// stateWarnings tells a reader what a record's state means and what to do.
func stateWarnings(rec *pskRecord) []string {
	switch rec.state() {
	case stateRotationUnknown:
		return []string{fmt.Sprintf("state %s: %s. This key may no longer be the one Cloudflare uses. "+
			"The engine reconciles with Cloudflare on the next read or write and in the background; write this path to generate and store a new key now.",
			stateRotationUnknown, rec.StateReason)}
	case stateStale:
		return []string{fmt.Sprintf("state %s: %s. The tunnel cannot come up until both sides share a new key: write this path to generate and store one.",
			stateStale, rec.StateReason)}
	}
	return nil
}

// rotateTunnel asks Cloudflare for a new PSK and stores it. The tunnel's lock
// is held from before the call until the key is stored, so concurrent
// rotations of one tunnel leave Vault with the key Cloudflare generated last.
func (b *backend) rotateTunnel(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if resp := rejectUnknownFields(req, d); resp != nil {
		return resp, nil
	}
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	validateOnly := d.Get("validate_only").(bool)
	if problem := checkRotationPeriod(d); problem != "" {
		return logical.ErrorResponse(problem), nil
	}

	client, cfg, err := b.cloudflareClient(ctx, req.Storage)
	if err != nil {
		return nil, err
	}

	if validateOnly {
		if _, err := client.GeneratePSK(ctx, t.AccountID, t.TunnelID, true); err != nil {
			return cloudflareFailure("validate psk generation for "+t.String(), err)
		}
		return &logical.Response{Data: map[string]any{
			"account_id":    t.AccountID,
			"tunnel_id":     t.TunnelID,
			"validate_only": true,
			"stored":        false,
		}}, nil
	}

	lock := lockFor(b, t)
	lock.Lock()
	defer lock.Unlock()

	rec, err := readPSKRecord(ctx, req.Storage, t)
	if err != nil {
		return nil, err
	}
	if rec != nil && !rec.current() {
		// A psk_generate after an unknown outcome is sent only once
		// Cloudflare has told what became of the last one: this write is the
		// operator's, so it does not heal (it rotates anyway), but it must
		// not act on a guess.
		rec, err = b.reconcileLocked(ctx, req.Storage, client, cfg, t, rec, false)
		if err != nil {
			return cloudflareFailure("learn the outcome of the last rotation of "+t.String(), err)
		}
	}
	period := time.Duration(0)
	if rec != nil {
		period = rec.RotationPeriod
	}
	if requested, ok := requestedPeriod(d); ok {
		period = requested
	}
	rotated, err := b.rotateLocked(ctx, req.Storage, client, t, rec, period, "write")
	if err != nil {
		var cfErr cloudflare.Error
		if !errors.As(err, &cfErr) {
			return nil, err
		}
		if !notGenerated(err) {
			err = fmt.Errorf("%w; the outcome is unknown, so the tunnel is marked %s until reconciliation learns from Cloudflare whether its key changed", err, stateRotationUnknown)
		}
		return cloudflareFailure("generate psk for "+t.String(), err)
	}
	return &logical.Response{Data: rotated.metadata()}, nil
}

func (b *backend) deletePSK(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	lock := lockFor(b, t)
	lock.Lock()
	defer lock.Unlock()
	rec, err := readPSKRecord(ctx, req.Storage, t)
	if err != nil {
		return nil, err
	}
	if err := forgetPSKRecord(ctx, req.Storage, t, rec); err != nil {
		return nil, err
	}
	b.Logger().Info("psk forgotten", "account_id", t.AccountID, "tunnel_id", t.TunnelID)
	return nil, nil
}

// lockFor is t's entry in the backend's striped tunnel locks.
func lockFor(b *backend, t tunnelRef) *locksutil.LockEntry {
	return locksutil.LockForKey(b.tunnelLocks, t.storageKey())
}

func (b *backend) listAccounts(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	keys, err := req.Storage.List(ctx, pskStoragePrefix)
	if err != nil {
		return nil, fmt.Errorf("list accounts: %w", err)
	}
	return logical.ListResponse(keys), nil
}

func (b *backend) listTunnels(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	account, problem := normaliseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	keys, err := req.Storage.List(ctx, pskStoragePrefix+account+"/")
	if err != nil {
		return nil, fmt.Errorf("list tunnels of account %s: %w", account, err)
	}
	return logical.ListResponse(keys), nil
}

const pathPSKHelpSynopsis = `Rotate, read or forget the pre-shared key of one Cloudflare IPsec tunnel.`

const pathPSKHelpDescription = `
psk/<account_id>/<tunnel_id> holds the pre-shared key (PSK) of one Cloudflare
Magic WAN / Magic Transit IPsec tunnel. Both ids are Cloudflare identifiers
(32 hexadecimal characters, either case; they are stored lower case).

write (create/update): asks Cloudflare to generate a new PSK for the tunnel
  (POST /accounts/<account_id>/magic/ipsec_tunnels/<tunnel_id>/psk_generate).
  Cloudflare activates the key on its edge at once, so the router must be given
  the new key. The key is stored in Vault and the response carries only its
  metadata, never the key. With validate_only=true Cloudflare only validates
  the request; no key is generated and nothing is stored.

read: returns psk, account_id, tunnel_id, last_generated_on (Cloudflare's
  time of generation), version (1 for the first key this engine stored, +1 per
  rotation) and stored_at. 404 when no key is stored.

delete: forgets the key in Vault only. It does not touch the tunnel at
  Cloudflare, which keeps using its current key.

For a policy that may see rotation state but not keys, use
metadata/<account_id>/<tunnel_id>.
`

const pathPSKListHelpSynopsis = `List the accounts, or the tunnels of an account, that have a stored PSK.`

const pathPSKListHelpDescription = `
LIST on the prefix returns the account ids that have at least one stored PSK
(each with a trailing slash); LIST on <prefix>/<account_id>/ returns the tunnel
ids of that account that have one.
`

// minRotationPeriod keeps a schedule from spending the rate limit on one
// tunnel.
const minRotationPeriod = time.Minute

func requestedPeriod(d *framework.FieldData) (time.Duration, bool) {
	v, ok := d.GetOk("rotation_period")
	if !ok {
		return 0, false
	}
	return time.Duration(v.(int)) * time.Second, true
}

func checkRotationPeriod(d *framework.FieldData) string {
	if period, ok := requestedPeriod(d); ok && period != 0 && period < minRotationPeriod {
		return fmt.Sprintf("rotation_period must be 0 (off) or at least %s", minRotationPeriod)
	}
	return ""
}
