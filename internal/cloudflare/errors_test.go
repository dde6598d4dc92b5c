package cloudflare

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestErrorQuestions holds every error a Client call can return against the
// questions the engine asks of it. NoEffect is the one that decides whether a
// failed rotation restores the record or marks it rotation_unknown, so a
// wrong true here would let Vault call a key current that the edge replaced.
func TestErrorQuestions(t *testing.T) {
	type answers struct {
		noEffect, refused, tokenRefused, timedOut, notFound, cloudflare bool
		retryAfter                                                      time.Duration
	}
	cases := []struct {
		name string
		err  error
		want answers
	}{
		{"400 refused", &APIError{Op: OpGeneratePSK, HTTPStatus: 400},
			answers{noEffect: true, refused: true, cloudflare: true}},
		{"404 unknown tunnel", &APIError{Op: OpGeneratePSK, HTTPStatus: 404, Errors: []Message{{Code: 1002, Message: "not found"}}},
			answers{noEffect: true, refused: true, notFound: true, cloudflare: true}},
		{"403 invalid token", &APIError{Op: OpGeneratePSK, HTTPStatus: 403, Errors: []Message{{Code: 9109, Message: "Invalid access token"}}},
			answers{noEffect: true, refused: true, tokenRefused: true, cloudflare: true}},
		{"429 with Retry-After", &APIError{Op: OpGeneratePSK, HTTPStatus: 429, RetryAfter: 30 * time.Second},
			answers{noEffect: true, cloudflare: true, retryAfter: 30 * time.Second}},
		{"429 without Retry-After", &APIError{Op: OpGeneratePSK, HTTPStatus: 429},
			answers{noEffect: true, cloudflare: true, retryAfter: time.Second}},
		{"500", &APIError{Op: OpGeneratePSK, HTTPStatus: 500},
			answers{cloudflare: true}},
		{"success false under 200", &APIError{Op: OpGeneratePSK, HTTPStatus: 200},
			answers{cloudflare: true}},
		{"malformed answer", &MalformedResponseError{Op: OpGeneratePSK, Reason: "x"},
			answers{cloudflare: true}},
		{"timeout", &TransportError{Op: OpGeneratePSK, Err: fmt.Errorf("post: %w", context.DeadlineExceeded)},
			answers{timedOut: true, cloudflare: true}},
		{"connection reset", &TransportError{Op: OpGeneratePSK, Err: errors.New("connection reset")},
			answers{cloudflare: true}},
		{"blocked, not sent", &BlockedError{Op: OpGeneratePSK, RetryAfter: 2 * time.Minute},
			answers{noEffect: true, cloudflare: true, retryAfter: 2 * time.Minute}},
		{"over budget, not sent", &BudgetError{Op: OpGeneratePSK, RetryAfter: 5 * time.Millisecond},
			answers{noEffect: true, cloudflare: true, retryAfter: 10 * time.Millisecond}},
		{"wrapped refusal", fmt.Errorf("reconcile: %w", &APIError{Op: OpGetTunnel, HTTPStatus: http.StatusNotFound}),
			answers{noEffect: true, refused: true, notFound: true, cloudflare: true}},
		{"storage error", errors.New("store psk record: disk full"),
			answers{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := answers{
				noEffect:     NoEffect(c.err),
				refused:      Refused(c.err),
				tokenRefused: TokenRefused(c.err),
				timedOut:     TimedOut(c.err),
				notFound:     NotFound(c.err),
				cloudflare:   IsCloudflare(c.err),
				retryAfter:   RetryAfter(c.err),
			}
			if got != c.want {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
}
