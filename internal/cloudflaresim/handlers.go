package cloudflaresim

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Message is one entry of the envelope's errors or messages array.
type Message struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// envelope is Cloudflare's response envelope. Errors and Messages are never
// null: the schema requires arrays.
type envelope struct {
	Success  bool      `json:"success"`
	Errors   []Message `json:"errors"`
	Messages []Message `json:"messages"`
	Result   any       `json:"result"`
}

// Codes and messages the simulator answers with. Those with a public source
// are the ones in testdata/ipsec-openapi.json (derived_examples); Cloudflare
// does not publish the code for an unknown tunnel or a missing body, so those
// two are the simulator's own choice.
var (
	errBadHeaders      = Message{Code: 6003, Message: "Invalid request headers"}
	errInvalidToken    = Message{Code: 9109, Message: "Invalid access token"}
	errAuthentication  = Message{Code: 10000, Message: "Authentication error"}
	errNoRoute         = Message{Code: 7003, Message: "Could not route to the URI, perhaps your object identifier is invalid?"}
	errTunnelNotFound  = Message{Code: 1002, Message: "ipsec tunnel not found"}
	errBodyNotJSON     = Message{Code: 1001, Message: "request body must be a JSON object"}
	errRateLimited     = Message{Code: 971, Message: "Please wait and consider throttling your request speed"}
	errInternal        = Message{Code: 1000, Message: "internal server error"}
	msgTokenActive     = Message{Code: 10000, Message: "This API Token is valid and active"}
	identifierPattern  = regexp.MustCompile(`^[0-9a-f]{32}$`)
	defaultFaultErrors = map[int]Message{
		http.StatusTooManyRequests: errRateLimited,
	}
)

func (s *Server) routes() {
	s.handle("POST", "/accounts/{account_id}/magic/ipsec_tunnels/{tunnel_id}/psk_generate", OpPSKGenerate, s.pskGenerate)
	s.handle("POST", "/accounts/{account_id}/magic/ipsec_tunnels/psk", OpPSKSet, s.pskSet)
	s.handle("GET", "/accounts/{account_id}/magic/ipsec_tunnels/{tunnel_id}", OpTunnelGet, s.tunnelGet)
	s.handle("PUT", "/accounts/{account_id}/magic/ipsec_tunnels/{tunnel_id}", OpTunnelUpdate, s.tunnelUpdate)
	s.handle("GET", "/accounts/{account_id}/magic/ipsec_tunnels", OpTunnelList, s.tunnelList)
	s.handle("GET", "/user/tokens/verify", OpUserTokenVerify, userScoped(s.tokenVerify))
	s.handle("GET", "/accounts/{account_id}/tokens/verify", OpAccountTokenVerify, accountScoped(s.tokenVerify))
	s.handle("PUT", "/user/tokens/{token_id}/value", OpUserTokenRoll, userScoped(s.tokenRoll))
	s.handle("PUT", "/accounts/{account_id}/tokens/{token_id}/value", OpAccountTokenRoll, accountScoped(s.tokenRoll))
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeFailure(w, http.StatusNotFound, errNoRoute)
	})
}

// ServeHTTP implements http.Handler. Every answer carries a Date header from
// the simulator's own clock (Go's server keeps a Date a handler set), as
// Cloudflare's answers carry one from Cloudflare's: a test that sets the
// simulator's clock apart from the engine's sees the two disagree. It is the
// time the request arrived, so it is never later than the answer, and what a
// Date proves (that Cloudflare's clock had reached it) holds.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Date", s.date())
	s.mux.ServeHTTP(w, r)
}

// date is the simulator's time now as an HTTP Date header (whole seconds).
func (s *Server) date() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.now().UTC().Format(http.TimeFormat)
}

// handle registers an operation: it counts the call, applies a queued fault,
// and otherwise runs the operation's handler.
func (s *Server) handle(method, path string, op Operation, h func(http.ResponseWriter, *http.Request)) {
	s.ops = append(s.ops, op)
	s.mux.HandleFunc(method+" "+BasePath+path, func(w http.ResponseWriter, r *http.Request) {
		if blocked := s.checkRateLimit(w, r); blocked > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(ceilSeconds(blocked)))
			writeFailure(w, http.StatusTooManyRequests, errRateLimited)
			return
		}
		fault, faulted := s.countCall(op)
		if faulted && fault.IgnoreValidateOnly {
			// What a gateway that dropped the query string passes on.
			r.URL.RawQuery = ""
			fault.IgnoreValidateOnly = false
			faulted = !reflect.DeepEqual(fault, Fault{})
		}
		if faulted && fault.Unapplied != nil {
			// Carried to wherever the batch is applied.
			r = r.WithContext(withUnapplied(r.Context(), fault.Unapplied))
			fault.Unapplied = nil
			faulted = !reflect.DeepEqual(fault, Fault{})
		}
		if faulted {
			s.applyFault(w, r, op, fault, h)
			return
		}
		h(w, r)
	})
}

func (s *Server) countCall(op Operation) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls[op]++
	s.callTimes = append(s.callTimes, s.now())
	queue := s.faults[op]
	if len(queue) == 0 {
		return Fault{}, false
	}
	s.faults[op] = queue[1:]
	return queue[0], true
}

// authorize checks the bearer token against the account the request names
// (accountID empty: no account). It writes the failure and returns nil when
// the token may not make the call.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, accountID string) *Token {
	token, known, ok := s.bearerToken(w, r)
	if !ok {
		return nil
	}
	if !known || token.Status != "active" || token.OwnerAccount != "" && accountID != token.OwnerAccount {
		writeFailure(w, http.StatusForbidden, errInvalidToken)
		return nil
	}
	if accountID != "" && len(token.Accounts) > 0 && !slices.Contains(token.Accounts, accountID) {
		writeFailure(w, http.StatusForbidden, errAuthentication)
		return nil
	}
	return &token
}

// tunnelFromPath validates the path's identifiers, authorizes the caller and
// returns the tunnel's account and id. It writes the failure and returns
// ok=false on any problem.
func (s *Server) tunnelFromPath(w http.ResponseWriter, r *http.Request) (accountID, tunnelID string, ok bool) {
	accountID, tunnelID = r.PathValue("account_id"), r.PathValue("tunnel_id")
	if !identifierPattern.MatchString(accountID) || !identifierPattern.MatchString(tunnelID) {
		writeFailure(w, http.StatusBadRequest, errNoRoute)
		return "", "", false
	}
	if s.authorize(w, r, accountID) == nil {
		return "", "", false
	}
	s.mu.Lock()
	_, exists := s.accounts[accountID][tunnelID]
	s.mu.Unlock()
	if !exists {
		writeFailure(w, http.StatusNotFound, errTunnelNotFound)
		return "", "", false
	}
	return accountID, tunnelID, true
}

func (s *Server) pskGenerate(w http.ResponseWriter, r *http.Request) {
	accountID, tunnelID, ok := s.tunnelFromPath(w, r)
	if !ok {
		return
	}
	var body map[string]any
	if !strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") || json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&body) != nil || body == nil {
		writeFailure(w, http.StatusBadRequest, errBodyNotJSON)
		return
	}
	validateOnly := r.URL.Query().Get("validate_only") == "true"

	s.mu.Lock()
	t := s.accounts[accountID][tunnelID]
	if t == nil { // deleted since tunnelFromPath looked
		s.mu.Unlock()
		writeFailure(w, http.StatusNotFound, errTunnelNotFound)
		return
	}
	var result map[string]any
	if validateOnly {
		// Nothing changes on the edge, and the answer carries no key: a
		// validation generates none, as Cloudflare's documentation implies
		// (it does not document this answer's result). A key in such an
		// answer means the edge did generate one (the query was dropped on
		// the way, see Fault.IgnoreValidateOnly), and the engine keeps it.
		result = pskResult(tunnelID, "", t.PSKGeneratedOn)
	} else {
		s.generatePSK(t)
		result = pskResult(tunnelID, t.PSK, t.PSKGeneratedOn)
		if t.IPsecID != "" {
			result["ipsec_id"] = t.IPsecID
		}
	}
	s.mu.Unlock()
	writeSuccess(w, result)
}

// pskResult is psk_generate's result; psk "" (a validation) leaves the
// field out.
func pskResult(tunnelID, psk string, generatedOn time.Time) map[string]any {
	result := map[string]any{"ipsec_tunnel_id": tunnelID}
	if psk != "" {
		result["psk"] = psk
	}
	if !generatedOn.IsZero() {
		result["psk_metadata"] = map[string]any{"last_generated_on": formatTime(generatedOn)}
	}
	return result
}

func (s *Server) tunnelGet(w http.ResponseWriter, r *http.Request) {
	accountID, tunnelID, ok := s.tunnelFromPath(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	t := s.accounts[accountID][tunnelID]
	var obj map[string]any
	if t != nil { // nil: deleted since tunnelFromPath looked
		obj = tunnelObject(t)
	}
	s.mu.Unlock()
	if obj == nil {
		writeFailure(w, http.StatusNotFound, errTunnelNotFound)
		return
	}
	writeSuccess(w, map[string]any{"ipsec_tunnel": obj})
}

func (s *Server) tunnelList(w http.ResponseWriter, r *http.Request) {
	accountID := r.PathValue("account_id")
	if !identifierPattern.MatchString(accountID) {
		writeFailure(w, http.StatusBadRequest, errNoRoute)
		return
	}
	if s.authorize(w, r, accountID) == nil {
		return
	}
	s.mu.Lock()
	list := make([]map[string]any, 0, len(s.accounts[accountID]))
	for _, t := range s.accounts[accountID] {
		list = append(list, tunnelObject(t))
	}
	s.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i]["id"].(string) < list[j]["id"].(string) })
	writeSuccess(w, map[string]any{"ipsec_tunnels": list})
}

// tunnelObject renders a tunnel as the schema's magic_ipsec-tunnel. The PSK
// is never part of it: Cloudflare does not show a key after generating it.
func tunnelObject(t *Tunnel) map[string]any {
	obj := map[string]any{
		"id":                  t.ID,
		"name":                t.Name,
		"description":         t.Description,
		"cloudflare_endpoint": t.CloudflareEndpoint,
		"interface_address":   t.InterfaceAddress,
		"created_on":          formatTime(t.CreatedOn),
		"modified_on":         formatTime(t.ModifiedOn),
		"replay_protection":   t.ReplayProtected,
		"allow_null_cipher":   false,
	}
	if t.CustomerEndpoint != "" {
		obj["customer_endpoint"] = t.CustomerEndpoint
	}
	// Newer than the schema fragments the tests hold (which do not define
	// them); their form is that of Cloudflare's Go SDK, which decodes them.
	if t.InterfaceAddress6 != "" {
		obj["interface_address6"] = t.InterfaceAddress6
	}
	if t.CustomFQDNID != "" {
		obj["custom_remote_identities"] = map[string]any{"fqdn_id": t.CustomFQDNID}
	}
	if !t.PSKGeneratedOn.IsZero() {
		obj["psk_metadata"] = map[string]any{"last_generated_on": formatTime(t.PSKGeneratedOn)}
	}
	return obj
}

// tokenHandler serves a token operation at the user endpoint (accountID
// empty) or at an account's.
type tokenHandler func(w http.ResponseWriter, r *http.Request, accountID string)

func userScoped(h tokenHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { h(w, r, "") }
}

func accountScoped(h tokenHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		accountID := r.PathValue("account_id")
		if !identifierPattern.MatchString(accountID) {
			writeFailure(w, http.StatusBadRequest, errNoRoute)
			return
		}
		h(w, r, accountID)
	}
}

// bearerToken returns the request's token as the simulator holds it, or
// writes Cloudflare's answer for a missing header and returns ok=false.
// known reports whether the token exists.
func (s *Server) bearerToken(w http.ResponseWriter, r *http.Request) (token Token, known, ok bool) {
	value, hasBearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !hasBearer || value == "" {
		writeFailure(w, http.StatusBadRequest, errBadHeaders)
		return Token{}, false, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, exists := s.tokens[value]; exists {
		return *t, true, true
	}
	return Token{}, false, true
}

// tokenVerify answers for any token the simulator knows, active or not, as
// the schema's status enum (active, disabled, expired) implies; an
// account-owned token answers only at its own account's endpoint.
func (s *Server) tokenVerify(w http.ResponseWriter, r *http.Request, accountID string) {
	token, known, ok := s.bearerToken(w, r)
	if !ok {
		return
	}
	if !known || token.OwnerAccount != accountID {
		writeFailure(w, http.StatusForbidden, errInvalidToken)
		return
	}
	result := map[string]any{"id": token.ID, "status": token.Status}
	if !token.ExpiresOn.IsZero() {
		result["expires_on"] = formatTime(token.ExpiresOn)
	}
	var messages []Message
	if token.Status == "active" {
		messages = []Message{msgTokenActive}
	}
	writeEnvelope(w, http.StatusOK, envelope{Success: true, Messages: messages, Result: result})
}

// tokenRoll lets an active token roll its own value (Cloudflare also lets a
// token with "API Tokens Write" roll others; the engine only rolls its own).
func (s *Server) tokenRoll(w http.ResponseWriter, r *http.Request, accountID string) {
	token, known, ok := s.bearerToken(w, r)
	if !ok {
		return
	}
	var body map[string]any
	if json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&body) != nil || body == nil {
		writeFailure(w, http.StatusBadRequest, errBodyNotJSON)
		return
	}
	if !known || token.Status != "active" || token.OwnerAccount != accountID {
		writeFailure(w, http.StatusForbidden, errInvalidToken)
		return
	}
	if token.ID != r.PathValue("token_id") {
		writeFailure(w, http.StatusForbidden, errAuthentication)
		return
	}
	s.mu.Lock()
	rolled, stillThere := s.rollToken(token.Value)
	s.mu.Unlock()
	if !stillThere {
		writeFailure(w, http.StatusForbidden, errInvalidToken) // rolled by a concurrent request
		return
	}
	writeSuccess(w, rolled)
}

func formatTime(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func writeSuccess(w http.ResponseWriter, result any) {
	writeEnvelope(w, http.StatusOK, envelope{Success: true, Result: result})
}

func writeFailure(w http.ResponseWriter, status int, errs ...Message) {
	writeEnvelope(w, status, envelope{Success: false, Errors: errs})
}

func writeEnvelope(w http.ResponseWriter, status int, env envelope) {
	if env.Errors == nil {
		env.Errors = []Message{}
	}
	if env.Messages == nil {
		env.Messages = []Message{}
	}
	body, err := json.Marshal(env)
	if err != nil {
		panic(fmt.Sprintf("cloudflaresim: encode envelope: %v", err))
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
