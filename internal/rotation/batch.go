package rotation

// Batches of keys Vault makes (a bulk job with key_source vault).
//
// Cloudflare's Set operation takes the keys of many tunnels of one account
// in one call, and costs one call of the budget whatever its size. A batch
// runs the protocol of vaultkeys.go for each of its tunnels, with one
// request for all of them:
//
//   - every key is made and written ahead (begin: the record pending with
//     its key, the tunnel marked unresolved) before the request that
//     carries it is sent; a record without router facts takes them from
//     one listing of the account, not a read of each tunnel (the budget
//     counts calls, not tunnels);
//   - a pending key a batch left (its answer lost) goes again in a batch
//     of its own job (Resend): the same key, judged as a single resend is
//     (finishPending), one call for the lot;
//   - each part's settle window is fixed just before its own request goes
//     out (windowFromSend): a part sent later than its keys were written
//     ahead (the second half of a split batch, a request_timeout or more
//     later) has its SettleUntil pushed on, never shortened, and written
//     before it is sent;
//   - a batch Cloudflare refuses as too large (cloudflare.BatchTooLarge:
//     nothing of it was set) is halved and each half sent, the same keys
//     again, until it fits or is a single key; the size that fitted is
//     reported, for the caller's next batches;
//   - the answer is read tunnel by tunnel: applied is stored current
//     (finish), unapplied is put back as it was (the tunnel keeps its key,
//     in Vault as at the edge; one not managed before is left unmanaged)
//     and reported with Cloudflare's reason, and an answer that proves
//     nothing of a tunnel leaves it pending, for the existing finish path
//     (finishPending: a read, a write, the background pass or the bulk job
//     sends the same key again);
//   - a request that fails as a whole is judged as a single key's is
//     (setFailed), but where the single path reads the tunnel to see
//     whether a refused request changed its key anyway, a batch lists the
//     account once.
//
// The caller holds every tunnel's lock from before the batch is begun until
// it returns, and passes records that are current (or none: a tunnel not
// managed yet, with what an account listing said of it).

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// BatchTunnel is one tunnel of a batch.
type BatchTunnel struct {
	Tunnel store.Tunnel
	// Previous is the tunnel's record as read under its lock: current, or
	// nil for a tunnel Vault does not manage yet.
	Previous *store.Record
	// Listed is, with Previous nil, what an account listing said of the
	// tunnel (its key's time, its router facts), so that its first
	// rotation need not read it. Nil: it is read, as a first write does.
	Listed *cloudflare.TunnelState
	// Resend: Previous is pending with a key Vault made (a batch of the
	// same job lost its answer), and that key is sent again to finish it.
	Resend bool
}

// BatchOutcome is what became of one tunnel of a batch.
type BatchOutcome int

const (
	// BatchFailed: no key of this tunnel's is on the edge (the record is
	// as it was) or none was made; Err says why. cloudflare.RetryAfter(Err)
	// says when it is only "not now"; a *SettlingError that a key of the
	// tunnel's may still land.
	BatchFailed BatchOutcome = iota
	// BatchStored: the edge applied the key, and it is stored current.
	BatchStored
	// BatchUnapplied: Cloudflare did not apply the key (Reason): the
	// tunnel keeps the key it had, and the record is as it was.
	BatchUnapplied
	// BatchGone: Cloudflare did not apply the key and no longer lists the
	// tunnel. The record is as it was.
	BatchGone
	// BatchPending: the outcome is unknown; the record stays pending with
	// the key written ahead, which the finish path sends again.
	BatchPending
	// BatchNotSent: nothing was sent (the settle window could not be
	// written first): the record is as it was, pending still for a
	// resend. Err says why; the tunnel may be tried again soon.
	BatchNotSent
)

// BatchResult is one tunnel's result.
type BatchResult struct {
	Outcome BatchOutcome
	// Record is the record stored current (BatchStored).
	Record *store.Record
	// Reason is Cloudflare's, for BatchUnapplied and BatchGone.
	Reason string
	Err    error
}

// BatchReport is what a batch did.
type BatchReport struct {
	// Results has one entry per tunnel, in the order given.
	Results []BatchResult
	// Fitted is, when Cloudflare refused a batch as too large, the size
	// of the largest part it then took (0: none refused, or none taken).
	Fitted int
}

// SetKeys gives each tunnel a new key Vault makes, written ahead and set
// in one Set call (or, when Cloudflare finds it too large, in halves), and
// sends again the pending key of each tunnel marked Resend. All tunnels
// must be of one account. The caller holds every tunnel's lock.
func (e *Engine) SetKeys(ctx context.Context, s logical.Storage, conn Conn, tunnels []BatchTunnel, trigger Trigger) BatchReport {
	report := BatchReport{Results: make([]BatchResult, len(tunnels))}
	var batch []*attempt
	var index []int
	facts := e.factsOfBatch(ctx, conn, tunnels)
	for i, bt := range tunnels {
		var a *attempt
		err := fmt.Errorf("%s is not of account %s, the batch's", bt.Tunnel, tunnels[0].Tunnel.AccountID)
		switch {
		case bt.Tunnel.AccountID != tunnels[0].Tunnel.AccountID:
		case bt.Resend:
			a, err = resendBatched(s, conn, bt)
		default:
			if bt.Previous != nil && bt.Previous.Facts == (store.Facts{}) {
				bt.Listed = facts[bt.Tunnel.TunnelID]
			}
			a, err = e.beginBatched(ctx, s, conn, bt, trigger)
		}
		if err != nil {
			report.Results[i] = BatchResult{Outcome: BatchFailed, Err: err}
			continue
		}
		batch, index = append(batch, a), append(index, i)
	}
	if len(batch) == 0 {
		return report
	}
	results := e.sendBatch(ctx, conn, batch, &report.Fitted, false)
	for j, r := range results {
		report.Results[index[j]] = r
	}
	return report
}

// factsOfBatch is, when a current record of the batch has no router facts
// (stored before they existed), what one listing of the account says of
// each tunnel: where the single path reads the tunnel (edgeBefore), a
// batch would make a call per tunnel. A tunnel the listing does not name,
// or a listing that fails, gives no facts and no read: the rotation goes
// on without them, as a single one whose read fails does, and the drift
// sweep's listing or a later rotation brings them.
func (e *Engine) factsOfBatch(ctx context.Context, conn Conn, tunnels []BatchTunnel) map[string]*cloudflare.TunnelState {
	var factless []string
	for _, bt := range tunnels {
		if !bt.Resend && bt.Previous != nil && bt.Previous.Current() && bt.Previous.Facts == (store.Facts{}) {
			factless = append(factless, bt.Tunnel.TunnelID)
		}
	}
	if len(factless) == 0 {
		return nil
	}
	listed := e.listAccount(ctx, conn, tunnels[0].Tunnel.AccountID)
	facts := make(map[string]*cloudflare.TunnelState, len(factless))
	for _, id := range factless {
		if facts[id] = listed[id]; facts[id] == nil {
			facts[id] = &cloudflare.TunnelState{ID: id}
		}
	}
	return facts
}

// resendBatched is the attempt that sends bt's pending key again, as
// finishPending's: the record is written only before the send
// (windowFromSend).
func resendBatched(s logical.Storage, conn Conn, bt BatchTunnel) (*attempt, error) {
	rec := bt.Previous
	switch {
	case rec == nil || rec.State != store.StatePending || rec.PendingPSK == "":
		return nil, fmt.Errorf("finish the pending rotation of %s: the record holds no pending key", bt.Tunnel)
	case Trigger(rec.PendingTrigger) == TriggerValidate:
		// The stored key of a validation whose answer was lost: sent for
		// real it would be "rotated" to the key it had (validate.go).
		return nil, fmt.Errorf("finish the pending rotation of %s: its pending key is a validation's, never sent for real", bt.Tunnel)
	}
	trigger := Trigger(rec.PendingTrigger)
	if trigger == "" {
		trigger = TriggerWrite
	}
	pending := *rec
	return &attempt{s: s, conn: conn, t: bt.Tunnel, previous: rec, sched: rec.Schedule(), trigger: trigger,
		key: rec.PendingPSK, source: store.KeySourceVault, resend: true, pending: &pending}, nil
}

// beginBatched makes bt's key and writes it ahead. Nothing is written when
// it fails.
func (e *Engine) beginBatched(ctx context.Context, s logical.Storage, conn Conn, bt BatchTunnel, trigger Trigger) (*attempt, error) {
	p := bt.Previous
	switch {
	case p != nil && p.SendsMayLand(e.now()):
		return nil, sendsMayLand(bt.Tunnel, p)
	case p != nil && !p.Current():
		return nil, fmt.Errorf("%s is %s, not current: a batch only rotates current tunnels", bt.Tunnel, p.State)
	}
	// As a single rotation's (generate): a key the tunnel already has is
	// refused, since setting it would rotate nothing.
	key, err := freshKey(ctx, VaultKeys{Policy: conn.Settings.PasswordPolicy, passwords: e.passwords}, p)
	if err != nil {
		return nil, err
	}
	a := &attempt{s: s, conn: conn, t: bt.Tunnel, previous: p, sched: p.Schedule(), trigger: trigger,
		key: key, source: store.KeySourceVault, listed: bt.Listed, batched: true}
	if err := e.begin(ctx, a); err != nil {
		return nil, fmt.Errorf("write the key of %s ahead: %w", bt.Tunnel, err)
	}
	return a, nil
}

// sendBatch sends batch's keys in one Set call and judges the answer; a
// batch Cloudflare finds too large is halved, each half sent in turn.
// fitted grows to the size of the largest part taken after such a refusal
// (split: batch is such a part). Each part's settle window is fixed from
// the moment it is sent (windowFromSend); a tunnel whose window could not
// be written is not sent.
func (e *Engine) sendBatch(ctx context.Context, conn Conn, batch []*attempt, fitted *int, split bool) []BatchResult {
	results := make([]BatchResult, len(batch))
	var sent []*attempt
	var index []int
	for i, a := range batch {
		if err := e.windowFromSend(ctx, a); err != nil {
			results[i] = e.notSent(ctx, a, err)
			continue
		}
		sent, index = append(sent, a), append(index, i)
	}
	if len(sent) == 0 {
		return results
	}
	keys := make([]cloudflare.PSKToSet, len(sent))
	for i, a := range sent {
		keys[i] = cloudflare.PSKToSet{TunnelID: a.t.TunnelID, PSK: a.key}
	}
	res, err := conn.Edge.SetPSKs(ctx, sent[0].t.AccountID, keys, false)
	var out []BatchResult
	switch {
	case cloudflare.BatchTooLarge(err) && len(sent) > 1:
		// Nothing of it was set: the same keys go again, fewer at once.
		// The records stay pending meanwhile, which is what they are.
		half := len(sent) / 2
		e.logger.Info("cloudflare refused a batch of keys as too large; sending it in halves",
			"account_id", sent[0].t.AccountID, "size", len(sent))
		out = append(e.sendBatch(ctx, conn, sent[:half], fitted, true), e.sendBatch(ctx, conn, sent[half:], fitted, true)...)
	case err != nil:
		out = e.batchFailed(ctx, conn, sent, err)
	default:
		if split {
			*fitted = max(*fitted, len(sent))
		}
		out = e.batchAnswered(ctx, conn, sent, res)
	}
	for j, r := range out {
		results[index[j]] = r
	}
	return results
}

// sendSlack is how far short of a request_timeout-derived window from its
// send a part's window may fall and still go as it is: writing a batch
// ahead takes a moment, which settleMargin already allows for; past this,
// the window is written again first.
const sendSlack = time.Second

// windowFromSend makes a's settle window run from now, its request's
// send: no request of it can land after SettleUntil only if the window is
// counted from the moment the request goes out, and a batch writes every
// key ahead before it sends any, a split batch's second half a whole
// request_timeout or more later. The window is pushed on, never shortened,
// and written before the send; LateLandingUntil, derived from it when the
// key is stored (lingering), follows.
func (e *Engine) windowFromSend(ctx context.Context, a *attempt) error {
	until := e.now().UTC().Add(settleWindow(a.conn.Settings))
	if !a.pending.SettleUntil.Before(until.Add(-sendSlack)) {
		return nil
	}
	pending := *a.pending
	pending.SettleUntil = until
	if err := store.WriteRecord(ctx, a.s, a.t, &pending); err != nil {
		return fmt.Errorf("write the settle window of %s before its key is sent: %w", a.t, err)
	}
	a.pending = &pending
	return nil
}

// notSent is the result of a tunnel whose key was not sent (err): a new
// key's record is put back as it was; a resend's stays pending as it was.
func (e *Engine) notSent(ctx context.Context, a *attempt, err error) BatchResult {
	if !a.resend {
		e.restore(context.WithoutCancel(ctx), a.s, a.t, a.previous)
	}
	return BatchResult{Outcome: BatchNotSent, Err: err}
}

// batchFailed judges a Set request that failed as a whole, as setFailed
// does a single key's: Cloudflare's refusal, or not sent at all, changed
// nothing and the records are put back, unless (a refusal only) the
// listing shows a tunnel's key changed since it was written ahead
// (refusedButChanged); anything else leaves every key maybe on the edge.
// A resend's refusal proves nothing of the earlier send: it stays pending,
// unless a 404 to the request and to a read of the tunnel say it is gone.
func (e *Engine) batchFailed(ctx context.Context, conn Conn, batch []*attempt, err error) []BatchResult {
	results := make([]BatchResult, len(batch))
	if !cloudflare.NoEffect(err) {
		for i, a := range batch {
			results[i] = BatchResult{Outcome: BatchPending, Err: e.keepForJob(ctx, a, err)}
		}
		return results
	}
	var listed map[string]*cloudflare.TunnelState
	var apiErr *cloudflare.APIError
	if errors.As(err, &apiErr) {
		// The refusal reached Cloudflare: something on the way that
		// retried a request whose answer it lost may pass on Cloudflare's
		// refusal of the retry. A listing that fails leaves the refusal
		// believed, as a read that fails does for a single key.
		listed = e.listAccount(ctx, conn, batch[0].t.AccountID)
	}
	for i, a := range batch {
		if a.resend {
			results[i] = e.resendRefused(ctx, a, listed, cloudflare.NotFound(err), err, nil)
			continue
		}
		if edge, ok := listed[a.t.TunnelID]; ok && edgeKeySince(a.pending, edge.PSKLastGeneratedOn) == keyChanged {
			results[i] = BatchResult{Outcome: BatchPending, Err: e.keepForJob(ctx, a, fmt.Errorf(
				"%w; but the edge's key changed since the request was sent, so something on the way may have sent it twice", err))}
			continue
		}
		e.restore(ctx, a.s, a.t, a.previous)
		results[i] = BatchResult{Outcome: BatchFailed, Err: err}
	}
	return results
}

// listAccount lists the account's tunnels by id; nil when the listing
// fails (logged).
func (e *Engine) listAccount(ctx context.Context, conn Conn, account string) map[string]*cloudflare.TunnelState {
	tunnels, err := conn.Edge.ListTunnels(ctx, account)
	if err != nil {
		e.logger.Warn("could not list the account's tunnels for a batch of keys", "account_id", account, "error", err)
		return nil
	}
	byID := make(map[string]*cloudflare.TunnelState, len(tunnels))
	for i := range tunnels {
		byID[tunnels[i].ID] = &tunnels[i]
	}
	return byID
}

// batchAnswered judges the answer to a Set request tunnel by tunnel.
// Unapplied tunnels are put back; whether Cloudflare still has them is
// learned from one listing of the account, where the single path reads
// each.
func (e *Engine) batchAnswered(ctx context.Context, conn Conn, batch []*attempt, res *cloudflare.SetPSKsResult) []BatchResult {
	if len(res.Unexpected) > 0 {
		e.logger.Warn("cloudflare's answer to a Set request names tunnels the engine did not send",
			"account_id", batch[0].t.AccountID, "tunnels", res.Unexpected)
	}
	results := make([]BatchResult, len(batch))
	var unapplied []int
	for i, a := range batch {
		r, _ := res.Tunnel(a.t.TunnelID)
		switch r.Outcome {
		case cloudflare.PSKApplied:
			// A new key is never the stored one (freshKey), so only a
			// resend can set the stored key again.
			rec, err := e.keyApplied(ctx, a, r)
			results[i] = BatchResult{Outcome: BatchStored, Record: rec, Err: err}
			if err != nil {
				results[i].Outcome = BatchPending // finish keeps it pending
			}
		case cloudflare.PSKUnapplied:
			if a.resend {
				unapplied = append(unapplied, i) // judged once the account is listed
				continue
			}
			e.restore(ctx, a.s, a.t, a.previous)
			results[i] = BatchResult{Outcome: BatchUnapplied, Reason: r.Reason, Err: &KeyRefusedError{tunnel: a.t, reason: r.Reason}}
			unapplied = append(unapplied, i)
		default:
			unknown := &cloudflare.MalformedResponseError{Op: cloudflare.OpSetPSKs, Reason: r.Reason}
			results[i] = BatchResult{Outcome: BatchPending, Err: e.keepForJob(ctx, a, unknown)}
		}
	}
	if len(unapplied) > 0 {
		listed := e.listAccount(ctx, conn, batch[0].t.AccountID)
		for _, i := range unapplied {
			a := batch[i]
			if a.resend {
				r, _ := res.Tunnel(a.t.TunnelID)
				results[i] = e.resendRefused(ctx, a, listed, true, nil, &KeyRefusedError{tunnel: a.t, reason: r.Reason, pending: true})
				continue
			}
			if _, ok := listed[a.t.TunnelID]; listed != nil && !ok {
				results[i].Outcome = BatchGone
			}
		}
	}
	return results
}

// keepForJob leaves a's key pending (keepPending), as the batch's job's to
// send again: it sends the pending keys of its batches together, one call
// for all, where the background pass would send each in a call of its own.
// So a key a first send left pending has RetryAt set a settle window on
// (no failure counted), which the background pass waits for and the job
// does not; a read still finishes it at once. A resend's failure backs off
// as keepPending notes it, for the job and the background pass alike.
func (e *Engine) keepForJob(ctx context.Context, a *attempt, cause error) error {
	if !a.resend {
		a.pending.RetryAt = e.now().UTC().Add(settleWindow(a.conn.Settings))
	}
	return e.keepPending(ctx, a, cause)
}

// resendRefused judges a resend Cloudflare refused: the whole request
// (err) or its key (refused, unapplied). As for a single resend
// (setFailed, keyUnapplied), it proves nothing of the earlier send, so the
// record stays pending, unless the tunnel is gone: where the request's
// answer may mean that (mayBeGone: a 404 to the request, or the key
// unapplied) and the account's listing does not name the tunnel, a read of
// the tunnel decides, and only its 404 records it gone (a read only for
// the tunnels the listing misses, not for each).
func (e *Engine) resendRefused(ctx context.Context, a *attempt, listed map[string]*cloudflare.TunnelState, mayBeGone bool, err error, refused *KeyRefusedError) BatchResult {
	cause := err
	if refused != nil {
		cause = refused
	}
	if _, ok := listed[a.t.TunnelID]; mayBeGone && listed != nil && !ok {
		if gone := e.resendGone(ctx, a, cause); gone != nil {
			reason := fmt.Sprint(err)
			if refused != nil {
				reason = refused.reason
			}
			return BatchResult{Outcome: BatchGone, Reason: reason, Err: gone}
		}
	}
	if refused == nil {
		return BatchResult{Outcome: BatchPending, Err: e.keepForJob(ctx, a, err)}
	}
	e.keepRefusedResend(ctx, a, refused)
	return BatchResult{Outcome: BatchPending, Err: refused}
}

// ListedFacts is what an account listing said of t, the router facts
// checked as those of every answer are (edgeFacts): all a bulk job keeps of
// a tunnel it takes under management until its first rotation, so that its
// entry is as bounded as a record.
func (e *Engine) ListedFacts(t store.Tunnel, edge *cloudflare.TunnelState) store.Facts {
	return e.edgeFacts(t, edge, store.Facts{})
}

// RotateUnmanaged gives t, a tunnel Vault holds no record of, its first
// key, as a first write does, from what an account listing said of it
// (listed: no read of the tunnel). The caller holds t's lock.
func (e *Engine) RotateUnmanaged(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, listed *cloudflare.TunnelState, trigger Trigger) (*store.Record, error) {
	return e.generate(ctx, &attempt{s: s, conn: conn, t: t, trigger: trigger, listed: listed})
}
