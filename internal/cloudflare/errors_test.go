package cloudflare

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestErrorQuestions holds every error a Client call can return against the
// questions the engine asks of it. NoEffect is the one that decides whether a
// failed rotation restores the record or marks it rotation_unknown, so a
// wrong true here would let Vault call a key current that the edge replaced.
func TestErrorQuestions(t *testing.T) {
	type answers struct {
		noEffect, refused, tokenRefused, timedOut, notFound, cloudflare, wrongKeyForm bool
		retryAfter                                                                    time.Duration
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
		// Only Cloudflare's own 429 proves the request was refused; one that
		// is not its envelope still means "not now".
		{"429 not in Cloudflare's envelope", &APIError{Op: OpGeneratePSK, HTTPStatus: 429, RetryAfter: 30 * time.Second, NoEnvelope: true},
			answers{cloudflare: true, retryAfter: 30 * time.Second}},
		// decodeEnvelope never makes a 4xx other than 429 without the
		// envelope into an APIError; if one is made, it proves nothing.
		{"403 not in Cloudflare's envelope", &APIError{Op: OpGeneratePSK, HTTPStatus: 403, NoEnvelope: true},
			answers{cloudflare: true}},
		{"4xx not in Cloudflare's envelope (as decoded)", &MalformedResponseError{Op: OpGeneratePSK, HTTPStatus: 403, Reason: "x"},
			answers{cloudflare: true}},
		{"500", &APIError{Op: OpGeneratePSK, HTTPStatus: 500},
			answers{cloudflare: true}},
		{"success false under 200", &APIError{Op: OpGeneratePSK, HTTPStatus: 200},
			answers{cloudflare: true}},
		{"malformed answer", &MalformedResponseError{Op: OpGeneratePSK, Reason: "x"},
			answers{cloudflare: true}},
		{"key of the wrong form", &MalformedResponseError{Op: OpGeneratePSK, Reason: "x", WrongKeyForm: true},
			answers{cloudflare: true, wrongKeyForm: true}},
		{"wrapped key of the wrong form", fmt.Errorf("generate psk: %w", &MalformedResponseError{Op: OpGeneratePSK, Reason: "x", WrongKeyForm: true}),
			answers{cloudflare: true, wrongKeyForm: true}},
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
				wrongKeyForm: WrongKeyForm(c.err),
			}
			if got != c.want {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
}

// TestOnlyCloudflaresEnvelopeIsARefusal holds decodeEnvelope to what
// NoEffect trusts: a 4xx proves that Cloudflare did nothing only when its
// body is Cloudflare's error envelope ("success": false with errors); a 4xx
// in any other form may come from whatever answers at base_url, after
// Cloudflare acted.
func TestOnlyCloudflaresEnvelopeIsARefusal(t *testing.T) {
	const refusal = `{"success":false,"errors":[{"code":1003,"message":"tunnel is being modified"}],"messages":[],"result":null}`
	cases := []struct {
		name           string
		status         int
		body           string
		noEffect, back bool // back: the engine backs off (RetryAfter > 0)
	}{
		{"403 in the envelope", 403, refusal, true, false},
		{"429 in the envelope", 429, refusal, true, true},
		{"403 HTML page", 403, "<html><body>403 Forbidden</body></html>", false, false},
		{"404 empty body", 404, "", false, false},
		{"404 JSON of another service", 404, `{"message":"no route matched"}`, false, false},
		{"400 errors without success", 400, `{"errors":[{"code":1,"message":"x"}]}`, false, false},
		{"400 success false without errors", 400, `{"success":false,"errors":[]}`, false, false},
		{"400 success true", 400, `{"success":true,"errors":[{"code":1,"message":"x"}]}`, false, false},
		{"429 HTML page", 429, "<html>Too Many Requests</html>", false, true},
		{"429 empty body", 429, "", false, true},
		{"502 HTML page", 502, "<html>Bad Gateway</html>", false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := describe(OpGeneratePSK, decodeEnvelope(c.status, http.Header{"Retry-After": {"30"}}, []byte(c.body), time.Now()))
			if got := NoEffect(err); got != c.noEffect {
				t.Errorf("NoEffect = %v, want %v (%v)", got, c.noEffect, err)
			}
			if got := RetryAfter(err) > 0; got != c.back {
				t.Errorf("backs off = %v, want %v (%v)", got, c.back, err)
			}
			if !c.noEffect && Refused(err) {
				t.Errorf("Refused: the caller would be told Cloudflare refused the request (%v)", err)
			}
			if !c.noEffect && c.status != 429 && c.status < 500 && !strings.Contains(err.Error(), "not Cloudflare's error envelope") {
				t.Errorf("the error does not say the answer is not Cloudflare's: %v", err)
			}
		})
	}
}
