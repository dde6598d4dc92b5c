package main

import (
	"context"
	"fmt"
	"time"

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

// keySourceWalkPage is how many records the read lists at a time.
const keySourceWalkPage = 1000

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
	pending, windows := []string{}, []string{}
	pendingCount, windowCount := 0, 0
	var openUntil time.Time
	// Every record is read: a window is kept on a current record too, and
	// nothing indexes those. A one-off check, not for polling.
	for after, done := (store.Tunnel{}), false; !done; {
		var tunnels []store.Tunnel
		if tunnels, done, err = store.ListRecordsAfter(ctx, req.Storage, after, keySourceWalkPage); err != nil {
			return nil, err
		}
		for _, t := range tunnels {
			after = t
			rec, err := store.ReadRecord(ctx, req.Storage, t)
			if err != nil {
				return nil, err
			}
			if rec == nil {
				continue
			}
			name := t.AccountID + "/" + t.TunnelID
			if rec.PendingPSK != "" {
				if pendingCount++; len(pending) < keySourceListed {
					pending = append(pending, name)
				}
			}
			// A rotation_unknown window is psk_generate's, which every
			// version honours; any other is a key Vault made.
			if rec.State != store.StateRotationUnknown && rec.SendsMayLand(now) {
				if windowCount++; len(windows) < keySourceListed {
					windows = append(windows, name)
				}
				openUntil = later(openUntil, rec.SettleUntil)
			}
		}
	}
	inFlight := pendingCount > 0 || windowCount > 0
	data := map[string]any{
		"key_source":         source,
		"pending":            pendingCount,
		"pending_tunnels":    pending,
		"windows_open":       windowCount,
		"window_tunnels":     windows,
		"windows_open_until": store.FormatTime(openUntil),
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
			pendingCount, windowCount, store.FormatTime(openUntil)))
	}
	return resp, nil
}

// later is the later of two times.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
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
