package main

import (
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// A bulk job's batch whose answer was lost leaves its keys pending: the job
// sends them again together, one call for the lot (internal/rotation's
// batch.go, Resend).

// TestALostBatchIsLeftToItsJobByTheBackgroundPass: the background pass
// (Vault's periodic function, every minute) finishes pending keys one call
// each. Meeting a lost batch's keys before the job comes back to them, it
// would undo what sending them together saves; it leaves them to the job,
// which finishes them all in one call. A read still finishes its own
// tunnel at once.
func TestALostBatchIsLeftToItsJobByTheBackgroundPass(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 20)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	if rec := record(t, env, ids[1]); rec.State != store.StatePending {
		t.Fatalf("after the lost answer: state %s", rec.State)
	}
	backgroundPass(t, env)
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
		t.Fatalf("the background pass sent %d Set calls of its own for the job's pending keys, want none", n-1)
	}
	// A reader is not kept waiting for the job.
	if read := env.must(env.request(logical.ReadOperation, "psk/"+env.account+"/"+ids[0], nil)); read.Data["state"] != store.StateCurrent {
		t.Fatalf("a read of a pending tunnel: state %v", read.Data["state"])
	}
	for i := 0; i < 3 && progressOf(t, env)["remaining"] != 0; i++ {
		env.clock.Advance(15 * time.Second)
		drain(t, env)
	}
	if p := progressOf(t, env); p["done"] != 20 || p["remaining"] != 0 {
		t.Fatalf("progress %v", p)
	}
	// The lost batch, the read's resend, and one for the other 19.
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 3 {
		t.Errorf("%d Set calls, want 3", n)
	}
	assertFleetCurrent(t, env, ids, 2, store.KeySourceVault)
}

// TestAJobsResendToATunnelDeletedSinceIsSkipped: after a lost batch answer
// one tunnel is deleted at Cloudflare. The job's resend of its pending key
// is unapplied; the listing after it misses the tunnel and a read of it is
// 404, so it is recorded gone and counted skipped, while the others are
// finished in the same call. A resend refused for another reason stays
// pending and is sent again later.
func TestAJobsResendToATunnelDeletedSinceIsSkipped(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 4)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	env.sim.DeleteTunnel(env.account, ids[1])
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{ids[2]: "tunnel is being reconfigured"}})
	env.clock.Advance(15 * time.Second)
	drain(t, env)
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 2 {
		t.Fatalf("%d Set calls, want 2 (the lost batch, one resend)", n)
	}
	if rec := record(t, env, ids[1]); rec.State != store.StateTunnelGone {
		t.Errorf("the deleted tunnel: state %s, want %s", rec.State, store.StateTunnelGone)
	}
	if rec := record(t, env, ids[2]); rec.State != store.StatePending || rec.Failures != 1 {
		t.Errorf("the refused resend: state %s, failures %d; want pending, 1", rec.State, rec.Failures)
	}
	for i := 0; i < 5 && progressOf(t, env)["remaining"] != 0; i++ {
		env.clock.Advance(time.Minute)
		drain(t, env)
	}
	if p := progressOf(t, env); p["done"] != 3 || p["skipped_count"] != 1 || p["remaining"] != 0 {
		t.Fatalf("progress %v", p)
	}
	assertFleetCurrent(t, env, []string{ids[0], ids[2], ids[3]}, 2, store.KeySourceVault)
}
