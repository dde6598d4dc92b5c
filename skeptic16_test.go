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
