package main

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
// background (sweep.go), on the node that may write storage.
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
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/schedule"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

const (
	// storeAttempts is how often a value that exists nowhere else is
	// offered to storage before the engine gives up on it.
	storeAttempts = 4
	// storeDeadline bounds the storing of a value that exists nowhere else.
	storeDeadline = 10 * time.Second
	// rotateEventType is the event a stored rotation sends.
	rotateEventType = "cloudflare-ipsec/psk-rotate"
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
func settleWindow(cfg *configRecord) time.Duration { return 2*cfg.RequestTimeout + settleMargin }

// settlingError refuses a new key while the last rotation's outcome is
// unknown and Cloudflare may still act on it: a new psk_generate now could be
// overtaken by the abandoned one, and Vault would call current a key the edge
// replaced a moment later.
type settlingError struct {
	tunnel store.Tunnel
	until  time.Time
}

func (e *settlingError) Error() string {
	return fmt.Sprintf("the last rotation of %s has an unknown outcome, and Cloudflare may still process its request until %s "+
		"(a request abandoned at request_timeout can still be carried out): no new key is asked for before then; "+
		"reads warn meanwhile, and the engine resolves the outcome from Cloudflare after that time",
		e.tunnel, store.FormatTime(e.until))
}

// rotateOnWrite is an operator's write: it generates a new key for t and
// stores it. sched, when set, replaces the tunnel's schedule. The
// tunnel's lock is held from before the Cloudflare call until the key is
// stored, so concurrent rotations of one tunnel leave Vault with the key
// Cloudflare generated last.
func (b *backend) rotateOnWrite(ctx context.Context, s logical.Storage, t store.Tunnel, sched *schedule.Schedule) (*store.Record, error) {
	client, cfg, rec, unlock, err := b.beginWrite(ctx, s, t)
	if err != nil {
		return nil, err
	}
	defer unlock()
	next := rec.Schedule()
	if sched != nil {
		next = *sched
	}
	rotated, err := b.generateLocked(ctx, s, client, cfg, t, rec, next, "write", false)
	if err != nil {
		if outcomeUnknown(err) {
			err = fmt.Errorf("%w; the outcome is unknown, so the tunnel is marked %s until reconciliation learns from Cloudflare whether its key changed", err, store.StateRotationUnknown)
		}
		return nil, fmt.Errorf("generate psk for %s: %w", t, err)
	}
	return rotated, nil
}

// rotateLocked generates a new key for t and stores it. period is the
// tunnel's rotation period from now on: its record's RotationPeriod keeps
// the tunnel's schedule as it is (a rotation_schedule included), another
// value replaces it with that period (0: none). The caller holds t's lock
// and passes the tunnel's record as read under it (nil when none). trigger
// says who asked (write, schedule, bulk, heal) for the rotation event.
func (b *backend) rotateLocked(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t store.Tunnel, previous *store.Record, period time.Duration, trigger string) (*store.Record, error) {
	if previous != nil && previous.HeldByAnswer() && trigger != "write" {
		// The last answer carried a key of the wrong form: asking again
		// by itself would only bring another (holdWrongKey).
		return nil, &answerHeldError{tunnel: t}
	}
	sched := previous.Schedule()
	if period != sched.Period {
		sched = schedule.Schedule{Period: period}
	}
	return b.generateLocked(ctx, s, client, cfg, t, previous, sched, trigger, false)
}

// generateLocked is rotateLocked's protocol, for a rotation or, with
// validateOnly, for a validate_only request (validate.go says why that runs
// under the same protocol). A validation that generated nothing puts the
// record back and returns nil. sched is the tunnel's schedule from now on.
func (b *backend) generateLocked(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t store.Tunnel, previous *store.Record, sched schedule.Schedule, trigger string, validateOnly bool) (*store.Record, error) {
	period := sched.Period
	what := "rotation"
	if validateOnly {
		what = "validate_only request (if the query string was dropped on the way, Cloudflare generates a key)"
	}
	pending := &store.Record{AccountID: t.AccountID, TunnelID: t.TunnelID}
	if previous != nil {
		copied := *previous
		pending = &copied
	}
	// What key the edge has as the attempt starts, by Cloudflare's own
	// times (judgeEdge says why nothing else will do), and whether it is
	// the stored one.
	asked := false
	switch {
	case previous == nil || validateOnly:
		// A first rotation asks what key the edge has first: every real
		// tunnel is created with one, and only this proves later that an
		// attempt whose outcome was lost did not replace it. So does a
		// validation: only the edge's key before it tells a key the
		// validation made from one its answer merely showed
		// (confirmValidationKey), even where the stored key was replaced
		// outside this engine and the drift sweep has not seen it yet.
		edge, err := client.GetTunnel(ctx, t.AccountID, t.TunnelID)
		if err != nil {
			return nil, &notAttemptedError{err: err}
		}
		asked = true
		pending.EdgeKeyBefore, pending.EdgeKeyBeforeSeenAt = edge.PSKLastGeneratedOn, edge.Date
		pending.EdgeKeyForeign = previous != nil && (!previous.Current() || !edge.PSKLastGeneratedOn.Equal(previous.LastGeneratedOn))
		// The same answer says what a router needs of the tunnel: kept
		// now, so that no later rotation has to ask (facts.go).
		pending.Facts = b.edgeFacts(t, edge, pending.Facts)
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
		if edge, err := client.GetTunnel(ctx, t.AccountID, t.TunnelID); err == nil {
			pending.Facts = b.edgeFacts(t, edge, pending.Facts)
		} else {
			b.tunnelLogger(t).Warn("could not read the tunnel's router facts before a rotation", "error", err)
		}
	}
	if trigger == "write" {
		// An operator's write takes the tunnel back (see mayHeal).
		pending.HealHeld = false
	}
	// Whoever got here was allowed to ask (rotateLocked holds back all but
	// an operator's write): this attempt's outcome decides anew, and a
	// refusal puts the held record back (restore).
	pending.AnswerHeld = false
	pending.State = store.StateRotationUnknown
	// Read before anything is written or sent, by this node's clock: no
	// request of the attempt can land after SettleUntil. (It is never held
	// against Cloudflare's times: see judgeEdge.)
	pending.RotationStartedAt = b.now().UTC()
	pending.SettleUntil = pending.RotationStartedAt.Add(settleWindow(cfg))
	pending.StateReason = fmt.Sprintf("a %s started at %s and has not finished", what, store.FormatTime(pending.RotationStartedAt))
	if err := store.MarkUnresolved(ctx, s, t); err != nil {
		return nil, err
	}
	if err := store.WriteRecord(ctx, s, t, pending); err != nil {
		return nil, err
	}

	generated, err := client.GeneratePSK(ctx, t.AccountID, t.TunnelID, validateOnly)
	if err != nil {
		switch {
		case cloudflare.NoEffect(err):
			b.restore(ctx, s, t, previous)
		case cloudflare.WrongKeyForm(err):
			return nil, b.holdWrongKey(ctx, s, t, pending, what, err)
		default:
			pending.StateReason = fmt.Sprintf("the %s started at %s failed with an unknown outcome (%v): Cloudflare may already use a key Vault does not hold",
				what, store.FormatTime(pending.RotationStartedAt), err)
			if werr := store.WriteRecord(ctx, s, t, pending); werr != nil {
				b.tunnelLogger(t).Warn("could not record a rotation's unknown outcome", "error", werr)
			}
		}
		return nil, err
	}
	if validateOnly && generated.PSK == "" {
		b.restore(ctx, s, t, previous)
		return nil, nil
	}
	if validateOnly {
		// A key in a validate_only answer: Cloudflare generated it (the
		// query string was dropped on the way) or merely showed one it
		// did not put into effect; Cloudflare does not document which.
		// Only the edge can tell, and the key is called current only if
		// the edge's key was generated when the answer says and is not
		// the one it had before this request.
		if done, err := b.confirmValidationKey(ctx, s, client, t, previous, pending, generated); done || err != nil {
			return nil, err
		}
	}

	rec := &store.Record{
		AccountID:       t.AccountID,
		TunnelID:        t.TunnelID,
		PSK:             generated.PSK,
		LastGeneratedOn: generated.LastGeneratedOn.UTC(),
		KeySeenAt:       generated.Date.UTC(),
		Version:         pending.Version + 1,
		StoredAt:        b.now().UTC(),
		State:           store.StateCurrent,
		RotationPeriod:  period,
		LastHealedAt:    pending.LastHealedAt,
		Facts:           b.withIPsecID(t, pending.Facts, generated.IPsecID),
	}
	if trigger == "heal" {
		rec.LastHealedAt = rec.StoredAt
	}
	// The next rotation counts from this one: a period from now, a cron
	// expression's next time (a rotation late in its window does not make
	// the next one late); a schedule shorter than min_rotation_period (set
	// before the floor was raised) is held back to the floor.
	rec.RotationSchedule, rec.RotationWindow = sched.Cron, sched.Window
	if next, windowEnds := sched.NextAfterRotation(rec.StoredAt, rec.StoredAt, cfg.minRotationPeriod()); !next.IsZero() {
		rec.NextRotation, rec.WindowEnds = next, windowEnds
		// Scheduled before the record is stored: an entry without a due
		// record is dropped by the scheduler, a due record without an
		// entry would never rotate.
		if err := store.ScheduleRotation(ctx, s, t, rec.NextRotation, false); err != nil {
			b.tunnelLogger(t).Warn("could not schedule the next rotation", "error", err)
		}
	}
	if err := b.storeGenerated(ctx, s, t, rec); err != nil {
		// Cloudflare answered, so no request of this rotation can still
		// land: a next write need not wait out the settle window. Best
		// effort; storage has just failed.
		pending.SettleUntil = b.now().UTC()
		_ = store.WriteRecord(context.WithoutCancel(ctx), s, t, pending)
		return nil, err
	}
	if !pending.NextRotation.IsZero() && !pending.NextRotation.Equal(rec.NextRotation) {
		if err := store.UnscheduleSuperseded(ctx, s, t, pending.NextRotation, rec.NextRotation); err != nil {
			b.tunnelLogger(t).Warn("could not drop a superseded schedule entry", "error", err)
		}
	}
	if !rec.NextRotation.IsZero() {
		// The scheduler plans its sleep from the entries it last saw; this
		// one may fall due before the time it woke for.
		b.pokeScheduler()
	}
	// Events are best effort and go to Vault over a round trip of their
	// own, so they do not hold up the answer.
	go b.sendRotateEvent(context.WithoutCancel(ctx), rec, trigger)
	if err := store.ClearUnresolved(ctx, s, t); err != nil {
		// The record is current; a marker left behind is cleared by the
		// next background pass.
		b.tunnelLogger(t).Warn("could not clear an unresolved mark", "error", err)
	}
	b.tunnelLogger(t).Info("psk rotated", "version", rec.Version)
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
func (b *backend) holdWrongKey(ctx context.Context, s logical.Storage, t store.Tunnel, pending *store.Record, what string, cause error) error {
	held := *pending
	held.AnswerHeld = true
	reason := fmt.Sprintf("the answer to the %s started at %s carried a key Vault did not store (%v), so the edge probably uses a key nobody holds. "+
		"Check what answers at base_url (config) before an operator writes this path: the engine generates no key for this tunnel by itself "+
		"(no heal, no scheduled or bulk rotation) until then",
		what, store.FormatTime(pending.RotationStartedAt), cause)
	// Cloudflare answered, so no request of this attempt can still land:
	// markStale clears the settle window, and the background has nothing
	// to retry.
	if _, err := b.markStale(ctx, s, t, &held, reason, time.Time{}); err != nil {
		b.tunnelLogger(t).Warn("could not record an answer with a key of the wrong form; the record stays rotation_unknown", "error", err)
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
func (b *backend) confirmValidationKey(ctx context.Context, s logical.Storage, client *cloudflare.Client, t store.Tunnel, previous, pending *store.Record, generated *cloudflare.GeneratedPSK) (bool, error) {
	log := b.tunnelLogger(t)
	edge, err := client.GetTunnel(ctx, t.AccountID, t.TunnelID)
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
		b.restore(ctx, s, t, previous)
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
func (b *backend) restore(ctx context.Context, s logical.Storage, t store.Tunnel, previous *store.Record) {
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
		b.tunnelLogger(t).Warn("could not restore a record after a refused rotation", "error", err)
	}
}

// storeGenerated stores a key Cloudflare has already activated. Storage is
// retried, because giving up loses the key; when it still fails the record
// stays rotation_unknown, so the next write or reconciliation heals it.
func (b *backend) storeGenerated(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record) error {
	entry, err := logical.StorageEntryJSON(t.StorageKey(), rec)
	if err == nil {
		if err = putRetrying(ctx, s, entry); err == nil {
			return nil
		}
	}
	b.tunnelLogger(t).Error("cloudflare activated a new psk that vault could not store", "error", err)
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
// rotation may still land, this is a 409 (settlingError).
func (b *backend) beginWrite(ctx context.Context, s logical.Storage, t store.Tunnel) (client *cloudflare.Client, cfg *configRecord, rec *store.Record, unlock func(), err error) {
	if client, cfg, err = b.cloudflareClient(ctx, s); err != nil {
		return nil, nil, nil, nil, err
	}
	unlock = b.lockTunnel(t)
	if rec, err = store.ReadRecord(ctx, s, t); err == nil && rec != nil && !rec.Current() {
		if rec, err = b.reconcileLocked(ctx, s, client, cfg, t, rec, false); err != nil {
			err = fmt.Errorf("learn the outcome of the last rotation of %s: %w", t, err)
		}
	}
	if err != nil {
		unlock()
		return nil, nil, nil, nil, err
	}
	return client, cfg, rec, unlock, nil
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

// edgeVerdict is what Cloudflare's time of generation for a tunnel's key
// proves about a record that is not current.
type edgeVerdict int

const (
	// edgeUsesStoredKey: no key was generated after the stored one; the
	// rotation in question (if any) did not happen.
	edgeUsesStoredKey edgeVerdict = iota
	// edgeNeverRotated: the tunnel's first rotation by this engine did not
	// happen; Vault holds no key and must not make one.
	edgeNeverRotated
	// edgeChanged: the edge uses a key Vault does not hold, made by the
	// rotation in question or outside this engine, or nothing proves
	// otherwise.
	edgeChanged
)

// keyChange is what Cloudflare's times prove about whether the edge's key
// is still the one an earlier answer showed.
type keyChange int

const (
	// keyUndecided: nothing proves either.
	keyUndecided keyChange = iota
	// keyUnchanged: the edge's key is the one it had.
	keyUnchanged
	// keyChanged: the edge's key is another.
	keyChanged
)

// wholeSecond is the coarsest precision of Cloudflare's times: all it
// promises for last_generated_on, and all a Date header has.
const wholeSecond = time.Second

// keyChangeSince compares the edge's last_generated_on now with before, its
// last_generated_on in an earlier answer of Cloudflare's that Cloudflare
// dated seenAt (zero: unknown). Both are Cloudflare's times, and nothing
// else is ever held against them: this node's clock may run seconds ahead
// of or behind Cloudflare's. laterKeysDiffer says that it is known
// otherwise that any key generated since carries a later time than before.
//
// A time other than before is another key: a later one obviously, and an
// earlier one too, since the edge cannot be using a key older than the one
// it had (its keys only replace each other forwards). An equal time is the
// same key where it has a sub-second part (sameGeneration). At whole-second
// precision, which is all Cloudflare promises, two keys made within one
// second share their time; an equal time then proves the same key only if
// Cloudflare's clock had left before's second when before was seen: a key
// generated after that answer carries a later second. The Date header is
// whole seconds, truncated, so Date >= before+1s says just that.
func keyChangeSince(now, before, seenAt time.Time, laterKeysDiffer bool) keyChange {
	switch {
	case !now.Equal(before):
		return keyChanged
	case now.IsZero():
		return keyUnchanged // no key then, no key now
	case sameGeneration(now, before),
		laterKeysDiffer,
		!seenAt.IsZero() && !seenAt.Before(before.Add(wholeSecond)):
		return keyUnchanged
	}
	return keyUndecided
}

// edgeKeySince judges, for a record whose last attempt is unresolved,
// whether the edge's key (last_generated_on now) is the one it had when the
// attempt was sent.
func edgeKeySince(r *store.Record, now time.Time) keyChange {
	return keyChangeSince(now, r.EdgeKeyBefore, r.EdgeKeyBeforeSeenAt, fromStoredKey(r) && storedLongBefore(r))
}

// fromStoredKey reports whether the record's last attempt started from the
// stored key, current at the edge.
func fromStoredKey(r *store.Record) bool { return r.PSK != "" && !r.EdgeKeyForeign }

// storedLongBefore reports whether the stored key was stored at least
// settleMargin and a second before the attempt started. Both times are
// Vault's, perhaps of two nodes (a failover between), whose clocks differ
// by less than settleMargin as the settle window assumes, so at least a
// second passed in truth. Cloudflare generated the stored key before it was
// stored and any key of the attempt after the attempt started, so their
// last_generated_on differ by at least a second and cannot share one. This
// is the proof for records stored before KeySeenAt existed, and for a key
// whose own answer was dated in its second of generation, as most are.
func storedLongBefore(r *store.Record) bool {
	return !r.StoredAt.IsZero() && !r.RotationStartedAt.IsZero() &&
		!r.StoredAt.After(r.RotationStartedAt.Add(-settleMargin-wholeSecond))
}

// judgeEdge decides what the edge's last_generated_on (edgeGenerated) says
// about rec, a record that is not current; for edgeChanged it also says
// why. For a rotation_unknown record it asks whether the edge's key changed
// since the attempt was sent (edgeKeySince), by Cloudflare's times alone.
// The caller calls it only after the rotation's settle window, when no
// request of it can still land.
//
// Unchanged proves the attempt did not happen: the record goes back to the
// stored key, or, for a first rotation, the tunnel is as it was before the
// engine touched it; where the edge's key was already one Vault does not
// hold (a heal), it still is. Changed, and what no time can decide (two keys
// in one whole second with nothing to prove the second had passed), is taken
// as a change: the rotation somebody asked for is healed in (or the record
// flagged stale) rather than call a replaced key current or forget a key
// the edge may use. A first rotation whose outcome is unknown is therefore
// never forgotten on a guess.
func judgeEdge(rec *store.Record, edgeGenerated time.Time) (edgeVerdict, string) {
	if rec.State == store.StateRotationUnknown {
		started := store.FormatTime(rec.RotationStartedAt)
		if rec.EdgeKeyForeign {
			// Changed or not, the edge's key is not one Vault holds.
			return edgeChanged, fmt.Sprintf("the rotation that started at %s was to replace a key Vault does not hold, and its key was never stored: Cloudflare's key, generated at %s, is that one or the rotation's, so %s",
				started, keyTime(edgeGenerated), notTheEdgesKey(rec))
		}
		switch edgeKeySince(rec, edgeGenerated) {
		case keyUnchanged:
			if rec.PSK == "" {
				return edgeNeverRotated, ""
			}
			return edgeUsesStoredKey, ""
		case keyChanged:
			return edgeChanged, fmt.Sprintf("Cloudflare's key was generated at %s, and the key it had when the rotation that started at %s was sent was generated at %s: that rotation (or a change outside this engine) replaced it and its key was never stored, so %s",
				store.FormatTime(edgeGenerated), started, keyTime(rec.EdgeKeyBefore), notTheEdgesKey(rec))
		}
		return edgeChanged, fmt.Sprintf("Cloudflare's key was generated at %s, in the same whole second as the key it had when the rotation that started at %s was sent, and nothing Cloudflare said proves that this second had passed before the rotation was sent: "+
			"Cloudflare's times cannot tell whether the rotation replaced that key, so it is taken to have, and %s",
			store.FormatTime(edgeGenerated), started, notTheEdgesKey(rec))
	}
	if rec.PSK != "" && keyChangeSince(edgeGenerated, rec.LastGeneratedOn, rec.KeySeenAt, false) == keyUnchanged {
		// A tunnel found gone that is back, say, with the stored key.
		return edgeUsesStoredKey, ""
	}
	// A first rotation already found to have happened, or a key that is
	// not (provably) the stored one: changed outside this engine.
	return edgeChanged, fmt.Sprintf("Cloudflare's key, generated at %s, is not provably the stored key (%s): it was changed outside this engine, so %s",
		keyTime(edgeGenerated), store.OrNever(rec.LastGeneratedOn), notTheEdgesKey(rec))
}

// keyTime renders the edge's time of generation in a reason.
func keyTime(t time.Time) string {
	if t.IsZero() {
		return "never (the tunnel had no key)"
	}
	return store.FormatTime(t)
}

// notTheEdgesKey ends a reason that the edge uses a key Vault does not hold.
func notTheEdgesKey(r *store.Record) string {
	if r.PSK == "" {
		return "the edge uses a key Vault has never held"
	}
	return "the stored key is not the one the edge uses"
}

// sameGeneration reports whether two last_generated_on values prove one and
// the same generation: equal, and with a sub-second part, which only an edge
// that keeps fine precision can produce (two generations do not share a
// microsecond). Equal whole-second times prove nothing by themselves.
func sameGeneration(a, b time.Time) bool {
	return !a.IsZero() && a.Equal(b) && a.Nanosecond() != 0
}

// reconcileLocked resolves a record that is not current by asking
// Cloudflare when the tunnel's key was generated. heal allows it to generate
// a new key when the stored one turns out stale. The caller holds t's lock.
// It returns the record as it stands afterwards: nil when the tunnel's only
// rotation turned out never to have happened. While the record's last
// rotation is still settling it returns a *settlingError and asks Cloudflare
// nothing: no answer could settle the question before then.
func (b *backend) reconcileLocked(ctx context.Context, s logical.Storage, client *cloudflare.Client, cfg *configRecord, t store.Tunnel, rec *store.Record, heal bool) (*store.Record, error) {
	if rec.Current() || rec.HeldByAnswer() {
		// A held record waits for an operator's write, which generates
		// anyway; nothing Cloudflare says now would release it.
		return rec, nil
	}
	log := b.tunnelLogger(t)
	if rec.Settling(b.now()) {
		return rec, &settlingError{tunnel: t, until: rec.SettleUntil}
	}
	edge, err := client.GetTunnel(ctx, t.AccountID, t.TunnelID)
	if cloudflare.NotFound(err) {
		gone, werr := b.markGone(ctx, s, t, rec)
		if werr != nil {
			return rec, werr
		}
		return gone, fmt.Errorf("reconcile %s: %w", t, err)
	}
	if err != nil {
		return rec, fmt.Errorf("reconcile %s: %w", t, err)
	}

	verdict, reason := judgeEdge(rec, edge.PSKLastGeneratedOn)
	switch verdict {
	case edgeNeverRotated:
		log.Info("first rotation never happened; nothing is stored")
		return nil, store.ForgetRecord(ctx, s, t, rec)
	case edgeUsesStoredKey:
		resolved := *rec
		resolved.State, resolved.StateReason, resolved.RotationStartedAt, resolved.SettleUntil = store.StateCurrent, "", time.Time{}, time.Time{}
		resolved.ClearFailures()
		if edge.Date.After(resolved.KeySeenAt) {
			// A later answer that shows the stored key in use: a proof
			// for the next rotation's judgement (keyChangeSince).
			resolved.KeySeenAt = edge.Date
		}
		if err := store.WriteRecord(ctx, s, t, &resolved); err != nil {
			return rec, err
		}
		if err := store.ClearUnresolved(ctx, s, t); err != nil {
			return &resolved, err
		}
		log.Info("reconciled: cloudflare's key is the stored one")
		return &resolved, nil
	}

	// The edge uses a key Vault does not hold: the tunnel is down until
	// both sides share one.
	if rec.State == store.StateStale {
		reason = rec.StateReason // still what it was found to be
	}
	if heal {
		if b.mayHeal(cfg, rec) {
			log.Warn("reconciled: cloudflare's key is not the stored one; generating a new key")
			healing := *rec
			healing.EdgeKeyBefore, healing.EdgeKeyBeforeSeenAt = edge.PSKLastGeneratedOn, edge.Date
			return b.rotateLocked(ctx, s, client, cfg, t, &healing, rec.RotationPeriod, "heal")
		}
		return b.holdHealing(ctx, s, t, rec, reason)
	}
	return b.markStale(ctx, s, t, rec, reason, b.now().Add(store.FailureBackoffMax))
}

// mayHeal reports whether the engine may generate a key, by itself, for a
// tunnel whose stored key the edge no longer uses. The unknown outcome of the
// engine's own rotation is healed at once: that key was asked for. Drift is
// healed once; drift found again within two drift_check_intervals of that
// heal (the sweep runs once per interval, so at the very next look) is the
// mark of another mount or tool rotating the same tunnel, and healing it
// would start the two rotating each other's keys away, for ever. Such a
// tunnel is held (HealHeld) until an operator writes it.
func (b *backend) mayHeal(cfg *configRecord, rec *store.Record) bool {
	switch {
	case rec.HealHeld:
		return false
	case rec.State == store.StateRotationUnknown, rec.LastHealedAt.IsZero():
		return true
	}
	return !b.now().Before(rec.LastHealedAt.Add(2 * cfg.driftInterval()))
}

// holdHealing records drift the engine will not heal by itself (see
// mayHeal): the record is stale and held until an operator writes it.
func (b *backend) holdHealing(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record, reason string) (*store.Record, error) {
	held := *rec
	if !(rec.HealHeld && rec.State == store.StateStale) {
		// Said once: a tunnel already held keeps its reason, which the
		// background's hourly look would otherwise append again each time.
		reason += "; not healed: the engine already healed this tunnel within the last two drift_check_intervals, so another mount or tool rotates it too. " +
			"A tunnel must belong to one mount: the engine leaves it stale until an operator writes this path"
	}
	held.HealHeld = true
	return b.markStale(ctx, s, t, &held, reason, b.now().Add(store.FailureBackoffMax))
}

// markStale records that the edge uses a key Vault does not hold. The
// background looks at the tunnel again at retryAt: when healing is allowed
// again, or (healing off) after store.FailureBackoffMax, to find out whether the
// tunnel is gone meanwhile.
func (b *backend) markStale(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record, reason string, retryAt time.Time) (*store.Record, error) {
	stale := *rec
	stale.State, stale.StateReason = store.StateStale, reason
	stale.RotationStartedAt, stale.SettleUntil = time.Time{}, time.Time{}
	stale.ClearFailures()
	stale.RetryAt = retryAt.UTC()
	if err := store.MarkUnresolved(ctx, s, t); err != nil {
		return rec, err
	}
	if err := store.WriteRecord(ctx, s, t, &stale); err != nil {
		return rec, err
	}
	b.tunnelLogger(t).Warn("stored psk is stale", "reason", reason)
	return &stale, nil
}

// markGone records that Cloudflare no longer knows the tunnel. The last key
// is kept, never served as current, and the tunnel leaves the unresolved
// set: there is nothing left to reconcile until someone writes it again.
func (b *backend) markGone(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record) (*store.Record, error) {
	gone := *rec
	gone.State = store.StateTunnelGone
	gone.StateReason = fmt.Sprintf("Cloudflare answered at %s that the tunnel does not exist (deleted, or the API token lost its account): the stored key is kept but is not in use",
		store.FormatTime(b.now()))
	gone.RotationStartedAt, gone.SettleUntil = time.Time{}, time.Time{}
	gone.ClearFailures()
	if err := store.WriteRecord(ctx, s, t, &gone); err != nil {
		return rec, err
	}
	if err := store.ClearUnresolved(ctx, s, t); err != nil {
		return &gone, err
	}
	b.tunnelLogger(t).Warn("tunnel no longer exists at cloudflare")
	return &gone, nil
}

// putRetrying stores an entry that exists nowhere else (a key Cloudflare
// already activated, a token value Cloudflare already rolled): a storage
// error is retried with backoff before it is given up on.
func putRetrying(ctx context.Context, s logical.Storage, entry *logical.StorageEntry) error {
	// The caller giving up (a client that disconnects, a deadline that
	// passes just after Cloudflare answered) must not stop the value being
	// stored: it is detached from the caller's cancellation, with a bound
	// of its own.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeDeadline)
	defer cancel()
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := s.Put(ctx, entry)
		if err == nil || attempt == storeAttempts {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

// sendRotateEvent tells subscribers (Vault Enterprise's event bus) that a
// tunnel has a new key, and where to read it. The event carries no secret. On Vault Community
// there is no bus and the call does nothing.
func (b *backend) sendRotateEvent(ctx context.Context, rec *store.Record, trigger string) {
	t := store.Tunnel{AccountID: rec.AccountID, TunnelID: rec.TunnelID}
	// path and data_path are relative to the mount: Vault prepends the
	// mount's path before subscribers see them, and checks a subscriber's
	// read capability on data_path, as for its own engines' events.
	err := logical.SendEvent(ctx, b, rotateEventType,
		logical.EventMetadataPath, t.StorageKey(),
		logical.EventMetadataDataPath, t.StorageKey(),
		logical.EventMetadataModified, "true",
		logical.EventMetadataOperation, "update",
		"account_id", rec.AccountID,
		"tunnel_id", rec.TunnelID,
		"version", strconv.Itoa(rec.Version),
		"last_generated_on", store.FormatTime(rec.LastGeneratedOn),
		"trigger", trigger)
	if err != nil && !errors.Is(err, framework.ErrNoEvents) {
		b.Logger().Debug("could not send rotation event", "error", err)
	}
}
