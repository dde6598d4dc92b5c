package main

import (
	"context"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// pathTunnels shows an account's tunnels as Cloudflare knows them and
// whether this engine holds each one's key, so a team can see which tunnels
// are not managed yet. It never returns a key.
func pathTunnels(b *backend) []*framework.Path {
	return []*framework.Path{
		{
			Pattern:      "tunnels/" + accountSegment + "/?$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "tunnels"},
			Fields:       map[string]*framework.FieldSchema{"account": tunnelFields["account"]},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{
					Callback:     b.listCloudflareTunnels,
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "list"},
				},
			},
			HelpSynopsis:    pathTunnelsHelpSynopsis,
			HelpDescription: pathTunnelsHelpDescription,
		},
		{
			Pattern:      "tunnels/" + accountSegment + "/" + tunnelSegment,
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "tunnel"},
			Fields:       tunnelFields,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback:     b.readCloudflareTunnel,
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
				},
			},
			HelpSynopsis:    pathTunnelsHelpSynopsis,
			HelpDescription: pathTunnelsHelpDescription,
		},
	}
}

func (b *backend) listCloudflareTunnels(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	account, problem := store.ParseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	client, cfg, err := b.clients.Get(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	tunnels, err := client.ListTunnels(ctx, account)
	if err != nil {
		return failure(fmt.Errorf("list tunnels of account %s: %w", account, err))
	}
	stored, err := req.Storage.List(ctx, store.PSKPrefix+account+"/")
	if err != nil {
		return nil, fmt.Errorf("list stored tunnels of account %s: %w", account, err)
	}
	managed := make(map[string]bool, len(stored))
	for _, id := range stored {
		managed[id] = true
	}
	keys := make([]string, 0, len(tunnels))
	info := make(map[string]any, len(tunnels))
	for _, t := range tunnels {
		keys = append(keys, t.ID)
		synced := false
		if managed[t.ID] {
			if synced, err = b.checkSync(ctx, req.Storage, client, cfg, store.Tunnel{AccountID: account, TunnelID: t.ID}, &t); err != nil {
				return nil, err
			}
		}
		info[t.ID] = tunnelInfo(t, managed[t.ID], synced)
	}
	return logical.ListResponseWithInfo(keys, info), nil
}

// checkSync says whether a managed tunnel's stored key is the one Cloudflare
// just described (edge), and on the node that may write records what it
// finds (the engine's CheckSync); a standby only compares.
func (b *backend) checkSync(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *mount.Config, t store.Tunnel, edge *cloudflare.TunnelState) (bool, error) {
	if b.mayWrite() {
		return b.engine.CheckSync(ctx, s, rotation.Conn{Edge: client, Settings: cfg.Settings()}, t, edge)
	}
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil || rec == nil {
		return false, err
	}
	return rec.Current() && !edge.PSKLastGeneratedOn.After(rec.LastGeneratedOn), nil
}

func (b *backend) readCloudflareTunnel(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	client, cfg, err := b.clients.Get(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	tunnel, err := client.GetTunnel(ctx, t.AccountID, t.TunnelID)
	if err != nil {
		return failure(fmt.Errorf("read %s: %w", t, err))
	}
	rec, err := store.ReadRecord(ctx, req.Storage, t)
	if err != nil {
		return nil, err
	}
	synced := false
	if rec != nil {
		if synced, err = b.checkSync(ctx, req.Storage, client, cfg, t, tunnel); err != nil {
			return nil, err
		}
	}
	data := tunnelInfo(*tunnel, rec != nil, synced)
	data["account_id"], data["tunnel_id"] = t.AccountID, t.TunnelID
	return &logical.Response{Data: data}, nil
}

func tunnelInfo(t cloudflare.TunnelState, managed, inSync bool) map[string]any {
	return map[string]any{
		"name":                  t.Name,
		"description":           t.Description,
		"cloudflare_endpoint":   t.CloudflareEndpoint,
		"customer_endpoint":     t.CustomerEndpoint,
		"interface_address":     t.InterfaceAddress,
		"interface_address6":    t.InterfaceAddress6,
		"custom_fqdn_id":        t.CustomFQDNID,
		"psk_last_generated_on": store.FormatTime(t.PSKLastGeneratedOn),
		"managed":               managed,
		"in_sync":               inSync,
	}
}

const pathTunnelsHelpSynopsis = `List an account's IPsec tunnels as Cloudflare knows them, and whether Vault holds each one's PSK.`

const pathTunnelsHelpDescription = `
LIST tunnels/<account_id> asks Cloudflare for the account's IPsec tunnels and
returns, for each, its id with name, description, cloudflare_endpoint (the
address the router connects to), customer_endpoint, interface_address,
interface_address6, custom_fqdn_id (custom_remote_identities.fqdn_id, the
custom IKE identity, "" when none), psk_last_generated_on (when Cloudflare
last generated its key), managed:
whether this engine stores its PSK, and in_sync: whether the stored key is
the one the edge uses. A managed tunnel whose key Cloudflare generated after
the stored one was changed outside this engine: the listing marks its record
stale at once (heal_stale_psk then heals it on the next read or in the
background), and what it says of a managed tunnel's endpoints, addresses,
name and identity is kept in the tunnel's record, which psk/ and metadata/
reads return. A tunnel with managed=false has a key nobody in Vault holds; write
psk/<account_id>/<tunnel_id> to bring it under management.

read tunnels/<account_id>/<tunnel_id> does the same for one tunnel, with its
account_id and tunnel_id. Neither
ever returns a PSK: Cloudflare does not show one after generating it.
`
