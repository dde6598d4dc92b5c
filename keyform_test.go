package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
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

// frontShowingKey is a front at base_url that passes everything to the
// simulator, but puts key into the result of every validate_only
// psk_generate answer, as an answer that merely shows a key (Cloudflare does
// not document that answer's result) would: the edge's key does not change.
func frontShowingKey(t *testing.T, env *testEnv, key string) string {
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/psk_generate") || r.URL.Query().Get("validate_only") != "true" {
			env.sim.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		env.sim.ServeHTTP(rec, r)
		var body map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
			t.Errorf("decode the simulator's answer: %v", err)
			return
		}
		if result, ok := body["result"].(map[string]any); ok {
			result["psk"] = key
		}
		var out bytes.Buffer
		_ = json.NewEncoder(&out).Encode(body)
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Header().Del("Content-Length")
		w.WriteHeader(rec.Code)
		_, _ = w.Write(out.Bytes())
	}))
	t.Cleanup(front.Close)
	return front.URL + "/client/v4"
}

// TestAValidationAnswerWithAnOddKeyTheEdgeDoesNotUseChangesNothing: a
// validate_only answer that carries a key the edge does not use is discarded
// when the edge provably still has its key (validate.go: "where the edge
// provably still has its earlier key the answer's key is discarded"). The
// merge checks the key's form first and, for a key that is not letters and
// digits (here the key the old TestAValidationKeyTheEdgeDoesNotUseIsNeverCurrent
// used, with dashes; the merge changed that test's key to letters only),
// calls holdWrongKey without asking the edge: a current tunnel whose key
// the edge still uses is marked stale ("the edge probably uses a key nobody
// holds"), its reads tell the operator the tunnel cannot come up until they
// write the path (an unneeded rotation), and it is held: its schedule
// stops. The engine already reads the edge before a validation
// (EdgeKeyBefore), so one more read would tell.
//
// Before the fix it printed:
//
//	after a validate_only that changed nothing at the edge: state stale, want current: the answer to the validate_only request ... carried a key Vault did not store (...it has characters other than letters and digits), so the edge probably uses a key nobody holds. ...
func TestAValidationAnswerWithAnOddKeyTheEdgeDoesNotUseChangesNothing(t *testing.T) {
	env := newTestEnv(t)
	base := frontShowingKey(t, env, "validation-only-key-never-persisted-0123456789")
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": base, "request_timeout": "2s",
	}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "24h"}))
	edgeKey, generations := env.edge().PSK, env.generations()

	resp, err := env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"validate_only": true})
	if env.edge().PSK != edgeKey || env.generations() != generations {
		t.Fatal("the edge's key changed: the test's premise does not hold")
	}
	t.Logf("validate_only: status %d: %s", httpStatus(resp, err), errorText(resp, err))
	meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if meta.Data["state"] != store.StateCurrent {
		t.Fatalf("after a validate_only that changed nothing at the edge: state %v, want current: %v", meta.Data["state"], meta.Data["state_reason"])
	}
	assertCurrent(t, env, "after the validation")
}

// TestALostValidationDoesNotReleaseAHeldTunnel: a tunnel held
// after an answer with a key of the wrong form is to get no key "by itself
// (no heal, no scheduled or bulk rotation) until an operator writes this
// path" (holdWrongKey). A validate_only asks for no key; generateLocked
// clears AnswerHeld for it all the same (unlike HealHeld, which it clears only
// for trigger "write"). When that validation's answer is lost (a 500 before
// Cloudflare did anything: nothing changed at the edge), the record is
// rotation_unknown with EdgeKeyForeign set, so after the settle window
// reconciliation finds the edge "changed" and heals: the background
// generates a key for the held tunnel, which nobody asked for (the only
// request since the hold was a validation). On a tunnel held for drift
// (HealHeld) the same sequence generates nothing.
//
// Before the fix it printed:
//
//	after a lost validate_only of a held tunnel the background generated 1 key(s); nobody asked for one since the hold
func TestALostValidationDoesNotReleaseAHeldTunnel(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.SetPSKValue(injectedKey)
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the write with a key of the wrong form succeeded")
	}
	if meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil)); meta.Data["state"] != store.StateStale {
		t.Fatalf("not held: state %v", meta.Data["state"])
	}
	// Whatever answers at base_url gives Cloudflare's keys again, so that a
	// generation shows up as a stored key; with bad keys still coming, the
	// heal would cost one more generation at the edge all the same.
	env.sim.SetPSKValue(nil)
	generations := env.generations()

	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: http.StatusInternalServerError})
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"validate_only": true})
	if httpStatus(resp, err) != http.StatusBadGateway {
		t.Fatalf("lost validation: status %d: %s", httpStatus(resp, err), errorText(resp, err))
	}
	if env.generations() != generations {
		t.Fatal("the fault generated a key: the test's premise does not hold")
	}
	for i := 0; i < 3; i++ {
		runBackgroundPass(t, env)
		_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
	}
	if n := env.generations() - generations; n != 0 {
		t.Fatalf("after a lost validate_only of a held tunnel the background generated %d key(s); nobody asked for one since the hold", n)
	}
}

// TestARefusedWriteOfAHeldTunnelKeepsItHeld (review of fd4a21b): begin says
// of an operator's write of a held tunnel that "a refusal puts the held
// record back (restore)". It does not any more. sendFailed now restores only
// what edgeUnchanged proves, and edgeUnchanged compares the edge's key with
// the pending record's EdgeKeyBefore, which for a held (stale) record is
// still the key the edge had before the attempt that got the wrong-form
// answer: the edge has moved on since (that answer's key), so the refused
// write "may have changed" the key, and the record is left
// rotation_unknown, with AnswerHeld (and HealHeld) already cleared by begin.
// After the settle window reconciliation heals it: the background generates
// a key for a tunnel held until "an operator writes this path", whose
// operator's write Cloudflare refused, and whose answer (a 400) told the
// operator nothing happened. The same holds for a tunnel held for drift
// (HealHeld), whose hold stops two mounts rotating each other's keys away.
//
// It printed (on fd4a21b..5e7e70f):
//
//	after the refused write: state rotation_unknown, answer_held false (...): the hold is gone
//	after a refused write of a held tunnel the background generated 1 key(s); the only write since the hold was refused
func TestARefusedWriteOfAHeldTunnelKeepsItHeld(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.SetPSKValue(injectedKey)
	if _, err := env.request(logical.UpdateOperation, env.pskPath(), nil); err == nil {
		t.Fatal("the write with a key of the wrong form succeeded")
	}
	if rec := storedRecord(t, env); rec == nil || !rec.HeldByAnswer() {
		t.Fatalf("setup: not held: %+v", rec)
	}
	generations := env.generations()

	// The operator writes; Cloudflare refuses the request in its own
	// envelope (any 4xx: a token without the permission, a tunnel being
	// modified). Nothing changed at the edge.
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: http.StatusConflict,
		Errors: []cloudflaresim.Message{{Code: 1003, Message: "tunnel is being modified"}}})
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	t.Logf("refused write: status %d: %s", httpStatus(resp, err), errorText(resp, err))
	if env.generations() != generations {
		t.Fatal("the refusal generated a key: the test's premise does not hold")
	}
	if rec := storedRecord(t, env); rec == nil || !rec.HeldByAnswer() {
		t.Errorf("after the refused write: state %s, answer_held %v (%s): the hold is gone", rec.State, rec.AnswerHeld, rec.StateReason)
	}
	for i := 0; i < 3; i++ {
		runBackgroundPass(t, env)
		_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
	}
	if n := env.generations() - generations; n != 0 {
		t.Fatalf("after a refused write of a held tunnel the background generated %d key(s); the only write since the hold was refused", n)
	}
}
