package cloudflare

import (
	"context"
	"errors"
	"net/http/httptest"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestBudgetFollowsCloudflaresCount: another client of the same Cloudflare
// user spends most of the quota; after one call of its own, our client's
// Budget knows what is left, and once nothing is, it sends nothing more.
func TestBudgetFollowsCloudflaresCount(t *testing.T) {
	const quota, spentElsewhere = 100, 90
	sim := cloudflaresim.New()
	srv := newSimServer(t, sim)
	sim.SetRateLimit(quota, time.Minute)
	ours := sim.AddToken(cloudflaresim.Token{User: "alice"})
	theirs := sim.AddToken(cloudflaresim.Token{User: "alice"})
	budget := NewBudget(quota, time.Minute, nil)
	client, err := New(Config{APIToken: ours.Value, BaseURL: srv, RequestTimeout: 5 * time.Second, Budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	other, err := New(Config{APIToken: theirs.Value, BaseURL: srv, RequestTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < spentElsewhere; i++ {
		if _, err := other.VerifyToken(context.Background(), ""); err != nil {
			t.Fatal(err)
		}
	}
	if free, _ := budget.Free(); free != quota {
		t.Fatalf("before any call, Free() = %d, want %d", free, quota)
	}
	if _, err := client.VerifyToken(context.Background(), ""); err != nil {
		t.Fatal(err)
	}
	left := quota - spentElsewhere - 1
	if free, _ := budget.Free(); free != left {
		t.Fatalf("after one call, Free() = %d, want the %d Cloudflare said remain", free, left)
	}
	for i := 0; i < left; i++ {
		if _, err := client.VerifyToken(context.Background(), ""); err != nil {
			t.Fatalf("call %d of the %d left: %v", i+1, left, err)
		}
	}
	free, wait := budget.Free()
	if free != 0 || wait <= 0 || wait > time.Minute {
		t.Fatalf("with nothing left, Free() = %d, %s", free, wait)
	}
	sent := sim.Calls(cloudflaresim.OpUserTokenVerify)
	_, err = client.VerifyToken(context.Background(), "")
	var budgetErr *BudgetError
	if !errors.As(err, &budgetErr) || !budgetErr.FromCloudflare || budgetErr.RetryAfter <= 0 || budgetErr.RetryAfter > time.Minute || budgetErr.Op != OpVerifyToken {
		t.Fatalf("err = %#v, want a BudgetError from Cloudflare's count", err)
	}
	if n := sim.Calls(cloudflaresim.OpUserTokenVerify); n != sent || sim.RateLimited() != 0 {
		t.Errorf("a call was sent although Cloudflare said none remain (%d sent, %d refused)", n-sent, sim.RateLimited())
	}
}

func newSimServer(t *testing.T, sim *cloudflaresim.Server) string {
	t.Helper()
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	return srv.URL + cloudflaresim.BasePath
}

// TestParseRatelimit reads Cloudflare's Ratelimit header and refuses
// anything it cannot trust.
func TestParseRatelimit(t *testing.T) {
	cases := []struct {
		name      string
		values    []string
		ok        bool
		remaining int
		reset     time.Duration
	}{
		{"documented example", []string{`"default";r=50;t=30`}, true, 50, 30 * time.Second},
		{"token name", []string{`default;r=50;t=30`}, true, 50, 30 * time.Second},
		{"spaces", []string{` "default" ; r=50 ; t=30 `}, true, 50, 30 * time.Second},
		{"params in any order", []string{`"default";t=30;r=50`}, true, 50, 30 * time.Second},
		{"unknown params", []string{`"default";r=50;t=30;pk=:YWJj:`}, true, 50, 30 * time.Second},
		{"nothing left", []string{`"default";r=0;t=280`}, true, 0, 280 * time.Second},
		{"two limits: the tighter", []string{`"default";r=50;t=30, "burst";r=2;t=5`}, true, 2, 5 * time.Second},
		{"two header lines", []string{`"default";r=50;t=30`, `"burst";r=2;t=5`}, true, 2, 5 * time.Second},
		{"comma inside a name", []string{`"a,b";r=7;t=9`}, true, 7, 9 * time.Second},
		{"one good item among garbage", []string{`junk, "default";r=5;t=60, ;;;`}, true, 5, time.Minute},
		{"reset past the bound", []string{`"default";r=5;t=3153600000`}, true, 5, wantMaxBlock},
		{"absent", nil, false, 0, 0},
		{"empty", []string{``}, false, 0, 0},
		{"garbage", []string{`soon`}, false, 0, 0},
		{"no reset", []string{`"default";r=5`}, false, 0, 0},
		{"no remaining", []string{`"default";t=5`}, false, 0, 0},
		{"negative remaining", []string{`"default";r=-1;t=5`}, false, 0, 0},
		{"negative reset", []string{`"default";r=1;t=-5`}, false, 0, 0},
		{"zero reset", []string{`"default";r=1;t=0`}, false, 0, 0},
		{"decimal", []string{`"default";r=1.5;t=5`}, false, 0, 0},
		{"remaining past int64", []string{`"default";r=99999999999999999999;t=5`}, false, 0, 0},
		{"unterminated quote", []string{`"default;r=1;t=5`}, false, 0, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			remaining, reset, ok := parseRatelimit(tc.values)
			if ok != tc.ok || remaining != tc.remaining || reset != tc.reset {
				t.Errorf("parseRatelimit(%q) = %d, %s, %v; want %d, %s, %v", tc.values, remaining, reset, ok, tc.remaining, tc.reset, tc.ok)
			}
		})
	}
}
