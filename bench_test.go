package main

import (
	"context"
	"fmt"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// BenchmarkBulkRotation2000 rotates 2,000 tunnels of one account through
// rotate/<account> against a simulator that enforces Cloudflare's limit,
// scaled down from 1,200 per five minutes to 1,200 per ten seconds, with the
// mount's budget at its default share (600 per window). It reports the rate
// achieved as a share of the budget and how many 429s Cloudflare answered.
func BenchmarkBulkRotation2000(b *testing.B) {
	const fleet, cfLimit, budget, window = 2000, 1200, 600, 10 * time.Second
	for i := 0; i < b.N; i++ {
		sim := cloudflaresim.New()
		sim.SetRateLimit(cfLimit, window)
		srv := httptest.NewServer(sim)
		token := sim.AddToken(cloudflaresim.Token{})
		account := cloudflaresim.NewID()
		storage := &logical.InmemStorage{}
		for j := 0; j < fleet; j++ {
			id := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
			if err := store.WriteRecord(context.Background(), storage, store.Tunnel{AccountID: account, TunnelID: id}, &store.Record{AccountID: account, TunnelID: id, PSK: "seeded", Version: 1, State: store.StateCurrent, Facts: seededFacts}); err != nil {
				b.Fatal(err)
			}
		}
		bk := startBenchBackend(b, storage)
		mustBench(b, bk, storage, logical.UpdateOperation, "config", map[string]any{
			"api_token": token.Value, "base_url": srv.URL + cloudflaresim.BasePath,
			"rate_limit": budget, "rate_limit_window": int(window.Seconds()),
		})
		callsBefore := sim.TotalCalls()
		start := time.Now()
		mustBench(b, bk, storage, logical.UpdateOperation, "rotate/"+account, nil)
		for {
			p := mustBench(b, bk, storage, logical.ReadOperation, "rotate/"+account, nil)
			if p.Data["done"].(int)+p.Data["failed_count"].(int) == fleet {
				if n := p.Data["failed_count"].(int); n > 0 {
					b.Fatalf("%d rotations failed", n)
				}
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		elapsed := time.Since(start)
		times := sim.CallTimes()[callsBefore:]
		// The rate achieved is the calls made per complete window of the
		// run, as a share of the budget per window; the last, partial window
		// only holds what was left of the fleet.
		full := int(times[len(times)-1].Sub(times[0]) / window)
		inFull := 0
		for _, at := range times {
			if at.Sub(times[0]) < time.Duration(full)*window {
				inFull++
			}
		}
		b.ReportMetric(100*float64(inFull)/float64(full)/budget, "%-of-budget")
		b.ReportMetric(float64(len(times))/elapsed.Seconds(), "calls/s")
		b.ReportMetric(float64(maxInWindow(times, window)), "max-calls-in-any-window")
		b.ReportMetric(float64(sim.RateLimited()), "429s")
		b.ReportMetric(elapsed.Seconds(), "s-total")
		bk.Cleanup(context.Background())
		srv.Close()
	}
}

// BenchmarkStartup100kTunnels measures how long a mount that tracks 100,000
// scheduled tunnels takes to start (Setup, Initialize and the scheduler's
// first pass over the schedule) and how much heap the backend holds then.
func BenchmarkStartup100kTunnels(b *testing.B) {
	const fleet = 100_000
	storage := &logical.InmemStorage{}
	ctx := context.Background()
	now := time.Now()
	if err := writeStorageJSON(ctx, storage, mount.ConfigKey, &mount.Config{
		APIToken: "unused-token-value-0123456789abcdefghij", BaseURL: "http://127.0.0.1:1/client/v4",
		RequestTimeout: time.Second, RateLimit: 600, RateLimitWindow: 5 * time.Minute, HealStalePSK: true,
	}); err != nil {
		b.Fatal(err)
	}
	for j := 0; j < fleet; j++ {
		t := store.Tunnel{AccountID: fmt.Sprintf("%032x", j/1000), TunnelID: fmt.Sprintf("%032x", j)}
		next := now.Add(time.Hour + time.Duration(j%1440)*time.Minute)
		if err := store.WriteRecord(ctx, storage, t, &store.Record{AccountID: t.AccountID, TunnelID: t.TunnelID, PSK: "seeded-key-0123456789abcdefghijkl",
			Version: 1, State: store.StateCurrent, RotationPeriod: 24 * time.Hour, NextRotation: next}); err != nil {
			b.Fatal(err)
		}
		if err := store.ScheduleRotation(ctx, storage, t, next); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; i < b.N; i++ {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		start := time.Now()
		bk := startBenchBackend(b, storage)
		bk.background.Pass(ctx)
		elapsed := time.Since(start)
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(elapsed.Seconds()*1000, "startup-ms")
		b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/(1<<20), "backend-heap-MiB")
		runtime.KeepAlive(bk)
		bk.Cleanup(ctx)
	}
}

func startBenchBackend(b *testing.B, storage logical.Storage) *backend {
	b.Helper()
	bk := newBackend()
	conf := logical.TestBackendConfig()
	conf.StorageView = storage
	if err := bk.Setup(context.Background(), conf); err != nil {
		b.Fatal(err)
	}
	if err := bk.Initialize(context.Background(), &logical.InitializationRequest{Storage: storage}); err != nil {
		b.Fatal(err)
	}
	return bk
}

func mustBench(b *testing.B, bk *backend, s logical.Storage, op logical.Operation, path string, data map[string]any) *logical.Response {
	b.Helper()
	resp, err := bk.HandleRequest(context.Background(), &logical.Request{Operation: op, Path: path, Data: data, Storage: s})
	if err != nil || resp != nil && resp.IsError() {
		b.Fatalf("%s %s: %v %v", op, path, err, resp)
	}
	return resp
}

func writeStorageJSON(ctx context.Context, s logical.Storage, key string, v any) error {
	entry, err := logical.StorageEntryJSON(key, v)
	if err != nil {
		return err
	}
	return s.Put(ctx, entry)
}

// maxInWindow is the most calls in any window of the given length.
func maxInWindow(times []time.Time, window time.Duration) int {
	most, j := 0, 0
	for i := range times {
		for times[i].Sub(times[j]) >= window {
			j++
		}
		most = max(most, i-j+1)
	}
	return most
}

// seededFacts makes a seeded record one in steady state: a record without
// router facts reads the tunnel once before its next rotation.
var seededFacts = store.Facts{CloudflareEndpoint: "203.0.113.1", InterfaceAddress: "10.212.0.8/31"}

// BenchmarkUnmanagedAccount10000VaultKeys takes an account of 10,000
// tunnels Vault does not manage under Vault with one rotate/<account>
// include_unmanaged=true and key_source vault, against a simulator that
// enforces Cloudflare's limit of 1,200 calls per five minutes, the mount's
// budget at its default (600 per five minutes). It reports the time until
// every tunnel's key is both on the edge and in Vault (done = 10,000,
// checked tunnel by tunnel afterwards). The mount's clock is the test clock:
// a wait for the budget moves it on instead of sleeping, so s-total is
// what the run takes in real time with every wait waited (wall time plus
// the waits), and s-wall the work alone.
func BenchmarkUnmanagedAccount10000VaultKeys(b *testing.B) {
	benchUnmanagedAccount(b, 10000, store.KeySourceVault)
}

// BenchmarkUnmanagedAccount2000CloudflareKeys is the same with key_source
// cloudflare on 2,000 tunnels, for comparison: one psk_generate per tunnel,
// paced by the budget.
func BenchmarkUnmanagedAccount2000CloudflareKeys(b *testing.B) {
	benchUnmanagedAccount(b, 2000, store.KeySourceCloudflare)
}

func benchUnmanagedAccount(b *testing.B, fleet int, source string) {
	for i := 0; i < b.N; i++ {
		env := newBenchEnv(b, fleet)
		mustBench(b, env.b, env.storage, logical.UpdateOperation, "config", map[string]any{
			"api_token": env.token.Value, "base_url": env.simURL, "key_source": source,
		})
		calls, keyCalls := env.sim.TotalCalls(), env.sim.Calls(cloudflaresim.OpPSKSet)+env.sim.Calls(cloudflaresim.OpPSKGenerate)
		start, wall := env.clock.Now(), time.Now()
		mustBench(b, env.b, env.storage, logical.UpdateOperation, "rotate/"+env.account, map[string]any{"include_unmanaged": true})
		for passes := 0; ; passes++ {
			wait, _ := env.b.background.Pass(context.Background())
			p := mustBench(b, env.b, env.storage, logical.ReadOperation, "rotate/"+env.account, nil)
			if p.Data["done"] == fleet {
				break
			}
			if p.Data["failed_count"] != 0 || p.Data["skipped_count"] != 0 || passes > 10*fleet {
				b.Fatalf("the job failed or stalled: %v", p.Data)
			}
			env.clock.Advance(wait)
		}
		total, elapsed := env.clock.Now().Sub(start), time.Since(wall)
		b.StopTimer()
		env.checkEveryKey(b, fleet)
		b.ReportMetric(total.Seconds(), "s-total")
		b.ReportMetric(elapsed.Seconds(), "s-wall")
		b.ReportMetric(float64(env.sim.Calls(cloudflaresim.OpPSKSet)+env.sim.Calls(cloudflaresim.OpPSKGenerate)-keyCalls), "key-calls")
		b.ReportMetric(float64(env.sim.TotalCalls()-calls), "calls")
		b.ReportMetric(float64(env.sim.RateLimited()), "429s")
		env.close()
		b.StartTimer()
	}
}

// benchEnv is a mount over in-memory storage on the test clock, against a
// simulator enforcing Cloudflare's limit on the same clock, with an
// account of tunnels Vault does not manage.
type benchEnv struct {
	b       *backend
	storage logical.Storage
	sim     *cloudflaresim.Server
	simURL  string
	token   cloudflaresim.Token
	account string
	clock   *testClock
	close   func()
}

func newBenchEnv(b *testing.B, fleet int) *benchEnv {
	b.Helper()
	clock := &testClock{}
	sim := cloudflaresim.New()
	sim.SetClock(clock.Now)
	sim.SetRateLimit(1200, 5*time.Minute)
	srv := httptest.NewServer(sim)
	env := &benchEnv{sim: sim, simURL: srv.URL + cloudflaresim.BasePath, token: sim.AddToken(cloudflaresim.Token{}),
		account: cloudflaresim.NewID(), clock: clock, storage: &logical.InmemStorage{}}
	for j := 0; j < fleet; j++ {
		sim.AddTunnel(env.account, cloudflaresim.Tunnel{})
	}
	env.b = newBackend()
	env.b.now, env.b.after = clock.Now, clock.after
	conf := logical.TestBackendConfig()
	conf.StorageView = env.storage
	conf.Logger = hclog.NewNullLogger()
	if err := env.b.Setup(context.Background(), conf); err != nil {
		b.Fatal(err)
	}
	// Passes run only when the benchmark runs one: the test clock moves
	// only when it moves it.
	env.b.background.Hold(env.storage)
	env.close = func() {
		env.b.Cleanup(context.Background())
		sim.Close()
		srv.Close()
	}
	return env
}

// checkEveryKey fails the benchmark unless every tunnel of the account is
// stored current in Vault with the key the edge uses.
func (e *benchEnv) checkEveryKey(b *testing.B, fleet int) {
	b.Helper()
	ids, err := e.storage.List(context.Background(), store.PSKPrefix+e.account+"/")
	if err != nil {
		b.Fatal(err)
	}
	for _, id := range ids {
		rec, err := store.ReadRecord(context.Background(), e.storage, store.Tunnel{AccountID: e.account, TunnelID: id})
		edge, ok := e.sim.Tunnel(e.account, id)
		if err != nil || rec == nil || !ok || rec.State != store.StateCurrent || rec.PSK != edge.PSK {
			b.Fatalf("tunnel %s: not current with the edge's key (%v)", id, err)
		}
	}
	if len(ids) != fleet {
		b.Fatalf("%d tunnels stored, want %d", len(ids), fleet)
	}
}
