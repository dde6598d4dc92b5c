package rotation

import (
	"fmt"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// edgeVerdict is what Cloudflare's time of generation for a tunnel's key
// proves about a record that is not current.
type edgeVerdict int

// keyChange is what Cloudflare's times prove about whether the edge's key
// is still the one an earlier answer showed.
type keyChange int

// wholeSecond is the coarsest precision of Cloudflare's times: all it
// promises for last_generated_on, and all a Date header has.
const wholeSecond = time.Second

// maxClockStep is how far apart two clocks whose times the engine's proofs
// compare may be: Cloudflare's and Vault's, a Date header's and
// Cloudflare's (a proxy at base_url may stamp its own), or Vault's two
// readings of one key's age, taken before and after its clock was stepped
// by up to this much. A proof by time holds only with this much to spare.
// (Settle windows are Vault's clock alone: they assume Vault's nodes agree
// within settleMargin and that no clock steps forward during one.)
const maxClockStep = time.Minute

// dateProofMargin is how far past a key's second of generation an answer's
// Date must be to prove that Cloudflare's clock had left that second: a
// second, and what a Date from another clock (maxClockStep) may be ahead.
const dateProofMargin = maxClockStep + wholeSecond

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
// whole seconds, truncated, so Date >= before+1s says just that when the
// Date is Cloudflare's; since it may be another clock's (a proxy at
// base_url that stamps its own, as nginx does), the proof asks for
// dateProofMargin.
func keyChangeSince(now, before, seenAt time.Time, laterKeysDiffer bool) keyChange {
	switch {
	case !now.Equal(before):
		return keyChanged
	case now.IsZero():
		return keyUnchanged // no key then, no key now
	case sameGeneration(now, before),
		laterKeysDiffer,
		!seenAt.IsZero() && !seenAt.Before(before.Add(dateProofMargin)):
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

// storedLongBefore reports whether the stored key was stored long enough
// before the attempt started that at least a second passed in truth:
// settleMargin for two nodes' clocks (a failover between), twice
// maxClockStep for a clock stepped from one end of its band to the other
// in between, and a second. Both times are Vault's. Cloudflare generated
// the stored key before it was stored and any key of the attempt after the
// attempt started, so their last_generated_on differ by at least a second
// and cannot share one. This is the proof for records stored before
// KeySeenAt existed, and for a key whose own answer was dated in its second
// of generation, as most are.
func storedLongBefore(r *store.Record) bool {
	return !r.StoredAt.IsZero() && !r.RotationStartedAt.IsZero() &&
		!r.StoredAt.After(r.RotationStartedAt.Add(-storedProofMargin))
}

// storedProofMargin is how long before an attempt the stored key must have
// been stored, by Vault's clocks, for storedLongBefore.
const storedProofMargin = settleMargin + 2*maxClockStep + wholeSecond

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

// mayHeal reports whether the engine may generate a key, by itself, for a
// tunnel whose stored key the edge no longer uses. The unknown outcome of the
// engine's own rotation is healed at once: that key was asked for. Drift is
// healed once; drift found again within two drift_check_intervals of that
// heal (the sweep runs once per interval, so at the very next look) is the
// mark of another mount or tool rotating the same tunnel, and healing it
// would start the two rotating each other's keys away, for ever. Such a
// tunnel is held (HealHeld) until an operator writes it.
func (e *Engine) mayHeal(settings Settings, rec *store.Record) bool {
	switch {
	case rec.HealHeld:
		return false
	case rec.State == store.StateRotationUnknown, rec.LastHealedAt.IsZero():
		return true
	}
	return !e.now().Before(rec.LastHealedAt.Add(2 * settings.DriftInterval))
}

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

const (
	// keyUndecided: nothing proves either.
	keyUndecided keyChange = iota
	// keyUnchanged: the edge's key is the one it had.
	keyUnchanged
	// keyChanged: the edge's key is another.
	keyChanged
)
