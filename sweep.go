package main

// The background sweep: Vault calls the backend's PeriodicFunc about once a
// minute, and on the node that may write storage it resolves the tunnels
// whose last rotation has an unknown outcome (rotation.go), so that an
// interrupted rotation heals even if nobody reads or writes the tunnel.

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
)

// reconcilePerPass bounds the background work of one periodic call.
const reconcilePerPass = 100

// reconcileUnresolved is the backend's PeriodicFunc: it works off the
// tunnels marked unresolved, on the node that may write storage only. A
// tunnel whose lock is taken (a rotation in flight) is left for the next pass.
func (b *backend) reconcileUnresolved(ctx context.Context, req *logical.Request) error {
	if !b.mayWrite() {
		return nil
	}
	client, cfg, err := b.cloudflareClient(ctx, req.Storage)
	if errors.Is(err, errNotConfigured) {
		return nil
	}
	if err != nil {
		return err
	}
	tunnels, err := listUnresolved(ctx, req.Storage)
	if err != nil {
		return err
	}
	if len(tunnels) > reconcilePerPass {
		tunnels = tunnels[:reconcilePerPass]
	}
	for _, t := range tunnels {
		if err := b.reconcileInBackground(ctx, req.Storage, client, cfg, t); err != nil {
			b.tunnelLogger(t).Warn("background reconciliation failed", "error", err)
			if cloudflare.NoEffect(err) {
				return nil // rate limited or over budget: the next pass goes on
			}
		}
	}
	return nil
}

func (b *backend) reconcileInBackground(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t tunnelRef) error {
	lock := b.tunnelLock(t)
	if !lock.TryLock() {
		return nil
	}
	defer lock.Unlock()
	rec, err := readPSKRecord(ctx, s, t)
	if err != nil {
		return err
	}
	if rec == nil || rec.current() {
		return clearUnresolved(ctx, s, t)
	}
	_, err = b.reconcileLocked(ctx, s, client, cfg, t, rec, cfg.HealStalePSK)
	return err
}

func listUnresolved(ctx context.Context, s logical.Storage) ([]tunnelRef, error) {
	accounts, err := s.List(ctx, unresolvedPrefix)
	if err != nil {
		return nil, fmt.Errorf("list unresolved tunnels: %w", err)
	}
	var out []tunnelRef
	for _, a := range accounts {
		tunnels, err := s.List(ctx, unresolvedPrefix+a)
		if err != nil {
			return nil, fmt.Errorf("list unresolved tunnels: %w", err)
		}
		for _, tun := range tunnels {
			out = append(out, tunnelRef{AccountID: a[:len(a)-1], TunnelID: tun})
		}
	}
	return out, nil
}
