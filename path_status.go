package main

import (
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

const (
	// statusListed bounds the tunnels a status read lists as needing
	// attention, and as failing: the counts say how many there are.
	statusListed = store.ListedPerKind
	// statusBulkJobs bounds the running bulk jobs a status read lists.
	statusBulkJobs = 100
)

// pathStatus answers the morning question, "is anything wrong, and where?",
// in one read whose cost does not grow with the number of tunnels: it
// answers from the census (internal/store/census.go), which counts the
// tunnels, lists the first that need attention and keeps what the
// scheduler found in the schedule: in memory on the active node, four Gets
// on a standby (the census and its three lists). It reads no record, so it holds no key.
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
	view, err := b.census.Stored(ctx, s)
	if err != nil || view != nil {
		return view, err
	}
	// Never written yet: nothing is counted.
	return &store.CensusView{}, nil
}

func (b *backend) readStatus(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	s := req.Storage
	view, err := b.censusView(ctx, s)
	if err != nil {
		return nil, err
	}
	failing, attention := attentionLists(view.Listed)
	// A block on record is read into the budget first, as config's read
	// does: a node that has not called Cloudflare yet still knows it.
	if err := b.clients.LoadBlock(ctx, s); err != nil {
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
	limit, window := b.clients.Budget().Limit()
	data := map[string]any{
		"tunnels":              tunnels,
		"states":               states,
		"scheduled":            max(c.Scheduled, 0),
		"overdue":              view.Schedule.Overdue,
		"overdue_at_least":     view.Schedule.OverdueAtLeast,
		"next_rotation":        store.FormatTime(view.Schedule.Next),
		"schedule_checked_at":  store.FormatTime(view.ScheduleAt),
		"failing":              failing,
		"failing_count":        max(c.Attention[store.AttentionFailing], 0),
		"attention":            attention,
		"attention_count":      attentionCount(c),
		"oldest_key_stored_at": store.FormatTime(c.OldestKey()),
		"rate_limited_until":   store.FormatTime(b.clients.Budget().BlockedUntil()),
		"budget_limit":         limit,
		"budget_window":        int(window.Seconds()),
		"budget_used":          b.clients.Budget().Used(),
		"last_drift_check":     store.FormatTime(view.Drift.At),
		"drift_found":          view.Drift.Found,
		"bulk_jobs":            bulkJobs(view.Bulk),
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

// attentionLists are the first failing tunnels, and the first tunnels that
// need attention (stale, then failing, then gone), statusListed of each at
// most, as the census lists them.
func attentionLists(listed map[string][]store.AttentionItem) (failing, attention []map[string]any) {
	failing = []map[string]any{}
	for _, it := range listed[store.AttentionFailing][:min(len(listed[store.AttentionFailing]), statusListed)] {
		failing = append(failing, map[string]any{
			"account_id": it.AccountID, "tunnel_id": it.TunnelID, "state": it.State,
			"failures": it.Failures, "retry_at": store.FormatTime(it.RetryAt), "reason": it.Reason,
		})
	}
	attention = []map[string]any{}
	for _, kind := range store.AttentionKinds {
		items := listed[kind]
		for _, it := range items[:min(len(items), statusListed-len(attention))] {
			attention = append(attention, map[string]any{
				"account_id": it.AccountID, "tunnel_id": it.TunnelID, "state": it.State, "reason": it.Reason,
			})
		}
	}
	return failing, attention
}

// bulkJobs are the running bulk jobs as the census last counted them.
func bulkJobs(jobs []store.BulkStatus) []map[string]any {
	out := []map[string]any{}
	for _, j := range jobs[:min(len(jobs), statusBulkJobs)] {
		out = append(out, map[string]any{
			"account_id": j.AccountID, "started_at": store.FormatTime(j.StartedAt), "queued": j.Queued, "done": j.Done,
			"failed": j.Failed, "skipped": j.Skipped, "remaining": j.Remaining, "as_of": store.FormatTime(j.AsOf),
		})
	}
	return out
}

const pathStatusHelpSynopsis = `The mount's health in one read: tunnels by state, the schedule, what needs an operator, the budget, drift and bulk jobs.`

const pathStatusHelpDescription = `
read status answers "is anything wrong, and where?" for the whole mount.
It never returns a key or a token, and its cost does not grow with the
number of tunnels: it reads no record and lists nothing. The engine keeps a
small census of the mount up to date as records change (in memory on the
active node, where a read touches no storage; written to storage at most
every 30 seconds for performance standbys, which read that: four small
entries), and the scheduler adds what it finds in the schedule. Grant it to
monitoring (docs/policies/monitoring.hcl).

tunnels: how many tunnels have a record. states: how many are in each
state (current, pending, rotation_unknown, stale, tunnel_gone; every one
present, even at 0; pending: a key Vault made, written ahead, that
Cloudflare has not confirmed yet, with key_source vault). scheduled: how
many the scheduler will rotate.
overdue: scheduled rotations still waiting in a minute that ended over a
minute ago (the scheduler rotates at the second a rotation is due, so these
wait for the budget, Cloudflare's block, a settle window or a stopped
scheduler); overdue_at_least is true when there may be more than it counted
(it looks at 12 minutes of the schedule, and counts up to 1,000).
next_rotation: the minute of the earliest scheduled rotation still to be
made (a past minute while one is late; the schedule is indexed by minute).
schedule_checked_at: when the scheduler found these, at most about a minute
ago while it runs.

failing: the first 100 tunnels (by account and tunnel id) whose background
attempts (a scheduled rotation, a reconciliation, a heal) fail, each with
account_id, tunnel_id, state, failures, retry_at (when the background tries
again) and reason; failing_count says how many there are. attention: the
first 100 tunnels that need an operator, each with account_id, tunnel_id,
state and reason: stale ones first (the edge uses a key Vault does not hold,
so the tunnel is down), then failing ones, then tunnel_gone ones (Cloudflare
no longer has the tunnel); attention_count says how many there are. A
rotation under way, or waiting for reconciliation, counts in states only: if
the background cannot resolve it, it is failing. A reason is cut to 200
bytes, with double quotes shown as single ones and every other character
outside printable ASCII (and <, >, &) as ?; the whole of it is in the
tunnel's metadata (last_failure, state_reason). When a listed tunnel no
longer needs attention while more of its kind do, its list is one short
(still the first tunnels of its kind) until the background's next pass
refills it, within about a minute; the counts are exact meanwhile.

oldest_key_stored_at: when the oldest key a tunnel may use was stored
(tunnel_gone tunnels left out). Once the tunnel that had it is rotated or
deleted, it may show that key's time until the scheduler's walk has counted
the keys again: never a later time than the truth, and the same day.
rate_limited_until: the end of Cloudflare's rate-limit block, if one is in
force. budget_limit and budget_window: config rate_limit and
rate_limit_window; budget_used: the calls this node sent in the window that
ends now. last_drift_check: when the drift sweep last went through every
account; drift_found: how many tunnels it found with a key changed outside
the engine, or gone at Cloudflare. bulk_jobs: the bulk rotations still
running (rotate/<account>), each with account_id, started_at, queued, done,
failed, skipped and remaining, as counted at as_of (at most about 30
seconds old while the job runs; read rotate/<account> for its progress now).

counts_exact: whether the counts are exact. They are kept exact as records
change, and recounted by the scheduler's walk over the records, which starts
every 10 minutes and reads 1,000 records a pass (a pass a minute when idle).
They are not exact after the process that kept them stopped without cleaning
up (a crash, a killed plugin), after a storage error while a record or the
index of tunnels that need attention was written, when the stored census
does not decode (it is then taken as none, logged once, and overwritten),
or on a mount with records from before this version, until that walk next
finishes (for 100,000 tunnels, within about two hours). One case they
cannot show: an older plugin version run on the mount after this one
stopped cleanly (a downgrade, then an upgrade) keeps no census, so nothing
tells that the counts handed back miss its changes, and they may be wrong
while counts_exact says true, until the upgraded process's first walk
finishes: it starts at once and reads 1,000 records a minute (about 100
minutes for 100,000 tunnels). After such a round trip, trust the counts once
counted_at is later than the upgrade.
counted_at: when that walk last finished. counts_as_of: when the counts were
taken: now on the active node; on a performance standby, when the active
node last wrote them.
`
