package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

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
	if got := env.generations(); got != 3 {
		t.Errorf("edge generated %d keys, want 3", got)
	}
}

// TestNonCanonicalIdentifiersAreRefused: Vault matches policy paths
// case-sensitively, so an engine that folded "ABC…" to "abc…" would let a
// caller reach a tunnel that a policy denies by spelling its id in upper
// case. Every path that takes an id refuses any id that is not in
// Cloudflare's one canonical form, before reading storage or calling
// Cloudflare.
func TestNonCanonicalIdentifiersAreRefused(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	callsBefore := env.sim.TotalCalls()
	before := env.storageSnapshot()

	a, tun := env.account, env.tunnel.ID
	A, TUN := strings.ToUpper(a), strings.ToUpper(tun)
	// One upper-case letter among lower-case ones (ids are random hex, so
	// find a letter).
	i := strings.IndexAny(tun, "abcdef")
	if i < 0 {
		t.Fatalf("tunnel id %s has no letter", tun)
	}
	mixed := tun[:i] + strings.ToUpper(tun[i:i+1]) + tun[i+1:]
	for _, c := range []struct {
		op   logical.Operation
		path string
		data map[string]any
	}{
		{logical.ReadOperation, "psk/" + a + "/" + TUN, nil},
		{logical.ReadOperation, "psk/" + A + "/" + tun, nil},
		{logical.ReadOperation, "psk/" + a + "/" + mixed, nil},
		{logical.UpdateOperation, "psk/" + a + "/" + TUN, nil},
		{logical.UpdateOperation, "psk/" + A + "/" + TUN, map[string]any{"validate_only": true}},
		{logical.DeleteOperation, "psk/" + a + "/" + TUN, nil},
		{logical.ListOperation, "psk/" + A + "/", nil},
		{logical.ReadOperation, "metadata/" + a + "/" + TUN, nil},
		{logical.ListOperation, "metadata/" + A + "/", nil},
		{logical.ReadOperation, "psk/" + a + "/" + TUN + "/schedule", nil},
		{logical.UpdateOperation, "psk/" + a + "/" + TUN + "/schedule", map[string]any{"rotation_period": "720h"}},
		{logical.ListOperation, "tunnels/" + A, nil},
		{logical.ReadOperation, "tunnels/" + a + "/" + TUN, nil},
		{logical.ReadOperation, "rotate/" + A, nil},
		{logical.UpdateOperation, "rotate/" + A, nil},
	} {
		t.Run(fmt.Sprintf("%s %s", c.op, c.path), func(t *testing.T) {
			resp, err := env.request(c.op, c.path, c.data)
			if got := httpStatus(resp, err); got != http.StatusBadRequest {
				t.Fatalf("status = %d, want 400 (%s)", got, errorText(resp, err))
			}
			msg := errorText(resp, err)
			if !strings.Contains(msg, "lower-case") {
				t.Errorf("error %q does not say that ids are lower-case", msg)
			}
			if strings.Contains(msg, TUN) || strings.Contains(msg, A) {
				t.Errorf("error %q repeats the id", msg)
			}
		})
	}
	if env.sim.TotalCalls() != callsBefore {
		t.Errorf("Cloudflare was called %d times for non-canonical ids", env.sim.TotalCalls()-callsBefore)
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("non-canonical ids changed storage")
	}
	if got := env.generations(); got != 1 {
		t.Errorf("edge generated %d keys, want 1 (the write with the canonical id)", got)
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
					if msg := errorText(resp, err); !strings.Contains(msg, "must be a Cloudflare identifier: 32 lower-case hexadecimal characters") {
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
			// A first rotation reads the tunnel before it generates (see
			// rotateLocked), so Cloudflare's 404 comes from that read.
			wantStatus: 400, want: []string{"cloudflare get tunnel", "HTTP 404", "code 1002", "ipsec tunnel not found"}},
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
			if meta.Data["state"] != store.StateRotationUnknown || meta.Data["version"] != 1 {
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
	if edge := env.edge(); edge.PSK != edgeBefore.PSK || len(edge.GeneratedPSKs) != len(edgeBefore.GeneratedPSKs) {
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
				if state := resp.Data["state"]; state != store.StateCurrent && len(resp.Warnings) == 0 {
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
	if read.Data["version"] != writers || env.generations() != writers {
		t.Errorf("version = %v, edge generations = %d, want %d each", read.Data["version"], env.generations(), writers)
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

// A reviewer's sequence; it failed on the code before its fix.
// TestADeleteInsideTheSettleWindowIsRefused: the 409 protects a retry
// only while the record remembers the attempt. A delete of the path (allowed
// at any time, "forgets the key in Vault only") drops SettleUntil; the next
// write is a first rotation, sends a psk_generate at once, and the abandoned
// request lands after it: Vault says current for a key the edge replaced.
func TestADeleteInsideTheSettleWindowIsRefused(t *testing.T) {
	env := newTestEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{
		"api_token": env.token.Value, "base_url": env.simURL, "request_timeout": "1s",
	}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	env.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{ProcessAfter: 3 * time.Second})
	resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
	if got := httpStatus(resp, err); got != http.StatusGatewayTimeout {
		t.Fatalf("abandoned write: status %d: %s", got, errorText(resp, err))
	}
	resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
	if got := httpStatus(resp, err); got != http.StatusConflict {
		t.Fatalf("retry: status %d, want 409", got)
	}
	resp, err = env.request(logical.DeleteOperation, env.pskPath(), nil)
	if got := httpStatus(resp, err); got != http.StatusConflict {
		t.Errorf("delete inside the settle window: status %d, want 409", got)
	}
	resp, err = env.request(logical.UpdateOperation, env.pskPath(), nil)
	t.Logf("write after the delete inside the settle window: status %d", httpStatus(resp, err))
	env.sim.WaitIdle() // the abandoned request lands now
	read, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	if err == nil && read != nil && read.Data["state"] == store.StateCurrent && read.Data["psk"] != env.edge().PSK {
		t.Fatalf("after delete+write inside the settle window the late request landed: state current, key is not the edge's")
	}
}

// vaultAgentRereadsAt is when Vault Agent reads a secret again, by
// consul-template's leaseCheckWait (dependency/vault_common.go): for a
// response without a lease whose data has a rotation_period key and an
// integer ttl, ttl+1 seconds after the read. It fails the test when the
// response does not take that path (Agent would then poll every
// static_secret_render_interval, 5 minutes by default).
func vaultAgentRereadsAt(t *testing.T, resp *logical.Response, readAt time.Time) time.Time {
	t.Helper()
	raw, err := json.Marshal(resp.Data)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber() // as the Vault API client decodes
	var data map[string]any
	if err := dec.Decode(&data); err != nil {
		t.Fatal(err)
	}
	if _, ok := data["rotation_period"]; !ok {
		t.Fatal("no rotation_period key: Agent does not treat the secret as rotating")
	}
	n, ok := data["ttl"].(json.Number)
	if !ok {
		t.Fatalf("ttl = %#v, not a number", data["ttl"])
	}
	ttl, err := n.Int64()
	if err != nil || ttl <= 0 {
		t.Fatalf("ttl = %s: Agent needs a positive integer", n)
	}
	return readAt.Add(time.Duration(ttl+1) * time.Second)
}

// TestReadsAreRotationAware: psk/ and metadata/ reads carry ttl (whole
// seconds until next_rotation, at least 1) whenever a schedule is set, and
// last_vault_rotation, as Vault's database and LDAP static roles do, so
// that Vault Agent reads a tunnel's key again right after it rotates.
func TestReadsAreRotationAware(t *testing.T) {
	env := newConfiguredEnv(t)
	lowerTheFloor(t, env)
	schedulerOver(t, env, env.storage) // the test moves the clock past due times
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	for _, path := range []string{env.pskPath(), env.metaPath()} {
		read := env.must(env.request(logical.ReadOperation, path, nil))
		if ttl, ok := read.Data["ttl"]; ok {
			t.Errorf("%s without a schedule: ttl %v", path, ttl)
		}
		if read.Data["last_vault_rotation"] != read.Data["stored_at"] || read.Data["last_vault_rotation"] == "" {
			t.Errorf("%s: last_vault_rotation %v, stored_at %v", path, read.Data["last_vault_rotation"], read.Data["stored_at"])
		}
		if lvr, _ := read.Data["last_vault_rotation"].(string); lvr == "" {
			continue
		} else if _, err := time.Parse(time.RFC3339, lvr); err != nil {
			t.Errorf("%s: last_vault_rotation is not RFC 3339: %v", path, err)
		}
	}

	atSecondOfMinute(env, 20)
	// A rotation further away than maxReadTTL: ttl is capped, so a key
	// stored outside the schedule reaches Agent within a minute.
	write := env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	if write.Data["ttl"] != int(maxReadTTL/time.Second) {
		t.Errorf("write answer: ttl %v, want %d (capped)", write.Data["ttl"], int(maxReadTTL/time.Second))
	}
	write = env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1m"}))
	next := record(t, env, env.tunnel.ID).NextRotation
	if write.Data["ttl"] != 60 {
		t.Errorf("write answer: ttl %v, want 60", write.Data["ttl"])
	}
	env.clock.Advance(1500 * time.Millisecond)
	for _, path := range []string{env.pskPath(), env.metaPath()} {
		now := env.clock.Now()
		read := env.must(env.request(logical.ReadOperation, path, nil))
		if read.Data["rotation_period"] != 60 {
			t.Errorf("%s: rotation_period %#v, want the integer 60", path, read.Data["rotation_period"])
		}
		// 58.5s to go: rounded up, so Agent's re-read (ttl+1) falls one
		// to two seconds after the rotation, which leaves the rotation a
		// second to be stored.
		if read.Data["ttl"] != 59 {
			t.Errorf("%s: ttl %v, want 59", path, read.Data["ttl"])
		}
		if again := vaultAgentRereadsAt(t, read, now); again.Before(next.Add(time.Second)) || again.After(next.Add(2*time.Second)) {
			t.Errorf("%s: Agent reads again %s after next_rotation, want 1s to 2s", path, again.Sub(next))
		}
	}

	// Due: ttl is 1, so Agent looks every two seconds until the rotation
	// is stored. Long overdue (the budget spent, no config): every ten.
	// The scheduler is stopped so that the rotation stays due.
	env.b.clean(context.Background())
	for _, c := range []struct {
		at   time.Duration
		want int
	}{{0, 1}, {time.Hour, int(overdueReadTTL / time.Second)}} {
		env.clock.Advance(next.Add(c.at).Sub(env.clock.Now()))
		read := env.must(env.request(logical.ReadOperation, env.pskPath(), nil))
		if read.Data["ttl"] != c.want {
			t.Errorf("%s past next_rotation: ttl %v, want %d", c.at, read.Data["ttl"], c.want)
		}
	}
	schedulerOver(t, env, env.storage)

	// No schedule will run for a tunnel that is gone: no ttl, or Agent
	// would poll it every two seconds for ever.
	env.sim.DeleteTunnel(env.account, env.tunnel.ID)
	drain(t, env)
	read := env.must(env.request(logical.ReadOperation, env.metaPath(), nil))
	if read.Data["state"] != store.StateTunnelGone {
		t.Fatalf("state %v, want %s", read.Data["state"], store.StateTunnelGone)
	}
	if ttl, ok := read.Data["ttl"]; ok {
		t.Errorf("a gone tunnel has ttl %v", ttl)
	}
}

// TestAScheduleErrorDoesNotRepeatTheValue: an error about rotation_schedule
// says what is wrong but never echoes the value, which a slip of the
// clipboard can make a key.
func TestAScheduleErrorDoesNotRepeatTheValue(t *testing.T) {
	env := newConfiguredEnv(t)
	const pasted = "0 2 * * 6 Zq8vPSKlooksLikeThis"
	calls := env.sim.TotalCalls()
	for _, path := range []string{env.pskPath(), env.schedulePath()} {
		resp, err := env.request(logical.UpdateOperation, path, map[string]any{"rotation_schedule": pasted})
		if httpStatus(resp, err) != http.StatusBadRequest {
			t.Fatalf("%s: status %d, want 400 (%s)", path, httpStatus(resp, err), errorText(resp, err))
		}
		if msg := errorText(resp, err); strings.Contains(msg, "Zq8v") || !strings.Contains(msg, "6 fields") {
			t.Errorf("%s: %q", path, msg)
		}
	}
	if env.sim.TotalCalls() != calls {
		t.Error("a refused schedule reached Cloudflare")
	}
}

// TestAnIDProblemIsReportedBeforeTheBody: a write of
// psk/<A>/<UPPER>/schedule without a schedule field, or of psk/<A>/<UPPER>
// with a bad schedule value, was refused with a 400 about the schedule
// fields: the handlers checked the body before the path's ids, so the caller
// fixed the body and only then learnt the id is refused.
func TestAnIDProblemIsReportedBeforeTheBody(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	upper := "psk/" + env.account + "/" + strings.ToUpper(env.tunnel.ID)
	for name, c := range map[string]struct {
		path string
		data map[string]any
	}{
		"schedule write without a field":       {upper + "/schedule", nil},
		"psk write with a bad rotation_period": {upper, map[string]any{"rotation_period": "1s"}},
	} {
		t.Run(name, func(t *testing.T) {
			resp, err := env.request(logical.UpdateOperation, c.path, c.data)
			if got := httpStatus(resp, err); got != http.StatusBadRequest {
				t.Fatalf("status = %d, want 400 (%s)", got, errorText(resp, err))
			}
			if msg := errorText(resp, err); !strings.Contains(msg, "lower-case") {
				t.Errorf("the 400 for an upper-case id does not say so: %q", msg)
			}
		})
	}
}
