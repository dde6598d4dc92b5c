package cloudflare

import (
	"fmt"
	"sync"
	"time"
)

// Budget caps the calls one mount sends to Cloudflare in any window of time.
// Cloudflare counts requests per token per fixed window and locks a token
// that goes over out of the whole API for the rest of it, so the cap must
// hold over every window, wherever it starts: a token bucket whose burst
// equals the budget can spend twice the budget across a window boundary. The
// Budget therefore keeps the times of the last limit calls (a sliding log)
// and allows a call only if the oldest of them left the window.
type Budget struct {
	mu sync.Mutex
	// blockedUntil is when Cloudflare's own block of the token ends, as its
	// last 429 announced; nothing is sent before.
	blockedUntil time.Time
	limit        int
	window       time.Duration
	now          func() time.Time
	// ring holds the times of the last calls, at most limit of them;
	// next is where the following call goes, which is also the oldest.
	ring []time.Time
	next int
}

// inFlightMargin widens the window a little: the Budget times a call when it
// is sent, Cloudflare when it arrives, and arrival times jitter.
func inFlightMargin(window time.Duration) time.Duration {
	return max(window/100, 100*time.Millisecond)
}

// NewBudget returns a Budget of limit calls per window; a limit of 0 caps
// nothing and only tracks Cloudflare's blocks.
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
func (b *Budget) Block(until time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	until = minTime(until, b.now().Add(maxBlock))
	if until.After(b.blockedUntil) {
		b.blockedUntil = until
	}
}

// Blocked returns how long Cloudflare's block still lasts, zero when none.
func (b *Budget) Blocked() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	return max(b.blockedUntil.Sub(b.now()), 0)
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

// TryTake records a call if the cap allows one now; otherwise it returns how
// long until it will.
func (b *Budget) TryTake() (bool, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	if b.limit == 0 {
		return true, 0
	}
	if len(b.ring) < b.limit {
		b.ring = append(b.ring, now)
		b.next = len(b.ring) % b.limit
		return true, 0
	}
	if wait := b.ring[b.next].Add(b.window + inFlightMargin(b.window)).Sub(now); wait > 0 {
		return false, wait
	}
	b.ring[b.next] = now
	b.next = (b.next + 1) % b.limit
	return true, 0
}

// Free returns how many calls the cap allows right now, and, when that is
// none, how long until one.
func (b *Budget) Free() (int, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
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

// BudgetError is a call the engine did not send because its own cap
// (config rate_limit) is spent.
type BudgetError struct {
	Op         Op
	Limit      int
	Window     time.Duration
	RetryAfter time.Duration
}

func (e *BudgetError) Error() string {
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
