// Package cloudflaresim is a stand-in for the part of Cloudflare's API that the
// engine calls: IPsec tunnel PSK generation, tunnel reads and token
// verification. It keeps the edge's state (each tunnel's current PSK and when
// it was generated) so that a test can compare what Vault holds with what
// Cloudflare holds, answers in Cloudflare's response envelope as the published
// OpenAPI schema describes it, checks bearer tokens, counts calls, and can be
// told to fail. It serves the engine's tests and `make dev` alike.
package cloudflaresim

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// BasePath is where the API lives on the simulator, as on Cloudflare.
const BasePath = "/client/v4"

// Operation names one API operation, for counting calls and aiming faults.
type Operation string

const (
	OpPSKGenerate        Operation = "psk_generate"
	OpTunnelGet          Operation = "tunnel_get"
	OpTunnelList         Operation = "tunnel_list"
	OpUserTokenVerify    Operation = "user_token_verify"
	OpAccountTokenVerify Operation = "account_token_verify"
	OpUserTokenRoll      Operation = "user_token_roll"
	OpAccountTokenRoll   Operation = "account_token_roll"
	// OpPSKSet is "Set Pre-Shared Keys (PSK) for IPsec tunnels", POST
	// /accounts/{account_id}/magic/ipsec_tunnels/psk (see pskset.go).
	OpPSKSet Operation = "psk_set"
	// OpTunnelUpdate is "Update IPsec Tunnel", PUT
	// /accounts/{account_id}/magic/ipsec_tunnels/{tunnel_id} (see
	// tunnelupdate.go).
	OpTunnelUpdate Operation = "tunnel_update"
)

// Tunnel is one IPsec tunnel as the edge knows it.
type Tunnel struct {
	ID                 string
	Name               string
	Description        string
	CloudflareEndpoint string
	CustomerEndpoint   string
	InterfaceAddress   string
	CreatedOn          time.Time
	ModifiedOn         time.Time

	// InterfaceAddress6 is the tunnel's IPv6 /127, "" when it has none.
	InterfaceAddress6 string
	// CustomFQDNID is custom_remote_identities.fqdn_id, the custom IKE
	// identity (<label>.<account>.custom.ipsec.cloudflare.com); "" leaves
	// custom_remote_identities out of the tunnel's answers.
	CustomFQDNID string
	// IPsecID, when set, is carried as ipsec_id in psk_generate's answers,
	// as Cloudflare's documentation shows that answer. The published schema
	// has ipsec_id only in the bulk PSK answer, so by default the
	// simulator leaves it out there. The Set operation's answer, where the
	// schema requires it, always carries one: this, or one made of the
	// tunnel's id when this is empty.
	IPsecID string

	// PSK is the key the edge uses now. Cloudflare creates every tunnel
	// with a key, so AddTunnel generates one (PSKGeneratedOn is then the
	// creation time) unless NoInitialKey is set or a PSK is given.
	PSK             string
	PSKGeneratedOn  time.Time
	ReplayProtected bool
	// GeneratedPSKs is every key the edge has had, oldest first, so a test
	// can tell whether a key Vault served was ever real.
	GeneratedPSKs []string
	// RefusePSK, when set, is the reason the edge gives for refusing every
	// key a caller provides for the tunnel (the Set operation answers it in
	// unapplied_psks, a tunnel update with 400): a tunnel that cannot take
	// a key for as long as it is set, as opposed to Fault.Unapplied, which
	// refuses one request. psk_generate is not affected.
	RefusePSK string
	// NoInitialKey makes AddTunnel create the tunnel without a key, so
	// psk_metadata is absent until the first psk_generate. A real tunnel
	// always has one: use this only for a test about a keyless tunnel.
	NoInitialKey bool
}

// Token is an API token the simulator accepts.
type Token struct {
	Value string
	ID    string
	// Status is "active", "disabled" or "expired".
	Status    string
	ExpiresOn time.Time
	// User is the Cloudflare user the token belongs to. The rate limit is
	// per user: tokens with the same User share one window. Empty: the token
	// is its own user.
	User string
	// OwnerAccount makes the token account-owned: it verifies only at
	// /accounts/{OwnerAccount}/tokens/verify. An account-owned token has a
	// rate limit of its own, whatever its User.
	OwnerAccount string
	// Accounts limits the token to these accounts; empty allows every account.
	Accounts []string
}

// Server is the simulator. It is an http.Handler; wrap it in httptest or
// http.Server. The zero value is not usable: call New. Call Close when done
// with it, before closing the HTTP server around it (in t.Cleanup: register
// Close after the server's Close), so that requests it holds are released.
type Server struct {
	mu       sync.Mutex
	accounts map[string]map[string]*Tunnel
	tokens   map[string]*Token
	faults   map[Operation][]Fault
	calls    map[Operation]int
	// issued is every secret the simulator made: token values and keys.
	issued []string
	// ops is every operation the simulator serves, in the order routes
	// registers them; it does not change after New.
	ops   []Operation
	mux   *http.ServeMux
	now   func() time.Time
	limit *rateLimit
	// precision is what the edge's timestamps are truncated to.
	precision time.Duration
	// rollValue, when set, makes the new value of every token roll
	// (SetRollValue); pskValue, every key generated (SetPSKValue).
	rollValue func() string
	pskValue  func() string
	// batchLimit is the most keys one Set request may carry, 0 for no
	// limit (SetPSKBatchLimit).
	batchLimit int
	// callTimes is when each request arrived, for pacing measurements.
	callTimes []time.Time
	// late is the work the edge has accepted but not yet done (requests
	// played with Fault.ProcessAfter); idle is signalled, on mu, whenever
	// it shrinks. lateRunning counts the timers that may still call back.
	// lateFaults counts the ProcessAfter faults queued and not yet played
	// to the point where their work is scheduled or refused.
	late        map[*lateJob]struct{}
	lateFaults  int
	idle        *sync.Cond
	lateRunning sync.WaitGroup
	// done is closed by Close, which also sets closed.
	done   chan struct{}
	closed bool
}

// rateLimit plays Cloudflare's per-user limit: limit requests per fixed
// window, counted from a user's first request in the window; the request
// past the limit is refused with 429 and the user is blocked for a window.
// tokens is keyed by limitKey: a user, or an account-owned token.
type rateLimit struct {
	limit   int
	window  time.Duration
	tokens  map[string]*tokenWindow
	refused int
}

type tokenWindow struct {
	start        time.Time
	count        int
	blockedUntil time.Time
}

// SetRateLimit makes the simulator enforce Cloudflare's rate limit, scaled:
// limit requests per window per user (Cloudflare: 1,200 per 5 minutes), and
// announce it in Ratelimit headers (see announceRateLimit).
func (s *Server) SetRateLimit(limit int, window time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.limit = &rateLimit{limit: limit, window: window, tokens: map[string]*tokenWindow{}}
}

// RateLimited returns how many requests the rate limit refused.
func (s *Server) RateLimited() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.limit == nil {
		return 0
	}
	return s.limit.refused
}

// overLimit counts a request against its limitKey and reports how long the
// key is blocked, zero when the request may proceed. The caller holds mu.
func (s *Server) overLimit(token string) time.Duration {
	if s.limit == nil {
		return 0
	}
	now := s.now()
	w := s.limit.tokens[token]
	if w == nil {
		w = &tokenWindow{start: now}
		s.limit.tokens[token] = w
	}
	if now.Before(w.blockedUntil) {
		s.limit.refused++
		return w.blockedUntil.Sub(now)
	}
	if now.Sub(w.start) >= s.limit.window {
		w.start, w.count = now, 0
	}
	w.count++
	if w.count > s.limit.limit {
		w.blockedUntil = now.Add(s.limit.window)
		s.limit.refused++
		return s.limit.window
	}
	return 0
}

// New returns an empty simulator.
func New() *Server {
	s := &Server{
		accounts:  map[string]map[string]*Tunnel{},
		tokens:    map[string]*Token{},
		faults:    map[Operation][]Fault{},
		calls:     map[Operation]int{},
		mux:       http.NewServeMux(),
		now:       func() time.Time { return time.Now().UTC() },
		precision: defaultPrecision,
		late:      map[*lateJob]struct{}{},
		done:      make(chan struct{}),
	}
	s.idle = sync.NewCond(&s.mu)
	s.routes()
	return s
}

// NewID returns a random Cloudflare identifier (32 lower-case hex characters).
func NewID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

// AddToken makes the simulator accept a token. Value and ID are generated
// when empty, Status defaults to "active". It returns the token as stored.
func (s *Server) AddToken(t Token) Token {
	if t.Value == "" {
		t.Value = newSecret(40)
	}
	if t.ID == "" {
		t.ID = NewID()
	}
	if t.Status == "" {
		t.Status = "active"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens[t.Value] = &t
	s.issued = append(s.issued, t.Value)
	return t
}

// SetTokenStatus changes a token's status ("active", "disabled", "expired").
func (s *Server) SetTokenStatus(value, status string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.tokens[value]; ok {
		t.Status = status
	}
}

// TokenByID returns the token with an id, as it stands now (its value
// changes when it is rolled).
func (s *Server) TokenByID(id string) (Token, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range s.tokens {
		if t.ID == id {
			return *t, true
		}
	}
	return Token{}, false
}

// rollToken gives a token a new value; the old one stops working at once,
// as at Cloudflare. The caller holds mu.
func (s *Server) rollToken(old string) (string, bool) {
	t, ok := s.tokens[old]
	if !ok {
		return "", false
	}
	delete(s.tokens, old)
	t.Value = newSecret(40)
	if s.rollValue != nil {
		t.Value = s.rollValue()
	}
	s.tokens[t.Value] = t
	s.issued = append(s.issued, t.Value)
	return t.Value, true
}

// SetRollValue makes every later token roll give the token the value next
// returns, as Cloudflare's answer says it; nil restores the default, 40
// random letters and digits. Cloudflare's schema gives a token value 40 to 80
// characters without promising a form: this is how a test plays a value of
// another length or form. Each value is recorded among the issued secrets.
func (s *Server) SetRollValue(next func() string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rollValue = next
}

// SetPSKValue makes every later key generation (psk_generate, and
// RegenerateOutOfBand) set, and answer with, the key next returns; nil
// restores the default, 32 random letters and digits. It plays an answer of
// another form: Cloudflare changing its keys, or whatever answers at the
// engine's base_url handing out keys of its own choosing. Each value is
// recorded among the issued secrets and in GeneratedPSKs.
func (s *Server) SetPSKValue(next func() string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pskValue = next
}

// AddTunnel creates a tunnel in an account and returns it. ID, Name and
// endpoints are filled in when empty. As at Cloudflare, the tunnel is created
// with a key: PSK is generated when empty (unless NoInitialKey is set) and
// PSKGeneratedOn defaults to the creation time, so psk_metadata is present
// from the start. The creation key is recorded in GeneratedPSKs and among the
// issued secrets like any later one.
func (s *Server) AddTunnel(accountID string, t Tunnel) Tunnel {
	if t.NoInitialKey && (t.PSK != "" || !t.PSKGeneratedOn.IsZero()) {
		panic("cloudflaresim: AddTunnel: NoInitialKey with a PSK or PSKGeneratedOn")
	}
	accountID = strings.ToLower(accountID)
	if t.ID == "" {
		t.ID = NewID()
	}
	t.ID = strings.ToLower(t.ID)
	if t.Name == "" {
		t.Name = "IPsec_" + t.ID[:6]
	}
	if t.CloudflareEndpoint == "" {
		t.CloudflareEndpoint = "203.0.113.1"
	}
	if t.InterfaceAddress == "" {
		t.InterfaceAddress = "10.212.0.8/31"
	}
	t.GeneratedPSKs = slices.Clone(t.GeneratedPSKs)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.stamp()
	t.CreatedOn, t.ModifiedOn = now, now
	if !t.NoInitialKey {
		if t.PSK == "" {
			t.PSK = newSecret(32)
		}
		if t.PSKGeneratedOn.IsZero() {
			t.PSKGeneratedOn = now
		}
		if !slices.Contains(t.GeneratedPSKs, t.PSK) {
			t.GeneratedPSKs = append(t.GeneratedPSKs, t.PSK)
		}
		s.issued = append(s.issued, t.PSK)
	}
	if s.accounts[accountID] == nil {
		s.accounts[accountID] = map[string]*Tunnel{}
	}
	stored := t
	s.accounts[accountID][t.ID] = &stored
	t.GeneratedPSKs = slices.Clone(stored.GeneratedPSKs)
	return t
}

// Tunnel returns a copy of a tunnel's edge state.
func (s *Server) Tunnel(accountID, tunnelID string) (Tunnel, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.accounts[strings.ToLower(accountID)][strings.ToLower(tunnelID)]
	if !ok {
		return Tunnel{}, false
	}
	return copyTunnel(t), true
}

// copyTunnel returns a copy of t that shares nothing with it. The caller
// holds mu.
func copyTunnel(t *Tunnel) Tunnel {
	c := *t
	c.GeneratedPSKs = slices.Clone(t.GeneratedPSKs)
	return c
}

// Operations returns every operation the simulator serves, so that a
// caller naming one (the make dev control API) can refuse a name that no
// request would ever match.
func (s *Server) Operations() []Operation { return slices.Clone(s.ops) }

// Calls returns how many requests reached an operation, faults included.
func (s *Server) Calls(op Operation) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[op]
}

// CallTimes returns when each request reached an operation, in order.
func (s *Server) CallTimes() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.callTimes...)
}

// TotalCalls returns how many requests reached any operation.
func (s *Server) TotalCalls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.calls {
		n += c
	}
	return n
}

const defaultPrecision = time.Microsecond

// SetTimestampPrecision sets what the edge's timestamps (created_on,
// modified_on, psk_metadata.last_generated_on) are truncated to, in the
// state the simulator keeps as on the wire; d <= 0 restores the default,
// microseconds. Cloudflare promises neither sub-second precision nor that
// two generations have different timestamps: with time.Second, two keys
// generated within one second share last_generated_on, as they could at
// Cloudflare.
func (s *Server) SetTimestampPrecision(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d <= 0 {
		d = defaultPrecision
	}
	s.precision = d
}

// SetClock makes the edge read its time from now, so that a test that moves
// the engine's clock moves the edge's with it: the two clocks of the real
// world agree to within seconds, and a test that let them drift apart by
// hours would be testing a world that does not exist. A test of clock skew
// passes the engine's clock shifted by the seconds it means to test. The
// clock dates keys, the tunnel's times, every answer's Date header and the
// rate limit's windows.
func (s *Server) SetClock(now func() time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.now = func() time.Time { return now().UTC() }
}

// stamp returns the time now at the edge's precision. The caller holds mu.
func (s *Server) stamp() time.Time { return s.now().Truncate(s.precision) }

// generatePSK sets a new key of the edge's own making (see setPSK). The
// caller holds mu.
func (s *Server) generatePSK(t *Tunnel) {
	key := newSecret(32)
	if s.pskValue != nil {
		key = s.pskValue()
	}
	s.setPSK(t, key)
}

// setPSK makes key the tunnel's key, dated now at the edge's precision, and
// records it in GeneratedPSKs and among the issued secrets, whoever made it
// (psk_generate, the Set operation, a tunnel update) and even when it is
// the key the tunnel already has. The caller holds mu.
//
// At the default precision (or finer) each key is dated strictly later
// than the tunnel's last. Cloudflare does not promise that, but two
// changes within one microsecond cannot come from callers that reach the
// edge over a network: here they come only from in-process calls made
// back to back (AddTunnel then RegenerateOutOfBand), and a repeat would make
// such tests fail at random rather than model anything real. Coarser
// precision is how a test asks for repeated timestamps, so there nothing is
// bumped: a key set in the same second as the last one carries the same
// last_generated_on, and only the key itself tells them apart.
func (s *Server) setPSK(t *Tunnel, key string) {
	now := s.stamp()
	if s.precision <= defaultPrecision && !now.After(t.PSKGeneratedOn) {
		now = t.PSKGeneratedOn.Add(s.precision)
	}
	t.PSK = key
	t.PSKGeneratedOn = now
	t.ModifiedOn = now
	t.GeneratedPSKs = append(t.GeneratedPSKs, key)
	s.issued = append(s.issued, key)
}

// IssuedSecrets returns every token value and key the simulator has handed
// out, for tests that prove none of them leaked into a log or a response.
func (s *Server) IssuedSecrets() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.issued...)
}

const secretAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// newSecret returns n random characters of the alphabet Cloudflare's PSKs
// use (the schema's example is 32 letters and digits).
func newSecret(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("cloudflaresim: read random: %v", err))
	}
	for i := range b {
		b[i] = secretAlphabet[int(b[i])%len(secretAlphabet)]
	}
	return string(b)
}
