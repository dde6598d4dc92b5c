package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
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
	rec, err := readPSKRecord(ctx, req.Storage, t)
	if err != nil || rec == nil {
		return nil, err
	}
	data := rec.metadata()
	data["psk"] = rec.PSK
	return &logical.Response{Data: data}, nil
}

// rotateTunnel asks Cloudflare for a new PSK and stores it. The tunnel's lock
// is held from before the call until the key is stored, so concurrent
// rotations of one tunnel leave Vault with the key Cloudflare generated last.
func (b *backend) rotateTunnel(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	validateOnly := d.Get("validate_only").(bool)

	client, err := b.cloudflareClient(ctx, req.Storage)
	if errors.Is(err, errNotConfigured) {
		return logical.ErrorResponse(err.Error()), nil
	}
	if err != nil {
		return nil, err
	}

	lock := locksutil.LockForKey(b.tunnelLocks, t.storageKey())
	lock.Lock()
	defer lock.Unlock()

	generated, err := client.GeneratePSK(ctx, t.AccountID, t.TunnelID, validateOnly)
	if err != nil {
		return cloudflareFailure("generate psk for "+t.String(), err)
	}
	if validateOnly {
		return &logical.Response{Data: map[string]any{
			"account_id":    t.AccountID,
			"tunnel_id":     t.TunnelID,
			"validate_only": true,
			"stored":        false,
		}}, nil
	}

	previous, err := readPSKRecord(ctx, req.Storage, t)
	if err != nil {
		return nil, fmt.Errorf("cloudflare generated a new psk for %s, but the engine could not read its record to store it: %w", t, err)
	}
	rec := &pskRecord{
		AccountID:       t.AccountID,
		TunnelID:        t.TunnelID,
		PSK:             generated.PSK,
		LastGeneratedOn: generated.LastGeneratedOn.UTC(),
		Version:         1,
		StoredAt:        time.Now().UTC(),
	}
	if previous != nil {
		rec.Version = previous.Version + 1
	}
	if err := writePSKRecord(ctx, req.Storage, t, rec); err != nil {
		return nil, fmt.Errorf("cloudflare generated a new psk for %s, but the engine could not store it; write the path again to rotate once more: %w", t, err)
	}
	b.Logger().Info("psk rotated", "account_id", t.AccountID, "tunnel_id", t.TunnelID, "version", rec.Version)
	return &logical.Response{Data: rec.metadata()}, nil
}

func (b *backend) deletePSK(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	lock := locksutil.LockForKey(b.tunnelLocks, t.storageKey())
	lock.Lock()
	defer lock.Unlock()
	if err := req.Storage.Delete(ctx, t.storageKey()); err != nil {
		return nil, fmt.Errorf("delete psk record for %s: %w", t, err)
	}
	b.Logger().Info("psk forgotten", "account_id", t.AccountID, "tunnel_id", t.TunnelID)
	return nil, nil
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
