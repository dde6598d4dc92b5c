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

// injectedKey is a key no Cloudflare answer should carry: it ends the quoted
// string of the Junos template and adds a command of its own. A random part
// makes it a secret the log checks can look for.
func injectedKey() string {
	return cloudflaresim.NewID() + "\"\nset system login user intruder class super-user"
}

// TestAKeyOfTheWrongFormIsNeverStored: an answer whose key is not of the form
// Cloudflare issues (here, one that would add a command to a router's
// configuration) is an error that names Cloudflare and base_url; the key is
// never stored, the tunnel is never called current, and, although the answer
// says the edge generated a key, nothing in the background generates another
// (whatever answers at base_url would answer the same way, for ever) until an
// operator writes the path.
func TestAKeyOfTheWrongFormIsNeverStored(t *testing.T) {
	cases := []struct {
		name string
		// first: the tunnel has no key in Vault yet.
		first bool
		// validate: the write is validate_only, and a gateway drops the query.
		validate bool
	}{
		{name: "rotation"},
		{name: "first rotation", first: true},
		{name: "validate_only turned into a generation", validate: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			if !tc.first {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
			}
			schedulerOver(t, env, env.storage)
			env.sim.SetPSKValue(injectedKey)
			data := map[string]any{}
			if tc.validate {
				env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{IgnoreValidateOnly: true})
				data["validate_only"] = true
			}
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), data)
			bad := env.edge().PSK
			if !strings.Contains(bad, "intruder") {
				t.Fatal("the simulator did not generate the injected key")
			}
			text := errorText(resp, err)
			if resp != nil {
				text += responseJSON(t, resp)
			}
			if strings.Contains(text, bad[:32]) {
				t.Fatal("the answer quotes the key")
			}
			if httpStatus(resp, err) != http.StatusBadGateway || !strings.Contains(text, "Cloudflare") || !strings.Contains(text, "base_url") {
				t.Fatalf("status %d, want 502 naming Cloudflare and base_url: %s", httpStatus(resp, err), text)
			}
			assertHonest(t, env)
			meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
			if meta.Data["state"] != store.StateStale || !strings.Contains(meta.Data["state_reason"].(string), "base_url") {
				t.Fatalf("state %v (%v), want stale with a reason that names base_url", meta.Data["state"], meta.Data["state_reason"])
			}
			if unresolved, _ := store.ListUnresolved(context.Background(), env.storage); len(unresolved) != 1 {
				t.Errorf("unresolved tunnels: %v, want this one", unresolved)
			}

			// The background, run deterministically well past the settle
			// window, the drift interval and the rotation period: reads,
			// reconciliation, the drift sweep and the scheduler.
			generated, reads := env.generations(), env.sim.Calls(cloudflaresim.OpTunnelGet)
			for elapsed := time.Duration(0); elapsed < 3*time.Hour; elapsed += time.Minute {
				env.clock.Advance(time.Minute)
				drain(t, env)
				if err := env.b.periodic(context.Background(), &logical.Request{Storage: env.storage}); err != nil {
					t.Fatalf("background pass: %v", err)
				}
				_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
			}
			if n := env.generations() - generated; n != 0 {
				t.Fatalf("the background generated %d keys after an answer with a key of the wrong form", n)
			}
			if n := env.sim.Calls(cloudflaresim.OpTunnelGet) - reads; n != 0 {
				t.Errorf("the held tunnel was read from Cloudflare %d times: nothing it says would release it", n)
			}
			assertHonest(t, env)
			if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["state"] != store.StateStale {
				t.Fatalf("after the background: state %v (%v)", meta.Data["state"], meta.Data["state_reason"])
			}

			// An operator's write asks again; once base_url answers with
			// Cloudflare's keys, the tunnel is current.
			resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
			if httpStatus(resp, err) != http.StatusBadGateway {
				t.Fatalf("write while the keys are still bad: status %d: %s", httpStatus(resp, err), errorText(resp, err))
			}
			env.sim.SetPSKValue(nil)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			assertCurrent(t, env, "after the operator's write")
		})
	}
}
