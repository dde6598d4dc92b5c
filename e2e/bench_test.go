package e2e

import (
	"bytes"
	"net/http"
	"sort"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// These benchmarks run against a real Vault server; `make bench` runs them
// with -benchtime=1x, each measuring a fixed number of requests and
// reporting medians, so a run is comparable with another on the same machine.

const benchRequests = 2000

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func timeRequest(b *testing.B, client *http.Client, req func() *http.Request) time.Duration {
	start := time.Now()
	resp, err := client.Do(req())
	if err != nil {
		b.Fatal(err)
	}
	_, _ = bytes.NewBuffer(nil).ReadFrom(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.Fatalf("HTTP %d", resp.StatusCode)
	}
	return time.Since(start)
}

// BenchmarkPSKReadVsKVv2Read reads a stored PSK and a KV v2 secret on the same
// server, alternately, and reports both medians and their ratio.
func BenchmarkPSKReadVsKVv2Read(b *testing.B) {
	t := b
	sim, baseURL, secrets, token, account := newEdge(b)
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	v := startDevServerAt(b, secrets, "info")
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, v.rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+tunnel)
	v.mustVault(t, v.rootToken, "kv", "put", "secret/router", "psk=not-a-real-key-0123456789")
	client := &http.Client{}
	get := func(path string) func() *http.Request {
		return func() *http.Request {
			req, _ := http.NewRequest("GET", v.addr+"/v1/"+path, nil)
			req.Header.Set("X-Vault-Token", v.rootToken)
			return req
		}
	}
	pskReq, kvReq := get("cloudflare-ipsec/psk/"+account+"/"+tunnel), get("secret/data/router")
	for i := 0; i < 200; i++ { // warm up both paths
		timeRequest(b, client, pskReq)
		timeRequest(b, client, kvReq)
	}
	var psk, kv []time.Duration
	b.ResetTimer()
	for i := 0; i < benchRequests; i++ {
		psk = append(psk, timeRequest(b, client, pskReq))
		kv = append(kv, timeRequest(b, client, kvReq))
	}
	b.StopTimer()
	pm, km := median(psk), median(kv)
	b.ReportMetric(float64(pm.Microseconds()), "psk-median-µs")
	b.ReportMetric(float64(km.Microseconds()), "kv-median-µs")
	b.ReportMetric(float64(pm)/float64(km), "psk/kv-ratio")

	// The floor: a path-help request crosses into the plugin and back but
	// touches no storage, so it measures the external-plugin round trip on
	// this machine. (Measured after the timer: ResetTimer clears metrics.)
	helpReq := get("cloudflare-ipsec/psk/" + account + "/" + tunnel + "?help=1")
	var help []time.Duration
	for i := 0; i < benchRequests; i++ {
		help = append(help, timeRequest(b, client, helpReq))
		timeRequest(b, client, kvReq)
	}
	b.ReportMetric(float64(median(help))/float64(km), "plugin-floor/kv-ratio")
}

// BenchmarkRotationOverhead compares a rotation through Vault (HTTP API
// write of psk/...) with the bare psk_generate call to the same simulator,
// and reports the engine's overhead as the difference of the medians.
func BenchmarkRotationOverhead(b *testing.B) {
	t := b
	sim, baseURL, secrets, token, account := newEdge(b)
	viaVault := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	bare := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	v := startDevServerAt(b, secrets, "info")
	v.mountEngine(t, baseURL, token.Value)
	client := &http.Client{}
	rotate := func() *http.Request {
		req, _ := http.NewRequest("POST", v.addr+"/v1/cloudflare-ipsec/psk/"+account+"/"+viaVault, bytes.NewReader([]byte("{}")))
		req.Header.Set("X-Vault-Token", v.rootToken)
		return req
	}
	generate := func() *http.Request {
		req, _ := http.NewRequest("POST", baseURL+"/accounts/"+account+"/magic/ipsec_tunnels/"+bare+"/psk_generate", bytes.NewReader([]byte("{}")))
		req.Header.Set("Authorization", "Bearer "+token.Value)
		req.Header.Set("Content-Type", "application/json")
		return req
	}
	const n = 500 // within the default budget of 600 calls per 5 minutes
	for i := 0; i < 20; i++ {
		timeRequest(b, client, generate)
	}
	var viaVaultTimes, bareTimes []time.Duration
	b.ResetTimer()
	for i := 0; i < n; i++ {
		viaVaultTimes = append(viaVaultTimes, timeRequest(b, client, rotate))
		bareTimes = append(bareTimes, timeRequest(b, client, generate))
	}
	b.StopTimer()
	vm, bm := median(viaVaultTimes), median(bareTimes)
	b.ReportMetric(float64(vm.Microseconds())/1000, "rotate-median-ms")
	b.ReportMetric(float64(bm.Microseconds())/1000, "bare-generate-median-ms")
	b.ReportMetric(float64((vm-bm).Microseconds())/1000, "overhead-ms")
}

// BenchmarkAgentRotationLag is the fifth figure: how long after a scheduled
// rotation changed the edge's key a long-running Vault Agent with default
// settings rendered the new key (the median over the run's rotations, one a
// minute, so a run takes about four minutes).
func BenchmarkAgentRotationLag(b *testing.B) {
	lags := measureAgentLag(b, 3)
	b.ReportMetric(float64(median(lags).Milliseconds()), "agent-lag-median-ms")
	var worst time.Duration
	for _, l := range lags {
		worst = max(worst, l)
	}
	b.ReportMetric(float64(worst.Milliseconds()), "agent-lag-max-ms")
}

// BenchmarkRouterOutagePerScheduledRotation is the sixth figure: how long a
// strongSwan router fed by a long-running Vault Agent stays down after a
// scheduled rotation changed the edge's key, with an edge that deletes the
// IKE SA at a key change, until its IKE SA is ESTABLISHED again with the new
// key (TestRouterReconnectsAfterEveryRotation's run, without its failure
// steps; the median over three rotations, one a minute, so a run takes
// about four minutes). It needs root and strongSwan.
func BenchmarkRouterOutagePerScheduledRotation(b *testing.B) {
	outages := runIKEv2(b, 3, false, "cloudflare")
	b.ReportMetric(float64(median(outages).Milliseconds()), "outage-median-ms")
	var worst time.Duration
	for _, o := range outages {
		worst = max(worst, o)
	}
	b.ReportMetric(float64(worst.Milliseconds()), "outage-max-ms")
}

// BenchmarkRouterOutageWhenTheEdgeKeepsTheSA is the seventh figure, beside
// the sixth: the same router with an edge that keeps the IKE SA at a key
// change (TestRouterStaysUpWhenTheEdgeKeepsTheSA's run). The outage is how
// long the router was without its IKE SA, zero when the SA lived through
// the rotation; reload is from the edge's key change to the end of Agent's
// render and swanctl-reload.sh, when the router holds the new key. Medians
// over three rotations, one a minute; it needs root and strongSwan.
func BenchmarkRouterOutageWhenTheEdgeKeepsTheSA(b *testing.B) {
	rots := runIKEv2KeepsSA(b, 3)
	var outages, reloads []time.Duration
	disturbed := 0
	for _, r := range rots {
		outages = append(outages, r.outage)
		reloads = append(reloads, r.reloaded)
		if len(r.disturbed) > 0 {
			disturbed++
		}
	}
	var worst time.Duration
	for _, o := range outages {
		worst = max(worst, o)
	}
	b.ReportMetric(float64(median(outages).Milliseconds()), "keep-sa-outage-median-ms")
	b.ReportMetric(float64(worst.Milliseconds()), "keep-sa-outage-max-ms")
	b.ReportMetric(float64(disturbed), "keep-sa-disturbed-rotations")
	b.ReportMetric(float64(median(reloads).Milliseconds()), "reload-median-ms")
}

// BenchmarkUnmanagedAccountOnVault takes an account of 10,000 tunnels Vault
// does not manage under Vault with one rotate/<account>
// include_unmanaged=true and key_source vault, on a real Vault server (a
// dev server at log level info), against a simulator enforcing
// Cloudflare's limit of 1,200 calls per five minutes in real time. It
// reports the time from the write until rotate/ reads done = 10,000, and
// then checks, tunnel by tunnel, that Vault serves the edge's key current.
func BenchmarkUnmanagedAccountOnVault(b *testing.B) {
	const fleet = 10000
	sim, baseURL, secrets, token, account := newEdge(b)
	sim.SetRateLimit(1200, 5*time.Minute)
	var ids []string
	for i := 0; i < fleet; i++ {
		ids = append(ids, sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID)
	}
	v := startDevServerAt(b, secrets, "info")
	v.mountEngine(b, baseURL, token.Value)
	v.mustVault(b, v.rootToken, "write", "cloudflare-ipsec/config", "key_source=vault")
	keyCalls := func() int { return sim.Calls(cloudflaresim.OpPSKSet) + sim.Calls(cloudflaresim.OpPSKGenerate) }
	calls, before := sim.TotalCalls(), keyCalls()
	b.ResetTimer()
	start := time.Now()
	v.mustVault(b, v.rootToken, "write", "cloudflare-ipsec/rotate/"+account, "include_unmanaged=true")
	queuedIn := time.Since(start)
	for deadline := start.Add(10 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		status, p := v.api(b, v.rootToken, "GET", "cloudflare-ipsec/rotate/"+account, nil)
		data, _ := p["data"].(map[string]any)
		if status == http.StatusOK && data["done"] == float64(fleet) {
			break
		}
		if time.Now().After(deadline) || data["failed_count"] != float64(0) {
			b.Fatalf("the job did not finish in 10m, or failed: HTTP %d %v", status, data)
		}
	}
	total := time.Since(start)
	b.StopTimer()
	for _, id := range ids {
		status, read := v.api(b, v.rootToken, "GET", "cloudflare-ipsec/psk/"+account+"/"+id, nil)
		edge, _ := sim.Tunnel(account, id)
		if data, _ := read["data"].(map[string]any); status != http.StatusOK || data["state"] != "current" || data["psk"] != edge.PSK {
			b.Fatalf("tunnel %s: HTTP %d, state %v, key is the edge's: %v", id, status, data["state"], data["psk"] == edge.PSK)
		}
	}
	b.ReportMetric(total.Seconds(), "s-total")
	b.ReportMetric(queuedIn.Seconds(), "s-queue")
	b.ReportMetric(float64(keyCalls()-before), "key-calls")
	b.ReportMetric(float64(sim.TotalCalls()-calls), "calls")
	b.ReportMetric(float64(sim.RateLimited()), "429s")
}
