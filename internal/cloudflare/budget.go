package cloudflare

import (
	"fmt"
	"sync"
	"time"
)

// Budget caps the calls one mount sends to Cloudflare in any window of time.
// Cloudflare counts requests per user per fixed window and locks a user
// that goes over out of the whole API for the rest of it, so the cap must
// hold over every window, wherever it starts: a token bucket whose burst
// equals the budget can spend twice the budget across a window boundary. The
// Budget therefore keeps the times of the last limit calls (a sliding log)
// and allows a call only if the oldest of them left the window.
//
// Other tools of the same Cloudflare user spend the same quota, and the
// Budget cannot see them. So it also follows what Cloudflare's answers say
// is left (Observe), and never allows more than that until Cloudflare's
// window resets.
type Budget struct {
	mu sync.Mutex
	// blockedUntil is when Cloudflare's own block of the token ends, as its
	// last 429 announced; nothing is sent before.
	blockedUntil time.Time
	// onBlock, when set, is told each time BlockedUntil moves later (a
	// 429's block, or an answer saying no calls remain until Cloudflare's
	// window resets), so that the owner can keep the block where a new
	// process finds it: Cloudflare goes on enforcing it whatever becomes of
	// this one.
	onBlock func(until time.Time)
	limit   int
	window  time.Duration
	now     func() time.Time
	// ring holds the times of the last calls, at most limit of them;
	// next is where the following call goes, which is also the oldest.
	ring []time.Time
	next int
	// taken counts the calls allowed so far: the n-th is call number n.
	taken uint64
	// cf is Cloudflare's count from its latest answer; nothing is known
	// when cf.until is zero or past.
	cf cloudflareCount
}

// cloudflareCount is what a Ratelimit header said: remaining calls until
// until, counting the calls up to number seq. Calls allowed after seq are
// subtracted, since the answer may not have counted them.
type cloudflareCount struct {
	remaining int
	until     time.Time
	seq       uint64
}

// inFlightMargin widens the window a little: the Budget times a call when it
// is sent, Cloudflare when it arrives, and arrival times jitter.
func inFlightMargin(window time.Duration) time.Duration {
	return max(window/100, 100*time.Millisecond)
}

// NewBudget returns a Budget of limit calls per window; a limit of 0 caps
// nothing of its own and only follows Cloudflare's blocks and counts.
func NewBudget(limit int, window time.Duration, now func() time.Time) *Budget {
	if now == nil {
		now = time.Now
	}
	b := &Budget{now: now}
	b.Resize(limit, window)
	return b
}

// Resize changes the cap, keeping the most recent calls on record.
func (b *Budget) Resize(limit int, window time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	recent := b.recentLocked()
	if len(recent) > limit {
		recent = recent[len(recent)-limit:]
	}
	b.limit, b.window = limit, window
	b.ring = make([]time.Time, 0, limit)
	b.ring = append(b.ring, recent...)
	b.next = 0
	if limit > 0 {
		b.next = len(b.ring) % limit
	}
}

// Block records that Cloudflare blocks the token until until, but for no
// longer than maxBlock from now: whatever the answer said, the mount must
// not stay disabled for long on one bogus value.
// When that moves BlockedUntil later, the hook set by SetOnBlock is told
// the new end, after the lock is released (it may store it, or ask the
// Budget).
func (b *Budget) Block(until time.Time) {
	b.mu.Lock()
	before := b.blockedUntilLocked()
	b.blockLocked(until)
	b.unlockAndTell(before)
}

// unlockAndTell releases mu, which the caller holds, and tells the hook set
// by SetOnBlock when BlockedUntil moved later than before, after the lock
// is released (the hook may store it, or ask the Budget).
func (b *Budget) unlockAndTell(before time.Time) {
	after := b.blockedUntilLocked()
	hook := b.onBlock
	b.mu.Unlock()
	if after.After(before) && hook != nil {
		hook(after)
	}
}

// RestoreBlock applies a block already on record (one a previous process
// stored through the SetOnBlock hook), capped as Block caps it, without
// telling the hook again. A stored end of a spent quota comes back as a
// block: either way Cloudflare refuses every call before it, and the count
// it was learnt from did not survive the process.
func (b *Budget) RestoreBlock(until time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.blockLocked(until)
}

// blockLocked extends the block to until, capped at maxBlock from now. The
// caller holds mu.
func (b *Budget) blockLocked(until time.Time) {
	until = minTime(until, b.now().Add(maxBlock))
	if until.After(b.blockedUntil) {
		b.blockedUntil = until
	}
}

// SetOnBlock sets the hook told of each time BlockedUntil moves later
// (nil: none): by Block, or by an answer whose Ratelimit header says no
// calls remain. Calls to it may overlap: a hook that stores the block
// should store BlockedUntil at the time, which never goes back, rather than
// its argument, or an older end could overwrite a newer one.
func (b *Budget) SetOnBlock(hook func(until time.Time)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.onBlock = hook
}

// Blocked returns how long Cloudflare's block still lasts, zero when none.
func (b *Budget) Blocked() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	return max(b.blockedUntil.Sub(b.now()), 0)
}

// BlockedUntil returns when Cloudflare stops refusing this token's calls,
// the zero time when it does not: the end of its block (a 429), or, when
// its last answer said no calls remain (or the calls sent since spent what
// it said was left), the reset of its window, whichever is later. Before then no call is sent (Blocked covers the first, the
// count the second); it is what a new process must honour, and what an
// operator is shown.
func (b *Budget) BlockedUntil() time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.blockedUntilLocked()
}

// blockedUntilLocked is BlockedUntil. The caller holds mu.
func (b *Budget) blockedUntilLocked() time.Time {
	until := b.blockedUntil
	if b.cf.until.After(until) && b.taken-b.cf.seq >= uint64(b.cf.remaining) {
		// No call before the reset, whatever was sent since: a spent
		// quota is a block until then, whether Cloudflare's answer said
		// none remain or the calls sent since its count (their answers
		// lost, or carrying no count) used up what it said was left. (A
		// later answer that finds the window reset early replaces the
		// count, and with it this.)
		until = b.cf.until
	}
	if !until.After(b.now()) {
		return time.Time{}
	}
	return until
}

// recentLocked returns the recorded calls, oldest first.
func (b *Budget) recentLocked() []time.Time {
	if len(b.ring) < cap(b.ring) || len(b.ring) == 0 {
		return append([]time.Time(nil), b.ring...)
	}
	return append(append([]time.Time(nil), b.ring[b.next:]...), b.ring[:b.next]...)
}

// Limit returns the cap and its window.
func (b *Budget) Limit() (int, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.limit, b.window
}

// Used returns how many calls were sent in the window that ends now, as
// the cap counts them (0 when the cap is off).
func (b *Budget) Used() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.limit == 0 {
		return 0
	}
	now, span := b.now(), b.window+inFlightMargin(b.window)
	used := 0
	for _, at := range b.ring {
		if at.Add(span).After(now) {
			used++
		}
	}
	return used
}

// Observe records what Cloudflare said is left of its quota: remaining
// calls until reset from now, counting every call allowed so far. Until
// then, Free and TryTake allow no more than that, less the calls allowed
// since. A negative count or a reset that is not in the future says
// nothing and is ignored; a reset past maxBlock is cut to it.
// A count of none left moves BlockedUntil to the reset, and the hook set by
// SetOnBlock is told, as of a block.
func (b *Budget) Observe(remaining int, reset time.Duration) {
	b.mu.Lock()
	before := b.blockedUntilLocked()
	b.observeLocked(b.taken, remaining, reset)
	b.unlockAndTell(before)
}

// observe is Observe for the answer to call number seq (from take): calls
// allowed after it may have reached Cloudflare after it counted.
func (b *Budget) observe(seq uint64, remaining int, reset time.Duration) {
	b.mu.Lock()
	before := b.blockedUntilLocked()
	b.observeLocked(seq, remaining, reset)
	b.unlockAndTell(before)
}

func (b *Budget) observeLocked(seq uint64, remaining int, reset time.Duration) {
	if remaining < 0 || reset <= 0 {
		return
	}
	now := b.now()
	// Answers can arrive out of order; one about an earlier call than the
	// count in force knows less, unless that count has lapsed.
	if seq < b.cf.seq && now.Before(b.cf.until) {
		return
	}
	b.cf = cloudflareCount{remaining: remaining, until: now.Add(min(reset, maxBlock)), seq: seq}
}

// cloudflareFreeLocked returns how many calls Cloudflare's last count
// allows now and how long until its window resets; ok is false when no
// count is in force.
func (b *Budget) cloudflareFreeLocked(now time.Time) (free int, reset time.Duration, ok bool) {
	if !now.Before(b.cf.until) {
		return 0, 0, false
	}
	sent := b.taken - b.cf.seq
	if sent >= uint64(b.cf.remaining) {
		return 0, b.cf.until.Sub(now), true
	}
	return b.cf.remaining - int(sent), b.cf.until.Sub(now), true
}

// capFreeLocked returns how many calls the cap allows now, and, when none,
// how long until one. The caller holds mu.
func (b *Budget) capFreeLocked(now time.Time) (int, time.Duration) {
	if b.limit == 0 {
		return 1 << 30, 0
	}
	recent := b.recentLocked()
	free := b.limit - len(recent)
	span := b.window + inFlightMargin(b.window)
	for _, at := range recent {
		if !at.Add(span).After(now) {
			free++
		}
	}
	if free > 0 {
		return free, 0
	}
	return 0, recent[0].Add(span).Sub(now)
}

// TryTake records a call if the cap and Cloudflare's last count allow one
// now; otherwise it returns how long until they will.
func (b *Budget) TryTake() (bool, time.Duration) {
	if _, err := b.take(); err != nil {
		return false, err.RetryAfter
	}
	return true, 0
}

// take is TryTake that returns the call's number, for observe, or the
// refusal, saying whose count refused it. Op is left for the caller. The
// call that spends the last of what Cloudflare's count left moves
// BlockedUntil to its reset, and the hook is told, as of a block: that
// call's answer may never come, and a new process must not send into the
// spent quota.
func (b *Budget) take() (uint64, *BudgetError) {
	b.mu.Lock()
	before := b.blockedUntilLocked()
	seq, err := b.takeLocked()
	b.unlockAndTell(before)
	return seq, err
}

// takeLocked is take. The caller holds mu.
func (b *Budget) takeLocked() (uint64, *BudgetError) {
	now := b.now()
	capFree, capWait := b.capFreeLocked(now)
	cfFree, cfReset, known := b.cloudflareFreeLocked(now)
	switch {
	case known && cfFree == 0:
		// Both may be spent: the call waits for the later of the two.
		return 0, &BudgetError{FromCloudflare: true, Limit: b.limit, Window: b.window, RetryAfter: max(cfReset, capWait)}
	case capFree == 0:
		return 0, &BudgetError{Limit: b.limit, Window: b.window, RetryAfter: capWait}
	}
	if b.limit > 0 {
		if len(b.ring) < b.limit {
			b.ring = append(b.ring, now)
			b.next = len(b.ring) % b.limit
		} else {
			b.ring[b.next] = now
			b.next = (b.next + 1) % b.limit
		}
	}
	b.taken++
	return b.taken, nil
}

// Free returns how many calls the cap and Cloudflare's last count allow
// right now, and how long until more are: when none are, until one is; when
// Cloudflare's count is what binds, until its window resets (no call frees
// up before then, so a caller keeping a reserve can sleep until that time
// instead of polling).
func (b *Budget) Free() (int, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	free, wait := b.capFreeLocked(now)
	cfFree, cfReset, known := b.cloudflareFreeLocked(now)
	switch {
	case !known:
		return free, wait
	case cfFree == 0:
		return 0, max(cfReset, wait)
	case cfFree <= free:
		return cfFree, cfReset
	}
	return free, wait
}

// BudgetError is a call the engine did not send because its own cap
// (config rate_limit) is spent, or because Cloudflare's last answer said
// its quota for the token's user is (FromCloudflare).
type BudgetError struct {
	Op             Op
	FromCloudflare bool
	Limit          int
	Window         time.Duration
	RetryAfter     time.Duration
}

func (e *BudgetError) Error() string {
	if e.FromCloudflare {
		return fmt.Sprintf("cloudflare %s: not sent: Cloudflare's last answer said no calls remain in its rate limit for this API token's user (other tools of the same user count too); its window resets in %s",
			e.Op, e.RetryAfter.Round(time.Millisecond))
	}
	return fmt.Sprintf("cloudflare %s: not sent: this mount's budget of %d Cloudflare calls per %s (config rate_limit) is spent; it allows another in %s",
		e.Op, e.Limit, e.Window, e.RetryAfter.Round(time.Millisecond))
}

func (e *BudgetError) CloudflareOp() Op { return e.Op }

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
