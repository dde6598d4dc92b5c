package store

// The schedule in storage.
//
// The schedule is kept as one entry per due rotation,
// due/<minute>/<account>.<tunnel>, where <minute> is the Unix minute in which
// the rotation falls due (its next_rotation rounded down); a rotation queued
// by a bulk job (rotate/<account>, internal/background/jobs.go) is
// due/<minute>/<account>.<tunnel>.bulk, so the job's progress is a count of
// its minute's keys, and a tunnel's scheduled and bulk rotations never
// overwrite each other. Listing due/ gives the minutes in time order without
// reading a record, so a mount that tracks a great many tunnels starts at
// once, and the scheduler (internal/background/scheduler.go) only ever holds
// one batch of due rotations in memory.
//
// The minute only says when to look: the scheduler loads the current
// minute's entries too, and the tunnel's record (NextRotation) decides
// whether a rotation is due, so nothing is rotated before it is due, after a
// restart included, and a rotation due at :20 is done at :20, not at the next
// minute (the ttl a read returns promises that second to Vault Agent). A
// rotation that fell due while Vault was down is simply found in a past
// minute and done at the paced rate. Versions before this one rounded up;
// their entries are honoured (EntryMatches), one minute late at worst.

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	DuePrefix = "due/"
	// DueBatch bounds the due rotations held in memory at once.
	DueBatch = 500
)

// BulkSuffix ends the key of a bulk job's entry.
const BulkSuffix = ".bulk"

// DueEntry is the value of a due/ entry. Bulk marks rotations queued by
// rotate/<account> (an entry of an older version, without the key suffix,
// carries only this). QueuedAt is when a bulk rotation was queued: a key
// stored after it means the rotation asked for has happened, whoever did it.
type DueEntry struct {
	Bulk     bool      `json:"bulk,omitempty"`
	QueuedAt time.Time `json:"queued_at,omitzero"`
	// Unmanaged is, for a tunnel Vault did not manage when the job was
	// queued (rotate/ include_unmanaged=true), what Cloudflare's listing
	// said of it: its first rotation needs no read of the tunnel.
	Unmanaged *ListedTunnel `json:"unmanaged,omitempty"`
	// Attempts counts the times Cloudflare did not apply a key Vault made
	// for the tunnel in this job (unapplied_psks), and RetryAt is when it
	// is sent again: the job retries it with backoff.
	Attempts int       `json:"attempts,omitempty"`
	RetryAt  time.Time `json:"retry_at,omitzero"`
}

// ListedTunnel is what an account listing said of a tunnel Vault does not
// manage.
type ListedTunnel struct {
	// KeyGeneratedOn is the edge's psk_metadata.last_generated_on (zero:
	// none), and ListedAt Cloudflare's time of the listing (its Date).
	KeyGeneratedOn time.Time `json:"key_generated_on,omitzero"`
	ListedAt       time.Time `json:"listed_at,omitzero"`
	// Facts are the router facts as listed, checked and bounded as a
	// record's are (internal/rotation's ListedFacts), so that the entry
	// stays small whatever the listing held; checked again before any
	// reaches a record.
	Facts Facts `json:"facts"`
}

// DueItem is one due rotation as loaded from storage.
type DueItem struct {
	Key    string
	Minute int64
	Tunnel Tunnel
	// Bulk: the key is a bulk job's (BulkSuffix).
	Bulk bool
}

// DueMinute is the Unix minute of at: rounded down, as entries are keyed
// now, or (roundUp) up, as versions before exact scheduling keyed them.
func DueMinute(at time.Time, roundUp bool) int64 {
	m := at.Unix() / 60
	if roundUp && (at.Unix()%60 != 0 || at.Nanosecond() != 0) {
		m++
	}
	return m
}

// EntryMatches reports whether an entry in minute is the entry of a
// rotation due at next: in next's minute, or, written by an older version,
// in the minute after. Any other entry is stale: its record has moved on.
// The scheduler, the repair walk and unscheduling all ask this one question.
func EntryMatches(next time.Time, minute int64) bool {
	return !next.IsZero() && (minute == DueMinute(next, false) || minute == DueMinute(next, true))
}

// ScheduleKeys are the keys an entry of a rotation due at at may have (see
// EntryMatches): its minute's, and an older version's, the minute after.
func ScheduleKeys(at time.Time, t Tunnel) []string {
	down, up := DueMinute(at, false), DueMinute(at, true)
	if down == up {
		return []string{DueKey(down, t)}
	}
	return []string{DueKey(down, t), DueKey(up, t)}
}

func DueKey(minute int64, t Tunnel) string {
	return fmt.Sprintf("%s%010d/%s.%s", DuePrefix, minute, t.AccountID, t.TunnelID)
}

func BulkDueKey(minute int64, t Tunnel) string { return DueKey(minute, t) + BulkSuffix }

// ScheduleRotation records that t is due at at. A bulk job's rotation is
// QueueBulkRotation's.
func ScheduleRotation(ctx context.Context, s logical.Storage, t Tunnel, at time.Time) error {
	entry, err := logical.StorageEntryJSON(DueKey(DueMinute(at, false), t), DueEntry{})
	if err != nil {
		return fmt.Errorf("encode schedule entry of %s: %w", t, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("schedule rotation of %s: %w", t, err)
	}
	return nil
}

// QueueBulkRotation records a bulk job's rotation of t, due at minute.
func QueueBulkRotation(ctx context.Context, s logical.Storage, t Tunnel, minute int64, queuedAt time.Time) error {
	return WriteBulkEntry(ctx, s, t, minute, DueEntry{Bulk: true, QueuedAt: queuedAt.UTC()})
}

// WriteBulkEntry writes a bulk job's entry of t, in minute.
func WriteBulkEntry(ctx context.Context, s logical.Storage, t Tunnel, minute int64, due DueEntry) error {
	entry, err := logical.StorageEntryJSON(BulkDueKey(minute, t), due)
	if err != nil {
		return fmt.Errorf("encode bulk rotation entry of %s: %w", t, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("queue bulk rotation of %s: %w", t, err)
	}
	return nil
}

// CountBulkEntries counts the bulk entries of account in minute, leaving out
// the tunnels skip says are already accounted for.
func CountBulkEntries(ctx context.Context, s logical.Storage, minute int64, account string, skip func(tunnel string) bool) (int, error) {
	left, err := BulkEntriesLeft(ctx, s, minute, account)
	if err != nil {
		return 0, err
	}
	n := 0
	for tunnel := range left {
		if !skip(tunnel) {
			n++
		}
	}
	return n, nil
}

// BulkEntriesLeft lists the tunnels of account that have a bulk entry in
// minute: one List.
func BulkEntriesLeft(ctx context.Context, s logical.Storage, minute int64, account string) (map[string]bool, error) {
	keys, err := s.List(ctx, fmt.Sprintf("%s%010d/", DuePrefix, minute))
	if err != nil {
		return nil, fmt.Errorf("list the bulk rotations of account %s: %w", account, err)
	}
	left := map[string]bool{}
	for _, k := range keys {
		a, tunnel, bulk, ok := ParseDueName(k)
		if ok && bulk && a == account {
			left[tunnel] = true
		}
	}
	return left, nil
}

// ParseDueName splits the last part of a due/ key: <account>.<tunnel>, with
// BulkSuffix for a bulk job's entry.
func ParseDueName(name string) (account, tunnel string, bulk, ok bool) {
	account, rest, ok := strings.Cut(name, ".")
	if !ok {
		return "", "", false, false
	}
	tunnel, bulk = strings.CutSuffix(rest, BulkSuffix)
	if strings.Contains(tunnel, ".") {
		return "", "", false, false
	}
	return account, tunnel, bulk, true
}

// UnscheduleRotation removes the entry of t's rotation due at at.
func UnscheduleRotation(ctx context.Context, s logical.Storage, t Tunnel, at time.Time) error {
	return UnscheduleSuperseded(ctx, s, t, at, time.Time{})
}

// UnscheduleSuperseded removes the entry of t's rotation due at old, which
// one due at keep (zero: none) replaces, without touching keep's own entry:
// two times in one minute share a key, and the replacement is stored before
// the entry it replaces is removed.
func UnscheduleSuperseded(ctx context.Context, s logical.Storage, t Tunnel, old, keep time.Time) error {
	kept := map[string]bool{}
	if !keep.IsZero() {
		for _, k := range ScheduleKeys(keep, t) {
			kept[k] = true
		}
	}
	for _, k := range ScheduleKeys(old, t) {
		if kept[k] {
			continue
		}
		if err := s.Delete(ctx, k); err != nil {
			return fmt.Errorf("unschedule rotation of %s: %w", t, err)
		}
	}
	return nil
}

// ErrCorruptDueEntry is a due/ entry whose value does not decode.
var ErrCorruptDueEntry = errors.New("corrupt schedule entry")

// ReadDueEntry reads one due/ entry; nil when it is gone (worked off by an
// earlier pass, or forgotten with its tunnel). A value that does not decode
// is reported as ErrCorruptDueEntry beside an entry with no marks, so the
// record alone decides what happens to the tunnel.
func ReadDueEntry(ctx context.Context, s logical.Storage, key string) (*DueEntry, error) {
	entry, err := s.Get(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("read schedule entry %s: %w", key, err)
	}
	if entry == nil {
		return nil, nil
	}
	due := new(DueEntry)
	if err := entry.DecodeJSON(due); err != nil {
		return &DueEntry{}, fmt.Errorf("%w %s: %v", ErrCorruptDueEntry, key, err)
	}
	return due, nil
}

// LoadDue returns up to DueBatch entries of the minutes up to now's whose
// keys come after after ("": from the first), in key order (oldest minute
// first), and the start of the next later minute that has entries (zero
// when none). A pass loads batch after batch, each after the last key of the
// one before, so entries it keeps never hide later ones. Entries of now's
// own minute may not be due yet: the record says (see internal/background's
// rotateScheduled).
func LoadDue(ctx context.Context, s logical.Storage, now time.Time, after string) ([]DueItem, time.Time, error) {
	minutes, err := s.List(ctx, DuePrefix)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("list due rotations: %w", err)
	}
	sort.Strings(minutes)
	current := now.Unix() / 60
	var items []DueItem
	for _, m := range minutes {
		minute, err := strconv.ParseInt(strings.TrimSuffix(m, "/"), 10, 64)
		if err != nil {
			continue
		}
		if minute > current {
			return items, time.Unix(minute*60, 0), nil
		}
		// Minutes are ten digits, so key order is time order: a minute
		// whose every key is before after is not listed at all.
		if after != "" && DuePrefix+m < after && !strings.HasPrefix(after, DuePrefix+m) {
			continue
		}
		keys, err := s.List(ctx, DuePrefix+m)
		if err != nil {
			return nil, time.Time{}, fmt.Errorf("list due rotations: %w", err)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if DuePrefix+m+k <= after {
				continue
			}
			account, tunnel, bulk, ok := ParseDueName(k)
			if !ok {
				continue
			}
			items = append(items, DueItem{Key: DuePrefix + m + k, Minute: minute, Tunnel: Tunnel{AccountID: account, TunnelID: tunnel}, Bulk: bulk})
			if len(items) == DueBatch {
				return items, time.Time{}, nil
			}
		}
	}
	return items, time.Time{}, nil
}

// LoadScheduledAfter returns up to DueBatch scheduled entries (not a bulk
// job's) of the minutes after afterMinute up to now's, oldest first: what a
// pass deep in one minute's long run of bulk entries lets go first, so that
// a tunnel's scheduled rotation waits a batch for a bulk job, not the job.
func LoadScheduledAfter(ctx context.Context, s logical.Storage, now time.Time, afterMinute int64) ([]DueItem, error) {
	minutes, err := s.List(ctx, DuePrefix)
	if err != nil {
		return nil, fmt.Errorf("list due rotations: %w", err)
	}
	sort.Strings(minutes)
	current := now.Unix() / 60
	var items []DueItem
	for _, m := range minutes {
		minute, err := strconv.ParseInt(strings.TrimSuffix(m, "/"), 10, 64)
		if err != nil || minute <= afterMinute {
			continue
		}
		if minute > current {
			break
		}
		keys, err := s.List(ctx, DuePrefix+m)
		if err != nil {
			return nil, fmt.Errorf("list due rotations: %w", err)
		}
		sort.Strings(keys)
		for _, k := range keys {
			account, tunnel, bulk, ok := ParseDueName(k)
			if !ok || bulk {
				continue
			}
			items = append(items, DueItem{Key: DuePrefix + m + k, Minute: minute, Tunnel: Tunnel{AccountID: account, TunnelID: tunnel}})
			if len(items) == DueBatch {
				return items, nil
			}
		}
	}
	return items, nil
}

// ListRecordsAfter returns up to n tunnels that have a record
// (psk/<account>/<tunnel>), in key order, starting after after (the zero
// Tunnel: from the first). complete says that the list reached the last
// record.
func ListRecordsAfter(ctx context.Context, s logical.Storage, after Tunnel, n int) ([]Tunnel, bool, error) {
	return listTunnelsAfter(ctx, s, PSKPrefix, after, n)
}

// SaveScheduled stores rec with its place in the schedule, in the one order
// that never loses a rotation: the entry of rec's next rotation first (an
// entry whose record points elsewhere is dropped by the scheduler when its
// minute comes, while a record whose next rotation has no entry would never
// rotate), then the record, then the entry of superseded, the next rotation
// the record had before (zero: none, or one the caller removes itself),
// unless rec's shares its key.
//
// It fails when rec could not be stored, and then has dropped nothing. Of
// what may fail without harm once rec is stored, it returns notes for the
// caller to log: a superseded entry that could not be dropped (stale, it is
// dropped when its minute comes), and, with keyOnlyHere, the new entry.
// keyOnlyHere says that rec carries a key that exists nowhere else (the
// edge already uses it): it is stored whether or not its entry could be
// (the scheduler's repair walk puts a missing entry back), and its Put is
// retried (PutRetrying).
func SaveScheduled(ctx context.Context, s logical.Storage, rec *Record, superseded time.Time, keyOnlyHere bool) (notes []error, err error) {
	t := Tunnel{AccountID: rec.AccountID, TunnelID: rec.TunnelID}
	if !rec.NextRotation.IsZero() {
		if err := ScheduleRotation(ctx, s, t, rec.NextRotation); err != nil {
			if !keyOnlyHere {
				return nil, err
			}
			notes = append(notes, fmt.Errorf("could not schedule the next rotation: %w", err))
		}
	}
	if keyOnlyHere {
		entry, eerr := logical.StorageEntryJSON(t.StorageKey(), rec)
		if eerr == nil {
			eerr = PutRetrying(ctx, s, entry)
		}
		if eerr != nil {
			return notes, fmt.Errorf("store psk record for %s: %w", t, eerr)
		}
	} else if err := WriteRecord(ctx, s, t, rec); err != nil {
		return nil, err
	}
	if !superseded.IsZero() && !superseded.Equal(rec.NextRotation) {
		if err := UnscheduleSuperseded(ctx, s, t, superseded, rec.NextRotation); err != nil {
			notes = append(notes, fmt.Errorf("could not drop a superseded schedule entry: %w", err))
		}
	}
	return notes, nil
}
