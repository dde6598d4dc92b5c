package main

import (
	"context"
	"fmt"
	"regexp"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/schedule"

	"github.com/hashicorp/vault/sdk/logical"
)

// pskStoragePrefix holds one entry per tunnel at psk/<account>/<tunnel>, so
// that listing an account is one storage List and reading a tunnel is one Get.
const pskStoragePrefix = "psk/"

// unresolvedPrefix indexes the tunnels whose record is not current.
const unresolvedPrefix = "unresolved/"

// Rotation states of a pskRecord (see rotation.go).
const (
	// stateCurrent: the stored key is the one Cloudflare's edge uses.
	stateCurrent = "current"
	// stateRotationUnknown: a rotation started and its outcome is not known;
	// the edge may already use a key Vault does not hold.
	stateRotationUnknown = "rotation_unknown"
	// stateStale: Cloudflare generated a key after the stored one, so the
	// stored key is not the edge's.
	stateStale = "stale"
	// stateTunnelGone: Cloudflare no longer knows the tunnel (deleted, or
	// the token lost its account). The last key is kept for the record,
	// never served as current.
	stateTunnelGone = "tunnel_gone"
)

const (
	// failureBackoffStart and failureBackoffMax bound how often the
	// background retries a tunnel whose reconciliation or scheduled rotation
	// keeps failing: the first retry after a minute, doubling, at most hourly.
	failureBackoffStart = time.Minute
	failureBackoffMax   = time.Hour
)

// pskRecord is a tunnel's PSK as stored in Vault, with its rotation state.
// The state lives in the same entry as the key so that a read is one
// storage Get.
type pskRecord struct {
	AccountID string `json:"account_id"`
	TunnelID  string `json:"tunnel_id"`
	// PSK is empty only while the tunnel's first rotation is unresolved.
	PSK string `json:"psk"`
	// LastGeneratedOn is Cloudflare's psk_metadata.last_generated_on for PSK.
	LastGeneratedOn time.Time `json:"last_generated_on"`
	// Version counts rotations stored by this engine, from 1.
	Version  int       `json:"version"`
	StoredAt time.Time `json:"stored_at"`
	// KeySeenAt is Cloudflare's time (an answer's Date header, whole
	// seconds, by Cloudflare's clock) of the latest answer known to show
	// PSK as the edge's key: the psk_generate answer that carried it, or a
	// later read that proved the edge still used it. Zero when not known
	// (an answer without a Date, a record stored before the field
	// existed). See judgeEdge.
	KeySeenAt time.Time `json:"key_seen_at,omitzero"`

	State       string `json:"state"`
	StateReason string `json:"state_reason,omitempty"`
	// RotationStartedAt is when the unresolved rotation began, read before
	// the record was marked, by this node's clock: it fixes SettleUntil and
	// is held against StoredAt, never against Cloudflare's times.
	RotationStartedAt time.Time `json:"rotation_started_at"`
	// SettleUntil is, for a rotation whose outcome is unknown, the time
	// after which no request of that attempt can still change the edge's
	// key. It is fixed when the attempt starts, from the request_timeout in
	// force then (see settleWindow).
	SettleUntil time.Time `json:"settle_until"`
	// EdgeKeyBefore is the edge's last_generated_on as last known before
	// the rotation was sent: the stored key's, or, for a tunnel Vault holds
	// no key of yet, what Cloudflare said just before (see judgeEdge).
	// EdgeKeyBeforeSeenAt is Cloudflare's time of the answer that said it
	// (as KeySeenAt). Where the edge's key was not the stored one
	// (EdgeKeyForeign) they are what Cloudflare last said of it, for the
	// record and for a validation; judgeEdge does not need them then.
	EdgeKeyBefore       time.Time `json:"edge_key_before"`
	EdgeKeyBeforeSeenAt time.Time `json:"edge_key_before_seen_at,omitzero"`
	// EdgeKeyForeign: when the rotation was sent, the edge's key was known
	// not to be the stored one (the record was stale, rotation_unknown or
	// tunnel_gone: the rotation heals it), so a rotation that turns out not
	// to have changed the edge's key leaves a key nobody holds. False in
	// records stored before the field existed: they are judged, as then,
	// against the stored key.
	EdgeKeyForeign bool `json:"edge_key_foreign,omitempty"`

	// Failures counts the background's consecutive failed attempts on this
	// tunnel (reconciliation or scheduled rotation); LastFailure says why
	// the last one failed, and RetryAt is when the background tries again.
	// A success clears all three.
	Failures    int       `json:"failures,omitempty"`
	LastFailure string    `json:"last_failure,omitempty"`
	RetryAt     time.Time `json:"retry_at"`
	// LastHealedAt is when the engine last generated a key to heal drift
	// found on this tunnel, so that it heals at most once per
	// drift_check_interval.
	LastHealedAt time.Time `json:"last_healed_at"`
	// HealHeld: drift came back right after a heal, so another mount or
	// tool rotates this tunnel too; the engine no longer heals it by itself
	// until an operator writes it (see mayHeal).
	HealHeld bool `json:"heal_held,omitempty"`
	// AnswerHeld: Cloudflare's answer to this tunnel's last rotation carried
	// a key of the wrong form (rotation.go, holdWrongKey), so the record is
	// stale and the engine generates no key for the tunnel by itself (no
	// heal, no scheduled or bulk rotation) until an operator writes it.
	// Set only with state stale; every rotation clears it.
	AnswerHeld bool `json:"answer_held,omitempty"`

	// RotationPeriod, when not zero, has the scheduler rotate the tunnel
	// again at NextRotation (see due.go and scheduler.go).
	RotationPeriod time.Duration `json:"rotation_period"`
	NextRotation   time.Time     `json:"next_rotation"`
	// RotationSchedule, a standard cron expression, is the alternative to
	// RotationPeriod (never both; internal/schedule): NextRotation is its next
	// time after each rotation. RotationWindow, with it, is how long after
	// a scheduled time its rotation may still start; WindowEnds is the end
	// of the window of the scheduled time NextRotation stands for (a failed
	// rotation's retry moves NextRotation, not the window). ScheduleNote
	// says why the last scheduled time passed without a rotation; the next
	// stored rotation clears it.
	RotationSchedule string        `json:"rotation_schedule,omitempty"`
	RotationWindow   time.Duration `json:"rotation_window,omitempty"`
	WindowEnds       time.Time     `json:"window_ends,omitzero"`
	ScheduleNote     string        `json:"schedule_note,omitempty"`

	// Facts is what Cloudflare says of the tunnel that a router's
	// configuration needs beside the key (facts.go says where they come
	// from). Carried from record to record like the rotation period.
	Facts tunnelFacts `json:"facts"`
}

// current reports whether the stored key is known to be the edge's.
func (r *pskRecord) current() bool { return r.State == stateCurrent }

// answerHeld reports whether only an operator's write may generate a key
// for the tunnel (see AnswerHeld).
func (r *pskRecord) answerHeld() bool { return r.AnswerHeld && r.State == stateStale }

// settling reports whether the record's last rotation has an unknown outcome
// that may still change the edge's key: nothing can be concluded, and no new
// key may be asked for, before SettleUntil.
func (r *pskRecord) settling(now time.Time) bool {
	return r.State == stateRotationUnknown && now.Before(r.SettleUntil)
}

// noteFailure records a failed background attempt and when to try again:
// exponential backoff from failureBackoffStart, capped at failureBackoffMax.
func (r *pskRecord) noteFailure(now time.Time, err error) {
	r.Failures++
	r.LastFailure = err.Error()
	backoff := failureBackoffStart
	for i := 1; i < r.Failures && backoff < failureBackoffMax; i++ {
		backoff *= 2
	}
	r.RetryAt = now.Add(min(backoff, failureBackoffMax)).UTC()
}

// clearFailures forgets earlier failed attempts after a success.
func (r *pskRecord) clearFailures() {
	r.Failures, r.LastFailure, r.RetryAt = 0, "", time.Time{}
}

// metadata is the record's state as a response, without the key; a read
// answers readData, which adds what depends on the time of the read.
func (r *pskRecord) metadata() map[string]any {
	return map[string]any{
		"account_id":          r.AccountID,
		"tunnel_id":           r.TunnelID,
		"last_generated_on":   formatTime(r.LastGeneratedOn),
		"version":             r.Version,
		"stored_at":           formatTime(r.StoredAt),
		"state":               r.State,
		"state_reason":        r.StateReason,
		"rotation_started_at": formatTime(r.RotationStartedAt),
		"rotation_period":     int(r.RotationPeriod.Seconds()),
		"next_rotation":       formatTime(r.NextRotation),
		"settle_until":        formatTime(r.SettleUntil),
		"failures":            r.Failures,
		"last_failure":        r.LastFailure,
		"retry_at":            formatTime(r.RetryAt),

		// What a router's configuration needs beside the key (facts.go).
		"name":                        r.Facts.Name,
		"cloudflare_endpoint":         r.Facts.CloudflareEndpoint,
		"customer_endpoint":           r.Facts.CustomerEndpoint,
		"interface_address":           r.Facts.InterfaceAddress,
		"interface_address6":          r.Facts.InterfaceAddress6,
		"customer_interface_address":  customerSide(r.Facts.InterfaceAddress),
		"customer_interface_address6": customerSide(r.Facts.InterfaceAddress6),
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
func (r *pskRecord) readData(now time.Time) map[string]any {
	data := r.metadata()
	data["last_vault_rotation"] = formatTime(r.StoredAt)
	data["rotation_schedule"] = r.RotationSchedule
	data["rotation_window"] = int(r.RotationWindow.Seconds())
	data["schedule_note"] = r.ScheduleNote
	if ttl, ok := r.ttl(now); ok {
		data["ttl"] = ttl
	}
	return data
}

// ttl is the whole seconds from now until the next scheduled rotation,
// rounded up and at least 1; false when no schedule will rotate the tunnel
// (none set, or the tunnel is gone at Cloudflare, which the scheduler
// leaves alone).
func (r *pskRecord) ttl(now time.Time) (int, bool) {
	if !r.scheduled() || r.NextRotation.IsZero() || r.State == stateTunnelGone {
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

// scheduled reports whether the record has a schedule: the scheduler
// rotates the tunnel at NextRotation.
func (r *pskRecord) scheduled() bool { return r.schedule().Set() }

// schedule is the record's schedule (none for nil).
func (r *pskRecord) schedule() schedule.Schedule {
	if r == nil {
		return schedule.Schedule{}
	}
	return schedule.Schedule{Period: r.RotationPeriod, Cron: r.RotationSchedule, Window: r.RotationWindow}
}

// tunnelRef names one tunnel by its Cloudflare identifiers, in their
// canonical form (parseIdentifier).
type tunnelRef struct {
	AccountID string
	TunnelID  string
}

func (t tunnelRef) storageKey() string {
	return pskStoragePrefix + t.AccountID + "/" + t.TunnelID
}

// unresolvedKey marks a tunnel whose record is not current, so background
// reconciliation lists the few unresolved tunnels instead of reading every
// record. The marker is written before the record leaves current and removed
// after it returns, so it may outlive the state, never the reverse.
func (t tunnelRef) unresolvedKey() string {
	return unresolvedPrefix + t.AccountID + "/" + t.TunnelID
}

func (t tunnelRef) String() string {
	return fmt.Sprintf("tunnel %s of account %s", t.TunnelID, t.AccountID)
}

func readPSKRecord(ctx context.Context, s logical.Storage, t tunnelRef) (*pskRecord, error) {
	entry, err := s.Get(ctx, t.storageKey())
	if err != nil {
		return nil, fmt.Errorf("read psk record for %s: %w", t, err)
	}
	if entry == nil {
		return nil, nil
	}
	rec := new(pskRecord)
	if err := entry.DecodeJSON(rec); err != nil {
		return nil, fmt.Errorf("decode psk record for %s: %w", t, err)
	}
	return rec, nil
}

func writePSKRecord(ctx context.Context, s logical.Storage, t tunnelRef, rec *pskRecord) error {
	entry, err := logical.StorageEntryJSON(t.storageKey(), rec)
	if err != nil {
		return fmt.Errorf("encode psk record for %s: %w", t, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store psk record for %s: %w", t, err)
	}
	return nil
}

// forgetPSKRecord removes a tunnel's record, its unresolved marker and its
// place in the schedule (rec is the record being forgotten, nil if unknown).
func forgetPSKRecord(ctx context.Context, s logical.Storage, t tunnelRef, rec *pskRecord) error {
	if rec != nil && !rec.NextRotation.IsZero() {
		if err := unscheduleRotation(ctx, s, t, rec.NextRotation); err != nil {
			return err
		}
	}
	if err := s.Delete(ctx, t.storageKey()); err != nil {
		return fmt.Errorf("delete psk record for %s: %w", t, err)
	}
	return clearUnresolved(ctx, s, t)
}

func markUnresolved(ctx context.Context, s logical.Storage, t tunnelRef) error {
	if err := s.Put(ctx, &logical.StorageEntry{Key: t.unresolvedKey()}); err != nil {
		return fmt.Errorf("mark %s unresolved: %w", t, err)
	}
	return nil
}

func clearUnresolved(ctx context.Context, s logical.Storage, t tunnelRef) error {
	if err := s.Delete(ctx, t.unresolvedKey()); err != nil {
		return fmt.Errorf("clear unresolved mark of %s: %w", t, err)
	}
	return nil
}

var (
	identifierPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)
	// upperCaseIdentifier is an identifier spelt with upper-case letters.
	upperCaseIdentifier = regexp.MustCompile(`^[0-9a-fA-F]{32}$`)
)

// parseIdentifier checks that raw is a Cloudflare identifier in its one
// canonical form, 32 lower-case hexadecimal characters, and returns it. Any
// other spelling is refused, never folded: Vault matches policy paths
// case-sensitively, so an engine that took "ABC…" for "abc…" would let a
// caller reach a tunnel a policy denies by spelling its id in upper case.
// The problem never repeats the value: a mistyped path can hold anything, a
// key included.
func parseIdentifier(field, raw string) (string, string) {
	if problem := checkIdentifier(field, raw); problem != "" {
		return "", problem
	}
	return raw, ""
}

func checkIdentifier(field, id string) string {
	switch {
	case identifierPattern.MatchString(id):
		return ""
	case upperCaseIdentifier.MatchString(id):
		return fmt.Sprintf("%s must be a Cloudflare identifier in its canonical form, 32 lower-case hexadecimal characters: "+
			"this one has upper-case letters. Vault matches policy paths case-sensitively, so the engine takes each id "+
			"in one spelling only; write it in lower case", field)
	}
	return fmt.Sprintf("%s must be a Cloudflare identifier: 32 lower-case hexadecimal characters (got %d characters)", field, len(id))
}

// formatTime renders a time for a response; the zero time is "".
func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// orNever renders a stored key's time in a state reason.
func orNever(t time.Time) string {
	if t.IsZero() {
		return "none stored"
	}
	return formatTime(t)
}
