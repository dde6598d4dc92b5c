package main

// Sequences a reviewer of the restructure found. The scheduler ones failed
// on the restructure as committed and on the code before it, and pass since
// the scheduler keeps an entry until its replacement is stored and counts
// bulk entries once; the other two failed until their fixes.

// Review of issue 8 (the rotation-core restructure, 1919d6a): sequences in
// which the scheduler's single delete, the error classification or the help
// texts do not do what the commit says.

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

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

// A bulk rotation succeeds, the delete of its due/ entry fails: the commit
// says the entry "is worked again later, never forgotten in silence" - and
// working it again rotates the tunnel a second time and counts it twice.
// The issue named exactly this ("a silently failed delete of a bulk entry
// rotates that tunnel again") as what rotateDue's outcome was to fix.
func TestABulkEntryWhoseDeleteFailsIsNotRotatedTwice(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	fs := schedulerOverFaultyStorage(t, env)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))

	fs.set(nil, isDue)
	drain(t, env) // rotates, then cannot remove the entry
	fs.set(nil, nil)
	drain(t, env) // storage is back

	p := env.must(env.request(logical.ReadOperation, "rotate/"+env.account, nil))
	v := storedVersion(t, env, env.pskPath())
	if v != 2 || p.Data["done"] != 1 {
		t.Fatalf("one bulk job of one tunnel: version %d (want 2), edge generations %d, progress queued=%v done=%v remaining=%v",
			v, env.generations(), p.Data["queued"], p.Data["done"], p.Data["remaining"])
	}
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

// A corrupt due/ entry of a bulk job: store.ReadDueEntry reports it as an entry
// with no marks, the tunnel (no rotation_period) looks "stale", the entry is
// deleted, and the job neither rotates nor fails the tunnel: it stays
// "remaining" for ever.
func TestACorruptBulkEntryEndsItsJob(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	schedulerOverFaultyStorage(t, env)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	ctx := context.Background()
	minutes, _ := env.storage.List(ctx, store.DuePrefix)
	for _, m := range minutes {
		keys, _ := env.storage.List(ctx, store.DuePrefix+m)
		for _, k := range keys {
			if err := env.storage.Put(ctx, &logical.StorageEntry{Key: store.DuePrefix + m + k, Value: []byte("{corrupt")}); err != nil {
				t.Fatal(err)
			}
		}
	}
	drain(t, env)
	drain(t, env)
	p := env.must(env.request(logical.ReadOperation, "rotate/"+env.account, nil))
	if p.Data["remaining"] != 0 {
		left, _ := env.storage.List(ctx, store.DuePrefix)
		t.Fatalf("bulk job after its only entry was worked off: %v (due/ now %v, version %d)", p.Data, left, storedVersion(t, env, env.pskPath()))
	}
}

// A first write whose GetTunnel (the edge's key before) fails with a 5xx:
// rotateOnWrite's classification assumes any non-NoEffect Cloudflare error
// of rotateLocked came from psk_generate and says the tunnel is marked
// rotation_unknown; nothing was written, nothing was generated.
func TestAFirstWriteThatNeverSentAGenerateClaimsNoMark(t *testing.T) {
	env := newConfiguredEnv(t)
	for i := 0; i < 3; i++ { // GetTunnel is retried twice
		env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: 503})
	}
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	text := errorText(resp, err)
	meta, merr := env.request(logical.ReadOperation, env.metaPath(), nil)
	stored := meta != nil && merr == nil && meta.Data != nil
	if strings.Contains(text, "marked "+store.StateRotationUnknown) && !stored {
		t.Fatalf("status %d says %q, but metadata has nothing stored (%v, %v); psk_generate calls: %d",
			httpStatus(resp, err), text, meta, merr, env.sim.Calls(cloudflaresim.OpPSKGenerate))
	}
}

// The help test covers reads only; config/rotate-root's answer carries
// token_status and token_expires_on, which its help does not name.
func TestRotateRootHelpNamesItsAnswer(t *testing.T) {
	env := newConfiguredEnv(t)
	resp := env.must(env.request(logical.UpdateOperation, "config/rotate-root", nil))
	help := env.b.Route("config/rotate-root").HelpDescription
	for field := range resp.Data {
		if !regexp.MustCompile(`\b` + regexp.QuoteMeta(field) + `\b`).MatchString(help) {
			t.Errorf("write config/rotate-root returns %q, which its help does not name", field)
		}
	}
}
