package main

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// rotate/<account> include_unmanaged=true: the tunnels Cloudflare lists
// that Vault does not manage yet are taken under management in the same
// job, from one list call.

// unmanagedFleet adds n tunnels to the test account that Vault does not
// manage (the env's own among them), each with router facts of its own,
// and returns their ids.
func unmanagedFleet(env *testEnv, n int) []string {
	ids := []string{env.tunnel.ID}
	for i := 1; i < n; i++ {
		ids = append(ids, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{
			Name: fmt.Sprintf("site_%d", i), CloudflareEndpoint: "203.0.113.9", CustomerEndpoint: "198.51.100.7",
			InterfaceAddress: fmt.Sprintf("10.213.%d.%d/31", i/128, 2*(i%128)),
		}).ID)
	}
	return ids
}

// TestIncludeUnmanagedBringsAnAccountUnderVaultInFewCalls is issue 16's
// done-when: an account of 300 tunnels Vault does not manage comes under
// Vault with one rotate/ include_unmanaged=true in at most 20 calls that
// change keys, although Cloudflare refuses some tunnels the first time.
func TestIncludeUnmanagedBringsAnAccountUnderVaultInFewCalls(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := unmanagedFleet(env, 300)
	refused := map[string]string{}
	for _, id := range ids[100:107] {
		refused[id] = "tunnel is being reconfigured"
	}
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: refused})
	lists := env.sim.Calls(cloudflaresim.OpTunnelList)

	resp := env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": true}))
	if resp.Data["queued"] != 300 || resp.Data["unmanaged"] != 300 {
		t.Fatalf("answer %v", resp.Data)
	}
	if n := env.sim.Calls(cloudflaresim.OpTunnelList) - lists; n != 1 {
		t.Errorf("%d list calls, want 1", n)
	}
	for i := 0; i < 10 && progressOf(t, env)["remaining"] != 0; i++ {
		drain(t, env)
		env.clock.Advance(time.Minute)
	}
	p := progressOf(t, env)
	if p["done"] != 300 || p["remaining"] != 0 || p["failed_count"] != 0 || p["unmanaged"] != 300 {
		t.Fatalf("progress %v", p)
	}
	if n := keyCalls(env); n > 20 {
		t.Errorf("%d calls that change keys, want at most 20", n)
	}
	if n := env.sim.Calls(cloudflaresim.OpTunnelGet); n != 0 {
		t.Errorf("%d tunnel reads: the listing should have said all the engine needs", n)
	}
	assertFleetCurrent(t, env, ids, 1, store.KeySourceVault)
	// Router facts come from the list answer.
	meta := env.must(env.request(logical.ReadOperation, "metadata/"+env.account+"/"+ids[5], nil))
	if meta.Data["name"] != "site_5" || meta.Data["cloudflare_endpoint"] != "203.0.113.9" || meta.Data["interface_address"] != "10.213.0.10/31" {
		t.Errorf("router facts of an adopted tunnel: %v", meta.Data)
	}
	assertNoFleetSecretLogged(t, env)
	t.Logf("%d calls that change keys, %d in all", keyCalls(env), env.sim.TotalCalls())
}

// TestIncludeUnmanagedWithCloudflareKeys: with key_source cloudflare each
// unmanaged tunnel costs one psk_generate, paced as bulk is, and no read.
func TestIncludeUnmanagedWithCloudflareKeys(t *testing.T) {
	env := newConfiguredEnv(t)
	ids := unmanagedFleet(env, 5)
	env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+ids[1], nil)) // one managed already
	gets, generates := env.sim.Calls(cloudflaresim.OpTunnelGet), env.sim.Calls(cloudflaresim.OpPSKGenerate)
	resp := env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": true}))
	if resp.Data["queued"] != 5 || resp.Data["unmanaged"] != 4 {
		t.Fatalf("answer %v", resp.Data)
	}
	drain(t, env)
	if p := progressOf(t, env); p["done"] != 5 || p["remaining"] != 0 {
		t.Fatalf("progress %v", p)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKGenerate) - generates; n != 5 {
		t.Errorf("%d psk_generate calls, want 5", n)
	}
	if n := env.sim.Calls(cloudflaresim.OpTunnelGet) - gets; n != 0 {
		t.Errorf("%d tunnel reads, want 0", n)
	}
	assertFleetCurrent(t, env, ids, 0, store.KeySourceCloudflare)
	if v := storedVersion(t, env, "psk/"+env.account+"/"+ids[1]); v != 2 {
		t.Errorf("the managed tunnel at version %d, want 2", v)
	}
}

func TestIncludeUnmanagedIsValidated(t *testing.T) {
	env := newVaultKeysEnv(t)
	unmanagedFleet(env, 3)
	before, calls := env.storageSnapshot(), env.sim.TotalCalls()
	for _, tc := range []struct {
		data map[string]any
		want string
	}{
		{map[string]any{"include_unmanaged": "maybe"}, "include_unmanaged"},
		{map[string]any{"include_unmanaged": true, "older_than": "24h"}, "include_unmanaged=true cannot be combined with older_than"},
	} {
		resp, err := env.request(logical.UpdateOperation, "rotate/"+env.account, tc.data)
		if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), tc.want) {
			t.Errorf("%v: %d %s", tc.data, httpStatus(resp, err), errorText(resp, err))
		}
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("a refused rotate/ changed storage")
	}
	if env.sim.TotalCalls() != calls {
		t.Error("a refused rotate/ called Cloudflare")
	}
	// Without include_unmanaged, unmanaged tunnels are left alone.
	resp := env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": false}))
	if resp.Data["queued"] != 0 {
		t.Errorf("queued %v without include_unmanaged", resp.Data["queued"])
	}
}

// TestATunnelTakenUnderManagementFollowsTheGuaranteeOfAFirstWrite: the
// first key of a tunnel taken under management is held to what a first
// write is held to. With Cloudflare's keys, a lost answer leaves the
// tunnel rotation_unknown, never current, until reconciliation learns
// what the edge uses. With Vault's keys, the key is written ahead and a
// key Cloudflare does not apply leaves the tunnel unmanaged, as it was.
func TestATunnelTakenUnderManagementFollowsTheGuaranteeOfAFirstWrite(t *testing.T) {
	t.Run("cloudflare's keys, the answer lost", func(t *testing.T) {
		env := newConfiguredEnv(t)
		env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
		env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": true}))
		drain(t, env)
		if rec := env.storedRecord(); rec == nil || rec.State != store.StateRotationUnknown || rec.PSK != "" {
			t.Fatalf("after the lost answer: %+v", rec)
		}
		assertHonest(t, env)
		runBackgroundPass(t, env)
		assertCurrent(t, env, "after reconciliation")
	})
	t.Run("vault's keys, unapplied", func(t *testing.T) {
		env := newVaultKeysEnv(t)
		env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "not now"}})
		env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": true}))
		drain(t, env)
		if rec := env.storedRecord(); rec != nil {
			t.Fatalf("an unapplied first key left a record: state %s", rec.State)
		}
		list := env.must(env.request(logical.ListOperation, "tunnels/"+env.account, nil))
		if info := list.Data["key_info"].(map[string]any)[env.tunnel.ID].(map[string]any); info["managed"] != false {
			t.Errorf("tunnels/ says managed %v", info["managed"])
		}
		env.clock.Advance(time.Minute)
		drain(t, env)
		assertCurrent(t, env, "after the retry")
	})
	t.Run("written by an operator meanwhile", func(t *testing.T) {
		env := newVaultKeysEnv(t)
		env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": true}))
		env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
		sets := env.sim.Calls(cloudflaresim.OpPSKSet)
		drain(t, env)
		if env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
			t.Error("a tunnel written since the job was queued was rotated again")
		}
		if p := progressOf(t, env); p["done"] != 1 || p["remaining"] != 0 {
			t.Errorf("progress %v", p)
		}
	})
}
