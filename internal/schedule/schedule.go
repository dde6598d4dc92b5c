package schedule

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
	// MinPeriod keeps a schedule from spending the rate limit on
	// one tunnel. A cron expression cannot fall due more often. It is the
	// least config min_rotation_period may be; that floor (1h by default,
	// path_config.go) is what writes are held to.
	MinPeriod = time.Minute
	// MinWindow: the scheduler may have to wait for the budget or
	// for a settling rotation; a shorter window would skip rotations that
	// were only seconds late.
	MinWindow = time.Minute
)

// Schedule is when the scheduler rotates a tunnel: every Period, or
// at the times of Cron, each rotation starting no later than Window after
// its time (0: whenever it can). The zero value is no schedule.
type Schedule struct {
	Period time.Duration
	Cron   string
	Window time.Duration
}

// set reports whether there is a schedule.
func (s Schedule) Set() bool { return s.Period > 0 || s.Cron != "" }

// next returns the schedule's first time after after, and the end of that
// time's window (zero without a window); both zero when the schedule has no
// such time. Cron times are in UTC.
func (s Schedule) Next(after time.Time) (at, windowEnds time.Time) {
	switch {
	case s.Period > 0:
		return after.Add(s.Period).UTC(), time.Time{}
	case s.Cron != "":
		sched, problem := ParseCron(s.Cron, after)
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

// nextNotBefore is next, but never earlier than notBefore (zero: no
// bound): a period runs from after and is held back to notBefore; a cron
// expression falls due at its first time that is not before notBefore.
func (s Schedule) nextNotBefore(after, notBefore time.Time) (at, windowEnds time.Time) {
	at, windowEnds = s.Next(after)
	if at.IsZero() || !at.Before(notBefore) {
		return at, windowEnds
	}
	if s.Period > 0 {
		return notBefore.UTC(), time.Time{}
	}
	// The cron parser's times are strictly after the time given, to the
	// second: one nanosecond before notBefore lets notBefore itself match.
	return s.Next(notBefore.Add(-time.Nanosecond))
}

// NextAfterRotation returns when a tunnel whose key was stored at storedAt
// is next rotated, after = storedAt, or, for a scheduled time that passed
// unused (a missed window), the time it was given up. A schedule that
// falls due more often than floor (min_rotation_period) was written before
// an administrator raised the floor: its next time is held back to floor
// after the stored key. A schedule within the floor keeps its own times: a
// rotation that started late (budget spent, Vault down) is followed by the
// next scheduled time, not by one a floor later, or an hourly expression
// under a floor of 1h would skip every other hour.
func (s Schedule) NextAfterRotation(storedAt, after time.Time, floor time.Duration) (at, windowEnds time.Time) {
	if s.ShortestGap(after) < floor {
		return s.nextNotBefore(after, storedAt.Add(floor))
	}
	return s.Next(after)
}

// NextAfterUnscheduled returns when a tunnel whose key was stored at
// storedAt by a rotation its schedule did not ask for (an operator's write,
// a heal, a bulk job) is next rotated by the schedule: at its first time
// at least floor after the key, so that no schedule brings a key within
// min_rotation_period of one made outside it.
func (s Schedule) NextAfterUnscheduled(storedAt time.Time, floor time.Duration) (at, windowEnds time.Time) {
	return s.nextNotBefore(storedAt, storedAt.Add(floor))
}

// NextAfterChange returns when a tunnel whose key was stored at storedAt
// is next rotated once its schedule is changed to s (schedule-only writes,
// path_psk_schedule.go): a period counts from the stored key, as if it had
// been set at that rotation, but never from before now, so that a change of
// schedule alone never has the key rotated at once; a cron expression
// falls due at its next time. Either way the next rotation is never less
// than floor (min_rotation_period) after the stored key: every expression
// "M * * * *" falls due hourly, but a team that switched it each minute to
// the minute about to come would otherwise have the key rotated every
// minute.
func (s Schedule) NextAfterChange(storedAt, now time.Time, floor time.Duration) (at, windowEnds time.Time) {
	from := now
	if s.Period > 0 && storedAt.Add(s.Period).After(now) {
		from = storedAt
	}
	return s.nextNotBefore(from, storedAt.Add(floor))
}

// ShortestGap is the shortest time between two successive times of the
// schedule: its period, or what cronShortestGap finds (0 when there is no
// schedule or the expression no longer parses, or falls due no more after
// now).
func (s Schedule) ShortestGap(now time.Time) time.Duration {
	switch {
	case s.Period > 0:
		return s.Period
	case s.Cron != "":
		sched, problem := ParseCron(s.Cron, now)
		if problem != "" {
			return 0
		}
		return cronShortestGap(sched)
	}
	return 0
}

// gregorianCycle is the days of 400 Gregorian years, a whole number of
// weeks (20,871): the calendar, weekdays and leap days included, repeats
// after it, so the days a cron expression matches in one cycle are the
// days it matches in every cycle.
const gregorianCycle = 146097

// cronShortestGap returns the shortest time between two successive times
// of a parsed cron expression (0 when it has no times), exactly and with
// bounded work, so that a write cannot be made slow: a SpecSchedule's times
// are the days it matches, each at the same times of day. The shortest gap
// is either between two times of one day, or from the last time of a
// matching day to the first of the next matching day, and the days are
// found by one pass over a 400-year cycle (146,097 days, stopping early at
// a gap of one day, the least there is); the times of day are at most
// 86,400 seconds. Iterating Next instead would need 400 years of times to
// see every pattern ("0 0 29 2 1" falls on leap days and on Mondays).
func cronShortestGap(sched cron.Schedule) time.Duration {
	switch s := sched.(type) {
	case cron.ConstantDelaySchedule:
		return s.Delay
	case *cron.SpecSchedule:
		return specShortestGap(s)
	}
	// No other kind comes out of cron.ParseStandard; an unknown one is
	// taken as falling due all the time rather than guessed at.
	return 0
}

func specShortestGap(s *cron.SpecSchedule) time.Duration {
	// The times of day, in seconds, ascending.
	var first, last, prev, shortest int = -1, -1, -1, -1
	for h := 0; h < 24; h++ {
		if s.Hour&(1<<uint(h)) == 0 {
			continue
		}
		for m := 0; m < 60; m++ {
			if s.Minute&(1<<uint(m)) == 0 {
				continue
			}
			for sec := 0; sec < 60; sec++ {
				if s.Second&(1<<uint(sec)) == 0 {
					continue
				}
				tod := h*3600 + m*60 + sec
				if first < 0 {
					first = tod
				}
				if prev >= 0 && (shortest < 0 || tod-prev < shortest) {
					shortest = tod - prev
				}
				prev, last = tod, tod
			}
		}
	}
	if first < 0 {
		return 0
	}
	days := shortestDayGap(s)
	if days == 0 {
		return 0
	}
	across := days*24*3600 - (last - first)
	if shortest < 0 || across < shortest {
		shortest = across
	}
	return time.Duration(shortest) * time.Second
}

// shortestDayGap returns the fewest days between two successive days a
// cron expression matches (0: it matches none), with the day rule of
// robfig/cron's dayMatches: when day-of-month or day-of-week is "*", a day
// must match both, otherwise either.
func shortestDayGap(s *cron.SpecSchedule) int {
	const starBit = 1 << 63
	both := s.Dom&starBit != 0 || s.Dow&starBit != 0
	matches := func(month, day, weekday int) bool {
		if s.Month&(1<<uint(month)) == 0 {
			return false
		}
		dom, dow := s.Dom&(1<<uint(day)) != 0, s.Dow&(1<<uint(weekday)) != 0
		if both {
			return dom && dow
		}
		return dom || dow
	}
	firstDay, lastDay, shortest := -1, -1, 0
	index, weekday := 0, int(time.Saturday) // 2000-01-01
	for year := 2000; year < 2400; year++ {
		for month := 1; month <= 12; month++ {
			for day := 1; day <= daysIn(year, month); day++ {
				if matches(month, day, weekday) {
					if firstDay < 0 {
						firstDay = index
					} else if gap := index - lastDay; shortest == 0 || gap < shortest {
						if shortest = gap; shortest == 1 {
							return 1
						}
					}
					lastDay = index
				}
				index++
				weekday = (weekday + 1) % 7
			}
		}
	}
	if firstDay < 0 {
		return 0
	}
	// From the cycle's last matching day to the next cycle's first.
	if gap := firstDay + gregorianCycle - lastDay; shortest == 0 || gap < shortest {
		shortest = gap
	}
	return shortest
}

func daysIn(year, month int) int {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}

// ParseCron parses a standard five-field cron expression (as Vault's
// database static roles take for rotation_schedule). problem, when not "",
// says what is wrong without repeating the value: a mistyped field can hold
// anything, a key included.
//
// The expression is in UTC and may not name a time zone (CRON_TZ= or TZ=):
// where clocks change for daylight saving, a daily time falls twice on the
// night they go back (two rotations) and not at all on the night they go
// forward (a week lost for a weekly schedule), and the parser itself panics
// on a zone with no fields after it.
func ParseCron(spec string, now time.Time) (sched cron.Schedule, problem string) {
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
	if every, ok := sched.(cron.ConstantDelaySchedule); ok && every.Delay < MinPeriod {
		return nil, fmt.Sprintf("rotation_schedule must not fall due more often than every %s", MinPeriod)
	}
	if sched.Next(now.UTC()).IsZero() {
		return nil, "rotation_schedule never falls due: no date matches it"
	}
	return sched, ""
}
