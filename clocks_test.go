package main

// What a time proves when clocks disagree, step or are not Cloudflare's:
// sequences that once made Vault say current for a key the edge does not
// use, or forget a first rotation whose outcome was unknown. Each test says
// what it proves and what it printed before its fix.

import (
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// edgeClock is Cloudflare's clock in these tests, set by hand: the
// sub-second part of Cloudflare's time is then known, so that two keys are
// made in one whole second on purpose, not by chance of the real clock.
type edgeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *edgeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *edgeClock) set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

// newHandClockedEnv is newConfiguredEnv (request_timeout 1s) with
// Cloudflare's clock set by hand at whole-second precision, and the test
// tunnel created afresh at created on that clock. It returns the env and
// Cloudflare's clock.
func newHandClockedEnv(t *testing.T, created time.Time, precision time.Duration) (*testEnv, *edgeClock) {
	t.Helper()
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"request_timeout": "1s"}))
	edge := &edgeClock{t: created}
	env.sim.SetClock(edge.now)
	env.sim.SetTimestampPrecision(precision)
	env.tunnel = env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{})
	return env, edge
}

// assertNotCurrentForAnotherKey fails if Vault says current for a key the
// edge does not use, reading storage (no reconciliation) and then the API.
func assertNotCurrentForAnotherKey(t *testing.T, env *testEnv, when string) {
	t.Helper()
	edge := env.edge()
	if rec := storedRecord(t, env); rec != nil && rec.Current() && rec.PSK != edge.PSK {
		t.Errorf("%s: the stored record is current, version %d, last_generated_on %s, but the edge uses another key (generated %s; %d generated since the tunnel's first)",
			when, rec.Version, store.FormatTime(rec.LastGeneratedOn), store.FormatTime(edge.PSKGeneratedOn), env.generations())
	}
	resp, err := env.request(logical.ReadOperation, env.pskPath(), nil)
	if err == nil && resp != nil && resp.Data["state"] == store.StateCurrent && resp.Data["psk"] != edge.PSK {
		t.Errorf("%s: a psk read answers state current with a key the edge does not use", when)
	}
}

// TestAClockStepProvesNothingAboutALostRotation: the proof
// storedLongBefore draws from Vault's own clock (StoredAt at least
// settleMargin+1s before RotationStartedAt) is false when Vault's clock is
// stepped forward between the two, which is what ntpd does to a node whose
// clock ran 15 s behind (within the issue's ±60 s): it steps it, here to 5 s
// ahead. (A failover to a node whose clock is more than 10 s ahead is the
// same mechanism, though a failover seldom completes within the one
// Cloudflare second the sequence needs.)
//
// Sequence, at whole-second precision: a write stores key K (generated at
// Cloudflare second X); Vault's clock is stepped +20 s; less than a second
// later at Cloudflare another write's answer is lost after Cloudflare made
// key R, also in second X. Reconciliation finds last_generated_on = X =
// EdgeKeyBefore, and storedLongBefore (20 s by Vault's clock) "proves" the
// edge still has K: the record goes back to current with K. The edge uses R,
// and the drift sweep (edge X not after X) never finds it.
//
// Before the fix it printed:
//
//	after reconciliation: the stored record is current, version 1, last_generated_on <X>, but the edge uses another key (generated <X>; 2 generated since the tunnel's first)
//	after reconciliation: a psk read answers state current with a key the edge does not use
//	(and the same after a background pass and the drift sweep)
func TestAClockStepProvesNothingAboutALostRotation(t *testing.T) {
	// Cloudflare 15 s ahead of Vault; 0.1 s into a second.
	base := time.Now().Add(15 * time.Second).Truncate(time.Second).Add(100 * time.Millisecond)
	env, edge := newHandClockedEnv(t, base.Add(-100*time.Second), time.Second)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m"}))

	edge.set(base)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	stored := storedRecord(t, env)

	// ntpd steps Vault's clock from 15 s behind Cloudflare to 5 s ahead;
	// 0.3 s pass at Cloudflare.
	env.clock.Advance(20 * time.Second)
	edge.set(base.Add(300 * time.Millisecond))
	mustFail(t, env, cloudflaresim.Fault{Status: 500, AfterCommit: true})
	if got := env.edge(); env.generations() != 2 || !got.PSKGeneratedOn.Equal(stored.LastGeneratedOn) {
		t.Fatalf("setup: want the lost rotation's key in the stored key's second: %d generated, edge %s, stored %s",
			env.generations(), store.FormatTime(got.PSKGeneratedOn), store.FormatTime(stored.LastGeneratedOn))
	}

	// Past the settle window on both clocks.
	env.clock.Advance(time.Hour)
	edge.set(base.Add(time.Hour))
	_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
	assertNotCurrentForAnotherKey(t, env, "after reconciliation")

	env.clock.Advance(2 * time.Minute)
	edge.set(base.Add(time.Hour + 2*time.Minute))
	backgroundPass(t, env)
	assertNotCurrentForAnotherKey(t, env, "after a background pass and the drift sweep")
}

// dateRewritingProxy is a reverse proxy in front of the simulator that, as
// nginx does by default (proxy_pass does not pass the upstream's Date; nginx
// sends its own), answers with a Date from its own clock. The engine reaches
// Cloudflare through it (config base_url).
func dateRewritingProxy(t *testing.T, env *testEnv, clock func() time.Time) {
	t.Helper()
	upstream, err := url.Parse(env.simURL)
	if err != nil {
		t.Fatal(err)
	}
	upstream.Path = ""
	proxy := httputil.NewSingleHostReverseProxy(upstream)
	proxy.ModifyResponse = func(res *http.Response) error {
		res.Header.Set("Date", clock().UTC().Format(http.TimeFormat))
		return nil
	}
	srv := httptest.NewServer(proxy)
	t.Cleanup(srv.Close)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"base_url": srv.URL + cloudflaresim.BasePath, "api_token": env.token.Value}))
}

// TestADateFromAnotherClockProvesNothing: the Date
// "proof" (Date >= before+1s) holds only if the Date and last_generated_on
// come from one clock, with no margin at all. A proxy at base_url that sets
// its own Date (nginx does by default) on Vault's host gives Vault's clock
// back to the engine: the very case (Vault 10 s ahead of Cloudflare)
// returns, and a lost first rotation is forgotten again. The same Date makes
// a later lost rotation current for the replaced key.
//
// First rotation: a tunnel created at Cloudflare second X (Terraform makes it
// and, in that second, writes Vault's path); the read before the rotation
// shows its key at X, dated X+10 by the proxy; the rotation's answer is lost
// after Cloudflare made key R, also at X. Reconciliation finds X = X, the
// Date "proves" it unchanged: edgeNeverRotated, the record is deleted.
// Directly to Cloudflare the same sequence is undecided and healed.
//
// Before the fix it printed:
//
//	--- FAIL: .../via a proxy on Vault's host, first rotation
//	    after reconciliation: the record is gone, and the edge uses a key nobody holds (1 generated)
//	--- FAIL: .../via a proxy on Vault's host, later rotation
//	    after reconciliation: the stored record is current, version 1, ..., but the edge uses another key (...; 2 generated ...)
//
// and passed for "direct" (healed).
func TestADateFromAnotherClockProvesNothing(t *testing.T) {
	for _, tc := range []struct {
		name     string
		proxy    bool
		previous bool // a key is stored (written in second X) before the lost rotation
	}{
		{"direct, first rotation", false, false},
		{"via a proxy on Vault's host, first rotation", true, false},
		{"direct, later rotation", false, true},
		{"via a proxy on Vault's host, later rotation", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Cloudflare 10 s behind Vault, 0.1 s into a second.
			base := time.Now().Add(-10 * time.Second).Truncate(time.Second).Add(100 * time.Millisecond)
			created := base
			if tc.previous {
				created = base.Add(-100 * time.Second)
			}
			env, edge := newHandClockedEnv(t, created, time.Second)
			if tc.proxy {
				dateRewritingProxy(t, env, env.clock.Now)
			}
			edge.set(base.Add(200 * time.Millisecond))
			if tc.previous {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			}
			before := env.generations()
			edge.set(base.Add(300 * time.Millisecond))
			mustFail(t, env, cloudflaresim.Fault{Status: 500, AfterCommit: true})
			if env.generations() != before+1 {
				t.Fatalf("setup: the lost rotation made no key")
			}

			env.clock.Advance(time.Minute)
			edge.set(base.Add(time.Minute))
			_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
			if storedRecord(t, env) == nil {
				t.Fatalf("after reconciliation: the record is gone, and the edge uses a key nobody holds (%d generated)", env.generations())
			}
			assertNotCurrentForAnotherKey(t, env, "after reconciliation")
		})
	}
}

// TestAnOlderEdgeKeyIsDrift: compareLocked takes an
// edge key older than the stored one as in sync (!edge.After(stored)), while
// keyChangeSince (the same merge) calls any other time a change. The edge's
// key can be older than the stored one only if Cloudflare's own clock (the
// one that stamps last_generated_on) steps back, e.g. an NTP correction at
// Cloudflare or an API server whose clock is seconds behind another's; with
// a monotonic Cloudflare clock this is harmless. With a 5 s step back:
// the stored key K is at X, a key made outside Vault is at X-5, and the drift
// sweep leaves K current for ever.
//
// Before the fix it printed:
//
//	after the drift sweep: the stored record is current, version 1, last_generated_on <X>, but the edge uses another key (generated <X-5s>; 2 generated ...)
//	after the drift sweep: a psk read answers state current with a key the edge does not use
func TestAnOlderEdgeKeyIsDrift(t *testing.T) {
	base := time.Now().Truncate(time.Second).Add(100 * time.Millisecond)
	env, edge := newHandClockedEnv(t, base.Add(-100*time.Second), time.Second)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m"}))
	edge.set(base)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

	edge.set(base.Add(-5 * time.Second)) // Cloudflare's clock steps back 5 s
	env.sim.RegenerateOutOfBand(env.account, env.tunnel.ID)

	env.clock.Advance(2 * time.Minute)
	edge.set(base.Add(2 * time.Minute))
	lists := env.sim.Calls(cloudflaresim.OpTunnelList)
	backgroundPass(t, env)
	if env.sim.Calls(cloudflaresim.OpTunnelList) == lists {
		t.Fatal("setup: the drift sweep did not run")
	}
	assertNotCurrentForAnotherKey(t, env, "after the drift sweep")
}

// TestARefusedHealNeverCallsTheReplacedKeyCurrent: reconcileLocked
// heals a rotation_unknown record from healing := *rec with EdgeKeyBefore
// set to the edge's key now (the lost rotation's key R), and passes it to
// rotateLocked as previous. When Cloudflare refuses the heal (a 429 in a
// heal storm, any 4xx in its envelope, the mount's rate-limit block or
// budget: NoEffect), generateLocked restores previous: the record goes back
// to rotation_unknown, EdgeKeyForeign false, but with EdgeKeyBefore = R (and
// EdgeKeyBeforeSeenAt = the reconciling read's Date). The next
// reconciliation compares the edge's key (R) with EdgeKeyBefore (R):
// "unchanged", so the stored key K is current again (later rotation), or
// the record is deleted as never rotated (first rotation). No clock skew is
// needed.
//
//   - µs, later rotation: a read answers current with K; the drift sweep
//     finds R after K at its next run (up to drift_check_interval later).
//     New in this merge: judgeEdge used to compare with LastGeneratedOn.
//   - whole seconds, R in K's second: the same, and the drift sweep (R not
//     after K) never finds it: current for a key the edge does not use, for
//     ever. New in this merge.
//   - first rotation: the record is deleted while the edge uses R, which
//     nobody holds, and no sweep looks again. The previous version did the
//     same (sameGeneration against EdgeKeyBefore).
//
// Before the fix it printed:
//
//	µs, later rotation: after the refused heal, a read: a psk read answers state current with a key the edge does not use
//	whole second, later rotation: after the refused heal, a read: ... current, version 1 ... but the edge uses another key ...
//	whole second, later rotation: after a background pass with the drift sweep: (the same)
//	µs, first rotation: after the refused heal, a read: the record is gone, and the edge uses a key nobody holds (1 generated)
func TestARefusedHealNeverCallsTheReplacedKeyCurrent(t *testing.T) {
	for _, tc := range []struct {
		name      string
		precision time.Duration
		first     bool
		refusal   cloudflaresim.Fault
	}{
		{"µs, later rotation, 429", time.Microsecond, false, cloudflaresim.Fault{Status: http.StatusTooManyRequests, RetryAfter: 1}},
		{"µs, later rotation, 400", time.Microsecond, false, cloudflaresim.Fault{Status: http.StatusBadRequest}},
		{"whole second, later rotation, 429", time.Second, false, cloudflaresim.Fault{Status: http.StatusTooManyRequests, RetryAfter: 1}},
		{"µs, first rotation, 429", time.Microsecond, true, cloudflaresim.Fault{Status: http.StatusTooManyRequests, RetryAfter: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := time.Now().Truncate(time.Second).Add(100 * time.Millisecond)
			env, edge := newHandClockedEnv(t, base.Add(-100*time.Second), tc.precision)
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "1m"}))
			edge.set(base)
			if !tc.first {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			}
			edge.set(base.Add(300 * time.Millisecond))
			mustFail(t, env, cloudflaresim.Fault{Status: 500, AfterCommit: true})
			lost := env.generations()

			// Past the settle window: a read heals, and Cloudflare refuses
			// the heal.
			env.clock.Advance(time.Minute)
			edge.set(base.Add(time.Minute))
			env.sim.FailNext(cloudflaresim.OpPSKGenerate, tc.refusal)
			asked := env.sim.Calls(cloudflaresim.OpPSKGenerate)
			_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
			if env.sim.Calls(cloudflaresim.OpPSKGenerate) != asked+1 || env.generations() != lost {
				t.Fatalf("setup: the read did not ask for a heal, or the refused heal made a key")
			}
			if rec := storedRecord(t, env); rec == nil || rec.State != store.StateRotationUnknown {
				t.Fatalf("setup: after the refused heal the record is %+v", rec)
			}

			// Past the rate-limit block, a read.
			env.clock.Advance(5 * time.Second)
			edge.set(base.Add(time.Minute + 5*time.Second))
			_, _ = env.request(logical.ReadOperation, env.pskPath(), nil)
			if storedRecord(t, env) == nil {
				t.Fatalf("after the refused heal, a read: the record is gone, and the edge uses a key nobody holds (%d generated)", env.generations())
			}
			assertNotCurrentForAnotherKey(t, env, "after the refused heal, a read")
			if tc.precision == time.Second {
				env.clock.Advance(2 * time.Minute)
				edge.set(base.Add(3 * time.Minute))
				backgroundPass(t, env)
				assertNotCurrentForAnotherKey(t, env, "after a background pass with the drift sweep")
			}
		})
	}
}

// TestKeysAfterALostAnswerAtWholeSeconds (review of fd4a21b) counts the
// keys Cloudflare generates, at whole-second precision, when an answer is
// lost in ordinary sequences, with the margins fd4a21b set (a Date 61 s past
// the key's second, or the stored key stored 131 s before the attempt). A
// heal that follows a lost request that made no key is one key more than
// needed; one that follows a request that did is needed (Vault does not hold
// the edge's key). It held, and the counts are what it shows:
//
//	rotation, another 1h later lost before Cloudflare acted: 0 (proven by StoredAt)
//	tunnel created, first write 30s later lost before Cloudflare acted: 1 (before fd4a21b: 0, the Date 30 s on was proof)
//	rotation, another 60s later lost before Cloudflare acted: 1 (before fd4a21b: 0, 11 s of StoredAt was proof)
//	... lost after Cloudflare acted: 1 heal in each (needed)
//
// The extra key in the second and third comes only after a lost answer,
// replaces a key that was asked for, and is what the guarantee costs when
// nothing can tell two keys in one second apart: acceptable.
func TestKeysAfterALostAnswerAtWholeSeconds(t *testing.T) {
	for _, tc := range []struct {
		name      string
		written   bool          // a key is stored before the lost write
		gap       time.Duration // from the tunnel's last key to the lost write
		committed bool          // Cloudflare made the lost write's key
		want      int           // keys the background makes afterwards
	}{
		{"rotation, another 1h later lost before Cloudflare acted", true, time.Hour, false, 0},
		{"rotation, another 1h later lost after Cloudflare acted", true, time.Hour, true, 1},
		{"tunnel created, first write 30s later lost before Cloudflare acted", false, 30 * time.Second, false, 1},
		{"tunnel created, first write 30s later lost after Cloudflare acted", false, 30 * time.Second, true, 1},
		{"rotation, another 60s later lost before Cloudflare acted", true, time.Minute, false, 1},
		{"rotation, another 60s later lost after Cloudflare acted", true, time.Minute, true, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := time.Now().Truncate(time.Second).Add(100 * time.Millisecond)
			env, edge := newHandClockedEnv(t, base, time.Second)
			if tc.written {
				env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			}
			env.clock.Advance(tc.gap)
			edge.set(base.Add(tc.gap))
			mustFail(t, env, cloudflaresim.Fault{Status: 500, AfterCommit: tc.committed})
			lost := env.generations()
			env.clock.Advance(time.Hour)
			edge.set(base.Add(tc.gap + time.Hour))
			backgroundPass(t, env)
			got := env.generations() - lost
			t.Logf("%d key(s) after the lost answer", got)
			if got != tc.want {
				t.Errorf("%d key(s) after the lost answer, want %d", got, tc.want)
			}
			assertNotCurrentForAnotherKey(t, env, "afterwards")
		})
	}
}
