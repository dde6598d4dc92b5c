package main

// The background sweep: Vault calls the backend's PeriodicFunc about once a
// minute, and on the node that may write storage it resolves the tunnels
// whose last rotation has an unknown outcome (rotation.go), so that an
// interrupted rotation heals even if nobody reads or writes the tunnel, and
// finds keys changed outside this engine (drift).

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// reconcilePerPass bounds the Cloudflare calls of one periodic call's
// reconciliation.
const reconcilePerPass = 100

// reconcileUnresolved is the backend's PeriodicFunc: on the node that may
// write storage it works off the tunnels marked unresolved, then, once per
// drift_check_interval, compares every managed tunnel with Cloudflare. One
// tunnel never stops the pass: only Cloudflare's rate limit or the mount's
// budget ends it early. A tunnel whose lock is taken (a rotation in flight),
// whose last rotation is still settling, or whose retry time has not come is
// left for a later pass.
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
	tunnels, err := store.ListUnresolved(ctx, req.Storage)
	if err != nil {
		return err
	}
	asked := 0
	for _, t := range tunnels {
		if asked == reconcilePerPass || !b.budgetAllowsBackground() {
			return nil
		}
		calledCloudflare, err := b.engine.ReconcileInBackground(ctx, req.Storage, rotation.Conn{Edge: client, Settings: cfg.settings()}, t)
		if calledCloudflare {
			asked++
		}
		if err != nil {
			b.tunnelLogger(t).Warn("background reconciliation failed", "error", err)
			if cloudflare.RetryAfter(err) > 0 {
				return nil // rate limited or over budget: the next pass goes on
			}
		}
	}
	return b.sweepDrift(ctx, req.Storage, client, cfg)
}

// budgetAllowsBackground reports whether background work may spend a call
// now (see backgroundBudget).
func (b *backend) budgetAllowsBackground() bool {
	ok, _ := b.backgroundBudget()
	return ok
}

// backgroundBudget reports whether background work (the scheduler, the
// sweep) may spend a call now, keeping 5% of the budget for operators' own
// requests, and if not, how long until more calls are free (0: unknown).
func (b *backend) backgroundBudget() (bool, time.Duration) {
	limit, _ := b.budget.Limit()
	reserve := max(limit/20, 1)
	if limit <= 2 {
		reserve = 0
	}
	free, wait := b.budget.Free()
	return free > reserve, wait
}

// sweepDrift compares, once per drift_check_interval, the key time of every
// tunnel this mount manages with Cloudflare's: one list call per account
// that has managed tunnels. A key generated at the edge after the stored one
// was changed outside this engine (the dashboard, Terraform, another mount
// or cluster, a restored snapshot): the record becomes stale, and
// heal_stale_psk heals it, at most once per tunnel per interval.
func (b *backend) sweepDrift(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord) error {
	interval := cfg.driftInterval()
	if interval == 0 {
		return nil
	}
	b.driftMu.Lock()
	due := b.lastDriftSweep.IsZero() || b.now().Sub(b.lastDriftSweep) >= interval
	b.driftMu.Unlock()
	if !due {
		return nil
	}
	accounts, err := s.List(ctx, store.PSKPrefix)
	if err != nil {
		return fmt.Errorf("list managed accounts: %w", err)
	}
	for _, a := range accounts {
		account := strings.TrimSuffix(a, "/")
		if !b.budgetAllowsBackground() {
			return nil // the rest waits for the next pass; the sweep is not done
		}
		edge, err := client.ListTunnels(ctx, account)
		if err != nil {
			b.Logger().Warn("drift check could not list tunnels", "account_id", account, "error", err)
			if cloudflare.RetryAfter(err) > 0 {
				return nil
			}
			continue
		}
		byID := make(map[string]*cloudflare.TunnelState, len(edge))
		for i := range edge {
			byID[edge[i].ID] = &edge[i]
		}
		stored, err := s.List(ctx, store.PSKPrefix+a)
		if err != nil {
			return fmt.Errorf("list managed tunnels of account %s: %w", account, err)
		}
		for _, id := range stored {
			t := store.Tunnel{AccountID: account, TunnelID: id}
			if _, err := b.engine.CompareWithEdge(ctx, s, rotation.Conn{Edge: client, Settings: cfg.settings()}, t, byID[id]); err != nil {
				b.tunnelLogger(t).Warn("drift check failed", "error", err)
				if cloudflare.RetryAfter(err) > 0 {
					return nil
				}
			}
		}
	}
	b.driftMu.Lock()
	b.lastDriftSweep = b.now()
	b.driftMu.Unlock()
	return nil
}
