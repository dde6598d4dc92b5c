package rotation

import (
	"fmt"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// StateWarnings tells a reader what a record's state means and what to do.
func StateWarnings(rec *store.Record) []string {
	var warnings []string
	switch rec.State {
	case store.StateRotationUnknown:
		warnings = append(warnings, fmt.Sprintf("state %s: %s. This key may no longer be the one Cloudflare uses. "+
			"Cloudflare may still act on that rotation until %s; after that the engine learns from Cloudflare what became of it, "+
			"on the next read or write and in the background, and a write is accepted again.",
			store.StateRotationUnknown, rec.StateReason, store.FormatTime(rec.SettleUntil)))
	case store.StatePending:
		warnings = append(warnings, fmt.Sprintf("state %s: %s. The key served is the one stored before that rotation, and may no longer be the one Cloudflare uses. "+
			"The engine finishes the rotation by sending the new key again, which is harmless: on the next read or write and in the background.",
			store.StatePending, rec.StateReason))
	case store.StateStale:
		warnings = append(warnings, fmt.Sprintf("state %s: %s. The tunnel cannot come up until both sides share a new key: write this path to generate and store one.",
			store.StateStale, rec.StateReason))
	case store.StateTunnelGone:
		warnings = append(warnings, fmt.Sprintf("state %s: %s. Delete this path if the tunnel is gone for good. "+
			"If Cloudflare lists it again, the drift sweep returns it to management (at most once a day), or a write of this path does so at once.",
			store.StateTunnelGone, rec.StateReason))
	}
	if rec.Failures > 0 {
		warnings = append(warnings, fmt.Sprintf("the background failed %d time(s) on this tunnel, last: %s; it tries again at %s",
			rec.Failures, rec.LastFailure, store.FormatTime(rec.RetryAt)))
	}
	return warnings
}

// ForgetWarning is what a delete of t's record tells the operator it threw
// away, forgotten being the record deleted ("": nothing to say). The delete
// is the operator's to make, but a pending key forgotten must be said: the
// edge may use a key nobody holds now.
func ForgetWarning(t store.Tunnel, forgotten *store.Record) string {
	if PendingIsStoredKey(forgotten) {
		// No new key was sent: only the stored key, the one Vault served.
		what := "the stored key was being set again after Cloudflare re-dated it"
		if forgotten.PendingTrigger == string(TriggerValidate) {
			what = "a validate_only request had sent the stored key"
		}
		return fmt.Sprintf("%s was %s: %s, and its outcome was unknown (%s). "+
			"No new key was sent: the edge uses the stored key, which Vault served, or a key changed outside this engine; "+
			"the record is forgotten now without finding out which.", t, forgotten.State, what, forgotten.StateReason)
	}
	if ForgotPendingKey(forgotten) {
		return fmt.Sprintf("%s was %s: a key Vault made had been sent and Cloudflare never confirmed it (%s). "+
			"The edge may use that key, and it is forgotten now with the record, unsent again: a router given the key Vault last served "+
			"may not come up. Write this path to give the tunnel a new key Vault holds.", t, forgotten.State, forgotten.StateReason)
	}
	return ""
}
