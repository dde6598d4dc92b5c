package store

// What a status read shows of the schedule, taken from its index (due/) by
// the scheduler, which lists it anyway, and kept in the census: listing
// due/ is a walk over every entry in it in Vault's storage backends (Raft's
// included), 100,000 of them on a large mount, which a status read must
// not pay for. Beyond that List, the summary lists a few minutes, bounded.

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	// OverdueAfter is how late a scheduled rotation must be to count as
	// overdue: the scheduler works a rotation at its second, so one still
	// in the schedule a minute later is waiting for something (the budget,
	// Cloudflare's block, a settle window, a stopped scheduler).
	OverdueAfter = time.Minute
	// scheduleMinutesListed bounds the minutes of the schedule a status
	// read lists (one storage List each), and OverdueCounted the overdue
	// rotations it counts: beyond either it says "at least".
	scheduleMinutesListed = 12
	OverdueCounted        = 1000
)

// ScheduleSummary is what a status read says of the schedule.
type ScheduleSummary struct {
	// Overdue counts the scheduled rotations due more than OverdueAfter
	// ago; OverdueAtLeast says there may be more than it counted.
	Overdue        int  `json:"overdue"`
	OverdueAtLeast bool `json:"overdue_at_least,omitempty"`
	// Next is the start of the minute of the earliest scheduled rotation
	// still to be made (late, when Overdue is not zero; zero: none): the
	// schedule is indexed by minute.
	Next time.Time `json:"next,omitzero"`
}

// SummarizeSchedule reads the schedule's index: one List of its minutes
// (which walks every entry), and one of each minute it looks into, at most
// scheduleMinutesListed. Bulk jobs' entries are not scheduled rotations,
// and are left out.
func SummarizeSchedule(ctx context.Context, s logical.Storage, now time.Time) (ScheduleSummary, error) {
	minutes, err := s.List(ctx, DuePrefix)
	if err != nil {
		return ScheduleSummary{}, fmt.Errorf("list the schedule: %w", err)
	}
	sort.Strings(minutes)
	// Entries of minutes before this one are due more than OverdueAfter ago.
	overdueBefore := DueMinute(now.Add(-OverdueAfter), false)
	var sum ScheduleSummary
	listed := 0
	for _, m := range minutes {
		minute, err := strconv.ParseInt(strings.TrimSuffix(m, "/"), 10, 64)
		if err != nil {
			continue
		}
		overdue := minute < overdueBefore
		if !overdue && !sum.Next.IsZero() {
			break
		}
		if listed == scheduleMinutesListed || sum.Overdue >= OverdueCounted {
			sum.OverdueAtLeast = sum.OverdueAtLeast || overdue
			break
		}
		keys, err := s.List(ctx, DuePrefix+m)
		if err != nil {
			return ScheduleSummary{}, fmt.Errorf("list the schedule: %w", err)
		}
		listed++
		n := 0
		for _, k := range keys {
			if _, _, bulk, ok := ParseDueName(k); ok && !bulk {
				n++
			}
		}
		if n > 0 && sum.Next.IsZero() {
			sum.Next = time.Unix(minute*60, 0).UTC()
		}
		if overdue {
			sum.Overdue += n
		}
	}
	if sum.Overdue > OverdueCounted {
		sum.Overdue, sum.OverdueAtLeast = OverdueCounted, true
	}
	return sum, nil
}
