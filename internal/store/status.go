package store

// What a status read takes from the indexes, each at a bounded cost
// however many tunnels the mount has: the schedule's first minutes
// (due/) and the first tunnels of each attention kind (attention/). It
// reads no record, so it can show no key.

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
	Overdue        int
	OverdueAtLeast bool
	// Next is the start of the minute of the earliest scheduled rotation
	// still to be made (late, when Overdue is not zero; zero: none). The
	// schedule is indexed by minute, and a status read reads no record.
	Next time.Time
}

// SummarizeSchedule reads the schedule's index: one List of its minutes,
// and one of each minute it looks into, at most scheduleMinutesListed.
// Bulk jobs' entries are not scheduled rotations, and are left out.
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

// AttentionItem is one tunnel of the attention/ index.
type AttentionItem struct {
	Tunnel Tunnel
	AttentionEntry
}

// ListAttention returns the first n tunnels of an attention kind, in key
// order, with what their entries say: a List per account with such
// tunnels, until n are found, and a Get per tunnel.
func ListAttention(ctx context.Context, s logical.Storage, kind string, n int) ([]AttentionItem, error) {
	if n <= 0 {
		return nil, nil
	}
	tunnels, _, err := listTunnelsAfter(ctx, s, AttentionPrefix+kind+"/", Tunnel{}, n)
	if err != nil {
		return nil, err
	}
	out := make([]AttentionItem, 0, len(tunnels))
	for _, t := range tunnels {
		entry, err := s.Get(ctx, t.attentionKey(kind))
		if err != nil {
			return nil, fmt.Errorf("read the attention index: %w", err)
		}
		if entry == nil {
			continue // gone since it was listed
		}
		item := AttentionItem{Tunnel: t}
		if err := entry.DecodeJSON(&item.AttentionEntry); err != nil {
			return nil, fmt.Errorf("decode the attention index entry of %s: %w", t, err)
		}
		out = append(out, item)
	}
	return out, nil
}
