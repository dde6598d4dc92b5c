package main

// A skeptic's review of issue 16's engine core (key_source vault): each test
// here is a sequence that defeats the guarantee or a claim of the docs on
// branch i16-core. Every test FAILS on i16-core; the comment on each says
// what it proves and what it printed there.

import (
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestSkepticAValidationWithHealingOffOverwritesAKeyChangedOutside: with
// key_source vault, a validate_only write sends the stored key with
// ?validate_only=true. When the key was changed outside the engine (the
// dashboard, Terraform, another mount) and the drift sweep has not yet seen
// it, Cloudflare's validation answer dates the tunnel's key later than the
// stored one, and the engine then sets the stored key FOR REAL
// (validateVault -> finishPending), although nothing dropped the query
// string, and although heal_stale_psk is off: an operator's validation, a
// request documented to change nothing, replaces the edge's key, which is
// what heal_stale_psk=false exists to forbid ("the engine sends nothing").
// (Were the tunnel held for another mount rotating it, HealHeld, the same
// validation would restart the two mounts' fight.)
//
// On i16-core it printed:
//
//	a validate_only write replaced the edge's key (heal_stale_psk off): Set calls 1 -> 3, the edge's key is now the stored one: true
func TestSkepticAValidationWithHealingOffOverwritesAKeyChangedOutside(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"heal_stale_psk": false}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	stored := env.edge().PSK
	env.clock.Advance(time.Minute)
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID) // changed outside the engine
	outside := env.edge().PSK

	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	resp, err := validateOnlyPath(env)
	t.Logf("validate_only: status %d, validated_by %v", httpStatus(resp, err), func() any {
		if resp == nil {
			return nil
		}
		return resp.Data["validated_by"]
	}())
	if env.edge().PSK != outside {
		t.Errorf("a validate_only write replaced the edge's key (heal_stale_psk off): Set calls %d -> %d, the edge's key is now the stored one: %v",
			sets, env.sim.Calls(cloudflaresim.OpPSKSet), env.edge().PSK == stored)
	}
}

// TestSkepticARefusedResendBlocksEveryWriteForEver: the edge took K1 and the
// answer was lost; Cloudflare then refuses, tunnel by tunnel
// (unapplied_psks), to set a key again that the tunnel already uses (the
// schema does not say it takes it; "psk already in use" is a reason it may
// well give). The record stays pending, as the docs say, but every
// operator's write first "finishes" the pending key (beginWrite ->
// reconcileLocked -> finishPending), gets the same refusal, and fails: no
// write ever sends a different key, long after the abandoned request's
// window has passed and a different key would be safe. Meanwhile reads
// serve the old key (with a pending warning) while the edge uses K1, so a
// router that reconnects cannot come up. Only a delete of the path and a new
// first write (documented nowhere) gets out. A liveness break rather than
// one of the guarantee.
//
// On i16-core it printed:
//
//	24 hourly writes after the lost answer: none succeeded; the last said: learn the outcome of the last rotation of tunnel … :
//	finish the pending rotation of tunnel … with its key: cloudflare did not apply the key Vault made for tunnel … when it was sent again
//	(psk already in use by this tunnel): an earlier request of it may still have landed, so the tunnel stays pending and the engine sends the same key again later
func TestSkepticARefusedResendBlocksEveryWriteForEver(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	inUse := cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "psk already in use by this tunnel"}}
	var last string
	succeeded := 0
	for i := 0; i < 24; i++ {
		env.clock.Advance(time.Hour)
		env.sim.FailNext(cloudflaresim.OpPSKSet, inUse) // the resend of the key in use
		resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
		if err == nil && !resp.IsError() {
			succeeded++
			break
		}
		last = errorText(resp, err)
	}
	if succeeded == 0 {
		t.Errorf("24 hourly writes after the lost answer: none succeeded; the last said: %s", last)
	}
	assertHonest(t, env)
}
