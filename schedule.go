package main

// A tunnel's schedule: a rotation period, or a cron expression with an
// optional window. Network teams rotate in maintenance windows, and the two
// tunnels of a site are given different times so that a site never loses
// both at once (Cloudflare activates a new key the moment it is generated,
// and the tunnel is down until the router has it too); a period cannot say
// "Saturdays at 02:00", a cron expression can.

import (
	"fmt"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

const (
	// minRotationPeriod keeps a schedule from spending the rate limit on
	// one tunnel. A cron expression cannot fall due more often.
	minRotationPeriod = time.Minute
	// minRotationWindow: the scheduler may have to wait for the budget or
	// for a settling rotation; a shorter window would skip rotations that
	// were only seconds late.
	minRotationWindow = time.Minute
)

// rotationSchedule is when the scheduler rotates a tunnel: every Period, or
// at the times of Cron, each rotation starting no later than Window after
// its time (0: whenever it can). The zero value is no schedule.
type rotationSchedule struct {
	Period time.Duration
	Cron   string
	Window time.Duration
}

// set reports whether there is a schedule.
func (s rotationSchedule) set() bool { return s.Period > 0 || s.Cron != "" }

// next returns the schedule's first time after after, and the end of that
// time's window (zero without a window); both zero when the schedule has no
// such time. Cron times are in UTC.
func (s rotationSchedule) next(after time.Time) (at, windowEnds time.Time) {
	switch {
	case s.Period > 0:
		return after.Add(s.Period).UTC(), time.Time{}
	case s.Cron != "":
		sched, problem := parseCron(s.Cron, after)
		if problem != "" {
			// Checked when written; a stored expression that no longer
			// parses has no next time rather than a wrong one.
			return time.Time{}, time.Time{}
		}
		at = sched.Next(after.UTC()).UTC()
		if !at.IsZero() && s.Window > 0 {
			windowEnds = at.Add(s.Window)
		}
	}
	return at, windowEnds
}

// nextAfterChange returns when a tunnel whose key was stored at storedAt
// is next rotated once its schedule is changed to s (schedule-only writes,
// path_psk_schedule.go): a period counts from the stored key, as if it had
// been set at that rotation, but never from before now, so that a change of
// schedule alone never has the key rotated at once; a cron expression
// falls due at its next time.
func (s rotationSchedule) nextAfterChange(storedAt, now time.Time) (at, windowEnds time.Time) {
	if s.Period > 0 && storedAt.Add(s.Period).After(now) {
		return s.next(storedAt)
	}
	return s.next(now)
}

// parseCron parses a standard five-field cron expression (as Vault's
// database static roles take for rotation_schedule). problem, when not "",
// says what is wrong without repeating the value: a mistyped field can hold
// anything, a key included.
//
// The expression is in UTC and may not name a time zone (CRON_TZ= or TZ=):
// where clocks change for daylight saving, a daily time falls twice on the
// night they go back (two rotations) and not at all on the night they go
// forward (a week lost for a weekly schedule), and the parser itself panics
// on a zone with no fields after it.
func parseCron(spec string, now time.Time) (sched cron.Schedule, problem string) {
	malformed := fmt.Sprintf("rotation_schedule must be a standard cron expression of five fields "+
		"(minute hour day-of-month month day-of-week, in UTC), "+
		"such as \"0 2 * * 6\" for Saturdays at 02:00 UTC (got %d characters in %d fields)", len(spec), len(strings.Fields(spec)))
	if trimmed := strings.TrimSpace(spec); strings.HasPrefix(trimmed, "CRON_TZ=") || strings.HasPrefix(trimmed, "TZ=") {
		return nil, "rotation_schedule is in UTC and takes no time zone (CRON_TZ= or TZ=): where clocks change for daylight saving, " +
			"a daily time falls twice or not at all on the nights they change; convert the maintenance window to UTC"
	}
	defer func() {
		// The parser panics on some malformed input; one process serves
		// every mount, so no input may take it down.
		if recover() != nil {
			sched, problem = nil, malformed
		}
	}()
	sched, err := cron.ParseStandard(spec)
	if err != nil {
		return nil, malformed
	}
	if every, ok := sched.(cron.ConstantDelaySchedule); ok && every.Delay < minRotationPeriod {
		return nil, fmt.Sprintf("rotation_schedule must not fall due more often than every %s", minRotationPeriod)
	}
	if sched.Next(now.UTC()).IsZero() {
		return nil, "rotation_schedule never falls due: no date matches it"
	}
	return sched, ""
}
