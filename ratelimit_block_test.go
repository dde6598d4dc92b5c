package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// restartBackend replaces env's backend with a new one over the same
// storage, as a plugin reload, a Vault restart or a failover does: nothing
// in memory survives.
func restartBackend(t *testing.T, env *testEnv) {
	t.Helper()
	restarted := newBackend()
	restarted.now = env.clock.Now
	conf := logical.TestBackendConfig()
	conf.StorageView = env.storage
	conf.Logger = env.b.Logger()
	if err := restarted.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	env.b = restarted
}

// TestCloudflaresBlockSurvivesARestart: Cloudflare enforces its 429 block
// whatever becomes of the plugin process. A new backend over the same
// storage must fail fast, sending nothing, until the block ends, and config
// shows the block meanwhile.
func TestCloudflaresBlockSurvivesARestart(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 429, RetryAfter: 120})
	blockedAt := env.clock.Now()
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusTooManyRequests {
		t.Fatalf("status = %d: %s", httpStatus(resp, err), errorText(resp, err))
	}
	until := func(read *logical.Response) time.Time {
		t.Helper()
		v, ok := read.Data["rate_limited_until"].(string)
		if !ok {
			t.Fatalf("config read has no rate_limited_until: %v", read.Data)
		}
		if v == "" {
			return time.Time{}
		}
		at, err := time.Parse(time.RFC3339, v)
		if err != nil {
			t.Fatalf("rate_limited_until %q: %v", v, err)
		}
		return at
	}
	want := blockedAt.Add(120 * time.Second)
	if got := until(env.must(env.request(logical.ReadOperation, "config", nil))); got.Sub(want).Abs() > 2*time.Second {
		t.Errorf("rate_limited_until = %s, want about %s", got, want)
	}

	restartBackend(t, env)
	calls := env.sim.TotalCalls()
	if got := until(env.must(env.request(logical.ReadOperation, "config", nil))); got.Sub(want).Abs() > 2*time.Second {
		t.Errorf("after the restart, rate_limited_until = %s, want about %s", got, want)
	}
	for _, w := range []struct {
		path string
		data map[string]any
	}{{env.pskPath(), nil}, {"config", map[string]any{"request_timeout": "3s"}}} {
		resp, err = env.request(logical.UpdateOperation, w.path, w.data)
		if httpStatus(resp, err) != http.StatusTooManyRequests || !strings.Contains(errorText(resp, err), "not sent") {
			t.Errorf("write %s inside the block after a restart: %d %s", w.path, httpStatus(resp, err), errorText(resp, err))
		}
	}
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Fatalf("the restarted backend sent %d calls into Cloudflare's block", n)
	}

	env.clock.Advance(121 * time.Second)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	assertCurrent(t, env, "after the block")
	if got := until(env.must(env.request(logical.ReadOperation, "config", nil))); !got.IsZero() {
		t.Errorf("rate_limited_until = %s after the block ended, want \"\"", got)
	}
}

// TestInvalidateReadsAStoredBlock plays a performance standby: the active
// node stores a block, Vault calls Invalidate, and the standby, whose client
// is already built, sends nothing until the block ends.
func TestInvalidateReadsAStoredBlock(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	entry, err := logical.StorageEntryJSON(rateLimitStorageKey, &rateLimitRecord{BlockedUntil: env.clock.Now().Add(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.storage.Put(context.Background(), entry); err != nil {
		t.Fatal(err)
	}
	env.b.Invalidate(context.Background(), rateLimitStorageKey)
	calls := env.sim.TotalCalls()
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusTooManyRequests || env.sim.TotalCalls() != calls {
		t.Fatalf("write after the block was stored elsewhere: %d %s, %d calls sent", httpStatus(resp, err), errorText(resp, err), env.sim.TotalCalls()-calls)
	}
	env.clock.Advance(61 * time.Second)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
}
