package main

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// newSkewedEnv is newConfiguredEnv with the simulator's clock skew ahead of
// the engine's (negative: behind, so Vault's clock runs ahead of
// Cloudflare's) and its timestamps at precision. The test tunnel is created
// afresh under that clock: a tunnel created before the skew would carry a
// key dated on the other clock, a world that does not exist.
func newSkewedEnv(t *testing.T, skew, precision time.Duration) *testEnv {
	t.Helper()
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": "1s"}))
	clock := env.clock
	env.sim.SetClock(func() time.Time { return clock.Now().Add(skew) })
	env.sim.SetTimestampPrecision(precision)
	env.tunnel = env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{})
	return env
}

// storedRecord reads the test tunnel's record from storage, without the
// reconciliation a read through the API would do.
func storedRecord(t *testing.T, env *testEnv) *pskRecord {
	t.Helper()
	rec, err := readPSKRecord(context.Background(), env.storage, tunnelRef{env.account, env.tunnel.ID})
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// assertHealedOrFlagged is the guarantee after a first rotation whose key
// Cloudflare made: the record is kept, and it is either current with the
// edge's key (healed) or not current with a reason (flagged). Never gone,
// never current for another key.
func assertHealedOrFlagged(t *testing.T, env *testEnv, when string) {
	t.Helper()
	rec := storedRecord(t, env)
	edge := env.edge()
	switch {
	case rec == nil:
		t.Fatalf("%s: the record is gone, and the edge uses a key nobody holds (%d key(s) generated)", when, env.generations())
	case rec.current() && (rec.PSK != edge.PSK || !rec.LastGeneratedOn.Equal(edge.PSKGeneratedOn)):
		t.Fatalf("%s: current for a key the edge does not use", when)
	case !rec.current() && rec.StateReason == "":
		t.Fatalf("%s: state %s without a reason", when, rec.State)
	}
	resp, err := env.request(logical.ReadOperation, env.metaPath(), nil)
	if status := httpStatus(resp, err); status != http.StatusOK {
		t.Fatalf("%s: metadata read: status %d: %s", when, status, errorText(resp, err))
	}
}

// TestAValidationKeyIsKeptWhenVaultsClockIsAhead: Vault's clock 10 s ahead of
// Cloudflare's, and a validate_only whose query string is dropped on the
// way, so Cloudflare generates and activates a key. The edge's key was made
// "before" the request started by Vault's clock, which the old code took to
// mean the edge still had its old key: it discarded the live key and put the
// old one back as current.
func TestAValidationKeyIsKeptWhenVaultsClockIsAhead(t *testing.T) {
	env := newSkewedEnv(t, -10*time.Second, 0)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{IgnoreValidateOnly: true})
	resp := env.must(validateOnly(env))
	if resp.Data["stored"] != true {
		t.Errorf("validate_only that generated a key: stored %v, want true", resp.Data["stored"])
	}
	rec := storedRecord(t, env)
	if rec == nil || (rec.current() && rec.PSK != env.edge().PSK) {
		t.Fatal("after a validate_only that generated a key, Vault says current for a key the edge does not use")
	}
	assertCurrent(t, env, "after a validate_only that generated a key")
	if got := env.generations(); got != 2 {
		t.Errorf("edge generated %d keys, want 2 (rotation, validation turned generation)", got)
	}
}

// TestALostFirstRotationIsNeverForgottenWhenVaultsClockIsAhead: Vault's
// clock 10 s ahead of Cloudflare's, and a tunnel's first rotation whose
// answer is lost after Cloudflare made the key. The old code found the
// edge's key older than the rotation's start by Vault's clock, judged the
// rotation never to have happened and deleted the record: the edge held a
// key nobody had, a read returned nothing, and no sweep looked again.
func TestALostFirstRotationIsNeverForgottenWhenVaultsClockIsAhead(t *testing.T) {
	for name, fault := range map[string]cloudflaresim.Fault{
		"5xx after commit":    {Status: 500, AfterCommit: true},
		"hangup after commit": {Hangup: true, AfterCommit: true},
	} {
		t.Run(name, func(t *testing.T) {
			env := newSkewedEnv(t, -10*time.Second, 0)
			env.sim.FailNext(cloudflaresim.OpPSKGenerate, fault)
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if httpStatus(resp, err) != http.StatusBadGateway {
				t.Fatalf("lost first rotation: status %d: %s", httpStatus(resp, err), errorText(resp, err))
			}
			if env.generations() != 1 {
				t.Fatalf("the fault did not generate a key (%d)", env.generations())
			}
			env.clock.Advance(time.Minute) // past the settle window
			resp, err = env.request(logical.ReadOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status == http.StatusNoContent || status == http.StatusNotFound && storedRecord(t, env) == nil {
				t.Fatalf("read after the settle window: status %d and no record, while the edge uses a key nobody holds", status)
			}
			assertHealedOrFlagged(t, env, "after the read")
			runBackgroundPass(t, env)
			assertHealedOrFlagged(t, env, "after a background pass")
			assertHonest(t, env)
		})
	}
}
