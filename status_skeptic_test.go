package main

// A skeptic's tests of issue 17's status path (the census): sequences that
// leave status failing, or its counts wrong while it says they are exact.

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

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
