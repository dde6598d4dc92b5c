package main

import (
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Second skeptic of issue 16 (key_source vault), on i16-core at 9892e9b.

// TestAValidationsLostAnswerThenAReadReplacesAKeyChangedOutside:
// heal_stale_psk is off, and the tunnel's key was changed outside the engine
// (dashboard, Terraform, another mount) before the drift sweep saw it. An
// operator runs validate_only; its Set?validate_only=true gets a 503 (no
// answer that proves anything; nothing changed at the edge). The engine
// wrote the stored key ahead as pending (begin), so the next read "finishes"
// it by sending the stored key for real (finishPending, validate_only off):
// the edge's key changed outside is replaced, with healing off, by a
// validation plus a read. validate.go says a validation never changes the
// edge by itself (commit aab6891 fixed exactly this for an answered
// validation); a lost answer does it anyway.
//
// Printed on 9892e9b:
//
//	a validation whose answer was lost, then a read, replaced the key changed outside
//	the engine with heal_stale_psk off (Set calls 1 -> 3, edge key is the stored one: true;
//	read state current)
func TestAValidationsLostAnswerThenAReadReplacesAKeyChangedOutside(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"heal_stale_psk": false}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	stored := env.edge().PSK
	env.clock.Advance(time.Minute)
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID) // changed outside the engine
	outside := env.edge().PSK

	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
	if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
		t.Fatal("validation with a 503 succeeded")
	}
	if env.edge().PSK != outside {
		t.Fatal("the validation itself changed the edge")
	}
	read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
	if env.edge().PSK != outside {
		t.Errorf("a validation whose answer was lost, then a read, replaced the key changed outside the engine with heal_stale_psk off "+
			"(Set calls %d -> %d, edge key is the stored one: %v; read state %v)",
			sets, env.sim.Calls(cloudflaresim.OpPSKSet), env.edge().PSK == stored, read.Data["state"])
	}
	assertHonest(t, env)
}

// TestAValidationsLostAnswerShortensAnEarlierSendsWindow: a
// validate_only write is accepted while a window of an earlier send of the
// stored key is still open (it sends the same key, so it need not wait).
// begin() writes the pending record with settle_until = now + the window of
// the settings in force NOW, replacing the open window rather than keeping
// the later of the two. If the validation's answer is lost, that shorter
// window is what the read's finish keeps (lingering from a.previous), and a
// write sends a different key while the abandoned request of the earlier key
// may still land. It lands: the edge uses the earlier key, and every read
// serves the write's key as current.
//
// Two ways the new window ends before the old one: request_timeout lowered
// in config (the old request still runs on the old timeout, which is why
// SettleUntil "is fixed when the attempt starts, from the request_timeout in
// force then"), or a failover to a node whose clock is a few seconds behind.
//
// Printed on 9892e9b (both subtests):
//
//	request_timeout_lowered: after the validation's lost answer was finished: settle_until
//	  2026-12-01T18:18:36.41Z is earlier than the earlier send's window 2026-12-01T18:18:38.41Z
//	failover_to_a_node_3s_behind: ... settle_until 18:18:37.51Z is earlier than ... 18:18:40.51Z
//	(both) a write 12.5s after the abandoned send: status 200 (want 409: the abandoned request
//	  of K1 may still land until ...)
//	(both) after the late landing: state current but the key is not the edge's (edge uses K1: true)
func TestAValidationsLostAnswerShortensAnEarlierSendsWindow(t *testing.T) {
	for _, tc := range []struct {
		name string
		// between runs after K1 was finished and before the validation.
		between func(env *testEnv)
	}{
		{"request_timeout lowered", func(env *testEnv) {
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": "1s"}))
		}},
		{"failover to a node 3s behind", func(env *testEnv) { env.clock.Advance(-3 * time.Second) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newVaultKeysEnv(t) // request_timeout 2s: a window of 2*2s+10s
			env.clock.freeze()
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

			// K1: the edge accepts it and processes it late; the engine gives up.
			start := env.clock.Now()
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
			if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
				t.Fatal("the held write succeeded")
			}
			env.sim.WaitAccepted()
			k1 := env.storedRecord().PendingPSK
			assertCurrent(t, env, "the read that finishes K1")
			window := env.storedRecord().SettleUntil
			if !window.Equal(start.Add(14 * time.Second)) {
				t.Fatalf("K1's window ends %v, want start+14s", window.Sub(start))
			}

			tc.between(env)
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusServiceUnavailable})
			if resp, err := validateOnlyPath(env); err == nil && !resp.IsError() {
				t.Fatal("validation with a 503 succeeded")
			}
			assertKeyCurrent(t, env, "the read that finishes the validation's pending record")
			if got := env.storedRecord().SettleUntil; got.Before(window) {
				t.Errorf("after the validation's lost answer was finished: settle_until %v is earlier than the earlier send's window %v",
					got.Format(time.RFC3339Nano), window.Format(time.RFC3339Nano))
			}

			// 12.5s after K1 was sent: inside K1's window.
			env.clock.Advance(start.Add(12500 * time.Millisecond).Sub(env.clock.Now()))
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status != http.StatusConflict {
				t.Errorf("a write 12.5s after the abandoned send: status %d (want 409: the abandoned request of K1 may still land until %v)",
					status, window.Format(time.RFC3339Nano))
			}
			env.sim.ProcessLateNow() // the abandoned request of K1 lands, inside its window
			read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
			if read.Data["state"] == store.StateCurrent && read.Data["psk"] != env.edge().PSK {
				t.Errorf("after the late landing: state current but the key is not the edge's (edge uses K1: %v)", env.edge().PSK == k1)
			}
		})
	}
}

// TestARestartMidRequestFinishesWithTheSameKey (held: harmless): the
// plugin is replaced over the same storage while the edge holds a request
// of K1 it will process late (the old process gave up or was killed). The
// new process knows nothing in memory; a read at once finishes K1 with the
// same key, a write is refused a different key while the old request may
// land, and when it lands every read still serves the edge's key. The edge
// was given exactly one new key.
func TestARestartMidRequestFinishesWithTheSameKey(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	before := env.distinctNewKeys()
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the held write succeeded")
	}
	env.sim.WaitAccepted()
	restartBackend(t, env)
	assertCurrent(t, env, "the first read of the new process")
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if status := httpStatus(resp, err); status != http.StatusConflict {
		t.Errorf("a different key while the old request may land: status %d", status)
	}
	env.clock.Advance(time.Second)
	env.sim.ProcessLateNow()
	assertKeyCurrent(t, env, "after the old request landed")
	if n := env.distinctNewKeys() - before; n != 1 {
		t.Errorf("the edge was given %d new keys, want 1", n)
	}
}
