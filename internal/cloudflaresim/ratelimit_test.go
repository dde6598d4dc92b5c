package cloudflaresim_test

import (
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

var (
	rateLimitHeader  = regexp.MustCompile(`^"default";r=(\d+);t=(\d+)$`)
	rateLimitPolicy  = regexp.MustCompile(`^"default";q=(\d+);w=(\d+)$`)
	rateLimitWindow  = time.Minute
	rateLimitPerUser = 10
)

// TestRateLimitIsPerUserAndAnnounced plays calls from several tokens and
// checks the Ratelimit and Ratelimit-Policy headers of each answer: tokens
// of one user share a window, a token without a user is its own, and an
// account-owned token has its own limit whatever its user.
func TestRateLimitIsPerUserAndAnnounced(t *testing.T) {
	f := newFixture(t)
	f.sim.SetRateLimit(rateLimitPerUser, rateLimitWindow)
	tokens := map[string]cloudflaresim.Token{
		"alice1": f.sim.AddToken(cloudflaresim.Token{User: "alice"}),
		"alice2": f.sim.AddToken(cloudflaresim.Token{User: "alice"}),
		"bob":    f.sim.AddToken(cloudflaresim.Token{User: "bob"}),
		"solo":   f.sim.AddToken(cloudflaresim.Token{}),
		"owned":  f.sim.AddToken(cloudflaresim.Token{User: "alice", OwnerAccount: f.account}),
	}
	verify := func(name string) string {
		if tokens[name].OwnerAccount != "" {
			return "/accounts/" + f.account + "/tokens/verify"
		}
		return "/user/tokens/verify"
	}
	steps := []struct {
		token         string
		fault         bool
		wantStatus    int
		wantRemaining int
	}{
		{"alice1", false, 200, 9},
		{"alice2", false, 200, 8},
		{"alice1", true, 503, 7}, // a failure answers with the headers too
		{"bob", false, 200, 9},
		{"solo", false, 200, 9},
		{"owned", false, 200, 9},
		{"alice2", false, 200, 6},
		{"alice1", false, 200, 5},
		{"alice1", false, 200, 4},
		{"alice1", false, 200, 3},
		{"alice2", false, 200, 2},
		{"alice2", false, 200, 1},
		{"alice1", false, 200, 0},
		{"alice2", false, 429, 0},
		{"bob", false, 200, 8},
	}
	for i, step := range steps {
		if step.fault {
			f.sim.FailNext(cloudflaresim.OpUserTokenVerify, cloudflaresim.Fault{Status: 503})
		}
		res := get(t, f.url+verify(step.token), tokens[step.token].Value)
		if res.StatusCode != step.wantStatus {
			t.Fatalf("step %d (%s): status %d, want %d", i, step.token, res.StatusCode, step.wantStatus)
		}
		m := rateLimitHeader.FindStringSubmatch(res.Header.Get("Ratelimit"))
		if m == nil {
			t.Fatalf("step %d (%s): Ratelimit header %q", i, step.token, res.Header.Get("Ratelimit"))
		}
		remaining, _ := strconv.Atoi(m[1])
		reset, _ := strconv.Atoi(m[2])
		if remaining != step.wantRemaining {
			t.Errorf("step %d (%s): remaining %d, want %d", i, step.token, remaining, step.wantRemaining)
		}
		if reset < 1 || reset > int(rateLimitWindow/time.Second) {
			t.Errorf("step %d (%s): reset in %ds, want within the %s window", i, step.token, reset, rateLimitWindow)
		}
		if res.StatusCode == http.StatusTooManyRequests && res.Header.Get("Retry-After") != m[2] {
			t.Errorf("step %d (%s): Retry-After %q, Ratelimit's reset %s", i, step.token, res.Header.Get("Retry-After"), m[2])
		}
		p := rateLimitPolicy.FindStringSubmatch(res.Header.Get("Ratelimit-Policy"))
		if p == nil || p[1] != strconv.Itoa(rateLimitPerUser) || p[2] != strconv.Itoa(int(rateLimitWindow/time.Second)) {
			t.Errorf("step %d (%s): Ratelimit-Policy header %q", i, step.token, res.Header.Get("Ratelimit-Policy"))
		}
	}
}

// TestNoRateLimitHeadersWithoutALimit: a simulator that enforces no limit
// announces none.
func TestNoRateLimitHeadersWithoutALimit(t *testing.T) {
	f := newFixture(t)
	res := get(t, f.url+"/user/tokens/verify", f.token.Value)
	for _, h := range []string{"Ratelimit", "Ratelimit-Policy"} {
		if v := res.Header.Get(h); v != "" {
			t.Errorf("%s: %q", h, v)
		}
	}
}

func get(t *testing.T, url, token string) *http.Response {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = res.Body.Close()
	return res
}
