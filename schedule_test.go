package main

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
		sched      rotationSchedule
		after      time.Time
		want, ends string
	}{
		{"period", rotationSchedule{Period: time.Hour}, now, "2026-11-26T02:12:06.5Z", ""},
		{"cron, UTC", rotationSchedule{Cron: "0 2 * * 6"}, now, "2026-11-28T02:00:00Z", ""},
		{"cron with a window", rotationSchedule{Cron: "0 2 * * 6", Window: time.Hour}, now, "2026-11-28T02:00:00Z", "2026-11-28T03:00:00Z"},
		{"cron, strictly after", rotationSchedule{Cron: "0 2 * * 6"}, at("2026-11-28T02:00:00Z"), "2026-12-05T02:00:00Z", ""},
		{"every minute", rotationSchedule{Cron: "@every 1m"}, now, "2026-11-26T01:13:06Z", ""},
		{"none", rotationSchedule{}, now, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			next, ends := tc.sched.next(tc.after)
			if formatTime(next) != tc.want || formatTime(ends) != tc.ends {
				t.Errorf("next %s, window ends %s; want %s, %s", formatTime(next), formatTime(ends), tc.want, tc.ends)
			}
		})
	}
}

// TestAScheduleChangeNeverFallsDueAtOnce: after a change, a period counts
// from the stored key while that is still ahead, from now once it is not.
func TestAScheduleChangeNeverFallsDueAtOnce(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	stored := now.Add(-10 * time.Minute)
	if next, _ := (rotationSchedule{Period: time.Hour}).nextAfterChange(stored, now); !next.Equal(stored.Add(time.Hour)) {
		t.Errorf("a period longer than the key's age: %s", formatTime(next))
	}
	if next, _ := (rotationSchedule{Period: 5 * time.Minute}).nextAfterChange(stored, now); !next.Equal(now.Add(5 * time.Minute)) {
		t.Errorf("a period shorter than the key's age: %s", formatTime(next))
	}
	if next, _ := (rotationSchedule{Cron: "0 13 * * *"}).nextAfterChange(stored, now); !next.Equal(now.Add(time.Hour)) {
		t.Errorf("a cron expression: %s", formatTime(next))
	}
}

// TestCronProblemsNameTheFieldNotTheValue: each refusal names
// rotation_schedule and never repeats what was written.
func TestCronProblemsNameTheFieldNotTheValue(t *testing.T) {
	now := time.Now()
	for _, spec := range []string{"", "x", "0 2 * * 6 secretvalue", "61 * * * *", "@every 59s", "0 0 31 4 *", "CRON_TZ=No/Where 0 2 * * *", "CRON_TZ=Europe/Berlin 0 2 * * 6", "CRON_TZ=UTC", "TZ=UTC"} {
		_, problem := parseCron(spec, now)
		if !strings.HasPrefix(problem, "rotation_schedule ") {
			t.Errorf("%q: problem %q", spec, problem)
		}
		if strings.Contains(problem, "secretvalue") || strings.Contains(problem, "No/Where") {
			t.Errorf("%q: the problem repeats the value: %q", spec, problem)
		}
	}
	if _, problem := parseCron("@weekly", now); problem != "" {
		t.Errorf("@weekly: %s", problem)
	}
}
