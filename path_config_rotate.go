package main

import (
	"context"
	"fmt"
	"net/http"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// pathConfigRotateRoot rolls the engine's own Cloudflare API token, so that
// after it no person knows the value that can rotate every tunnel.
func pathConfigRotateRoot(b *backend) *framework.Path {
	return &framework.Path{
		Pattern:      "config/rotate-root",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "root-token"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: forwardedOperation(b.rotateRoot, "rotate",
				"Roll the Cloudflare API token in config to a new value no person has seen."),
		},
		HelpSynopsis:    pathConfigRotateRootHelpSynopsis,
		HelpDescription: pathConfigRotateRootHelpDescription,
	}
}

func (b *backend) rotateRoot(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	b.configMu.Lock()
	defer b.configMu.Unlock()
	cfg, err := mount.ReadConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return nil, mount.ErrNotConfigured
	}
	client, err := b.clients.New(ctx, req.Storage, cfg)
	if err != nil {
		return nil, err
	}
	newToken, err := client.RollToken(ctx, cfg.TokenAccountID, cfg.TokenID)
	if err != nil {
		if cloudflare.NoEffect(err) {
			return failure(fmt.Errorf("roll API token %s: %w", cfg.TokenID, err))
		}
		// Cloudflare may have rolled the token and the answer was lost:
		// then the stored value no longer works and the new one is gone.
		return nil, logical.CodedError(http.StatusBadGateway, fmt.Sprintf(
			"roll API token %s: %v; Cloudflare may have rolled the token without Vault learning the new value: "+
				"if calls now fail with an invalid token, write a new api_token to this mount's config", cfg.TokenID, err))
	}

	// The old value stopped working the moment Cloudflare answered, so the
	// new one is stored before anything else can fail.
	cfg.APIToken = newToken
	cfg.LastRotated = b.now().UTC()
	if err := cfg.StoreRetrying(ctx, req.Storage); err != nil {
		b.Logger().Error("rolled api token could not be stored", "token_id", cfg.TokenID, "error", err)
		return nil, fmt.Errorf("cloudflare rolled API token %s and its old value no longer works, but Vault could not store the new one (%w): "+
			"the mount must be reconfigured by writing a new api_token to its config", cfg.TokenID, err)
	}
	b.clients.Reset()
	b.Logger().Info("api token rolled", "token_id", cfg.TokenID)

	resp := &logical.Response{Data: map[string]any{
		"token_id":     cfg.TokenID,
		"last_rotated": store.FormatTime(cfg.LastRotated),
	}}
	if !cloudflare.TokenLengthExpected(newToken) {
		// Stored all the same: the old value is dead, and this one could
		// be a token (RollToken refuses any that could not). Verification
		// below says whether Cloudflare takes it.
		resp.AddWarning(fmt.Sprintf("Cloudflare's new token value has %d characters, where its schema gives 40 to 80: it is stored, "+
			"since the old value no longer works; if calls fail with an invalid token, write a new api_token to this mount's config", len(newToken)))
	}
	verifier, err := b.clients.New(ctx, req.Storage, cfg)
	if err != nil {
		return nil, err
	}
	status, err := verifier.VerifyToken(ctx, cfg.TokenAccountID)
	if err != nil {
		resp.AddWarning(fmt.Sprintf("the new token is stored, but verifying it failed: %v", err))
		return resp, nil
	}
	cfg.ApplyVerification(status, b.now())
	if err := cfg.StoreRetrying(ctx, req.Storage); err != nil {
		resp.AddWarning(fmt.Sprintf("the new token is stored, but its verification could not be recorded: %v", err))
	}
	b.clients.Reset()
	resp.Data["token_status"] = status.Status
	resp.Data["token_expires_on"] = store.FormatTime(status.ExpiresOn)
	resp.Warnings = append(resp.Warnings, cfg.ExpiryWarnings(b.now())...)
	return resp, nil
}

const pathConfigRotateRootHelpSynopsis = `Roll the engine's Cloudflare API token to a new value that no person knows.`

const pathConfigRotateRootHelpDescription = `
write config/rotate-root asks Cloudflare to roll the value of the API token in
config (PUT /user/tokens/<token_id>/value, or
PUT /accounts/<token_account_id>/tokens/<token_id>/value for an account-owned
token). Cloudflare invalidates the old value at once; the engine stores the
new one before anything else (retrying storage), verifies it, and answers with
token_id, last_rotated (the time of rotation), and what the verification of
the new value said: token_status and token_expires_on. The value itself is never returned or
logged.

The token must be allowed to roll itself: "API Tokens Write" for a user
token, "Account API Tokens Write" for an account-owned one. That permission is
more than rolling its own value: a token that holds it can create new tokens
and roll any token of its user (or account), so whoever obtains it can mint
tokens of their own. Give it only to a token kept in Vault, guard the mount's
config path accordingly, and leave it out if the engine does not need
rotate-root: the alternative is to rotate by hand, by creating a new token at
Cloudflare with only "Magic WAN Write" or "Magic Transit Write", writing it to
config (api_token), and deleting the old token at Cloudflare.

If the answer from Cloudflare is lost, or Vault cannot store the new value,
the error says so: the mount must then be given a new api_token. A new value
whose length is outside the 40 to 80 characters of Cloudflare's schema is
stored all the same, with a warning (the old value is already dead); only a
value that could not be a token at all (one config would refuse as
api_token) is not stored, and the error says so.
`
