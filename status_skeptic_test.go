package main

// A skeptic's tests of issue 17's status path (the census): sequences that
// leave status failing, or its counts wrong while it says they are exact.

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// restartOverStorage is restartOver with the new backend over s (env's
// storage wrapped), which the returned env's requests use too.
func restartOverStorage(t *testing.T, env *testEnv, s logical.Storage) *testEnv {
	t.Helper()
	conf := logical.TestBackendConfig()
	conf.StorageView = s
	conf.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: env.logs})
	b := newBackend()
	b.now, b.after = env.clock.Now, env.clock.after
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	b.background.Hold(s)
	t.Cleanup(func() { b.Cleanup(context.Background()) })
	next := *env
	next.b, next.storage = b, s
	return &next
}

// sizeLimited refuses, as Raft does beyond its max_entry_size, a Put whose
// value is larger than max.
type sizeLimited struct {
	logical.Storage
	max int
}

func (s *sizeLimited) Put(ctx context.Context, e *logical.StorageEntry) error {
	if len(e.Value) > s.max {
		return fmt.Errorf("put failed due to value being too large; got %d bytes, max: %d bytes", len(e.Value), s.max)
	}
	return s.Storage.Put(ctx, e)
}

// raftSmallEntry is the max_entry_size e2e/bulk_test.go runs Raft with
// (128 KiB): the size the project already keeps its bulk entries under.
const raftSmallEntry = 128 << 10

// TestSkepticTheCensusOutgrowsRaftsEntrySize: the census entry carries the
// first 100 tunnels of each attention kind with their reasons, and a
// failing tunnel's reason is Cloudflare's refusal, bounded only at 1,024
// bytes. With 100 stale, 100 gone and 100 failing tunnels whose refusal
// runs to a few hundred bytes, the entry no longer fits Raft's
// max_entry_size as e2e/bulk_test.go configures it: every fold fails (a
// warning each pass), a standby's status freezes at the last fold, and a
// clean stop no longer hands exact counts on: the next process says
// counts_exact false until a whole walk (hours on a large mount).
//
// Printed on the code as reviewed:
//
//	longest reason listed: 661 bytes; census entry refused: 143316 bytes
//	after a clean stop: counts_exact false (the census, 143316 bytes, could
//	not be stored under max_entry_size 131072)
func TestSkepticTheCensusOutgrowsRaftsEntrySize(t *testing.T) {
	if testing.Short() {
		t.Skip("rotates 300 tunnels")
	}
	base := newConfiguredEnv(t)
	limited := &sizeLimited{Storage: base.storage, max: raftSmallEntry}
	env := restartOverStorage(t, base, limited)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"rate_limit": 1200, "heal_stale_psk": false, "min_rotation_period": "1m",
	}))
	const perKind = 100
	ids := map[string][]string{}
	for _, kind := range []string{"stale", "gone", "failing"} {
		for i := 0; i < perKind; i++ {
			id := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID
			ids[kind] = append(ids[kind], id)
			var data map[string]any
			if kind == "failing" {
				data = map[string]any{"rotation_period": "1h"}
			}
			env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+id, data))
		}
	}
	for i := 0; i < perKind; i++ {
		env.sim.RegenerateOutOfBand(env.account, ids["stale"][i])
		env.sim.DeleteTunnel(env.account, ids["gone"][i])
	}
	backgroundPass(t, env) // the drift sweep: stale and gone
	// Cloudflare refuses every scheduled rotation with three messages of
	// the kind its API sends: about 650 bytes of reason, well within the
	// 1,024 the engine keeps (store.BoundReason).
	refusal := cloudflaresim.Fault{Status: 400, Errors: []cloudflaresim.Message{
		{Code: 7003, Message: "Could not route to /client/v4/accounts/" + env.account + "/magic/ipsec_tunnels/psk_generate, perhaps your object identifier is invalid?"},
		{Code: 1002, Message: "The ipsec tunnel's configuration could not be validated: the customer endpoint, interface address and health check target must be set before a pre-shared key can be generated for it"},
		{Code: 1001, Message: "Magic WAN is not entitled for this account, or the entitlement is being provisioned; if you recently enabled Magic WAN, wait a few minutes and try again, otherwise contact your account team. See https://developers.cloudflare.com/magic-wan/ for the requirements"},
	}}
	for i := 0; i < perKind; i++ {
		env.sim.FailNext(cloudflaresim.OpPSKGenerate, refusal)
	}
	env.clock.Advance(time.Hour + time.Minute)
	drain(t, env)
	got := status(t, env)
	if got["attention_count"] != 3*perKind {
		t.Fatalf("attention_count %v, want %d (states %v failing %v)", got["attention_count"], 3*perKind, got["states"], got["failing_count"])
	}
	var reason int
	for _, a := range got["failing"].([]map[string]any) {
		reason = max(reason, len(a["reason"].(string)))
	}
	env.clock.Advance(store.CensusFoldEvery)
	drain(t, env)                       // folds, or tries to
	env.b.Cleanup(context.Background()) // a clean stop: writes the census closed, or tries to

	again := restartOverStorage(t, env, limited)
	got = status(t, again)
	size := "?"
	if e, _ := base.storage.Get(context.Background(), store.CensusKey); e != nil {
		size = fmt.Sprintf("(stored) %d", len(e.Value))
	}
	if _, line, ok := strings.Cut(env.logs.String(), "value being too large; got "); ok {
		size, _, _ = strings.Cut(line, " ")
	}
	t.Logf("longest reason listed: %d bytes; census entry refused: %s bytes", reason, size)
	if got["counts_exact"] != true {
		t.Fatalf("after a clean stop: counts_exact %v (the census, %s bytes, could not be stored under max_entry_size %d)",
			got["counts_exact"], size, raftSmallEntry)
	}
}

// TestSkepticADowngradeRoundTripIsCalledExact: a mount runs this version
// and stops cleanly (census closed, exact); the operator pins the previous
// plugin version, which rotates, adds and forgets tunnels without a
// census; then upgrades again. The census loaded is the one closed before
// the downgrade, and status says counts_exact true for counts that are
// wrong until the next walk finishes (the first pass here; about two hours
// on 100,000 tunnels). The help text promises counts_exact false "on a
// mount with records from before this version, until that walk".
//
// Printed on the code as reviewed:
//
//	after a downgrade and an upgrade: tunnels 1, counts_exact true; the
//	records hold 2
func TestSkepticADowngradeRoundTripIsCalledExact(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.b.Cleanup(context.Background()) // a clean stop: the census closed

	// The previous version: a tunnel written without the census (its
	// record as the previous version wrote it: this version's record of
	// the first tunnel, under another tunnel's id).
	other := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID
	rec := *record(t, env, env.tunnel.ID)
	rec.TunnelID = other
	if err := store.WriteRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: other}, &rec); err != nil {
		t.Fatal(err)
	}

	upgraded := restartOver(t, env)
	got := status(t, upgraded)
	if want := truthOf(t, env.storage).tunnels; got["counts_exact"] == true && got["tunnels"] != want {
		t.Fatalf("after a downgrade and an upgrade: tunnels %v, counts_exact %v; the records hold %d", got["tunnels"], got["counts_exact"], want)
	}
}

// TestSkepticAnUpgradeWithoutACensusBecomesExact: records of a version
// without the census, no census entry. The first status says the counts
// are not exact, and the first walk makes them exact, attention list
// included. (Harmless: passes.)
func TestSkepticAnUpgradeWithoutACensusBecomesExact(t *testing.T) {
	env := newConfiguredEnv(t)
	other := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "24h"}))
	env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+other, nil))
	env.sim.RegenerateOutOfBand(env.account, other)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"heal_stale_psk": false}))
	backgroundPass(t, env) // other is stale
	env.b.Cleanup(context.Background())
	// What the previous version left: no census, no attention index.
	ctx := context.Background()
	if err := env.storage.Delete(ctx, store.CensusKey); err != nil {
		t.Fatal(err)
	}
	for _, kind := range store.AttentionKinds {
		keys, _ := env.storage.List(ctx, store.AttentionPrefix+kind+"/")
		for _, k := range keys {
			if err := env.storage.Delete(ctx, store.AttentionPrefix+kind+"/"+k); err != nil {
				t.Fatal(err)
			}
		}
	}
	upgraded := restartOver(t, env)
	if got := status(t, upgraded); got["counts_exact"] != false {
		t.Fatalf("before the first walk: counts_exact %v", got["counts_exact"])
	}
	drain(t, upgraded)
	got := assertStatus(t, upgraded, "after the first walk")
	if !strings.Contains(fmt.Sprint(got["attention"]), other) {
		t.Fatalf("attention %v does not list the stale tunnel", got["attention"])
	}
}

// watchedStorage fails the Delete of one chosen key once, and counts the
// Lists under attention/.
type watchedStorage struct {
	logical.Storage
	mu             sync.Mutex
	failDeleteOnce string
	attentionLists int
}

func (s *watchedStorage) Delete(ctx context.Context, key string) error {
	s.mu.Lock()
	fail := key == s.failDeleteOnce
	if fail {
		s.failDeleteOnce = ""
	}
	s.mu.Unlock()
	if fail {
		return errors.New("injected storage failure")
	}
	return s.Storage.Delete(ctx, key)
}

func (s *watchedStorage) List(ctx context.Context, prefix string) ([]string, error) {
	if strings.HasPrefix(prefix, store.AttentionPrefix) {
		s.mu.Lock()
		s.attentionLists++
		s.mu.Unlock()
	}
	return s.Storage.List(ctx, prefix)
}

func (s *watchedStorage) lists() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.attentionLists
}

// staleFleet is a mount over watched storage with n stale tunnels (the edge
// changed their keys, heal_stale_psk off), their ids in key order.
func staleFleet(t *testing.T, n int) (*testEnv, *watchedStorage, []string) {
	t.Helper()
	base := newConfiguredEnv(t)
	ws := &watchedStorage{Storage: base.storage}
	env := restartOverStorage(t, base, ws)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"rate_limit": 1200, "heal_stale_psk": false}))
	var ids []string
	for i := 0; i < n; i++ {
		id := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID
		ids = append(ids, id)
		env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+id, nil))
		env.sim.RegenerateOutOfBand(env.account, id)
	}
	backgroundPass(t, env) // the drift sweep: all stale
	sort.Strings(ids)
	if got := status(t, env); got["states"].(map[string]any)[store.StateStale] != n || got["counts_exact"] != true {
		t.Fatalf("setup: states %v counts_exact %v", got["states"], got["counts_exact"])
	}
	return env, ws, ids
}

// TestSkepticACurrentTunnelListedStaleWhileExact: more stale tunnels than
// status lists (100). The first one listed is rotated by its operator and
// is current again, but the Delete of its attention/ entry fails (index
// writes are best effort: a warning, no taint). The list, one short, is
// refilled from the index at the next status read, and the refill puts
// the tunnel back: status lists a current tunnel as stale, with
// counts_exact true, until the scheduler's walk reaches the index (10
// minutes and a whole walk later: about two hours on 100,000 tunnels).
//
// Printed on the code as reviewed:
//
//	status lists 01aeacdc5c12d24c284ff35840db70c7 as stale, but its record is
//	current (counts_exact true, stale 100)
func TestSkepticACurrentTunnelListedStaleWhileExact(t *testing.T) {
	env, ws, ids := staleFleet(t, store.ListedPerKind+1)
	first := ids[0]
	ws.mu.Lock()
	ws.failDeleteOnce = store.AttentionPrefix + store.AttentionStale + "/" + env.account + "." + first
	ws.mu.Unlock()
	env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+first, nil))
	if rec := record(t, env, first); rec.State != store.StateCurrent {
		t.Fatalf("the rotated tunnel is %s", rec.State)
	}
	got := status(t, env)
	for _, a := range got["attention"].([]map[string]any) {
		if a["tunnel_id"] == first {
			t.Fatalf("status lists %s as %v, but its record is current (counts_exact %v, stale %v)",
				first, a["state"], got["counts_exact"], got["states"].(map[string]any)[store.StateStale])
		}
	}
}

// TestSkepticStatusListsTheIndexAsTunnelsRecover: status is said to read
// nothing from storage on the active node. With more tunnels of a kind than
// it lists, each one of the listed that recovers makes the next status read
// List the whole attention/<kind>/ index (all of that kind: thousands in a
// fleet-wide incident) and Get the entries it did not list. A monitoring
// check polling status while tunnels recover one by one pays that List on
// most reads.
//
// Printed on the code as reviewed:
//
//	a status read after one listed tunnel recovered listed the attention
//	index 1 time(s) (101 stale tunnels)
func TestSkepticStatusListsTheIndexAsTunnelsRecover(t *testing.T) {
	env, ws, ids := staleFleet(t, store.ListedPerKind+1)
	env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+ids[0], nil))
	before := ws.lists()
	status(t, env)
	if n := ws.lists() - before; n != 0 {
		t.Fatalf("a status read after one listed tunnel recovered listed the attention index %d time(s) (%d stale tunnels)", n, len(ids))
	}
}
