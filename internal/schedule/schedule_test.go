package schedule

import (
	"strings"
	"testing"
	"time"
)

// TestScheduleNextTimes: when each kind of schedule next falls due, and
// the window's end.
func TestScheduleNextTimes(t *testing.T) {
	at := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	now := at("2026-11-26T01:12:06.5Z") // a Thursday
	cases := []struct {
		name       string
		sched      Schedule
		after      time.Time
		want, ends string
	}{
		{"period", Schedule{Period: time.Hour}, now, "2026-11-26T02:12:06.5Z", ""},
		{"cron, UTC", Schedule{Cron: "0 2 * * 6"}, now, "2026-11-28T02:00:00Z", ""},
		{"cron with a window", Schedule{Cron: "0 2 * * 6", Window: time.Hour}, now, "2026-11-28T02:00:00Z", "2026-11-28T03:00:00Z"},
		{"cron, strictly after", Schedule{Cron: "0 2 * * 6"}, at("2026-11-28T02:00:00Z"), "2026-12-05T02:00:00Z", ""},
		{"every minute", Schedule{Cron: "@every 1m"}, now, "2026-11-26T01:13:06Z", ""},
		{"none", Schedule{}, now, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			next, ends := tc.sched.Next(tc.after)
			if formatTime(next) != tc.want || formatTime(ends) != tc.ends {
				t.Errorf("next %s, window ends %s; want %s, %s", formatTime(next), formatTime(ends), tc.want, tc.ends)
			}
		})
	}
}

// TestAScheduleChangeNeverFallsDueAtOnce: after a change, a period counts
// from the stored key while that is still ahead, from now once it is not;
// and nothing falls due less than the floor (min_rotation_period) after the
// stored key.
func TestAScheduleChangeNeverFallsDueAtOnce(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	stored := now.Add(-10 * time.Minute)
	cases := []struct {
		name  string
		sched Schedule
		floor time.Duration
		want  time.Time
	}{
		{"a period longer than the key's age", Schedule{Period: time.Hour}, time.Minute, stored.Add(time.Hour)},
		{"a period shorter than the key's age", Schedule{Period: 5 * time.Minute}, time.Minute, now.Add(5 * time.Minute)},
		{"a cron expression", Schedule{Cron: "0 13 * * *"}, time.Minute, now.Add(time.Hour)},
		{"a cron time within the floor of the key", Schedule{Cron: "5 * * * *"}, time.Hour, now.Add(65 * time.Minute)},
		{"a cron time just at the floor", Schedule{Cron: "50 * * * *"}, time.Hour, stored.Add(time.Hour)},
		{"a period under a floor raised since", Schedule{Period: 5 * time.Minute}, time.Hour, stored.Add(time.Hour)},
		{"an old key", Schedule{Cron: "5 * * * *"}, time.Hour, now.Add(5 * time.Minute)},
	}
	for _, tc := range cases {
		from := stored
		if tc.name == "an old key" {
			from = now.Add(-24 * time.Hour)
		}
		if next, _ := tc.sched.NextAfterChange(from, now, tc.floor); !next.Equal(tc.want) {
			t.Errorf("%s: next %s, want %s", tc.name, formatTime(next), formatTime(tc.want))
		}
	}
}

// TestARotationKeepsASchedulesOwnTimes: after a rotation, a schedule within
// the floor falls due at its own next time, however late the rotation was
// (an hourly expression under a floor of 1h must not skip every other
// hour); one shorter than the floor, written before it was raised, is held
// back to the floor after the stored key, on its own times for cron.
func TestARotationKeepsASchedulesOwnTimes(t *testing.T) {
	stored := time.Date(2026, 11, 26, 2, 0, 0, 300_000_000, time.UTC) // due at 02:00, stored 0.3s later
	cases := []struct {
		name  string
		sched Schedule
		floor time.Duration
		want  string
	}{
		{"hourly under a floor of 1h", Schedule{Cron: "0 * * * *"}, time.Hour, "2026-11-26T03:00:00Z"},
		{"a period", Schedule{Period: 2 * time.Hour}, time.Hour, "2026-11-26T04:00:00.3Z"},
		{"a period shorter than a raised floor", Schedule{Period: 5 * time.Minute}, time.Hour, "2026-11-26T03:00:00.3Z"},
		{"cron shorter than a raised floor", Schedule{Cron: "*/10 * * * *"}, time.Hour, "2026-11-26T03:10:00Z"},
		{"cron with a window", Schedule{Cron: "0 */6 * * *", Window: time.Hour}, 6 * time.Hour, "2026-11-26T06:00:00Z"},
	}
	for _, tc := range cases {
		if next, _ := tc.sched.NextAfterRotation(stored, stored, tc.floor); formatTime(next) != tc.want {
			t.Errorf("%s: next %s, want %s", tc.name, formatTime(next), tc.want)
		}
	}
	// A time given up in a missed window: the next one after it, held back
	// to the floor after the stored key for a schedule shorter than it.
	gaveUp := stored.Add(15 * time.Minute)
	if next, ends := (Schedule{Cron: "*/10 * * * *", Window: time.Minute}).NextAfterRotation(stored, gaveUp, time.Hour); formatTime(next) != "2026-11-26T03:10:00Z" || formatTime(ends) != "2026-11-26T03:11:00Z" {
		t.Errorf("after a missed window: next %s, window ends %s", formatTime(next), formatTime(ends))
	}
}

// TestCronShortestGap: the shortest time between two successive times of
// an expression, over every pattern the calendar has.
func TestCronShortestGap(t *testing.T) {
	cases := []struct {
		spec string
		want time.Duration
	}{
		{"* * * * *", time.Minute},
		{"0 * * * *", time.Hour},
		{"0,30 * * * *", 30 * time.Minute},
		{"59 * * * *", time.Hour},
		{"0 1,2 * * *", time.Hour},
		{"0 0,23 * * *", time.Hour},
		{"30 23 * * *", 24 * time.Hour},
		{"0 2 * * 6", 7 * 24 * time.Hour},
		{"0 0 * * 1,3,5", 48 * time.Hour},
		{"0 0,20 * * 1,2", 4 * time.Hour}, // Monday 20:00, Tuesday 00:00
		{"0 0 */2 * *", 24 * time.Hour},   // the 31st, then the 1st
		{"0 0 1,15 * *", 14 * 24 * time.Hour},
		{"0 0 31 * *", 31 * 24 * time.Hour}, // July 31, August 31
		{"0 0 1 1 *", 365 * 24 * time.Hour},
		{"0 0 29 2 *", 1461 * 24 * time.Hour}, // leap days, four years apart at best
		{"0 0 29 2 1", 24 * time.Hour},        // leap days or Mondays: Monday the 28th, then the 29th
		{"0 0 13 * 5", 24 * time.Hour},        // the 13th or a Friday: Friday the 12th, Saturday the 13th
		{"0 12 * 2 *", 24 * time.Hour},        // every day of February
		{"0 0 1 2 * ", 365 * 24 * time.Hour},  // a trailing space
		{"@hourly", time.Hour},
		{"@weekly", 7 * 24 * time.Hour},
		{"@every 90m", 90 * time.Minute},
	}
	for _, tc := range cases {
		sched, problem := ParseCron(tc.spec, time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
		if problem != "" {
			t.Errorf("%q: %s", tc.spec, problem)
			continue
		}
		if got := cronShortestGap(sched); got != tc.want {
			t.Errorf("%q: shortest gap %s, want %s", tc.spec, got, tc.want)
		}
	}
}

// BenchmarkCronShortestGap: the worst case, an expression whose days are
// never consecutive, so that the whole 400-year cycle is walked.
func BenchmarkCronShortestGap(b *testing.B) {
	sched, problem := ParseCron("0 0 29 2 *", time.Now())
	if problem != "" {
		b.Fatal(problem)
	}
	for b.Loop() {
		cronShortestGap(sched)
	}
}

// TestCronProblemsNameTheFieldNotTheValue: each refusal names
// rotation_schedule and never repeats what was written.
func TestCronProblemsNameTheFieldNotTheValue(t *testing.T) {
	now := time.Now()
	for _, spec := range []string{"", "x", "0 2 * * 6 secretvalue", "61 * * * *", "@every 59s", "0 0 31 4 *", "CRON_TZ=No/Where 0 2 * * *", "CRON_TZ=Europe/Berlin 0 2 * * 6", "CRON_TZ=UTC", "TZ=UTC"} {
		_, problem := ParseCron(spec, now)
		if !strings.HasPrefix(problem, "rotation_schedule ") {
			t.Errorf("%q: problem %q", spec, problem)
		}
		if strings.Contains(problem, "secretvalue") || strings.Contains(problem, "No/Where") {
			t.Errorf("%q: the problem repeats the value: %q", spec, problem)
		}
	}
	if _, problem := ParseCron("@weekly", now); problem != "" {
		t.Errorf("@weekly: %s", problem)
	}
}

// formatTime renders a time as the engine's responses do ("" for zero).
func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}
