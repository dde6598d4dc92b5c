package cloudflare

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/cloudflare/cloudflare-go/v6/option"
)

// Op names a Cloudflare operation in errors.
type Op string

const (
	OpGeneratePSK Op = "generate psk"
	OpVerifyToken Op = "verify token"
	OpGetTunnel   Op = "get tunnel"
	OpListTunnels Op = "list tunnels"
	OpRollToken   Op = "roll token"
	OpSetPSKs     Op = "set psks"
)

// Error is implemented by every error a Client call returns, so a caller can
// tell Cloudflare's failures from its own.
type Error interface {
	error
	CloudflareOp() Op
}

func (e *APIError) CloudflareOp() Op               { return e.Op }
func (e *MalformedResponseError) CloudflareOp() Op { return e.Op }
func (e *TransportError) CloudflareOp() Op         { return e.Op }
func (e *BlockedError) CloudflareOp() Op           { return e.Op }

// Bounds on what is read of one answer, per operation, so that a broken or
// hostile answer cannot make the engine hold an unbounded body in memory.
// Answers about one tunnel or one token are a few hundred bytes; a list of
// tunnels grows with the account: the simulator's tunnel object is about 360
// bytes, Cloudflare's has a few more fields and free-text names, so 32 MiB
// leaves room for well over 10,000 tunnels of 3 KiB each.
const (
	smallResponseLimit = 64 << 10
	listResponseLimit  = 32 << 20
)

// responseLimit returns the bound for the answer to the request of ctx: the
// one its call set (withResponseLimit: an answer that grows with what was
// sent), else its op's. An unknown op gets the small bound: a forgotten case
// fails loudly rather than reading anything.
func responseLimit(ctx context.Context) int {
	if limit, ok := ctx.Value(limitKey{}).(int); ok {
		return limit
	}
	if opOf(ctx) == OpListTunnels {
		return listResponseLimit
	}
	return smallResponseLimit
}

// limitKey carries a call's own answer limit in its context.
type limitKey struct{}

func withResponseLimit(ctx context.Context, limit int) context.Context {
	return context.WithValue(ctx, limitKey{}, limit)
}

// opKey carries the operation in a request's context, from start to the
// middleware: the SDK hands middleware only the *http.Request, and one
// place that sets it for every call beats an option at each call site.
type opKey struct{}

func withOp(ctx context.Context, op Op) context.Context { return context.WithValue(ctx, opKey{}, op) }

func opOf(ctx context.Context) Op {
	op, _ := ctx.Value(opKey{}).(Op)
	return op
}

// formatBytes writes a limit as KiB or MiB, as it is declared.
func formatBytes(n int) string {
	if n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// Message is one entry of Cloudflare's errors or messages array.
type Message struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// APIError is an answer in which Cloudflare said no: an HTTP status of 400 or
// more, or "success": false under any status. A 4xx other than 429 is an
// APIError only when its body is Cloudflare's error envelope (see
// decodeEnvelope); a 5xx or a 429 is one whatever its body, with NoEnvelope
// set when the body is not the envelope.
type APIError struct {
	Op         Op
	HTTPStatus int
	Errors     []Message
	// RetryAfter is Cloudflare's Retry-After header, zero when absent.
	RetryAfter time.Duration
	// NoEnvelope: the body is not Cloudflare's error envelope ("success":
	// false with errors), so the answer may come from something between
	// the engine and Cloudflare (a proxy, a gateway, a WAF) and proves
	// nothing of what Cloudflare did.
	NoEnvelope bool
}

func (e *APIError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "cloudflare %s: HTTP %d", e.Op, e.HTTPStatus)
	if e.HTTPStatus < 400 {
		b.WriteString(` with "success": false`)
	}
	switch {
	case e.NoEnvelope:
		b.WriteString(": the answer is not Cloudflare's error envelope, so it may come from something between Vault and Cloudflare (a proxy or gateway at base_url)")
	case len(e.Errors) == 0:
		b.WriteString(": no error detail in the answer")
	}
	for i, m := range e.Errors {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "code %d: %s", m.Code, m.Message)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, " (retry after %s)", e.RetryAfter)
	}
	return b.String()
}

// TokenRefused reports whether Cloudflare refused the API token itself
// (invalid, expired, disabled or rolled), as opposed to the request.
func (e *APIError) TokenRefused() bool {
	for _, m := range e.Errors {
		if m.Code == 9109 || m.Code == 1000 && strings.Contains(strings.ToLower(m.Message), "invalid api token") {
			return true
		}
	}
	return false
}

// Rejected reports whether Cloudflare refused the request itself (a 4xx other
// than rate limiting, in Cloudflare's envelope): sending it again unchanged
// cannot succeed.
func (e *APIError) Rejected() bool {
	return e.HTTPStatus >= 400 && e.HTTPStatus < 500 && e.HTTPStatus != http.StatusTooManyRequests && !e.NoEnvelope
}

// RateLimited reports whether Cloudflare's rate limit refused the request.
func (e *APIError) RateLimited() bool { return e.HTTPStatus == http.StatusTooManyRequests }

// MalformedResponseError is an answer that is not the envelope Cloudflare's
// schema describes. Its text never quotes the answer.
type MalformedResponseError struct {
	Op         Op
	HTTPStatus int
	Reason     string
	// WrongKeyForm: a psk_generate answer that is otherwise a success
	// carried a key that is not of the form Cloudflare issues (see
	// GeneratePSK). The answer says the edge generated a key, but whatever
	// sent it, Cloudflare changing its keys or something else answering at
	// the base URL, may answer so again.
	WrongKeyForm bool
}

func (e *MalformedResponseError) Error() string {
	if e.HTTPStatus != 0 {
		return fmt.Sprintf("cloudflare %s: malformed answer (HTTP %d): %s", e.Op, e.HTTPStatus, e.Reason)
	}
	return fmt.Sprintf("cloudflare %s: malformed answer: %s", e.Op, e.Reason)
}

// TransportError is a call that got no answer: a connection failure, a reset,
// or the time limit.
type TransportError struct {
	Op  Op
	Err error
}

func (e *TransportError) Error() string { return fmt.Sprintf("cloudflare %s: %v", e.Op, e.Err) }
func (e *TransportError) Unwrap() error { return e.Err }

// Timeout reports whether the call ran out of time.
func (e *TransportError) Timeout() bool { return errors.Is(e.Err, context.DeadlineExceeded) }

// envelope is the part of Cloudflare's response envelope that decides
// success. "success" is a pointer so that an answer without it is malformed.
type envelope struct {
	Success *bool     `json:"success"`
	Errors  []Message `json:"errors"`
}

// refusal reports whether env is Cloudflare's error envelope: "success":
// false and at least one error. Cloudflare answers every refusal so; a
// proxy's, gateway's or WAF's page, or another service's JSON, is not.
func (env *envelope) refusal() bool {
	return env.Success != nil && !*env.Success && len(env.Errors) > 0
}

// checkEnvelope is SDK middleware that turns every answer that is not a
// well-formed success into an error of this package, so that no SDK error
// (whose text quotes the whole response body) ever reaches a caller. now is
// the client's clock, read when an answer arrives.
func checkEnvelope(now func() time.Time) option.Middleware {
	return func(req *http.Request, next option.MiddlewareNext) (*http.Response, error) {
		res, err := next(req)
		if err != nil {
			return nil, err
		}
		op := opOf(req.Context())
		limit := responseLimit(req.Context())
		body, err := io.ReadAll(io.LimitReader(res.Body, int64(limit)+1))
		_ = res.Body.Close()
		if err != nil {
			return nil, &MalformedResponseError{HTTPStatus: res.StatusCode, Reason: "the answer was cut off: " + err.Error()}
		}
		if len(body) > limit {
			return nil, &MalformedResponseError{HTTPStatus: res.StatusCode, Reason: fmt.Sprintf("the answer is larger than the %s allowed for %s", formatBytes(limit), op)}
		}
		if err := decodeEnvelope(res.StatusCode, res.Header, body, now()); err != nil {
			return nil, err
		}
		res.Body = io.NopCloser(bytes.NewReader(body))
		return res, nil
	}
}

// decodeEnvelope judges one answer: nil for a well-formed success, else an
// *APIError or a *MalformedResponseError. now is when it arrived, for a
// Retry-After given as a date.
func decodeEnvelope(status int, header http.Header, body []byte, now time.Time) error {
	if status >= 300 && status < 400 {
		// The client never follows a redirect (see New). It is not an
		// APIError: Cloudflare did not refuse anything, and for psk_generate
		// a redirect from whatever sits between the engine and Cloudflare
		// proves nothing about whether the key changed. A malformed answer
		// is what callers already treat as "outcome unknown, do not retry".
		// The Location header is not quoted: it could hold anything.
		return &MalformedResponseError{HTTPStatus: status, Reason: "the answer is a redirect, which this client never follows (it could take the API token to another host or to plain http)"}
	}
	var env envelope
	decodeErr := json.Unmarshal(body, &env)
	if status >= 400 {
		enveloped := decodeErr == nil && env.refusal()
		if status < 500 && status != http.StatusTooManyRequests && !enveloped {
			// Only Cloudflare's own refusal proves that it did nothing
			// (NoEffect). A 4xx in any other form comes from whatever
			// answers at base_url, which may answer so after Cloudflare
			// carried the request out (a gateway whose upstream answer
			// timed out, a WAF that inspects answers): for psk_generate
			// the outcome is unknown, as for a malformed success.
			return &MalformedResponseError{HTTPStatus: status, Reason: "the refusal is not Cloudflare's error envelope (\"success\": false with errors), " +
				"so it may come from something between Vault and Cloudflare (a proxy or gateway at base_url) and proves nothing of what Cloudflare did"}
		}
		// A 5xx is never taken as proof of anything, envelope or not. A
		// 429 in any form still means "not now": the engine backs off,
		// but only Cloudflare's own 429 proves the request was refused.
		apiErr := &APIError{HTTPStatus: status, RetryAfter: parseRetryAfter(header.Get("Retry-After"), now), NoEnvelope: !enveloped}
		if decodeErr == nil {
			apiErr.Errors = env.Errors
		}
		return apiErr
	}
	if decodeErr != nil {
		// encoding/json's messages name a character or a type, never a value.
		return &MalformedResponseError{HTTPStatus: status, Reason: "not a JSON envelope: " + decodeErr.Error()}
	}
	if env.Success == nil {
		return &MalformedResponseError{HTTPStatus: status, Reason: `the envelope has no "success" field`}
	}
	if !*env.Success {
		return &APIError{HTTPStatus: status, Errors: env.Errors}
	}
	return nil
}

// parseRetryAfter reads a Retry-After header, in seconds or as an HTTP
// date, relative to now. It returns zero for an absent, unusable or past
// value, and never more than maxBlock.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		// A number too large for int64 is still a number of seconds, and
		// a long one: ParseInt returns the nearest bound with ErrRange.
		if secs <= 0 {
			return 0
		}
		return time.Duration(min(secs, int64(maxBlock/time.Second))) * time.Second
	}
	if at, err := http.ParseTime(v); err == nil {
		// Sub saturates for dates centuries away, so the cap still holds.
		if d := at.Sub(now); d > 0 {
			return min(d.Round(time.Second), maxBlock)
		}
	}
	return 0
}

// BlockedError is a call that was not sent because Cloudflare's rate limit
// still blocks the token: another request would only extend the block.
type BlockedError struct {
	Op         Op
	RetryAfter time.Duration
}

func (e *BlockedError) Error() string {
	return fmt.Sprintf("cloudflare %s: not sent: Cloudflare's rate limit blocks this API token's user for another %s", e.Op, e.RetryAfter.Round(time.Second))
}

// defaultBlock is how long Cloudflare blocks a token that went over its
// limit, used when a 429 carries no Retry-After.
const defaultBlock = 5 * time.Minute

// maxBlock bounds how long any one answer can stop the client from calling
// Cloudflare: a Retry-After, and what the Budget records. Cloudflare's own
// block is five minutes (defaultBlock); fifteen leaves room for a longer one,
// while a bogus or hostile value (Retry-After: 3153600000 is a century)
// cannot disable the mount.
const maxBlock = 15 * time.Minute

// checkBlock fails fast while Cloudflare's rate limit blocks the token.
func (c *Client) checkBlock(op Op) error {
	if left := c.budget.Blocked(); left > 0 {
		return &BlockedError{Op: op, RetryAfter: left}
	}
	return nil
}

// describe gives every error that leaves the client the operation's name and
// one of this package's types, and notes a rate-limit block.
func (c *Client) describe(op Op, err error) error {
	err = describe(op, err)
	var apiErr *APIError
	if errors.As(err, &apiErr) && apiErr.RateLimited() {
		block := apiErr.RetryAfter
		if block <= 0 {
			block = defaultBlock
		}
		c.budget.Block(c.now().Add(block))
	}
	return err
}

func describe(op Op, err error) error {
	var budgetErr *BudgetError
	if errors.As(err, &budgetErr) {
		budgetErr.Op = op
		return budgetErr
	}
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		apiErr.Op = op
		return apiErr
	}
	var malformed *MalformedResponseError
	if errors.As(err, &malformed) {
		malformed.Op = op
		return malformed
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return &TransportError{Op: op, Err: err}
	}
	if strings.HasPrefix(err.Error(), "error parsing response json") {
		// The SDK's decoder could not fit a well-formed envelope into its
		// types. Its message may quote values, so it is not passed on.
		return &MalformedResponseError{Op: op, Reason: "the result does not match Cloudflare's schema"}
	}
	return &TransportError{Op: op, Err: err}
}

// retryIdempotent runs call up to three times, but only for operations that
// change nothing at Cloudflare (reads and token checks): a repeated read is
// harmless. It retries a missing answer and a 5xx, never a refusal, never a
// rate limit (another call would extend Cloudflare's block), and never past
// ctx's deadline.
func retryIdempotent(ctx context.Context, call func() error) error {
	const attempts = 3
	backoff := 200 * time.Millisecond
	var err error
	for i := 0; i < attempts; i++ {
		if err = call(); err == nil || !worthRetrying(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff *= 2
	}
	return err
}

func worthRetrying(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return false
	}
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		return apiErr.HTTPStatus >= 500
	}
	var malformed *MalformedResponseError
	var budgetErr *BudgetError
	return !errors.As(err, &malformed) && !errors.As(err, &budgetErr)
}

// The questions the engine asks of a failed call. They live here, beside the
// error types they reason about, so that the safety-critical answer (did
// Cloudflare change anything?) is decided in one place and tested as a table.

// NoEffect reports whether err proves that Cloudflare changed nothing: it
// refused the request (a 4xx, a rate limit included, in Cloudflare's error
// envelope) or the request was never sent (Cloudflare's block, the mount's
// budget, a SetPSKs batch refused before sending). Every other failure (no answer, a 5xx, a malformed answer, a 4xx
// that is not Cloudflare's envelope, "success": false under 200, an
// unexpected redirect) may have come after Cloudflare acted, so for a
// psk_generate the outcome is unknown.
func NoEffect(err error) bool {
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		return (apiErr.Rejected() || apiErr.RateLimited()) && !apiErr.NoEnvelope
	}
	var blocked *BlockedError
	var budgetErr *BudgetError
	var invalid *InvalidBatchError
	return errors.As(err, &blocked) || errors.As(err, &budgetErr) || errors.As(err, &invalid)
}

// WrongKeyForm reports whether err is a psk_generate answer that said a key
// was generated and carried one that is not of the form Cloudflare issues.
// The outcome is not unknown: the answer says the edge changed its key. But
// asking again may only bring another such key, so the caller must not
// generate again by itself.
func WrongKeyForm(err error) bool {
	var malformed *MalformedResponseError
	return errors.As(err, &malformed) && malformed.WrongKeyForm
}

// RetryAfter returns how long to hold off when err means "not now"
// (Cloudflare's 429, its block still in force, or the mount's budget), and 0
// for any other error: those are not cured by waiting.
func RetryAfter(err error) time.Duration {
	var apiErr *APIError
	if errors.As(err, &apiErr) && apiErr.RateLimited() {
		return max(apiErr.RetryAfter, time.Second)
	}
	var blocked *BlockedError
	if errors.As(err, &blocked) {
		return max(blocked.RetryAfter, time.Second)
	}
	var budgetErr *BudgetError
	if errors.As(err, &budgetErr) {
		return max(budgetErr.RetryAfter, 10*time.Millisecond)
	}
	return 0
}

// Refused reports whether Cloudflare refused the request itself (a 4xx other
// than its rate limit): the caller must change something before asking again.
func Refused(err error) bool {
	var apiErr *APIError
	return errors.As(err, &apiErr) && apiErr.Rejected()
}

// TokenRefused reports whether Cloudflare refused the engine's API token
// itself (invalid, expired, disabled or rolled elsewhere).
func TokenRefused(err error) bool {
	var apiErr *APIError
	return errors.As(err, &apiErr) && apiErr.TokenRefused()
}

// NotFound reports whether Cloudflare answered that the object (a tunnel, for
// the engine) does not exist, for this token at least.
func NotFound(err error) bool {
	var apiErr *APIError
	return errors.As(err, &apiErr) && apiErr.HTTPStatus == http.StatusNotFound
}

// TimedOut reports whether the call got no answer within its time limit.
func TimedOut(err error) bool {
	var transportErr *TransportError
	return errors.As(err, &transportErr) && transportErr.Timeout()
}

// IsCloudflare reports whether err came from a Client call, as opposed to the
// engine's own storage or logic.
func IsCloudflare(err error) bool {
	var cfErr Error
	return errors.As(err, &cfErr)
}
