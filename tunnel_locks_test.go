package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// neighbourOf returns a tunnel of t's account that is not t but that a
// striped lock set of locksutil's size would give t's lock: the two share a
// lock only if the engine's locks are striped.
func neighbourOf(t *testing.T, of store.Tunnel) store.Tunnel {
	t.Helper()
	want := locksutil.LockIndexForKey(of.StorageKey())
	for i := 0; i < 100000; i++ {
		n := store.Tunnel{AccountID: of.AccountID, TunnelID: cloudflaresim.NewID()}
		if locksutil.LockIndexForKey(n.StorageKey()) == want {
			return n
		}
	}
	t.Fatal("no tunnel id shares a lock stripe with the test tunnel")
	return store.Tunnel{}
}

// unresolvedButUnchanged leaves the test tunnel rotation_unknown past its
// settle window while the edge still uses the stored key: the next
// reconciliation, wherever it comes from, makes it current again without a
// new key.
func unresolvedButUnchanged(t *testing.T, env *testEnv) {
	t.Helper()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 502})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the faulted rotation succeeded")
	}
	env.clock.Advance(time.Hour)
}

// TestAnotherTunnelsRotationDoesNotHideThisOne: the tunnel locks were 256
// hashed stripes, and reads and the background only try a lock, so a tunnel
// was skipped, and its reader told "a rotation of this tunnel is in
// progress", whenever any other tunnel in its stripe was rotating (during a
// bulk job, most of them). A tunnel's lock is its own.
func TestAnotherTunnelsRotationDoesNotHideThisOne(t *testing.T) {
	for _, via := range []string{"read", "metadata read", "background pass"} {
		t.Run(via, func(t *testing.T) {
			env := newConfiguredEnv(t)
			unresolvedButUnchanged(t, env)
			self := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
			unlock := env.b.engine.Lock(neighbourOf(t, self))
			defer unlock()

			var warnings []string
			switch via {
			case "read":
				warnings = env.must(env.request(logical.ReadOperation, env.pskPath(), nil)).Warnings
			case "metadata read":
				warnings = env.must(env.request(logical.ReadOperation, env.metaPath(), nil)).Warnings
			case "background pass":
				backgroundPass(t, env)
			}
			if strings.Contains(strings.Join(warnings, " "), "in progress") {
				t.Errorf("told that a rotation of this tunnel is in progress while another tunnel rotates: %v", warnings)
			}
			rec, err := store.ReadRecord(context.Background(), env.storage, self)
			if err != nil || rec == nil {
				t.Fatalf("record: %v, %v", rec, err)
			}
			if rec.State != store.StateCurrent || rec.PSK != env.edge().PSK {
				t.Fatalf("state %s after the %s: the tunnel was skipped because another tunnel held a shared lock", rec.State, via)
			}
		})
	}
}

// TestTheDriftSweepDoesNotSkipATunnelWhoseNeighbourRotates: the sweep tried
// each tunnel's lock and passed over it when the lock was taken, and then
// marked itself done, so drift on a tunnel that merely shared a lock stripe
// with a rotating one waited another drift_check_interval.
func TestTheDriftSweepDoesNotSkipATunnelWhoseNeighbourRotates(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	self := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
	unlock := env.b.engine.Lock(neighbourOf(t, self))
	defer unlock()

	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	rec, err := store.ReadRecord(context.Background(), env.storage, self)
	if err != nil || rec == nil {
		t.Fatalf("record: %v, %v", rec, err)
	}
	if rec.State != store.StateCurrent || rec.PSK != env.edge().PSK {
		t.Fatalf("state %s, stored key is the edge's: %v: the sweep skipped a tunnel whose lock stripe another tunnel held",
			rec.State, rec.PSK == env.edge().PSK)
	}
}
