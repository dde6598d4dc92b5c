package main

import (
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathMetadata serves rotation state without the key, so that a policy can
// let operators see it while only provisioning tools may read PSKs.
func pathMetadata(b *backend) []*framework.Path {
	return []*framework.Path{
		{
			Pattern:      "metadata/" + accountSegment + "/" + tunnelSegment,
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "psk-metadata"},
			Fields:       tunnelFields,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{
					Callback:     b.readMetadata,
					DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
					Summary:      "Read a tunnel's PSK metadata, without the PSK.",
				},
			},
			HelpSynopsis:    pathMetadataHelpSynopsis,
			HelpDescription: pathMetadataHelpDescription,
		},
		listTunnelsPath(b, "metadata/", "psk-metadata", pathMetadataListHelpSynopsis),
		listAccountsPath(b, "metadata/", "psk-metadata-accounts", pathMetadataListHelpSynopsis),
	}
}

func (b *backend) readMetadata(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	t, problem := tunnelFromRequest(d)
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	rec, warnings, err := b.readResolving(ctx, req.Storage, t)
	if err != nil || rec == nil {
		return nil, err
	}
	return &logical.Response{Data: readData(rec, b.now()), Warnings: warnings}, nil
}

const pathMetadataHelpSynopsis = `Read the metadata of a tunnel's stored PSK, without the PSK.`

const pathMetadataHelpDescription = `
metadata/<account_id>/<tunnel_id> returns everything a read of
psk/<account_id>/<tunnel_id> returns except the key: account_id, tunnel_id,
last_generated_on, version, key_source, stored_at, state, state_reason,
rotation_started_at, rotation_period, rotation_schedule, rotation_window,
next_rotation, ttl (while a schedule is set), schedule_note,
last_vault_rotation, settle_until, failures, last_failure and retry_at, and
what a router needs of the tunnel: name, cloudflare_endpoint,
customer_endpoint, interface_address, interface_address6,
customer_interface_address, customer_interface_address6, custom_fqdn_id and
ipsec_id (path-help of psk/ says what each means). Like that read, it first reconciles a tunnel that is
not current with Cloudflare. Grant it to operators who rotate keys but must
not see them.
`

const pathMetadataListHelpSynopsis = `List the accounts, or the tunnels of an account, that have a stored PSK (metadata view).`
