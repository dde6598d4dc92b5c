package store

// What of key_source vault is in flight on a mount (the root's key-source
// read, before a downgrade): records with a pending key, and windows in
// which a request of a key Vault made may still land.

import (
	"context"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// inFlightWalkPage is how many records FindInFlight lists at a time.
const inFlightWalkPage = 1000

// InFlight is what FindInFlight found: how many records hold a pending key
// and how many a window still open at its time (and until when the last
// closes), with the first tunnels of each, "account/tunnel".
type InFlight struct {
	Pending        int
	PendingTunnels []string
	Windows        int
	WindowTunnels  []string
	OpenUntil      time.Time
}

// FindInFlight reads every record of s and reports, as of now, those with
// a pending key and those, in any state but rotation_unknown, whose window
// is open, naming up to listed of each; the counts are whole. Every record
// is read: a window is kept on a current record too, and nothing indexes
// those. A one-off check, not for polling.
func FindInFlight(ctx context.Context, s logical.Storage, now time.Time, listed int) (*InFlight, error) {
	f := &InFlight{PendingTunnels: []string{}, WindowTunnels: []string{}}
	for after, done := (Tunnel{}), false; !done; {
		var tunnels []Tunnel
		var err error
		if tunnels, done, err = ListRecordsAfter(ctx, s, after, inFlightWalkPage); err != nil {
			return nil, err
		}
		for _, t := range tunnels {
			after = t
			rec, err := ReadRecord(ctx, s, t)
			if err != nil {
				return nil, err
			}
			if rec == nil {
				continue
			}
			name := t.AccountID + "/" + t.TunnelID
			if rec.PendingPSK != "" {
				if f.Pending++; len(f.PendingTunnels) < listed {
					f.PendingTunnels = append(f.PendingTunnels, name)
				}
			}
			// A rotation_unknown window is psk_generate's, which every
			// version honours; any other is a key Vault made.
			if rec.State != StateRotationUnknown && rec.SendsMayLand(now) {
				if f.Windows++; len(f.WindowTunnels) < listed {
					f.WindowTunnels = append(f.WindowTunnels, name)
				}
				if rec.SettleUntil.After(f.OpenUntil) {
					f.OpenUntil = rec.SettleUntil
				}
			}
		}
	}
	return f, nil
}
