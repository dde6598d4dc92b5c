package main

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// rotateEventType is the event a stored rotation sends.
const rotateEventType = "cloudflare-ipsec/psk-rotate"

// eventTimeout bounds the sending of one rotation event.
const eventTimeout = 10 * time.Second

// sendRotateEvent tells subscribers (Vault Enterprise's event bus) that a
// tunnel has a new key, and where to read it. The event carries no secret. On Vault Community
// there is no bus and the call does nothing.
func sendRotateEvent(ctx context.Context, sender logical.EventSender, log hclog.Logger, rec *store.Record, trigger string) {
	t := store.Tunnel{AccountID: rec.AccountID, TunnelID: rec.TunnelID}
	// path and data_path are relative to the mount: Vault prepends the
	// mount's path before subscribers see them, and checks a subscriber's
	// read capability on data_path, as for its own engines' events.
	err := logical.SendEvent(ctx, sender, rotateEventType,
		logical.EventMetadataPath, t.StorageKey(),
		logical.EventMetadataDataPath, t.StorageKey(),
		logical.EventMetadataModified, "true",
		logical.EventMetadataOperation, "update",
		"account_id", rec.AccountID,
		"tunnel_id", rec.TunnelID,
		"version", strconv.Itoa(rec.Version),
		"last_generated_on", store.FormatTime(rec.LastGeneratedOn),
		"trigger", trigger,
		"key_source", rec.StoredKeySource())
	if err != nil && !errors.Is(err, framework.ErrNoEvents) {
		log.Debug("could not send rotation event", "error", err)
	}
}
