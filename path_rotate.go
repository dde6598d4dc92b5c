package main

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathRotate queues every stored tunnel of an account for rotation (after a
// suspected compromise, say) and reports the job's progress.
func pathRotate(b *backend) []*framework.Path {
	return []*framework.Path{{
		Pattern:      "rotate/" + accountSegment,
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "account"},
		Fields: map[string]*framework.FieldSchema{
			"account": tunnelFields["account"],
			"older_than": {
				Type:        framework.TypeDurationSecond,
				Description: "Only queue tunnels whose key was stored longer ago than this. Omitted: every tunnel.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: forwardedOperation(b.queueAccountRotation, "rotate",
				"Queue every stored tunnel of the account for rotation."),
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.readAccountRotation,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read", OperationSuffix: "rotation-progress"},
				Summary:      "Report the progress of the account's bulk rotation.",
			},
		},
		HelpSynopsis:    pathRotateHelpSynopsis,
		HelpDescription: pathRotateHelpDescription,
	}}
}

func (b *backend) queueAccountRotation(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if resp := rejectUnknownFields(req, d); resp != nil {
		return resp, nil
	}
	account, problem := normaliseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	var olderThan time.Duration
	if v, ok := d.GetOk("older_than"); ok {
		olderThan = time.Duration(v.(int)) * time.Second
	}
	if _, _, err := b.cloudflareClient(ctx, req.Storage); err != nil {
		return nil, err
	}

	tunnels, err := req.Storage.List(ctx, pskStoragePrefix+account+"/")
	if err != nil {
		return nil, fmt.Errorf("list tunnels of account %s: %w", account, err)
	}
	now := b.now()
	// The job's entries go to a minute of their own: the current one, or the
	// one after the last job's when that was in this minute too, so that an
	// entry of the last job that lingers (its delete failed) is never
	// counted as this job's.
	minute := dueMinute(now, false)
	prev, err := readBulkJob(ctx, req.Storage, account)
	if err != nil {
		return nil, err
	}
	if prev != nil && prev.Minute >= minute {
		minute = prev.Minute + 1
	}
	queued := 0
	for _, id := range tunnels {
		t := tunnelRef{AccountID: account, TunnelID: id}
		if olderThan > 0 {
			rec, err := readPSKRecord(ctx, req.Storage, t)
			if err != nil {
				return nil, err
			}
			if rec == nil || now.Sub(rec.StoredAt) < olderThan {
				continue
			}
		}
		if err := queueBulkRotation(ctx, req.Storage, t, minute, now); err != nil {
			return nil, err
		}
		queued++
	}
	b.bulkMu.Lock()
	err = writeBulkJob(ctx, req.Storage, account, &bulkJob{StartedAt: now.UTC(), Minute: minute, Queued: queued})
	b.bulkMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("record bulk rotation of account %s: %w", account, err)
	}
	b.pokeScheduler()
	b.Logger().Info("bulk rotation queued", "account_id", account, "queued", queued)
	return &logical.Response{Data: map[string]any{
		"account_id":      account,
		"queued":          queued,
		"expected_finish": formatTime(b.expectedFinish(queued)),
	}}, nil
}

func (b *backend) readAccountRotation(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	account, problem := normaliseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	job, err := readBulkJob(ctx, req.Storage, account)
	if err != nil || job == nil {
		return nil, err
	}
	p, err := job.progress(ctx, req.Storage, account)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		"account_id":      account,
		"started_at":      formatTime(job.StartedAt),
		"queued":          p.Queued,
		"done":            p.Done,
		"failed":          tunnelReasons(job.Failed),
		"skipped":         tunnelReasons(job.Skipped),
		"remaining":       p.Remaining,
		"expected_finish": formatTime(b.expectedFinish(p.Remaining)),
	}}, nil
}

// tunnelReasons lists a job's failed or skipped tunnels, by tunnel id.
func tunnelReasons(reasons map[string]string) []map[string]any {
	out := make([]map[string]any, 0, len(reasons))
	for tunnel, reason := range reasons {
		out = append(out, map[string]any{"tunnel_id": tunnel, "reason": reason})
	}
	sort.Slice(out, func(i, j int) bool { return out[i]["tunnel_id"].(string) < out[j]["tunnel_id"].(string) })
	return out
}

// expectedFinish estimates when n more rotations will be done at the pace
// the budget allows.
func (b *backend) expectedFinish(n int) time.Time {
	limit, window := b.budget.Limit()
	return b.now().Add(time.Duration(n) * window / time.Duration(limit)).UTC()
}

const pathRotateHelpSynopsis = `Rotate every stored tunnel of an account, paced under Cloudflare's rate limit.`

const pathRotateHelpDescription = `
write rotate/<account_id> queues every tunnel of the account whose PSK this
engine stores (with older_than: only those whose key was stored longer ago
than that) and answers at once with how many were queued and when they are
expected to be done. The engine's scheduler rotates them one by one, on the
active node, never spending more than config rate_limit Cloudflare calls in
any rate_limit_window and keeping a share of that for other requests.

read rotate/<account_id> reports the last bulk rotation of the account:
account_id, started_at, queued, done, failed (each tunnel_id with its reason),
skipped (each tunnel_id with its reason: its key was deleted in Vault after the
job was queued, or Cloudflare no longer knows the tunnel), remaining and
expected_finish (when the rest should be done at the budget's pace). A tunnel
counts as done once its rotation is stored; queued = done + failed + skipped +
remaining.
`
