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
