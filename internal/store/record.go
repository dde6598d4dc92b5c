package store

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/schedule"
)

// PSKPrefix holds one entry per tunnel at psk/<account>/<tunnel>, so
// that listing an account is one storage List and reading a tunnel is one Get.
const PSKPrefix = "psk/"

// UnresolvedPrefix indexes the tunnels whose record is not current.
const UnresolvedPrefix = "unresolved/"

// Rotation states of a Record (see internal/rotation/rotate.go).
const (
	// StateCurrent: the stored key is the one Cloudflare's edge uses.
	StateCurrent = "current"
	// StateRotationUnknown: a rotation started and its outcome is not known;
	// the edge may already use a key Vault does not hold.
	StateRotationUnknown = "rotation_unknown"
	// StateStale: Cloudflare generated a key after the stored one, so the
	// stored key is not the edge's.
	StateStale = "stale"
	// StateTunnelGone: Cloudflare no longer knows the tunnel (deleted, or
	// the token lost its account). The last key is kept for the record,
	// never served as current. The drift sweep returns the tunnel to
	// management if Cloudflare lists it again (GoneLookedAt).
	StateTunnelGone = "tunnel_gone"
	// StatePending: a key Vault made (key_source vault) is written ahead in
	// PendingPSK and is being set on the edge; until Cloudflare echoes it
	// back as applied, the edge may use it or PSK. The engine finishes by
	// sending PendingPSK again (internal/rotation/vaultkeys.go).
	StatePending = "pending"
)

// Where a stored key was made (Record.KeySource, config key_source).
const (
	// KeySourceCloudflare: Cloudflare made the key (psk_generate). Records
	// stored before the field existed are such.
	KeySourceCloudflare = "cloudflare"
	// KeySourceVault: the engine made the key and set it on the edge
	// (Cloudflare's Set operation).
	KeySourceVault = "vault"
)

const (
	// FailureBackoffStart and FailureBackoffMax bound how often the
	// background retries a tunnel whose reconciliation or scheduled rotation
	// keeps failing: the first retry after a minute, doubling, at most hourly.
	FailureBackoffStart = time.Minute
	FailureBackoffMax   = time.Hour
)

// Record is a tunnel's PSK as stored in Vault, with its rotation state.
// The state lives in the same entry as the key so that a read is one
// storage Get.
type Record struct {
	AccountID string `json:"account_id"`
	TunnelID  string `json:"tunnel_id"`
	// PSK is empty only while the tunnel's first rotation is unresolved.
	PSK string `json:"psk"`
	// LastGeneratedOn is Cloudflare's psk_metadata.last_generated_on for PSK.
	LastGeneratedOn time.Time `json:"last_generated_on"`
	// KeySource is who made PSK (KeySourceCloudflare or KeySourceVault);
	// "" in records stored before the field existed: Cloudflare.
	KeySource string `json:"key_source,omitempty"`
	// Version counts rotations stored by this engine, from 1.
	Version  int       `json:"version"`
	StoredAt time.Time `json:"stored_at"`
	// KeySeenAt is Cloudflare's time (an answer's Date header, whole
	// seconds, by Cloudflare's clock) of the latest answer known to show
	// PSK as the edge's key: the psk_generate answer that carried it, or a
	// later read that proved the edge still used it. Zero when not known
	// (an answer without a Date, a record stored before the field
	// existed). See internal/rotation's judgeEdge.
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
	// force then (see internal/rotation's settleWindow). With a key Vault
	// made it is kept, and pushed on by each send of the same key, after
	// the key is set and in any state, until it passes: a request of it
	// abandoned earlier may still land, and no different key may be sent
	// before then (SendsMayLand).
	SettleUntil time.Time `json:"settle_until"`
	// PendingPSK is, in state pending, the key Vault made and wrote here
	// before any request carried it: the key the engine finishes the
	// rotation with. It is never served. PendingTrigger is who asked for
	// it (internal/rotation's Trigger), for the rotation's event.
	PendingPSK     string `json:"pending_psk,omitempty"`
	PendingTrigger string `json:"pending_trigger,omitempty"`
	// LateLandingUntil is, after a key Vault made was set, the latest time
	// by Cloudflare's clock at which a request of the engine abandoned
	// earlier, carrying the same key, may still land at the edge and
	// re-date it (SettleUntil carried over to Cloudflare's clock from the
	// answer that set the key, with margins), or the time a validate_only
	// answer gave the stored key (a dropped query string sets it again): a
	// later last_generated_on up to it may be the engine's own key, not
	// drift.
	LateLandingUntil time.Time `json:"late_landing_until,omitzero"`
	// EdgeKeyBefore is the edge's last_generated_on as last known before
	// the rotation was sent: the stored key's, or, for a tunnel Vault holds
	// no key of yet, what Cloudflare said just before (see
	// internal/rotation's judgeEdge). EdgeKeyBeforeSeenAt is Cloudflare's
	// time of the answer that said it (as KeySeenAt). Where the edge's key
	// was not the stored one (EdgeKeyForeign) they are what Cloudflare last
	// said of it, for the record and for a validation; judgeEdge does not
	// need them then.
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
	// HealHeld: the engine no longer heals this tunnel by itself until an
	// operator writes it (or its schedule rotates it): drift came back
	// right after a heal, so another mount or tool rotates it too (see
	// internal/rotation's mayHeal), or it came back from tunnel_gone with
	// a key Cloudflare's times cannot tell from the stored one (ReturnGone),
	// and no rotation was asked for.
	HealHeld bool `json:"heal_held,omitempty"`
	// GoneLookedAt is when the drift sweep last found this tunnel, recorded
	// tunnel_gone, listed at Cloudflare again and returned it to management
	// (internal/rotation's ReturnGone). The sweep does so at most once a
	// day per tunnel, so a tunnel that keeps coming and going cannot churn
	// (or be healed) at every drift check. Carried from record to record.
	GoneLookedAt time.Time `json:"gone_looked_at,omitzero"`
	// AnswerHeld: Cloudflare's answer to this tunnel's last rotation carried
	// a key of the wrong form (internal/rotation/rotate.go, holdWrongKey), so
	// the record is stale and the engine generates no key for the tunnel by
	// itself (no heal, no scheduled or bulk rotation) until an operator
	// writes it.
	// Set only with state stale; every rotation clears it.
	AnswerHeld bool `json:"answer_held,omitempty"`

	// RotationPeriod, when not zero, has the scheduler rotate the tunnel
	// again at NextRotation (see due.go and internal/background/scheduler.go).
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
	// configuration needs beside the key (internal/rotation/facts.go says
	// where they come from). Carried from record to record like the
	// rotation period.
	Facts Facts `json:"facts"`
}

// current reports whether the stored key is known to be the edge's.
func (r *Record) Current() bool { return r.State == StateCurrent }

// answerHeld reports whether only an operator's write may generate a key
// for the tunnel (see AnswerHeld).
func (r *Record) HeldByAnswer() bool { return r.AnswerHeld && r.State == StateStale }

// settling reports whether the record's last rotation has an unknown outcome
// that may still change the edge's key: nothing can be concluded, and no new
// key may be asked for, before SettleUntil.
func (r *Record) Settling(now time.Time) bool {
	return r.State == StateRotationUnknown && now.Before(r.SettleUntil)
}

// SendsMayLand reports whether a request of the engine's abandoned before
// now may still change the edge's key, in any state: a rotation whose
// outcome is unknown, a key written ahead (pending), or one finished with
// the same key while an earlier request of it is still out. No different
// key may be sent before SettleUntil: the late request would replace it.
func (r *Record) SendsMayLand(now time.Time) bool { return now.Before(r.SettleUntil) }

// noteFailure records a failed background attempt and when to try again:
// exponential backoff from FailureBackoffStart, capped at FailureBackoffMax.
func (r *Record) NoteFailure(now time.Time, err error) {
	r.Failures++
	r.LastFailure = err.Error()
	backoff := FailureBackoffStart
	for i := 1; i < r.Failures && backoff < FailureBackoffMax; i++ {
		backoff *= 2
	}
	r.RetryAt = now.Add(min(backoff, FailureBackoffMax)).UTC()
}

// clearFailures forgets earlier failed attempts after a success.
func (r *Record) ClearFailures() {
	r.Failures, r.LastFailure, r.RetryAt = 0, "", time.Time{}
}

// scheduled reports whether the record has a schedule: the scheduler
// rotates the tunnel at NextRotation.
func (r *Record) Scheduled() bool { return r.Schedule().Set() }

// schedule is the record's schedule (none for nil).
func (r *Record) Schedule() schedule.Schedule {
	if r == nil {
		return schedule.Schedule{}
	}
	return schedule.Schedule{Period: r.RotationPeriod, Cron: r.RotationSchedule, Window: r.RotationWindow}
}

// Tunnel names one tunnel by its Cloudflare identifiers, in their
// canonical form (ParseIdentifier, identifier.go).
type Tunnel struct {
	AccountID string
	TunnelID  string
}

func (t Tunnel) StorageKey() string {
	return PSKPrefix + t.AccountID + "/" + t.TunnelID
}

// unresolvedKey marks a tunnel whose record is not current, so background
// reconciliation lists the few unresolved tunnels instead of reading every
// record. The marker is written before the record leaves current and removed
// after it returns, so it may outlive the state, never the reverse.
func (t Tunnel) UnresolvedKey() string {
	return UnresolvedPrefix + t.AccountID + "/" + t.TunnelID
}

func (t Tunnel) String() string {
	return fmt.Sprintf("tunnel %s of account %s", t.TunnelID, t.AccountID)
}

func ReadRecord(ctx context.Context, s logical.Storage, t Tunnel) (*Record, error) {
	entry, err := s.Get(ctx, t.StorageKey())
	if err != nil {
		return nil, fmt.Errorf("read psk record for %s: %w", t, err)
	}
	if entry == nil {
		return nil, nil
	}
	rec := new(Record)
	if err := entry.DecodeJSON(rec); err != nil {
		return nil, fmt.Errorf("decode psk record for %s: %w", t, err)
	}
	return rec, nil
}

func WriteRecord(ctx context.Context, s logical.Storage, t Tunnel, rec *Record) error {
	entry, err := logical.StorageEntryJSON(t.StorageKey(), rec)
	if err != nil {
		return fmt.Errorf("encode psk record for %s: %w", t, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store psk record for %s: %w", t, err)
	}
	return nil
}

// ForgetRecord removes a tunnel's record, its unresolved marker and its
// place in the schedule (rec is the record being forgotten, nil if unknown).
func ForgetRecord(ctx context.Context, s logical.Storage, t Tunnel, rec *Record) error {
	if rec != nil && !rec.NextRotation.IsZero() {
		if err := UnscheduleRotation(ctx, s, t, rec.NextRotation); err != nil {
			return err
		}
	}
	if err := s.Delete(ctx, t.StorageKey()); err != nil {
		return fmt.Errorf("delete psk record for %s: %w", t, err)
	}
	return ClearUnresolved(ctx, s, t)
}

func MarkUnresolved(ctx context.Context, s logical.Storage, t Tunnel) error {
	if err := s.Put(ctx, &logical.StorageEntry{Key: t.UnresolvedKey()}); err != nil {
		return fmt.Errorf("mark %s unresolved: %w", t, err)
	}
	return nil
}

func ClearUnresolved(ctx context.Context, s logical.Storage, t Tunnel) error {
	if err := s.Delete(ctx, t.UnresolvedKey()); err != nil {
		return fmt.Errorf("clear unresolved mark of %s: %w", t, err)
	}
	return nil
}

// FormatTime renders a time for a response; the zero time is "".
func FormatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// OrNever renders a stored key's time in a state reason.
func OrNever(t time.Time) string {
	if t.IsZero() {
		return "none stored"
	}
	return FormatTime(t)
}

// Facts is what a router needs to know of a tunnel beside its key.
// Every field is "" when Cloudflare has not said (or said something a
// router configuration could not safely hold, see internal/rotation's
// edgeFacts). The type is comparable, so a refresh can tell whether
// anything changed.
type Facts struct {
	Name string `json:"name,omitempty"`
	// CloudflareEndpoint is the anycast address the router connects to.
	CloudflareEndpoint string `json:"cloudflare_endpoint,omitempty"`
	CustomerEndpoint   string `json:"customer_endpoint,omitempty"`
	// InterfaceAddress and InterfaceAddress6 are Cloudflare's side of the
	// tunnel's inside subnet (/31 or /30; /127); the router takes the other
	// address (CustomerSide, facts.go).
	InterfaceAddress  string `json:"interface_address,omitempty"`
	InterfaceAddress6 string `json:"interface_address6,omitempty"`
	// CustomFQDNID is custom_remote_identities.fqdn_id: an IKE identity of
	// type FQDN chosen for the tunnel (Cloudflare still accepts the ones it
	// generates).
	CustomFQDNID string `json:"custom_fqdn_id,omitempty"`
	// IPsecID is the IKE identity Cloudflare's edge uses for the tunnel, as
	// psk_generate's answer carries it (Cloudflare's VyOS guide gives it to
	// the router as its local id). Only some answers carry it, so one that
	// does not leaves it as it was.
	IPsecID string `json:"ipsec_id,omitempty"`
}

func ListUnresolved(ctx context.Context, s logical.Storage) ([]Tunnel, error) {
	accounts, err := s.List(ctx, UnresolvedPrefix)
	if err != nil {
		return nil, fmt.Errorf("list unresolved tunnels: %w", err)
	}
	var out []Tunnel
	for _, a := range accounts {
		tunnels, err := s.List(ctx, UnresolvedPrefix+a)
		if err != nil {
			return nil, fmt.Errorf("list unresolved tunnels: %w", err)
		}
		for _, tun := range tunnels {
			out = append(out, Tunnel{AccountID: a[:len(a)-1], TunnelID: tun})
		}
	}
	return out, nil
}

const (
	// storeAttempts is how often a value that exists nowhere else is
	// offered to storage before the engine gives up on it.
	storeAttempts = 4
	// storeDeadline bounds the storing of a value that exists nowhere else.
	storeDeadline = 10 * time.Second
)

// PutRetrying stores an entry that exists nowhere else (a key Cloudflare
// already activated, a token value Cloudflare already rolled): a storage
// error is retried with backoff before it is given up on.
func PutRetrying(ctx context.Context, s logical.Storage, entry *logical.StorageEntry) error {
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

// StoredKeySource is who made the stored key: "cloudflare" for a record stored
// before the field existed, "" while no key is stored.
func (r *Record) StoredKeySource() string {
	switch {
	case r.PSK == "":
		return ""
	case r.KeySource == "":
		return KeySourceCloudflare
	}
	return r.KeySource
}
