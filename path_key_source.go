package main

import (
	"context"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// pathKeySource reports what of key_source vault is still in flight on the
// mount: records with a pending key, and windows in which a request of a
// key Vault made may still land. A version of the engine from before
// key_source vault knows neither (it takes a pending record for another
// state, and sends a different key inside such a window), so an operator
// who downgrades sets key_source cloudflare and waits until this read says
// that nothing is in flight (docs/operating.md).
func pathKeySource(b *backend) *framework.Path {
	return &framework.Path{
		Pattern:      "key-source",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "key-source"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.readKeySource,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
				Summary:      "Report which tunnels hold a pending key Vault made, or a window in which a request of one may still land.",
			},
		},
		HelpSynopsis:    pathKeySourceHelpSynopsis,
		HelpDescription: pathKeySourceHelpDescription,
	}
}

// keySourceListed is how many tunnels the read names of each kind; the
// counts are whole.
const keySourceListed = 100

func (b *backend) readKeySource(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	source := store.KeySourceCloudflare
	cfg, err := mount.ReadConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if cfg != nil {
		source = cfg.Source()
	}
	now := b.now()
	f, err := store.FindInFlight(ctx, req.Storage, now, keySourceListed)
	if err != nil {
		return nil, err
	}
	inFlight := f.Pending > 0 || f.Windows > 0
	data := map[string]any{
		"key_source":         source,
		"pending":            f.Pending,
		"pending_tunnels":    f.PendingTunnels,
		"windows_open":       f.Windows,
		"window_tunnels":     f.WindowTunnels,
		"windows_open_until": store.FormatTime(f.OpenUntil),
		"in_flight":          inFlight,
		"safe_to_downgrade":  source == store.KeySourceCloudflare && !inFlight,
		"checked_at":         store.FormatTime(now),
	}
	resp := &logical.Response{Data: data}
	if source == store.KeySourceVault {
		resp.AddWarning("key_source is vault: new keys are made by the engine. Before downgrading to a version without key_source, " +
			"write config key_source=cloudflare and read this path again until safe_to_downgrade is true")
	} else if inFlight {
		resp.AddWarning(fmt.Sprintf("%d tunnel(s) hold a pending key Vault made and %d a window open until %s: reads, writes and the background "+
			"finish the pending keys, and the windows close by themselves; read this path again before downgrading",
			f.Pending, f.Windows, store.FormatTime(f.OpenUntil)))
	}
	return resp, nil
}

const pathKeySourceHelpSynopsis = `Report what of key_source vault is still in flight: pending keys and open windows.`

const pathKeySourceHelpDescription = `
key-source (read) walks every stored record of the mount and reports what of
config key_source=vault is still in flight:

  key_source          config key_source now (cloudflare or vault)
  pending             how many records hold a key Vault made that Cloudflare
                      has not confirmed (state pending, or tunnel_gone with a
                      pending key); pending_tunnels names up to 100
                      (account_id/tunnel_id)
  windows_open        how many records, in any state but rotation_unknown,
                      have a settle_until still ahead: a request of a key
                      Vault made may still land, and no different key may be
                      sent before then; window_tunnels names up to 100, and
                      windows_open_until is the latest of them
  in_flight           pending or windows_open is not zero
  safe_to_downgrade   key_source is cloudflare and nothing is in flight
  checked_at          the time of the walk

A version of this engine from before key_source knows neither a pending
record nor such a window: it would serve a key the edge does not use, or
send a different key that a late request replaces. Before downgrading,
write config key_source=cloudflare, then read this path until
safe_to_downgrade is true (reads, writes and the background finish pending
keys; windows close within twice request_timeout and 10s of the last send).

It reads every record, so it is a check to run before a downgrade, not a
metric to poll. It calls nothing at Cloudflare and changes nothing.
`
