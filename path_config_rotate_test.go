package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
)

// storedToken is the token value in the mount's stored config.
func storedToken(t *testing.T, env *testEnv) string {
	t.Helper()
	cfg, err := mount.ReadConfig(context.Background(), env.storage)
	if err != nil || cfg == nil {
		t.Fatalf("read config: %v", err)
	}
	return cfg.APIToken
}

func TestRotateRootRollsStoresAndVerifies(t *testing.T) {
	for _, accountOwned := range []bool{false, true} {
		name := "user token"
		if accountOwned {
			name = "account-owned token"
		}
		t.Run(name, func(t *testing.T) {
			env := newTestEnv(t)
			data := map[string]any{"base_url": env.simURL}
			if accountOwned {
				env.token = env.sim.AddToken(cloudflaresim.Token{OwnerAccount: env.account})
				data["token_account_id"] = env.account
			}
			data["api_token"] = env.token.Value
			env.must(env.request(logical.UpdateOperation, "config", data))
			old := env.token.Value

			resp := env.must(env.request(logical.UpdateOperation, "config/rotate-root", nil))
			rolled, _ := env.sim.TokenByID(env.token.ID)
			if rolled.Value == old || storedToken(t, env) != rolled.Value {
				t.Fatal("the stored token is not the rolled value")
			}
			if resp.Data["token_id"] != env.token.ID || resp.Data["last_rotated"] == "" || resp.Data["token_status"] != "active" {
				t.Errorf("rotate-root answer = %v", resp.Data)
			}
			for _, v := range []string{old, rolled.Value} {
				if strings.Contains(responseJSON(t, resp), v) {
					t.Error("the rotate-root answer contains a token value")
				}
			}
			cfg := env.must(env.request(logical.ReadOperation, "config", nil))
			if cfg.Data["last_rotated"] != resp.Data["last_rotated"] {
				t.Errorf("config last_rotated = %v, rotate-root said %v", cfg.Data["last_rotated"], resp.Data["last_rotated"])
			}
			// The old value is dead at Cloudflare; the engine works on with the new one.
			if _, ok := env.sim.TokenByID(env.token.ID); !ok {
				t.Fatal("token vanished")
			}
			env.token.Value = rolled.Value // for the log check
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			if strings.Contains(env.logs.String(), old) {
				t.Error("the old token value reached the log")
			}
		})
	}
}

func TestRotateRootFailures(t *testing.T) {
	cases := []struct {
		name       string
		fault      *cloudflaresim.Fault
		failStore  bool
		wantStatus int
		want       string
		// rolled: whether Cloudflare rolled the token despite the failure.
		rolled bool
	}{
		{name: "refused", fault: &cloudflaresim.Fault{Status: 403, Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}},
			wantStatus: 400, want: "code 10000"},
		{name: "answer lost after the roll", fault: &cloudflaresim.Fault{Hangup: true, AfterCommit: true},
			wantStatus: 502, want: "write a new api_token to this mount's config", rolled: true},
		{name: "storage fails after the roll", failStore: true,
			wantStatus: 500, want: "the mount must be reconfigured", rolled: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newTestEnv(t)
			storage := &failingStorage{Storage: env.storage}
			env.storage = storage
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{"api_token": env.token.Value, "base_url": env.simURL}))
			old := env.token.Value
			if tc.fault != nil {
				env.sim.FailNext(cloudflaresim.OpUserTokenRoll, *tc.fault)
			}
			if tc.failStore {
				storage.setFailPut(func(e *logical.StorageEntry) bool { return e.Key == mount.ConfigKey })
			}
			resp, err := env.request(logical.UpdateOperation, "config/rotate-root", nil)
			storage.setFailPut(nil)
			if got := httpStatus(resp, err); got != tc.wantStatus {
				t.Fatalf("status = %d, want %d: %s", got, tc.wantStatus, errorText(resp, err))
			}
			if msg := errorText(resp, err); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not say %q", msg, tc.want)
			}
			now, _ := env.sim.TokenByID(env.token.ID)
			if (now.Value != old) != tc.rolled {
				t.Fatalf("rolled at Cloudflare = %v, the case says %v", now.Value != old, tc.rolled)
			}
			if strings.Contains(errorText(resp, err), now.Value) || strings.Contains(errorText(resp, err), old) {
				t.Error("the error contains a token value")
			}
			if !tc.rolled && storedToken(t, env) != old {
				t.Error("a refused roll changed the stored token")
			}
		})
	}
}

func TestRefusedTokenPointsToConfig(t *testing.T) {
	env := newConfiguredEnv(t)
	env.sim.SetTokenStatus(env.token.Value, "expired")
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "Cloudflare refused the engine's API token") ||
		!strings.Contains(errorText(resp, err), "config") {
		t.Fatalf("%d %s", httpStatus(resp, err), errorText(resp, err))
	}
}

func TestConfigWarnsWhenTheTokenExpiresSoon(t *testing.T) {
	env := newTestEnv(t)
	soon := env.sim.AddToken(cloudflaresim.Token{ExpiresOn: time.Now().Add(10 * 24 * time.Hour)})
	env.token = soon
	write := env.must(env.request(logical.UpdateOperation, "config", map[string]any{"api_token": soon.Value, "base_url": env.simURL}))
	if write == nil || len(write.Warnings) != 1 || !strings.Contains(write.Warnings[0], "expires on") {
		t.Fatalf("config write warnings = %v", write)
	}
	read := env.must(env.request(logical.ReadOperation, "config", nil))
	if len(read.Warnings) != 1 {
		t.Errorf("config read warnings = %v", read.Warnings)
	}
	later := env.sim.AddToken(cloudflaresim.Token{ExpiresOn: time.Now().Add(90 * 24 * time.Hour)})
	env.token = later
	if w := env.must(env.request(logical.UpdateOperation, "config", map[string]any{"api_token": later.Value})); w != nil && len(w.Warnings) != 0 {
		t.Errorf("a token 90 days from expiry drew warnings: %v", w.Warnings)
	}
}

// gate holds every request that match picks until release is closed, and
// tells arrived about the first one, so that a test can act while a
// Cloudflare call is in flight. Others pass straight to the simulator.
type gate struct {
	next    http.Handler
	match   func(*http.Request) bool
	arrived chan struct{}
	release chan struct{}
	once    sync.Once
}

func newGate(next http.Handler, match func(*http.Request) bool) *gate {
	return &gate{next: next, match: match, arrived: make(chan struct{}), release: make(chan struct{})}
}

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if g.match(r) {
		g.once.Do(func() { close(g.arrived) })
		<-g.release
	}
	g.next.ServeHTTP(w, r)
}

// TestConfigDeleteWaitsForRotateRoot: a delete of config that arrives while
// config/rotate-root is inside its Cloudflare call waits for the rotation to
// finish, then deletes; the rotation cannot bring config back afterwards. The
// guarantee is that config operations happen one at a time, in the order
// they take the lock: a delete that returns has the last word.
func TestConfigDeleteWaitsForRotateRoot(t *testing.T) {
	env := newTestEnv(t)
	g := newGate(env.sim, func(r *http.Request) bool {
		return r.Method == http.MethodPut && strings.HasSuffix(r.URL.Path, "/value")
	})
	proxy := httptest.NewServer(g)
	t.Cleanup(proxy.Close)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": proxy.URL + cloudflaresim.BasePath,
	}))

	rotated := make(chan error, 1)
	go func() {
		resp, err := env.request(logical.UpdateOperation, "config/rotate-root", nil)
		if err == nil && resp != nil && resp.IsError() {
			err = resp.Error()
		}
		rotated <- err
	}()
	select {
	case <-g.arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("rotate-root never reached Cloudflare")
	}
	deleted := make(chan error, 1)
	go func() {
		_, err := env.request(logical.DeleteOperation, "config", nil)
		deleted <- err
	}()
	select {
	case err := <-deleted:
		t.Errorf("the delete finished while rotate-root was inside its Cloudflare call (err %v)", err)
		deleted <- err
	case <-time.After(200 * time.Millisecond):
	}
	close(g.release)
	if err := <-rotated; err != nil {
		t.Fatalf("rotate-root: %v", err)
	}
	if err := <-deleted; err != nil {
		t.Fatalf("delete: %v", err)
	}
	if cfg, err := mount.ReadConfig(context.Background(), env.storage); err != nil || cfg != nil {
		t.Fatalf("config after delete = %v, %v; want none", cfg != nil, err)
	}
	// The rolled value is in no log either.
	rolled, _ := env.sim.TokenByID(env.token.ID)
	env.token.Value = rolled.Value
}

// TestRotateRootKeepsAnyValueThatCanBeAToken: Cloudflare's schema gives a
// token value 40 to 80 characters, but once Cloudflare has answered a roll the
// old value is dead. A value of another length that could still be a token
// (what config itself accepts as api_token) is stored and used, with a
// warning; only a value that could not be a token at all is refused, and the
// error says the token may have been rolled.
func TestRotateRootKeepsAnyValueThatCanBeAToken(t *testing.T) {
	cases := []struct {
		name  string
		value func() string
		// kept: the engine stores the value and works on with it.
		kept bool
	}{
		{name: "100 characters", kept: true,
			value: func() string { return strings.Repeat(cloudflaresim.NewID(), 4)[:100] }},
		{name: "20 characters", kept: true,
			value: func() string { return cloudflaresim.NewID()[:20] }},
		{name: "a space inside",
			value: func() string { return cloudflaresim.NewID() + " " + cloudflaresim.NewID() }},
		{name: "longer than config accepts",
			value: func() string { return strings.Repeat(cloudflaresim.NewID(), 9) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			old := env.token.Value
			env.sim.SetRollValue(tc.value)
			resp, err := env.request(logical.UpdateOperation, "config/rotate-root", nil)
			rolled, _ := env.sim.TokenByID(env.token.ID)
			if rolled.Value == old {
				t.Fatal("the simulator did not roll the token")
			}
			text := errorText(resp, err)
			if resp != nil {
				text += responseJSON(t, resp)
			}
			if strings.Contains(text, rolled.Value) || strings.Contains(text, old) {
				t.Fatal("the answer contains a token value")
			}
			if !tc.kept {
				if httpStatus(resp, err) != http.StatusBadGateway || !strings.Contains(text, "write a new api_token") {
					t.Fatalf("status %d: %s", httpStatus(resp, err), text)
				}
				return
			}
			if err != nil || resp.IsError() {
				t.Fatalf("rotate-root failed with a dead old token left in config: %d %s", httpStatus(resp, err), text)
			}
			if storedToken(t, env) != rolled.Value {
				t.Fatal("the stored token is not the rolled value")
			}
			if !strings.Contains(strings.Join(resp.Warnings, " "), "40 to 80") {
				t.Errorf("no warning about the value's length: %v", resp.Warnings)
			}
			env.token.Value = rolled.Value // for the log check
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
		})
	}
}

// The help test covers reads only; config/rotate-root's answer carries
// token_status and token_expires_on, which its help does not name.
func TestRotateRootHelpNamesItsAnswer(t *testing.T) {
	env := newConfiguredEnv(t)
	resp := env.must(env.request(logical.UpdateOperation, "config/rotate-root", nil))
	help := env.b.Route("config/rotate-root").HelpDescription
	for field := range resp.Data {
		if !regexp.MustCompile(`\b` + regexp.QuoteMeta(field) + `\b`).MatchString(help) {
			t.Errorf("write config/rotate-root returns %q, which its help does not name", field)
		}
	}
}

// TestRotateRootKeepsARolledValueConfigWouldAccept: the design is
// that rotate-root keeps any rolled value config would accept as api_token
// (ValidToken), since Cloudflare killed the old value when it answered.
// Config accepts a value with surrounding whitespace: it trims it
// (mount.Config.Apply: strings.TrimSpace). RollToken refuses the same value
// untrimmed ("characters other than printable ASCII"), throws it away, and
// leaves config with the dead old value: the mount is dead although the
// answer carried a value config takes. (In the simulator the rolled token
// is the value with its newline, so the trimmed value does not verify
// there; only what is stored is checked.)
//
// Before the fix it printed:
//
//	rotate-root threw away a value config accepts as api_token: status 502: roll API token ...: the answer's token value could not be an API token: it has characters other than printable ASCII (spaces, control characters or non-ASCII); ...
func TestRotateRootKeepsARolledValueConfigWouldAccept(t *testing.T) {
	env := newConfiguredEnv(t)
	old := env.token.Value
	var rolledValue string
	env.sim.SetRollValue(func() string {
		rolledValue = cloudflaresim.NewID() + cloudflaresim.NewID() + "\n"
		return rolledValue
	})
	resp, err := env.request(logical.UpdateOperation, "config/rotate-root", nil)
	rolled, _ := env.sim.TokenByID(env.token.ID)
	if rolled.Value == old {
		t.Fatal("the simulator did not roll the token")
	}
	// The old value is dead either way; the log check looks for the new one.
	env.token.Value = strings.TrimSpace(rolledValue)
	text := errorText(resp, err)
	if strings.Contains(text, strings.TrimSpace(rolledValue)) || strings.Contains(text, old) {
		t.Fatal("the answer contains a token value")
	}
	// What config would store for the same value.
	probe := newTestEnv(t)
	probe.token = probe.sim.AddToken(cloudflaresim.Token{Value: strings.TrimSpace(rolledValue)})
	if r, e := probe.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": rolledValue, "base_url": probe.simURL, "request_timeout": "2s",
	}); httpStatus(r, e) >= 400 {
		t.Fatalf("config refuses the value too, so the design allows refusing it: %s", errorText(r, e))
	}
	if err != nil || resp.IsError() {
		t.Fatalf("rotate-root threw away a value config accepts as api_token: status %d: %s", httpStatus(resp, err), text)
	}
	if got := storedToken(t, env); got != strings.TrimSpace(rolledValue) {
		t.Fatalf("stored a token of %d characters, want the rolled value trimmed as config trims it", len(got))
	}
}
