package main

import (
	"context"
	"testing"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

// TestTunnelListingsShowSyncAndRecordDrift: tunnels/ already fetches each
// tunnel's last_generated_on; a managed tunnel whose key Cloudflare
// generated after the stored one shows in_sync=false and its record turns
// stale at once, without waiting for the sweep.
func TestTunnelListingsShowSyncAndRecordDrift(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	tunnelPath := "tunnels/" + env.account + "/" + env.tunnel.ID

	list := env.must(env.request(logical.ListOperation, "tunnels/"+env.account, nil))
	if info := list.Data["key_info"].(map[string]any)[env.tunnel.ID].(map[string]any); info["in_sync"] != true {
		t.Fatalf("in sync tunnel: in_sync %v", info["in_sync"])
	}
	if read := env.must(env.request(logical.ReadOperation, tunnelPath, nil)); read.Data["in_sync"] != true {
		t.Fatalf("in sync tunnel read: in_sync %v", read.Data["in_sync"])
	}

	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	generations := env.generations()
	list = env.must(env.request(logical.ListOperation, "tunnels/"+env.account, nil))
	if info := list.Data["key_info"].(map[string]any)[env.tunnel.ID].(map[string]any); info["in_sync"] != false {
		t.Fatalf("drifted tunnel: in_sync %v", info["in_sync"])
	}
	// Read from storage: a read of the path would already heal it.
	rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID})
	if err != nil || rec == nil || rec.State != store.StateStale {
		t.Fatalf("after the listing saw drift: record %v, err %v", rec != nil && rec.State == store.StateStale, err)
	}
	if env.generations() != generations {
		t.Error("a listing generated a key")
	}
	if read := env.must(env.request(logical.ReadOperation, tunnelPath, nil)); read.Data["in_sync"] != false {
		t.Fatalf("drifted tunnel read: in_sync %v", read.Data["in_sync"])
	}
	// The next PSK read heals it (heal_stale_psk defaults to true).
	assertCurrent(t, env, "after the read healed")
}
