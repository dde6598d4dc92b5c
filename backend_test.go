package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// testEnv is one mount of the engine against its own Cloudflare simulator.
type testEnv struct {
	t       *testing.T
	b       *backend
	storage logical.Storage
	sim     *cloudflaresim.Server
	simURL  string
	token   cloudflaresim.Token
	account string
	tunnel  cloudflaresim.Tunnel
	logs    *syncBuffer
	clock   *testClock
	events  *logical.MockEventSender
	// sent is every key a Set request carried (assertNoSecretsLogged).
	sent *sentKeys
}

// testClock is the backend's clock in tests: real time plus an offset that a
// test moves forward to pass settle windows and rate-limit blocks.
type testClock struct {
	mu     sync.Mutex
	offset time.Duration
	// frozen, when set, is the time: it moves only when the test moves it.
	frozen time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.frozen.IsZero() {
		return c.frozen.Add(c.offset)
	}
	return time.Now().Add(c.offset)
}

// freeze stops the clock where it is: from now on only Advance moves it, so
// a test can compare a time the engine computed with one it computes.
func (c *testClock) freeze() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.frozen = time.Now()
}

// after sleeps d on the test clock: it moves the clock on by d and returns
// a channel that has fired.
func (c *testClock) after(d time.Duration) <-chan time.Time {
	c.Advance(d)
	fired := make(chan time.Time, 1)
	fired <- c.Now()
	return fired
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.offset += d
}

// syncBuffer collects the backend's log lines; the logger writes from many
// goroutines in the concurrency tests.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// newTestEnv starts a simulator with one token and one tunnel and a backend
// that is not configured yet.
func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	sim := cloudflaresim.New()
	sent := &sentKeys{}
	srv := httptest.NewServer(sent.wrap(sim))
	t.Cleanup(srv.Close)

	logs := &syncBuffer{}
	conf := logical.TestBackendConfig()
	conf.StorageView = &logical.InmemStorage{}
	conf.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: logs})
	events := logical.NewMockEventSender()
	conf.EventsSender = events
	b := newBackend()
	clock := &testClock{}
	b.now = clock.Now
	// The scheduler sleeps on the test clock: a pass that waits for the
	// budget moves the clock on instead of the test waiting in real time.
	b.after = clock.after
	sim.SetClock(clock.Now)
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	// The scheduler is there, as in Vault, but runs only when a test runs
	// a pass (drain): a loop working the schedule behind a test's back, on
	// real timers, would make the test's outcome depend on when it ran.
	// Tests of the loop itself start it with a timer they fire
	// (startLoop).
	b.background.Hold(conf.StorageView)
	t.Cleanup(func() { b.Cleanup(context.Background()) })
	account := cloudflaresim.NewID()
	env := &testEnv{
		t:       t,
		b:       b,
		storage: conf.StorageView,
		sim:     sim,
		simURL:  srv.URL + cloudflaresim.BasePath,
		token:   sim.AddToken(cloudflaresim.Token{}),
		account: account,
		tunnel:  sim.AddTunnel(account, cloudflaresim.Tunnel{}),
		logs:    logs,
		clock:   clock,
		events:  events,
		sent:    sent,
	}
	t.Cleanup(env.assertNoSecretsLogged)
	return env
}

// newConfiguredEnv is newTestEnv with config written.
func newConfiguredEnv(t *testing.T) *testEnv {
	env := newTestEnv(t)
	resp, err := env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token":       env.token.Value,
		"base_url":        env.simURL,
		"request_timeout": "2s",
	})
	mustSucceed(t, resp, err)
	return env
}

func (e *testEnv) request(op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	e.t.Helper()
	req := &logical.Request{Operation: op, Path: path, Data: data, Storage: e.storage}
	if op == logical.UpdateOperation || op == logical.CreateOperation {
		// As Vault does: create or update by the existence check, where the
		// path has one; update otherwise.
		checkFound, exists, err := e.b.HandleExistenceCheck(context.Background(), req)
		if err != nil {
			return nil, err
		}
		req.Operation = logical.UpdateOperation
		if checkFound && !exists {
			req.Operation = logical.CreateOperation
		}
	}
	return e.b.HandleRequest(context.Background(), req)
}

func (e *testEnv) pskPath() string  { return "psk/" + e.account + "/" + e.tunnel.ID }
func (e *testEnv) metaPath() string { return "metadata/" + e.account + "/" + e.tunnel.ID }

// generations counts the keys the edge generated for the test tunnel after
// the one it was created with (Cloudflare creates every tunnel with a key).
func (e *testEnv) generations() int { return len(e.edge().GeneratedPSKs) - 1 }

func (e *testEnv) edge() cloudflaresim.Tunnel {
	tun, ok := e.sim.Tunnel(e.account, e.tunnel.ID)
	if !ok {
		e.t.Fatalf("tunnel %s vanished from the simulator", e.tunnel.ID)
	}
	return tun
}

// storageSnapshot returns every storage key with its value, to prove that a
// refused request changed nothing. The record of Cloudflare's rate-limit
// block is left out: it is what Cloudflare said (a 429), not a change the
// request made, and a request refused before any call cannot write it. So is
// the census (store.CensusKey, and its lists under store.CensusListedPrefix):
// the background's count of what is stored, written by a scheduler pass on
// its own clock; what it counts, the records, is in the snapshot.
func (e *testEnv) storageSnapshot() map[string]string {
	e.t.Helper()
	snap := map[string]string{}
	var walk func(prefix string)
	walk = func(prefix string) {
		keys, err := e.storage.List(context.Background(), prefix)
		if err != nil {
			e.t.Fatal(err)
		}
		for _, k := range keys {
			if strings.HasSuffix(k, "/") {
				walk(prefix + k)
				continue
			}
			if prefix+k == store.RateLimitKey || prefix+k == store.CensusKey || strings.HasPrefix(prefix+k, store.CensusListedPrefix) {
				continue
			}
			entry, err := e.storage.Get(context.Background(), prefix+k)
			if err != nil {
				e.t.Fatal(err)
			}
			snap[prefix+k] = string(entry.Value)
		}
	}
	walk("")
	return snap
}

// assertNoSecretsLogged fails the test if any key the simulator ever
// generated or took (any tunnel's), any token it issued, any key the engine
// sent in a Set request (applied or not: a key Vault made that the edge
// refused, a validation's, one whose request never got an answer), or any
// key storage holds (a pending key never sent), reached the backend's log.
func (e *testEnv) assertNoSecretsLogged() {
	logs := e.logs.String()
	if e.token.Value != "" && strings.Contains(logs, e.token.Value) {
		e.t.Error("the API token appears in the backend's log")
	}
	if tun, ok := e.sim.Tunnel(e.account, e.tunnel.ID); ok {
		for _, psk := range tun.GeneratedPSKs {
			if strings.Contains(logs, psk) {
				e.t.Error("a PSK appears in the backend's log")
			}
		}
	}
	for _, secret := range e.sim.IssuedSecrets() {
		if secret != "" && strings.Contains(logs, secret) {
			e.t.Error("a key or token the simulator issued appears in the backend's log")
		}
	}
	for _, psk := range e.sent.all() {
		if psk != "" && strings.Contains(logs, psk) {
			e.t.Error("a key the engine sent in a Set request appears in the backend's log")
		}
	}
	for _, psk := range e.storedKeys() {
		if strings.Contains(logs, psk) {
			e.t.Error("a key stored in Vault (current or pending) appears in the backend's log")
		}
	}
}

// storedKeys is every key storage holds: each record's stored and pending
// key. Entries that are not records decode to none.
func (e *testEnv) storedKeys() []string {
	var keys []string
	var walk func(prefix string)
	walk = func(prefix string) {
		names, err := e.storage.List(context.Background(), prefix)
		if err != nil {
			return // best effort, after the test
		}
		for _, name := range names {
			if strings.HasSuffix(name, "/") {
				walk(prefix + name)
				continue
			}
			entry, err := e.storage.Get(context.Background(), prefix+name)
			if err != nil || entry == nil {
				continue
			}
			var rec struct {
				PSK        string `json:"psk"`
				PendingPSK string `json:"pending_psk"`
			}
			if json.Unmarshal(entry.Value, &rec) != nil {
				continue
			}
			for _, k := range []string{rec.PSK, rec.PendingPSK} {
				if k != "" {
					keys = append(keys, k)
				}
			}
		}
	}
	walk("")
	return keys
}

// sentKeys records every key a Set request to the simulator carried,
// whatever became of it, so that the log check covers keys Vault made that
// the edge never took.
type sentKeys struct {
	mu   sync.Mutex
	keys []string
}

// wrap passes every request to next, having noted the keys of a Set
// request (POST .../ipsec_tunnels/psk) first.
func (k *sentKeys) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/ipsec_tunnels/psk") {
			body, err := io.ReadAll(r.Body)
			var set struct {
				PSKs []struct {
					PSK string `json:"psk"`
				} `json:"psks"`
			}
			if err == nil && json.Unmarshal(body, &set) == nil {
				k.mu.Lock()
				for _, p := range set.PSKs {
					k.keys = append(k.keys, p.PSK)
				}
				k.mu.Unlock()
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		next.ServeHTTP(w, r)
	})
}

func (k *sentKeys) all() []string {
	if k == nil {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.keys...)
}

func mustSucceed(t *testing.T, resp *logical.Response, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("unexpected error: %v", err)
	}
	if resp != nil && resp.IsError() {
		t.Fatalf("unexpected error response: %v", resp.Error())
	}
}

// must fails the test unless the request succeeded, and returns its response.
func (e *testEnv) must(resp *logical.Response, err error) *logical.Response {
	e.t.Helper()
	mustSucceed(e.t, resp, err)
	return resp
}

// httpStatus is the status Vault would answer with for a handler's result.
func httpStatus(resp *logical.Response, err error) int {
	if err != nil {
		var coded logical.HTTPCodedError
		switch {
		case errors.As(err, &coded):
			return coded.Code()
		case errors.As(err, new(errutil.UserError)):
			return http.StatusBadRequest // Vault's answer to a failed existence-check validation
		case errors.Is(err, logical.ErrUnsupportedOperation):
			return http.StatusMethodNotAllowed
		case errors.Is(err, logical.ErrUnsupportedPath):
			return http.StatusNotFound
		}
		return http.StatusInternalServerError
	}
	if resp != nil && resp.IsError() {
		return http.StatusBadRequest
	}
	if resp == nil {
		return http.StatusNoContent
	}
	return http.StatusOK
}

func errorText(resp *logical.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	if resp != nil && resp.IsError() {
		return resp.Error().Error()
	}
	return ""
}

func responseJSON(t *testing.T, resp *logical.Response) string {
	t.Helper()
	if resp == nil {
		return ""
	}
	b, err := json.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestInvalidateDropsTheCachedClient plays what a performance standby sees:
// config changes in storage underneath the mount, and Vault calls Invalidate.
func TestInvalidateDropsTheCachedClient(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	newToken := env.sim.AddToken(cloudflaresim.Token{})
	cfg, err := mount.ReadConfig(context.Background(), env.storage)
	if err != nil {
		t.Fatal(err)
	}
	cfg.APIToken = newToken.Value
	entry, err := logical.StorageEntryJSON(mount.ConfigKey, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := env.storage.Put(context.Background(), entry); err != nil {
		t.Fatal(err)
	}
	env.sim.SetTokenStatus(env.token.Value, "disabled")

	// The cached client still holds the old, now disabled, token.
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusBadRequest {
		t.Fatalf("rotation with the disabled cached token: status %d, want 400", httpStatus(resp, err))
	}
	env.b.Invalidate(context.Background(), mount.ConfigKey)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
}

func TestEveryPathHasHelp(t *testing.T) {
	b := newBackend()
	for _, p := range b.Paths {
		if strings.TrimSpace(p.HelpSynopsis) == "" || strings.TrimSpace(p.HelpDescription) == "" {
			t.Errorf("path %q lacks help", p.Pattern)
		}
		if p.DisplayAttrs == nil || p.DisplayAttrs.OperationPrefix != operationPrefix {
			t.Errorf("path %q lacks DisplayAttrs with the operation prefix", p.Pattern)
		}
		for op, h := range p.Operations {
			props := h.Properties()
			writes := op != logical.ReadOperation && op != logical.ListOperation
			if writes && (!props.ForwardPerformanceStandby || !props.ForwardPerformanceSecondary) {
				t.Errorf("%s %q is not forwarded to the active node", op, p.Pattern)
			}
		}
	}
}

// TestBadFieldsAreRefusedBeforeCloudflare covers every writable field: each
// bad value is a 400 that names the field, with no Cloudflare call and no
// storage change. Bad identifiers have their own table above.
func TestBadFieldsAreRefusedBeforeCloudflare(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	calls := env.sim.TotalCalls()
	before := env.storageSnapshot()

	cases := []struct {
		name string
		path string
		data map[string]any
		want string
	}{
		{"api_token too long", "config", map[string]any{"api_token": strings.Repeat("x", 300)}, "api_token must be at most 256 printable ASCII characters"},
		{"api_token with a space", "config", map[string]any{"api_token": "abc def"}, "api_token must be at most 256 printable ASCII characters"},
		{"api_token with a newline", "config", map[string]any{"api_token": "abc\ndef"}, "api_token must be at most 256 printable ASCII characters"},
		{"api_token empty", "config", map[string]any{"api_token": ""}, "api_token is required"},
		{"base_url empty", "config", map[string]any{"base_url": ""}, "base_url \"\" is not an absolute URL"},
		{"base_url huge", "config", map[string]any{"base_url": "https://" + strings.Repeat("a", 3000)}, "base_url must be at most 2048 characters"},
		{"base_url plain http to a private address", "config", map[string]any{"base_url": "http://10.0.0.1/client/v4"}, "plain http"},
		{"base_url with a query", "config", map[string]any{"base_url": "https://api.cloudflare.com/client/v4?x=1"}, "must not carry credentials, a query or a fragment"},
		{"request_timeout not a duration", "config", map[string]any{"request_timeout": "soon"}, "request_timeout"},
		{"request_timeout negative", "config", map[string]any{"request_timeout": "-5s"}, `field "request_timeout": cannot provide negative value`},
		{"request_timeout too long", "config", map[string]any{"request_timeout": "6m"}, "request_timeout must be between 1s and 5m0s"},
		{"heal_stale_psk not a bool", "config", map[string]any{"heal_stale_psk": "maybe"}, "heal_stale_psk"},
		{"token_account_id malformed", "config", map[string]any{"token_account_id": "../" + env.account}, "token_account_id must be a Cloudflare identifier"},
		{"config: unknown field", "config", map[string]any{"api_tokn": "x"}, "unknown field(s) api_tokn: this path takes"},
		{"config: rate_limited_until is read-only", "config", map[string]any{"rate_limited_until": ""}, "unknown field(s) rate_limited_until"},
		{"config: base_url changed without api_token", "config", map[string]any{"base_url": "https://api.cloudflare.com/client/v4"}, "changing base_url requires api_token in the same write"},
		{"config: token_account_id changed without api_token", "config", map[string]any{"token_account_id": env.account}, "changing token_account_id requires api_token in the same write"},
		{"psk: validate_only not a bool", env.pskPath(), map[string]any{"validate_only": "maybe"}, "validate_only"},
		{"psk: validate_only with rotation_period", env.pskPath(), map[string]any{"validate_only": true, "rotation_period": "24h"}, "validate_only=true cannot be combined with rotation_period"},
		{"psk: validate_only with rotation_period 0", env.pskPath(), map[string]any{"validate_only": true, "rotation_period": 0}, "validate_only=true cannot be combined with rotation_period"},
		{"psk: validate_only with rotation_schedule", env.pskPath(), map[string]any{"validate_only": true, "rotation_schedule": "0 2 * * 6"}, "validate_only=true cannot be combined with rotation_period, rotation_schedule or rotation_window"},
		{"psk: rotation_period with rotation_schedule", env.pskPath(), map[string]any{"rotation_period": "24h", "rotation_schedule": "0 2 * * 6"}, "rotation_period and rotation_schedule are exclusive"},
		{"psk: rotation_period 0 with rotation_schedule", env.pskPath(), map[string]any{"rotation_period": 0, "rotation_schedule": "0 2 * * 6"}, "rotation_period and rotation_schedule are exclusive"},
		{"psk: rotation_period too short", env.pskPath(), map[string]any{"rotation_period": "30s"}, "rotation_period must be 0 (off) or at least 1h0m0s, the engine's min_rotation_period"},
		{"psk: rotation_period not a duration", env.pskPath(), map[string]any{"rotation_period": "monthly"}, "rotation_period"},
		{"psk: rotation_schedule not cron", env.pskPath(), map[string]any{"rotation_schedule": "saturdays at two"}, "rotation_schedule must be a standard cron expression of five fields"},
		{"psk: rotation_schedule with six fields", env.pskPath(), map[string]any{"rotation_schedule": "0 0 2 * * 6"}, "rotation_schedule must be a standard cron expression of five fields"},
		{"psk: rotation_schedule out of range", env.pskPath(), map[string]any{"rotation_schedule": "0 25 * * *"}, "rotation_schedule must be a standard cron expression of five fields"},
		{"psk: rotation_schedule in a zone", env.pskPath(), map[string]any{"rotation_schedule": "CRON_TZ=Mars/Olympus 0 2 * * 6"}, "rotation_schedule is in UTC and takes no time zone"},
		// The cron parser panics on a zone with no fields after it: a
		// reviewer's sequence that took the plugin process down.
		{"psk: rotation_schedule only a zone", env.pskPath(), map[string]any{"rotation_schedule": "CRON_TZ=UTC"}, "rotation_schedule is in UTC and takes no time zone"},
		{"psk: rotation_schedule only a TZ", env.pskPath(), map[string]any{"rotation_schedule": "TZ=UTC"}, "rotation_schedule is in UTC and takes no time zone"},
		{"psk: rotation_schedule every 30s", env.pskPath(), map[string]any{"rotation_schedule": "@every 30s"}, "rotation_schedule must not fall due more often than every 1m0s"},
		{"psk: rotation_schedule never due", env.pskPath(), map[string]any{"rotation_schedule": "0 0 30 2 *"}, "rotation_schedule never falls due"},
		{"psk: rotation_window without rotation_schedule", env.pskPath(), map[string]any{"rotation_window": "1h"}, "rotation_window is only taken with a rotation_schedule"},
		{"psk: rotation_window with rotation_period", env.pskPath(), map[string]any{"rotation_period": "24h", "rotation_window": "1h"}, "rotation_window is only taken with a rotation_schedule"},
		{"psk: rotation_window with rotation_schedule off", env.pskPath(), map[string]any{"rotation_schedule": "", "rotation_window": "1h"}, "rotation_window is only taken with a rotation_schedule"},
		{"psk: rotation_window too short", env.pskPath(), map[string]any{"rotation_schedule": "0 2 * * 6", "rotation_window": "30s"}, "rotation_window must be 0 (none) or at least 1m0s"},
		{"psk: rotation_window negative", env.pskPath(), map[string]any{"rotation_schedule": "0 2 * * 6", "rotation_window": "-1h"}, `field "rotation_window": cannot provide negative value`},
		{"psk: rotation_window not a duration", env.pskPath(), map[string]any{"rotation_schedule": "0 2 * * 6", "rotation_window": "a while"}, "rotation_window"},
		{"psk: a key of one's own", env.pskPath(), map[string]any{"psk": "chosen-by-hand"}, "unknown field(s) psk"},
		{"schedule: no schedule field", env.pskPath() + "/schedule", map[string]any{}, "give rotation_period or rotation_schedule"},
		{"schedule: rotation_period with rotation_schedule", env.pskPath() + "/schedule", map[string]any{"rotation_period": "24h", "rotation_schedule": "0 2 * * 6"}, "rotation_period and rotation_schedule are exclusive"},
		{"schedule: rotation_period too short", env.pskPath() + "/schedule", map[string]any{"rotation_period": "30s"}, "rotation_period must be 0 (off) or at least 1h0m0s, the engine's min_rotation_period"},
		{"schedule: rotation_schedule not cron", env.pskPath() + "/schedule", map[string]any{"rotation_schedule": "weekly"}, "rotation_schedule must be a standard cron expression of five fields"},
		{"schedule: rotation_window without rotation_schedule", env.pskPath() + "/schedule", map[string]any{"rotation_window": "1h"}, "rotation_window is only taken with a rotation_schedule"},
		{"schedule: rotation_window too short", env.pskPath() + "/schedule", map[string]any{"rotation_schedule": "0 2 * * 6", "rotation_window": "10s"}, "rotation_window must be 0 (none) or at least 1m0s"},
		{"schedule: validate_only is not taken", env.pskPath() + "/schedule", map[string]any{"rotation_period": "24h", "validate_only": true}, "unknown field(s) validate_only"},
		{"schedule: a key of one's own", env.pskPath() + "/schedule", map[string]any{"rotation_period": "24h", "psk": "chosen-by-hand"}, "unknown field(s) psk"},
		{"schedule: malformed tunnel", "psk/" + env.account + "/xyz/schedule", map[string]any{"rotation_period": "24h"}, "tunnel must be a Cloudflare identifier"},
		{"psk: unknown field", env.pskPath(), map[string]any{"validateonly": true}, "unknown field(s) validateonly"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := env.request(logical.UpdateOperation, tc.path, tc.data)
			if got := httpStatus(resp, err); got != http.StatusBadRequest {
				t.Fatalf("status = %d, want 400 (%s)", got, errorText(resp, err))
			}
			msg := errorText(resp, err)
			if !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not say %q", msg, tc.want)
			}
			if strings.Contains(msg, env.token.Value) {
				t.Error("the error repeats the API token")
			}
		})
	}
	if n := env.sim.TotalCalls() - calls; n != 0 {
		t.Errorf("bad fields reached Cloudflare %d times", n)
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("bad fields changed storage")
	}
}
