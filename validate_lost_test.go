package main

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// TestALostValidationIsNeverSentForReal: a validate_only write with
// key_source vault whose answer is lost leaves the stored key written ahead
// as pending. Whoever meets that record next (a read, the background pass)
// never sends its key for real: the pending validation is dropped and the
// stored key is held against the edge by the drift rules. The validation's
// own request may still land (its query string dropped on the way): no
// different key is sent before its window ends.
func TestALostValidationIsNeverSentForReal(t *testing.T) {
	for _, tc := range []struct {
		name string
		heal bool
		// dropped: something on the way dropped the query string, so the
		// lost validation set the stored key again, re-dated.
		dropped bool
		// outside: the key was changed outside the engine before.
		outside bool
		// background: the background pass meets the record, not a read.
		background bool
		wantState  string
		// wantSets is the Set requests after the validation's own.
		wantSets int
	}{
		{name: "nothing changed", heal: true, wantState: store.StateCurrent},
		{name: "query string dropped, healing off", dropped: true, wantState: store.StateStale},
		// Where healing is allowed the drift rules set the stored key again.
		{name: "query string dropped, healing allowed", heal: true, dropped: true, wantState: store.StateCurrent, wantSets: 1},
		{name: "changed outside, healing off, background", outside: true, background: true, wantState: store.StateStale},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			env.clock.freeze()
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{"heal_stale_psk": tc.heal}))
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			stored := env.edge().PSK
			env.clock.Advance(time.Minute)
			if tc.outside {
				env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
			}
			edgeKey, keys := env.edge().PSK, env.distinctNewKeys()

			fault := cloudflaresim.Fault{Status: http.StatusServiceUnavailable}
			if tc.dropped {
				fault.IgnoreValidateOnly, fault.AfterCommit = true, true
			}
			env.sim.FailNext(cloudflaresim.OpPSKSet, fault)
			resp, err := validateOnlyPath(env)
			if err == nil && !resp.IsError() {
				t.Fatal("validation with a 503 succeeded")
			}
			if text := errorText(resp, err); !strings.Contains(text, "the key is not sent again") || strings.Contains(text, "sending the same key again") {
				t.Errorf("the lost validation's error does not say what follows: %s", text)
			}
			if rec := env.storedRecord(); rec.State != store.StatePending {
				t.Fatalf("after the lost validation: state %s", rec.State)
			}
			sets := env.sim.Calls(cloudflaresim.OpPSKSet)

			// Within the validation's window: a different key waits.
			resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status != http.StatusConflict {
				t.Errorf("a write while the lost validation may still land: status %d, want 409", status)
			}
			if tc.background {
				env.clock.Advance(time.Hour)
				backgroundPass(t, env)
			}
			read, err := env.request(logical.ReadOperation, env.pskPath(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if read.Data["state"] != tc.wantState {
				t.Errorf("state %v, want %s (%v)", read.Data["state"], tc.wantState, read.Data["state_reason"])
			}
			if n := env.sim.Calls(cloudflaresim.OpPSKSet) - sets; n != tc.wantSets {
				t.Errorf("%d Set requests after the validation's, want %d", n, tc.wantSets)
			}
			if tc.wantSets == 0 && env.edge().PSK != edgeKey {
				t.Errorf("the edge's key changed (it is the stored one: %v)", env.edge().PSK == stored)
			}
			if tc.wantState == store.StateStale {
				if reason, _ := read.Data["state_reason"].(string); !strings.Contains(reason, "validate_only") && !strings.Contains(reason, "changed outside") {
					t.Errorf("the stale reason does not say why: %s", reason)
				}
			}
			if n := env.distinctNewKeys(); n != keys {
				t.Errorf("the edge was given %d new keys, want %d", n, keys)
			}
			assertHonest(t, env)
		})
	}
}

// TestALostValidationFoundGoneKeepsItsBoundForTheReturn: a validate_only
// whose query string was dropped on the way sets the stored key again
// (re-dated), and its answer is lost. The read that meets the pending
// validation is told 404 for the tunnel (a 404 can pass) and records it
// gone. When the drift sweep finds it listed again, the re-dated key must
// be judged with the validation's late-landing bound, as it would have been
// had the read found the tunnel: the stored key set again (healing on),
// current, and no new key. Without the bound the return takes the re-date
// for a change outside the engine and heals it with a new key.
func TestALostValidationFoundGoneKeepsItsBoundForTheReturn(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.clock.Advance(time.Minute)
	stored, keys := env.storedRecord().PSK, env.distinctNewKeys()
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable, AfterCommit: true, IgnoreValidateOnly: true})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	if !env.edge().PSKGeneratedOn.After(env.storedRecord().LastGeneratedOn) {
		t.Fatal("setup: the dropped query string did not re-date the stored key")
	}
	env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusNotFound})
	env.request(logical.ReadOperation, env.pskPath(), nil)
	if rec := env.storedRecord(); rec.State != store.StateTunnelGone {
		t.Fatalf("setup: the read told 404: state %s", rec.State)
	}

	env.clock.Advance(time.Minute)
	backgroundPass(t, env) // the drift sweep lists it again: ReturnGone
	if rec := env.storedRecord(); rec.State != store.StateCurrent || rec.PSK != stored {
		t.Errorf("after the return: state %s (%s), the stored key kept: %v", rec.State, rec.StateReason, rec.PSK == stored)
	}
	if n := env.distinctNewKeys(); n != keys {
		t.Errorf("the return gave the edge %d new keys, want 0", n-keys)
	}
	assertHonest(t, env)
}

// TestDeletingALostValidationSaysWhatItForgot: a delete of a tunnel whose
// validate_only answer was lost (its window passed) forgets a pending
// record whose pending key is the stored key itself. The warning must not
// say that a key Vault made and never confirmed may be on the edge: the
// key sent was the one Vault served, and the edge uses it or a key changed
// outside the engine.
func TestDeletingALostValidationSaysWhatItForgot(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.clock.Advance(time.Minute)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	rec := env.storedRecord()
	if rec.State != store.StatePending || rec.PendingPSK != rec.PSK {
		t.Fatalf("setup: after the lost validation: state %s, the pending key is the stored one: %v", rec.State, rec.PendingPSK == rec.PSK)
	}
	env.clock.Advance(rec.SettleUntil.Sub(env.clock.Now()) + time.Second)
	resp := env.must(env.request(logical.DeleteOperation, env.pskPath(), nil))
	if resp == nil || len(resp.Warnings) != 1 {
		t.Fatalf("the delete of a pending validation: warnings %v, want one", resp)
	}
	warning := resp.Warnings[0]
	if strings.Contains(warning, "a key Vault made") || strings.Contains(warning, "may not come up") {
		t.Errorf("the delete's warning speaks of a key Vault made that the edge may use, but the pending key was the stored one: %s", warning)
	}
	if !strings.Contains(warning, "validate_only") {
		t.Errorf("the delete's warning does not say a validate_only was forgotten: %s", warning)
	}
}
