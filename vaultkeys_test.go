package main

import (
	"context"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Keys Vault makes (config key_source vault): written ahead, set on the
// edge with Cloudflare's Set operation, finished with the same key.

// newVaultKeysEnv is newConfiguredEnv with key_source vault.
func newVaultKeysEnv(t *testing.T) *testEnv {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "vault"}))
	return env
}

// distinctNewKeys is how many different keys the edge was given after the
// one the tunnel was created with: setting one key twice gives it one.
func (e *testEnv) distinctNewKeys() int {
	seen := map[string]bool{}
	for _, k := range e.edge().GeneratedPSKs[1:] {
		seen[k] = true
	}
	return len(seen)
}

// storedRecord reads the tunnel's record from storage, as no path shows it
// (a read of the path would finish a pending record first).
func (e *testEnv) storedRecord() *store.Record {
	e.t.Helper()
	rec, err := store.ReadRecord(context.Background(), e.storage, store.Tunnel{AccountID: e.account, TunnelID: e.tunnel.ID})
	if err != nil {
		e.t.Fatal(err)
	}
	return rec
}

var vaultKeyForm = regexp.MustCompile(`^[A-Za-z0-9]{32}$`)

func TestAWriteSetsVaultsKeyAndNeverGenerates(t *testing.T) {
	env := newVaultKeysEnv(t)
	resp := env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if resp.Data["key_source"] != "vault" || resp.Data["state"] != store.StateCurrent {
		t.Fatalf("write: key_source %v, state %v", resp.Data["key_source"], resp.Data["state"])
	}
	if _, ok := resp.Data["psk"]; ok {
		t.Fatal("the write's answer carries the key")
	}
	read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
	psk, _ := read.Data["psk"].(string)
	if psk != env.edge().PSK || !vaultKeyForm.MatchString(psk) {
		t.Fatalf("read: the key is the edge's: %v, of 32 letters and digits: %v", psk == env.edge().PSK, vaultKeyForm.MatchString(psk))
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKGenerate); n != 0 {
		t.Errorf("psk_generate called %d times", n)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
		t.Errorf("Set called %d times, want 1", n)
	}
	if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["key_source"] != "vault" {
		t.Errorf("metadata key_source %v", meta.Data["key_source"])
	}
	assertCurrent(t, env, "after the write")
	if rec := env.storedRecord(); rec.PendingPSK != "" || !rec.SettleUntil.IsZero() {
		t.Error("a key set with its answer leaves a pending key or a settle window behind")
	}

	env.b.events.Wait()
	env.events.Lock()
	defer env.events.Unlock()
	if len(env.events.Events) != 1 {
		t.Fatalf("%d events, want 1", len(env.events.Events))
	}
	if fields := env.events.Events[0].Event.Metadata.AsMap(); fields["key_source"] != "vault" || strings.Contains(fmt.Sprint(fields), psk) {
		t.Errorf("event: key_source %v, carries the key: %v", fields["key_source"], strings.Contains(fmt.Sprint(fields), psk))
	}
}

// TestALostAnswerIsFinishedWithTheSameKey: the edge took the key and the
// answer was lost. The record was written ahead as pending; a read at once
// (no settle window) sends the same key again and serves it current, and
// the edge was given one new key.
func TestALostAnswerIsFinishedWithTheSameKey(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault cloudflaresim.Fault
	}{
		{"hang-up after the change", cloudflaresim.Fault{AfterCommit: true, Hangup: true}},
		{"5xx after the change", cloudflaresim.Fault{AfterCommit: true, Status: http.StatusBadGateway}},
		{"5xx before any change", cloudflaresim.Fault{Status: http.StatusServiceUnavailable}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			env.sim.FailNext(cloudflaresim.OpPSKSet, tc.fault)
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status != http.StatusBadGateway {
				t.Fatalf("write with the answer lost: status %d (%s)", status, errorText(resp, err))
			}
			if msg := errorText(resp, err); !strings.Contains(msg, "marked pending") || !strings.Contains(msg, "same key") {
				t.Errorf("the error does not say what happens next: %s", msg)
			}
			rec := env.storedRecord()
			if rec.State != store.StatePending || rec.PendingPSK == "" || rec.PendingPSK == rec.PSK {
				t.Fatalf("after the lost answer: state %s, a pending key: %v", rec.State, rec.PendingPSK != "")
			}
			pending := rec.PendingPSK
			assertCurrent(t, env, "the read at once")
			if env.edge().PSK != pending {
				t.Error("the key served is not the one written ahead")
			}
			if n := env.distinctNewKeys(); n != 2 {
				t.Errorf("the edge was given %d different keys, want 2 (the first write's, the lost one's)", n)
			}
			if n := env.sim.Calls(cloudflaresim.OpPSKGenerate); n != 0 {
				t.Errorf("psk_generate called %d times", n)
			}
			if got := env.storedRecord().Version; got != 2 {
				t.Errorf("version %d, want 2", got)
			}
		})
	}
}

// TestTheBackgroundAndAWriteFinishAPendingKey: a pending record is finished
// by the background pass as by a read; a write finishes it first, and only
// then asks for a different key.
func TestTheBackgroundAndAWriteFinishAPendingKey(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	backgroundPass(t, env)
	assertCurrent(t, env, "after the background pass")
	if n := env.distinctNewKeys(); n != 1 {
		t.Errorf("the edge was given %d different keys, want 1", n)
	}

	// The lost request may still land until its settle window ends, even
	// after the rotation was finished: no different key before then.
	env.clock.Advance(time.Hour)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	pending := env.storedRecord().PendingPSK
	// The operator writes again: the write finishes the pending key, and
	// refuses to send a different one while the lost request may land.
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if status := httpStatus(resp, err); status != http.StatusConflict || !strings.Contains(errorText(resp, err), "different key") {
		t.Fatalf("write after the lost answer: status %d (%s)", status, errorText(resp, err))
	}
	assertCurrent(t, env, "after the write finished the pending key")
	if env.edge().PSK != pending || env.distinctNewKeys() != 2 {
		t.Errorf("the edge's key is the pending one: %v; different keys given: %d, want 2", env.edge().PSK == pending, env.distinctNewKeys())
	}
}

// assertKeyCurrent checks that a read serves the edge's key as current.
// Unlike assertCurrent it does not ask that last_generated_on be the
// edge's: a late request of the same key re-dates it, which changes no key.
func assertKeyCurrent(t *testing.T, env *testEnv, when string) {
	t.Helper()
	resp := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
	if resp.Data["state"] != store.StateCurrent || resp.Data["psk"] != env.edge().PSK {
		t.Fatalf("%s: state %v, key is the edge's: %v", when, resp.Data["state"], resp.Data["psk"] == env.edge().PSK)
	}
}

// validateOnlyPath is a validate_only write of env's tunnel's path.
func validateOnlyPath(env *testEnv) (*logical.Response, error) {
	return env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"validate_only": true})
}

// TestALateLandingNeverMakesAReadCallAStaleKeyCurrent: a request the edge
// took and processed after the engine gave up. The read finishes the
// rotation with the same key; no different key is sent while the abandoned
// request may still land (409); when it lands it sets the same key again,
// re-dated, which a listing does not take for drift and the drift sweep
// resolves by setting the stored key again: no key nobody asked for, and
// no read ever calls current a key the edge does not use.
func TestALateLandingNeverMakesAReadCallAStaleKeyCurrent(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if status := httpStatus(resp, err); status != http.StatusGatewayTimeout {
		t.Fatalf("write held by the edge: status %d (%s)", status, errorText(resp, err))
	}
	env.sim.WaitAccepted()
	pending := env.storedRecord().PendingPSK
	assertHonest(t, env)
	assertCurrent(t, env, "the read after the held write")
	if env.edge().PSK != pending {
		t.Fatal("the read did not finish with the key written ahead")
	}
	rec := env.storedRecord()
	if !rec.SendsMayLand(env.clock.Now()) || rec.LateLandingUntil.IsZero() {
		t.Fatalf("the finished record keeps no window for the abandoned request: settle_until %v, late_landing_until %v", rec.SettleUntil, rec.LateLandingUntil)
	}
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
	if status := httpStatus(resp, err); status != http.StatusConflict || !strings.Contains(errorText(resp, err), "different key") {
		t.Fatalf("a different key while the abandoned request may land: status %d (%s)", status, errorText(resp, err))
	}
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
		t.Error("the refused write sent a key")
	}

	env.clock.Advance(time.Second)
	env.sim.ProcessLateNow() // the abandoned request lands: the same key, re-dated
	if env.edge().PSK != pending {
		t.Fatal("the late landing changed the key")
	}
	assertKeyCurrent(t, env, "after the late landing")
	list := env.must(env.request(logical.ListOperation, "tunnels/"+env.account, nil))
	if info := list.Data["key_info"].(map[string]any)[env.tunnel.ID].(map[string]any); info["in_sync"] != false {
		t.Errorf("listing after the re-date: in_sync %v, want false (not proven)", info["in_sync"])
	}
	if got := env.storedRecord(); got.State != store.StateCurrent || got.PSK != pending {
		t.Fatalf("the listing changed the record: state %s", got.State)
	}

	env.clock.Advance(time.Minute)
	backgroundPass(t, env) // the drift sweep: sets the stored key again
	assertCurrent(t, env, "after the drift sweep")
	if n := env.distinctNewKeys(); n != 2 {
		t.Errorf("the edge was given %d different keys, want 2", n)
	}
	if got := env.storedRecord(); got.Version != 2 || !got.LastGeneratedOn.Equal(env.edge().PSKGeneratedOn) {
		t.Errorf("after the sweep: version %d (want 2), last_generated_on is the edge's: %v", got.Version, got.LastGeneratedOn.Equal(env.edge().PSKGeneratedOn))
	}
	env.clock.Advance(time.Hour)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	assertCurrent(t, env, "a write once the window passed")
}

// TestALateLandingWithHealingOffIsStaleAndSaysWhy: with heal_stale_psk off
// the drift sweep sends nothing for a key re-dated within the window: the
// tunnel is stale with a reason that tells the truth.
func TestALateLandingWithHealingOffIsStaleAndSaysWhy(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m", "heal_stale_psk": false}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the held write succeeded")
	}
	env.sim.WaitAccepted()
	assertCurrent(t, env, "the read after the held write")
	env.clock.Advance(time.Second)
	env.sim.ProcessLateNow()
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	env.clock.Advance(time.Minute)
	backgroundPass(t, env)
	rec := env.storedRecord()
	if rec.State != store.StateStale || !strings.Contains(rec.StateReason, "heal_stale_psk off") || !strings.Contains(rec.StateReason, "request of the engine's own") {
		t.Fatalf("state %s, reason %q", rec.State, rec.StateReason)
	}
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
		t.Error("the sweep sent a key with healing off")
	}
	assertHonest(t, env)
}

// TestAKeyCloudflareRefusesChangesNothing: unapplied_psks. The caller
// learns Cloudflare's reason; the record is as it was, and so is the edge.
func TestAKeyCloudflareRefusesChangesNothing(t *testing.T) {
	for _, first := range []bool{true, false} {
		t.Run(fmt.Sprintf("first rotation %v", first), func(t *testing.T) {
			env := newVaultKeysEnv(t)
			if !first {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			}
			before, edge := env.storageSnapshot(), env.edge().PSK
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "tunnel is being provisioned"}})
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			msg := errorText(resp, err)
			if status := httpStatus(resp, err); status != http.StatusBadRequest || !strings.Contains(msg, "cloudflare did not apply") || !strings.Contains(msg, "tunnel is being provisioned") {
				t.Fatalf("status %d: %s", status, msg)
			}
			if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("a refused key changed storage:\n%v\n%v", before, after)
			}
			if env.edge().PSK != edge {
				t.Error("the edge's key changed")
			}
		})
	}
}

// TestAResendCloudflareRefusesStaysPending: a pending key whose resend is
// unapplied may still be on the edge (the first request may have landed):
// it stays pending, backs the background off and says why; nothing calls
// it current. retry_at paces the background only: a read sends the key
// again at once.
func TestAResendCloudflareRefusesStaysPending(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "maintenance"}})
	read, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	if err != nil || read.Data["state"] != store.StatePending || !strings.Contains(strings.Join(read.Warnings, " "), "maintenance") {
		t.Fatalf("read after a refused resend: %v, state %v, warnings %v", err, read.Data["state"], read.Warnings)
	}
	rec := env.storedRecord()
	if rec.Failures != 1 || rec.RetryAt.IsZero() {
		t.Errorf("failures %d, retry_at %v: no backoff", rec.Failures, rec.RetryAt)
	}
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	backgroundPass(t, env)
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
		t.Error("the background sent the key again during its backoff")
	}
	assertHonest(t, env)
	assertCurrent(t, env, "a read during the background's backoff")
}

// countingPolicy is a password policy that makes keys of length n that
// start with prefix and differ each time (a counter), as a policy must.
func countingPolicy(prefix string, n int) func() (string, error) {
	var made atomic.Int64
	return func() (string, error) {
		return fmt.Sprintf("%s%0*d", prefix, n-len(prefix), made.Add(1)), nil
	}
}

// TestPasswordPolicies: a policy is checked when config is written (it
// must exist and make keys of the form every template carries) and at each
// rotation, which sends nothing if it does not.
func TestPasswordPolicies(t *testing.T) {
	env := newVaultKeysEnv(t)
	sys := env.b.System().(*logical.StaticSystemView)
	sys.SetPasswordPolicy("routers", countingPolicy("Ab3", 24))
	sys.SetPasswordPolicy("symbols", func() (string, error) { return "Ab3$" + strings.Repeat("x", 20), nil })
	calls := env.sim.TotalCalls()
	before := env.storageSnapshot()
	for policy, want := range map[string]string{
		"missing": `password_policy "missing": Vault could not generate a password from it`,
		"symbols": `password_policy "symbols" made a key that has characters other than letters and digits`,
	} {
		resp, err := env.request(logical.UpdateOperation, "config", map[string]any{"password_policy": policy})
		if status := httpStatus(resp, err); status != http.StatusBadRequest || !strings.Contains(errorText(resp, err), want) {
			t.Errorf("policy %s: status %d: %s", policy, status, errorText(resp, err))
		}
	}
	if env.sim.TotalCalls() != calls || fmt.Sprint(env.storageSnapshot()) != fmt.Sprint(before) {
		t.Error("a refused policy called Cloudflare or changed storage")
	}

	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"password_policy": "routers"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if psk := env.edge().PSK; len(psk) != 24 || !strings.HasPrefix(psk, "Ab3") {
		t.Errorf("the key is not the policy's (%d characters)", len(psk))
	}

	// The policy changes under the mount: the rotation refuses its key.
	sys.SetPasswordPolicy("routers", func() (string, error) { return "short", nil })
	before, sets := env.storageSnapshot(), env.sim.Calls(cloudflaresim.OpPSKSet)
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if msg := errorText(resp, err); httpStatus(resp, err) < 400 || !strings.Contains(msg, `password_policy "routers"`) || strings.Contains(msg, "short") && !strings.Contains(msg, "characters") {
		t.Fatalf("status %d: %s", httpStatus(resp, err), msg)
	}
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets || fmt.Sprint(env.storageSnapshot()) != fmt.Sprint(before) {
		t.Error("a key of the wrong form was sent or changed storage")
	}
	if resp, err := env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "gcp"}); httpStatus(resp, err) != http.StatusBadRequest {
		t.Errorf("key_source gcp: status %d", httpStatus(resp, err))
	}
}

// TestValidateOnlyWithVaultsKeys: a validation sends the stored key with
// validate_only, or, without one, only reads the tunnel; a gateway that
// drops the query string re-sets the stored key. The validation sends
// nothing more (it changes nothing at the edge by itself); the drift sweep
// then sets the stored key again, healing on: never a key on the edge
// Vault does not hold, and no new key.
func TestValidateOnlyWithVaultsKeys(t *testing.T) {
	env := newVaultKeysEnv(t)
	resp := env.must(validateOnlyPath(env))
	if note, _ := resp.Data["validated_by"].(string); !strings.Contains(note, "no key was sent") || env.sim.Calls(cloudflaresim.OpPSKSet) != 0 {
		t.Fatalf("validation without a stored key: note %q, Set calls %d", note, env.sim.Calls(cloudflaresim.OpPSKSet))
	}
	if env.storedRecord() != nil {
		t.Fatal("a validation stored a record")
	}

	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	before, keys := env.storageSnapshot(), len(env.edge().GeneratedPSKs)
	resp = env.must(validateOnlyPath(env))
	if note, _ := resp.Data["validated_by"].(string); !strings.Contains(note, "validated setting the stored key") || resp.Data["stored"] != false {
		t.Fatalf("validation with a stored key: %v", resp.Data)
	}
	if len(env.edge().GeneratedPSKs) != keys || fmt.Sprint(env.storageSnapshot()) != fmt.Sprint(before) {
		t.Error("a validation changed the edge or storage")
	}

	env.clock.Advance(time.Second) // the re-set key's second differs from the stored one's
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{IgnoreValidateOnly: true})
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	resp = env.must(validateOnlyPath(env))
	if note, _ := resp.Data["validated_by"].(string); !strings.Contains(note, "dated the tunnel's key later") || !strings.Contains(note, "drift sweep decides") {
		t.Fatalf("validation turned into a real Set: %v", resp.Data)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet) - sets; n != 1 {
		t.Errorf("the validation sent %d Set requests, want 1 (itself)", n)
	}
	assertKeyCurrent(t, env, "after the dropped query string")
	env.clock.Advance(time.Hour)
	backgroundPass(t, env) // the drift sweep: the stored key set again
	assertCurrent(t, env, "after the drift sweep")
	if n := env.distinctNewKeys(); n != 1 {
		t.Errorf("the edge was given %d different keys, want 1", n)
	}
	// The validation was answered: nothing of it can land later, and a
	// write need not wait.
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	assertCurrent(t, env, "a write right after")
}

// TestASwitchToCloudflareFinishesAPendingKeyWithIt: a pending key Vault
// made is finished with the Set operation whatever key_source says now;
// only the next rotation asks psk_generate.
func TestASwitchToCloudflareFinishesAPendingKeyWithIt(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "cloudflare"}))
	assertCurrent(t, env, "the read after the switch")
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != 0 {
		t.Error("psk_generate was called to finish a key Vault made")
	}
	env.clock.Advance(time.Hour) // past the lost request's settle window
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	assertCurrent(t, env, "the next write")
	if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["key_source"] != "cloudflare" || env.sim.Calls(cloudflaresim.OpPSKGenerate) != 1 {
		t.Errorf("after the switch: key_source %v, psk_generate calls %d", meta.Data["key_source"], env.sim.Calls(cloudflaresim.OpPSKGenerate))
	}
}

// TestAHealWithVaultsKeysMakesAKeyOfVaults: drift found outside the window
// of the engine's own requests is drift as ever, healed with a key Vault
// makes.
func TestAHealWithVaultsKeysMakesAKeyOfVaults(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.clock.Advance(time.Second)
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	assertCurrent(t, env, "after the heal")
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != 0 || env.sim.Calls(cloudflaresim.OpPSKSet) != 2 {
		t.Errorf("psk_generate %d, Set %d; want 0 and 2", env.sim.Calls(cloudflaresim.OpPSKGenerate), env.sim.Calls(cloudflaresim.OpPSKSet))
	}
}

// TestAPendingKeyOfADeletedTunnelIsRecordedGone: the resend of a pending
// key to a tunnel Cloudflare no longer has is unapplied; the tunnel is
// recorded gone rather than sent the key again at every pass.
func TestAPendingKeyOfADeletedTunnelIsRecordedGone(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	env.sim.DeleteTunnel(env.account, env.tunnel.ID)
	read, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	if err != nil || read.Data["state"] != store.StateTunnelGone {
		t.Fatalf("read: %v, state %v", err, read.Data["state"])
	}
	if rec := env.storedRecord(); rec.PendingPSK == "" {
		t.Error("the gone record dropped the pending key, which the edge may use")
	}
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	backgroundPass(t, env)
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
		t.Error("the background sent the key to a gone tunnel")
	}
}

// TestBulkRotationsWithVaultsKeys: rotate/<account> rotates each tunnel
// with a key Vault makes (in batches: bulk_vault_test.go), never psk_generate,
// and a tunnel whose key was finished while a lost request may still land
// waits instead of being sent a different key.
func TestBulkRotationsWithVaultsKeys(t *testing.T) {
	env := newVaultKeysEnv(t)
	tunnels := bulkFleet(t, env, 3)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	if p := progressOf(t, env); p["done"] != len(tunnels) || p["remaining"] != 0 {
		t.Fatalf("bulk progress %v", p)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKGenerate); n != 0 {
		t.Errorf("psk_generate called %d times", n)
	}
	for _, id := range tunnels {
		edge, _ := env.sim.Tunnel(env.account, id)
		read := env.must(env.request(logical.ReadOperation, "psk/"+env.account+"/"+id, nil))
		if read.Data["psk"] != edge.PSK || read.Data["version"] != 2 || read.Data["key_source"] != "vault" {
			t.Errorf("tunnel %s: key is the edge's: %v, version %v, key_source %v", id, read.Data["psk"] == edge.PSK, read.Data["version"], read.Data["key_source"])
		}
	}

	// A lost answer, finished by a read: a bulk job queued while the lost
	// request may still land waits for its window to end, then rotates.
	env.clock.Advance(time.Hour)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	assertCurrent(t, env, "the read after the lost answer")
	rec := env.storedRecord()
	if !rec.SendsMayLand(env.clock.Now()) {
		t.Fatal("the finished record keeps no window for the lost request")
	}
	env.clock.Advance(time.Second)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	if got := env.storedRecord(); got.Version != rec.Version {
		t.Fatalf("a bulk rotation sent a different key while the lost request may land (version %d, want %d)", got.Version, rec.Version)
	}
	env.clock.Advance(rec.SettleUntil.Sub(env.clock.Now()) + time.Second)
	drain(t, env)
	if got := env.storedRecord(); got.Version != rec.Version+1 {
		t.Errorf("after the window the bulk rotation did not happen: version %d, want %d", got.Version, rec.Version+1)
	}
	if p := progressOf(t, env); p["done"] != len(tunnels) || p["remaining"] != 0 {
		t.Errorf("bulk progress %v", p)
	}
	assertCurrent(t, env, "after the bulk rotation")
}

// TestARotationUnknownLeftByGenerateIsResolvedAsEverAfterASwitch: a
// psk_generate whose answer was lost before the mount switched to
// key_source vault is resolved by Cloudflare's times, as ever, and healed
// with a key Vault makes.
func TestARotationUnknownLeftByGenerateIsResolvedAsEverAfterASwitch(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	if rec := env.storedRecord(); rec.State != store.StateRotationUnknown {
		t.Fatalf("state %s, want %s", rec.State, store.StateRotationUnknown)
	}
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "vault"}))
	generated := env.sim.Calls(cloudflaresim.OpPSKGenerate)
	env.clock.Advance(time.Hour) // past the lost generate's settle window
	assertCurrent(t, env, "the read after the settle window")
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != generated || env.sim.Calls(cloudflaresim.OpPSKSet) != 1 {
		t.Errorf("the heal: psk_generate %d more, Set %d; want 0 and 1", env.sim.Calls(cloudflaresim.OpPSKGenerate)-generated, env.sim.Calls(cloudflaresim.OpPSKSet))
	}
	if rec := env.storedRecord(); rec.KeySource != store.KeySourceVault {
		t.Errorf("key_source %q", rec.KeySource)
	}
}

// TestThe409OfAPendingFirstRotationSaysVaultHoldsNoKey: a delete (or a
// write) of a pending record is refused while a request of its key may
// land, and the 409 says what the edge uses meanwhile: the key written
// ahead or the one it had, which for a first rotation Vault never held.
// (It once said "the key Vault holds is the edge's meanwhile", true only of
// a current record.)
func TestThe409OfAPendingFirstRotationSaysVaultHoldsNoKey(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	if rec := env.storedRecord(); rec.State != store.StatePending || rec.PSK != "" {
		t.Fatalf("state %s, a stored key: %v", rec.State, rec.PSK != "")
	}
	resp, err := env.request(logical.DeleteOperation, env.pskPath(), nil)
	msg := errorText(resp, err)
	if httpStatus(resp, err) != http.StatusConflict {
		t.Fatalf("delete of a pending record: status %d (%s)", httpStatus(resp, err), msg)
	}
	if strings.Contains(msg, "the key Vault holds is the edge's") || !strings.Contains(msg, "first rotation is pending") || !strings.Contains(msg, "Vault never held") {
		t.Errorf("the 409 for a pending first rotation does not say what the edge uses: %s", msg)
	}
}

// TestAReadFinishesAScheduledRotationsLostAnswerAtOnce: a scheduled
// rotation's answer is lost after the edge took the key; the scheduler's
// failure path stamps the pending record with retry_at a minute on. That
// paces the background, not readers: a read seconds later sends the same
// key again and serves it current, as the docs promise for any lost answer.
func TestAReadFinishesAScheduledRotationsLostAnswerAtOnce(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	schedulerOver(t, env, env.storage)
	env.clock.Advance(time.Hour + time.Second)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	drain(t, env)
	if rec := env.storedRecord(); rec.State != store.StatePending || !env.clock.Now().Before(rec.RetryAt) {
		t.Fatalf("after the scheduled rotation's lost answer: state %s, retry_at %v", rec.State, rec.RetryAt)
	}
	env.clock.Advance(5 * time.Second)
	read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
	if read.Data["state"] != store.StateCurrent || read.Data["psk"] != env.edge().PSK {
		t.Errorf("a read 5s after the scheduled rotation's lost answer: state %v (retry_at %v), key is the edge's: %v",
			read.Data["state"], read.Data["retry_at"], read.Data["psk"] == env.edge().PSK)
	}
}

// TestFinishingAScheduledRotationsPendingKeyIsThatRotation: a scheduled
// rotation's answer is lost after the edge took its key. The scheduler's
// retry finishes the pending key, and that is the rotation the schedule
// asked for: no second key (once the retry made one more), one version on,
// and the schedule moves on from the finished key.
func TestFinishingAScheduledRotationsPendingKeyIsThatRotation(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	schedulerOver(t, env, env.storage)
	keysBefore := env.distinctNewKeys()
	env.clock.Advance(time.Hour + time.Second)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	drain(t, env)
	for i := 0; i < 3; i++ { // the retry a minute on, and a few passes more
		env.clock.Advance(time.Minute + time.Second)
		drain(t, env)
	}
	rec := env.storedRecord()
	if n := env.distinctNewKeys() - keysBefore; n != 1 || rec.Version != 2 {
		t.Errorf("one scheduled rotation gave the edge %d new keys (versions 1 -> %d)", n, rec.Version)
	}
	if want := rec.StoredAt.Add(time.Hour); !rec.NextRotation.Equal(want) || !scheduledEntry(t, env, rec) {
		t.Errorf("next_rotation %v, want %v (an hour after the finished key), with its entry", rec.NextRotation, want)
	}
	assertCurrent(t, env, "after the retries")
}

// TestAPolicyThatRepeatsAKeyIsRefusedAndTheScheduleKept: a password policy
// can make the same key twice. A rotation to the key the tunnel already has
// changes nothing, so it is refused: the config write's samples must
// differ (400), and should the policy change under the mount, a write is
// refused naming the policy (never the key), with nothing sent or changed,
// and a scheduled rotation keeps its schedule, with backoff, and says why in
// metadata. (Once a write answered 200 with no new key, and the schedule
// silently stopped.)
func TestAPolicyThatRepeatsAKeyIsRefusedAndTheScheduleKept(t *testing.T) {
	env := newVaultKeysEnv(t)
	sys := env.b.System().(*logical.StaticSystemView)
	const repeated = "Ab3defghijklmnopqrstuvwxyz012345"
	sys.SetPasswordPolicy("repeats", func() (string, error) { return repeated, nil })
	resp, err := env.request(logical.UpdateOperation, "config", map[string]any{"password_policy": "repeats"})
	if msg := errorText(resp, err); httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(msg, `password_policy "repeats" made the same key twice`) {
		t.Fatalf("config with a policy whose samples were one key: status %d (%s)", httpStatus(resp, err), msg)
	}

	sys.SetPasswordPolicy("routers", countingPolicy("Ab3", 32))
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"password_policy": "routers"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	stored := env.edge().PSK
	// The policy changes under the mount, to one that makes the stored key.
	sys.SetPasswordPolicy("routers", func() (string, error) { return stored, nil })
	env.clock.Advance(time.Minute)
	before, sets := env.storageSnapshot(), env.sim.Calls(cloudflaresim.OpPSKSet)
	resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
	msg := errorText(resp, err)
	if httpStatus(resp, err) < 400 || !strings.Contains(msg, `password_policy "routers"`) || !strings.Contains(msg, "already has") || strings.Contains(msg, stored) {
		t.Errorf("a write whose key is the stored one: status %d (%s)", httpStatus(resp, err), msg)
	}
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets || fmt.Sprint(env.storageSnapshot()) != fmt.Sprint(before) {
		t.Error("the refused write sent a key or changed storage")
	}

	due := env.storedRecord().NextRotation
	schedulerOver(t, env, env.storage)
	env.clock.Advance(2 * time.Hour)
	drain(t, env)
	rec := env.storedRecord()
	if !rec.NextRotation.After(env.clock.Now()) || !scheduledEntry(t, env, rec) || rec.Version != 1 {
		t.Errorf("the scheduled rotation that could not make a key: next_rotation %v (was %v, now %v), an entry: %v, version %d",
			rec.NextRotation, due, env.clock.Now(), scheduledEntry(t, env, rec), rec.Version)
	}
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if last, _ := meta.Data["last_failure"].(string); meta.Data["failures"] != 1 || !strings.Contains(last, `password_policy "routers"`) {
		t.Errorf("metadata does not say why the scheduled rotation failed: failures %v, last_failure %q", meta.Data["failures"], last)
	}
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
		t.Error("the scheduled rotation sent a key")
	}
}

// TestMarkingATunnelGoneKeepsTheWindowAndThePendingKey: a Set of K1 the
// edge accepted and processes late leaves the record pending, with the
// window in which no different key may be sent. A 404 (the project's
// reading: the tunnel deleted, or the token out of its account for a
// while, and a 404 can pass) records the tunnel gone. That keeps the window
// and the pending key: once Cloudflare answers again, a write finishes K1
// first and then gets the 409 while the abandoned request of K1 may still
// land, so when it lands Vault serves the edge's key. (MarkGone once
// dropped both, and the write sent K2 at once: Vault served K2 as current
// while the edge used K1.)
//
// Two ways to a gone pending record: the scheduler's resend refused whole
// with 404 and a read of the tunnel 404 (the Set operation's own 404 is
// the account's and never enough: TestASetOperationsNotFoundIsNoTunnelGone),
// and a resend that was unapplied and a read that was 404.
func TestMarkingATunnelGoneKeepsTheWindowAndThePendingKey(t *testing.T) {
	for _, tc := range []struct {
		name string
		// gone makes the pending record tunnel_gone with transient 404s.
		gone func(t *testing.T, env *testEnv)
	}{
		{"scheduler: resend 404, read 404", func(t *testing.T, env *testEnv) {
			// The tunnel's scheduled rotation falls due seconds after the
			// abandoned write: it finishes the pending key by sending it
			// again, which is refused whole with 404, and so is the read of
			// the tunnel that follows.
			env.clock.Advance(6 * time.Second)
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusNotFound})
			env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusNotFound})
			drain(t, env)
		}},
		{"read: resend unapplied, read 404", func(t *testing.T, env *testEnv) {
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "maintenance"}})
			env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusNotFound})
			env.request(logical.ReadOperation, env.pskPath(), nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
			schedulerOver(t, env, env.storage)

			// Five seconds before the tunnel's scheduled rotation, an
			// operator's write sends K1; the edge accepts the request and
			// processes it late, and the engine gives up at request_timeout.
			env.clock.Advance(time.Hour - 5*time.Second)
			env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
			if resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil); httpStatus(resp, err) != http.StatusGatewayTimeout {
				t.Fatalf("the held write: status %d (%s)", httpStatus(resp, err), errorText(resp, err))
			}
			env.sim.WaitAccepted()
			rec := env.storedRecord()
			if rec.State != store.StatePending || !rec.SendsMayLand(env.clock.Now()) {
				t.Fatalf("after the abandoned send: state %s, window open %v", rec.State, rec.SendsMayLand(env.clock.Now()))
			}
			window, k1 := rec.SettleUntil, rec.PendingPSK

			tc.gone(t, env)
			gone := env.storedRecord()
			if gone.State != store.StateTunnelGone {
				t.Fatalf("the transient 404 left state %s (the sequence needs tunnel_gone)", gone.State)
			}
			if gone.SettleUntil.Before(window) || gone.PendingPSK != k1 {
				t.Errorf("the gone record: settle_until %v (the abandoned send may land until %v), keeps the pending key: %v",
					gone.SettleUntil, window, gone.PendingPSK == k1)
			}

			// Cloudflare answers again; the operator writes, well inside
			// the window of the abandoned send.
			env.clock.Advance(time.Second)
			if !env.clock.Now().Before(window) {
				t.Fatal("the test left the window")
			}
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if status := httpStatus(resp, err); status != http.StatusConflict {
				t.Errorf("the write of K2 while the abandoned send of K1 may still land: status %d (%s), want 409", status, errorText(resp, err))
			}
			if env.edge().PSK != k1 {
				t.Error("the write did not finish the pending key first")
			}

			env.sim.ProcessLateNow() // the abandoned request of K1 lands
			read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
			if read.Data["state"] != store.StateCurrent || read.Data["psk"] != env.edge().PSK {
				t.Errorf("after the abandoned send landed: state %v, the key served is the edge's: %v", read.Data["state"], read.Data["psk"] == env.edge().PSK)
			}
			if n := env.distinctNewKeys(); n != 2 {
				t.Errorf("the edge was given %d different keys, want 2 (the first write's, K1)", n)
			}
		})
	}
}

// TestASetOperationsNotFoundIsNoTunnelGone: the Set operation's path is the
// account's, so its 404 says nothing of one tunnel. A resend so refused
// reads the tunnel, and only that read's 404 records it gone; a read that
// finds it leaves the record pending. A scheduled rotation so refused is
// retried with backoff, not recorded gone.
func TestASetOperationsNotFoundIsNoTunnelGone(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusNotFound})
	read, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	if err != nil || read.Data["state"] != store.StatePending {
		t.Fatalf("a resend refused with 404, the tunnel still there: %v, state %v", err, read.Data["state"])
	}
	assertCurrent(t, env, "the next read")

	schedulerOver(t, env, env.storage)
	env.clock.Advance(2 * time.Hour)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Status: http.StatusNotFound})
	drain(t, env)
	rec := env.storedRecord()
	if rec.State != store.StateCurrent || rec.Failures != 1 || !rec.NextRotation.After(env.clock.Now()) || !scheduledEntry(t, env, rec) {
		t.Errorf("a scheduled rotation whose Set was a 404: state %s, failures %d, next_rotation %v (now %v)",
			rec.State, rec.Failures, rec.NextRotation, env.clock.Now())
	}
}

// TestAGoneTunnelsPendingKeyIsFinishedWhenItIsListedAgain: a tunnel found
// gone while a key Vault made was pending keeps that key; when the drift
// sweep finds it listed again, the key is set again first, and the echo
// decides: current with the edge's key, one new key given.
func TestAGoneTunnelsPendingKeyIsFinishedWhenItIsListedAgain(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "24h"}))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	pending := env.storedRecord().PendingPSK
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "maintenance"}})
	env.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: http.StatusNotFound})
	env.request(logical.ReadOperation, env.pskPath(), nil)
	if rec := env.storedRecord(); rec.State != store.StateTunnelGone || rec.PendingPSK != pending {
		t.Fatalf("state %s, keeps the pending key: %v", rec.State, rec.PendingPSK == pending)
	}
	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	assertCurrent(t, env, "after the drift sweep found the tunnel listed again")
	rec := env.storedRecord()
	if env.edge().PSK != pending || env.distinctNewKeys() != 2 || rec.Version != 2 {
		t.Errorf("the key is the pending one: %v; different keys given: %d, want 2; version %d, want 2", env.edge().PSK == pending, env.distinctNewKeys(), rec.Version)
	}
	if !scheduledEntry(t, env, rec) {
		t.Error("the returned tunnel has no schedule entry")
	}
}

// TestAWriteSetsANewKeyOnceARefusedResendsWindowHasClosed: the edge took K1
// and the answer was lost; Cloudflare then refuses, tunnel by tunnel
// (unapplied_psks), to set K1 again ("psk already in use" is a reason it
// may well give). The record stays pending, and reads say so. While an
// earlier request of K1 may still land a write is refused; once none can
// (settle_until passed), a write whose resend is refused again sets the
// new key it asks for, and the edge's echo makes it current. (Once every
// later write failed for ever: only a delete got out.)
func TestAWriteSetsANewKeyOnceARefusedResendsWindowHasClosed(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	k1, window := env.storedRecord().PendingPSK, env.storedRecord().SettleUntil
	inUse := cloudflaresim.Fault{Unapplied: map[string]string{env.tunnel.ID: "psk already in use by this tunnel"}}

	env.sim.FailNext(cloudflaresim.OpPSKSet, inUse)
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if msg := errorText(resp, err); httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(msg, "psk already in use") {
		t.Fatalf("a write while an earlier send of K1 may land, its resend refused: status %d (%s)", httpStatus(resp, err), msg)
	}
	if rec := env.storedRecord(); rec.State != store.StatePending || rec.PendingPSK != k1 || !rec.SettleUntil.Equal(window) {
		t.Fatalf("after the refused resend: state %s, the pending key kept: %v, settle_until %v (want %v: the answered resend cannot land)",
			rec.State, rec.PendingPSK == k1, rec.SettleUntil, window)
	}
	env.sim.FailNext(cloudflaresim.OpPSKSet, inUse) // the read's resend is refused too
	read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
	if read.Data["state"] != store.StatePending || !strings.Contains(strings.Join(read.Warnings, " "), "psk already in use") {
		t.Errorf("a read meanwhile: state %v, warnings %v", read.Data["state"], read.Warnings)
	}

	env.clock.Advance(window.Sub(env.clock.Now()) + time.Second)
	env.sim.FailNext(cloudflaresim.OpPSKSet, inUse)
	resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
	if err != nil || resp.IsError() {
		t.Fatalf("a write once no earlier send of K1 can land: %s", errorText(resp, err))
	}
	assertCurrent(t, env, "after the write")
	if env.edge().PSK == k1 || env.distinctNewKeys() != 3 {
		t.Errorf("the write's key is K1: %v; different keys given: %d, want 3 (the first write's, K1, the write's)", env.edge().PSK == k1, env.distinctNewKeys())
	}
}

// TestAValidationNeverChangesTheEdgeByItself: with key_source vault a
// validate_only write sends the stored key with ?validate_only=true. When
// the key was changed outside the engine and the drift sweep has not seen
// it yet, Cloudflare's answer dates the tunnel's key later than the stored
// one, which a dropped query string would do too. The validation then
// sends nothing more (it once set the stored key for real, replacing the
// key changed outside although heal_stale_psk was off): the answer says so,
// and the drift rules decide at the next drift sweep. Healing off: stale,
// saying why, nothing sent. Held from healing (another mount rotates the
// tunnel): held stale, nothing sent. Healing allowed: the stored key set
// again, no new key.
func TestAValidationNeverChangesTheEdgeByItself(t *testing.T) {
	for _, tc := range []struct {
		name      string
		config    map[string]any
		held      bool
		wantState string
	}{
		{"heal_stale_psk off", map[string]any{"heal_stale_psk": false}, false, store.StateStale},
		{"held from healing", nil, true, store.StateStale},
		{"healing allowed", nil, false, store.StateCurrent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			if tc.config != nil {
				env.must(env.request(logical.UpdateOperation, "config", tc.config))
			}
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			if tc.held {
				rec := env.storedRecord()
				rec.HealHeld = true // as holdHealing leaves a tunnel another mount rotates too
				if err := store.WriteRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}, rec); err != nil {
					t.Fatal(err)
				}
			}
			stored := env.edge().PSK
			env.clock.Advance(time.Minute)
			env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID) // changed outside the engine
			outside := env.edge().PSK

			sets := env.sim.Calls(cloudflaresim.OpPSKSet)
			resp := env.must(validateOnlyPath(env))
			if note, _ := resp.Data["validated_by"].(string); !strings.Contains(note, "changed outside this engine") || !strings.Contains(note, "drift sweep decides") {
				t.Errorf("the validation's answer does not say what it found: %q", note)
			}
			if env.edge().PSK != outside || env.sim.Calls(cloudflaresim.OpPSKSet) != sets+1 {
				t.Fatalf("a validate_only write changed the edge's key: Set calls %d -> %d, the edge's key is now the stored one: %v",
					sets, env.sim.Calls(cloudflaresim.OpPSKSet), env.edge().PSK == stored)
			}

			env.clock.Advance(time.Hour)
			backgroundPass(t, env) // the drift sweep
			rec := env.storedRecord()
			if rec.State != tc.wantState {
				t.Errorf("after the drift sweep: state %s, want %s (%s)", rec.State, tc.wantState, rec.StateReason)
			}
			if tc.wantState == store.StateStale {
				if env.edge().PSK != outside || env.sim.Calls(cloudflaresim.OpPSKSet) != sets+1 {
					t.Error("the drift sweep sent a key where healing is not allowed")
				}
				if !strings.Contains(rec.StateReason, "validate_only") {
					t.Errorf("the stale reason does not say why: %s", rec.StateReason)
				}
				assertHonest(t, env)
			} else {
				assertCurrent(t, env, "after the drift sweep")
				if env.edge().PSK != stored {
					t.Error("the drift sweep did not set the stored key again")
				}
			}
		})
	}
}

// TestADeleteOfAPendingKeyWarnsThatTheEdgeMayUseIt: once no request of a
// pending key can land, a delete forgets the record, and the key the edge
// may use with it, unsent again; the answer says so.
func TestADeleteOfAPendingKeyWarnsThatTheEdgeMayUseIt(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	env.clock.Advance(time.Hour) // past the window
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	resp, err := env.request(logical.DeleteOperation, env.pskPath(), nil)
	if err != nil || resp == nil || resp.IsError() || !strings.Contains(strings.Join(resp.Warnings, " "), "The edge may use that key") {
		t.Fatalf("delete of a pending record: %v, %v", err, resp)
	}
	if env.storedRecord() != nil || env.sim.Calls(cloudflaresim.OpPSKSet) != sets {
		t.Error("the delete kept the record or sent the key")
	}
	// A delete of a current record says nothing.
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if resp, err := env.request(logical.DeleteOperation, env.pskPath(), nil); err != nil || resp != nil {
		t.Errorf("delete of a current record: %v, %v", err, resp)
	}
}

// TestKeySourceSaysWhenNothingOfVaultsKeysIsInFlight: key-source reports
// the pending keys and open windows a version without key_source would
// not understand, and safe_to_downgrade only once key_source is cloudflare
// and none is left.
func TestKeySourceSaysWhenNothingOfVaultsKeysIsInFlight(t *testing.T) {
	env := newVaultKeysEnv(t)
	status := func(when string) map[string]any {
		t.Helper()
		return env.must(env.request(logical.ReadOperation, "key-source", nil)).Data
	}
	if got := status("fresh"); got["key_source"] != "vault" || got["safe_to_downgrade"] != false || got["in_flight"] != false {
		t.Errorf("with key_source vault and nothing in flight: %v", got)
	}
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("write with the answer lost succeeded")
	}
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"key_source": "cloudflare"}))
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	name := env.account + "/" + env.tunnel.ID
	if got := status("pending"); got["pending"] != 1 || fmt.Sprint(got["pending_tunnels"]) != "["+name+"]" || got["safe_to_downgrade"] != false {
		t.Errorf("with a pending key: %v", got)
	}
	if env.sim.Calls(cloudflaresim.OpPSKSet) != sets || env.storedRecord().State != store.StatePending {
		t.Fatal("the key-source read finished the pending key")
	}
	assertKeyCurrent(t, env, "the read that finishes it")
	window := env.storedRecord().SettleUntil
	if got := status("window"); got["pending"] != 0 || got["windows_open"] != 1 || got["windows_open_until"] != store.FormatTime(window) || got["safe_to_downgrade"] != false {
		t.Errorf("with a window open: %v", got)
	}
	env.clock.Advance(window.Sub(env.clock.Now()) + time.Second)
	if got := status("after"); got["in_flight"] != false || got["safe_to_downgrade"] != true {
		t.Errorf("once the window closed: %v", got)
	}
}
