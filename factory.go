package main

import (
	"context"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Factory is the plugin's logical.Factory.
func Factory(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
	b := newBackend()
	if err := b.Setup(ctx, conf); err != nil {
		return nil, err
	}
	return b, nil
}

func newBackend() *backend {
	b := &backend{now: time.Now}
	b.clients = mount.NewClients(mount.ClientsConfig{
		// The backend's clock and logger, read at each use: tests move the
		// clock, and Vault sets the logger up after this.
		Now:       func() time.Time { return b.now() },
		Logger:    func() hclog.Logger { return b.Logger() },
		MayWrite:  b.mayWrite,
		UserAgent: "vault-plugin-secrets-cloudflare-ipsec/" + version,
	})
	b.Backend = &framework.Backend{
		Help:        strings.TrimSpace(backendHelp),
		BackendType: logical.TypeLogical,
		PathsSpecial: &logical.Paths{
			SealWrapStorage: []string{mount.ConfigKey, store.PSKPrefix},
		},
		Paths: framework.PathAppend(
			[]*framework.Path{pathConfig(b), pathConfigRotateRoot(b)},
			pathPSK(b),
			pathPSKSchedule(b),
			pathMetadata(b),
			pathRotate(b),
			pathTunnels(b),
			pathStatus(b),
			[]*framework.Path{pathKeySource(b)},
		),
		Invalidate:     b.invalidate,
		PeriodicFunc:   b.periodic,
		InitializeFunc: b.initialize,
		Clean:          b.clean,
		RunningVersion: version,
	}
	return b
}

const backendHelp = `
The Cloudflare IPsec secrets engine generates pre-shared keys (PSKs) for
Cloudflare Magic WAN / Magic Transit IPsec tunnels and keeps them in Vault.

Writing to psk/<account_id>/<tunnel_id> asks Cloudflare to generate a new PSK
for that tunnel; Cloudflare activates it on its edge at once and never shows it
again, and the engine stores it. Reading the same path returns it, under
Vault's ACLs and audit logging. metadata/<account_id>/<tunnel_id> shows the
rotation state without the key.

Configure the engine first by writing a Cloudflare API token to config.
`
