package main

import (
	"context"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// backgroundPass runs the backend's periodic function once, as Vault does
// every minute, without moving the clock.
func backgroundPass(t *testing.T, env *testEnv) {
	t.Helper()
	if err := env.b.reconcileUnresolved(context.Background(), &logical.Request{Storage: env.storage}); err != nil {
		t.Fatalf("background pass: %v", err)
	}
}

// TestKeysChangedOutsideTheEngineAreFoundAndHealedOnce is the issue's
// second sequence: a key regenerated at Cloudflare's dashboard (or by
// Terraform, another mount, a restored snapshot) left the record current for
// ever. The drift sweep finds it and heals it; found again at the very next
// look, it is marked stale and not healed, so two mounts cannot rotate one
// tunnel in a loop.
func TestKeysChangedOutsideTheEngineAreFoundAndHealedOnce(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	assertCurrent(t, env, "after the drift sweep healed")

	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	generations := env.generations()
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	reason, _ := meta.Data["state_reason"].(string)
	if meta.Data["state"] != stateStale || !strings.Contains(reason, "changed outside this engine") || !strings.Contains(reason, "another mount") {
		t.Fatalf("drift found again at the next look: state %v, reason %q", meta.Data["state"], reason)
	}
	if env.generations() != generations {
		t.Error("the engine healed a tunnel that another mount apparently rotates: a loop")
	}
	assertHonest(t, env)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	assertCurrent(t, env, "after the operator's write")
}

// TestDriftCheckOffFindsNothing: drift_check_interval=0 turns the sweep off,
// and it then spends no Cloudflare call.
func TestDriftCheckOffFindsNothing(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": 0}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	calls := env.sim.TotalCalls()
	env.clock.Advance(24 * time.Hour)
	backgroundPass(t, env)
	if env.sim.TotalCalls() != calls {
		t.Errorf("the sweep called Cloudflare %d times with drift checks off", env.sim.TotalCalls()-calls)
	}
}

// TestOneFailingTunnelNeverStopsTheBackground is the third
// sequence: the first unresolved tunnel (in storage order) was deleted at
// Cloudflare, or its account answers 403. Every other unresolved tunnel must
// still be resolved in the same pass; the deleted one leaves the unresolved
// set as tunnel_gone, and the failing one backs off with its reason shown.
func TestOneFailingTunnelNeverStopsTheBackground(t *testing.T) {
	for _, tc := range []struct {
		name string
		// fail breaks the first tunnel's reconciliation.
		fail      func(env *testEnv, tunnel string)
		wantState string
	}{
		{"deleted at Cloudflare", func(env *testEnv, tunnel string) { env.sim.DeleteTunnel(env.account, tunnel) }, "tunnel_gone"},
		{"refused with 403", func(env *testEnv, _ string) {
			env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusForbidden,
				Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}})
		}, stateStale},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			ids := []string{env.tunnel.ID, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID}
			sort.Strings(ids)
			for _, id := range ids {
				path := "psk/" + env.account + "/" + id
				env.must(env.request(logical.UpdateOperation, path, nil))
				// A lost answer after the key changed: each is unresolved.
				env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 500, AfterCommit: true})
				if _, err := env.request(logical.UpdateOperation, path, nil); err == nil {
					t.Fatal("the faulted rotation succeeded")
				}
			}
			env.clock.Advance(time.Hour) // past every settle window
			tc.fail(env, ids[0])
			backgroundPass(t, env)

			// From storage: a read of the path would reconcile by itself.
			for _, id := range ids[1:] {
				env.tunnel.ID = id
				rec, err := readPSKRecord(context.Background(), env.storage, tunnelRef{env.account, id})
				if err != nil || rec == nil || rec.State != "current" || rec.PSK != env.edge().PSK {
					t.Fatalf("tunnel behind a failing one is not current with the edge's key after the pass (err %v)", err)
				}
			}
			env.tunnel.ID = ids[0]
			meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
			if tc.wantState == "tunnel_gone" {
				if meta.Data["state"] != "tunnel_gone" || len(meta.Warnings) == 0 {
					t.Fatalf("deleted tunnel: state %v, warnings %v", meta.Data["state"], meta.Warnings)
				}
				if keys, _ := env.storage.List(context.Background(), unresolvedPrefix); len(keys) != 0 {
					t.Errorf("a tunnel gone at Cloudflare is still in the unresolved set: %v", keys)
				}
				calls := env.sim.Calls(cloudflaresim.OpTunnelGet)
				env.clock.Advance(time.Hour)
				backgroundPass(t, env)
				if env.sim.Calls(cloudflaresim.OpTunnelGet) != calls {
					t.Errorf("the background still reconciles a tunnel that is gone")
				}
				return
			}
			// Refused: the reason shows, and the next try waits.
			if meta.Data["failures"] != 1 || !strings.Contains(meta.Data["last_failure"].(string), "HTTP 403") || meta.Data["retry_at"] == "" {
				t.Fatalf("refused tunnel: failures %v, last_failure %v, retry_at %v", meta.Data["failures"], meta.Data["last_failure"], meta.Data["retry_at"])
			}
			calls := env.sim.TotalCalls()
			env.clock.Advance(30 * time.Second)
			backgroundPass(t, env)
			if env.sim.TotalCalls() != calls {
				t.Error("the background retried a failing tunnel before its backoff ended")
			}
			env.clock.Advance(time.Minute)
			backgroundPass(t, env)
			assertCurrent(t, env, "after the refusal passed and the backoff ended")
		})
	}
}
