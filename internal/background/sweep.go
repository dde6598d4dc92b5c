package background

// The background sweep: Vault calls the backend's PeriodicFunc about once a
// minute, and on the node that may write storage it resolves the tunnels
// whose last rotation has an unknown outcome (internal/rotation), so that an
// interrupted rotation heals even if nobody reads or writes the tunnel, and
// finds keys changed outside this engine (drift).

import (
	"context"
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

// goneLookEvery is how often, at most, the drift sweep returns a tunnel
// recorded gone that Cloudflare lists again (the record's GoneLookedAt). A
// passing 404 then costs its schedule a drift_check_interval, while a
// tunnel that keeps coming and going (listed, yet 404 when rotated) is
// returned, judged and perhaps healed once a day, not at every look.
const goneLookEvery = 24 * time.Hour

// Periodic is the backend's PeriodicFunc: on the node that may
// write storage it works off the tunnels marked unresolved, then, once per
// drift_check_interval, compares every managed tunnel with Cloudflare. One
// tunnel never stops the pass: only Cloudflare's rate limit or the mount's
// budget ends it early. A tunnel whose lock is taken (a rotation in flight),
// whose last rotation is still settling, or whose retry time has not come is
// left for a later pass.
//
// Without config it fails with Connect's error; the caller knows which of
// those means "nothing to do yet".
func (w *Worker) Periodic(ctx context.Context, s logical.Storage) error {
	if !w.mayWrite() {
		return nil
	}
	s = w.observe(s)
	conn, err := w.connect(ctx, s)
	if err != nil {
		return err
	}
	tunnels, err := store.ListUnresolved(ctx, s)
	if err != nil {
		return err
	}
	asked := 0
	for _, t := range tunnels {
		if asked == reconcilePerPass || !w.budgetAllowsBackground() {
			return nil
		}
		calledCloudflare, err := w.engine.ReconcileInBackground(ctx, s, conn, t)
		if calledCloudflare {
			asked++
		}
		if err != nil {
			w.engine.TunnelLogger(t).Warn("background reconciliation failed", "error", err)
			if cloudflare.RetryAfter(err) > 0 {
				return nil // rate limited or over budget: the next pass goes on
			}
		}
	}
	return w.sweepDrift(ctx, s, conn)
}

// budgetAllowsBackground reports whether background work may spend a call
// now (see backgroundBudget).
func (w *Worker) budgetAllowsBackground() bool {
	ok, _ := w.backgroundBudget()
	return ok
}

// backgroundBudget reports whether background work (the scheduler, the
// sweep) may spend a call now, keeping 5% of the budget for operators' own
// requests, and if not, how long until more calls are free (0: unknown).
func (w *Worker) backgroundBudget() (bool, time.Duration) {
	limit, _ := w.budget.Limit()
	reserve := max(limit/20, 1)
	if limit <= 2 {
		reserve = 0
	}
	free, wait := w.budget.Free()
	return free > reserve, wait
}

// sweepDrift compares, once per drift_check_interval, the key time of every
// tunnel this mount manages with Cloudflare's: one list call per account
// that has managed tunnels. A key generated at the edge after the stored one
// was changed outside this engine (the dashboard, Terraform, another mount
// or cluster, a restored snapshot): the record becomes stale, and
// heal_stale_psk heals it, at most once per tunnel per interval. A tunnel
// recorded gone that the listing shows again returns to management
// (lookAgain).
func (w *Worker) sweepDrift(ctx context.Context, s logical.Storage, conn rotation.Conn) error {
	interval := conn.Settings.DriftInterval
	if interval == 0 {
		return nil
	}
	w.driftMu.Lock()
	due := w.lastDriftSweep.IsZero() || w.now().Sub(w.lastDriftSweep) >= interval
	w.driftMu.Unlock()
	if !due {
		return nil
	}
	accounts, err := s.List(ctx, store.PSKPrefix)
	if err != nil {
		return fmt.Errorf("list managed accounts: %w", err)
	}
	// What the sweep finds is counted from its own writes: records that
	// were current and that it marks stale or tunnel_gone.
	ctx, found := store.WatchDrift(ctx)
	for _, a := range accounts {
		account := strings.TrimSuffix(a, "/")
		if !w.budgetAllowsBackground() {
			return nil // the rest waits for the next pass; the sweep is not done
		}
		edge, err := conn.Edge.ListTunnels(ctx, account)
		if err != nil {
			w.logger.Warn("drift check could not list tunnels", "account_id", account, "error", err)
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
			if err := w.lookAgain(ctx, s, conn, t, byID[id]); err != nil {
				w.engine.TunnelLogger(t).Warn("drift check failed", "error", err)
				if cloudflare.RetryAfter(err) > 0 {
					return nil
				}
			}
		}
	}
	now := w.now()
	w.driftMu.Lock()
	w.lastDriftSweep = now
	w.driftMu.Unlock()
	w.census.NoteDriftCheck(ctx, s, now, found.Found())
	return nil
}

// lookAgain is the drift sweep's look at one stored tunnel, edge being what
// the listing says of it (nil: not listed). A tunnel recorded gone that is
// listed again is returned to management (ReturnGone), at most once per
// goneLookEvery; one still not listed costs nothing. Every other record is
// compared with the listing (CompareWithEdge).
func (w *Worker) lookAgain(ctx context.Context, s logical.Storage, conn rotation.Conn, t store.Tunnel, edge *cloudflare.TunnelState) error {
	rec, err := store.ReadRecord(ctx, s, t)
	if err != nil || rec == nil {
		return err
	}
	if rec.State == store.StateTunnelGone {
		if edge == nil || w.now().Sub(rec.GoneLookedAt) < goneLookEvery {
			return nil
		}
		_, err = w.engine.ReturnGone(ctx, s, conn, t, edge)
		return err
	}
	_, err = w.engine.CompareWithEdge(ctx, s, conn, t, edge)
	return err
}
