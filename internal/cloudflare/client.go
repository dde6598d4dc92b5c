// Package cloudflare is the engine's narrow client for the few Cloudflare API
// operations it needs. Requests are built, authenticated and decoded by
// Cloudflare's official Go SDK (cloudflare-go/v6); this package adds what the
// SDK leaves to its caller and what a secrets engine cannot do without:
//
//   - nothing is read from the process environment: every option is explicit;
//   - retries are decided here, per operation, never by the SDK's defaults;
//   - an answer with "success": false is an error even when its HTTP status is
//     200 (the SDK decodes such an answer as if it had succeeded);
//   - a redirect is never followed, so the API token goes nowhere but to the
//     configured base URL;
//   - errors carry Cloudflare's HTTP status, codes and messages, but never a
//     response body, a header or anything else that could hold a secret.
package cloudflare

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"time"

	"github.com/cloudflare/cloudflare-go/v6/accounts"
	"github.com/cloudflare/cloudflare-go/v6/magic_transit"
	"github.com/cloudflare/cloudflare-go/v6/option"
	"github.com/cloudflare/cloudflare-go/v6/user"
)

// DefaultBaseURL is Cloudflare's public API.
const DefaultBaseURL = "https://api.cloudflare.com/client/v4"

// Config is everything a Client needs. Nothing else is consulted.
type Config struct {
	APIToken string
	BaseURL  string
	// RequestTimeout bounds one operation, retries included.
	RequestTimeout time.Duration
	// UserAgent is sent with every request.
	UserAgent string
	// Now is the clock for rate-limit blocks; time.Now when nil.
	Now func() time.Time
	// Budget, when set, counts every request sent (retries included),
	// refuses to send past its cap, and remembers Cloudflare's blocks. Share
	// one Budget between the clients of one token, so that neither survives
	// a client being rebuilt.
	Budget *Budget
}

// Client calls Cloudflare. It is safe for concurrent use. One Client serves
// one API token, whose rate limit it tracks: Cloudflare counts requests per
// user (all of a user's tokens together; an account-owned token alone) and,
// past the limit, refuses every call from them for a while.
type Client struct {
	timeout       time.Duration
	now           func() time.Time
	budget        *Budget
	tunnels       *magic_transit.IPSECTunnelService
	userTokens    *user.TokenService
	accountTokens *accounts.TokenService
	userRolls     *user.TokenValueService
	accountRolls  *accounts.TokenValueService
	// opts are the options every service was built with, for the SDK's
	// generic client (SetPSKs), which is built from them on each call
	// rather than kept here (see SetPSKs).
	opts []option.RequestOption
}

// New builds a Client. It does no I/O.
func New(cfg Config) (*Client, error) {
	if cfg.APIToken == "" {
		return nil, errors.New("cloudflare: api token is empty")
	}
	if cfg.BaseURL == "" {
		cfg.BaseURL = DefaultBaseURL
	}
	if cfg.RequestTimeout <= 0 {
		return nil, errors.New("cloudflare: request timeout must be positive")
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	httpClient := newHTTPClient()
	opts := []option.RequestOption{
		option.WithAPIToken(cfg.APIToken),
		// The SDK resolves request paths relative to the base URL, so it must
		// end in a slash or its last segment ("v4") would be dropped.
		option.WithBaseURL(strings.TrimRight(cfg.BaseURL, "/") + "/"),
		option.WithHTTPClient(httpClient),
		// The SDK's default retries a POST up to ten times with long backoff;
		// a psk_generate that is retried blindly can rotate a key twice. Retries
		// are this package's decision (see retryIdempotent).
		option.WithMaxRetries(0),
	}
	budget := cfg.Budget
	if budget == nil {
		budget = NewBudget(0, 0, cfg.Now)
	}
	// The budget's middleware is innermost, nearest the wire: it sees each
	// attempt as it is sent and each answer's headers before checkEnvelope
	// turns a failure into an error without them.
	opts = append(opts, option.WithMiddleware(checkEnvelope(now), spendBudget(budget)))
	if cfg.UserAgent != "" {
		opts = append(opts, option.WithHeader("User-Agent", cfg.UserAgent))
	}
	return &Client{
		timeout:       cfg.RequestTimeout,
		now:           now,
		budget:        budget,
		tunnels:       magic_transit.NewIPSECTunnelService(opts...),
		userTokens:    user.NewTokenService(opts...),
		accountTokens: accounts.NewTokenService(opts...),
		userRolls:     user.NewTokenValueService(opts...),
		accountRolls:  accounts.NewTokenValueService(opts...),
		opts:          opts,
	}, nil
}

// The SDK builds its JSON encoders lazily and caches them for the whole
// process. A cached map encoder keeps a pointer to the encoder of the call
// that built it, which that call may still be writing while a concurrent
// call uses the cached encoder: the race detector reported it in the
// plugin when two first psk_generate requests ran at once. Building the
// encoders of every body the client sends once, before any request can
// run, leaves nothing to race on.
func init() {
	for _, body := range []json.Marshaler{
		magic_transit.IPSECTunnelPSKGenerateParams{Body: map[string]any{}},
		user.TokenValueUpdateParams{Body: map[string]any{}},
		accounts.TokenValueUpdateParams{Body: map[string]any{}},
	} {
		_, _ = body.MarshalJSON()
	}
}

// GeneratedPSK is what psk_generate returned.
type GeneratedPSK struct {
	PSK             string
	LastGeneratedOn time.Time
	// IPsecID is the answer's ipsec_id, "" when it has none: the IKE
	// identity Cloudflare's edge uses for the tunnel, which Cloudflare's
	// router guides (VyOS) give the router as its local id. Cloudflare's
	// documentation shows it in psk_generate's answer; the published schema
	// has it only in the bulk PSK answer, and the SDK does not decode it, so
	// it is read from the answer's extra fields.
	IPsecID string
	// Date is Cloudflare's time of the answer (see answerDate).
	Date time.Time
}

// GeneratePSK asks Cloudflare for a new PSK for one tunnel. Cloudflare
// activates the key on its edge before it answers, so the call is never
// retried here: a lost answer may mean a key was set that nobody holds.
// With validateOnly Cloudflare checks the request and generates nothing, and
// its answer carries no key: PSK is then "". An answer that does carry one
// means the edge generated and activated it anyway (a proxy or gateway on
// the way dropped the query string), so it is checked and returned like any
// generated key, for the caller to store: dropping it would lose a live key.
func (c *Client) GeneratePSK(ctx context.Context, accountID, tunnelID string, validateOnly bool) (*GeneratedPSK, error) {
	ctx, cancel, err := c.start(ctx, OpGeneratePSK)
	if err != nil {
		return nil, err
	}
	defer cancel()

	var raw *http.Response
	opts := []option.RequestOption{option.WithResponseInto(&raw)}
	if validateOnly {
		opts = append(opts, option.WithQuery("validate_only", "true"))
	}
	// Cloudflare wants a JSON body, even an empty one.
	params := magic_transit.IPSECTunnelPSKGenerateParams{Body: map[string]any{}}
	setField(&params.AccountID.Value, &params.AccountID.Present, accountID)
	res, err := c.tunnels.PSKGenerate(ctx, tunnelID, params, opts...)
	if err != nil {
		return nil, c.describe(OpGeneratePSK, err)
	}
	if validateOnly && res.PSK == "" {
		return &GeneratedPSK{LastGeneratedOn: res.PSKMetadata.LastGeneratedOn, Date: answerDate(raw)}, nil
	}
	if res.PSK == "" {
		return nil, &MalformedResponseError{Op: OpGeneratePSK, Reason: "the answer has no psk"}
	}
	if problem := pskProblem(res.PSK); problem != "" {
		return nil, &MalformedResponseError{Op: OpGeneratePSK, WrongKeyForm: true, Reason: fmt.Sprintf(
			"the answer says a key was generated, but the key is not of the form Cloudflare issues (%d to %d letters and digits): %s",
			minPSKLength, maxPSKLength, problem)}
	}
	if res.PSKMetadata.LastGeneratedOn.IsZero() {
		return nil, &MalformedResponseError{Op: OpGeneratePSK, Reason: "the answer has no psk_metadata.last_generated_on"}
	}
	if res.IPSECTunnelID != "" && !strings.EqualFold(res.IPSECTunnelID, tunnelID) {
		return nil, &MalformedResponseError{Op: OpGeneratePSK, Reason: fmt.Sprintf("the answer is for tunnel %q, not %q", res.IPSECTunnelID, tunnelID)}
	}
	return &GeneratedPSK{PSK: res.PSK, LastGeneratedOn: res.PSKMetadata.LastGeneratedOn,
		IPsecID: extraString(res.JSON.ExtraFields["ipsec_id"].Raw()), Date: answerDate(raw)}, nil
}

// The form of a key Cloudflare issues: its schema's example and every key
// seen are 32 letters and digits. The bounds leave room for Cloudflare to
// change the length without stopping every rotation, while letters and
// digits alone keep out anything that could end a quoted string or a line
// in a router's configuration, where the templates put the key.
const (
	minPSKLength = 16
	maxPSKLength = 128
)

// pskProblem says what keeps psk from being a key of the form Cloudflare
// issues, without quoting it: "" when nothing does.
func pskProblem(psk string) string {
	var problems []string
	if len(psk) < minPSKLength || len(psk) > maxPSKLength {
		problems = append(problems, fmt.Sprintf("it has %d characters", len(psk)))
	}
	if strings.ContainsFunc(psk, func(r rune) bool { return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9') }) {
		problems = append(problems, "it has characters other than letters and digits")
	}
	return strings.Join(problems, ", and ")
}

// extraString decodes a string field that the SDK leaves among an answer's
// extra fields (raw JSON, "" when the field is absent). Anything but a JSON
// string reads as "": these fields are informative, and an answer is not
// refused over one.
func extraString(raw string) string {
	var s string
	if raw == "" || json.Unmarshal([]byte(raw), &s) != nil {
		return ""
	}
	return s
}

// TokenStatus is what Cloudflare's token-verify endpoint says of a token.
type TokenStatus struct {
	ID        string
	Status    string
	ExpiresOn time.Time
	NotBefore time.Time
}

// Active reports whether Cloudflare accepts the token now.
func (t *TokenStatus) Active() bool { return t.Status == "active" }

// VerifyToken asks Cloudflare about the client's own token. accountID selects
// the account-owned token endpoint; empty means a user token.
func (c *Client) VerifyToken(ctx context.Context, accountID string) (*TokenStatus, error) {
	ctx, cancel, err := c.start(ctx, OpVerifyToken)
	if err != nil {
		return nil, err
	}
	defer cancel()

	var status *TokenStatus
	err = retryIdempotent(ctx, func() error {
		if accountID == "" {
			res, err := c.userTokens.Verify(ctx)
			if err != nil {
				return err
			}
			status = &TokenStatus{ID: res.ID, Status: string(res.Status), ExpiresOn: res.ExpiresOn, NotBefore: res.NotBefore}
			return nil
		}
		var params accounts.TokenVerifyParams
		setField(&params.AccountID.Value, &params.AccountID.Present, accountID)
		res, err := c.accountTokens.Verify(ctx, params)
		if err != nil {
			return err
		}
		status = &TokenStatus{ID: res.ID, Status: string(res.Status), ExpiresOn: res.ExpiresOn, NotBefore: res.NotBefore}
		return nil
	})
	if err != nil {
		return nil, c.describe(OpVerifyToken, err)
	}
	if status.ID == "" || status.Status == "" {
		return nil, &MalformedResponseError{Op: OpVerifyToken, Reason: "the answer has no token id or status"}
	}
	return status, nil
}

// RollToken gives the client's own token (tokenID) a new value and returns
// it. Cloudflare invalidates the old value at once, so the call is never
// retried: after a lost answer neither value may work. accountID selects the
// account-owned token endpoint; empty means a user token.
func (c *Client) RollToken(ctx context.Context, accountID, tokenID string) (string, error) {
	ctx, cancel, err := c.start(ctx, OpRollToken)
	if err != nil {
		return "", err
	}
	defer cancel()

	var value *string
	if accountID == "" {
		value, err = c.userRolls.Update(ctx, tokenID, user.TokenValueUpdateParams{Body: map[string]any{}})
	} else {
		params := accounts.TokenValueUpdateParams{Body: map[string]any{}}
		setField(&params.AccountID.Value, &params.AccountID.Present, accountID)
		value, err = c.accountRolls.Update(ctx, tokenID, params)
	}
	if err != nil {
		return "", c.describe(OpRollToken, err)
	}
	// Cloudflare invalidated the old value when it answered, so a value
	// that could be a token is kept whatever its length: refusing one the
	// schema does not describe (40 to 80 characters) would leave the mount
	// with a dead token and throw away the live one. The caller warns
	// (TokenLengthExpected). Only a value no Authorization header and no
	// config could carry is refused. Spaces around the value are trimmed,
	// as config trims an api_token written to it: a value with a line
	// break after it is the same token.
	if value == nil || strings.TrimSpace(*value) == "" {
		return "", &MalformedResponseError{Op: OpRollToken, Reason: "the answer has no token value"}
	}
	token := strings.TrimSpace(*value)
	if problem := tokenProblem(token); problem != "" {
		return "", &MalformedResponseError{Op: OpRollToken, Reason: "the answer's token value could not be an API token: " + problem}
	}
	return token, nil
}

// MaxTokenLength bounds an API token value, in config and in a roll's
// answer. Cloudflare's schema gives 40 to 80 characters; the bound leaves
// room for a longer form without accepting an unbounded one.
const MaxTokenLength = 256

// ValidToken reports whether v could be an API token: 1 to MaxTokenLength
// printable ASCII characters without spaces, which is what config accepts as
// api_token and what an Authorization header carries unchanged.
func ValidToken(v string) bool { return v != "" && tokenProblem(v) == "" }

// tokenProblem says what keeps v from being an API token, without quoting
// it: "" when nothing does.
func tokenProblem(v string) string {
	var problems []string
	if len(v) > MaxTokenLength {
		problems = append(problems, fmt.Sprintf("it has %d characters, more than %d", len(v), MaxTokenLength))
	}
	if strings.ContainsFunc(v, func(r rune) bool { return r <= ' ' || r > '~' }) {
		problems = append(problems, "it has characters other than printable ASCII (spaces, control characters or non-ASCII)")
	}
	return strings.Join(problems, ", and ")
}

// TokenLengthExpected reports whether v has the length Cloudflare's schema
// gives a token value, 40 to 80 characters.
func TokenLengthExpected(v string) bool { return len(v) >= 40 && len(v) <= 80 }

// TunnelState is Cloudflare's record of one tunnel. It never holds a key:
// Cloudflare does not show one after generating it.
type TunnelState struct {
	ID                 string
	Name               string
	Description        string
	CloudflareEndpoint string
	CustomerEndpoint   string
	InterfaceAddress   string
	InterfaceAddress6  string
	// CustomFQDNID is custom_remote_identities.fqdn_id, the IKE identity of
	// type FQDN chosen for the tunnel, "" when none is set.
	CustomFQDNID string
	// IPsecID is ipsec_id where the answer carries one (see GeneratedPSK).
	IPsecID string
	// PSKLastGeneratedOn is zero when no key was ever generated.
	PSKLastGeneratedOn time.Time
	// Date is Cloudflare's time of the answer that said all this (see
	// answerDate): for a listing, the list's.
	Date time.Time
}

// answerDate is Cloudflare's time of an answer, from its Date header: whole
// seconds by Cloudflare's own clock, zero when the answer has none or it
// does not parse. It is the one time of Cloudflare's that the engine can
// hold against psk_metadata.last_generated_on without involving its own
// clock, which may run seconds ahead of or behind Cloudflare's.
func answerDate(res *http.Response) time.Time {
	if res == nil {
		return time.Time{}
	}
	date, err := http.ParseTime(res.Header.Get("Date"))
	if err != nil {
		return time.Time{}
	}
	return date.UTC()
}

// ListTunnels reads every IPsec tunnel of an account. It is a read, retried
// like GetTunnel.
func (c *Client) ListTunnels(ctx context.Context, accountID string) ([]TunnelState, error) {
	ctx, cancel, err := c.start(ctx, OpListTunnels)
	if err != nil {
		return nil, err
	}
	defer cancel()

	var params magic_transit.IPSECTunnelListParams
	setField(&params.AccountID.Value, &params.AccountID.Present, accountID)
	var res *magic_transit.IPSECTunnelListResponse
	var raw *http.Response
	err = retryIdempotent(ctx, func() error {
		var err error
		res, err = c.tunnels.List(ctx, params, option.WithResponseInto(&raw))
		return err
	})
	if err != nil {
		return nil, c.describe(OpListTunnels, err)
	}
	date := answerDate(raw)
	out := make([]TunnelState, 0, len(res.IPSECTunnels))
	for _, t := range res.IPSECTunnels {
		out = append(out, TunnelState{
			ID: strings.ToLower(t.ID), Name: t.Name, Description: t.Description,
			CloudflareEndpoint: t.CloudflareEndpoint, CustomerEndpoint: t.CustomerEndpoint,
			InterfaceAddress: t.InterfaceAddress, InterfaceAddress6: t.InterfaceAddress6,
			CustomFQDNID:       t.CustomRemoteIdentities.FqdnID,
			IPsecID:            extraString(t.JSON.ExtraFields["ipsec_id"].Raw()),
			PSKLastGeneratedOn: t.PSKMetadata.LastGeneratedOn,
			Date:               date,
		})
	}
	return out, nil
}

// GetTunnel reads one tunnel's record. It is a read, so it is retried on a
// missing answer or a 5xx (see retryIdempotent).
func (c *Client) GetTunnel(ctx context.Context, accountID, tunnelID string) (*TunnelState, error) {
	ctx, cancel, err := c.start(ctx, OpGetTunnel)
	if err != nil {
		return nil, err
	}
	defer cancel()

	var params magic_transit.IPSECTunnelGetParams
	setField(&params.AccountID.Value, &params.AccountID.Present, accountID)
	var res *magic_transit.IPSECTunnelGetResponse
	var raw *http.Response
	err = retryIdempotent(ctx, func() error {
		var err error
		res, err = c.tunnels.Get(ctx, tunnelID, params, option.WithResponseInto(&raw))
		return err
	})
	if err != nil {
		return nil, c.describe(OpGetTunnel, err)
	}
	t := res.IPSECTunnel
	if !strings.EqualFold(t.ID, tunnelID) {
		return nil, &MalformedResponseError{Op: OpGetTunnel, Reason: fmt.Sprintf("the answer is for tunnel %q, not %q", t.ID, tunnelID)}
	}
	return &TunnelState{
		ID: strings.ToLower(t.ID), Name: t.Name, Description: t.Description,
		CloudflareEndpoint: t.CloudflareEndpoint, CustomerEndpoint: t.CustomerEndpoint,
		InterfaceAddress: t.InterfaceAddress, InterfaceAddress6: t.InterfaceAddress6,
		CustomFQDNID:       t.CustomRemoteIdentities.FqdnID,
		IPsecID:            extraString(t.JSON.ExtraFields["ipsec_id"].Raw()),
		PSKLastGeneratedOn: t.PSKMetadata.LastGeneratedOn,
		Date:               answerDate(raw),
	}, nil
}

// spendBudget is SDK middleware that takes one call from the budget per
// request sent, sends nothing when the budget is spent, and tells the
// budget what Cloudflare's Ratelimit header says is left, from every
// answer, success or failure.
func spendBudget(b *Budget) option.Middleware {
	return func(req *http.Request, next option.MiddlewareNext) (*http.Response, error) {
		seq, refused := b.take()
		if refused != nil {
			return nil, refused
		}
		res, err := next(req)
		if res != nil {
			if remaining, reset, ok := parseRatelimit(res.Header.Values("Ratelimit")); ok {
				b.observe(seq, remaining, reset)
			}
		}
		return res, err
	}
}

// start begins one operation: it fails fast while Cloudflare blocks the
// token, bounds the operation, retries included, by request_timeout, and
// names the operation in the context for the middleware (answer size).
func (c *Client) start(ctx context.Context, op Op) (context.Context, context.CancelFunc, error) {
	if err := c.checkBlock(op); err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(withOp(ctx, op), c.timeout)
	return ctx, cancel, nil
}

// setField fills one of the SDK's param.Field values, as the SDK's
// constructor for them (cloudflare.F) would.
func setField(value *string, present *bool, v string) {
	*value = v
	*present = true
}

// newHTTPClient is the HTTP client of every Client: Go's default transport,
// without the two things that would let something other than config decide
// where a call goes.
func newHTTPClient() *http.Client {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	// The default transport reads HTTPS_PROXY and friends from the process
	// environment: a proxy that config never names would see the bearer
	// token (and, if it inspects TLS, every new key). Nothing is read from
	// the environment.
	transport.Proxy = nil
	return &http.Client{
		Transport: transport,
		// A redirect is never followed: the SDK sets the bearer token on the
		// request, and Go's client keeps it on a redirect to the same host
		// name (any port, plain http included). Cloudflare's API does not
		// redirect these operations, so a 3xx comes from something else;
		// checkEnvelope turns it into an error.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}
