package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// bulkFleet gives the test account n tunnels (the env's first among them),
// each with a stored key, and returns their ids.
func bulkFleet(t *testing.T, env *testEnv, n int) []string {
	t.Helper()
	tunnels := []string{env.tunnel.ID}
	for len(tunnels) < n {
		tunnels = append(tunnels, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID)
	}
	for _, id := range tunnels {
		env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+id, nil))
	}
	return tunnels
}

// dueKeysOf returns the due/ entries of a tunnel of the test account.
func dueKeysOf(t *testing.T, env *testEnv, tunnel string) []string {
	t.Helper()
	var out []string
	for key := range env.storageSnapshot() {
		if strings.HasPrefix(key, duePrefix) && strings.Contains(key, "/"+env.account+"."+tunnel) {
			out = append(out, key)
		}
	}
	return out
}

func progressOf(t *testing.T, env *testEnv) map[string]any {
	t.Helper()
	resp := env.must(env.request(logical.ReadOperation, "rotate/"+env.account, nil))
	if resp == nil {
		t.Fatal("rotate/ reports no job")
	}
	return resp.Data
}

// TestBulkSurvivesRotateRootMidPass: config/rotate-root in the middle of a
// scheduler pass kills the token value the pass started with (Cloudflare
// drops the old value at once). Every later item must use the new value, not
// fail for good.
func TestBulkSurvivesRotateRootMidPass(t *testing.T) {
	env := newConfiguredEnv(t)
	tunnels := bulkFleet(t, env, 4)
	storage := &hookStorage{Storage: env.storage}
	schedulerOver(t, env, storage)
	var once sync.Once
	var rolled *logical.Response
	var rollErr error
	storage.mu.Lock()
	storage.onPut = func(e *logical.StorageEntry) error {
		if storesCurrentKey(e) {
			// After the pass's first generate, as an operator might.
			once.Do(func() {
				rolled, rollErr = env.b.HandleRequest(context.Background(), &logical.Request{
					Operation: logical.UpdateOperation, Path: "config/rotate-root", Storage: env.storage,
				})
			})
		}
		return nil
	}
	storage.mu.Unlock()

	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	mustSucceed(t, rolled, rollErr)
	if tok, ok := env.sim.TokenByID(env.token.ID); !ok || tok.Value == env.token.Value {
		t.Fatal("the token was not rolled during the pass")
	} else {
		env.token.Value = tok.Value // for the log check
	}
	progress := progressOf(t, env)
	if progress["done"] != len(tunnels) || progress["remaining"] != 0 {
		t.Fatalf("progress after rotate-root mid-pass = %v", progress)
	}
	for _, id := range tunnels {
		if v := storedVersion(t, env, "psk/"+env.account+"/"+id); v != 2 {
			t.Errorf("tunnel %s at version %d, want 2", id, v)
		}
	}
}

// TestBulkRefusesNegativeOlderThan: a negative older_than would queue every
// tunnel (every key is "older" than a time in the future): it is a 400 before
// anything happens.
func TestBulkRefusesNegativeOlderThan(t *testing.T) {
	env := newConfiguredEnv(t)
	bulkFleet(t, env, 2)
	schedulerOver(t, env, env.storage)
	before, calls := env.storageSnapshot(), env.sim.TotalCalls()
	for _, v := range []any{"-1h", -3600, "-1s"} {
		resp, err := env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"older_than": v})
		if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "older_than") {
			t.Errorf("older_than=%v: %d %s", v, httpStatus(resp, err), errorText(resp, err))
		}
	}
	drain(t, env)
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("a refused bulk rotation changed storage")
	}
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Errorf("a refused bulk rotation made %d Cloudflare calls", n)
	}
}

// TestBulkNeverRotatesTwiceWhenADeleteFails: the scheduler could not remove
// a worked bulk entry, so a later pass meets it again. That pass must neither
// rotate the tunnel again nor count it again, whether the first try failed
// or succeeded.
func TestBulkNeverRotatesTwiceWhenADeleteFails(t *testing.T) {
	env := newConfiguredEnv(t)
	tunnels := bulkFleet(t, env, 3)
	sort.Strings(tunnels) // the scheduler works a minute's entries in key order
	storage := &hookStorage{Storage: env.storage}
	schedulerOver(t, env, storage)
	generates := func() int { return env.sim.Calls(cloudflaresim.OpPSKGenerate) - len(tunnels) }
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))

	// The first item fails at Cloudflare, and its entry cannot be removed.
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, forbidden)
	storage.failDeletes(duePrefix)
	drain(t, env)
	drain(t, env)
	if n := generates(); n != 1 {
		t.Fatalf("a failed item whose entry stayed was tried %d times, want 1", n)
	}
	if p := progressOf(t, env); p["done"] != 0 || len(p["failed"].([]map[string]any)) != 1 || p["remaining"] != 2 {
		t.Fatalf("progress after the failed item = %v", p)
	}

	// The second succeeds, and its entry cannot be removed.
	keys := dueKeysOf(t, env, tunnels[1])
	if len(keys) != 1 {
		t.Fatalf("entries of the second tunnel: %v", keys)
	}
	storage.failDeletes(keys[0])
	drain(t, env)
	drain(t, env)
	if n := generates(); n != 2 {
		t.Fatalf("after the second item: %d generates, want 2", n)
	}
	// Progress counts an item done once its entry is gone, so it cannot
	// count it twice: until then, the item is still remaining.
	if p := progressOf(t, env); p["done"] != 0 || p["remaining"] != 2 {
		t.Fatalf("progress after the second item = %v", p)
	}

	storage.failDeletes("")
	drain(t, env)
	if n := generates(); n != 3 {
		t.Fatalf("after the run: %d generates, want 3 (one per tunnel)", n)
	}
	p := progressOf(t, env)
	if p["queued"] != 3 || p["done"] != 2 || len(p["failed"].([]map[string]any)) != 1 || p["remaining"] != 0 {
		t.Fatalf("progress after the run = %v", p)
	}
	for i, want := range []int{1, 2, 2} {
		if v := storedVersion(t, env, "psk/"+env.account+"/"+tunnels[i]); v != want {
			t.Errorf("tunnel %d at version %d, want %d", i, v, want)
		}
	}
	if keys, _ := env.storage.List(context.Background(), duePrefix); len(keys) != 0 {
		t.Errorf("entries left after the run: %v", keys)
	}
}

// TestBulkCountsVanishedTunnelsAsSkipped: a tunnel deleted in Vault after
// the job was queued, and one Cloudflare no longer knows, are each counted
// once as skipped with the reason, not left remaining for ever nor counted
// as failed or done.
func TestBulkCountsVanishedTunnelsAsSkipped(t *testing.T) {
	env := newConfiguredEnv(t)
	tunnels := bulkFleet(t, env, 3)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	forgotten, gone := tunnels[1], tunnels[2]
	env.must(env.request(logical.DeleteOperation, "psk/"+env.account+"/"+forgotten, nil))
	env.sim.DeleteTunnel(env.account, gone)

	drain(t, env)
	p := progressOf(t, env)
	skipped, ok := p["skipped"].([]map[string]any)
	if !ok || p["queued"] != 3 || p["done"] != 1 || len(p["failed"].([]map[string]any)) != 0 || len(skipped) != 2 || p["remaining"] != 0 {
		t.Fatalf("progress = %v", p)
	}
	reasons := map[string]string{}
	for _, s := range skipped {
		reasons[s["tunnel_id"].(string)] = s["reason"].(string)
	}
	if !strings.Contains(reasons[forgotten], "not stored in Vault") {
		t.Errorf("reason for the tunnel deleted in Vault: %q", reasons[forgotten])
	}
	if !strings.Contains(reasons[gone], "no longer exists at Cloudflare") {
		t.Errorf("reason for the tunnel deleted at Cloudflare: %q", reasons[gone])
	}
	if keys, _ := env.storage.List(context.Background(), duePrefix); len(keys) != 0 {
		t.Errorf("entries left after the run: %v", keys)
	}
}

// TestBulkJobIsWrittenBeforeItsEntries: every entry belongs to a recorded
// job, so the job record is stored first; when an entry cannot be stored,
// rotate/ fails and the job counts the entries that were written, and only
// those are rotated.
func TestBulkJobIsWrittenBeforeItsEntries(t *testing.T) {
	cases := []struct {
		name string
		// failAt fails the Put of the failAt-th entry (0: none).
		failAt     int
		wantQueued int
	}{
		{"every entry stored", 0, 3},
		{"the third entry fails", 3, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			bulkFleet(t, env, 3)
			schedulerOver(t, env, env.storage)
			storage := &hookStorage{Storage: env.storage}
			env.storage = storage
			var puts []string
			entries := 0
			storage.mu.Lock()
			storage.onPut = func(e *logical.StorageEntry) error {
				puts = append(puts, e.Key)
				if strings.HasPrefix(e.Key, duePrefix) {
					entries++
					if entries == tc.failAt {
						return errors.New("injected storage failure")
					}
				}
				return nil
			}
			storage.mu.Unlock()

			resp, err := env.request(logical.UpdateOperation, "rotate/"+env.account, nil)
			storage.mu.Lock()
			storage.onPut = nil
			storage.mu.Unlock()
			if tc.failAt == 0 {
				mustSucceed(t, resp, err)
			} else if httpStatus(resp, err) != http.StatusInternalServerError || !strings.Contains(errorText(resp, err), "2 of 3") {
				t.Fatalf("rotate/ with a failing entry write: %d %s", httpStatus(resp, err), errorText(resp, err))
			}
			firstJob, firstEntry := -1, -1
			for i, key := range puts {
				if firstJob < 0 && strings.HasPrefix(key, "bulk/") {
					firstJob = i
				}
				if firstEntry < 0 && strings.HasPrefix(key, duePrefix) {
					firstEntry = i
				}
			}
			if firstJob < 0 || firstJob > firstEntry {
				t.Fatalf("storage writes in order %v: the job must come before its entries", puts)
			}

			drain(t, env)
			p := progressOf(t, env)
			if p["queued"] != tc.wantQueued || p["done"] != tc.wantQueued || p["remaining"] != 0 {
				t.Errorf("progress = %v", p)
			}
			if n := env.sim.Calls(cloudflaresim.OpPSKGenerate) - 3; n != tc.wantQueued {
				t.Errorf("%d rotations, want %d", n, tc.wantQueued)
			}
		})
	}
}

// TestBulkProgressWhileQueueing: while rotate/ is still writing a job's
// entries the scheduler works none of them, and progress says that every
// tunnel is still to do.
func TestBulkProgressWhileQueueing(t *testing.T) {
	env := newConfiguredEnv(t)
	bulkFleet(t, env, 3)
	schedulerOver(t, env, env.storage)
	storage := &hookStorage{Storage: env.storage}
	env.storage = storage
	var during map[string]any
	calls := env.sim.TotalCalls()
	entries := 0
	storage.mu.Lock()
	storage.onPut = func(e *logical.StorageEntry) error {
		if strings.HasPrefix(e.Key, duePrefix) {
			if entries++; entries == 3 {
				// Two entries are stored, the third is being written.
				drain(t, env)
				during = progressOf(t, env)
			}
		}
		return nil
	}
	storage.mu.Unlock()
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Errorf("the scheduler worked a job still being queued: %d Cloudflare calls", n)
	}
	if during["queued"] != 3 || during["done"] != 0 || during["remaining"] != 3 {
		t.Errorf("progress while queueing = %v", during)
	}
	drain(t, env)
	if p := progressOf(t, env); p["done"] != 3 || p["remaining"] != 0 {
		t.Errorf("progress after the run = %v", p)
	}
}

// TestBulkJobLeftHalfQueuedIsCounted: rotate/ stopped half way (the process
// died) and left its job marked queueing. Once that is long past, the job
// counts the entries that were written and the scheduler works them.
func TestBulkJobLeftHalfQueuedIsCounted(t *testing.T) {
	env := newConfiguredEnv(t)
	tunnels := bulkFleet(t, env, 3)
	schedulerOver(t, env, env.storage)
	ctx, started := context.Background(), env.clock.Now()
	job := &bulkJob{StartedAt: started.UTC(), Minute: dueMinute(started, false), Queued: 3, Queueing: true}
	if err := writeBulkJob(ctx, env.storage, env.account, job); err != nil {
		t.Fatal(err)
	}
	for _, id := range tunnels[:2] {
		if err := queueBulkRotation(ctx, env.storage, tunnelRef{env.account, id}, job.Minute, started); err != nil {
			t.Fatal(err)
		}
	}

	drain(t, env)
	if p := progressOf(t, env); p["queued"] != 3 || p["done"] != 0 || p["remaining"] != 3 {
		t.Fatalf("progress while the job may still be queueing = %v", p)
	}
	env.clock.Advance(bulkQueueAbandoned + time.Second)
	if p := progressOf(t, env); p["queued"] != 2 || p["done"] != 0 || p["remaining"] != 2 {
		t.Fatalf("progress of the abandoned job = %v", p)
	}
	drain(t, env)
	if p := progressOf(t, env); p["queued"] != 2 || p["done"] != 2 || p["remaining"] != 0 {
		t.Fatalf("progress after the run = %v", p)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKGenerate) - len(tunnels); n != 2 {
		t.Errorf("%d rotations, want 2", n)
	}
}

// TestBulkRefusesASecondJobWhileOneRuns: a second rotate/ of an account
// whose job still has rotations to do is a 409 that tells the running job's
// progress; nothing is queued or changed. Once the job is done, a new one
// may start.
func TestBulkRefusesASecondJobWhileOneRuns(t *testing.T) {
	env := newConfiguredEnv(t)
	bulkFleet(t, env, 3)
	schedulerOver(t, env, env.storage)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	before, calls := env.storageSnapshot(), env.sim.TotalCalls()

	resp, err := env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"older_than": "1s"})
	if httpStatus(resp, err) != http.StatusConflict {
		t.Fatalf("a second job while one runs: %d %s", httpStatus(resp, err), errorText(resp, err))
	}
	for _, want := range []string{"queued 3", "done 0", "failed 0", "skipped 0", "remaining 3"} {
		if !strings.Contains(errorText(resp, err), want) {
			t.Errorf("the refusal %q does not say %q", errorText(resp, err), want)
		}
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("a refused bulk rotation changed storage")
	}
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Errorf("a refused bulk rotation made %d Cloudflare calls", n)
	}

	drain(t, env)
	if again := env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil)); again.Data["queued"] != 3 {
		t.Fatalf("a new job after the last one finished: %v", again.Data)
	}
	// A job started in the same minute as the last takes the next minute.
	env.clock.Advance(time.Minute)
	drain(t, env)
	if p := progressOf(t, env); p["queued"] != 3 || p["done"] != 3 || p["remaining"] != 0 {
		t.Errorf("progress of the second job = %v", p)
	}
	if v := storedVersion(t, env, env.pskPath()); v != 3 {
		t.Errorf("after two jobs: version %d, want 3", v)
	}
}
