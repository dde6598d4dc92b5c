package rotation

// Keys Vault makes (config key_source vault).
//
// With psk_generate Cloudflare makes the key and shows it once, so a lost
// answer leaves the edge with a key nobody holds until a heal makes yet
// another (rotate.go). A key the engine makes exists before any request
// carries it: the engine writes it ahead into the tunnel's record (state
// pending, PendingPSK; psk/ is seal-wrapped), then asks the edge to take it
// with Cloudflare's Set operation, whose answer echoes the key for each
// tunnel it applied. From there:
//
//   - applied (the key echoed): the record is current with the key;
//   - unapplied (Cloudflare's reason): the edge kept its key; the record is
//     put back as it was, and the caller learns the reason;
//   - Cloudflare's refusal of the whole request, its rate limit, or not
//     sent at all: nothing changed; the record is put back;
//   - anything else (no answer, a 5xx, a timeout, an answer that proves
//     nothing, the plugin killed): the record stays pending, and a read, a
//     write or the background pass finishes the rotation by sending the
//     same key again (finishPending). Setting a key the edge already has
//     is harmless, so no settle window is waited out and no second key is
//     made: the echo of the resend decides. The finish is the rotation its
//     trigger asked for: a scheduled or bulk retry that finishes it makes
//     no other (RotateNow).
//
// What the same key still needs: a request of it abandoned earlier can land
// after the rotation was finished, until SettleUntil. It carries the same
// key, so the edge keeps Vault's key, but Cloudflare re-dates
// last_generated_on. Hence two rules. No different key is sent before
// SettleUntil (generate's guard, a SettlingError): the late request would
// replace it, and Vault would call current a key the edge no longer uses.
// And a re-dated time up to LateLandingUntil (SettleUntil carried over to
// Cloudflare's clock, or the time a validation's answer gave the key:
// validate.go) is not taken for drift: a listing concludes nothing, and
// the drift sweep sets the stored key again where healing is allowed, or
// marks the tunnel stale and says why (lateLanding).

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// VaultKeys has the engine make every key: by default 32 letters and
// digits from crypto/rand, the form of Cloudflare's own keys, or from a
// Vault password policy.
type VaultKeys struct {
	// Policy names the Vault password policy keys are made from ("": none).
	Policy string
	// passwords is the system view's GeneratePasswordFromPolicy.
	passwords func(ctx context.Context, policy string) (string, error)
}

// Name is "vault".
func (VaultKeys) Name() string { return store.KeySourceVault }

// MakeKey makes a key and checks its form (KeyProblem): a policy that
// makes a key no router template can carry fails here, before anything is
// written or sent.
func (v VaultKeys) MakeKey(ctx context.Context) (string, error) {
	if v.Policy == "" {
		return randomKey()
	}
	if v.passwords == nil {
		return "", &KeyPolicyError{Policy: v.Policy, Problem: "this mount cannot use password policies"}
	}
	key, err := v.passwords(ctx, v.Policy)
	if err != nil {
		return "", &KeyPolicyError{Policy: v.Policy, Problem: fmt.Sprintf("Vault could not generate a password from it (%v)", err)}
	}
	if problem := KeyProblem(key); problem != "" {
		return "", &KeyPolicyError{Policy: v.Policy, Problem: "it made a key that " + problem}
	}
	return key, nil
}

// freshKey has source make the key of a rotation of the tunnel whose
// record is previous ("" when the edge makes it), and refuses a key the
// tunnel has or may have: the stored key or the pending one. A policy can
// make the same key twice (a small alphabet and length, or a policy that
// always makes one), and a rotation that set the stored key again would
// change nothing while saying it rotated: no new version, no event, and a
// scheduled rotation whose next time never moved. The error names the
// policy, never the key; nothing is written or sent.
func freshKey(ctx context.Context, source KeySource, previous *store.Record) (string, error) {
	key, err := source.MakeKey(ctx)
	if err != nil || key == "" || previous == nil {
		return key, err
	}
	if key == previous.PSK || key == previous.PendingPSK {
		policy := ""
		if v, ok := source.(VaultKeys); ok {
			policy = v.Policy
		}
		return "", &KeyPolicyError{Policy: policy, Problem: "it made the key the tunnel already has (the stored key, or the one pending), " +
			"and a rotation must change the key: its keys repeat, so make them longer or from more characters"}
	}
	return key, nil
}

// keySource is the source of the key an attempt under settings makes.
func (e *Engine) keySource(settings Settings) KeySource {
	if settings.KeySource == store.KeySourceVault {
		return VaultKeys{Policy: settings.PasswordPolicy, passwords: e.passwords}
	}
	return CloudflareKeys{}
}

// KeyPolicyError is a key the configured password policy could not make,
// or made in a form the engine does not send. Nothing was written or sent.
// It names the policy, never the key.
type KeyPolicyError struct {
	Policy  string
	Problem string
}

func (e *KeyPolicyError) Error() string {
	if e.Policy == "" {
		// The engine's own generator (crypto/rand): never expected here.
		return fmt.Sprintf("the engine's key generator (no password_policy): %s; nothing was sent to Cloudflare and nothing changed", e.Problem)
	}
	return fmt.Sprintf("password_policy %q (config): %s; nothing was sent to Cloudflare and nothing changed", e.Policy, e.Problem)
}

// The form of a key Vault makes: 16 to 128 letters and digits. Cloudflare
// takes more (printable ASCII), but the key goes into router
// configurations through the shipped templates (docs/examples), and the
// IOS XE one, whose pre-shared-key has no quoting, renders only letters and
// digits: a key every template carries is one of these.
const (
	minKeyLength     = 16
	maxKeyLength     = 128
	defaultKeyLength = 32
	keyAlphabet      = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
)

// KeyProblem says what keeps key from being one the engine sends, without
// quoting it: "" when nothing does.
func KeyProblem(key string) string {
	var problems []string
	if len(key) < minKeyLength || len(key) > maxKeyLength {
		problems = append(problems, fmt.Sprintf("has %d characters, not %d to %d", len(key), minKeyLength, maxKeyLength))
	}
	if strings.ContainsFunc(key, func(r rune) bool { return !strings.ContainsRune(keyAlphabet, r) }) {
		problems = append(problems, "has characters other than letters and digits, which the IOS XE template cannot carry")
	}
	return strings.Join(problems, ", and ")
}

// randomKey is defaultKeyLength characters of keyAlphabet from crypto/rand.
// A byte at or above the largest multiple of the alphabet's size that fits
// is drawn again, so that every character is equally likely.
func randomKey() (string, error) {
	const limit = 256 - 256%len(keyAlphabet)
	key := make([]byte, 0, defaultKeyLength)
	buf := make([]byte, 2*defaultKeyLength)
	for len(key) < defaultKeyLength {
		if _, err := rand.Read(buf); err != nil {
			return "", fmt.Errorf("make a key: read crypto/rand: %w", err)
		}
		for _, b := range buf {
			if int(b) < limit && len(key) < defaultKeyLength {
				key = append(key, keyAlphabet[int(b)%len(keyAlphabet)])
			}
		}
	}
	return string(key), nil
}

// KeyRefusedError is Cloudflare's answer that it did not apply a key Vault
// made (unapplied_psks), with its reason. The edge keeps its key.
type KeyRefusedError struct {
	tunnel store.Tunnel
	reason string
	// pending: an earlier request of the same key may have landed, so the
	// record stays pending; otherwise it was put back as it was.
	pending bool
}

func (e *KeyRefusedError) Error() string {
	if e.pending {
		return fmt.Sprintf("cloudflare did not apply the key Vault made for %s when it was sent again (%s): an earlier request of it may still have landed, "+
			"so the tunnel stays pending and the engine sends the same key again later; once no earlier request of it can land (settle_until), "+
			"a write sets a different key instead", e.tunnel, e.reason)
	}
	return fmt.Sprintf("cloudflare did not apply the key Vault made for %s (%s): the tunnel keeps its key, and nothing was stored", e.tunnel, e.reason)
}

// KeyRefused reports whether err is Cloudflare's refusal of a key Vault made.
func KeyRefused(err error) bool {
	var refused *KeyRefusedError
	return errors.As(err, &refused)
}

// pendingKeptError is a failure after which the key Vault made may be on
// the edge: the record stays pending, and the same key finishes it. For a
// validation (validation), the key is the stored one and is never sent
// again for real (finishValidation).
type pendingKeptError struct {
	err        error
	validation bool
}

func (e *pendingKeptError) Error() string {
	if e.validation {
		return fmt.Sprintf("%v; the outcome is unknown: the stored key was written ahead and the tunnel is marked %s "+
			"(a query string dropped on the way would have set the stored key again); the key is not sent again: "+
			"a read, a write or the background pass reads the tunnel and the drift rules decide", e.err, store.StatePending)
	}
	return fmt.Sprintf("%v; the outcome is unknown: the key Vault made was written ahead and the tunnel is marked %s, "+
		"and a read, a write or the background pass finishes the rotation by sending the same key again", e.err, store.StatePending)
}
func (e *pendingKeptError) Unwrap() error { return e.err }

// setNewKey is the protocol of one attempt with a key Vault made: written
// ahead (begin, state pending), set on the edge, and judged by the answer.
func (e *Engine) setNewKey(ctx context.Context, a *attempt, key string) (*store.Record, error) {
	a.key, a.source = key, store.KeySourceVault
	if err := e.begin(ctx, a); err != nil {
		return nil, err
	}
	res, err := a.conn.Edge.SetPSKs(ctx, a.t.AccountID, []cloudflare.PSKToSet{{TunnelID: a.t.TunnelID, PSK: key}}, false)
	return e.keySent(ctx, a, res, err)
}

// finishPending finishes a pending record (rec, read under t's lock) by
// sending its key again. The record's settle window is pushed on first, and
// written, so that it covers this request too should its answer be lost.
// A validation's pending record is never sent for real (finishValidation).
func (e *Engine) finishPending(ctx context.Context, s logical.Storage, conn Conn, t store.Tunnel, rec *store.Record) (*store.Record, error) {
	if rec.PendingPSK == "" {
		return rec, fmt.Errorf("finish the pending rotation of %s: the record holds no pending key", t)
	}
	trigger := Trigger(rec.PendingTrigger)
	if trigger == TriggerValidate {
		// Callers that know whether they may heal (reconcileLocked)
		// come here only for a rotation's key; any other (ReturnGone)
		// heals as heal_stale_psk says, as the drift sweep does.
		return e.finishValidation(ctx, s, conn, t, rec, conn.Settings.HealStalePSK)
	}
	if trigger == "" {
		trigger = TriggerWrite
	}
	a := &attempt{s: s, conn: conn, t: t, previous: rec, sched: rec.Schedule(), trigger: trigger,
		key: rec.PendingPSK, source: store.KeySourceVault, resend: true}
	pending := *rec
	pending.SettleUntil = later(rec.SettleUntil, e.now().UTC().Add(settleWindow(conn.Settings)))
	if pending.State == store.StateTunnelGone {
		// Found gone with its key pending (MarkGone), and asked of again:
		// pending once more, and marked so, until the answer decides.
		pending.State = store.StatePending
		pending.StateReason = fmt.Sprintf("a rotation with a key Vault made, started at %s, was found gone before Cloudflare confirmed it: "+
			"the key is being set again, and the edge uses it or the one it had", store.FormatTime(pending.RotationStartedAt))
		if err := store.MarkUnresolved(ctx, s, t); err != nil {
			return rec, fmt.Errorf("finish the pending rotation of %s: %w", t, err)
		}
	}
	a.pending = &pending
	if err := store.WriteRecord(ctx, s, t, &pending); err != nil {
		return rec, fmt.Errorf("finish the pending rotation of %s: %w", t, err)
	}
	res, err := conn.Edge.SetPSKs(ctx, t.AccountID, []cloudflare.PSKToSet{{TunnelID: t.TunnelID, PSK: a.key}}, false)
	finished, err := e.keySent(ctx, a, res, err)
	if err != nil {
		err = fmt.Errorf("finish the pending rotation of %s with its key: %w", t, err)
		if latest, rerr := store.ReadRecord(context.WithoutCancel(ctx), s, t); rerr == nil && latest != nil {
			return latest, err // pending still, or recorded gone
		}
		return a.pending, err
	}
	e.TunnelLogger(t).Info("pending rotation finished with the key written ahead", "version", finished.Version)
	return finished, nil
}

// keySent judges the answer to a Set request that carried a.key for a.t.
func (e *Engine) keySent(ctx context.Context, a *attempt, res *cloudflare.SetPSKsResult, err error) (*store.Record, error) {
	if err != nil {
		return nil, e.setFailed(ctx, a, err)
	}
	if len(res.Unexpected) > 0 {
		e.TunnelLogger(a.t).Warn("cloudflare's answer to a Set request names tunnels the engine did not send", "tunnels", res.Unexpected)
	}
	r, _ := res.Tunnel(a.t.TunnelID)
	switch r.Outcome {
	case cloudflare.PSKApplied:
		return e.keyApplied(ctx, a, r)
	case cloudflare.PSKUnapplied:
		return nil, e.keyUnapplied(ctx, a, r.Reason)
	}
	unknown := &cloudflare.MalformedResponseError{Op: cloudflare.OpSetPSKs, Reason: r.Reason}
	return nil, e.keepPending(ctx, a, unknown)
}

// setFailed records what a Set request that failed as a whole proves.
// Cloudflare's refusal of a first send changed nothing (the record is put
// back), unless the edge's key changed since (refusedButChanged: something
// on the way may have sent it twice). A resend's refusal proves nothing of
// the earlier send. Anything else leaves the key maybe on the edge.
//
// A 404 to the Set operation, which is the account's and not one tunnel's,
// says nothing of the tunnel (TunnelGone is false for it). A resend so
// refused asks the tunnel itself: only a 404 for it records the tunnel
// gone, as a refused resend's read does (keyUnapplied); else it stays
// pending.
func (e *Engine) setFailed(ctx context.Context, a *attempt, err error) error {
	if cloudflare.NoEffect(err) && !a.resend && !e.refusedButChanged(ctx, a, err) {
		e.restore(ctx, a.s, a.t, a.previous)
		return err
	}
	if a.resend && cloudflare.NotFound(err) {
		if gone := e.resendGone(ctx, a, err); gone != nil {
			return gone
		}
	}
	return e.keepPending(ctx, a, err)
}

// resendGone reads the tunnel whose pending key's resend was refused
// (cause) and, when the read answers 404 too, records it gone and returns
// why; nil when the tunnel is there (or the read failed otherwise).
func (e *Engine) resendGone(ctx context.Context, a *attempt, cause error) error {
	_, gerr := a.conn.Edge.GetTunnel(ctx, a.t.AccountID, a.t.TunnelID)
	if !cloudflare.NotFound(gerr) {
		return nil
	}
	if _, merr := e.MarkGone(context.WithoutCancel(ctx), a.s, a.t, a.pending); merr != nil {
		e.TunnelLogger(a.t).Warn("could not record that the tunnel is gone", "error", merr)
	}
	// The read's 404 first, so that TunnelGone sees it.
	return fmt.Errorf("%w (the resend of the pending key was refused too: %v)", gerr, cause)
}

// keyApplied stores a's key, which Cloudflare's answer r says it applied:
// the stored key set again, or a new one.
func (e *Engine) keyApplied(ctx context.Context, a *attempt, r cloudflare.TunnelPSKResult) (*store.Record, error) {
	if a.previous != nil && a.key == a.previous.PSK {
		return e.finishSameKey(ctx, a, r)
	}
	return e.finish(ctx, a, &cloudflare.GeneratedPSK{PSK: a.key, LastGeneratedOn: r.LastGeneratedOn, IPsecID: r.IPsecID, Date: r.Date})
}

// TunnelGone reports whether err says that Cloudflare does not have the
// tunnel: a 404 to a call about that tunnel (a read of it, psk_generate).
// A 404 to the Set operation, whose path is the account's, does not: the
// operation may be unavailable to the account, or the token out of it for
// a while, so it is never read as one tunnel gone.
func TunnelGone(err error) bool {
	var apiErr *cloudflare.APIError
	return errors.As(err, &apiErr) && apiErr.HTTPStatus == http.StatusNotFound && apiErr.Op != cloudflare.OpSetPSKs
}

// keepPending leaves the record pending with why, and returns the error
// for the caller. A resend that failed backs the background off (a read
// still tries at once: Resolve); a rate limit is no fault of the
// tunnel's.
func (e *Engine) keepPending(ctx context.Context, a *attempt, cause error) error {
	what := "the rotation"
	if a.resend {
		what = "sending the key again"
	}
	a.pending.StateReason = fmt.Sprintf("the rotation with a key Vault made, started at %s, has an unknown outcome: %s failed (%v); "+
		"the edge uses that key or the one it had", store.FormatTime(a.pending.RotationStartedAt), what, cause)
	if a.validateOnly() {
		a.pending.StateReason = fmt.Sprintf("a validate_only request with the stored key, started at %s, has an unknown outcome (%v): "+
			"the edge uses the stored key (set again if the query string was dropped on the way) or a key changed outside this engine; "+
			"the key is not sent again: the next read, write or background pass reads the tunnel and the drift rules decide",
			store.FormatTime(a.pending.RotationStartedAt), cause)
	}
	if a.resend && cloudflare.RetryAfter(cause) == 0 {
		a.pending.NoteFailure(e.now(), cause)
	}
	if werr := store.WriteRecord(context.WithoutCancel(ctx), a.s, a.t, a.pending); werr != nil {
		e.TunnelLogger(a.t).Warn("could not record a pending rotation's unknown outcome", "error", werr)
	}
	return &pendingKeptError{err: cause, validation: a.validateOnly()}
}

// keyUnapplied records Cloudflare's answer that it did not apply the key. A
// first send changed nothing: the record is put back. A resend proves
// nothing of the earlier send: the record stays pending and backs off. A
// tunnel Cloudflare no longer has (a read of it is 404) is said so
// (NotFound), for the caller to record it gone; a pending one is recorded
// gone here, or it would be sent again at every pass.
func (e *Engine) keyUnapplied(ctx context.Context, a *attempt, reason string) error {
	refused := &KeyRefusedError{tunnel: a.t, reason: reason, pending: a.resend}
	if _, err := a.conn.Edge.GetTunnel(ctx, a.t.AccountID, a.t.TunnelID); cloudflare.NotFound(err) {
		if !a.resend {
			e.restore(ctx, a.s, a.t, a.previous)
		} else if _, gerr := e.MarkGone(context.WithoutCancel(ctx), a.s, a.t, a.pending); gerr != nil {
			e.TunnelLogger(a.t).Warn("could not record that the tunnel is gone", "error", gerr)
		}
		return fmt.Errorf("%w: %w", refused, err)
	}
	if a.resend {
		e.keepRefusedResend(ctx, a, refused)
		return refused
	}
	e.restore(ctx, a.s, a.t, a.previous)
	return refused
}

// keepRefusedResend records a resend of a's pending key that Cloudflare
// answered without applying it: the key stays pending. Answered, so this
// request cannot land later: only the windows of earlier sends remain
// (finishPending pushed it on for this one), and once they close a write
// may set a different key (refusedResendPassed).
func (e *Engine) keepRefusedResend(ctx context.Context, a *attempt, refused error) {
	a.pending.SettleUntil = a.previous.SettleUntil
	a.pending.NoteFailure(e.now(), refused)
	a.pending.StateReason = fmt.Sprintf("the rotation with a key Vault made, started at %s, has an unknown outcome: %v",
		store.FormatTime(a.pending.RotationStartedAt), refused)
	if err := store.WriteRecord(context.WithoutCancel(ctx), a.s, a.t, a.pending); err != nil {
		e.TunnelLogger(a.t).Warn("could not record a refused resend", "error", err)
	}
}

// finishSameKey records the stored key set again (drift that may be the
// engine's own late request, or a validation the edge may have taken for a
// real call): the record is current with the edge's new time for it. No
// new key, so no new version, event or schedule.
func (e *Engine) finishSameKey(ctx context.Context, a *attempt, r cloudflare.TunnelPSKResult) (*store.Record, error) {
	rec := *a.pending
	rec.State, rec.StateReason, rec.PendingPSK, rec.PendingTrigger = store.StateCurrent, "", "", ""
	rec.RotationStartedAt = time.Time{}
	rec.LastGeneratedOn, rec.KeySeenAt = r.LastGeneratedOn.UTC(), r.Date.UTC()
	rec.ClearFailures()
	e.lingering(a, &rec, r.Date, r.LastGeneratedOn)
	// The key is the one the record held: a bound it already had (an
	// earlier send's, or a validation's answer: validate.go) is this
	// key's own, and still bounds what those requests may re-date. Only
	// here: a different key's record never inherits it (finish).
	rec.LateLandingUntil = later(rec.LateLandingUntil, a.previous.LateLandingUntil)
	if err := store.WriteRecord(context.WithoutCancel(ctx), a.s, a.t, &rec); err != nil {
		return nil, fmt.Errorf("store %s after its key was set again: %w", a.t, err)
	}
	if err := store.ClearUnresolved(ctx, a.s, a.t); err != nil {
		e.TunnelLogger(a.t).Warn("could not clear an unresolved mark", "error", err)
	}
	e.TunnelLogger(a.t).Info("stored psk set again at the edge")
	return &rec, nil
}

// lingering keeps on rec, stored current after an answer that set the key
// (dated answered by Cloudflare's clock; generatedOn when the answer has no
// Date), the settle window of requests of the same key sent before the
// one answered: they may still land, so no different key goes before
// SettleUntil, and a re-dated key up to LateLandingUntil is not drift. The
// answered request itself cannot land later, so its own window is dropped;
// an earlier send's never is, nor shortened: both windows only ever grow
// (begin). Without earlier sends still out, both are cleared.
//
// The bound is rec's key's own. A bound the record held before is kept
// only where the key is the same (finishSameKey): for a new key it was the
// replaced key's, whose requests cannot land any more (no different key is
// sent while they may: generate's guard), and kept it would take a key
// changed outside the engine within it for the new key re-dated.
func (e *Engine) lingering(a *attempt, rec *store.Record, answered, generatedOn time.Time) {
	now := e.now().UTC()
	rec.SettleUntil, rec.LateLandingUntil = time.Time{}, time.Time{}
	if a.previous == nil || !a.previous.SendsMayLand(now) {
		return
	}
	if answered.IsZero() {
		answered = generatedOn
	}
	rec.SettleUntil = a.previous.SettleUntil
	rec.LateLandingUntil = answered.UTC().Add(rec.SettleUntil.Sub(now) + dateProofMargin)
}

// later is the later of two times.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
