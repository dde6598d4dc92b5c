package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// statusFleet is the mount the status figure is taken on.
const statusFleet = 100_000

// BenchmarkStatusReadVsPSKRead100k is the status figure: on a mount of
// 100,000 tunnels (100 accounts of 1,000, every one on a daily schedule,
// 100 stale, 100 gone at Cloudflare and 100 whose scheduled rotation
// fails, so that both of status's lists are full), a read of status and a
// read of one tunnel's PSK, alternately, through a real Vault server; it
// reports both medians and their ratio (the aim: at most 10).
//
// The fleet is written into the mount's storage below the plugin, through
// Vault's sys/raw endpoint (a dev server with raw_storage_endpoint), as the
// engine itself stores it: its records, their schedule entries, the
// attention index and the census. Making 100,000 keys through the engine
// would take Cloudflare's rate limit most of a day. The plugin is then
// reloaded, so that it takes up the census as written.
func BenchmarkStatusReadVsPSKRead100k(b *testing.B) {
	_, _, secrets, _, _ := newEdge(b)
	v := startDevServerConfig(b, secrets, "info", suite.pluginDir, "raw_storage_endpoint = true\n")
	v.mustVault(b, v.rootToken, "plugin", "register", "-sha256="+suite.pluginSHA, "secret", pluginName)
	v.mustVault(b, v.rootToken, "secrets", "enable", "-path=cloudflare-ipsec", pluginName)
	mount := v.mustVaultJSON(b, v.rootToken, "read", "sys/mounts/cloudflare-ipsec")
	uuid, _ := mount["data"].(map[string]any)["uuid"].(string)
	if uuid == "" {
		b.Fatal("the mount has no uuid")
	}
	start := time.Now()
	target := seedStatusFleet(b, v, "logical/"+uuid+"/", time.Now())
	b.Logf("seeded %d tunnels in %s", statusFleet, time.Since(start).Round(time.Second))
	v.mustVault(b, v.rootToken, "plugin", "reload", "-plugin="+pluginName)

	client := &http.Client{}
	get := func(path string) func() *http.Request {
		return func() *http.Request {
			req, _ := http.NewRequest("GET", v.addr+"/v1/"+path, nil)
			req.Header.Set("X-Vault-Token", v.rootToken)
			return req
		}
	}
	pskReq, statusReq := get("cloudflare-ipsec/psk/"+target), get("cloudflare-ipsec/status")
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		status := v.mustVaultJSON(b, v.rootToken, "read", "cloudflare-ipsec/status")["data"].(map[string]any)
		if status["tunnels"] == float64(statusFleet) && status["counts_exact"] == true {
			if status["attention_count"] != 300.0 || len(status["attention"].([]any)) != 100 || len(status["failing"].([]any)) != 100 {
				b.Fatalf("the seeded fleet reads wrong: %v attention, %d listed, %d failing listed",
					status["attention_count"], len(status["attention"].([]any)), len(status["failing"].([]any)))
			}
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("status does not show the seeded fleet: tunnels %v, exact %v", status["tunnels"], status["counts_exact"])
		}
	}
	for i := 0; i < 200; i++ { // warm up both paths
		timeRequest(b, client, pskReq)
		timeRequest(b, client, statusReq)
	}
	var psk, status []time.Duration
	b.ResetTimer()
	for i := 0; i < benchRequests; i++ {
		psk = append(psk, timeRequest(b, client, pskReq))
		status = append(status, timeRequest(b, client, statusReq))
	}
	b.StopTimer()
	pm, sm := median(psk), median(status)
	b.ReportMetric(float64(pm.Microseconds()), "psk-median-µs")
	b.ReportMetric(float64(sm.Microseconds()), "status-median-µs")
	b.ReportMetric(float64(sm)/float64(pm), "status/psk-ratio")
}

// seedStatusFleet writes the fleet into the mount's storage at prefix
// (sys/raw) and returns the path (account/tunnel) of a current tunnel.
func seedStatusFleet(b *testing.B, v *vaultServer, prefix string, now time.Time) string {
	entries := make(chan [2]string, 1024)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	transport := &http.Transport{MaxIdleConnsPerHost: 16}
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Transport: transport}
			for e := range entries {
				if err := rawPut(client, v, prefix+e[0], e[1]); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	counts := seedRecords(b, entries, now)
	census, err := json.Marshal(map[string]any{
		"owner": "benchmark-seed", "closed": true, "exact": true, "counted_at": now.UTC(), "as_of": now.UTC(),
		"counts": counts, "drift": map[string]any{"found": 0},
	})
	if err != nil {
		b.Fatal(err)
	}
	entries <- [2]string{store.CensusKey, string(census)}
	close(entries)
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	return fmt.Sprintf("%032x/%032x", 0, 0)
}

// seedRecords sends every entry of the fleet to entries and returns the
// census's counts of it.
func seedRecords(b *testing.B, entries chan<- [2]string, now time.Time) store.Counts {
	counts := store.Counts{States: map[string]int{}, Attention: map[string]int{}, KeyDays: map[string]store.KeyDay{}}
	put := func(key string, v any) {
		raw, err := json.Marshal(v)
		if err != nil {
			b.Fatal(err)
		}
		entries <- [2]string{key, string(raw)}
	}
	for i := 0; i < statusFleet; i++ {
		t := store.Tunnel{AccountID: fmt.Sprintf("%032x", i/1000), TunnelID: fmt.Sprintf("%032x", i)}
		rec := seededRecord(t, i, now)
		put(t.StorageKey(), rec)
		counts.States[rec.State]++
		kind := map[int]string{1: store.AttentionStale, 2: store.AttentionGone, 3: store.AttentionFailing}[i%1000]
		if kind != "" {
			counts.Attention[kind]++
			reason := rec.StateReason
			if rec.Failures > 0 {
				reason = rec.LastFailure
			}
			put(store.AttentionPrefix+kind+"/"+t.AccountID+"."+t.TunnelID,
				store.AttentionEntry{State: rec.State, Reason: reason, Failures: rec.Failures, RetryAt: rec.RetryAt})
		}
		if rec.State == store.StateTunnelGone {
			continue
		}
		counts.Scheduled++
		put(store.DueKey(store.DueMinute(rec.NextRotation, false), t), store.DueEntry{})
		day := rec.StoredAt.Format(time.DateOnly)
		d := counts.KeyDays[day]
		d.Keys++
		if d.Oldest.IsZero() || rec.StoredAt.Before(d.Oldest) {
			d.Oldest = rec.StoredAt
		}
		counts.KeyDays[day] = d
	}
	return counts
}

// seededRecord is tunnel i's record: current and on a daily schedule, its
// key stored up to 90 days ago, due within the next day; the first three
// of each thousand stale, gone and failing.
func seededRecord(t store.Tunnel, i int, now time.Time) *store.Record {
	stored := now.Add(-time.Duration(i%90) * 24 * time.Hour).Add(-time.Duration(i%1440) * time.Minute).UTC()
	rec := &store.Record{
		AccountID: t.AccountID, TunnelID: t.TunnelID, PSK: "seeded0key0not0a0real0one0" + fmt.Sprintf("%06x", i%(1<<24)),
		LastGeneratedOn: stored, KeySeenAt: stored.Truncate(time.Second), Version: 3, StoredAt: stored, State: store.StateCurrent,
		RotationPeriod: 24 * time.Hour, NextRotation: now.Add(time.Hour + time.Duration(i%1440)*time.Minute).UTC(),
		Facts: store.Facts{Name: fmt.Sprintf("site_%d", i), CloudflareEndpoint: "203.0.113.1", CustomerEndpoint: "198.51.100.7", InterfaceAddress: "10.212.0.0/31"},
	}
	switch i % 1000 {
	case 1:
		rec.State = store.StateStale
		rec.StateReason = "Cloudflare's key was generated at " + store.FormatTime(now) + ", not when the stored key was: it was changed outside this engine"
	case 2:
		rec.State, rec.RotationPeriod, rec.NextRotation = store.StateTunnelGone, 0, time.Time{}
		rec.StateReason = "Cloudflare answered at " + store.FormatTime(now) + " that the tunnel does not exist (deleted, or the API token lost its account)"
	case 3:
		rec.Failures, rec.LastFailure = 2, "cloudflare psk_generate: HTTP 403: code 10000: Authentication error"
		rec.RetryAt = now.Add(30 * time.Minute).UTC()
		rec.NextRotation = rec.RetryAt
	}
	return rec
}

func rawPut(client *http.Client, v *vaultServer, key, value string) error {
	body, err := json.Marshal(map[string]string{"value": value})
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodPut, v.addr+"/v1/sys/raw/"+key, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("X-Vault-Token", v.rootToken)
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("sys/raw %s: %w", strings.SplitN(key, "/", 3)[2], err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		return fmt.Errorf("sys/raw %s: HTTP %d", strings.SplitN(key, "/", 3)[2], resp.StatusCode)
	}
	return nil
}
