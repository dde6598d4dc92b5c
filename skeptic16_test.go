package main

// A skeptic's review of issue 16's engine core (key_source vault): each test
// here is a sequence that defeats the guarantee or a claim of the docs on
// branch i16-core. Every test FAILS on i16-core; the comment on each says
// what it proves and what it printed there.

import (
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// TestSkepticAGoneMarkDropsTheWindowOfAnAbandonedSend: a Set of key K1 the
// edge accepted and processes late leaves the record pending, with the
// window (settle_until) in which no different key may be sent. A 404 on a
// later step (the project's own reading of a 404: the tunnel deleted, or
// the API token out of its account for a while; gone.go: "a 404 can pass")
// records the tunnel gone, and MarkGone clears settle_until and drops the
// pending key. Once Cloudflare answers again, the next write sends K2 at
// once: no 409, though the abandoned request of K1 is still out. It lands,
// and Vault serves K2 as current while the edge uses K1.
//
// Two ways to MarkGone a pending record: the scheduler's NotFound branch
// after a resend refused whole with 404, and keyUnapplied after a resend
// that was unapplied and a read that was 404.
//
// On i16-core it printed:
//
//	scheduler_404_on_the_resend: the write of K2 while the abandoned send of K1 may still land: status 200, want 409
//	scheduler_404_on_the_resend: after the abandoned send landed: Vault serves state current with a key that is not the edge's
//	unapplied_resend_then_404_read: (the same two lines)
func TestSkepticAGoneMarkDropsTheWindowOfAnAbandonedSend(t *testing.T) {
	for _, tc := range []struct {
		name string
		// gone makes the pending record tunnel_gone with one transient 404.
		gone func(t *testing.T, env *testEnv)
	}{
		{"scheduler_404_on_the_resend", func(t *testing.T, env *testEnv) {
			// The tunnel's scheduled rotation falls due seconds after the
			// abandoned write: it finishes the pending key by sending it
			// again, and that request is refused whole with 404.
			env.clock.Advance(6 * time.Second)
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusNotFound})
			drain(t, env)
		}},
		{"unapplied_resend_then_404_read", func(t *testing.T, env *testEnv) {
			// A read finishes the pending key: the resend is unapplied
			// (maintenance), and the read that follows is a 404.
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "maintenance"}})
			env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusNotFound})
			env.request(logical.ReadOperation, env.pskPath(), nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
			schedulerOver(t, env, env.storage)

			// Five seconds before the tunnel's scheduled rotation, an
			// operator's write sends K1; the edge accepts the request and
			// processes it late, and the engine gives up at request_timeout.
			env.clock.Advance(time.Hour - 5*time.Second)
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
			if resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil); httpStatus(resp, err) != http.StatusGatewayTimeout {
				t.Fatalf("the held write: status %d (%s)", httpStatus(resp, err), errorText(resp, err))
			}
			env.sim.WaitAccepted()
			rec := env.storedRecord()
			if rec.State != store.StatePending || !rec.SendsMayLand(env.clock.Now()) {
				t.Fatalf("after the abandoned send: state %s, window open %v", rec.State, rec.SendsMayLand(env.clock.Now()))
			}
			window := rec.SettleUntil

			tc.gone(t, env)
			if got := env.storedRecord(); got.State != store.StateTunnelGone {
				t.Fatalf("the transient 404 left state %s (the sequence needs tunnel_gone)", got.State)
			}
			t.Logf("after the 404: state %s, settle_until %v (the abandoned send may land until %v)",
				env.storedRecord().State, env.storedRecord().SettleUntil, window)

			// Cloudflare answers again; the operator writes, well inside
			// the window of the abandoned send.
			env.clock.Advance(time.Second)
			if !env.clock.Now().Before(window) {
				t.Fatal("the test left the window")
			}
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status != http.StatusConflict {
				t.Errorf("the write of K2 while the abandoned send of K1 may still land: status %d, want 409", status)
			}

			env.sim.ProcessLateNow() // the abandoned request of K1 lands
			read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
			if read.Data["state"] == store.StateCurrent && read.Data["psk"] != env.edge().PSK {
				t.Errorf("after the abandoned send landed: Vault serves state current with a key that is not the edge's")
			}
		})
	}
}

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
