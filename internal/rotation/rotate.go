package rotation

// Rotation that never loses a PSK.
//
// Cloudflare activates a generated key before it answers and never shows it
// again, so any failure between "Cloudflare generated" and "Vault stored"
// leaves a live tunnel whose key nobody holds. The engine therefore writes
// the tunnel's record as rotation_unknown (and marks the tunnel unresolved)
// before it calls Cloudflare, and sets it back to current only once the new
// key is stored. Whatever happens in between, a crash included, the record
// says that Vault may not hold the edge's key.
//
// Reconciliation resolves an unknown outcome from Cloudflare's tunnel
// record, by Cloudflare's times alone: this node's clock may run seconds
// ahead of or behind Cloudflare's, so it is never held against them. The
// edge's psk_metadata.last_generated_on now is compared with the edge's key
// time known before the attempt. The same key proves the rotation did not
// happen; another means it did (or the key changed outside this engine),
// the stored key is stale, and (heal_stale_psk, on by default) a new key is
// generated and stored. Cloudflare promises whole seconds only, and an equal
// whole-second time proves the same key only where Cloudflare's clock had
// left that second before the attempt was sent (an answer's Date header
// says so) or the stored key was stored well before it. Whatever is not
// proven counts as a change, so a first rotation whose outcome is unknown
// is healed or flagged, never forgotten on a guess (judgeEdge).
// Reconciliation runs on the next read or write of the tunnel and in the
// background (internal/background/sweep.go), on the node that may write
// storage.
//
// Why not the SDK's write-ahead log (framework.PutWAL and WALRollback), as
// Vault's database engine uses for credentials it makes itself: a WAL entry
// carries what is needed to undo or redo an operation, and here the one thing
// that matters, the new key, is made by Cloudflare and exists nowhere until
// its answer arrives. No entry written before the call could carry it, and
// nothing can undo a generation. The record-plus-marker is the equivalent: it
// is written before the call, says that the outcome is unknown, and is
// resolved from the edge's own account of the tunnel instead of from a log.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/schedule"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// settleMargin widens a settle window for what the request_timeout does not
// cover: the storage writes between the window's start and the call, and
// the difference between the clocks of the node that started a rotation and
// the node that later reconciles it.
const settleMargin = 10 * time.Second

// settleWindow is how long after a rotation started an abandoned request of
// it may still change the edge's key: the caller gives up at
// request_timeout, and Cloudflare, which does not say how long it may still
// process a request after that, is assumed to take no longer than one more
// request_timeout. The window is fixed when the rotation starts (SettleUntil
// in the record), so a later change of request_timeout does not move it.
func settleWindow(s Settings) time.Duration { return 2*s.RequestTimeout + settleMargin }

// SettlingError refuses a new key while the last rotation's outcome is
// unknown and Cloudflare may still act on it: a new psk_generate now could be
// overtaken by the abandoned one, and Vault would call current a key the edge
// replaced a moment later.
type SettlingError struct {
	tunnel store.Tunnel
	until  time.Time
	// sameKey: a request carrying a key Vault made may still land; only a
	// different key has to wait. state is the record's then, and noKey
	// says Vault holds no key of the tunnel yet (a first rotation): what
	// the edge uses meanwhile is said from them.
	sameKey bool
	state   string
	noKey   bool
}

// sendsMayLand is the SettlingError for rec, whose window is open.
func sendsMayLand(t store.Tunnel, rec *store.Record) *SettlingError {
	return &SettlingError{tunnel: t, until: rec.SettleUntil, sameKey: rec.State != store.StateRotationUnknown, state: rec.State, noKey: rec.PSK == ""}
}

func (e *SettlingError) Error() string {
	if e.sameKey {
		return fmt.Sprintf("a request carrying a key Vault made for %s, abandoned earlier, may still reach Cloudflare until %s: "+
			"a different key sent before then could be replaced by it, so none is asked for before then (%s)",
			e.tunnel, store.FormatTime(e.until), e.meanwhile())
	}
	return fmt.Sprintf("the last rotation of %s has an unknown outcome, and Cloudflare may still process its request until %s "+
		"(a request abandoned at request_timeout can still be carried out): no new key is asked for before then; "+
		"reads warn meanwhile, and the engine resolves the outcome from Cloudflare after that time",
		e.tunnel, store.FormatTime(e.until))
}

// meanwhile says what the edge uses while a request of a key Vault made
// may still land, by the record's state: only a current record holds the
// edge's key.
func (e *SettlingError) meanwhile() string {
	switch {
	case e.state == store.StateCurrent:
		return "the key Vault holds is the edge's meanwhile"
	case e.state == store.StatePending && e.noKey:
		return "the tunnel's first rotation is pending: the edge uses the key written ahead or the key it had before, which Vault never held; " +
			"a read, a write or the background pass finishes the rotation by sending the key written ahead again"
	case e.state == store.StatePending:
		return "the rotation is pending: the edge uses the key written ahead or the stored key; " +
			"a read, a write or the background pass finishes it by sending the key written ahead again"
	}
	return fmt.Sprintf("the tunnel is %s: see state_reason for which key the edge uses", e.state)
}

// Write is an operator's write: it generates a new key for t and
// stores it. sched, when set, replaces the tunnel's schedule. The
// tunnel's lock is held from before the Cloudflare call until the key is
// stored, so concurrent rotations of one tunnel leave Vault with the key
// Cloudflare generated last.
func (e *Engine) Write(ctx context.Context, s logical.Storage, t store.Tunnel, sched *schedule.Schedule) (*store.Record, error) {
	conn, rec, unlock, err := e.beginWrite(ctx, s, t, true)
	if err != nil {
		return nil, err
	}
	defer unlock()
	a := &attempt{s: s, conn: conn, t: t, previous: rec, sched: rec.Schedule(), trigger: TriggerWrite}
	if sched != nil {
		a.sched = *sched
	}
	rotated, err := e.generate(ctx, a)
	if err != nil {
		var kept *pendingKeptError
		if outcomeUnknown(err) && !errors.As(err, &kept) {
			err = fmt.Errorf("%w; the outcome is unknown, so the tunnel is marked %s until reconciliation learns from Cloudflare whether its key changed", err, store.StateRotationUnknown)
		}
		if e.keySource(conn.Settings).Name() == store.KeySourceVault {
			return nil, fmt.Errorf("set a new psk for %s: %w", t, err)
		}
		return nil, fmt.Errorf("generate psk for %s: %w", t, err)
	}
	return rotated, nil
}

// attempt is one request for a new key of one tunnel, from the record
// written ahead to the key stored, and what it needs on the way.
type attempt struct {
	s    logical.Storage
	conn Conn
	t    store.Tunnel
	// previous is the tunnel's record as read under its lock (nil: none):
	// what is put back when the edge provably did nothing.
	previous *store.Record
	// sched is the tunnel's schedule from now on.
	sched   schedule.Schedule
	trigger Trigger
	// pending is the record written before the call (begin):
	// rotation_unknown, with the edge's key as the attempt started (or
	// pending, with the key Vault made).
	pending *store.Record
	// key is the key Vault made for the attempt ("": Cloudflare makes it),
	// source the key_source of the key stored, and resend says the attempt
	// finishes a pending record by sending its key again (vaultkeys.go).
	key    string
	source string
	resend bool
	// listed is, for a tunnel Vault holds no record of (previous nil),
	// what an account listing said of it moments before: the edge's key
	// time and the router facts a first rotation would otherwise read the
	// tunnel for (edgeBefore); for a record without router facts, where
	// its facts come from (a batch lists the account once: batch.go).
	// Nil: read it.
	listed *cloudflare.TunnelState
	// batched says a bulk job's batch begins the attempt (beginBatched):
	// its pending record counts failures from this attempt on, as the job
	// reads them to back off or give up its resends (routeOf).
	batched bool
}

// validateOnly reports whether the attempt only asks Cloudflare to
// validate (validate.go says why that runs under the same protocol).
func (a *attempt) validateOnly() bool { return a.trigger == TriggerValidate }

// what names the attempt in state reasons.
func (a *attempt) what() string {
	if a.validateOnly() {
		return "validate_only request (if the query string was dropped on the way, Cloudflare generates a key)"
	}
	return "rotation"
}

// rotateLocked generates a new key for t and stores it, keeping the
// tunnel's schedule. The caller holds t's lock and passes the tunnel's
// record as read under it (nil when none). trigger says who asked.
func (e *Engine) rotateLocked(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, previous *store.Record, trigger Trigger) (*store.Record, error) {
	if previous != nil && previous.AnswerHeld && trigger != TriggerWrite {
		// The last answer carried a key of the wrong form: asking again
		// by itself would only bring another (holdWrongKey).
		return nil, &answerHeldError{tunnel: t}
	}
	return e.generate(ctx, &attempt{s: s, conn: conn, t: t, previous: previous, sched: previous.Schedule(), trigger: trigger})
}

// generate is the protocol of one attempt: begin (the record written
// ahead), send (the key source asks the edge), finish (the key stored). A
// validation that generated nothing puts the record back and returns nil.
func (e *Engine) generate(ctx context.Context, a *attempt) (*store.Record, error) {
	if p := a.previous; p != nil && p.SendsMayLand(e.now()) {
		// A request of the engine's may still change the edge's key (a
		// key Vault made, finished while an earlier send of it was out):
		// a different key now could be replaced by it a moment later.
		return nil, sendsMayLand(a.t, p)
	}
	source := e.keySource(a.conn.Settings)
	key, err := freshKey(ctx, source, a.previous)
	if err != nil {
		return nil, err
	}
	if key != "" {
		return e.setNewKey(ctx, a, key)
	}
	a.source = source.Name()
	if err := e.begin(ctx, a); err != nil {
		return nil, err
	}
	answer, err := CloudflareKeys{}.Send(ctx, a.conn.Edge, a.t, a.validateOnly())
	if err != nil {
		// nil: a validation that provably generated nothing.
		return nil, e.sendFailed(ctx, a, err)
	}
	if a.validateOnly() {
		if answer.PSK == "" {
			e.restore(ctx, a.s, a.t, a.previous)
			return nil, nil
		}
		// A key in a validate_only answer: Cloudflare generated it (the
		// query string was dropped on the way) or merely showed one it
		// did not put into effect; Cloudflare does not document which.
		// Only the edge can tell, and the key is called current only if
		// the edge's key was generated when the answer says and is not
		// the one it had before this request.
		if done, err := e.confirmValidationKey(ctx, a, answer); done || err != nil {
			return nil, err
		}
	}
	return e.finish(ctx, a, answer)
}

// begin writes the attempt's record ahead of any request: rotation_unknown,
// with the edge's key as the attempt starts and the time after which none
// of its requests can land. Whatever happens next, a crash included, the
// record says that Vault may not hold the edge's key.
func (e *Engine) begin(ctx context.Context, a *attempt) error {
	a.pending = &store.Record{AccountID: a.t.AccountID, TunnelID: a.t.TunnelID}
	if a.previous != nil {
		copied := *a.previous
		a.pending = &copied
	}
	if err := e.edgeBefore(ctx, a); err != nil {
		return err
	}
	pending := a.pending
	if a.trigger == TriggerWrite {
		// An operator's write takes the tunnel back, from healing held for
		// drift (see mayHeal) and from a hold for a key of the wrong form
		// (holdWrongKey): this attempt's outcome decides anew, and a
		// refusal puts the held record back (restore). A validation asks
		// for no key and releases neither: if its outcome is lost,
		// reconciliation still heals nothing for a held tunnel.
		pending.HealHeld, pending.AnswerHeld = false, false
	}
	pending.State = store.StateRotationUnknown
	// Read before anything is written or sent, by this node's clock: no
	// request of the attempt can land after SettleUntil. (It is never held
	// against Cloudflare's times: see judgeEdge.)
	pending.RotationStartedAt = e.now().UTC()
	// The window is only ever extended: an earlier send's may still be
	// open (a validation of a key Vault made is sent within it, as it
	// carries the same key), and it was fixed from that send's own
	// request_timeout and this node's clock then. A window of today's
	// request_timeout (lowered since), or of a node whose clock is
	// behind, can end first, and a different key sent once it ends could
	// be replaced by the earlier request landing late.
	pending.SettleUntil = later(pending.SettleUntil, pending.RotationStartedAt.Add(settleWindow(a.conn.Settings)))
	pending.StateReason = fmt.Sprintf("a %s started at %s and has not finished", a.what(), store.FormatTime(pending.RotationStartedAt))
	pending.PendingPSK, pending.PendingTrigger = "", ""
	if a.batched {
		// A current record keeps the failures of its scheduled rotation
		// (RetryLater) until a success: copied, the job would take them for
		// failed resends of its own key and count it failed unsent.
		pending.ClearFailures()
	}
	if a.key != "" {
		// The key Vault made, written before any request carries it: a lost
		// answer is finished with it (vaultkeys.go).
		pending.State, pending.PendingPSK, pending.PendingTrigger = store.StatePending, a.key, string(a.trigger)
		pending.StateReason = fmt.Sprintf("a rotation with a key Vault made started at %s and Cloudflare has not confirmed it yet: "+
			"the edge uses that key or the one it had", store.FormatTime(pending.RotationStartedAt))
		if a.validateOnly() {
			pending.StateReason = fmt.Sprintf("a validate_only request with the stored key started at %s and has not finished "+
				"(if the query string was dropped on the way, the edge set the stored key again)", store.FormatTime(pending.RotationStartedAt))
		}
	}
	if err := store.MarkUnresolved(ctx, a.s, a.t); err != nil {
		return err
	}
	return store.WriteRecord(ctx, a.s, a.t, pending)
}

// edgeBefore records in the pending record what key the edge has as the
// attempt starts, by Cloudflare's own times (judgeEdge says why nothing
// else will do), and whether it is the stored one; and the tunnel's router
// facts where the record has none.
func (e *Engine) edgeBefore(ctx context.Context, a *attempt) error {
	previous, pending := a.previous, a.pending
	asked := false
	switch {
	case previous == nil || a.validateOnly():
		// A first rotation asks what key the edge has first: every real
		// tunnel is created with one, and only this proves later that an
		// attempt whose outcome was lost did not replace it. So does a
		// validation: only the edge's key before it tells a key the
		// validation made from one its answer merely showed
		// (confirmValidationKey), even where the stored key was replaced
		// outside this engine and the drift sweep has not seen it yet. A
		// tunnel taken under management from an account listing
		// (include_unmanaged) has what the listing said instead: a key
		// changed since only makes the judgement more cautious (a
		// change), never calls a key current.
		edge := a.listed
		if edge == nil || previous != nil {
			var err error
			if edge, err = a.conn.Edge.GetTunnel(ctx, a.t.AccountID, a.t.TunnelID); err != nil {
				return &notAttemptedError{err: err}
			}
		}
		asked = true
		pending.EdgeKeyBefore, pending.EdgeKeyBeforeSeenAt = edge.PSKLastGeneratedOn, edge.Date
		pending.EdgeKeyForeign = previous != nil && (!previous.Current() || !edge.PSKLastGeneratedOn.Equal(previous.LastGeneratedOn))
		// The same answer says what a router needs of the tunnel: kept
		// now, so that no later rotation has to ask (facts.go).
		pending.Facts = e.edgeFacts(a.t, edge, pending.Facts)
	case previous.Current():
		pending.EdgeKeyBefore, pending.EdgeKeyBeforeSeenAt = previous.LastGeneratedOn, previous.KeySeenAt
		pending.EdgeKeyForeign = false
	default:
		// A heal, or a write of a stale tunnel: the edge's key is one
		// Vault does not hold, which this attempt replaces. The record
		// keeps what its caller last learned of it.
		pending.EdgeKeyForeign = true
	}
	if previous != nil && !asked && previous.Facts == (store.Facts{}) {
		// A record that has no router facts (stored before they existed,
		// or a first read that failed to give them) gets them on its next
		// rotation, once: a read of the tunnel, as a first rotation makes.
		// If it fails the rotation goes on without them.
		edge, err := a.listed, error(nil)
		if edge == nil {
			edge, err = a.conn.Edge.GetTunnel(ctx, a.t.AccountID, a.t.TunnelID)
		}
		if err == nil {
			pending.Facts = e.edgeFacts(a.t, edge, pending.Facts)
		} else {
			e.TunnelLogger(a.t).Warn("could not read the tunnel's router facts before a rotation", "error", err)
		}
	}
	return nil
}

// sendFailed records what a failed request proves: nothing changed (the
// record is put back), the answer carried a key of the wrong form (the
// tunnel is held), or nothing is known (the record stays rotation_unknown
// and says why). It returns err, or what the caller should see instead:
// nil for a validation whose odd answer provably changed nothing.
func (e *Engine) sendFailed(ctx context.Context, a *attempt, err error) error {
	switch {
	case cloudflare.NoEffect(err) && e.refusedButChanged(ctx, a, err):
		// Cloudflare refused this request, yet the edge's key changed since
		// the attempt started: a gateway at base_url that retried a
		// request whose answer it lost passes on Cloudflare's refusal of
		// the retry, although the first copy may have made the key.
		a.pending.StateReason = fmt.Sprintf("Cloudflare refused the %s started at %s (%v), but the edge's key changed since it was sent: "+
			"something on the way may have sent it twice, so Cloudflare may use a key Vault does not hold", a.what(), store.FormatTime(a.pending.RotationStartedAt), err)
		if werr := store.WriteRecord(ctx, a.s, a.t, a.pending); werr != nil {
			e.TunnelLogger(a.t).Warn("could not record a rotation's unknown outcome", "error", werr)
		}
		return fmt.Errorf("%w; but the edge's key changed since the request was sent, so the tunnel is marked %s until reconciliation learns which key the edge uses: %w",
			err, store.StateRotationUnknown, ErrOutcomeUnknown)
	case cloudflare.NoEffect(err):
		// Cloudflare's refusal, its rate limit, or not sent at all (the
		// budget, Cloudflare's block): nothing changed.
		e.restore(ctx, a.s, a.t, a.previous)
	case cloudflare.WrongKeyForm(err) && a.validateOnly() && e.edgeUnchanged(ctx, a):
		// A validation's answer may merely show a key; where the edge
		// provably still has the key it had, nothing was made.
		e.TunnelLogger(a.t).Warn("a validate_only answer carried a key of the wrong form that the edge does not use; discarded")
		e.restore(ctx, a.s, a.t, a.previous)
		return nil
	case cloudflare.WrongKeyForm(err):
		return e.holdWrongKey(ctx, a, err)
	default:
		a.pending.StateReason = fmt.Sprintf("the %s started at %s failed with an unknown outcome (%v): Cloudflare may already use a key Vault does not hold",
			a.what(), store.FormatTime(a.pending.RotationStartedAt), err)
		if werr := store.WriteRecord(ctx, a.s, a.t, a.pending); werr != nil {
			e.TunnelLogger(a.t).Warn("could not record a rotation's unknown outcome", "error", werr)
		}
	}
	return err
}

// refusedButChanged reports whether a request Cloudflare refused may still
// have changed the edge's key: only where putting the record back would let
// Vault call current a key the edge may not use (the record was current, or
// it is a tunnel's first rotation, which would be forgotten), for a request
// that reached Cloudflare and could make a key (not a validation), when a
// read of the tunnel shows a key time other than the one the attempt
// started from. A record that was not current goes back as it was, which
// never calls a key current; and a read that fails, is refused, or cannot
// tell (the same whole second) leaves the refusal believed.
func (e *Engine) refusedButChanged(ctx context.Context, a *attempt, refusal error) bool {
	var apiErr *cloudflare.APIError
	if a.validateOnly() || !errors.As(refusal, &apiErr) || (a.previous != nil && !a.previous.Current()) {
		return false
	}
	edge, err := a.conn.Edge.GetTunnel(ctx, a.t.AccountID, a.t.TunnelID)
	return err == nil && edgeKeySince(a.pending, edge.PSKLastGeneratedOn) == keyChanged
}

// edgeUnchanged asks the edge whether its key is provably the one it had
// when the attempt started. Anything unproven, a failed read included, is
// false.
func (e *Engine) edgeUnchanged(ctx context.Context, a *attempt) bool {
	edge, err := a.conn.Edge.GetTunnel(ctx, a.t.AccountID, a.t.TunnelID)
	return err == nil && edgeKeySince(a.pending, edge.PSKLastGeneratedOn) == keyUnchanged
}

// finish stores the key the edge answered with, current, with the
// tunnel's next rotation, and tells the outside.
func (e *Engine) finish(ctx context.Context, a *attempt, answer *cloudflare.GeneratedPSK) (*store.Record, error) {
	pending, log := a.pending, e.TunnelLogger(a.t)
	rec := &store.Record{
		AccountID:       a.t.AccountID,
		TunnelID:        a.t.TunnelID,
		PSK:             answer.PSK,
		LastGeneratedOn: answer.LastGeneratedOn.UTC(),
		KeySeenAt:       answer.Date.UTC(),
		KeySource:       a.source,
		Version:         pending.Version + 1,
		StoredAt:        e.now().UTC(),
		State:           store.StateCurrent,
		RotationPeriod:  a.sched.Period,
		LastHealedAt:    pending.LastHealedAt,
		GoneLookedAt:    pending.GoneLookedAt,
		Facts:           e.withIPsecID(a.t, pending.Facts, answer.IPsecID),
	}
	if a.trigger == TriggerHeal {
		rec.LastHealedAt = rec.StoredAt
	}
	e.lingering(a, rec, answer.Date, answer.LastGeneratedOn)
	// The next rotation counts from this one: a period from now, a cron
	// expression's next time (a rotation late in its window does not make
	// the next one late); a schedule shorter than min_rotation_period (set
	// before the floor was raised) is held back to the floor.
	rec.RotationSchedule, rec.RotationWindow = a.sched.Cron, a.sched.Window
	if a.trigger == TriggerSchedule {
		rec.NextRotation, rec.WindowEnds = a.sched.NextAfterRotation(rec.StoredAt, rec.StoredAt, a.conn.Settings.MinRotationPeriod)
	} else {
		rec.NextRotation, rec.WindowEnds = a.sched.NextAfterUnscheduled(rec.StoredAt, a.conn.Settings.MinRotationPeriod)
	}
	notes, err := store.SaveScheduled(ctx, a.s, rec, pending.NextRotation, true)
	for _, note := range notes {
		log.Warn("after a rotation", "error", note)
	}
	if err != nil {
		// Cloudflare answered, so no request of this rotation can still
		// land: a next write need not wait out the settle window. Best
		// effort; storage has just failed.
		pending.SettleUntil = e.now().UTC()
		if a.previous != nil {
			// Earlier sends of a key Vault made may still land.
			pending.SettleUntil = later(a.previous.SettleUntil, pending.SettleUntil)
		}
		_ = store.WriteRecord(context.WithoutCancel(ctx), a.s, a.t, pending)
		if a.key != "" {
			// The key was written ahead: the record stays pending, and
			// the next read, write or background pass sets it again and
			// stores it.
			return nil, &pendingKeptError{err: fmt.Errorf("cloudflare applied the key Vault made for %s, but Vault could not store the result: %w", a.t, err)}
		}
		return nil, e.lostKey(a.t, err)
	}
	if !rec.NextRotation.IsZero() {
		// The scheduler plans its sleep from the entries it last saw; this
		// one may fall due before the time it woke for.
		e.scheduled()
	}
	e.rotated(rec, a.trigger)
	if err := store.ClearUnresolved(ctx, a.s, a.t); err != nil {
		// The record is current; a marker left behind is cleared by the
		// next background pass.
		log.Warn("could not clear an unresolved mark", "error", err)
	}
	log.Info("psk rotated", "version", rec.Version)
	return rec, nil
}

// holdWrongKey records an answer that said Cloudflare generated a key and
// carried one that is not of the form Cloudflare issues (letters and digits;
// templates paste the key into router configurations, where anything else
// could end a quoted string or a line). The key is not stored. The answer
// says the edge changed its key, so the record is stale; and since whatever
// sent it (Cloudflare changing its keys, or something else answering at
// base_url, which an admin who supplies their own api_token may point
// anywhere) may answer the same way to every request, the tunnel is held:
// nothing generates a key for it by itself, which would otherwise heal it
// once a minute for ever, until an operator writes it (AnswerHeld). It
// returns the error for the caller, which names Cloudflare and base_url.
func (e *Engine) holdWrongKey(ctx context.Context, a *attempt, cause error) error {
	s, t, pending := a.s, a.t, a.pending
	held := *pending
	held.AnswerHeld = true
	// Cloudflare answered: no request of this attempt can land later. An
	// earlier send's window still open is kept (markStale keeps it).
	held.SettleUntil = time.Time{}
	if a.previous != nil {
		held.SettleUntil = a.previous.SettleUntil
	}
	reason := fmt.Sprintf("the answer to the %s started at %s carried a key Vault did not store (%v), so the edge probably uses a key nobody holds. "+
		"Check what answers at base_url (config) before an operator writes this path: the engine generates no key for this tunnel by itself "+
		"(no heal, no scheduled or bulk rotation) until then",
		a.what(), store.FormatTime(pending.RotationStartedAt), cause)
	// Cloudflare answered, so no request of this attempt can still land:
	// markStale clears the settle window (unless an earlier send's is
	// still open), and the background has nothing to retry.
	if _, err := e.markStale(ctx, s, t, &held, reason, time.Time{}); err != nil {
		e.TunnelLogger(t).Warn("could not record an answer with a key of the wrong form; the record stays rotation_unknown", "error", err)
	}
	return fmt.Errorf("%w; the key was not stored: the tunnel is marked %s and the engine generates no key for it by itself "+
		"until an operator writes this path. Check what answers at base_url (config): it may not be Cloudflare's API", cause, store.StateStale)
}

// answerHeldError refuses a rotation the engine would make by itself (a
// heal, a scheduled or a bulk rotation) for a tunnel held by holdWrongKey.
type answerHeldError struct{ tunnel store.Tunnel }

func (e *answerHeldError) Error() string {
	return fmt.Sprintf("no key is asked for %s except by an operator's write of its path: Cloudflare's answer to its last rotation "+
		"carried a key of the wrong form (see state_reason); check what answers at base_url (config) first", e.tunnel)
}

// confirmValidationKey asks the edge whether the key a validate_only answer
// carried is in use. It returns done when it is not known to be (the record
// is put back where the edge provably still has the key it had before the
// request, or else left rotation_unknown), so the caller stores nothing.
func (e *Engine) confirmValidationKey(ctx context.Context, a *attempt, generated *cloudflare.GeneratedPSK) (bool, error) {
	s, conn, t, previous, pending := a.s, a.conn, a.t, a.previous, a.pending
	log := e.TunnelLogger(t)
	edge, err := conn.Edge.GetTunnel(ctx, t.AccountID, t.TunnelID)
	if err != nil {
		pending.StateReason = fmt.Sprintf("a validate_only answer started at %s carried a key, and Cloudflare could not be asked whether it is in use (%v)",
			store.FormatTime(pending.RotationStartedAt), err)
		if werr := store.WriteRecord(ctx, s, t, pending); werr != nil {
			log.Warn("could not record a validation's unknown outcome", "error", werr)
		}
		return true, fmt.Errorf("confirm the key of a validate_only answer: %w", err)
	}
	generatedOn := edge.PSKLastGeneratedOn
	var why string
	switch edgeKeySince(pending, generatedOn) {
	case keyUnchanged:
		// The edge's key is the one it had before: nothing was generated.
		log.Warn("a validate_only answer carried a key the edge does not use; discarded")
		e.restore(ctx, s, t, previous)
		return true, nil
	case keyChanged:
		if generatedOn.Equal(generated.LastGeneratedOn) {
			return false, nil // generated for this request, and in use: store it
		}
		why = "is neither the key it had before the request nor, by its time, the key the answer carried"
	default:
		why = "carries the same whole second as the key it had before the request, and nothing Cloudflare said proves that second had passed before the request was sent: " +
			"Cloudflare's times cannot tell whether the request replaced that key"
	}
	pending.StateReason = fmt.Sprintf("a validate_only request started at %s had an answer that carried a key generated at %s; the edge's key, generated at %s, %s",
		store.FormatTime(pending.RotationStartedAt), store.FormatTime(generated.LastGeneratedOn), store.FormatTime(generatedOn), why)
	if werr := store.WriteRecord(ctx, s, t, pending); werr != nil {
		log.Warn("could not record a validation's unknown outcome", "error", werr)
	}
	return true, fmt.Errorf("%s; the tunnel is marked %s until reconciliation learns which key the edge uses", pending.StateReason, store.StateRotationUnknown)
}

// restore puts back the record a rotation that certainly did not happen had
// replaced. A failure leaves the record rotation_unknown, which
// reconciliation resolves.
func (e *Engine) restore(ctx context.Context, s logical.Storage, t store.Tunnel, previous *store.Record) {
	var err error
	switch {
	case previous == nil:
		err = store.ForgetRecord(ctx, s, t, nil)
	default:
		err = store.WriteRecord(ctx, s, t, previous)
		if err == nil && previous.Current() {
			err = store.ClearUnresolved(ctx, s, t)
		}
	}
	if err != nil {
		e.TunnelLogger(t).Warn("could not restore a record after a refused rotation", "error", err)
	}
}

// lostKey is what the caller is told when a key Cloudflare has already
// activated could not be stored (storage was retried, because giving up
// loses the key): the record stays rotation_unknown, so the next write or
// reconciliation heals it.
func (e *Engine) lostKey(t store.Tunnel, err error) error {
	e.TunnelLogger(t).Error("cloudflare activated a new psk that vault could not store", "error", err)
	return fmt.Errorf("cloudflare generated and activated a new psk for %s, but Vault could not store it (%w); "+
		"the tunnel is marked rotation_unknown, and once Cloudflare can no longer act on this rotation (settle_until in metadata) "+
		"the next write, read or background reconciliation generates and stores a new key", t, err)
}

// beginWrite starts an operator's write of t (a rotation, or a
// validate_only request, which may turn into one): it takes t's lock, which
// the caller releases with unlock, and reads the tunnel's record. A
// psk_generate after an unknown outcome is sent only once Cloudflare has told
// what became of the last one: the write is the operator's, so it does not
// heal (it generates anyway), but it must not act on a guess; while the last
// rotation may still land, this is a 409 (SettlingError).
//
// rotating says the write asks for a new key (not a validation): a pending
// key whose resend Cloudflare did not apply, once no earlier send of it can
// land (its window closed), then no longer stops it (refusedResendPassed).
func (e *Engine) beginWrite(ctx context.Context, s logical.Storage, t store.Tunnel, rotating bool) (conn Conn, rec *store.Record, unlock func(), err error) {
	if conn, err = e.connect(ctx, s); err != nil {
		return Conn{}, nil, nil, err
	}
	unlock = e.Lock(t)
	if rec, err = store.ReadRecord(ctx, s, t); err == nil && rec != nil && !rec.Current() {
		if rec, err = e.reconcileLocked(ctx, s, conn, t, rec, false); err != nil {
			if rotating && e.refusedResendPassed(rec, err) {
				e.TunnelLogger(t).Warn("the pending key's resend was not applied and no earlier send of it can land any more: the write sets a different key",
					"error", err)
				err = nil
			} else {
				err = fmt.Errorf("learn the outcome of the last rotation of %s: %w", t, err)
			}
		}
	}
	if err != nil {
		unlock()
		return Conn{}, nil, nil, err
	}
	return conn, rec, unlock, nil
}

// refusedResendPassed reports whether an operator's write may set a new key
// although the pending key of rec could not be finished: Cloudflare
// answered its resend, and did not apply it (unapplied_psks; "psk already
// in use" is one reason it may give), and the window of every earlier send
// of it has closed. The edge then uses that key or the one before, and no
// request of the engine's can change it any more: a different key the edge
// echoes is the edge's key, whichever it replaced, and one it does not
// apply puts the pending record back. Without this a resend refused for
// good would refuse every write for ever. A resend with no answer opens a
// window of its own (finishPending), so it never passes here until that
// closes and an answered one is refused.
func (e *Engine) refusedResendPassed(rec *store.Record, err error) bool {
	var refused *KeyRefusedError
	return errors.As(err, &refused) && refused.pending && !TunnelGone(err) &&
		rec != nil && rec.State == store.StatePending && !rec.SendsMayLand(e.now())
}

// notAttemptedError is a failure before anything was written or a key asked
// for (the read before a first rotation or a validation): nothing is
// marked, nothing can have changed at the edge.
type notAttemptedError struct{ err error }

func (e *notAttemptedError) Error() string {
	return fmt.Sprintf("read the tunnel's key time before asking for a key (no key was asked for): %v", e.err)
}
func (e *notAttemptedError) Unwrap() error { return e.err }

// outcomeUnknown reports whether a failed rotation's outcome is unknown:
// Cloudflare may have generated a key, and the record says so.
func outcomeUnknown(err error) bool {
	var notAttempted *notAttemptedError
	return cloudflare.IsCloudflare(err) && !cloudflare.NoEffect(err) && !cloudflare.WrongKeyForm(err) && !errors.As(err, &notAttempted)
}
