package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
}

// testClock is the backend's clock in tests: real time plus an offset that a
// test moves forward to pass settle windows and rate-limit blocks.
type testClock struct {
	mu     sync.Mutex
	offset time.Duration
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.offset)
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
	srv := httptest.NewServer(sim)
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
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	// The scheduler runs in every test, as it does in Vault, so that each
	// test also proves the scheduler does not disturb it.
	if err := b.Initialize(context.Background(), &logical.InitializationRequest{Storage: conf.StorageView}); err != nil {
		t.Fatal(err)
	}
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
func (e *testEnv) edge() cloudflaresim.Tunnel {
	tun, ok := e.sim.Tunnel(e.account, e.tunnel.ID)
	if !ok {
		e.t.Fatalf("tunnel %s vanished from the simulator", e.tunnel.ID)
	}
	return tun
}

// storageSnapshot returns every storage key with its value, to prove that a
// refused request changed nothing.
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
// generated, or the API token, reached the backend's log.
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
		"token_account_id": strings.ToUpper(env.account),
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

func TestRotateStoresTheEdgesKeyAndAnswersWithMetadataOnly(t *testing.T) {
	env := newConfiguredEnv(t)

	for version := 1; version <= 3; version++ {
		write, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
		mustSucceed(t, write, err)
		if _, ok := write.Data["psk"]; ok {
			t.Fatal("the write response carries the psk")
		}
		edge := env.edge()
		if strings.Contains(responseJSON(t, write), edge.PSK) {
			t.Fatal("the write response contains the key")
		}

		read, err := env.request(logical.ReadOperation, env.pskPath(), nil)
		mustSucceed(t, read, err)
		if read.Data["psk"] != edge.PSK {
			t.Fatalf("stored psk differs from the edge's after rotation %d", version)
		}
		want := map[string]any{
			"account_id":        env.account,
			"tunnel_id":         env.tunnel.ID,
			"version":           version,
			"last_generated_on": edge.PSKGeneratedOn.Format(time.RFC3339Nano),
		}
		for k, v := range want {
			if read.Data[k] != v {
				t.Errorf("read %s = %v, want %v", k, read.Data[k], v)
			}
			if write.Data[k] != v {
				t.Errorf("write response %s = %v, want %v", k, write.Data[k], v)
			}
		}
		if read.Data["stored_at"] == "" {
			t.Error("stored_at is empty")
		}

		meta, err := env.request(logical.ReadOperation, env.metaPath(), nil)
		mustSucceed(t, meta, err)
		if _, ok := meta.Data["psk"]; ok || strings.Contains(responseJSON(t, meta), edge.PSK) {
			t.Fatal("metadata shows the key")
		}
		for k, v := range read.Data {
			if k != "psk" && meta.Data[k] != v {
				t.Errorf("metadata %s = %v, read says %v", k, meta.Data[k], v)
			}
		}
	}
	if got := len(env.edge().GeneratedPSKs); got != 3 {
		t.Errorf("edge generated %d keys, want 3", got)
	}
}

func TestIdentifiersAreCaseInsensitiveAndStoredLowerCase(t *testing.T) {
	env := newConfiguredEnv(t)
	upper := "psk/" + strings.ToUpper(env.account) + "/" + strings.ToUpper(env.tunnel.ID)
	env.must(env.request(logical.CreateOperation, upper, nil))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	read, err := env.request(logical.ReadOperation, upper, nil)
	mustSucceed(t, read, err)
	if read.Data["version"] != 2 || read.Data["tunnel_id"] != env.tunnel.ID {
		t.Fatalf("upper- and lower-case writes did not share one record: %v", read.Data)
	}
	list, err := env.request(logical.ListOperation, "psk/"+strings.ToUpper(env.account)+"/", nil)
	mustSucceed(t, list, err)
	if keys := list.Data["keys"].([]string); len(keys) != 1 || keys[0] != env.tunnel.ID {
		t.Fatalf("tunnels listed = %v, want [%s]", keys, env.tunnel.ID)
	}
}

func TestBadIdentifiersAreRefusedBeforeCloudflare(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	callsBefore := env.sim.TotalCalls()
	before := env.storageSnapshot()

	good := env.account
	bad := map[string]string{
		"too short":        good[:31],
		"too long":         good + "0",
		"not hex":          "g" + good[1:],
		"dashes":           good[:8] + "-" + good[9:],
		"dot dot":          "..",
		"encoded slash":    good[:16] + "%2F" + good[19:],
		"unicode":          strings.Repeat("é", 16),
		"huge":             strings.Repeat("a", 4096),
		"space":            good[:31] + " ",
		"hex with 0x":      "0x" + good[2:],
		"upper non-hex":    strings.ToUpper("z" + good[1:]),
		"pure punctuation": strings.Repeat("*", 32),
	}
	type target struct {
		op   logical.Operation
		path func(id string) []string
	}
	targets := []target{
		{logical.UpdateOperation, func(id string) []string {
			return []string{"psk/" + id + "/" + env.tunnel.ID, "psk/" + env.account + "/" + id}
		}},
		{logical.ReadOperation, func(id string) []string {
			return []string{"psk/" + id + "/" + env.tunnel.ID, "psk/" + env.account + "/" + id, "metadata/" + id + "/" + env.tunnel.ID}
		}},
		{logical.DeleteOperation, func(id string) []string {
			return []string{"psk/" + id + "/" + env.tunnel.ID, "psk/" + env.account + "/" + id}
		}},
		{logical.ListOperation, func(id string) []string { return []string{"psk/" + id + "/", "metadata/" + id + "/"} }},
	}
	for name, id := range bad {
		for _, tg := range targets {
			for _, path := range tg.path(id) {
				t.Run(fmt.Sprintf("%s %s %s", name, tg.op, path[:min(len(path), 24)]), func(t *testing.T) {
					resp, err := env.request(tg.op, path, nil)
					if got := httpStatus(resp, err); got != http.StatusBadRequest {
						t.Fatalf("status = %d, want 400 (%s)", got, errorText(resp, err))
					}
					if msg := errorText(resp, err); !strings.Contains(msg, "must be a Cloudflare identifier: 32 hexadecimal characters") {
						t.Errorf("error %q does not say what an id must be", msg)
					}
				})
			}
		}
	}
	if env.sim.TotalCalls() != callsBefore {
		t.Errorf("Cloudflare was called %d times for bad ids", env.sim.TotalCalls()-callsBefore)
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("bad ids changed storage")
	}
}

func TestValidateOnlyStoresNothing(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	before := env.storageSnapshot()
	edgeBefore := env.edge()

	resp, err := env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"validate_only": true})
	mustSucceed(t, resp, err)
	if resp.Data["validate_only"] != true || resp.Data["stored"] != false {
		t.Fatalf("validate_only response = %v, want validate_only=true stored=false", resp.Data)
	}
	if _, ok := resp.Data["psk"]; ok {
		t.Fatal("validate_only response carries a psk")
	}
	if env.sim.Calls(cloudflaresim.OpPSKGenerate) != 2 {
		t.Fatalf("psk_generate calls = %d, want 2", env.sim.Calls(cloudflaresim.OpPSKGenerate))
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("validate_only changed storage")
	}
	if edge := env.edge(); edge.PSK != edgeBefore.PSK {
		t.Error("validate_only changed the edge's key")
	}
}

func TestCloudflareFailuresAreReportedAndStoreNothing(t *testing.T) {
	cases := []struct {
		name       string
		fault      *cloudflaresim.Fault
		path       func(e *testEnv) string
		wantStatus int
		want       []string
		// unknown: Cloudflare may have generated a key, so the record must
		// say rotation_unknown instead of staying as it was.
		unknown bool
	}{
		{name: "unknown tunnel", path: func(e *testEnv) string { return "psk/" + e.account + "/" + cloudflaresim.NewID() },
			wantStatus: 400, want: []string{"cloudflare generate psk", "HTTP 404", "code 1002", "ipsec tunnel not found"}},
		{name: "token lacks the account", path: func(e *testEnv) string {
			other := cloudflaresim.NewID()
			return "psk/" + other + "/" + e.sim.AddTunnel(other, cloudflaresim.Tunnel{}).ID
		}, wantStatus: 0, want: nil},
		{name: "forbidden", fault: &cloudflaresim.Fault{Status: 403, Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}},
			wantStatus: 400, want: []string{"HTTP 403", "code 10000", "Authentication error"}},
		{name: "rate limited", fault: &cloudflaresim.Fault{Status: 429, RetryAfter: 300},
			wantStatus: 429, want: []string{"HTTP 429", "code 971", "retry after 5m0s"}},
		{name: "server error", fault: &cloudflaresim.Fault{Status: 503, Errors: []cloudflaresim.Message{{Code: 1000, Message: "service unavailable"}}},
			wantStatus: 502, want: []string{"HTTP 503", "code 1000", "service unavailable"}, unknown: true},
		{name: "success false under 200", fault: &cloudflaresim.Fault{SuccessFalse: true, Errors: []cloudflaresim.Message{{Code: 1015, Message: "tunnel is being modified"}}},
			wantStatus: 502, want: []string{`HTTP 200 with "success": false`, "code 1015"}, unknown: true},
		{name: "malformed body", fault: &cloudflaresim.Fault{Body: `{"success": true, "result": {"psk": "abc`},
			wantStatus: 502, want: []string{"malformed answer", "not a JSON envelope"}, unknown: true},
		{name: "envelope without success", fault: &cloudflaresim.Fault{Body: `{"result": {}}`},
			wantStatus: 502, want: []string{"malformed answer", `no "success" field`}, unknown: true},
		{name: "success without a key", fault: &cloudflaresim.Fault{Body: `{"success": true, "errors": [], "messages": [], "result": {}}`},
			wantStatus: 502, want: []string{"malformed answer", "has no psk"}, unknown: true},
		{name: "hangs past the timeout", fault: &cloudflaresim.Fault{Delay: 5 * time.Second},
			wantStatus: 504, want: []string{"cloudflare generate psk", "deadline exceeded"}, unknown: true},
		{name: "connection dropped", fault: &cloudflaresim.Fault{Hangup: true},
			wantStatus: 502, want: []string{"cloudflare generate psk", "EOF"}, unknown: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			if tc.name == "token lacks the account" {
				env.token = env.sim.AddToken(cloudflaresim.Token{Accounts: []string{env.account}})
				env.must(env.request(logical.UpdateOperation, "config", map[string]any{"api_token": env.token.Value}))
				tc.wantStatus, tc.want = 400, []string{"HTTP 403", "code 10000", "Authentication error"}
			}
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			before := env.storageSnapshot()
			path := env.pskPath()
			if tc.path != nil {
				path = tc.path(env)
			}
			if tc.fault != nil {
				env.sim.FailNext(cloudflaresim.OpPSKGenerate, *tc.fault)
			}
			resp, err := env.request(logical.UpdateOperation, path, nil)
			if got := httpStatus(resp, err); got != tc.wantStatus {
				t.Fatalf("status = %d, want %d (%s)", got, tc.wantStatus, errorText(resp, err))
			}
			msg := errorText(resp, err)
			for _, want := range append(tc.want, "tunnel ") {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q does not say %q", msg, want)
				}
			}
			if strings.Contains(msg, env.token.Value) {
				t.Error("the error contains the API token")
			}
			if !tc.unknown {
				if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
					t.Error("a refused rotation changed storage")
				}
				return
			}
			if !strings.Contains(msg, "outcome is unknown") {
				t.Errorf("error %q does not say the outcome is unknown", msg)
			}
			meta := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
			if meta.Data["state"] != stateRotationUnknown || meta.Data["version"] != 1 {
				t.Errorf("after an unknown outcome metadata says state %v version %v", meta.Data["state"], meta.Data["version"])
			}
		})
	}
}

func TestDeleteForgetsTheKeyButLeavesTheTunnel(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	edgeBefore := env.edge()
	calls := env.sim.TotalCalls()

	env.must(env.request(logical.DeleteOperation, env.pskPath(), nil))
	if resp, err := env.request(logical.ReadOperation, env.pskPath(), nil); resp != nil || err != nil {
		t.Fatalf("read after delete = %v, %v; want 404", resp, err)
	}
	if resp, err := env.request(logical.ReadOperation, env.metaPath(), nil); resp != nil || err != nil {
		t.Fatalf("metadata after delete = %v, %v; want 404", resp, err)
	}
	if env.sim.TotalCalls() != calls {
		t.Error("delete called Cloudflare")
	}
	if edge := env.edge(); edge.PSK != edgeBefore.PSK || len(edge.GeneratedPSKs) != 1 {
		t.Error("delete changed the tunnel at Cloudflare")
	}
	// The next rotation starts a new record at version 1.
	resp, err := env.request(logical.CreateOperation, env.pskPath(), nil)
	mustSucceed(t, resp, err)
	if resp.Data["version"] != 1 {
		t.Errorf("version after delete and rotate = %v, want 1", resp.Data["version"])
	}
}

func TestListAccountsAndTunnels(t *testing.T) {
	env := newConfiguredEnv(t)
	otherAccount := cloudflaresim.NewID()
	tunnels := []string{env.tunnel.ID}
	for i := 0; i < 2; i++ {
		tunnels = append(tunnels, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID)
	}
	otherTunnel := env.sim.AddTunnel(otherAccount, cloudflaresim.Tunnel{}).ID
	for _, id := range tunnels {
		env.must(env.request(logical.UpdateOperation, "psk/"+env.account+"/"+id, nil))
	}
	env.must(env.request(logical.UpdateOperation, "psk/"+otherAccount+"/"+otherTunnel, nil))

	for _, prefix := range []string{"psk/", "metadata/"} {
		accounts, err := env.request(logical.ListOperation, prefix, nil)
		mustSucceed(t, accounts, err)
		if got := fmt.Sprint(accounts.Data["keys"]); got != fmt.Sprint(sorted(env.account+"/", otherAccount+"/")) {
			t.Errorf("LIST %s = %s", prefix, got)
		}
		listed, err := env.request(logical.ListOperation, prefix+env.account+"/", nil)
		mustSucceed(t, listed, err)
		if got := fmt.Sprint(listed.Data["keys"]); got != fmt.Sprint(sorted(tunnels...)) {
			t.Errorf("LIST %s%s/ = %s, want %v", prefix, env.account, got, sorted(tunnels...))
		}
	}
}

func sorted(s ...string) []string {
	out := append([]string(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

// TestConcurrentRotationsLeaveVaultWithTheEdgesKey runs many writers and
// readers on one tunnel: afterwards Vault must hold the key the edge uses,
// every rotation must have been counted, and no reader may ever see a key
// the edge never had.
func TestConcurrentRotationsLeaveVaultWithTheEdgesKey(t *testing.T) {
	env := newConfiguredEnv(t)
	const writers, readers, readsEach = 32, 8, 25

	var wg sync.WaitGroup
	errs := make(chan string, writers+readers*readsEach)
	seen := make(chan string, readers*readsEach)
	for i := 0; i < writers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			if err != nil || resp.IsError() {
				errs <- errorText(resp, err)
			}
		}()
	}
	for i := 0; i < readers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < readsEach; j++ {
				resp, err := env.request(logical.ReadOperation, env.pskPath(), nil)
				if (resp == nil && err == nil) || httpStatus(resp, err) == http.StatusNotFound {
					continue // the first key is not stored yet
				}
				if err != nil {
					errs <- err.Error()
					continue
				}
				if state := resp.Data["state"]; state != stateCurrent && len(resp.Warnings) == 0 {
					errs <- fmt.Sprintf("state %v without a warning", state)
				}
				seen <- resp.Data["psk"].(string)
			}
		}()
	}
	wg.Wait()
	close(errs)
	close(seen)
	for e := range errs {
		t.Errorf("concurrent request failed: %s", e)
	}

	edge := env.edge()
	read, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	mustSucceed(t, read, err)
	if read.Data["psk"] != edge.PSK {
		t.Fatal("after concurrent rotations Vault holds a key the edge no longer uses")
	}
	if read.Data["version"] != writers || len(edge.GeneratedPSKs) != writers {
		t.Errorf("version = %v, edge generations = %d, want %d each", read.Data["version"], len(edge.GeneratedPSKs), writers)
	}
	real := map[string]bool{}
	for _, k := range edge.GeneratedPSKs {
		real[k] = true
	}
	for k := range seen {
		if !real[k] {
			t.Fatal("a reader saw a key the edge never had")
		}
	}
}

// TestInvalidateDropsTheCachedClient plays what a performance standby sees:
// config changes in storage underneath the mount, and Vault calls Invalidate.
func TestInvalidateDropsTheCachedClient(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	newToken := env.sim.AddToken(cloudflaresim.Token{})
	cfg, err := readConfig(context.Background(), env.storage)
	if err != nil {
		t.Fatal(err)
	}
	cfg.APIToken = newToken.Value
	entry, err := logical.StorageEntryJSON(configStorageKey, cfg)
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
	env.b.Invalidate(context.Background(), configStorageKey)
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
		{"psk: validate_only not a bool", env.pskPath(), map[string]any{"validate_only": "maybe"}, "validate_only"},
		{"psk: a key of one's own", env.pskPath(), map[string]any{"psk": "chosen-by-hand"}, "unknown field(s) psk"},
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
