package main

import (
	"context"
	"strconv"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/background"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

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
				Description: "Only queue tunnels whose key was stored longer ago than this. Omitted: every tunnel. Not with include_unmanaged.",
			},
			"include_unmanaged": {
				Type: framework.TypeBool,
				Description: "Also take the tunnels Cloudflare lists (one list call) that Vault does not manage yet: each gets its first key, " +
					"as a first write would, with its router facts from the listing, and comes under management. Not with older_than.",
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
	account, problem := store.ParseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	if resp := rejectUnknownFields(req, d); resp != nil {
		return resp, nil
	}
	var opts background.BulkOptions
	if v, ok := d.GetOk("older_than"); ok {
		opts.OlderThan = time.Duration(v.(int)) * time.Second
	}
	opts.IncludeUnmanaged = d.Get("include_unmanaged").(bool)
	if _, given := d.GetOk("older_than"); given && opts.IncludeUnmanaged {
		return logical.ErrorResponse("include_unmanaged=true cannot be combined with older_than: older_than picks tunnels by when Vault " +
			"stored their key, and a tunnel Vault does not manage has no key stored in Vault, so whether it is older is not known. " +
			"Write include_unmanaged=true alone (it rotates every managed tunnel too), or older_than alone; nothing was queued"), nil
	}
	if _, _, err := b.clients.Get(ctx, req.Storage); err != nil {
		return nil, err
	}

	queued, err := b.background.QueueAccount(ctx, req.Storage, account, opts)
	if err != nil {
		return failure(err)
	}
	b.Logger().Info("bulk rotation queued", "account_id", account, "queued", queued.Queued, "unmanaged", queued.Unmanaged)
	data := map[string]any{
		"account_id":      account,
		"queued":          queued.Queued,
		"expected_finish": store.FormatTime(b.background.ExpectedFinish(ctx, req.Storage, queued.Queued)),
	}
	resp := &logical.Response{Data: data}
	if opts.IncludeUnmanaged {
		data["unmanaged"] = queued.Unmanaged
	}
	if queued.Skipped > 0 {
		resp.AddWarning(strconv.Itoa(queued.Skipped) + " of the tunnels Cloudflare listed have an id not in the canonical form: they were skipped (read rotate/" + account + ")")
	}
	return resp, nil
}

func (b *backend) readAccountRotation(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	account, problem := store.ParseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	job, err := store.ReadBulkJob(ctx, req.Storage, account)
	if err != nil || job == nil {
		return nil, err
	}
	p, results, err := job.Progress(ctx, req.Storage, account, b.now())
	if err != nil {
		return nil, err
	}
	failed, err := job.ListResults(ctx, req.Storage, account, results.Failed, false)
	if err != nil {
		return nil, err
	}
	skipped, err := job.ListResults(ctx, req.Storage, account, results.Skipped, true)
	if err != nil {
		return nil, err
	}
	retrying, err := job.ListRetrying(ctx, req.Storage, account, results.Retrying)
	if err != nil {
		return nil, err
	}
	data := map[string]any{
		"account_id":      account,
		"started_at":      store.FormatTime(job.StartedAt),
		"queued":          p.Queued,
		"done":            p.Done,
		"failed":          failed,
		"failed_count":    p.Failed,
		"skipped":         skipped,
		"skipped_count":   p.Skipped,
		"retrying":        retrying,
		"retrying_count":  p.Retrying,
		"remaining":       p.Remaining,
		"expected_finish": store.FormatTime(b.background.ExpectedFinish(ctx, req.Storage, p.Remaining)),
	}
	if job.IncludeUnmanaged {
		data["unmanaged"] = job.Unmanaged
	}
	return &logical.Response{Data: data}, nil
}

const pathRotateHelpSynopsis = `Rotate every stored tunnel of an account, paced under Cloudflare's rate limit.`

const pathRotateHelpDescription = `
write rotate/<account_id> queues every tunnel of the account whose PSK this
engine stores (with older_than: only those whose key was stored longer ago
than that) and answers at once with how many were queued and when they are
expected to be done. The engine's scheduler rotates them on the active
node, never spending more than config rate_limit Cloudflare calls in any
rate_limit_window and keeping a share of that for other requests: one call
per tunnel with key_source cloudflare (psk_generate); with key_source vault
one call per batch of up to config set_batch_size tunnels (Cloudflare's Set
operation), every key written ahead (state pending) before the call that
carries it, a batch Cloudflare refuses as too large halved until it fits.
While the account's last bulk rotation still has tunnels to rotate, a new
one is refused with HTTP 409 and that job's progress, and nothing is queued.

include_unmanaged=true also takes the tunnels Cloudflare lists (one list
call, when the job is queued) that Vault does not manage yet, so that an
account comes under Vault in one command: each gets its first key as a
first write would (never is a key the engine did not set called current),
with its router facts from the listing and no read of the tunnel. Not
managed means not by this mount: tunnels another mount on the account
manages are taken over too. A listed id not in the canonical form is
counted skipped, with a warning. The answer then says how many of the
queued tunnels were unmanaged. It cannot
be combined with older_than (400): older_than picks tunnels by when Vault
stored their key, which an unmanaged tunnel has not.

read rotate/<account_id> reports the last bulk rotation of the account:
account_id, started_at, queued, done, failed_count (how many tunnels' rotation
failed), skipped_count (how many were skipped: their key was deleted in Vault
after the job was queued, or Cloudflare no longer knows the tunnel), failed
and skipped (the first 100 of those tunnels by tunnel_id, each with its
reason, cut to 1 KiB; the counts say how many there are in all),
retrying_count and retrying (key_source vault: the tunnels among remaining
whose key Cloudflare did not apply, the first 100 with Cloudflare's reason,
attempts and retry_at; such a tunnel keeps its key, in Vault as at the edge,
is sent again after 15s, doubling to 4m, and is counted failed after its
sixth refusal), unmanaged (with include_unmanaged: how many queued tunnels
Vault did not manage), remaining and expected_finish (when the rest should
be done at the budget's pace). A tunnel counts as done once its rotation is
stored; queued = done + failed_count + skipped_count + remaining. A tunnel
whose batch's answer was lost stays pending and remaining until its own key
is stored (the job, a read, a write or the background pass sends it again).
A job of any size finishes, however many of its rotations fail: each failed,
skipped or retrying tunnel is a small storage entry of its own, and a
failure to store one holds up only that job's next rotations, for one
scheduler pass. The results of a job are removed by the scheduler once a
new job of the account has started: it begins within 10 minutes of that and
removes up to 1,000 a pass (about one a minute when idle), so those of a
large job take longer.
`
