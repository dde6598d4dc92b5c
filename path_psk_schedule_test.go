package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

func (e *testEnv) schedulePath() string { return e.pskPath() + "/schedule" }

// dueEntries lists the keys under due/.
func dueEntries(t *testing.T, env *testEnv) []string {
	t.Helper()
	var keys []string
	minutes, err := env.storage.List(context.Background(), store.DuePrefix)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range minutes {
		names, err := env.storage.List(context.Background(), store.DuePrefix+m)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			keys = append(keys, store.DuePrefix+m+n)
		}
	}
	return keys
}

// TestAScheduleChangeNeverRotates: psk/.../schedule changes when a tunnel
// is rotated, and nothing else: no Cloudflare call, the same key at the edge
// and in Vault, the schedule entry moved. A period counts from the stored
// key, but never from before the change (which would rotate at once); a
// cron expression falls due at its next time; 0 turns it off. The scheduler
// then rotates by the new schedule.
func TestAScheduleChangeNeverRotates(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	before := record(t, env, env.tunnel.ID)
	edgeKey, generations, calls := env.edge().PSK, env.generations(), env.sim.TotalCalls()
	unchanged := func(when string) {
		t.Helper()
		if n := env.sim.TotalCalls() - calls; n != 0 {
			t.Errorf("%s: %d Cloudflare calls", when, n)
		}
		rec := record(t, env, env.tunnel.ID)
		if env.edge().PSK != edgeKey || env.generations() != generations || rec.PSK != before.PSK ||
			rec.Version != before.Version || !rec.StoredAt.Equal(before.StoredAt) || rec.State != store.StateCurrent {
			t.Errorf("%s: the key or its record changed: version %d, state %s", when, rec.Version, rec.State)
		}
		if n := len(dueEntries(t, env)); rec.NextRotation.IsZero() && n != 0 || !rec.NextRotation.IsZero() && (n != 1 || !scheduledEntry(t, env, rec)) {
			t.Errorf("%s: schedule entries %v for next_rotation %s", when, dueEntries(t, env), store.FormatTime(rec.NextRotation))
		}
	}

	if found, exists, err := env.b.HandleExistenceCheck(context.Background(), &logical.Request{
		Operation: logical.UpdateOperation, Path: env.schedulePath(), Storage: env.storage,
	}); err != nil || !found || !exists {
		t.Fatalf("existence check: found %v, exists %v, %v", found, exists, err)
	}

	resp := env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": "1h"}))
	unchanged("rotation_period=1h")
	if resp.Data["next_rotation"] != store.FormatTime(before.StoredAt.Add(time.Hour)) || resp.Data["rotation_period"] != 3600 || resp.Data["ttl"] == nil {
		t.Errorf("rotation_period=1h: %v", resp.Data)
	}
	if _, ok := resp.Data["psk"]; ok {
		t.Error("the schedule answer carries the key")
	}
	read := env.must(env.request(logical.ReadOperation, env.schedulePath(), nil))
	for _, k := range []string{"account_id", "tunnel_id", "rotation_period", "rotation_schedule", "rotation_window", "next_rotation", "schedule_note"} {
		if read.Data[k] != resp.Data[k] {
			t.Errorf("read %s = %v, the write answered %v", k, read.Data[k], resp.Data[k])
		}
	}
	if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["next_rotation"] != resp.Data["next_rotation"] {
		t.Errorf("metadata next_rotation %v", meta.Data["next_rotation"])
	}

	env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_schedule": "0 2 * * 6", "rotation_window": "2h"}))
	unchanged("rotation_schedule")
	rec := record(t, env, env.tunnel.ID)
	if rec.RotationPeriod != 0 || rec.RotationSchedule != "0 2 * * 6" || rec.RotationWindow != 2*time.Hour ||
		rec.NextRotation.Weekday() != time.Saturday || !rec.NextRotation.After(env.clock.Now()) || !rec.WindowEnds.Equal(rec.NextRotation.Add(2*time.Hour)) {
		t.Errorf("rotation_schedule: %+v, next %s", rec.Schedule(), store.FormatTime(rec.NextRotation))
	}

	// The key is older than the new period: the period counts from now,
	// or the change would have the key rotated at once.
	env.clock.Advance(10 * time.Minute)
	env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": "5m"}))
	unchanged("a period shorter than the key's age")
	if next := record(t, env, env.tunnel.ID).NextRotation; next.Sub(env.clock.Now()) < 5*time.Minute-time.Second || next.Sub(env.clock.Now()) > 5*time.Minute {
		t.Errorf("a period shorter than the key's age: next rotation in %s, want 5m", next.Sub(env.clock.Now()))
	}
	drain(t, env)
	unchanged("a pass right after the change")

	env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": 0}))
	unchanged("rotation_period=0")
	read = env.must(env.request(logical.ReadOperation, env.schedulePath(), nil))
	if _, ok := read.Data["ttl"]; ok || read.Data["next_rotation"] != "" || read.Data["rotation_period"] != 0 {
		t.Errorf("after rotation_period=0: %v", read.Data)
	}

	// The new schedule is the scheduler's.
	env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": "1h"}))
	next := record(t, env, env.tunnel.ID).NextRotation
	env.clock.Advance(next.Sub(env.clock.Now()) + 100*time.Millisecond)
	drain(t, env)
	if rec := record(t, env, env.tunnel.ID); rec.Version != before.Version+1 || rec.RotationPeriod != time.Hour {
		t.Errorf("the scheduler after a schedule change: version %d, period %s", rec.Version, rec.RotationPeriod)
	}
	assertCurrent(t, env, "after the rescheduled rotation")
}

// TestScheduleOfATunnelVaultHoldsNoKeyFor: a schedule alone never makes a
// tunnel's first key (a write of psk/ does, and can set the schedule): 404,
// nothing stored, nothing sent.
func TestScheduleOfATunnelVaultHoldsNoKeyFor(t *testing.T) {
	env := newConfiguredEnv(t)
	calls, before := env.sim.TotalCalls(), env.storageSnapshot()
	for op, data := range map[logical.Operation]map[string]any{
		logical.UpdateOperation: {"rotation_period": "1h"},
		logical.ReadOperation:   nil,
	} {
		resp, err := env.request(op, env.schedulePath(), data)
		if op == logical.ReadOperation && resp == nil && err == nil {
			continue // what Vault answers with 404
		}
		if httpStatus(resp, err) != http.StatusNotFound {
			t.Errorf("%s: status %d, want 404 (%s)", op, httpStatus(resp, err), errorText(resp, err))
		}
	}
	if env.sim.TotalCalls() != calls {
		t.Error("a schedule of an unknown tunnel reached Cloudflare")
	}
	if after := env.storageSnapshot(); len(after) != len(before) {
		t.Error("a schedule of an unknown tunnel changed storage")
	}
}

// TestAScheduleChangeWhileARotationSettles: no 409 here, unlike a write or
// a delete of psk/: those would ask for, or forget the window of, a key
// the abandoned request may still change; a schedule change asks for
// nothing and keeps the record's state and settle window as they are.
func TestAScheduleChangeWhileARotationSettles(t *testing.T) {
	env := newConfiguredEnv(t)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	ctx, tun, now := context.Background(), store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}, env.clock.Now()
	rec := record(t, env, env.tunnel.ID)
	rec.State = store.StateRotationUnknown
	rec.StateReason = "a rotation started and has not finished"
	rec.RotationStartedAt = now.Add(-5 * time.Second).UTC()
	rec.SettleUntil = now.Add(5 * time.Minute).UTC()
	if err := store.MarkUnresolved(ctx, env.storage, tun); err != nil {
		t.Fatal(err)
	}
	if err := store.WriteRecord(ctx, env.storage, tun, rec); err != nil {
		t.Fatal(err)
	}
	calls := env.sim.TotalCalls()
	env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_schedule": "0 3 * * 0"}))
	if env.sim.TotalCalls() != calls {
		t.Error("the schedule change reached Cloudflare")
	}
	got := record(t, env, env.tunnel.ID)
	if got.State != store.StateRotationUnknown || !got.SettleUntil.Equal(rec.SettleUntil) || got.PSK != rec.PSK || got.RotationSchedule != "0 3 * * 0" {
		t.Errorf("after the schedule change: state %s, settle_until %s, schedule %q", got.State, store.FormatTime(got.SettleUntil), got.RotationSchedule)
	}
	// Once settled, reconciliation keeps the new schedule.
	env.clock.Advance(6 * time.Minute)
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if meta.Data["state"] != store.StateCurrent || meta.Data["rotation_schedule"] != "0 3 * * 0" {
		t.Errorf("after reconciliation: state %v, schedule %v", meta.Data["state"], meta.Data["rotation_schedule"])
	}
}

// TestAScheduleChangeKeepsTheBackoff: a tunnel whose scheduled rotations
// keep failing is tried again at retry_at; a new schedule does not bring
// the next attempt forward, and so does not spend the budget faster.
func TestAScheduleChangeKeepsTheBackoff(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	for i := 0; i < 3; i++ {
		env.sim.FailNext(cloudflaresim.OpPSKGenerate, forbidden)
	}
	env.clock.Advance(time.Hour + time.Second)
	drain(t, env)
	for i := 1; i < 3; i++ {
		env.clock.Advance(record(t, env, env.tunnel.ID).RetryAt.Sub(env.clock.Now()) + time.Second)
		drain(t, env)
	}
	rec := record(t, env, env.tunnel.ID)
	if rec.Failures != 3 || rec.RetryAt.Sub(env.clock.Now()) < 3*time.Minute {
		t.Fatalf("failures %d, retry in %s; want 3, in 4m", rec.Failures, rec.RetryAt.Sub(env.clock.Now()))
	}
	env.must(env.request(logical.UpdateOperation, env.schedulePath(), map[string]any{"rotation_period": "1m"}))
	if got := record(t, env, env.tunnel.ID); !got.NextRotation.Equal(rec.RetryAt) {
		t.Errorf("next rotation %s, retry_at %s", store.FormatTime(got.NextRotation), store.FormatTime(rec.RetryAt))
	}
	if !strings.Contains(record(t, env, env.tunnel.ID).LastFailure, "403") {
		t.Error("the schedule change forgot why the rotation failed")
	}
}
