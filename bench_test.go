package main

import (
	"context"
	"fmt"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"

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
