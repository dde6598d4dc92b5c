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
		calledCloudflare, err := b.reconcileInBackground(ctx, req.Storage, client, cfg, t)
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

// reconcileInBackground reconciles one unresolved tunnel and says whether it
// asked Cloudflare. A failure other than "not now" is noted on the record,
// so the tunnel is retried with backoff and the reason shows in metadata.
func (b *backend) reconcileInBackground(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t store.Tunnel) (bool, error) {
	unlock, ok := b.tryLockTunnel(t)
	if !ok {
		return false, nil
	}
	defer unlock()
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil {
		return false, err
	}
	if rec == nil || rec.Current() || rec.State == store.StateTunnelGone {
		return false, store.ClearUnresolved(ctx, s, t)
	}
	now := b.now()
	if rec.Settling(now) || now.Before(rec.RetryAt) || rec.HeldByAnswer() {
		// A held record waits for an operator (rotation.go, holdWrongKey).
		return false, nil
	}
	_, err = b.reconcileLocked(ctx, s, client, cfg, t, rec, cfg.HealStalePSK)
	if err == nil || cloudflare.NotFound(err) || cloudflare.RetryAfter(err) > 0 {
		// Resolved, gone (recorded as such), or "not now", which is no
		// fault of the tunnel's.
		return true, err
	}
	// The record may have changed under reconcileLocked (a heal that
	// failed): note the failure on what is stored now.
	if latest, rerr := store.ReadRecord(ctx, s, t); rerr == nil && latest != nil && !latest.Current() {
		latest.NoteFailure(b.now(), err)
		if werr := store.WriteRecord(ctx, s, t, latest); werr != nil {
			b.tunnelLogger(t).Warn("could not record a failed reconciliation", "error", werr)
		}
	}
	return true, err
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
			// The sweep waits for a tunnel whose lock is taken instead of
			// passing over it: it marks itself done below, and a tunnel
			// passed over would go unchecked for a whole interval. The
			// holder is a rotation (bounded by request_timeout) or a
			// storage-only change such as a schedule write.
			unlock := b.lockTunnel(t)
			_, err := b.compareLocked(ctx, s, client, cfg, t, byID[id], cfg.HealStalePSK)
			unlock()
			if err != nil {
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

// compareLocked holds a current record against the edge's view of its
// tunnel (nil: Cloudflare does not list it) and records what it finds: a key
// generated after the stored one makes the record stale (and, with heal,
// heals it if the tunnel was not healed within drift_check_interval); a
// tunnel Cloudflare no longer has makes it tunnel_gone. It returns whether
// the stored key is the edge's. A record that is not current is
// reconciliation's to resolve. The caller holds t's lock.
func (b *backend) compareLocked(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t store.Tunnel, edge *cloudflare.TunnelState, heal bool) (bool, error) {
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil || rec == nil {
		return false, err
	}
	if edge != nil {
		// The caller's listing or read also says what a router needs of the
		// tunnel: keep it current at no extra call, whatever the key's state.
		if rec, err = b.refreshFacts(ctx, s, t, rec, edge); err != nil {
			return false, err
		}
	}
	if !rec.Current() {
		return false, nil
	}
	if edge == nil {
		_, err := b.markGone(ctx, s, t, rec)
		return false, err
	}
	if !edge.PSKLastGeneratedOn.After(rec.LastGeneratedOn) {
		return true, nil
	}
	reason := fmt.Sprintf("Cloudflare's key was generated at %s, after the stored key (%s): it was changed outside this engine",
		store.FormatTime(edge.PSKLastGeneratedOn), store.FormatTime(rec.LastGeneratedOn))
	if heal && !b.mayHeal(cfg, rec) {
		_, err = b.holdHealing(ctx, s, t, rec, reason)
		return false, err
	}
	// Stale first, then healed: a heal that Cloudflare refuses puts back
	// the record it started from, and that must not be the current one.
	// The background looks at the tunnel again at once where healing is on
	// (a listing, which never heals, leaves that to the next read or pass),
	// or, healing off, after an hour.
	retryAt := b.now()
	if !cfg.HealStalePSK {
		retryAt = retryAt.Add(store.FailureBackoffMax)
	}
	stale, err := b.markStale(ctx, s, t, rec, reason, retryAt)
	if err != nil || !heal {
		return false, err
	}
	b.tunnelLogger(t).Warn("key changed outside this engine; generating a new key", "edge_generated_on", store.FormatTime(edge.PSKLastGeneratedOn))
	healing := *stale
	healing.EdgeKeyBefore, healing.EdgeKeyBeforeSeenAt = edge.PSKLastGeneratedOn, edge.Date
	_, err = b.rotateLocked(ctx, s, client, cfg, t, &healing, stale.RotationPeriod, "heal")
	return err == nil, err
}
