package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// bulkFleet gives the test account n tunnels (the env's first among them),
// each with a stored key, and returns their ids.
func bulkFleet(t *testing.T, env *testEnv, n int) []string {
	t.Helper()
	tunnels := []string{env.tunnel.ID}
	for len(tunnels) < n {
		tunnels = append(tunnels, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID)
	}
	for _, id := range tunnels {
		env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+id, nil))
	}
	return tunnels
}

func bulkProgress(t *testing.T, env *testEnv) map[string]any {
	t.Helper()
	return env.must(env.request(logical.ReadOperation, "rotate/"+env.account, nil)).Data
}

// TestBulkSurvivesRotateRootMidPass: config/rotate-root in the middle of a
// scheduler pass kills the token value the pass started with (Cloudflare
// drops the old value at once). Every later item must use the new value, not
// fail for good.
func TestBulkSurvivesRotateRootMidPass(t *testing.T) {
	env := newConfiguredEnv(t)
	tunnels := bulkFleet(t, env, 4)
	storage := &hookStorage{Storage: env.storage}
	schedulerOver(t, env, storage)
	var once sync.Once
	var rolled *logical.Response
	var rollErr error
	storage.mu.Lock()
	storage.onPut = func(e *logical.StorageEntry) error {
		if storesCurrentKey(e) {
			// After the pass's first generate, as an operator might.
			once.Do(func() {
				rolled, rollErr = env.b.HandleRequest(context.Background(), &logical.Request{
					Operation: logical.UpdateOperation, Path: "config/rotate-root", Storage: env.storage,
				})
			})
		}
		return nil
	}
	storage.mu.Unlock()

	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	mustSucceed(t, rolled, rollErr)
	if tok, ok := env.sim.TokenByID(env.token.ID); !ok || tok.Value == env.token.Value {
		t.Fatal("the token was not rolled during the pass")
	} else {
		env.token.Value = tok.Value // for the log check
	}
	progress := bulkProgress(t, env)
	if progress["done"] != len(tunnels) || progress["remaining"] != 0 {
		t.Fatalf("progress after rotate-root mid-pass = %v", progress)
	}
	for _, id := range tunnels {
		if v := storedVersion(t, env, "psk/"+env.account+"/"+id); v != 2 {
			t.Errorf("tunnel %s at version %d, want 2", id, v)
		}
	}
}

// TestBulkRefusesNegativeOlderThan: a negative older_than would queue every
// tunnel (every key is "older" than a time in the future): it is a 400 before
// anything happens.
func TestBulkRefusesNegativeOlderThan(t *testing.T) {
	env := newConfiguredEnv(t)
	bulkFleet(t, env, 2)
	schedulerOver(t, env, env.storage)
	before, calls := env.storageSnapshot(), env.sim.TotalCalls()
	for _, v := range []any{"-1h", -3600, "-1s"} {
		resp, err := env.request(logical.UpdateOperation, "rotate/"+env.account, map[string]any{"older_than": v})
		if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "older_than") {
			t.Errorf("older_than=%v: %d %s", v, httpStatus(resp, err), errorText(resp, err))
		}
	}
	drain(t, env)
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("a refused bulk rotation changed storage")
	}
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Errorf("a refused bulk rotation made %d Cloudflare calls", n)
	}
}
