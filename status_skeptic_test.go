package main

// A skeptic's tests of issue 17's status path (the census): sequences that
// leave status failing, or its counts wrong while it says they are exact.

import (
	"context"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

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
