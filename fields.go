package main

// The fields paths share, and how a request's values become the engine's:
// Cloudflare identifiers in their one canonical form, schedules, and the
// refusal of fields a path does not take.

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/schedule"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Path segments are matched loosely and checked in the handlers, so that a
// malformed identifier gets a 400 that says what is wrong instead of a 404.
const (
	accountSegment = `(?P<account>[^/]+)`
	tunnelSegment  = `(?P<tunnel>[^/]+)`
)

var tunnelFields = map[string]*framework.FieldSchema{
	"account": {
		Type:        framework.TypeString,
		Description: "Cloudflare account ID (32 lower-case hexadecimal characters).",
		Required:    true,
	},
	"tunnel": {
		Type:        framework.TypeString,
		Description: "Cloudflare IPsec tunnel ID (32 lower-case hexadecimal characters).",
		Required:    true,
	},
}

// tunnelFromRequest reads and checks the path's identifiers. It returns a
// problem to show the caller, or "".
func tunnelFromRequest(d *framework.FieldData) (store.Tunnel, string) {
	account, problem := store.ParseIdentifier("account", d.Get("account").(string))
	if problem != "" {
		return store.Tunnel{}, problem
	}
	tunnel, problem := store.ParseIdentifier("tunnel", d.Get("tunnel").(string))
	if problem != "" {
		return store.Tunnel{}, problem
	}
	return store.Tunnel{AccountID: account, TunnelID: tunnel}, ""
}

// scheduleFields are the fields that set a tunnel's schedule, on a write of
// psk/ (which rotates) and of psk/.../schedule (which does not).
var scheduleFields = map[string]*framework.FieldSchema{
	"rotation_period": {
		Type:        framework.TypeDurationSecond,
		Description: "Rotate this tunnel again every period (at least config min_rotation_period, 1h by default); 0 turns scheduled rotation off; omitted keeps the current schedule. Not with rotation_schedule.",
	},
	"rotation_schedule": {
		Type: framework.TypeString,
		Description: "Rotate this tunnel at the times of a standard 5-field cron expression (minute hour day-of-month month day-of-week, " +
			"in UTC, no time zone), e.g. \"0 2 * * 6\", whose times are at least config min_rotation_period apart; \"\" turns scheduled rotation off; " +
			"omitted keeps the current schedule. Not with rotation_period.",
	},
	"rotation_window": {
		Type: framework.TypeDurationSecond,
		Description: "With rotation_schedule: a rotation that cannot start within this long after its scheduled time waits for the next one " +
			"(schedule_note in metadata says so); at least 1m, 0 or omitted: no window.",
	},
}

// requestedSchedule reads the schedule fields of a write: nil when it names
// none (the tunnel keeps its schedule), otherwise the tunnel's schedule from
// now on (the zero schedule: none). floor is config min_rotation_period:
// a schedule that falls due more often is refused. problem, when not "",
// names the field at fault; it never repeats a value.
func requestedSchedule(d *framework.FieldData, now time.Time, floor time.Duration) (*schedule.Schedule, string) {
	periodRaw, hasPeriod := d.GetOk("rotation_period")
	cronRaw, hasCron := d.GetOk("rotation_schedule")
	windowRaw, hasWindow := d.GetOk("rotation_window")
	switch {
	case hasPeriod && hasCron:
		return nil, "rotation_period and rotation_schedule are exclusive: give one (rotation_period=0 turns scheduled rotation off)"
	case hasWindow && (!hasCron || cronRaw.(string) == ""):
		return nil, "rotation_window is only taken with a rotation_schedule in the same write: it bounds how late after a scheduled time its rotation may start"
	case hasPeriod:
		period := time.Duration(periodRaw.(int)) * time.Second
		if period != 0 && period < max(floor, schedule.MinPeriod) {
			return nil, fmt.Sprintf("rotation_period must be 0 (off) or at least %s, the engine's min_rotation_period (config; "+
				"each rotation takes the tunnel down until its routers have the new key): nothing was sent or stored", max(floor, schedule.MinPeriod))
		}
		return &schedule.Schedule{Period: period}, ""
	case hasCron:
		sched := &schedule.Schedule{Cron: cronRaw.(string)}
		if sched.Cron == "" {
			return sched, ""
		}
		if _, problem := schedule.ParseCron(sched.Cron, now); problem != "" {
			return nil, problem
		}
		if gap := sched.ShortestGap(now); gap < floor {
			return nil, fmt.Sprintf("rotation_schedule falls due as often as every %s; its times must be at least %s apart, "+
				"the engine's min_rotation_period (config; each rotation takes the tunnel down until its routers have the new key): nothing was sent or stored", gap, floor)
		}
		if hasWindow {
			sched.Window = time.Duration(windowRaw.(int)) * time.Second
			if sched.Window != 0 && sched.Window < schedule.MinWindow {
				return nil, fmt.Sprintf("rotation_window must be 0 (none) or at least %s", schedule.MinWindow)
			}
		}
		return sched, ""
	}
	return nil, ""
}

// rejectUnknownFields refuses a write that names a field the path does not
// take: a mistyped option must not be silently ignored on a path that
// rotates keys.
func rejectUnknownFields(req *logical.Request, d *framework.FieldData) *logical.Response {
	var unknown []string
	for name := range req.Data {
		if _, ok := d.Schema[name]; !ok {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	var known []string
	for name := range d.Schema {
		known = append(known, name)
	}
	sort.Strings(unknown)
	sort.Strings(known)
	return logical.ErrorResponse(fmt.Sprintf("unknown field(s) %s: this path takes %s",
		strings.Join(unknown, ", "), strings.Join(known, ", ")))
}
