package main

import (
	"context"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

const (
	// statusListed bounds the tunnels a status read lists as needing
	// attention, and as failing: the counts say how many there are.
	statusListed = 100
	// statusBulkJobs bounds the bulk jobs a status read looks at.
	statusBulkJobs = 100
)

// pathStatus answers the morning question, "is anything wrong, and where?",
// in one read whose cost does not grow with the number of tunnels: it reads
// the census (internal/store/census.go) and the first entries of the
// schedule and attention indexes, never a record, so it holds no key.
func pathStatus(b *backend) []*framework.Path {
	return []*framework.Path{{
		Pattern:      "status",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "status"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.readStatus,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
				Summary:      "Report the mount's health: tunnels by state, the schedule, the tunnels that need an operator, the budget, drift and bulk jobs.",
			},
		},
		HelpSynopsis:    pathStatusHelpSynopsis,
		HelpDescription: pathStatusHelpDescription,
	}}
}

// censusView is the census as this node knows it: kept in memory on the
// node that may write, as last written on a standby.
func (b *backend) censusView(ctx context.Context, s logical.Storage) (*store.CensusView, error) {
	if b.mayWrite() {
		return b.census.View(ctx, s)
	}
	view, err := store.ReadCensus(ctx, s)
	if err != nil || view != nil {
		return view, err
	}
	// Never written yet: nothing is counted.
	return &store.CensusView{}, nil
}

func (b *backend) readStatus(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	s, now := req.Storage, b.now()
	view, err := b.censusView(ctx, s)
	if err != nil {
		return nil, err
	}
	sched, err := store.SummarizeSchedule(ctx, s, now)
	if err != nil {
		return nil, err
	}
	failing, attention, err := attentionLists(ctx, s)
	if err != nil {
		return nil, err
	}
	jobs, err := b.runningBulkJobs(ctx, s, view.Bulk, now)
	if err != nil {
		return nil, err
	}
	// A block on record is read into the budget first, as config's read
	// does: a node that has not called Cloudflare yet still knows it.
	if err := b.loadBlock(ctx, s); err != nil {
		return nil, err
	}
	c := view.Counts
	states := map[string]any{}
	for _, state := range store.States {
		states[state] = 0
	}
	tunnels := 0
	for state, n := range c.States {
		states[state] = max(n, 0)
		tunnels += max(n, 0)
	}
	limit, window := b.budget.Limit()
	data := map[string]any{
		"tunnels":              tunnels,
		"states":               states,
		"scheduled":            max(c.Scheduled, 0),
		"overdue":              sched.Overdue,
		"overdue_at_least":     sched.OverdueAtLeast,
		"next_rotation":        store.FormatTime(sched.Next),
		"failing":              failing,
		"failing_count":        max(c.Attention[store.AttentionFailing], 0),
		"attention":            attention,
		"attention_count":      attentionCount(c),
		"oldest_key_stored_at": store.FormatTime(c.OldestKey()),
		"rate_limited_until":   store.FormatTime(b.budget.BlockedUntil()),
		"budget_limit":         limit,
		"budget_window":        int(window.Seconds()),
		"budget_used":          b.budget.Used(),
		"last_drift_check":     store.FormatTime(view.Drift.At),
		"drift_found":          view.Drift.Found,
		"bulk_jobs":            jobs,
		"counts_exact":         view.Exact,
		"counted_at":           store.FormatTime(view.CountedAt),
		"counts_as_of":         store.FormatTime(view.AsOf),
	}
	return &logical.Response{Data: data}, nil
}

func attentionCount(c store.Counts) int {
	n := 0
	for _, kind := range store.AttentionKinds {
		n += max(c.Attention[kind], 0)
	}
	return n
}

// attentionLists reads the first failing tunnels, and the first tunnels
// that need attention (stale, then failing, then gone), statusListed of
// each at most: a Get per tunnel listed, the failing ones read once.
func attentionLists(ctx context.Context, s logical.Storage) (failing, attention []map[string]any, err error) {
	failingItems, err := store.ListAttention(ctx, s, store.AttentionFailing, statusListed)
	if err != nil {
		return nil, nil, err
	}
	failing = make([]map[string]any, 0, len(failingItems))
	for _, it := range failingItems {
		failing = append(failing, map[string]any{
			"account_id": it.Tunnel.AccountID, "tunnel_id": it.Tunnel.TunnelID, "state": it.State,
			"failures": it.Failures, "retry_at": store.FormatTime(it.RetryAt), "reason": it.Reason,
		})
	}
	attention = []map[string]any{}
	for _, kind := range store.AttentionKinds {
		items := failingItems
		if kind != store.AttentionFailing {
			if items, err = store.ListAttention(ctx, s, kind, statusListed-len(attention)); err != nil {
				return nil, nil, err
			}
		}
		for _, it := range items[:min(len(items), statusListed-len(attention))] {
			attention = append(attention, map[string]any{
				"account_id": it.Tunnel.AccountID, "tunnel_id": it.Tunnel.TunnelID, "state": it.State, "reason": it.Reason,
			})
		}
	}
	return failing, attention, nil
}

// runningBulkJobs reports the progress of the bulk jobs of accounts (those
// the census says may be running) that are still running.
func (b *backend) runningBulkJobs(ctx context.Context, s logical.Storage, accounts []string, now time.Time) ([]map[string]any, error) {
	jobs := []map[string]any{}
	for _, account := range accounts[:min(len(accounts), statusBulkJobs)] {
		job, p, running, err := store.RunningBulkJob(ctx, s, account, now)
		if err != nil {
			return nil, err
		}
		if !running {
			continue
		}
		jobs = append(jobs, map[string]any{
			"account_id": account, "started_at": store.FormatTime(job.StartedAt), "queued": p.Queued,
			"done": p.Done, "failed": p.Failed, "skipped": p.Skipped, "remaining": p.Remaining,
		})
	}
	return jobs, nil
}

const pathStatusHelpSynopsis = `The mount's health in one read: tunnels by state, the schedule, what needs an operator, the budget, drift and bulk jobs.`

const pathStatusHelpDescription = `
read status answers "is anything wrong, and where?" for the whole mount.
It never returns a key or a token, and its cost does not grow with the
number of tunnels: it reads a small census that the engine keeps up to
date as records change, and the first entries of two indexes, never the
records themselves. Grant it to monitoring (docs/policies/monitoring.hcl).

tunnels: how many tunnels have a record. states: how many are in each
state (current, rotation_unknown, stale, tunnel_gone; every one present,
even at 0). scheduled: how many the scheduler will rotate.
overdue: scheduled rotations still waiting in a minute that ended over a
minute ago (the scheduler rotates at the second it is due, so these wait
for the budget, Cloudflare's block, a settle window or a stopped
scheduler); overdue_at_least is true when there are more than it counted
(it looks at 12 minutes of the schedule, and counts up to 1,000).
next_rotation: the minute of the earliest scheduled rotation still to be
made (a past minute while one is late; the schedule is indexed by minute).

failing: the first 100 tunnels whose background attempts (a scheduled
rotation, a reconciliation, a heal) fail, each with account_id, tunnel_id,
state, failures, retry_at (when the background tries again) and reason;
failing_count says how many there are. attention: the first 100 tunnels that
need an operator, each with account_id, tunnel_id, state and reason: stale
ones first (the edge uses a key Vault does not hold), then failing ones, then
tunnel_gone ones (Cloudflare no longer has the tunnel); attention_count says
how many there are. A rotation under way, or waiting for reconciliation,
counts in states only: if the background cannot resolve it, it is failing.

oldest_key_stored_at: when the oldest key a tunnel may use was stored
(tunnel_gone tunnels left out). rate_limited_until: the end of Cloudflare's
rate-limit block, if one is in force. budget_limit and budget_window: config
rate_limit and rate_limit_window; budget_used: the calls this node sent in
the window that ends now. last_drift_check: when the drift sweep last went
through every account; drift_found: how many tunnels it found with a key
changed outside the engine, or gone at Cloudflare. bulk_jobs: the bulk
rotations still running (rotate/<account>), each with account_id,
started_at, queued, done, failed, skipped and remaining.

counts_exact: whether the counts are exact. They are kept exact as records
change, and recounted by the scheduler's walk over the records, which starts
every 10 minutes and reads 1,000 records a pass (a pass a minute when idle).
They are not exact after the process that kept them stopped without cleaning
up (a crash, a killed plugin), after a storage error while a record was
written, or on a mount with records from before this version, until that
walk next finishes (for 100,000 tunnels, within about two hours).
oldest_key_stored_at may then be earlier than the truth, never later, and
by less than a day. counted_at: when that walk last finished. counts_as_of:
when the counts were taken: now on the active node; on a performance
standby, which reads what the active node last wrote (at most 30 seconds
and one scheduler pass behind it), that time.
`
