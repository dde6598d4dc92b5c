package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/background"
	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// drain runs one scheduler pass now, as the scheduler's loop would.
func drain(t *testing.T, env *testEnv) {
	t.Helper()
	pass(t, env)
}

// pass runs one scheduler pass now and returns how long the loop would
// sleep after it.
func pass(t *testing.T, env *testEnv) time.Duration {
	t.Helper()
	wait, ok := env.b.background.Pass(context.Background())
	if !ok {
		t.Fatal("the scheduler is not running")
	}
	return wait
}

// hookStorage wraps a logical.Storage and lets a test fail or watch chosen
// Puts and Deletes. The hooks run outside its lock, so a hook may itself
// make requests that write storage (through the inner storage).
type hookStorage struct {
	logical.Storage
	mu       sync.Mutex
	onPut    func(*logical.StorageEntry) error
	onDelete func(key string) error
}

func (h *hookStorage) Put(ctx context.Context, entry *logical.StorageEntry) error {
	h.mu.Lock()
	hook := h.onPut
	h.mu.Unlock()
	if hook != nil {
		if err := hook(entry); err != nil {
			return err
		}
	}
	return h.Storage.Put(ctx, entry)
}

func (h *hookStorage) Delete(ctx context.Context, key string) error {
	h.mu.Lock()
	hook := h.onDelete
	h.mu.Unlock()
	if hook != nil {
		if err := hook(key); err != nil {
			return err
		}
	}
	return h.Storage.Delete(ctx, key)
}

// failPuts fails every Put under prefix ("" stops failing).
func (h *hookStorage) failPuts(prefix string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.onPut = nil
	if prefix != "" {
		h.onPut = func(e *logical.StorageEntry) error {
			if strings.HasPrefix(e.Key, prefix) {
				return errors.New("injected storage failure")
			}
			return nil
		}
	}
}

// failDeletes fails every Delete under prefix ("" stops failing).
func (h *hookStorage) failDeletes(prefix string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.onDelete = nil
	if prefix != "" {
		h.onDelete = func(key string) error {
			if strings.HasPrefix(key, prefix) {
				return errors.New("injected storage failure")
			}
			return nil
		}
	}
}

// schedulerOver replaces the mount's running scheduler with one over s that
// runs only when the test drains it: the test can fault the scheduler's
// storage, and no loop works the schedule behind its back.
func schedulerOver(t *testing.T, env *testEnv, s logical.Storage) {
	t.Helper()
	env.b.background.Hold(s)
}

// record reads a tunnel's stored record.
func record(t *testing.T, env *testEnv, tunnel string) *store.Record {
	t.Helper()
	rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: tunnel})
	if err != nil || rec == nil {
		t.Fatalf("read record of %s: %v (%v)", tunnel, rec, err)
	}
	return rec
}

// scheduledEntry reports whether the due/ entry of a record's next rotation
// is stored.
func scheduledEntry(t *testing.T, env *testEnv, rec *store.Record) bool {
	t.Helper()
	entry, err := env.storage.Get(context.Background(), store.DueKey(store.DueMinute(rec.NextRotation, false), store.Tunnel{AccountID: rec.AccountID, TunnelID: rec.TunnelID}))
	if err != nil {
		t.Fatal(err)
	}
	return entry != nil
}

var forbidden = cloudflaresim.Fault{Status: 403, Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}}

// TestFailedRescheduleKeepsTheEntry: a scheduled rotation fails and its
// retry cannot be stored. The old entry must stay, or nothing would ever
// rotate the tunnel again; once storage works the tunnel rotates.
func TestFailedRescheduleKeepsTheEntry(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	storage := &hookStorage{Storage: env.storage}
	schedulerOver(t, env, storage)
	before := record(t, env, env.tunnel.ID)

	env.sim.FailNext(cloudflaresim.OpPSKGenerate, forbidden)
	storage.failPuts(store.DuePrefix)
	env.clock.Advance(time.Hour + time.Minute)
	drain(t, env)
	storage.failPuts("")
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != 2 {
		t.Fatalf("generate calls = %d, want 2 (the write and the failed scheduled one)", env.sim.Calls(cloudflaresim.OpPSKGenerate))
	}
	if !scheduledEntry(t, env, before) {
		t.Fatal("the failed reschedule dropped the only schedule entry")
	}

	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 2 {
		t.Fatalf("after storage recovered: version %d, want 2", v)
	}
	if rec := record(t, env, env.tunnel.ID); !scheduledEntry(t, env, rec) {
		t.Error("the rotation after recovery left no schedule entry")
	}
}

// TestLostScheduleEntryIsRepaired: the due/ entry of a tunnel's next
// rotation could not be stored (a rotation only logs that). The record is the
// truth: the scheduler's repair walk, at start and then every so often, puts
// the entry back, and the tunnel rotates when it is due, not earlier.
func TestLostScheduleEntryIsRepaired(t *testing.T) {
	env := newConfiguredEnv(t)
	// A scheduler that has not run yet: its first pass is its first walk.
	schedulerOver(t, env, env.storage)
	storage := &hookStorage{Storage: env.storage}
	env.storage = storage
	loseEntry := func(when string) *store.Record {
		t.Helper()
		storage.failPuts(store.DuePrefix)
		env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
		storage.failPuts("")
		rec := record(t, env, env.tunnel.ID)
		if rec.NextRotation.IsZero() || scheduledEntry(t, env, rec) {
			t.Fatalf("%s: want a record with next_rotation and no schedule entry", when)
		}
		return rec
	}

	rec := loseEntry("at start")
	drain(t, env)
	if !scheduledEntry(t, env, rec) {
		t.Fatal("the first pass did not restore the missing schedule entry")
	}
	if v := storedVersion(t, env, env.pskPath()); v != 1 {
		t.Fatalf("the repair rotated: version %d", v)
	}

	// Lost again later (in another minute: two times in one minute share
	// an entry): a later walk finds it.
	env.clock.Advance(2 * time.Minute)
	rec = loseEntry("later")
	env.clock.Advance(20 * time.Minute)
	drain(t, env)
	if !scheduledEntry(t, env, rec) {
		t.Fatal("a later pass did not restore the missing schedule entry")
	}
	if v := storedVersion(t, env, env.pskPath()); v != 2 {
		t.Fatalf("rotated before it was due: version %d", v)
	}
	env.clock.Advance(41 * time.Minute)
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 3 {
		t.Fatalf("the repaired schedule did not rotate when due: version %d, want 3", v)
	}
}

// TestFailingScheduledRotationBacksOff: a tunnel whose scheduled rotation
// keeps failing is tried again after 1m, 2m, 4m, 8m (to the second), not
// every minute for ever; metadata says how often
// and why it failed, and a success clears that.
func TestFailingScheduledRotationBacksOff(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1m"}))
	schedulerOver(t, env, env.storage)
	const failures = 4
	for i := 0; i < failures; i++ {
		env.sim.FailNext(cloudflaresim.OpPSKGenerate, forbidden)
	}

	const step = 10 * time.Second
	var attempts []time.Duration // clock offsets of the scheduler's calls
	checked := false
	for elapsed := time.Duration(0); elapsed < 30*time.Minute && len(attempts) <= failures; elapsed += step {
		env.clock.Advance(step)
		drain(t, env)
		if n := env.sim.Calls(cloudflaresim.OpPSKGenerate) - 1; n > len(attempts) {
			attempts = append(attempts, elapsed+step)
		}
		if len(attempts) == failures && !checked {
			checked = true
			meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
			if meta.Data["failures"] != failures || !strings.Contains(meta.Data["last_failure"].(string), "HTTP 403") || meta.Data["retry_at"] == "" {
				t.Errorf("after %d failures: failures %v, last_failure %q, retry_at %v", failures,
					meta.Data["failures"], meta.Data["last_failure"], meta.Data["retry_at"])
			}
		}
	}
	if len(attempts) < failures+1 {
		t.Fatalf("attempts at %v: want %d", attempts, failures+1)
	}
	// Each retry waits its backoff (plus at most a step of the test's clock).
	for i, backoff := range []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute} {
		gap := attempts[i+1] - attempts[i]
		if gap < backoff || gap > backoff+step {
			t.Errorf("retry %d came %s after the failure before it, want %s (attempts at %v)", i+1, gap, backoff, attempts)
		}
	}
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if meta.Data["failures"] != 0 || meta.Data["last_failure"] != "" || meta.Data["retry_at"] != "" || meta.Data["version"] != 2 {
		t.Errorf("after the success: %v", meta.Data)
	}
}

// TestSettlingRecordWaits: while the last rotation's outcome is unknown and
// Cloudflare may still act on it, neither a scheduled nor a bulk rotation may
// call Cloudflare (a new generate could be overtaken by the abandoned one);
// the entry waits, and is worked once the record has settled.
func TestSettlingRecordWaits(t *testing.T) {
	for _, bulk := range []bool{false, true} {
		name := "scheduled"
		if bulk {
			name = "bulk"
		}
		t.Run(name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			schedulerOver(t, env, env.storage)
			ctx, tun, now := context.Background(), store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}, env.clock.Now()
			rec := record(t, env, env.tunnel.ID)
			rec.State = store.StateRotationUnknown
			rec.StateReason = "a rotation started and has not finished"
			rec.RotationStartedAt = now.Add(-5 * time.Second).UTC()
			rec.SettleUntil = now.Add(5 * time.Minute).UTC()
			if !bulk {
				rec.RotationPeriod = time.Hour
				rec.NextRotation = now.Add(-time.Minute).UTC()
				if err := store.ScheduleRotation(ctx, env.storage, tun, rec.NextRotation); err != nil {
					t.Fatal(err)
				}
			}
			if err := store.MarkUnresolved(ctx, env.storage, tun); err != nil {
				t.Fatal(err)
			}
			if err := store.WriteRecord(ctx, env.storage, tun, rec); err != nil {
				t.Fatal(err)
			}
			if bulk {
				env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
			}
			entries := env.storageSnapshot()
			calls := env.sim.TotalCalls()

			env.clock.Advance(time.Minute)
			drain(t, env)
			if n := env.sim.TotalCalls() - calls; n != 0 {
				t.Fatalf("a settling record was worked: %d Cloudflare calls", n)
			}
			if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(entries) {
				t.Fatal("a settling record's entry or record changed")
			}

			env.clock.Advance(5 * time.Minute)
			drain(t, env)
			if v := storedVersion(t, env, env.pskPath()); v != 2 {
				t.Fatalf("after the record settled: version %d, want 2", v)
			}
			assertCurrent(t, env, "after the record settled")
		})
	}
}

func storedVersion(t *testing.T, env *testEnv, path string) int {
	t.Helper()
	return env.must(env.request(logical.ReadOperation, path, nil)).Data["version"].(int)
}

func TestRotationPeriodRotatesWhenDueAndNeverEarly(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	write := env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "2m"}))
	if write.Data["rotation_period"] != 120 {
		t.Fatalf("rotation_period = %v, want 120", write.Data["rotation_period"])
	}
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	stored, _ := time.Parse(time.RFC3339Nano, meta.Data["stored_at"].(string))
	next, _ := time.Parse(time.RFC3339Nano, meta.Data["next_rotation"].(string))
	if !next.Equal(stored.Add(2 * time.Minute)) {
		t.Fatalf("next_rotation = %s, want stored_at + 2m = %s", next, stored.Add(2*time.Minute))
	}

	env.clock.Advance(119 * time.Second)
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 1 {
		t.Fatalf("rotated before it was due: version %d", v)
	}
	env.clock.Advance(61 * time.Second)
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 2 {
		t.Fatalf("not rotated when due: version %d", v)
	}
	assertCurrent(t, env, "after the scheduled rotation")
	meta = env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if meta.Data["rotation_period"] != 120 || meta.Data["next_rotation"] == next.Format(time.RFC3339Nano) {
		t.Errorf("after the scheduled rotation: period %v, next %v", meta.Data["rotation_period"], meta.Data["next_rotation"])
	}

	// An ordinary write keeps the period; rotation_period=0 turns it off.
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["rotation_period"] != 120 {
		t.Errorf("a write without rotation_period dropped it: %v", meta.Data["rotation_period"])
	}
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": 0}))
	meta = env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if meta.Data["rotation_period"] != 0 || meta.Data["next_rotation"] != "" {
		t.Errorf("rotation_period=0: period %v, next %v", meta.Data["rotation_period"], meta.Data["next_rotation"])
	}
	if keys, _ := env.storage.List(context.Background(), store.DuePrefix); len(keys) != 0 {
		t.Errorf("schedule entries left after turning the schedule off: %v", keys)
	}
}

func TestRotationPeriodBelowAMinuteIsRefused(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "30s"})
	if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "at least 1m0s") {
		t.Fatalf("rotation_period=30s: %d %s", httpStatus(resp, err), errorText(resp, err))
	}
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != 0 {
		t.Error("a refused write reached Cloudflare")
	}
}

// TestRestartNeverRotatesEarlyAndCatchesUp restarts the backend over the
// same storage: nothing is rotated before its time, and a rotation that fell
// due while the backend was down happens once, soon after it is back.
func TestRestartNeverRotatesEarlyAndCatchesUp(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))

	restart := func() {
		env.b.Cleanup(context.Background())
		b := newBackend()
		b.now, b.after = env.clock.Now, env.clock.after
		conf := logical.TestBackendConfig()
		conf.StorageView = env.storage
		conf.Logger = env.b.Logger()
		if err := b.Setup(context.Background(), conf); err != nil {
			t.Fatal(err)
		}
		// The restarted scheduler's first pass is the test's drain.
		b.background.Hold(env.storage)
		t.Cleanup(func() { b.Cleanup(context.Background()) })
		env.b = b
	}
	restart()
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 1 {
		t.Fatalf("a restart rotated early: version %d", v)
	}
	env.clock.Advance(3 * time.Hour) // down past the due time
	restart()
	drain(t, env)
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 2 {
		t.Fatalf("after coming back past the due time: version %d, want 2 (once)", v)
	}
	assertCurrent(t, env, "after catching up")
}

func TestBulkRotationQueuesReportsAndRecordsFailures(t *testing.T) {
	env := newConfiguredEnv(t)
	tunnels := []string{env.tunnel.ID}
	for i := 0; i < 4; i++ {
		tunnels = append(tunnels, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID)
	}
	for _, id := range tunnels {
		env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+id, nil))
	}

	// older_than leaves out keys stored more recently than that.
	env.clock.Advance(2 * time.Hour)
	env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+tunnels[4], nil))
	// The running scheduler may start at once: the fault is queued first.
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 403, Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}})
	queued := env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"older_than": "1h"}))
	if queued.Data["queued"] != 4 || queued.Data["expected_finish"] == "" {
		t.Fatalf("rotate answer = %v", queued.Data)
	}
	progress := env.must(env.request(logical.ReadOperation, "rotate/"+env.account, nil))
	if progress.Data["queued"] != 4 || progress.Data["remaining"].(int) > 4 {
		t.Fatalf("progress right after queueing = %v", progress.Data)
	}

	for i := 0; i < 3; i++ {
		drain(t, env)
	}
	progress = env.must(env.request(logical.ReadOperation, "rotate/"+env.account, nil))
	failed := progress.Data["failed"].([]map[string]any)
	if progress.Data["done"] != 3 || len(failed) != 1 || progress.Data["remaining"] != 0 {
		t.Fatalf("progress after the run = %v", progress.Data)
	}
	if reason := failed[0]["reason"].(string); !strings.Contains(reason, "HTTP 403") || !strings.Contains(reason, "code 10000") {
		t.Errorf("failure reason %q does not carry Cloudflare's answer", reason)
	}
	rotated := 0
	for _, id := range tunnels[:4] {
		if storedVersion(t, env, "psk/"+env.account+"/"+id) == 2 {
			rotated++
		}
	}
	if rotated != 3 || storedVersion(t, env, "psk/"+env.account+"/"+tunnels[4]) != 2 {
		t.Errorf("rotated %d of the 4 old tunnels (want 3), newest at version %d (want 2: only its own write)",
			rotated, storedVersion(t, env, "psk/"+env.account+"/"+tunnels[4]))
	}
}

func TestOverBudgetWritesFailFastWithTheTimeLeft(t *testing.T) {
	env := newTestEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": env.simURL, "rate_limit": 3, "rate_limit_window": "1m",
	}))
	// The token check of a config write that is not stored yet runs on a
	// budget of its own; the first rotation counts two calls (it reads the
	// tunnel before it generates), the second one.
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	calls := env.sim.TotalCalls()
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusTooManyRequests || !strings.Contains(errorText(resp, err), "budget of 3 Cloudflare calls per 1m0s") {
		t.Fatalf("over budget: %d %s", httpStatus(resp, err), errorText(resp, err))
	}
	if env.sim.TotalCalls() != calls {
		t.Error("a call over budget was sent")
	}
	if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["state"] != store.StateCurrent {
		t.Errorf("a call that was never sent left state %v", meta.Data["state"])
	}
	env.clock.Advance(61 * time.Second)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
}

// TestBulkRotationStaysUnderCloudflaresLimit runs the real scheduler loop
// against a simulator that enforces Cloudflare's limit (scaled down to a
// two-second window): every tunnel is rotated and Cloudflare never answers
// 429.
func TestBulkRotationStaysUnderCloudflaresLimit(t *testing.T) {
	env := newTestEnv(t)
	const limit, window, fleet = 20, 2 * time.Second, 50
	env.sim.SetRateLimit(limit, window)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": env.simURL, "rate_limit": limit, "rate_limit_window": "2s",
	}))
	seedCurrentTunnels(t, env, fleet)
	runBulkToTheEnd(t, env, fleet)
	if n := env.sim.RateLimited(); n != 0 {
		t.Errorf("Cloudflare answered 429 %d times", n)
	}
}

func TestRotationEventsCarryNoSecret(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	// Events are sent in the background; the backend knows when they are.
	env.b.events.Wait()
	env.events.Lock()
	defer env.events.Unlock()
	if len(env.events.Events) != 2 {
		t.Fatalf("%d events, want 2", len(env.events.Events))
	}
	versions := map[any]bool{}
	for i, ev := range env.events.Events {
		if ev.Type != rotateEventType {
			t.Errorf("event type %q", ev.Type)
		}
		fields := ev.Event.Metadata.AsMap()
		versions[fields["version"]] = true
		if fields["account_id"] != env.account || fields["tunnel_id"] != env.tunnel.ID || fields["trigger"] != "write" {
			t.Errorf("event %d = %v", i, fields)
		}
		// What Vault's own engines send, so a subscriber's policy can be
		// checked against the path the key is read at (Vault prepends the
		// mount).
		if want := env.pskPath(); fields["path"] != want || fields["data_path"] != want || fields["modified"] != "true" {
			t.Errorf("event %d: path %v, data_path %v, modified %v; want %s, %s, true", i, fields["path"], fields["data_path"], fields["modified"], want, want)
		}
		for _, k := range env.edge().GeneratedPSKs {
			if strings.Contains(fmt.Sprint(fields), k) {
				t.Error("an event carries a key")
			}
		}
	}
	if !versions["1"] || !versions["2"] {
		t.Errorf("event versions = %v, want 1 and 2", versions)
	}
}

func TestTunnelDiscoveryShowsWhatVaultManages(t *testing.T) {
	env := newConfiguredEnv(t)
	unmanaged := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{Name: "branch_2", CustomerEndpoint: "198.51.100.9"})
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	list := env.must(env.request(logical.ListOperation, "tunnels/"+env.account+"/", nil))
	info := list.Data["key_info"].(map[string]any)
	if len(list.Data["keys"].([]string)) != 2 {
		t.Fatalf("keys = %v", list.Data["keys"])
	}
	if m := info[env.tunnel.ID].(map[string]any); m["managed"] != true || m["psk_last_generated_on"] == "" {
		t.Errorf("managed tunnel: %v", m)
	}
	if m := info[unmanaged.ID].(map[string]any); m["managed"] != false || m["name"] != "branch_2" || m["customer_endpoint"] != "198.51.100.9" || m["interface_address"] == "" {
		t.Errorf("unmanaged tunnel: %v", m)
	}
	one := env.must(env.request(logical.ReadOperation, "tunnels/"+env.account+"/"+unmanaged.ID, nil))
	if one.Data["managed"] != false || one.Data["tunnel_id"] != unmanaged.ID {
		t.Errorf("read tunnel = %v", one.Data)
	}
	for _, r := range []*logical.Response{list, one} {
		if strings.Contains(responseJSON(t, r), env.edge().PSK) || strings.Contains(responseJSON(t, r), `"psk"`) {
			t.Error("discovery shows a key")
		}
	}
}

// TestScheduledRotationOfADeletedTunnelStops: a tunnel deleted at
// Cloudflare is recorded as gone and leaves the schedule, instead of being
// retried (hourly at best) for ever.
func TestScheduledRotationOfADeletedTunnelStops(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	env.sim.DeleteTunnel(env.account, env.tunnel.ID)
	env.clock.Advance(61 * time.Minute)
	drain(t, env)
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if meta.Data["state"] != store.StateTunnelGone {
		t.Fatalf("scheduled rotation of a deleted tunnel: state %v", meta.Data["state"])
	}
	calls := env.sim.TotalCalls()
	for i := 0; i < 3; i++ {
		env.clock.Advance(2 * time.Hour)
		drain(t, env)
	}
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Errorf("the scheduler spent %d more calls on a tunnel that is gone", n)
	}
}

// TestTheSchedulerSlowsDownWhenAnotherClientSpendsTheQuota: Cloudflare's
// limit is per user, so dashboard use and other tools of the same user
// spend it too. The engine's own budget cannot see them; Cloudflare's
// Ratelimit header can. With most of the window's quota spent by another
// token of the same user, a bulk run must wait for Cloudflare's window to
// reset instead of running into a 429.
func TestTheSchedulerSlowsDownWhenAnotherClientSpendsTheQuota(t *testing.T) {
	env := newTestEnv(t)
	const limit, window, fleet = 20, 3 * time.Second, 8
	env.token = env.sim.AddToken(cloudflaresim.Token{User: "netops"})
	other := env.sim.AddToken(cloudflaresim.Token{User: "netops"})
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": env.simURL, "rate_limit": limit, "rate_limit_window": "3s",
	}))
	seedCurrentTunnels(t, env, fleet)
	env.sim.SetRateLimit(limit, window)
	// Another tool of the same user spends all but three calls of the window.
	for i := 0; i < limit-3; i++ {
		req, _ := http.NewRequest(http.MethodGet, env.simURL+"/user/tokens/verify", nil)
		req.Header.Set("Authorization", "Bearer "+other.Value)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
	}
	start := env.clock.Now()
	runBulkToTheEnd(t, env, fleet)
	if n := env.sim.RateLimited(); n != 0 {
		t.Errorf("Cloudflare answered 429 %d times: the scheduler did not slow down for the other client's calls", n)
	}
	if took := env.clock.Now().Sub(start); took < window/2 {
		t.Errorf("the bulk run took %s; with the quota spent it had to wait for the window", took)
	}
}

// atSecondOfMinute moves the test clock forward to the next time whose
// second within the minute is sec, so that a test's due times do not fall on
// a minute boundary by chance.
func atSecondOfMinute(env *testEnv, sec int) {
	now := env.clock.Now()
	target := now.Truncate(time.Minute).Add(time.Minute + time.Duration(sec)*time.Second)
	env.clock.Advance(target.Sub(now))
}

// TestScheduledRotationHappensAtNextRotationToTheSecond: a tunnel is rotated
// at its next_rotation, not at the next minute boundary after it, so that the
// ttl a read returns tells the truth; and never before it.
func TestScheduledRotationHappensAtNextRotationToTheSecond(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	schedulerOver(t, env, env.storage)
	atSecondOfMinute(env, 20)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1m"}))
	next := record(t, env, env.tunnel.ID).NextRotation

	// A pass never sleeps past the due time: at most until the minute it
	// falls in, and there, until the second.
	if wait, until := pass(t, env), next.Sub(env.clock.Now()); wait > until {
		t.Errorf("the pass sleeps %s; the rotation is due in %s", wait, until)
	}
	env.clock.Advance(next.Sub(env.clock.Now()) - 500*time.Millisecond)
	if wait := pass(t, env); wait > 500*time.Millisecond || wait < 400*time.Millisecond {
		t.Errorf("half a second before the rotation is due, the pass sleeps %s", wait)
	}
	if v := storedVersion(t, env, env.pskPath()); v != 1 {
		t.Fatalf("rotated half a second early: version %d", v)
	}
	env.clock.Advance(700 * time.Millisecond)
	drain(t, env)
	rec := record(t, env, env.tunnel.ID)
	if rec.Version != 2 {
		t.Fatalf("not rotated 0.2s after next_rotation: version %d", rec.Version)
	}
	if rec.StoredAt.Before(next) || rec.StoredAt.After(next.Add(time.Second)) {
		t.Errorf("rotated at %s, due at %s", store.FormatTime(rec.StoredAt), store.FormatTime(next))
	}
}

// TestTheRunningSchedulerWakesAtNextRotation: the scheduler's own loop, not
// a test's pass, rotates within a second after next_rotation.
func TestTheRunningSchedulerWakesAtNextRotation(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	atSecondOfMinute(env, 20)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1m"}))
	next := record(t, env, env.tunnel.ID).NextRotation
	env.clock.Advance(next.Sub(env.clock.Now()) - 2*time.Second)
	env.clock.freeze()
	loop := startLoop(t, env)
	// The loop's first pass finds nothing due and means to sleep until the
	// rotation is due, two seconds on.
	sleep := loop.asked(t)
	if until := next.Sub(env.clock.Now()); sleep.d != until {
		t.Errorf("the loop sleeps %s; the rotation is due in %s", sleep.d, until)
	}
	// Its timer fires when that time has come: the loop's next pass
	// rotates the tunnel, and it asks for its next sleep once it has.
	env.clock.Advance(sleep.d)
	sleep.fire()
	loop.asked(t)
	rec := record(t, env, env.tunnel.ID)
	if rec.Version != 2 {
		t.Fatalf("the loop woke at next_rotation and did not rotate: version %d", rec.Version)
	}
	if late := rec.StoredAt.Sub(next); late < 0 || late > time.Second {
		t.Errorf("rotated %s after next_rotation, want within [0, 1s)", late)
	}
}

// loopTimer is the scheduler loop's timer in a test: each sleep the loop
// asks for is handed to the test, which fires it when it chooses. The loop
// asking again is also how the test knows that a pass has ended.
type loopTimer struct{ sleeps chan loopSleep }

type loopSleep struct {
	d     time.Duration
	fired chan time.Time
}

func (s loopSleep) fire() { s.fired <- time.Time{} }

func (l *loopTimer) after(d time.Duration) <-chan time.Time {
	s := loopSleep{d: d, fired: make(chan time.Time, 1)}
	l.sleeps <- s
	return s.fired
}

// asked waits for the loop's next sleep: a pass has ended. It gives up,
// failing the test, only if none comes in a minute of real time, which no
// pass of a unit test takes.
func (l *loopTimer) asked(t *testing.T) loopSleep {
	t.Helper()
	select {
	case s := <-l.sleeps:
		return s
	case <-time.After(time.Minute):
		t.Fatal("the scheduler loop asked for no sleep: it is stuck in a pass, or not running")
		return loopSleep{}
	}
}

// startLoop starts the mount's scheduler loop as Vault's Initialize does,
// on a timer the test fires (loopTimer), and stops it at the test's end.
func startLoop(t *testing.T, env *testEnv) *loopTimer {
	t.Helper()
	loop := &loopTimer{sleeps: make(chan loopSleep)}
	env.b.background.Stop()
	env.b.background = background.New(background.Config{
		Engine: env.b.engine, Now: env.clock.Now, Logger: env.b.Logger(), Connect: env.b.clients.Connect,
		MayWrite: env.b.mayWrite, Budget: env.b.clients.Budget(), After: loop.after, Census: env.b.census,
	})
	if err := env.b.Initialize(context.Background(), &logical.InitializationRequest{Storage: env.storage}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The loop may be asking for a sleep nobody reads any more.
		go func() {
			for range loop.sleeps {
			}
		}()
		env.b.background.Stop()
	})
	return loop
}

// TestAPassNeverSleepsPastAMinute: the loop plans from the entries it saw,
// but entries are also written behind its back (the repair walk, a record
// replicated from elsewhere): however far the next known rotation is, a pass
// looks again within a minute.
func TestAPassNeverSleepsPastAMinute(t *testing.T) {
	env := newConfiguredEnv(t)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "720h"}))
	pass(t, env) // the first pass starts the repair walk
	if wait := pass(t, env); wait > time.Minute {
		t.Errorf("with the next rotation in 30 days the pass sleeps %s", wait)
	}
}

// TestARescheduleInTheSameMinuteKeepsItsEntry: two writes 20 seconds apart
// put the tunnel's next rotation twice in one minute, so the old and new
// times share a schedule entry; dropping the superseded one must not drop
// the new one, or the tunnel would not rotate until the repair walk.
func TestARescheduleInTheSameMinuteKeepsItsEntry(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	schedulerOver(t, env, env.storage)
	atSecondOfMinute(env, 5)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1m"}))
	env.clock.Advance(20 * time.Second)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if rec := record(t, env, env.tunnel.ID); !scheduledEntry(t, env, rec) {
		t.Fatal("the second write's schedule entry is gone")
	}
}

// TestAnEntryOfAnOlderVersionIsHonoured: versions before exact scheduling
// keyed an entry by its minute rounded up. After an upgrade such an entry is
// neither dropped as stale nor duplicated by the repair walk, and its
// rotation happens, at most a minute late, never early.
func TestAnEntryOfAnOlderVersionIsHonoured(t *testing.T) {
	env := newConfiguredEnv(t)
	schedulerOver(t, env, env.storage)
	atSecondOfMinute(env, 20)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	ctx, tun := context.Background(), store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
	rec := record(t, env, env.tunnel.ID)
	// As an older version left it: the entry a minute later.
	if err := env.storage.Delete(ctx, store.DueKey(store.DueMinute(rec.NextRotation, false), tun)); err != nil {
		t.Fatal(err)
	}
	legacy := store.DueKey(store.DueMinute(rec.NextRotation, true), tun)
	if err := env.storage.Put(ctx, &logical.StorageEntry{Key: legacy, Value: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	drain(t, env) // the repair walk
	if scheduledEntry(t, env, rec) {
		t.Error("the repair walk added an entry beside the older version's")
	}
	env.clock.Advance(rec.NextRotation.Sub(env.clock.Now()) - time.Second)
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 1 {
		t.Fatalf("rotated early: version %d", v)
	}
	env.clock.Advance(41 * time.Second) // past the minute boundary
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 2 {
		t.Fatalf("the older version's entry was not worked: version %d", v)
	}
	if entry, _ := env.storage.Get(ctx, legacy); entry != nil {
		t.Error("the older version's entry is still there")
	}
}

// nextDaily is the first time after after at hh:mm UTC.
func nextDaily(after time.Time, hh, mm int) time.Time {
	after = after.UTC()
	at := time.Date(after.Year(), after.Month(), after.Day(), hh, mm, 0, 0, time.UTC)
	if !at.After(after) {
		at = at.Add(24 * time.Hour)
	}
	return at
}

// TestRotationScheduleRotatesAtItsTimes: a cron expression instead of a
// period. The write rotates and sets the schedule; the scheduler rotates at
// each of its times, to the second, never before; reads say so.
func TestRotationScheduleRotatesAtItsTimes(t *testing.T) {
	env := newConfiguredEnv(t)
	schedulerOver(t, env, env.storage)
	write := env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_schedule": "30 2 * * *"}))
	want := nextDaily(env.clock.Now(), 2, 30)
	if write.Data["rotation_schedule"] != "30 2 * * *" || write.Data["rotation_period"] != 0 || write.Data["next_rotation"] != store.FormatTime(want) {
		t.Fatalf("write answer: schedule %v, period %v, next %v (want %s)", write.Data["rotation_schedule"],
			write.Data["rotation_period"], write.Data["next_rotation"], store.FormatTime(want))
	}
	if ttl := write.Data["ttl"].(int); ttl != int(maxReadTTL/time.Second) {
		t.Errorf("ttl %d, next rotation in %s", ttl, want.Sub(env.clock.Now()))
	}

	for version := 2; version <= 3; version++ {
		env.clock.Advance(want.Sub(env.clock.Now()) - time.Second)
		drain(t, env)
		if v := storedVersion(t, env, env.pskPath()); v != version-1 {
			t.Fatalf("rotated a second before %s: version %d", store.FormatTime(want), v)
		}
		env.clock.Advance(1200 * time.Millisecond)
		drain(t, env)
		rec := record(t, env, env.tunnel.ID)
		if rec.Version != version || rec.StoredAt.Before(want) || rec.StoredAt.After(want.Add(time.Second)) {
			t.Fatalf("due at %s: version %d stored at %s", store.FormatTime(want), rec.Version, store.FormatTime(rec.StoredAt))
		}
		want = want.Add(24 * time.Hour)
		if !rec.NextRotation.Equal(want) || rec.RotationSchedule != "30 2 * * *" {
			t.Fatalf("after the rotation: next %s (want %s), schedule %q", store.FormatTime(rec.NextRotation), store.FormatTime(want), rec.RotationSchedule)
		}
	}
	assertCurrent(t, env, "after scheduled rotations")

	// A write without schedule fields keeps it; rotation_period replaces it.
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if rec := record(t, env, env.tunnel.ID); rec.RotationSchedule != "30 2 * * *" || !rec.NextRotation.Equal(nextDaily(rec.StoredAt, 2, 30)) {
		t.Errorf("a plain write: schedule %q, next %s", rec.RotationSchedule, store.FormatTime(rec.NextRotation))
	}
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "24h"}))
	if rec := record(t, env, env.tunnel.ID); rec.RotationSchedule != "" || rec.RotationPeriod != 24*time.Hour {
		t.Errorf("rotation_period after a schedule: schedule %q, period %s", rec.RotationSchedule, rec.RotationPeriod)
	}
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_schedule": ""}))
	if rec := record(t, env, env.tunnel.ID); rec.Scheduled() || !rec.NextRotation.IsZero() {
		t.Errorf("rotation_schedule=\"\": %+v", rec.Schedule())
	}
	if keys, _ := env.storage.List(context.Background(), store.DuePrefix); len(keys) != 0 {
		t.Errorf("schedule entries left after turning the schedule off: %v", keys)
	}
}

// TestAMissedRotationWindowWaitsForTheNextTime: a rotation that cannot start
// within rotation_window of its scheduled time (Vault was down here) is not
// done late, outside the maintenance window, when nobody expects the tunnel
// to go down: no call, the next scheduled time instead, and metadata says
// so until the next rotation. Within the window, late is fine.
func TestAMissedRotationWindowWaitsForTheNextTime(t *testing.T) {
	env := newConfiguredEnv(t)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_schedule": "0 2 * * 6", "rotation_window": "1h"}))
	first := record(t, env, env.tunnel.ID).NextRotation
	if first.Weekday() != time.Saturday || first.Hour() != 2 || first.Minute() != 0 {
		t.Fatalf("next rotation %s, want a Saturday at 02:00 UTC", store.FormatTime(first))
	}
	if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["rotation_window"] != 3600 {
		t.Errorf("rotation_window %v, want 3600", meta.Data["rotation_window"])
	}

	calls := env.sim.TotalCalls()
	env.clock.Advance(first.Add(time.Hour + time.Minute).Sub(env.clock.Now()))
	drain(t, env)
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Fatalf("a rotation past its window made %d Cloudflare calls", n)
	}
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	second := first.Add(7 * 24 * time.Hour)
	if meta.Data["version"] != 1 || meta.Data["next_rotation"] != store.FormatTime(second) {
		t.Fatalf("after the missed window: version %v, next %v (want %s)", meta.Data["version"], meta.Data["next_rotation"], store.FormatTime(second))
	}
	note, _ := meta.Data["schedule_note"].(string)
	if !strings.Contains(note, store.FormatTime(first)) || !strings.Contains(note, "rotation_window") || !strings.Contains(note, store.FormatTime(second)) {
		t.Errorf("schedule_note %q does not say which time was missed, why and what next", note)
	}
	if !scheduledEntry(t, env, record(t, env, env.tunnel.ID)) {
		t.Fatal("no schedule entry for the next time")
	}

	// Late within the window: rotated.
	env.clock.Advance(second.Add(59 * time.Minute).Sub(env.clock.Now()))
	drain(t, env)
	meta = env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if meta.Data["version"] != 2 || meta.Data["schedule_note"] != "" || meta.Data["next_rotation"] != store.FormatTime(second.Add(7*24*time.Hour)) {
		t.Errorf("late within the window: version %v, note %q, next %v", meta.Data["version"], meta.Data["schedule_note"], meta.Data["next_rotation"])
	}
}

// TestTheRunningSchedulerWakesForACronTime: the scheduler's own loop, asleep
// on an earlier plan, rotates at a cron time two seconds after the write
// that set it: the write wakes it to plan again.
func TestTheRunningSchedulerWakesForACronTime(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	atSecondOfMinute(env, 20)
	env.clock.freeze()
	loop := startLoop(t, env)
	loop.asked(t) // the first pass: nothing scheduled
	// The write pokes the sleeping loop: its next passes plan for the cron
	// time, the first whole minute at least min_rotation_period after the
	// write's key, each sleeping until then or for a minute at most.
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_schedule": "* * * * *"}))
	next := record(t, env, env.tunnel.ID).NextRotation
	for env.clock.Now().Before(next) {
		sleep := loop.asked(t)
		if until := next.Sub(env.clock.Now()); sleep.d != min(until, time.Minute) {
			t.Fatalf("the loop sleeps %s; the cron time is in %s", sleep.d, until)
		}
		env.clock.Advance(sleep.d)
		sleep.fire()
	}
	loop.asked(t)
	rec := record(t, env, env.tunnel.ID)
	if rec.Version != 2 {
		t.Fatalf("the loop woke at the cron time and did not rotate: version %d", rec.Version)
	}
	if late := rec.StoredAt.Sub(next); late < 0 || late > time.Second {
		t.Errorf("rotated %s after next_rotation, want within [0, 1s)", late)
	}
}

// seedCurrentTunnels adds n tunnels at the edge, each with a current record
// in Vault, as a fleet under management looks.
func seedCurrentTunnels(t *testing.T, env *testEnv, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		id := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID
		if err := store.WriteRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: id}, &store.Record{
			AccountID: env.account, TunnelID: id, PSK: "seeded", Version: 1, State: store.StateCurrent,
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// runBulkToTheEnd queues a bulk rotation of the account and waits, with the
// real scheduler loop, until all fleet tunnels are done; a failure or a
// stall fails the test.
func runBulkToTheEnd(t *testing.T, env *testEnv, fleet int) {
	t.Helper()
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	for passes := 0; ; passes++ {
		// A pass sleeps for the budget on the test clock; when it stops to
		// wait longer, the loop would sleep that long: so does the clock.
		wait := pass(t, env)
		p := env.must(env.request(logical.ReadOperation, "rotate/"+env.account, nil))
		if p.Data["done"] == fleet {
			return
		}
		if p.Data["failed_count"] != 0 || passes == 10*fleet {
			t.Fatalf("bulk rotation stalled or failed after %d passes: %v", passes, p.Data)
		}
		env.clock.Advance(wait)
	}
}

// TestKeptEntriesDoNotStarveLaterMinutes: more than a batch of due entries
// that the scheduler must keep (a bulk job whose entries are still being
// queued) comes before another tunnel's scheduled rotation. The pass must go
// on past them to the rotation; loading the same first batch again and again
// never reached it.
func TestKeptEntriesDoNotStarveLaterMinutes(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1m"}))
	schedulerOver(t, env, env.storage)
	ctx, now := context.Background(), env.clock.Now()
	other := cloudflaresim.NewID()
	job := &store.BulkJob{StartedAt: now.UTC(), Minute: store.DueMinute(now, false), Queued: store.DueBatch + 1, Queueing: true}
	if err := store.WriteBulkJob(ctx, env.storage, other, job); err != nil {
		t.Fatal(err)
	}
	for i := 0; i <= store.DueBatch; i++ {
		if err := store.QueueBulkRotation(ctx, env.storage, store.Tunnel{AccountID: other, TunnelID: fmt.Sprintf("%032x", i)}, job.Minute, now); err != nil {
			t.Fatal(err)
		}
	}
	// The test tunnel is due a minute after the job's minute; the job is
	// not yet taken as abandoned.
	env.clock.Advance(2 * time.Minute)
	calls := env.sim.TotalCalls()
	drain(t, env)
	if v := storedVersion(t, env, env.pskPath()); v != 2 {
		t.Fatalf("behind %d kept entries, the scheduled tunnel is at version %d, want 2", store.DueBatch+1, v)
	}
	if n := env.sim.TotalCalls() - calls; n != 1 {
		t.Errorf("%d Cloudflare calls, want 1 (the scheduled rotation; the job is still queueing)", n)
	}
	if left, err := store.CountBulkEntries(ctx, env.storage, job.Minute, other, func(string) bool { return false }); err != nil || left != store.DueBatch+1 {
		t.Errorf("entries of the job still queueing: %d (%v), want %d", left, err, store.DueBatch+1)
	}
}

// faultyStorage fails the Puts and Deletes its funcs pick.
type faultyStorage struct {
	logical.Storage
	mu         sync.Mutex
	failPut    func(key string) bool
	failDelete func(key string) bool
}

func (f *faultyStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	f.mu.Lock()
	fail := f.failPut != nil && f.failPut(e.Key)
	f.mu.Unlock()
	if fail {
		return errors.New("injected put failure")
	}
	return f.Storage.Put(ctx, e)
}

func (f *faultyStorage) Delete(ctx context.Context, key string) error {
	f.mu.Lock()
	fail := f.failDelete != nil && f.failDelete(key)
	f.mu.Unlock()
	if fail {
		return errors.New("injected delete failure")
	}
	return f.Storage.Delete(ctx, key)
}

func (f *faultyStorage) set(put, del func(string) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failPut, f.failDelete = put, del
}

func isDue(key string) bool { return strings.HasPrefix(key, store.DuePrefix) }

// schedulerOverFaultyStorage stops the mount's running scheduler and puts in its place
// one (not started) that works over fs: drain then runs its passes.
func schedulerOverFaultyStorage(t *testing.T, env *testEnv) *faultyStorage {
	t.Helper()
	env.b.clean(context.Background())
	fs := &faultyStorage{Storage: env.storage}
	env.b.background.Hold(fs)
	return fs
}

// A scheduled rotation fails (Cloudflare refuses it), and storage refuses
// the retry's schedule entry: rotateDue still calls the entry finished, pass
// deletes it, and the tunnel never rotates again although its record says
// rotation_period 2m.
func TestAFailedScheduledRotationNeverLosesItsSchedule(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "2m"}))
	fs := schedulerOverFaultyStorage(t, env)

	env.clock.Advance(3 * time.Minute)
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 403, Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}})
	fs.set(isDue, nil) // the retry's schedule entry cannot be written
	drain(t, env)
	fs.set(nil, nil)

	for i := 0; i < 3; i++ {
		env.clock.Advance(time.Hour)
		drain(t, env)
	}
	keys, _ := env.storage.List(context.Background(), store.DuePrefix)
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if v := storedVersion(t, env, env.pskPath()); v == 1 {
		t.Fatalf("3h after a failed rotation with rotation_period 2m: still version 1; due/ = %v, next_rotation = %v, state = %v",
			keys, meta.Data["next_rotation"], meta.Data["state"])
	}
}

// lateEnv: an account whose id sorts before every other (so its
// schedule entry comes first in its minute) has one tunnel rotated every
// minute; the test account has n tunnels stored in Vault whose every
// rotation Cloudflare refuses (the token may act on the first account only).
// The budget never binds (1200 calls a second), as with rate_limit_window=1s
// in the e2e suite. Each bulk entry the scheduler removes moves the test
// clock on by perItem: the time a real rotation attempt takes.
type lateEnv struct {
	*testEnv
	hook        *hookStorage
	other       string
	otherTunnel string
}

func newLateEnv(t *testing.T, n int, perItem time.Duration) *lateEnv {
	t.Helper()
	env := newTestEnv(t)
	hook := &hookStorage{Storage: env.storage}
	env.storage = hook
	schedulerOver(t, env, hook)
	other := strings.Repeat("0", 32)
	otherTunnel := env.sim.AddTunnel(other, cloudflaresim.Tunnel{}).ID
	env.token = env.sim.AddToken(cloudflaresim.Token{Accounts: []string{other}})
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": env.simURL, "request_timeout": "2s",
		"rate_limit": 1200, "rate_limit_window": "1s",
	}))
	lowerTheFloor(t, env)
	for i := 0; i < n; i++ {
		id := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID
		if err := store.WriteRecord(context.Background(), hook, store.Tunnel{AccountID: env.account, TunnelID: id}, &store.Record{
			AccountID: env.account, TunnelID: id, PSK: "seeded", Version: 1, State: store.StateCurrent,
			StoredAt: env.clock.Now().UTC(), Facts: store.Facts{Name: "IPsec_" + id[:6], CloudflareEndpoint: "203.0.113.1"},
		}); err != nil {
			t.Fatal(err)
		}
	}
	hook.mu.Lock()
	hook.onDelete = func(key string) error {
		if strings.HasPrefix(key, store.DuePrefix) && strings.HasSuffix(key, store.BulkSuffix) {
			env.clock.Advance(perItem)
		}
		return nil
	}
	hook.mu.Unlock()
	return &lateEnv{testEnv: env, hook: hook, other: other, otherTunnel: otherTunnel}
}

// TestAScheduledRotationMetEarlyWaitsABatchNotThePass: a tunnel due at
// second 50 of minute M is met by the pass at M:05 and kept (not due yet);
// behind it in key order, in the same minute, a bulk job of 1,500 failing
// tunnels, each attempt taking 0.1 s. Before this change a pass worked one
// batch (500 entries) and the next pass started from the first key again,
// so the kept rotation was met again after at most a batch: some 5 s late
// here. Now a pass goes on to the end of everything due before it comes
// back to an entry it kept, so the rotation waits for the whole job: some
// 105 s late here, and with a job of 10,000 tunnels some 16 minutes. A
// rotation with a rotation_window that a pass keeps for another reason (its
// record settling, a storage read that failed) would miss its window the
// same way and be moved to its next scheduled time. Starvation by a large job of rotations in LATER minutes is
// known; this is of rotations the pass has already met, and it is worse
// than before.
//
// Before the fix it printed:
//
//	the scheduled rotation due at ... was stored 1m47s late (want at most
//	a batch's worth, 50s, as before this change)
//
// On 6832037^1 (before the merge) the same test passes: "stored 8s late"
// (5 s of test clock, the rest real time under -race).
func TestAScheduledRotationMetEarlyWaitsABatchNotThePass(t *testing.T) {
	const n, perItem = 1500, 100 * time.Millisecond
	env := newLateEnv(t, n, perItem)
	atSecondOfMinute(env.testEnv, 50)
	otherPath := "psk/" + env.other + "/" + env.otherTunnel
	env.must(env.request(logical.UpdateOperation, otherPath, map[string]any{"rotation_period": "1m"}))
	rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.other, TunnelID: env.otherTunnel})
	if err != nil || rec == nil {
		t.Fatal(rec, err)
	}
	nextRotation := rec.NextRotation
	env.clock.Advance(15 * time.Second) // M:05, the minute of the next rotation
	if store.DueMinute(env.clock.Now(), false) != store.DueMinute(nextRotation, false) {
		t.Fatalf("setup: the job's minute is not the scheduled rotation's")
	}
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))

	// The scheduled rotation's key, as stored (a long pass may rotate the
	// tunnel again at its next time before it ends).
	var storedAt time.Time
	var mu sync.Mutex
	env.hook.mu.Lock()
	env.hook.onPut = func(e *logical.StorageEntry) error {
		var r store.Record
		if e.Key == (store.Tunnel{AccountID: env.other, TunnelID: env.otherTunnel}).StorageKey() && json.Unmarshal(e.Value, &r) == nil && r.Version == 2 && r.State == store.StateCurrent {
			mu.Lock()
			storedAt = r.StoredAt
			mu.Unlock()
		}
		return nil
	}
	env.hook.mu.Unlock()
	// The scheduler's loop: pass after pass, as long as a pass asks to be
	// run again at once or the work is not done.
	for i := 0; i < 50; i++ {
		drain(t, env.testEnv)
		if storedVersion(t, env.testEnv, otherPath) >= 2 {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if storedAt.IsZero() {
		t.Fatal("the scheduled rotation never happened")
	}
	late := storedAt.Sub(nextRotation)
	t.Logf("the scheduled rotation due at %s was stored %s late", store.FormatTime(nextRotation), late.Round(time.Second))
	if batch := time.Duration(store.DueBatch) * perItem; late > batch {
		t.Errorf("the scheduled rotation due at %s was stored %s late (want at most a batch's worth, %s, as before this change)",
			store.FormatTime(nextRotation), late.Round(time.Second), batch)
	}
}

// TestAScheduledRotationDueDuringABulkJobKeepsItsWindow (review of eb6e6de):
// the pass now starts again from the first entry once a rotation it met
// early comes due, but a scheduled rotation in a later minute than a bulk
// job's is never met early: it comes after every entry of the job in key
// order, and a pass works the whole job before it loads it. A tunnel whose
// maintenance window opens one minute after a job of 1,500 tunnels was
// queued (0.1 s an attempt) is reached some 2.5 minutes late, past a
// rotation_window of 1m, and missedWindow moves it to its next scheduled
// time (an hour later here; a week for a weekly window). With 10,000
// tunnels at the budget's pace a window of 1h is missed the same way. The
// earlier review called this "known"; nothing documents that a bulk job
// holds up every scheduled rotation due while it runs.
//
// It printed (on eb6e6de..5e7e70f):
//
//	the rotation due at <A+3:00> in a 1m window was not made: schedule_note "the rotation scheduled for ... could not start within rotation_window (1m0s) of it: the scheduler could not start it in time ...; it waits for the next scheduled time, <A+4h... >"
func TestAScheduledRotationDueDuringABulkJobKeepsItsWindow(t *testing.T) {
	const n, perItem = 1500, 100 * time.Millisecond
	env := newLateEnv(t, n, perItem)
	atSecondOfMinute(env.testEnv, 0)
	due := env.clock.Now().UTC().Add(3 * time.Minute).Truncate(time.Minute)
	otherPath := "psk/" + env.other + "/" + env.otherTunnel
	env.must(env.request(logical.UpdateOperation, otherPath, map[string]any{
		"rotation_schedule": fmt.Sprintf("%d * * * *", due.Minute()), "rotation_window": "1m",
	}))
	other := store.Tunnel{AccountID: env.other, TunnelID: env.otherTunnel}
	if rec, err := store.ReadRecord(context.Background(), env.storage, other); err != nil || rec == nil || !rec.NextRotation.Equal(due) {
		t.Fatalf("setup: next rotation %v, want %s (%v)", rec, store.FormatTime(due), err)
	}
	env.clock.Advance(2*time.Minute + 5*time.Second) // a minute before the window opens
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))

	for i := 0; i < 50; i++ {
		drain(t, env.testEnv)
		if storedVersion(t, env.testEnv, otherPath) >= 2 {
			break
		}
		if rec, err := store.ReadRecord(context.Background(), env.storage, other); err == nil && rec != nil && rec.ScheduleNote != "" {
			break
		}
	}
	if storedVersion(t, env.testEnv, otherPath) < 2 {
		meta := env.must(env.request(logical.ReadOperation, "metadata/"+env.other+"/"+env.otherTunnel, nil))
		t.Errorf("the rotation due at %s in a 1m window was not made: schedule_note %q", store.FormatTime(due), meta.Data["schedule_note"])
	}
}
