package main

// How a tunnel's record becomes the data of a response: its metadata, and
// what a read adds (ttl for Vault Agent, last_vault_rotation).

import (
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// recordMetadata is the record's state as a response, without the key; a read
// answers readData, which adds what depends on the time of the read.
func recordMetadata(r *store.Record) map[string]any {
	return map[string]any{
		"account_id":          r.AccountID,
		"tunnel_id":           r.TunnelID,
		"last_generated_on":   store.FormatTime(r.LastGeneratedOn),
		"version":             r.Version,
		"key_source":          r.StoredKeySource(),
		"stored_at":           store.FormatTime(r.StoredAt),
		"state":               r.State,
		"state_reason":        r.StateReason,
		"rotation_started_at": store.FormatTime(r.RotationStartedAt),
		"rotation_period":     int(r.RotationPeriod.Seconds()),
		"next_rotation":       store.FormatTime(r.NextRotation),
		"settle_until":        store.FormatTime(r.SettleUntil),
		"failures":            r.Failures,
		"last_failure":        r.LastFailure,
		"retry_at":            store.FormatTime(r.RetryAt),

		// What a router's configuration needs beside the key
		// (internal/rotation/facts.go).
		"name":                        r.Facts.Name,
		"cloudflare_endpoint":         r.Facts.CloudflareEndpoint,
		"customer_endpoint":           r.Facts.CustomerEndpoint,
		"interface_address":           r.Facts.InterfaceAddress,
		"interface_address6":          r.Facts.InterfaceAddress6,
		"customer_interface_address":  store.CustomerSide(r.Facts.InterfaceAddress),
		"customer_interface_address6": store.CustomerSide(r.Facts.InterfaceAddress6),
		"custom_fqdn_id":              r.Facts.CustomFQDNID,
		"ipsec_id":                    r.Facts.IPsecID,
	}
}

// readData is what a read of psk/ or metadata/ returns beside the key at
// now: metadata, and the fields by which Vault's own static credentials
// (database and LDAP static roles) tell a client when they rotate.
// last_vault_rotation is when Vault last stored a key. ttl, present only
// while a schedule will rotate the tunnel, is the whole seconds until
// next_rotation, rounded up and at least 1. Vault Agent (consul-template's
// leaseCheckWait, dependency/vault_common.go) reads a response without a
// lease whose data has a rotation_period key and an integer ttl again ttl+1
// seconds later, instead of every static_secret_render_interval (5 minutes
// by default); rounded up, that is one to two seconds after the rotation
// falls due, which leaves the rotation (one Cloudflare call) a second to be
// stored. Due or just overdue, ttl is 1, so Agent looks again every two
// seconds until the new key is there; overdue by more than overdueReadTTL
// (no config, the budget spent) it is that, so a fleet of Agents does not
// poll every two seconds for as long as a rotation cannot happen.
//
// ttl is capped at maxReadTTL: Agent takes ttl for when to read again and
// then ignores static_secret_render_interval, so an uncapped ttl would hide
// every rotation outside the schedule (an operator's write, a bulk job after
// a suspected compromise, a heal) until the scheduled time, days later. With
// the cap, such a key reaches Agent within a minute, at the cost of one read
// per Agent per minute. rotation_period is always present, as an integer,
// so Agent takes that path whatever the schedule.
func readData(r *store.Record, now time.Time) map[string]any {
	data := recordMetadata(r)
	data["last_vault_rotation"] = store.FormatTime(r.StoredAt)
	data["rotation_schedule"] = r.RotationSchedule
	data["rotation_window"] = int(r.RotationWindow.Seconds())
	data["schedule_note"] = r.ScheduleNote
	if ttl, ok := readTTL(r, now); ok {
		data["ttl"] = ttl
	}
	return data
}

// ttl is the whole seconds from now until the next scheduled rotation,
// rounded up and at least 1; false when no schedule will rotate the tunnel
// (none set, or the tunnel is gone at Cloudflare, which the scheduler
// leaves alone until it is back).
func readTTL(r *store.Record, now time.Time) (int, bool) {
	if !r.Scheduled() || r.NextRotation.IsZero() || r.State == store.StateTunnelGone {
		return 0, false
	}
	left := r.NextRotation.Sub(now)
	if left < -overdueReadTTL {
		return int(overdueReadTTL / time.Second), true
	}
	left = min(left, maxReadTTL)
	secs := int(left / time.Second)
	if left%time.Second > 0 {
		secs++
	}
	return max(secs, 1), true
}

const (
	// maxReadTTL caps a read's ttl (see readData).
	maxReadTTL = time.Minute
	// overdueReadTTL is a read's ttl once a rotation is that late.
	overdueReadTTL = 10 * time.Second
)

// generatedAnywayWarning is what the caller of a validation that generated
// a key is told.
const generatedAnywayWarning = "Cloudflare generated a key although validate_only was asked " +
	"(a proxy or gateway on the way may have dropped the query string): it is stored as a rotation, version %d, " +
	"and is the key the edge uses now; give it to the router"

// validateOnlyResponse is the answer to a validate_only write: what was
// validated, and, when Cloudflare generated a key anyway, the stored key's
// metadata (never the key) with a warning.
func validateOnlyResponse(t store.Tunnel, stored *store.Record) *logical.Response {
	if stored == nil {
		return &logical.Response{Data: map[string]any{
			"account_id":    t.AccountID,
			"tunnel_id":     t.TunnelID,
			"validate_only": true,
			"stored":        false,
		}}
	}
	data := recordMetadata(stored)
	data["validate_only"] = true
	data["stored"] = true
	resp := &logical.Response{Data: data}
	resp.AddWarning(fmt.Sprintf(generatedAnywayWarning, stored.Version))
	return resp
}
