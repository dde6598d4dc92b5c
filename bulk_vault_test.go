package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// Bulk rotation with keys Vault makes (key_source vault): rotate/<account>
// sends the keys in batches through Cloudflare's Set operation, one call
// per batch, each key written ahead before the batch that carries it.

// managedFleet adds n tunnels to the test account (the env's own first),
// each with a current record in Vault holding the edge's key, as a fleet
// under management looks, and returns their ids. No Cloudflare call.
func managedFleet(t *testing.T, env *testEnv, n int) []string {
	t.Helper()
	ids := []string{env.tunnel.ID}
	for len(ids) < n {
		ids = append(ids, env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{}).ID)
	}
	for _, id := range ids {
		edge, _ := env.sim.Tunnel(env.account, id)
		rec := &store.Record{AccountID: env.account, TunnelID: id, PSK: edge.PSK, LastGeneratedOn: edge.PSKGeneratedOn,
			KeySource: store.KeySourceCloudflare, Version: 1, StoredAt: env.clock.Now().UTC(), State: store.StateCurrent, Facts: seededFacts}
		if err := store.WriteRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: id}, rec); err != nil {
			t.Fatal(err)
		}
	}
	return ids
}

// keyCalls is how many calls that change keys the simulator was sent:
// psk_generate and the Set operation.
func keyCalls(env *testEnv) int {
	return env.sim.Calls(cloudflaresim.OpPSKGenerate) + env.sim.Calls(cloudflaresim.OpPSKSet)
}

// assertFleetCurrent reads every tunnel of ids and checks that Vault serves
// the edge's key as current, at version (0: any), made by source.
func assertFleetCurrent(t *testing.T, env *testEnv, ids []string, version int, source string) {
	t.Helper()
	bad := 0
	for _, id := range ids {
		edge, _ := env.sim.Tunnel(env.account, id)
		read := env.must(env.request(logical.ReadOperation, "psk/"+env.account+"/"+id, nil))
		ok := read.Data["state"] == store.StateCurrent && read.Data["psk"] == edge.PSK && read.Data["key_source"] == source &&
			(version == 0 || read.Data["version"] == version) && len(read.Warnings) == 0
		if !ok {
			bad++
			if bad <= 3 {
				t.Errorf("tunnel %s: state %v, key is the edge's: %v, version %v, key_source %v, warnings %v",
					id, read.Data["state"], read.Data["psk"] == edge.PSK, read.Data["version"], read.Data["key_source"], read.Warnings)
			}
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d tunnels are not current with the edge's key", bad, len(ids))
	}
}

// assertNoFleetSecretLogged checks that no key the simulator ever issued,
// any tunnel's, reached the backend's log.
func assertNoFleetSecretLogged(t *testing.T, env *testEnv) {
	t.Helper()
	logs := env.logs.String()
	for _, s := range env.sim.IssuedSecrets() {
		if strings.Contains(logs, s) {
			t.Fatal("a key or token appears in the backend's log")
		}
	}
}

// edgeKeysOf is every tunnel's key at the edge now.
func edgeKeysOf(env *testEnv, ids []string) map[string]string {
	keys := map[string]string{}
	for _, id := range ids {
		edge, _ := env.sim.Tunnel(env.account, id)
		keys[id] = edge.PSK
	}
	return keys
}

func TestBulkWithVaultsKeysSendsOneSetCallPerBatch(t *testing.T) {
	env := newVaultKeysEnv(t)
	if got := env.must(env.request(logical.ReadOperation, "config", nil)).Data["set_batch_size"]; got != 100 {
		t.Fatalf("config set_batch_size %v, want the default 100", got)
	}
	ids := managedFleet(t, env, 250)
	queued := env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	if queued.Data["queued"] != 250 {
		t.Fatalf("queued %v", queued.Data["queued"])
	}
	drain(t, env)
	if p := progressOf(t, env); p["done"] != 250 || p["remaining"] != 0 || p["failed_count"] != 0 {
		t.Fatalf("progress %v", p)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 3 {
		t.Errorf("%d Set calls for 250 tunnels in batches of 100, want 3", n)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKGenerate) + env.sim.Calls(cloudflaresim.OpTunnelGet); n != 0 {
		t.Errorf("%d psk_generate or tunnel reads, want 0", n)
	}
	assertFleetCurrent(t, env, ids, 2, store.KeySourceVault)
	assertNoFleetSecretLogged(t, env)

	// A smaller batch size from config is taken at the next job.
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"set_batch_size": 40}))
	env.clock.Advance(time.Minute)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	if n := env.sim.Calls(cloudflaresim.OpPSKSet) - 3; n != 7 {
		t.Errorf("%d Set calls for 250 tunnels in batches of 40, want 7", n)
	}
	assertFleetCurrent(t, env, ids, 3, store.KeySourceVault)
}

func TestSetBatchSizeIsValidated(t *testing.T) {
	env := newVaultKeysEnv(t)
	before, calls := env.storageSnapshot(), env.sim.TotalCalls()
	for _, v := range []any{0, -1, 1001, "many"} {
		resp, err := env.request(logical.UpdateOperation, "config", map[string]any{"set_batch_size": v})
		if httpStatus(resp, err) != http.StatusBadRequest || !strings.Contains(errorText(resp, err), "set_batch_size") {
			t.Errorf("set_batch_size=%v: %d %s", v, httpStatus(resp, err), errorText(resp, err))
		}
	}
	if after := env.storageSnapshot(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Error("a refused set_batch_size changed storage")
	}
	if env.sim.TotalCalls() != calls {
		t.Error("a refused set_batch_size called Cloudflare")
	}
}

// TestABatchCloudflareFindsTooLargeIsHalved: the edge takes at most 40 keys
// a call (413, code 1004, for more). A batch of 100 is halved until it
// fits, no tunnel is lost, and the size that fitted is kept for the rest
// of the job.
func TestABatchCloudflareFindsTooLargeIsHalved(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 150)
	env.sim.SetPSKBatchLimit(40)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	if p := progressOf(t, env); p["done"] != 150 || p["remaining"] != 0 || p["failed_count"] != 0 {
		t.Fatalf("progress %v", p)
	}
	// 100 (413), 50 (413), 25, 25, 50 (413), 25, 25; then the last 50 in
	// batches of 25, the size that fitted.
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 9 {
		t.Errorf("%d Set calls, want 9", n)
	}
	assertFleetCurrent(t, env, ids, 2, store.KeySourceVault)
}

// TestUnappliedTunnelsOfABatchKeepTheirKeyAndAreRetried: Cloudflare does
// not apply the keys of two tunnels of the batch. They keep the key they
// had, in Vault as at the edge, the job shows them with Cloudflare's
// reason, and they are sent again after a backoff.
func TestUnappliedTunnelsOfABatchKeepTheirKeyAndAreRetried(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 10)
	refused := map[string]string{ids[3]: "tunnel is being reconfigured", ids[7]: "tunnel is being reconfigured"}
	before := edgeKeysOf(env, ids)
	env.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: refused})
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	p := progressOf(t, env)
	if p["done"] != 8 || p["remaining"] != 2 || p["retrying_count"] != 2 || p["failed_count"] != 0 {
		t.Fatalf("progress after the first batch %v", p)
	}
	for _, r := range p["retrying"].([]map[string]any) {
		if _, ok := refused[r["tunnel_id"].(string)]; !ok || !strings.Contains(r["reason"].(string), "tunnel is being reconfigured") || r["retry_at"] == "" {
			t.Errorf("retrying entry %v", r)
		}
	}
	for id := range refused {
		edge, _ := env.sim.Tunnel(env.account, id)
		read := env.must(env.request(logical.ReadOperation, "psk/"+env.account+"/"+id, nil))
		if edge.PSK != before[id] || read.Data["psk"] != before[id] || read.Data["state"] != store.StateCurrent || read.Data["version"] != 1 {
			t.Errorf("refused tunnel %s: the edge kept its key: %v, Vault serves it current: %v %v, version %v",
				id, edge.PSK == before[id], read.Data["psk"] == before[id], read.Data["state"], read.Data["version"])
		}
	}

	// Before the backoff ends nothing is sent again; after it, both are.
	drain(t, env)
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
		t.Fatalf("%d Set calls before the backoff ended, want 1", n)
	}
	env.clock.Advance(time.Minute)
	drain(t, env)
	if p := progressOf(t, env); p["done"] != 10 || p["remaining"] != 0 || p["retrying_count"] != 0 {
		t.Fatalf("progress after the retry %v", p)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 2 {
		t.Errorf("%d Set calls, want 2 (the batch, then the two refused in one)", n)
	}
	assertFleetCurrent(t, env, ids, 2, store.KeySourceVault)
}

// TestATunnelThatNeverTakesAKeyFailsInTheEnd: a tunnel whose every key
// Cloudflare refuses is tried a few times with backoff, then counted as
// failed with Cloudflare's reason, so that the job ends; it keeps its key.
func TestATunnelThatNeverTakesAKeyFailsInTheEnd(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 3)
	stuck := env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{RefusePSK: "tunnel is locked by the account owner"})
	edge, _ := env.sim.Tunnel(env.account, stuck.ID)
	if err := store.WriteRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: stuck.ID}, &store.Record{
		AccountID: env.account, TunnelID: stuck.ID, PSK: edge.PSK, LastGeneratedOn: edge.PSKGeneratedOn, Version: 1,
		StoredAt: env.clock.Now().UTC(), State: store.StateCurrent, Facts: seededFacts}); err != nil {
		t.Fatal(err)
	}
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	for i := 0; i < 20; i++ {
		drain(t, env)
		if progressOf(t, env)["remaining"] == 0 {
			break
		}
		env.clock.Advance(10 * time.Minute)
	}
	p := progressOf(t, env)
	failed := p["failed"].([]map[string]any)
	if p["remaining"] != 0 || p["failed_count"] != 1 || p["done"] != 3 || len(failed) != 1 || failed[0]["tunnel_id"] != stuck.ID ||
		!strings.Contains(failed[0]["reason"].(string), "tunnel is locked by the account owner") {
		t.Fatalf("progress %v", p)
	}
	read := env.must(env.request(logical.ReadOperation, "psk/"+env.account+"/"+stuck.ID, nil))
	if read.Data["psk"] != edge.PSK || read.Data["state"] != store.StateCurrent {
		t.Errorf("the refused tunnel: Vault serves its key current: %v %v", read.Data["psk"] == edge.PSK, read.Data["state"])
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n < 3 || n > 10 {
		t.Errorf("%d Set calls: the refused tunnel was not retried with backoff, or retried too often", n)
	}
	assertFleetCurrent(t, env, ids[:3], 2, store.KeySourceVault)
}

// TestALostBatchAnswerIsFinishedWithTheSameKeys: the edge took the batch
// and the answer was lost (or said nothing of the tunnels). Every tunnel
// stays pending with its key, written ahead, and is finished with that
// same key: one new key per tunnel, never a second.
func TestALostBatchAnswerIsFinishedWithTheSameKeys(t *testing.T) {
	const emptyAnswer = `{"success":true,"errors":[],"messages":[],"result":{"successfully_applied_psks":{},"unapplied_psks":{}}}`
	for _, tc := range []struct {
		name  string
		fault cloudflaresim.Fault
	}{
		{"hang-up after the change", cloudflaresim.Fault{AfterCommit: true, Hangup: true}},
		{"an answer that names no tunnel", cloudflaresim.Fault{Body: emptyAnswer}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newVaultKeysEnv(t)
			ids := managedFleet(t, env, 5)
			env.sim.FailNext(cloudflaresim.OpPSKSet, tc.fault)
			env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
			drain(t, env)
			for _, id := range ids {
				rec := record(t, env, id)
				if rec.State != store.StatePending || rec.PendingPSK == "" {
					t.Fatalf("tunnel %s after the lost answer: state %s", id, rec.State)
				}
			}
			if p := progressOf(t, env); p["done"] != 0 || p["remaining"] != 5 {
				t.Fatalf("progress with the batch pending %v", p)
			}
			pending := map[string]string{}
			for _, id := range ids {
				pending[id] = record(t, env, id).PendingPSK
			}
			env.clock.Advance(time.Minute)
			drain(t, env)
			if p := progressOf(t, env); p["done"] != 5 || p["remaining"] != 0 {
				t.Fatalf("progress after the finish %v", p)
			}
			assertFleetCurrent(t, env, ids, 2, store.KeySourceVault)
			for _, id := range ids {
				edge, _ := env.sim.Tunnel(env.account, id)
				if edge.PSK != pending[id] {
					t.Errorf("tunnel %s: the key stored is not the one written ahead", id)
				}
				seen := map[string]bool{}
				for _, k := range edge.GeneratedPSKs[1:] {
					seen[k] = true
				}
				if len(seen) != 1 {
					t.Errorf("tunnel %s was given %d different keys, want 1", id, len(seen))
				}
			}
			assertNoFleetSecretLogged(t, env)
		})
	}
}

// TestEveryKeyIsWrittenAheadOfItsBatch: when the Set request reaches
// Cloudflare, every tunnel it carries is already recorded pending with the
// very key the request carries. A proxy in front of the simulator looks at
// storage as each Set request arrives.
func TestEveryKeyIsWrittenAheadOfItsBatch(t *testing.T) {
	env := newVaultKeysEnv(t)
	ids := managedFleet(t, env, 30)
	var mu sync.Mutex // the proxy's handler runs on the server's goroutines
	var seen, notAhead int
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/ipsec_tunnels/psk") {
			mu.Lock()
			defer mu.Unlock()
			body, _ := io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(body))
			var req struct {
				PSKs []struct{ ID, PSK string } `json:"psks"`
			}
			_ = json.Unmarshal(body, &req)
			for _, k := range req.PSKs {
				seen++
				rec, err := store.ReadRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: k.ID})
				if err != nil || rec == nil || rec.State != store.StatePending || rec.PendingPSK != k.PSK {
					notAhead++
				}
			}
		}
		env.sim.ServeHTTP(w, r)
	}))
	t.Cleanup(proxy.Close)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"base_url": proxy.URL + cloudflaresim.BasePath, "api_token": env.token.Value}))
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	mu.Lock()
	defer mu.Unlock()
	if seen != len(ids) || notAhead != 0 {
		t.Fatalf("%d keys sent, %d of them not written ahead as pending with the key sent", seen, notAhead)
	}
	assertFleetCurrent(t, env, ids, 2, store.KeySourceVault)
}

// TestATunnelBothInABatchAndScheduledInOnePass: a pass loads a tunnel's
// bulk entry (minute M, gathered into a batch, its lock held) and, in the
// same load, its scheduled rotation of minute M+1. The scheduled rotation
// must not wait for a lock the pass itself holds.
func TestATunnelBothInABatchAndScheduledInOnePass(t *testing.T) {
	env := newVaultKeysEnv(t)
	lowerTheFloor(t, env)
	ids := managedFleet(t, env, 3)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1m"}))
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	env.clock.Advance(2 * time.Minute)
	drain(t, env)
	if p := progressOf(t, env); p["done"] != 3 || p["remaining"] != 0 {
		t.Fatalf("progress %v", p)
	}
	assertFleetCurrent(t, env, ids, 0, store.KeySourceVault)
}

// TestRefusedTunnelsOfOneJobAreRetriedTogether: tunnels refused in
// different batches of a job, moments apart, are sent again in one call
// when the first of them is due, not each in a call of its own.
func TestRefusedTunnelsOfOneJobAreRetriedTogether(t *testing.T) {
	env := newVaultKeysEnv(t)
	env.clock.freeze()
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"set_batch_size": 3}))
	ids := managedFleet(t, env, 9)
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	// One refusal in each batch of three, each batch a moment after the
	// last.
	sorted := append([]string(nil), ids...)
	sort.Strings(sorted) // the order the scheduler works them in
	refusals := map[string]string{}
	for _, id := range []string{sorted[0], sorted[3], sorted[6]} {
		refusals[id] = "busy"
	}
	for id := range refusals {
		env.sim.EditOutOfBand(env.account, id, func(tun *cloudflaresim.Tunnel) { tun.RefusePSK = "busy" })
	}
	steps := &steppingStorage{Storage: env.storage, clock: env.clock, step: time.Second}
	schedulerOver(t, env, steps)
	drain(t, env)
	p := progressOf(t, env)
	if p["retrying_count"] != 3 {
		t.Fatalf("progress %v", p)
	}
	for id := range refusals {
		env.sim.EditOutOfBand(env.account, id, func(tun *cloudflaresim.Tunnel) { tun.RefusePSK = "" })
	}
	first := p["retrying"].([]map[string]any)[0]["retry_at"].(string)
	for _, r := range p["retrying"].([]map[string]any) {
		if r["retry_at"].(string) < first {
			first = r["retry_at"].(string)
		}
	}
	at, _ := time.Parse(time.RFC3339Nano, first)
	sets := env.sim.Calls(cloudflaresim.OpPSKSet)
	env.clock.Advance(at.Sub(env.clock.Now()))
	drain(t, env)
	if p := progressOf(t, env); p["done"] != 9 || p["remaining"] != 0 {
		t.Fatalf("progress after the first retry time %v", p)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet) - sets; n != 1 {
		t.Errorf("%d Set calls to retry three tunnels refused moments apart, want 1", n)
	}
}

// steppingStorage moves the test clock on by step at every Put of a
// record: storage that takes its time, so that a batch's tunnels are
// refused moments apart.
type steppingStorage struct {
	logical.Storage
	clock *testClock
	step  time.Duration
}

func (s *steppingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if strings.HasPrefix(e.Key, store.DuePrefix) {
		s.clock.Advance(s.step)
	}
	return s.Storage.Put(ctx, e)
}

// TestABatchRefusesAKeyTheTunnelAlreadyHas: as for a single rotation
// (TestAPolicyThatRepeatsAKeyIsRefusedAndTheScheduleKept), a password policy
// that makes the key a tunnel already holds rotates nothing: in a batch that
// key is refused, naming the policy and never the key, nothing is sent, and
// the record is as it was; the job counts the tunnel failed, saying why.
func TestABatchRefusesAKeyTheTunnelAlreadyHas(t *testing.T) {
	env := newVaultKeysEnv(t)
	sys := env.b.System().(*logical.StaticSystemView)
	sys.SetPasswordPolicy("routers", countingPolicy("Ab3", 32))
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"password_policy": "routers"}))
	ids := managedFleet(t, env, 1)
	repeated := edgeKeysOf(env, ids)[ids[0]]
	// The policy changes under the mount, to one that makes the stored key.
	sys.SetPasswordPolicy("routers", func() (string, error) { return repeated, nil })
	tunnel := store.Tunnel{AccountID: env.account, TunnelID: ids[0]}
	before, err := store.ReadRecord(context.Background(), env.storage, tunnel)
	if err != nil {
		t.Fatal(err)
	}
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	drain(t, env)
	p := progressOf(t, env)
	failed, _ := p["failed"].([]map[string]any)
	if p["remaining"] != 0 || p["done"] != 0 || p["failed_count"] != 1 || len(failed) != 1 || failed[0]["tunnel_id"] != ids[0] ||
		!strings.Contains(failed[0]["reason"].(string), `password_policy "routers"`) || !strings.Contains(failed[0]["reason"].(string), "already has") {
		t.Fatalf("progress %v", p)
	}
	if strings.Contains(fmt.Sprint(p), repeated) {
		t.Fatal("the job's progress shows the key")
	}
	after, err := store.ReadRecord(context.Background(), env.storage, tunnel)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("the refused tunnel's record changed: version %d -> %d, state %s -> %s", before.Version, after.Version, before.State, after.State)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKSet); n != 0 {
		t.Errorf("%d Set calls, want none", n)
	}
	assertFleetCurrent(t, env, ids, 1, store.KeySourceCloudflare)
	assertNoFleetSecretLogged(t, env)
}
