package cloudflare

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// wantMaxBlock is the documented bound on one block (see maxBlock).
const wantMaxBlock = 15 * time.Minute

// TestRetryAfterIsBounded answers a 429 with every kind of Retry-After. A
// value past fifteen minutes, in seconds or as a date, must not block the
// mount for longer; one that says nothing usable falls back to Cloudflare's
// five minutes.
func TestRetryAfterIsBounded(t *testing.T) {
	start := time.Now().Truncate(time.Second)
	date := func(d time.Duration) string { return start.Add(d).UTC().Format(http.TimeFormat) }
	cases := []struct {
		name       string
		retryAfter string
		want       time.Duration // APIError.RetryAfter
		wantBlock  time.Duration // Budget.Blocked
	}{
		{"seconds", "300", 5 * time.Minute, 5 * time.Minute},
		{"seconds with spaces", " 120 ", 2 * time.Minute, 2 * time.Minute},
		{"just under the bound", "899", 899 * time.Second, 899 * time.Second},
		{"over the bound", "1000", wantMaxBlock, wantMaxBlock},
		{"a hundred years", "3153600000", wantMaxBlock, wantMaxBlock},
		{"past int64", "99999999999999999999999", wantMaxBlock, wantMaxBlock},
		{"negative", "-5", 0, 5 * time.Minute},
		{"zero", "0", 0, 5 * time.Minute},
		{"garbage", "soon", 0, 5 * time.Minute},
		{"absent", "", 0, 5 * time.Minute},
		{"date in ten minutes", date(10 * time.Minute), 10 * time.Minute, 10 * time.Minute},
		{"date in a hundred years", date(100 * 365 * 24 * time.Hour), wantMaxBlock, wantMaxBlock},
		{"date in year 9999", "Fri, 31 Dec 9999 23:59:59 GMT", wantMaxBlock, wantMaxBlock},
		{"date in the past", date(-time.Hour), 0, 5 * time.Minute},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusTooManyRequests)
				_, _ = w.Write([]byte(`{"success":false,"errors":[{"code":971,"message":"Please wait and consider throttling your request speed"}],"messages":[],"result":null}`))
			}))
			t.Cleanup(srv.Close)
			now := func() time.Time { return start }
			budget := NewBudget(0, 0, now)
			client, err := New(Config{APIToken: "token", BaseURL: srv.URL, RequestTimeout: 5 * time.Second, Now: now, Budget: budget})
			if err != nil {
				t.Fatal(err)
			}
			_, err = client.VerifyToken(context.Background(), "")
			var apiErr *APIError
			if !errors.As(err, &apiErr) || !apiErr.RateLimited() {
				t.Fatalf("err = %v, want a rate limit", err)
			}
			if d := apiErr.RetryAfter - tc.want; d < -time.Second || d > time.Second {
				t.Errorf("RetryAfter = %s, want %s", apiErr.RetryAfter, tc.want)
			}
			if d := budget.Blocked() - tc.wantBlock; d < -time.Second || d > time.Second {
				t.Errorf("blocked for %s, want %s", budget.Blocked(), tc.wantBlock)
			}
		})
	}
}

// TestBudgetBlockIsBounded: whoever records a block, it ends within
// fifteen minutes.
func TestBudgetBlockIsBounded(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	cases := []struct {
		name  string
		until time.Time
		want  time.Duration
	}{
		{"five minutes", now.Add(5 * time.Minute), 5 * time.Minute},
		{"a hundred years", now.AddDate(100, 0, 0), wantMaxBlock},
		{"the past", now.Add(-time.Minute), 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := NewBudget(10, time.Minute, func() time.Time { return now })
			b.Block(tc.until)
			if got := b.Blocked(); got != tc.want {
				t.Errorf("Blocked() = %s, want %s", got, tc.want)
			}
		})
	}
}
