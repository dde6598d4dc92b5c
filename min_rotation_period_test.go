package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

// newKeys runs the scheduler as its loop would, one pass a minute of the
// test clock for d, calling each (when not nil) before every minute, and
// returns when each key the passes stored was stored.
func newKeys(t *testing.T, env *testEnv, d time.Duration, each func()) []time.Time {
	t.Helper()
	var stored []time.Time
	last := record(t, env, env.tunnel.ID).StoredAt
	for elapsed := time.Duration(0); elapsed < d; elapsed += time.Minute {
		if each != nil {
			each()
		}
		env.clock.Advance(time.Minute)
		drain(t, env)
		if rec := record(t, env, env.tunnel.ID); !rec.StoredAt.Equal(last) {
			last = rec.StoredAt
			stored = append(stored, last)
		}
	}
	return stored
}

// assertSpaced fails unless each key in stored came at least floor after
// the one before it (after, for the first: the key stored before the run).
func assertSpaced(t *testing.T, after time.Time, stored []time.Time, floor time.Duration) {
	t.Helper()
	close, first := 0, ""
	for i, at := range stored {
		if gap := at.Sub(after); gap < floor {
			if close++; close == 1 {
				first = fmt.Sprintf("key %d of %d was stored %s after the one before it", i+1, len(stored), gap.Round(time.Second))
			}
		}
		after = at
	}
	if close > 0 {
		t.Errorf("%d keys came less than the floor of %s after the one before; the first: %s", close, floor, first)
	}
}

// TestAScheduleOnlyTeamCannotForceRotations: docs/policies/operator.hcl
// says a team given only psk/+/+/schedule "may reschedule but not rotate".
// The shortest schedule such a team can write on a tunnel whose key is old
// must not have the scheduler make a key a minute: every rotation is an
// outage until the router has the new key. With the default floor
// (min_rotation_period 1h), the scheduler makes at most one key per hour.
func TestAScheduleOnlyTeamCannotForceRotations(t *testing.T) {
	const floor = time.Hour // the default min_rotation_period
	env := newConfiguredEnv(t)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.clock.Advance(30 * 24 * time.Hour) // the key is a month old
	old := record(t, env, env.tunnel.ID).StoredAt

	// Refused or not: what counts is what the scheduler does afterwards.
	resp, err := env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": "1m"})
	t.Logf("schedule rotation_period=1m: status %d %s", httpStatus(resp, err), errorText(resp, err))
	firstMinutes := newKeys(t, env, 3*time.Minute, nil)
	if len(firstMinutes) > 1 {
		t.Errorf("%d keys in the 3 minutes after a schedule-only write of rotation_period=1m; at most one per %s", len(firstMinutes), floor)
	}
	// The shortest schedule the floor lets it write: one key an hour.
	env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": "1h"}))
	later := newKeys(t, env, 3*time.Hour, nil)
	all := append(firstMinutes, later...)
	if len(all) > 4 {
		t.Errorf("%d keys in 3h3m; at most one per %s", len(all), floor)
	}
	if len(later) != 3 {
		t.Errorf("rotation_period=1h: %d keys in 3h, want 3", len(later))
	}
	assertSpaced(t, old, all, floor)
}

// TestACronSwitchDoesNotBringTheNextRotationCloser: every hourly cron
// expression respects a floor of one hour, but a team that switches it each
// minute to the minute about to come ("1 * * * *" right after a rotation at
// :00) would have the scheduler rotate every minute. A schedule change never
// brings the next rotation closer than the floor after the key stored last.
func TestACronSwitchDoesNotBringTheNextRotationCloser(t *testing.T) {
	const floor = time.Hour // the default min_rotation_period
	env := newConfiguredEnv(t)
	schedulerOver(t, env, env.storage)
	atSecondOfMinute(env, 30)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_schedule": "0 * * * *"}))
	first := record(t, env, env.tunnel.ID).StoredAt

	chase := func() {
		next := env.clock.Now().Add(time.Minute).UTC()
		spec := fmt.Sprintf("%d * * * *", next.Minute())
		env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_schedule": spec}))
		if rec := record(t, env, env.tunnel.ID); rec.NextRotation.Sub(rec.StoredAt) < floor {
			t.Fatalf("after a switch to %q at %s: next rotation %s, %s after the key stored at %s",
				spec, store.FormatTime(env.clock.Now()), store.FormatTime(rec.NextRotation), rec.NextRotation.Sub(rec.StoredAt).Round(time.Second), store.FormatTime(rec.StoredAt))
		}
	}
	stored := newKeys(t, env, 3*time.Hour, chase)
	t.Logf("%d keys in 3h of schedule switches", len(stored))
	if len(stored) > 3 {
		t.Errorf("%d keys in 3h of schedule switches; at most one per %s", len(stored), floor)
	}
	assertSpaced(t, first, stored, floor)
}

// lowerTheFloor sets min_rotation_period to its least, 1m, as an
// administrator would for a lab: tests of the scheduler's timing use
// schedules of minutes, which the default floor of 1h refuses.
func lowerTheFloor(t *testing.T, env *testEnv) {
	t.Helper()
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"min_rotation_period": "1m"}))
}

// TestSchedulesBelowTheFloorAreRefused: a write of psk/ or of its schedule
// path whose rotation_period is shorter than min_rotation_period, or whose
// rotation_schedule has two successive times closer than it, is a 400 that
// names min_rotation_period and its value, sends nothing and stores
// nothing; a schedule exactly at the floor is taken.
func TestSchedulesBelowTheFloorAreRefused(t *testing.T) {
	cases := []struct {
		floor   string // "": the default, 1h
		data    map[string]any
		refused bool
	}{
		{"", map[string]any{"rotation_period": "30m"}, true},
		{"", map[string]any{"rotation_period": "3599s"}, true},
		{"", map[string]any{"rotation_period": "1h"}, false},
		{"", map[string]any{"rotation_schedule": "* * * * *"}, true},
		{"", map[string]any{"rotation_schedule": "*/30 * * * *"}, true},
		{"", map[string]any{"rotation_schedule": "@every 59m"}, true},
		{"", map[string]any{"rotation_schedule": "0 0,23 * * *"}, false}, // 23:00 to 00:00: just the floor
		{"", map[string]any{"rotation_schedule": "0 * * * *", "rotation_window": "10m"}, false},
		{"", map[string]any{"rotation_schedule": "@hourly"}, false},
		{"", map[string]any{"rotation_schedule": "0 2 * * 6"}, false},
		{"1h", map[string]any{"rotation_schedule": "0,30 * * * *"}, true},
		{"1h", map[string]any{"rotation_schedule": "59 * * * *"}, false},
		{"1m", map[string]any{"rotation_schedule": "* * * * *"}, false},
		{"1m", map[string]any{"rotation_period": "1m"}, false},
		{"24h", map[string]any{"rotation_schedule": "0 0,12 * * *"}, true},
		{"24h", map[string]any{"rotation_period": "23h"}, true},
		{"24h", map[string]any{"rotation_schedule": "30 23 * * *"}, false},
		{"25h", map[string]any{"rotation_schedule": "0 0 */2 * *"}, true}, // the 31st, then the 1st
		{"25h", map[string]any{"rotation_schedule": "0 0 1,15 * *"}, false},
		{"48h", map[string]any{"rotation_schedule": "0 0 * * 1,2"}, true},
		{"48h", map[string]any{"rotation_schedule": "0 0 * * 1,3,5"}, false},
		{"48h", map[string]any{"rotation_schedule": "0 0 13 * 5"}, true}, // Friday the 12th, then the 13th
		{"8760h", map[string]any{"rotation_schedule": "0 0 1 1,7 *"}, true},
		{"8760h", map[string]any{"rotation_schedule": "0 0 1 1 *"}, false},
		{"8760h", map[string]any{"rotation_schedule": "0 0 29 2 *"}, false},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("floor %q %v", tc.floor, tc.data), func(t *testing.T) {
			env := newConfiguredEnv(t)
			floor := time.Hour
			if tc.floor != "" {
				env.must(env.request(logical.UpdateOperation, "config", map[string]any{"min_rotation_period": tc.floor}))
				var err error
				if floor, err = time.ParseDuration(tc.floor); err != nil {
					t.Fatal(err)
				}
			}
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			calls, before := env.sim.TotalCalls(), env.storageSnapshot()
			if !tc.refused {
				env.must(env.request(logical.UpdateOperation, env.schedulePath(), tc.data))
				if rec := record(t, env, env.tunnel.ID); rec.NextRotation.Sub(rec.StoredAt) < floor {
					t.Errorf("next rotation %s after the key", rec.NextRotation.Sub(rec.StoredAt))
				}
				return
			}
			for _, path := range []string{env.schedulePath(), env.pskPath()} {
				resp, err := env.request(logical.UpdateOperation, path, tc.data)
				if got := httpStatus(resp, err); got != http.StatusBadRequest {
					t.Fatalf("%s: status %d, want 400 (%s)", path, got, errorText(resp, err))
				}
				if msg := errorText(resp, err); !strings.Contains(msg, "min_rotation_period") || !strings.Contains(msg, floor.String()) {
					t.Errorf("%s: %q does not name min_rotation_period and %s", path, msg, floor)
				}
			}
			if n := env.sim.TotalCalls() - calls; n != 0 {
				t.Errorf("refused schedules reached Cloudflare %d times", n)
			}
			if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Error("refused schedules changed storage")
			}
		})
	}
}

// TestMinRotationPeriodConfig: config takes min_rotation_period between 1m
// and 8760h (1h by default), shows it on read, and a config stored before
// the field existed has the default, for reads, refusals and writes alike.
func TestMinRotationPeriodConfig(t *testing.T) {
	env := newConfiguredEnv(t)
	read := func() any {
		return env.must(env.request(logical.ReadOperation, "config", nil)).Data["min_rotation_period"]
	}
	if got := read(); got != 3600 {
		t.Errorf("default min_rotation_period %v, want 3600", got)
	}
	calls, before := env.sim.TotalCalls(), env.storageSnapshot()
	for _, bad := range []string{"30s", "0", "59", "8761h", "-1m", "hourly"} {
		resp, err := env.request(logical.UpdateOperation, "config", map[string]any{"min_rotation_period": bad})
		if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "min_rotation_period") {
			t.Errorf("min_rotation_period=%s: %d %s", bad, httpStatus(resp, err), errorText(resp, err))
		}
	}
	if msg := errorText(env.request(logical.UpdateOperation, "config", map[string]any{"min_rotation_period": "30s"})); !strings.Contains(msg, "min_rotation_period must be between 1m0s and 8760h0m0s") {
		t.Errorf("the refusal says %q", msg)
	}
	if env.sim.TotalCalls() != calls || fmt.Sprint(env.storageSnapshot()) != fmt.Sprint(before) {
		t.Error("a refused min_rotation_period reached Cloudflare or changed storage")
	}
	for value, want := range map[string]int{"1m": 60, "8760h": 8760 * 3600, "90m": 5400} {
		env.must(env.request(logical.UpdateOperation, "config", map[string]any{"min_rotation_period": value}))
		if got := read(); got != want {
			t.Errorf("min_rotation_period=%s reads %v, want %d", value, got, want)
		}
	}
	// A later write that does not name it keeps it.
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": "3s"}))
	if got := read(); got != 5400 && got != 60 && got != 8760*3600 {
		t.Errorf("a write without min_rotation_period changed it to %v", got)
	}

	// A config stored before the field existed.
	ctx := context.Background()
	entry, err := env.storage.Get(ctx, mount.ConfigKey)
	if err != nil || entry == nil {
		t.Fatalf("read config: %v", err)
	}
	var raw map[string]any
	if err := json.Unmarshal(entry.Value, &raw); err != nil {
		t.Fatal(err)
	}
	delete(raw, "min_rotation_period")
	if entry.Value, err = json.Marshal(raw); err != nil {
		t.Fatal(err)
	}
	if err := env.storage.Put(ctx, entry); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != 3600 {
		t.Errorf("a config stored before min_rotation_period reads %v, want the default 3600", got)
	}
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	resp, err := env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": "30m"})
	if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "1h0m0s") {
		t.Errorf("rotation_period=30m under a config stored before the field: %d %s", httpStatus(resp, err), errorText(resp, err))
	}
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": "2s"}))
	if cfg, err := mount.ReadConfig(ctx, env.storage); err != nil || cfg.MinRotationPeriod != time.Hour {
		t.Errorf("the next config write stored min_rotation_period %v (%v), want 1h", cfg.MinRotationPeriod, err)
	}
}

// TestSchedulesBeforeConfigHaveTheDefaultFloor: without config, a write's
// schedule is still held to the default floor: the refusal names it, not
// the missing config.
func TestSchedulesBeforeConfigHaveTheDefaultFloor(t *testing.T) {
	env := newTestEnv(t)
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "30m"})
	if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "at least 1h0m0s, the engine's min_rotation_period") {
		t.Errorf("%d %s", httpStatus(resp, err), errorText(resp, err))
	}
}

// TestARaisedFloorHoldsBackShorterSchedules: an administrator raises
// min_rotation_period above schedules already stored. They are not
// rewritten (a read still shows them), and the next rotation already
// planned keeps its time (readers were told it: ttl); every time computed
// after it is held back to the floor after the stored key, so at most one
// more key comes at the old pace. A write of the same schedule is refused.
func TestARaisedFloorHoldsBackShorterSchedules(t *testing.T) {
	const raised = 10 * time.Minute
	for _, sched := range []map[string]any{
		{"rotation_period": "2m"},
		{"rotation_schedule": "*/2 * * * *"},
		{"rotation_schedule": "*/2 * * * *", "rotation_window": "1m"},
	} {
		t.Run(fmt.Sprint(sched), func(t *testing.T) {
			env := newConfiguredEnv(t)
			lowerTheFloor(t, env)
			schedulerOver(t, env, env.storage)
			atSecondOfMinute(env, 10)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), sched))
			// Three every two minutes, or two where the first scheduled
			// time came within the floor of the write's key and was
			// passed over (NextAfterUnscheduled).
			if n := len(newKeys(t, env, 6*time.Minute, nil)); n < 2 || n > 3 {
				t.Fatalf("%d keys in 6m under a floor of 1m, want 2 or 3", n)
			}
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{"min_rotation_period": "10m"}))
			before := record(t, env, env.tunnel.ID)

			stored := newKeys(t, env, 41*time.Minute, nil)
			if len(stored) == 0 || stored[0].Sub(before.NextRotation) > time.Minute {
				t.Fatalf("the rotation planned before the floor was raised, at %s, did not happen: keys %v", store.FormatTime(before.NextRotation), stored)
			}
			if len(stored) > 1+4 {
				t.Errorf("%d keys in 41m after the floor was raised to %s; want the planned one and at most one per %s", len(stored), raised, raised)
			}
			assertSpaced(t, stored[0], stored[1:], raised)
			rec := record(t, env, env.tunnel.ID)
			if rec.Schedule() != before.Schedule() {
				t.Errorf("the stored schedule was rewritten: %+v, was %+v", rec.Schedule(), before.Schedule())
			}
			if gap := rec.NextRotation.Sub(rec.StoredAt); gap < raised {
				t.Errorf("next rotation %s after the key", gap)
			}

			resp, err := env.request(logical.UpdateOperation, env.schedulePath(), sched)
			if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "10m0s") {
				t.Errorf("the same schedule under the raised floor: %d %s", httpStatus(resp, err), errorText(resp, err))
			}
		})
	}
}

// TestARaisedFloorHoldsBackAMissedWindow: a rotation planned before the
// floor was raised misses its window; the time it waits for is held back to
// the floor after the stored key, as after a rotation.
func TestARaisedFloorHoldsBackAMissedWindow(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	schedulerOver(t, env, env.storage)
	atSecondOfMinute(env, 10)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_schedule": "*/2 * * * *", "rotation_window": "1m"}))
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"min_rotation_period": "10m"}))
	before := record(t, env, env.tunnel.ID)
	env.clock.Advance(before.WindowEnds.Sub(env.clock.Now()) + 5*time.Second)
	drain(t, env)
	rec := record(t, env, env.tunnel.ID)
	if rec.Version != before.Version || rec.ScheduleNote == "" {
		t.Fatalf("the window was not missed: version %d, note %q", rec.Version, rec.ScheduleNote)
	}
	if gap := rec.NextRotation.Sub(rec.StoredAt); gap < 10*time.Minute || rec.NextRotation.Minute()%2 != 0 || rec.NextRotation.Second() != 0 {
		t.Errorf("after the missed window the next rotation is %s, %s after the key; want a time of the schedule at least 10m after it",
			store.FormatTime(rec.NextRotation), gap)
	}
}

// TestAScheduleChangeDuringAnUnknownOutcomeKeepsTheFloor: a scheduled
// rotation's answer is lost (the edge did change its key: AfterCommit), so
// the stored key, from which the floor counts, stays the old one. While the
// outcome is unknown a schedule-only team switches "0 * * * *" to
// "2 * * * *": nextAfterChange counts the floor from the old stored key and
// accepts 02:02. The background heals the lost key at 02:01 (as it must: the
// tunnel is down), and the heal's next time is the team's 02:02, kept because
// the expression is "at the floor". Three keys in two minutes, two of them
// scheduled rotations two minutes apart; without the team's write the edge
// makes two (the lost one and the heal) and the next comes at 03:00.
//
// Before the fix it printed:
//
//	team writes rotation_schedule="2 * * * *" at 17:00:05Z: next_rotation 17:02:00Z
//	healed at 17:01:05Z, next_rotation 17:02:00Z
//	keys the edge made from the lost scheduled rotation on: 3 (want at most 2: the lost one and its heal)
//	the team's schedule made a scheduled rotation 55s after the heal's key (2m0s after the lost
//	scheduled rotation), under a floor of 1h0m0s
//
// (The subtest without the team's write passes: two keys, the next at 18:00.)
// The same happens after an operator's write whose answer is lost: the team
// puts the next cron time just after the heal.
func TestAScheduleChangeDuringAnUnknownOutcomeKeepsTheFloor(t *testing.T) {
	const floor = time.Hour // the default min_rotation_period
	for _, team := range []bool{false, true} {
		name := "without the team"
		if team {
			name = "the team switches the cron while the outcome is unknown"
		}
		t.Run(name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			schedulerOver(t, env, env.storage)
			atSecondOfMinute(env, 10)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_schedule": "0 * * * *"}))
			// One ordinary scheduled rotation, on time.
			c1 := record(t, env, env.tunnel.ID).NextRotation
			env.clock.Advance(c1.Sub(env.clock.Now()))
			drain(t, env)
			rec := record(t, env, env.tunnel.ID)
			if rec.Version != 2 {
				t.Fatalf("the rotation at %s did not happen: version %d", store.FormatTime(c1), rec.Version)
			}
			// The next one's answer is lost after the edge changed its key.
			c2 := rec.NextRotation
			env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Hangup: true, AfterCommit: true})
			env.clock.Advance(c2.Sub(env.clock.Now()))
			before := env.generations()
			drain(t, env)
			if rec := record(t, env, env.tunnel.ID); rec.State != store.StateRotationUnknown || env.generations() != before+1 {
				t.Fatalf("the faulted rotation at %s: state %s, %d new keys", store.FormatTime(c2), rec.State, env.generations()-before)
			}
			lostAt := env.clock.Now()

			if team {
				// Only the schedule path, as docs/policies/operator.hcl's
				// rescheduling team has it.
				env.clock.Advance(5 * time.Second)
				resp := env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_schedule": "2 * * * *"}))
				t.Logf("team writes rotation_schedule=\"2 * * * *\" at %s: next_rotation %v", store.FormatTime(env.clock.Now()), resp.Data["next_rotation"])
			}
			// Vault's periodic function runs each minute: after the backoff
			// it learns that the edge changed its key and heals.
			env.clock.Advance(lostAt.Add(65 * time.Second).Sub(env.clock.Now()))
			drain(t, env)
			backgroundPass(t, env)
			healed := record(t, env, env.tunnel.ID)
			if healed.State != store.StateCurrent {
				t.Fatalf("not healed at %s: %s %s", store.FormatTime(env.clock.Now()), healed.State, healed.StateReason)
			}
			t.Logf("healed at %s, next_rotation %s", store.FormatTime(healed.StoredAt), store.FormatTime(healed.NextRotation))
			// The scheduler works every second of the next two minutes.
			for i := 0; i < 120; i++ {
				env.clock.Advance(time.Second)
				drain(t, env)
			}
			rec = record(t, env, env.tunnel.ID)
			made := env.generations() - before
			t.Logf("keys the edge made from the lost scheduled rotation on: %d; the record's last key at %s", made, store.FormatTime(rec.StoredAt))
			if made > 2 {
				t.Errorf("keys the edge made from the lost scheduled rotation on: %d (want at most 2: the lost one and its heal)", made)
			}
			if rec.StoredAt.After(healed.StoredAt) && rec.StoredAt.Sub(healed.StoredAt) < floor {
				t.Errorf("the team's schedule made a scheduled rotation %s after the heal's key (%s after the lost scheduled rotation), under a floor of %s",
					rec.StoredAt.Sub(healed.StoredAt).Round(time.Second), rec.StoredAt.Sub(lostAt).Round(time.Second), floor)
			}
		})
	}
}
