package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
)

func TestConfigWriteValidation(t *testing.T) {
	cases := []struct {
		name      string
		data      func(env *testEnv) map[string]any
		wantError string
	}{
		{"missing token", func(e *testEnv) map[string]any { return map[string]any{"base_url": e.simURL} }, "api_token is required"},
		{"http to a remote host", func(e *testEnv) map[string]any {
			return map[string]any{"api_token": e.token.Value, "base_url": "http://api.example.com/client/v4"}
		}, "plain http"},
		{"not a URL", func(e *testEnv) map[string]any {
			return map[string]any{"api_token": e.token.Value, "base_url": "api.cloudflare.com"}
		}, "not an absolute URL"},
		{"ftp scheme", func(e *testEnv) map[string]any {
			return map[string]any{"api_token": e.token.Value, "base_url": "ftp://127.0.0.1/"}
		}, "must use https"},
		{"credentials in URL", func(e *testEnv) map[string]any {
			return map[string]any{"api_token": e.token.Value, "base_url": "https://user:pw@api.cloudflare.com/client/v4"}
		}, "must not carry credentials"},
		{"zero timeout", func(e *testEnv) map[string]any {
			return map[string]any{"api_token": e.token.Value, "base_url": e.simURL, "request_timeout": "0s"}
		}, "request_timeout must be between"},
		{"timeout too long", func(e *testEnv) map[string]any {
			return map[string]any{"api_token": e.token.Value, "base_url": e.simURL, "request_timeout": "10m"}
		}, "request_timeout must be between"},
		{"bad token account id", func(e *testEnv) map[string]any {
			return map[string]any{"api_token": e.token.Value, "base_url": e.simURL, "token_account_id": "abc"}
		}, "token_account_id must be a Cloudflare identifier"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t)
			resp, err := env.request(logical.UpdateOperation, "config", tc.data(env))
			if got := httpStatus(resp, err); got != http.StatusBadRequest {
				t.Fatalf("status = %d, want 400 (%s)", got, errorText(resp, err))
			}
			if msg := errorText(resp, err); !strings.Contains(msg, tc.wantError) {
				t.Errorf("error %q does not say %q", msg, tc.wantError)
			}
			if strings.Contains(errorText(resp, err), env.token.Value) {
				t.Error("the error repeats the API token")
			}
			if n := env.sim.TotalCalls(); n != 0 {
				t.Errorf("Cloudflare was called %d times for invalid input", n)
			}
			if snap := env.storageSnapshot(); len(snap) != 0 {
				t.Errorf("storage changed: %v", snap)
			}
		})
	}
}

func TestConfigRefusesTokensCloudflareRejects(t *testing.T) {
	cases := []struct {
		name    string
		token   func(env *testEnv) string
		account func(env *testEnv) string
		want    []string
	}{
		{"unknown token", func(e *testEnv) string { return "not-a-token-known-to-cloudflare-0123456789" }, nil,
			[]string{"HTTP 403", "code 9109", "Invalid access token"}},
		{"disabled token", func(e *testEnv) string {
			return e.sim.AddToken(cloudflaresim.Token{Status: "disabled"}).Value
		}, nil, []string{`"disabled"`, "not active"}},
		{"expired token", func(e *testEnv) string {
			return e.sim.AddToken(cloudflaresim.Token{Status: "expired"}).Value
		}, nil, []string{`"expired"`, "not active"}},
		{"account-owned token verified as a user token", func(e *testEnv) string {
			return e.sim.AddToken(cloudflaresim.Token{OwnerAccount: e.account}).Value
		}, nil, []string{"HTTP 403", "code 9109"}},
		{"user token verified at an account", func(e *testEnv) string { return e.token.Value },
			func(e *testEnv) string { return e.account }, []string{"HTTP 403", "code 9109"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t)
			token := tc.token(env)
			data := map[string]any{"api_token": token, "base_url": env.simURL}
			if tc.account != nil {
				data["token_account_id"] = tc.account(env)
			}
			resp, err := env.request(logical.UpdateOperation, "config", data)
			if got := httpStatus(resp, err); got != http.StatusBadRequest {
				t.Fatalf("status = %d, want 400 (%s)", got, errorText(resp, err))
			}
			msg := errorText(resp, err)
			for _, want := range tc.want {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q does not say %q", msg, want)
				}
			}
			if strings.Contains(msg, token) {
				t.Error("the error repeats the API token")
			}
			if snap := env.storageSnapshot(); len(snap) != 0 {
				t.Errorf("storage changed: %v", snap)
			}
		})
	}
}

func TestConfigReadShowsVerificationButNeverTheToken(t *testing.T) {
	env := newTestEnv(t)
	expires := time.Now().Add(90 * 24 * time.Hour).UTC().Truncate(time.Second)
	token := env.sim.AddToken(cloudflaresim.Token{OwnerAccount: env.account, ExpiresOn: expires})
	env.token = token

	write, err := env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token":        token.Value,
		"base_url":         env.simURL + "/",
		"token_account_id": env.account,
	})
	mustSucceed(t, write, err)
	if env.sim.Calls(cloudflaresim.OpAccountTokenVerify) != 1 {
		t.Fatalf("account token verify calls = %d, want 1", env.sim.Calls(cloudflaresim.OpAccountTokenVerify))
	}

	resp, err := env.request(logical.ReadOperation, "config", nil)
	mustSucceed(t, resp, err)
	want := map[string]any{
		"base_url":         env.simURL,
		"request_timeout":  30,
		"token_account_id": env.account,
		"token_id":         token.ID,
		"token_status":     "active",
		"token_expires_on": expires.Format(time.RFC3339Nano),
	}
	for k, v := range want {
		if resp.Data[k] != v {
			t.Errorf("config %s = %v, want %v", k, resp.Data[k], v)
		}
	}
	if _, ok := resp.Data["api_token"]; ok {
		t.Error("config read returns api_token")
	}
	for _, r := range []*logical.Response{write, resp} {
		if strings.Contains(responseJSON(t, r), token.Value) {
			t.Error("a config response contains the token")
		}
	}
}

func TestConfigUpdateKeepsTokenAndReverifies(t *testing.T) {
	env := newConfiguredEnv(t)
	resp, err := env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": 7})
	mustSucceed(t, resp, err)
	if n := env.sim.Calls(cloudflaresim.OpUserTokenVerify); n != 2 {
		t.Errorf("verify calls = %d, want 2 (one per write)", n)
	}
	read, err := env.request(logical.ReadOperation, "config", nil)
	mustSucceed(t, read, err)
	if read.Data["request_timeout"] != 7 {
		t.Errorf("request_timeout = %v, want 7", read.Data["request_timeout"])
	}

	// The stored token has since been disabled: an update that re-verifies
	// must be refused and leave the old config in place.
	before := env.storageSnapshot()
	env.sim.SetTokenStatus(env.token.Value, "disabled")
	resp, err = env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": 9})
	if httpStatus(resp, err) != http.StatusBadRequest {
		t.Fatalf("status = %d, want 400", httpStatus(resp, err))
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("a refused config update changed storage")
	}
}

func TestConfigDelete(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.DeleteOperation, "config", nil))
	resp, err := env.request(logical.ReadOperation, "config", nil)
	if err != nil || resp != nil {
		t.Fatalf("config read after delete = %v, %v; want nothing", resp, err)
	}
	resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "not configured") {
		t.Fatalf("rotate without config: %d %q, want 400 not configured", httpStatus(resp, err), errorText(resp, err))
	}
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != 0 {
		t.Error("Cloudflare was called without config")
	}
}

// authRecorder is a server that is not Cloudflare: it answers every request
// with a 500 and remembers any Authorization header it was sent, so a test
// can prove that the engine's token never reached it.
type authRecorder struct {
	mu    sync.Mutex
	auths []string
	hits  int
}

func (a *authRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.hits++
	if v := r.Header.Get("Authorization"); v != "" {
		a.auths = append(a.auths, v)
	}
	w.WriteHeader(http.StatusInternalServerError)
}

func (a *authRecorder) seen() (int, []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hits, append([]string(nil), a.auths...)
}

// TestConfigEndpointChangesNeedTheToken: whoever may update config must not
// be able to send the stored token to a host of their choosing (or verify it
// against another account) without knowing it. A write that changes base_url
// or token_account_id must carry api_token; otherwise it is a 400, nothing is
// sent anywhere and nothing is stored.
func TestConfigEndpointChangesNeedTheToken(t *testing.T) {
	recorder := &authRecorder{}
	elsewhere := httptest.NewServer(recorder)
	t.Cleanup(elsewhere.Close)

	env := newConfiguredEnv(t)
	other := cloudflaresim.NewID()
	refused := []struct {
		name string
		data map[string]any
		want string
	}{
		{"base_url to another host", map[string]any{"base_url": elsewhere.URL + "/client/v4"}, "changing base_url requires api_token in the same write"},
		{"base_url with another path", map[string]any{"base_url": env.simURL + "/x"}, "changing base_url requires api_token in the same write"},
		{"base_url with other settings", map[string]any{"base_url": elsewhere.URL, "request_timeout": "5s"}, "changing base_url requires api_token in the same write"},
		{"token_account_id set", map[string]any{"token_account_id": other}, "changing token_account_id requires api_token in the same write"},
		{"both", map[string]any{"base_url": elsewhere.URL, "token_account_id": other}, "changing base_url and token_account_id requires api_token in the same write"},
	}
	calls := env.sim.TotalCalls()
	before := env.storageSnapshot()
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := env.request(logical.UpdateOperation, "config", tc.data)
			if got := httpStatus(resp, err); got != http.StatusBadRequest {
				t.Fatalf("status = %d, want 400 (%s)", got, errorText(resp, err))
			}
			if msg := errorText(resp, err); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not say %q", msg, tc.want)
			}
		})
	}
	if hits, auths := recorder.seen(); hits != 0 || len(auths) != 0 {
		t.Errorf("the other host was called %d times, with %d Authorization headers", hits, len(auths))
	}
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Errorf("Cloudflare was called %d times", n)
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("a refused endpoint change changed storage")
	}

	// The same base_url after normalisation (a trailing slash, spaces) is
	// no change, and needs no token.
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"base_url": " " + env.simURL + "/ ", "request_timeout": "3s"}))
	// With the token in the same write, the change is made: whoever writes
	// it already knows the token.
	account := env.sim.AddToken(cloudflaresim.Token{OwnerAccount: env.account})
	env.token = account
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"api_token": account.Value, "token_account_id": env.account}))
	read := env.must(env.request(logical.ReadOperation, "config", nil))
	if read.Data["token_account_id"] != env.account {
		t.Errorf("token_account_id = %v after a write with the token", read.Data["token_account_id"])
	}
	if hits, _ := recorder.seen(); hits != 0 {
		t.Errorf("the other host was called %d times", hits)
	}
}

// A reviewer's sequence (it failed before the verification got a budget of
// its own): // is refused, and stores nothing, still leaves the mount blocked. The write
// names a new base_url and its own api_token (so mount.Config.EndpointChange lets it
// through); that endpoint answers verification with a 429 (or with a
// Ratelimit header saying nothing remains). The block lands in the mount's
// shared Budget (and, for the 429, in the ratelimit storage key) although
// the token and endpoint it describes were never stored. The stored config,
// whose token Cloudflare never blocked, then cannot rotate anything for 15
// minutes, across restarts: anyone with update on config (or an admin
// testing a wrong endpoint) can keep a working mount down.
func TestARefusedConfigWriteLeavesTheMountAsItWas(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer func(w http.ResponseWriter)
	}{
		{"429 with Retry-After", func(w http.ResponseWriter) {
			w.Header().Set("Retry-After", "100000")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = w.Write([]byte(`{"success":false,"errors":[{"code":971,"message":"rate limited"}],"messages":[],"result":null}`))
		}},
		{"403 with Ratelimit r=0", func(w http.ResponseWriter) {
			w.Header().Set("Ratelimit", `"default";r=0;t=100000`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`{"success":false,"errors":[{"code":9109,"message":"Invalid access token"}],"messages":[],"result":null}`))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { tc.answer(w) }))
			t.Cleanup(other.Close)
			before := env.storageSnapshot()

			resp, err := env.request(logical.UpdateOperation, "config", map[string]any{
				"api_token": "someone-elses-token-0123456789abcdefghijklmnopq",
				"base_url":  other.URL + "/client/v4",
			})
			if httpStatus(resp, err) < 400 {
				t.Fatalf("config write to the other endpoint succeeded")
			}
			if after := env.storageSnapshot(); len(after) != len(before) || after[mount.ConfigKey] != before[mount.ConfigKey] {
				t.Fatal("the refused config write changed config")
			}

			resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
			if httpStatus(resp, err) != http.StatusOK {
				t.Fatalf("rotation with the unchanged, working config after a refused config write: %d %s",
					httpStatus(resp, err), errorText(resp, err))
			}
		})
	}
}

// TestTokenAccountIDMustBeCanonical: the one id the engine takes outside a
// path, config's token_account_id, was trimmed and lower-cased. Vault's policy
// parameter constraints (denied_parameters / allowed_parameters values) are
// matched case-sensitively, like policy paths, so an engine that folds the
// value lets a write through that a denied_parameters rule names (the e2e
// test TestADeniedTokenAccountIDCannotBeSpeltAround shows it on a real
// Vault). It is a 400 that says the id must be lower case, with nothing
// stored and nothing asked of Cloudflare; the folding code answered 200 and
// stored the folded id.
func TestTokenAccountIDMustBeCanonical(t *testing.T) {
	for name, spell := range map[string]func(string) string{
		"upper case":         strings.ToUpper,
		"surrounding spaces": func(id string) string { return " " + id + " " },
	} {
		t.Run(name, func(t *testing.T) {
			env := newTestEnv(t)
			owned := env.sim.AddToken(cloudflaresim.Token{OwnerAccount: env.account})
			resp, err := env.request(logical.UpdateOperation, "config", map[string]any{
				"api_token":        owned.Value,
				"base_url":         env.simURL,
				"token_account_id": spell(env.account),
			})
			if got := httpStatus(resp, err); got != http.StatusBadRequest {
				t.Fatalf("status = %d, want 400: token_account_id %q was taken as %q (the engine folds it; Vault's parameter rules do not)",
					got, spell(env.account), storedTokenAccount(t, env))
			}
			if msg := errorText(resp, err); !strings.Contains(msg, "lower-case") {
				t.Errorf("error %q does not ask for the canonical form", msg)
			}
			if n := env.sim.TotalCalls(); n != 0 {
				t.Errorf("Cloudflare was called %d times for a non-canonical id", n)
			}
			if snap := env.storageSnapshot(); len(snap) != 0 {
				t.Errorf("storage changed: %v", snap)
			}
		})
	}
}

func storedTokenAccount(t *testing.T, env *testEnv) any {
	t.Helper()
	resp, err := env.request(logical.ReadOperation, "config", nil)
	if err != nil || resp == nil {
		return nil
	}
	return resp.Data["token_account_id"]
}
