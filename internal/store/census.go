package store

// The census: the mount's health in memory, in one storage entry and a
// small index, so that a status read neither reads a record nor lists an
// index.
//
// A status read must answer for 100,000 tunnels at the cost of a PSK read
// or two, so nothing it shows is computed at read time. The counts
// (tunnels per state, scheduled tunnels, tunnels that need an operator by
// kind, and the keys stored per day, from which the oldest key's time
// comes) and the first tunnels of each kind (listed.go) are kept in memory
// on the node that may write, changed as each record is written
// (observe.go: every record Put and Delete goes through the census, which
// reads the record it replaces), and written to one entry, census, by the
// background at most every CensusFoldEvery (Fold) and when the mount is
// cleaned up (Close). A standby reads that entry. The scheduler adds what
// it finds in the schedule (NoteSchedule), the drift sweep what it found
// (NoteDriftCheck), and bulk jobs are noted as they start (census_bulk.go).
//
// The tunnels that need an operator are indexed beside the records,
// attention/<kind>/<account>.<tunnel>, with the state and reason a status
// read shows: kind stale (the edge uses a key Vault does not hold), failing
// (the background's attempts on the tunnel fail, retried at retry_at) and
// gone (Cloudflare no longer has the tunnel). The index refills a list that
// lost a tunnel while more exist. A rotation of a healthy tunnel touches
// none of it.
//
// What can make the counts wrong, and what makes them exact again: a
// process that stops without Clean loses what it had not written (the
// entry says it was left open, and the next process's counts are marked
// not exact); a storage error while a record was written leaves its outcome
// unknown; records written before this version, or behind the engine's
// back, were never counted. The scheduler's repair walk, which already
// reads every record every 10 minutes in bounded passes, recounts them as
// it goes (walk.go), with every change made meanwhile applied to the count
// it builds, and replaces the counts with its own when it reaches the last
// record. The same walk puts back attention/ entries that are missing,
// removes those whose tunnel no longer belongs there, and refills the
// lists; only then does it say the counts are exact: exact again, whatever
// happened before. Nothing of this needs the census entry to decode (one
// that does not is taken as none), and the walk goes on, not counting, when
// the census cannot be loaded at all.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
)

const (
	// CensusKey holds the census entry (censusEntry).
	CensusKey = "census"
	// AttentionPrefix indexes the tunnels that need an operator:
	// attention/<kind>/<account>.<tunnel>, an AttentionEntry each.
	AttentionPrefix = "attention/"
	// CensusFoldEvery bounds how often the census entry is written: a
	// standby's counts are at most this (and a scheduler pass) old.
	CensusFoldEvery = 30 * time.Second
)

// The kinds of attention/ entries, in the order a status read lists them:
// a tunnel that is down first, then one the background cannot fix, then
// one that no longer exists.
const (
	AttentionStale   = "stale"
	AttentionFailing = "failing"
	AttentionGone    = "gone"
)

// AttentionKinds are the kinds, in the order a status read lists them.
var AttentionKinds = []string{AttentionStale, AttentionFailing, AttentionGone}

// States are the rotation states a count shows, even at zero.
var States = []string{StateCurrent, StatePending, StateRotationUnknown, StateStale, StateTunnelGone}

// AttentionEntry is the value of an attention/ entry: what a status read
// says of the tunnel. It never holds a key. Its state and reason are cut
// short and made of characters JSON writes as they are (listedText), so
// that the census's lists have a size bound (census_lists.go).
type AttentionEntry struct {
	State    string    `json:"state"`
	Reason   string    `json:"reason"`
	Failures int       `json:"failures,omitempty"`
	RetryAt  time.Time `json:"retry_at,omitzero"`
}

// attentionOf is the kind of attention r needs ("" none) and its entry. A
// tunnel whose background attempts fail is failing whatever its state; a
// rotation under way or waiting for reconciliation is not listed (the
// background resolves it; if it cannot, the tunnel is failing).
func attentionOf(r *Record) (string, AttentionEntry) {
	switch {
	case r == nil:
		return "", AttentionEntry{}
	case r.Failures > 0:
		return AttentionFailing, AttentionEntry{State: listedText(r.State, maxListedState), Reason: listedText(r.LastFailure, MaxListedReason),
			Failures: r.Failures, RetryAt: r.RetryAt.UTC()}
	case r.State == StateStale:
		return AttentionStale, AttentionEntry{State: r.State, Reason: listedText(r.StateReason, MaxListedReason)}
	case r.State == StateTunnelGone:
		return AttentionGone, AttentionEntry{State: r.State, Reason: listedText(r.StateReason, MaxListedReason)}
	}
	return "", AttentionEntry{}
}

// tally is what a record adds to the counts.
type tally struct {
	exists    bool
	state     string
	scheduled bool
	attention string
	// keyAt is when the key a tunnel may use was stored (zero: none, or
	// the tunnel is gone).
	keyAt time.Time
	// next is when the scheduler rotates the tunnel next (zero: never). It
	// is not counted: it brings the schedule's summary forward at once.
	next time.Time
}

func tallyOf(r *Record) tally {
	if r == nil {
		return tally{}
	}
	t := tally{exists: true, state: r.State}
	// As a read's ttl says: the scheduler will rotate the tunnel.
	t.scheduled = r.Scheduled() && !r.NextRotation.IsZero() && r.State != StateTunnelGone
	t.attention, _ = attentionOf(r)
	if t.scheduled {
		t.next = r.NextRotation.UTC()
	}
	if r.PSK != "" && r.State != StateTunnelGone && !r.StoredAt.IsZero() {
		t.keyAt = r.StoredAt.UTC()
	}
	return t
}

func (t tally) equal(u tally) bool {
	return t.exists == u.exists && t.state == u.state && t.scheduled == u.scheduled &&
		t.attention == u.attention && t.keyAt.Equal(u.keyAt) && t.next.Equal(u.next)
}

// Counts are the mount's tunnels counted by what a status read shows.
type Counts struct {
	States    map[string]int `json:"states,omitempty"`
	Scheduled int            `json:"scheduled"`
	// Attention counts the tunnels of each attention kind.
	Attention map[string]int `json:"attention,omitempty"`
	// KeyDays counts the stored keys by the UTC day they were stored
	// (2006-01-02), with the oldest time of the day's keys that is known:
	// exact after a recount, and never later than the oldest key of the
	// day (a key removed since may have been that oldest one).
	KeyDays map[string]KeyDay `json:"key_days,omitempty"`
}

// KeyDay is one day of Counts.KeyDays.
type KeyDay struct {
	Keys   int       `json:"keys"`
	Oldest time.Time `json:"oldest"`
}

func bump(m map[string]int, key string, by int) map[string]int {
	if m == nil {
		m = map[string]int{}
	}
	if m[key] += by; m[key] == 0 {
		delete(m, key)
	}
	return m
}

// add adds (sign 1) or takes away (sign -1) what t counts.
func (c *Counts) add(t tally, sign int) {
	if !t.exists {
		return
	}
	c.States = bump(c.States, t.state, sign)
	if t.scheduled {
		c.Scheduled += sign
	}
	if t.attention != "" {
		c.Attention = bump(c.Attention, t.attention, sign)
	}
	if t.keyAt.IsZero() {
		return
	}
	if c.KeyDays == nil {
		c.KeyDays = map[string]KeyDay{}
	}
	day := t.keyAt.Format(time.DateOnly)
	d := c.KeyDays[day]
	d.Keys += sign
	if sign > 0 && (d.Oldest.IsZero() || t.keyAt.Before(d.Oldest)) {
		d.Oldest = t.keyAt
	}
	if d.Keys == 0 {
		delete(c.KeyDays, day)
		return
	}
	c.KeyDays[day] = d
}

func (c Counts) clone() Counts {
	out := Counts{Scheduled: c.Scheduled}
	for k, v := range c.States {
		out.States = bump(out.States, k, v)
	}
	for k, v := range c.Attention {
		out.Attention = bump(out.Attention, k, v)
	}
	if len(c.KeyDays) > 0 {
		out.KeyDays = make(map[string]KeyDay, len(c.KeyDays))
		for k, v := range c.KeyDays {
			out.KeyDays[k] = v
		}
	}
	return out
}

// Tunnels is how many tunnels have a record.
func (c Counts) Tunnels() int {
	n := 0
	for _, v := range c.States {
		n += v
	}
	return n
}

// OldestKey is when the oldest key a tunnel may use was stored (zero:
// none): exact after a recount; in between, never later than that key's
// time and within its day.
func (c Counts) OldestKey() time.Time {
	days := make([]string, 0, len(c.KeyDays))
	for day, d := range c.KeyDays {
		if d.Keys > 0 {
			days = append(days, day)
		}
	}
	if len(days) == 0 {
		return time.Time{}
	}
	sort.Strings(days)
	return c.KeyDays[days[0]].Oldest
}

// DriftCheck is what the drift sweep last found.
type DriftCheck struct {
	// At is when the last complete sweep finished (zero: never).
	At time.Time `json:"at,omitzero"`
	// Found counts the tunnels it found changed outside the engine or gone
	// at Cloudflare (current before it).
	Found int `json:"found"`
}

// driftWatchKey carries a *DriftWatch in a context.
type driftWatchKey struct{}

// DriftWatch counts the tunnels that the writes made under a context found
// changed outside the engine: records that were current and became stale
// or tunnel_gone. The drift sweep watches its own writes with one, so that
// what it found is counted without the rotation protocol saying so.
type DriftWatch struct{ n atomic.Int64 }

// WatchDrift returns ctx carrying a new DriftWatch, and the watch.
func WatchDrift(ctx context.Context) (context.Context, *DriftWatch) {
	w := new(DriftWatch)
	return context.WithValue(ctx, driftWatchKey{}, w), w
}

func (w *DriftWatch) add() { w.n.Add(1) }

// Found is how many tunnels were found changed so far.
func (w *DriftWatch) Found() int { return int(w.n.Load()) }

// censusEntry is the census as stored.
type censusEntry struct {
	// Owner names the process that keeps the counts; a process writes the
	// entry only while it is the owner (another node, or an operator, may
	// have written it since).
	Owner string `json:"owner"`
	// Closed: written by Close, with every change counted. A process that
	// loads an entry left open cannot know what was lost.
	Closed    bool       `json:"closed"`
	Exact     bool       `json:"exact"`
	CountedAt time.Time  `json:"counted_at,omitzero"`
	AsOf      time.Time  `json:"as_of"`
	Counts    Counts     `json:"counts"`
	Drift     DriftCheck `json:"drift"`
	// Bulk are the bulk jobs that may still be running, with their
	// progress when last counted (census_bulk.go).
	Bulk []BulkStatus `json:"bulk,omitempty"`
	// The first tunnels of each attention kind (listed.go) are stored in
	// entries of their own (census_lists.go), written before this one.
	// Schedule is what the scheduler last found in the schedule, at
	// ScheduleAt.
	Schedule   ScheduleSummary `json:"schedule"`
	ScheduleAt time.Time       `json:"schedule_at,omitzero"`
}

// CensusView is the census as a status read shows it.
type CensusView struct {
	Counts Counts
	// Exact: every record is counted as it is. False before the first
	// recount of a mount with records, and after a lost process or a
	// storage error, until the next recount finishes.
	Exact bool
	// CountedAt is when the last recount finished (zero: none yet).
	CountedAt time.Time
	// AsOf is when the counts were taken: now on the node that keeps
	// them, the last fold on a standby.
	AsOf  time.Time
	Drift DriftCheck
	// Bulk are the bulk jobs still running when last counted.
	Bulk []BulkStatus
	// Listed are the first ListedPerKind tunnels of each attention kind,
	// in key order.
	Listed map[string][]AttentionItem
	// Schedule is what the scheduler last found in the schedule, at
	// ScheduleAt (zero: it has not looked yet).
	Schedule   ScheduleSummary
	ScheduleAt time.Time
}

// CensusConfig is what a Census is made of.
type CensusConfig struct {
	// Now is the clock; time.Now when nil.
	Now    func() time.Time
	Logger hclog.Logger
	// MayWrite says whether this node may change storage: only there are
	// counts kept; a standby reads the stored entries (Census.Stored).
	MayWrite func() bool
}

// censusStripes is how many locks the census spreads tunnels over: a
// record's write and the walk's read of it are serialised, other tunnels
// mostly are not.
const censusStripes = 64

// Census keeps one mount's counts. It is safe for concurrent use.
type Census struct {
	now      func() time.Time
	logger   hclog.Logger
	mayWrite func() bool
	// perKind is how many tunnels of each attention kind are listed:
	// ListedPerKind (tests list fewer).
	perKind int

	// stripes serialise what is done to one record: its write with the
	// read of what it replaces, and the walk's visit. Taken before mu.
	stripes [censusStripes]censusStripe
	// refillMu serialises refills of the lists (listed.go). Taken after
	// foldMu, before mu.
	refillMu sync.Mutex
	// foldMu serialises folds and Close, and guards listsOwner and
	// listsWritten: the lists as this process last stored them, as owner
	// listsOwner.
	foldMu       sync.Mutex
	listsOwner   string
	listsWritten map[string][]AttentionItem
	// undecodableLogged: a census entry that does not decode was logged,
	// and none that decodes has been read since (readEntry).
	undecodableLogged atomic.Bool

	// mu guards everything below.
	mu sync.Mutex
	// loaded: the counts were read from storage (ensureLoaded); storage is
	// where, for Close.
	loaded  bool
	storage logical.Storage
	owner   string
	live    Counts
	exact   bool
	// missed: a record was written while the counts could not be loaded.
	missed    bool
	countedAt time.Time
	// gen counts the changes; foldedGen is the one the entry was last
	// written at, at foldedAt.
	gen       uint64
	foldedGen uint64
	foldedAt  time.Time
	drift     DriftCheck
	// bulk are the bulk jobs that may be running (census_bulk.go).
	bulk map[string]*bulkState
	// schedule is what the scheduler last found, at scheduleAt.
	schedule   ScheduleSummary
	scheduleAt time.Time
	// bulkUnsure: the entry was left open, so a job started since its last
	// fold may be missing from bulk; the next fold looks at every job.
	bulkUnsure bool
	walk       *censusWalk
	// listed are the first tunnels of each attention kind, and refill says
	// which lists are due to be read again from the index (listed.go);
	// kindChanges counts the changes to each, so that a refill made without
	// holding mu knows whether one came meanwhile.
	listed      map[string][]AttentionItem
	refill      map[string]int
	kindChanges map[string]uint64
}

// NewCensus returns a Census that loads its counts from storage on first
// use.
func NewCensus(cfg CensusConfig) *Census {
	c := &Census{now: cfg.Now, logger: cfg.Logger, mayWrite: cfg.MayWrite, perKind: ListedPerKind, kindChanges: map[string]uint64{}}
	if c.now == nil {
		c.now = time.Now
	}
	if c.logger == nil {
		c.logger = hclog.NewNullLogger()
	}
	if c.mayWrite == nil {
		c.mayWrite = func() bool { return true }
	}
	return c
}

// censusStripe is one of the census's record locks, with the count of the
// record writes made under it.
type censusStripe struct {
	sync.Mutex
	// writes counts the record writes of this stripe, bumped after each
	// under the lock: a record read while it was n is still what storage
	// holds as long as it is n (observe.go's memo).
	writes atomic.Uint64
	// changing is the tunnel whose record write is under way under the
	// lock, from before storage is written until the change is counted
	// (nil: none). The walk reads such a record only once it is counted
	// (walk.go).
	changing atomic.Pointer[Tunnel]
}

// changing says whether a write of t's record is under way.
func (c *Census) changing(t Tunnel) bool {
	p := c.stripe(t).changing.Load()
	return p != nil && *p == t
}

// stripe is t's stripe.
func (c *Census) stripe(t Tunnel) *censusStripe {
	// FNV-1a over "<account>/<tunnel>", fed part by part: joined, the
	// string would be allocated on every record read of every request.
	h := uint32(2166136261)
	for _, part := range [...]string{t.AccountID, "/", t.TunnelID} {
		for i := 0; i < len(part); i++ {
			h = (h ^ uint32(part[i])) * 16777619
		}
	}
	return &c.stripes[h%censusStripes]
}

// lockTunnel takes t's stripe.
func (c *Census) lockTunnel(t Tunnel) func() {
	m := c.stripe(t)
	m.Lock()
	return m.Unlock
}

// errUndecodable marks a census entry that is there but does not decode.
var errUndecodable = errors.New("the census entry does not decode")

func readCensusEntry(ctx context.Context, s logical.Storage) (*censusEntry, error) {
	entry, err := s.Get(ctx, CensusKey)
	if err != nil {
		return nil, fmt.Errorf("read the census: %w", err)
	}
	if entry == nil {
		return nil, nil
	}
	e := new(censusEntry)
	if err := entry.DecodeJSON(e); err != nil {
		return nil, fmt.Errorf("%w: %w", errUndecodable, err)
	}
	return e, nil
}

// readEntry is the stored census entry, nil when there is none or when it
// does not decode (a storage fault, an operator's sys/raw write, a later
// version's format after a downgrade). Such an entry is taken as no census:
// the counts it held are lost, not exact until the next walk, and the entry
// is overwritten at the next write. Nothing depends on it decoding, so it
// never stops a status read, a record write or the repair walk. It is
// logged once, not at every read.
func (c *Census) readEntry(ctx context.Context, s logical.Storage) (*censusEntry, error) {
	e, err := readCensusEntry(ctx, s)
	if errors.Is(err, errUndecodable) {
		if c.undecodableLogged.CompareAndSwap(false, true) {
			c.logger.Warn("the census entry does not decode; it is taken as no census (counts not exact until the scheduler's next walk) and overwritten", "error", err)
		}
		return nil, nil
	}
	if err == nil && e != nil {
		c.undecodableLogged.Store(false)
	}
	return e, err
}

func writeCensusEntry(ctx context.Context, s logical.Storage, e *censusEntry) error {
	entry, err := logical.StorageEntryJSON(CensusKey, e)
	if err != nil {
		return fmt.Errorf("encode the census: %w", err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store the census: %w", err)
	}
	return nil
}

// Stored is the census as stored: what a standby shows (nil: never
// written, or an entry that does not decode).
func (c *Census) Stored(ctx context.Context, s logical.Storage) (*CensusView, error) {
	e, err := c.readEntry(ctx, s)
	if err != nil || e == nil {
		return nil, err
	}
	lists, err := readCensusLists(ctx, s)
	if err != nil {
		return nil, err
	}
	listed := map[string][]AttentionItem{}
	for kind, l := range lists {
		listed[kind] = l.Items
	}
	return &CensusView{Counts: e.Counts, Exact: e.Exact, CountedAt: e.CountedAt, AsOf: e.AsOf, Drift: e.Drift, Bulk: e.Bulk,
		Listed: listed, Schedule: e.Schedule, ScheduleAt: e.ScheduleAt}, nil
}

// ensureLoaded reads the stored counts on first use and claims them: the
// entry is written back as open and owned by this process, so that if it
// stops without Close the next one knows that changes may be lost. Until
// the claim is stored nothing is loaded, and a record written meanwhile is
// noted as missed.
func (c *Census) ensureLoaded(ctx context.Context, s logical.Storage) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loaded {
		return nil
	}
	e, err := c.readEntry(ctx, s)
	if err != nil {
		return err
	}
	now := c.now().UTC()
	fresh := &censusEntry{Exact: true, CountedAt: now}
	if e == nil {
		// A mount without records has nothing to count; one with records
		// (written before this version) is counted by the next walk.
		accounts, err := s.List(ctx, PSKPrefix)
		if err != nil {
			return fmt.Errorf("look for records before the first count: %w", err)
		}
		if len(accounts) > 0 {
			fresh = &censusEntry{}
		}
		e = fresh
	}
	claim := *e
	claim.Owner, claim.Closed, claim.AsOf = newOwner(), false, now
	claim.Exact = e.Exact && (e.Closed || e == fresh) && !c.missed
	if err := writeCensusEntry(ctx, s, &claim); err != nil {
		return fmt.Errorf("claim the census: %w", err)
	}
	c.loaded, c.storage, c.owner = true, s, claim.Owner
	c.live, c.exact, c.countedAt, c.drift = claim.Counts.clone(), claim.Exact, claim.CountedAt, claim.Drift
	c.bulk = map[string]*bulkState{}
	for _, b := range claim.Bulk {
		c.bulk[b.AccountID] = &bulkState{noted: c.gen, status: b}
	}
	c.schedule, c.scheduleAt = claim.Schedule, claim.ScheduleAt
	c.bulkUnsure = !e.Closed
	if err := c.loadLists(ctx, s, e); err != nil {
		return err
	}
	c.missed, c.foldedAt, c.walk = false, now, nil
	c.foldedGen = c.gen
	if !claim.Exact {
		c.logger.Info("the census counts are not exact until the scheduler's next walk over the records has finished")
	}
	return nil
}

// loadLists takes up the lists e was closed with, and has every other one
// refilled by the background: all of them when e was left open (changes
// since may be lost), and a list not stored by e's owner (or that does not
// decode). The caller holds mu.
func (c *Census) loadLists(ctx context.Context, s logical.Storage, e *censusEntry) error {
	lists := map[string]*censusList{}
	if e.Closed {
		var err error
		if lists, err = readCensusLists(ctx, s); err != nil {
			return err
		}
	}
	c.listed, c.refill = map[string][]AttentionItem{}, map[string]int{}
	for _, kind := range AttentionKinds {
		c.changedKind(kind) // a refill under way read for the lists before
		l := lists[kind]
		if l != nil {
			l.Items = l.Items[:min(len(l.Items), c.perKind)]
			for i := range l.Items {
				l.Items[i] = bounded(l.Items[i])
			}
		}
		switch {
		case l == nil || l.Owner != e.Owner:
			c.listed[kind], c.refill[kind] = []AttentionItem{}, refillAll
		case len(l.Items) < min(c.perKind, c.live.Attention[kind]):
			c.listed[kind], c.refill[kind] = l.Items, refillMissing
		default:
			c.listed[kind] = l.Items
		}
	}
	return nil
}

func newOwner() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// taint records that a change could not be counted for sure: the counts
// are not exact, and neither is a walk under way, until the next one.
func (c *Census) taint() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.taintLocked()
}

func (c *Census) taintLocked() {
	if c.walk != nil {
		c.walk.tainted = true
	}
	if !c.loaded {
		c.missed = true
		return
	}
	c.exact = false
	c.gen++
}

// View is the census as this node keeps it, for a status read. Once the
// census is loaded (at the background's first pass, or this read) it reads
// nothing from storage.
func (c *Census) View(ctx context.Context, s logical.Storage) (*CensusView, error) {
	if err := c.ensureLoaded(ctx, s); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// A list that lost a tunnel while more of its kind exist is refilled
	// by the background (Fold), not here: the read touches no storage.
	return &CensusView{Counts: c.live.clone(), Exact: c.exact, CountedAt: c.countedAt, AsOf: c.now().UTC(),
		Drift: c.drift, Bulk: c.bulkStatuses(), Listed: c.cloneListed(), Schedule: c.schedule, ScheduleAt: c.scheduleAt}, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// NoteDriftCheck records a complete drift sweep and what it found.
func (c *Census) NoteDriftCheck(ctx context.Context, s logical.Storage, at time.Time, found int) {
	if err := c.ensureLoaded(ctx, s); err != nil {
		c.logger.Warn("could not record the drift check in the census", "error", err)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.drift = DriftCheck{At: at.UTC(), Found: found}
	c.gen++
}

// NoteSchedule records what the scheduler found in the schedule at at.
func (c *Census) NoteSchedule(ctx context.Context, s logical.Storage, sum ScheduleSummary, at time.Time) {
	if err := c.ensureLoaded(ctx, s); err != nil {
		c.logger.Warn("could not record the schedule in the census", "error", err)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if sum != c.schedule {
		c.gen++
	}
	c.schedule, c.scheduleAt = sum, at.UTC()
}
