package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
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
	entry, err := logical.StorageEntryJSON(store.RateLimitKey, &store.RateLimitBlock{BlockedUntil: env.clock.Now().Add(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.storage.Put(context.Background(), entry); err != nil {
		t.Fatal(err)
	}
	env.b.Invalidate(context.Background(), store.RateLimitKey)
	calls := env.sim.TotalCalls()
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusTooManyRequests || env.sim.TotalCalls() != calls {
		t.Fatalf("write after the block was stored elsewhere: %d %s, %d calls sent", httpStatus(resp, err), errorText(resp, err), env.sim.TotalCalls()-calls)
	}
	env.clock.Advance(61 * time.Second)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
}

// TestCloudflaresSpentQuotaSurvivesARestart: an answer whose Ratelimit
// header says no calls remain until Cloudflare's window resets is as good as
// a 429 block: any call before the reset is refused, and one more over the
// limit starts Cloudflare's own five-minute block. It was honoured in memory
// only, so a restarted (reloaded, failed-over) backend sent calls into it.
// It must be stored as a 429 block is, shown in rate_limited_until, and
// honoured by a new backend over the same storage until the reset.
func TestCloudflaresSpentQuotaSurvivesARestart(t *testing.T) {
	env := newConfiguredEnv(t)
	env.clock.freeze()
	const window = 2 * time.Minute
	// A first rotation reads the tunnel and generates its key: the second
	// answer says none of the window's two calls remain.
	env.sim.SetRateLimit(2, window)
	spentAt := env.clock.Now()
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	want := spentAt.Add(window)
	until := func(when string) time.Time {
		t.Helper()
		read := env.must(env.request(logical.ReadOperation, "config", nil))
		v, _ := read.Data["rate_limited_until"].(string)
		if v == "" {
			return time.Time{}
		}
		at, err := time.Parse(time.RFC3339, v)
		if err != nil {
			t.Fatalf("%s: rate_limited_until %q: %v", when, v, err)
		}
		return at
	}
	if got := until("with the quota spent"); got.Sub(want).Abs() > 2*time.Second {
		t.Errorf("with Cloudflare's quota spent, rate_limited_until = %s, want about %s", got, want)
	}

	restartBackend(t, env)
	calls, refused := env.sim.TotalCalls(), env.sim.RateLimited()
	if got := until("after the restart"); got.Sub(want).Abs() > 2*time.Second {
		t.Errorf("after the restart, rate_limited_until = %s, want about %s", got, want)
	}
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusTooManyRequests || !strings.Contains(errorText(resp, err), "not sent") {
		t.Errorf("write before Cloudflare's window resets, after a restart: %d %s", httpStatus(resp, err), errorText(resp, err))
	}
	if n, r := env.sim.TotalCalls()-calls, env.sim.RateLimited()-refused; n != 0 || r != 0 {
		t.Fatalf("the restarted backend sent %d calls into a spent quota (%d refused by Cloudflare)", n, r)
	}
	assertHonest(t, env)

	env.clock.Advance(window + time.Second)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	assertCurrent(t, env, "after Cloudflare's window reset")
	if env.sim.RateLimited() != refused {
		t.Error("Cloudflare refused a call after its window reset")
	}
}
