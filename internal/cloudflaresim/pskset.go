package cloudflaresim

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

// The Set operation: "Set Pre-Shared Keys (PSK) for IPsec tunnels",
// POST /accounts/{account_id}/magic/ipsec_tunnels/psk, in Cloudflare's
// schema of 2026-07-27. The caller provides the keys, for one or many
// tunnels of the account, as {"psks":[{"id":"<tunnel>","psk":"<key>"}]};
// the answer says per tunnel whether the key was applied
// (successfully_applied_psks: tunnel id → ipsec_id, ipsec_tunnel_id, psk,
// psk_metadata.last_generated_on) or not (unapplied_psks: tunnel id →
// reason).
//
// What the schema leaves open, and what the simulator chose:
//
//   - A body that does not fit the request schema (not a JSON object, no
//     psks array, an entry without a string id or psk) is refused whole
//     with 400, code 1003, a message that names the field, and nothing
//     changes. So is a batch that names one tunnel twice (ids compared
//     without case): the answer is a map by tunnel id and could not say
//     which of the two keys was meant.
//   - A batch longer than SetPSKBatchLimit is refused whole with 413, code
//     1004 (see errBatchTooLarge). Cloudflare publishes no limit and no
//     code for this.
//   - Everything else is answered per tunnel, under 200 with "success":
//     true even when no key was applied: a tunnel that is not in the
//     account, a key the edge refuses (see PSKRefusal), a tunnel with
//     Tunnel.RefusePSK set, or one named in Fault.Unapplied goes into
//     unapplied_psks with a reason that never quotes the key.
//   - An applied key replaces the tunnel's key exactly as psk_generate
//     would: dated now at the edge's precision (psk_metadata and
//     modified_on), recorded in Tunnel.GeneratedPSKs and among the issued
//     secrets. Setting the key the tunnel already has is harmless and is
//     recorded like any other: the key stays, but last_generated_on moves
//     to now. Cloudflare does not say what it does; a write that re-dates
//     is the likelier and the more demanding for the engine, which then
//     judges by the key it sent, not by the date.
//   - The whole batch is applied under one lock, so a reader sees all of it
//     or none of it.
//   - With ?validate_only=true nothing changes; the answer is the one a
//     real call would get, except that each tunnel's psk_metadata is the
//     one it has now (no key was set) and its psk is the key sent (the
//     schema requires one). A gateway that drops the query string
//     (Fault.IgnoreValidateOnly) makes it a real call, with an answer of
//     the same form: the caller cannot tell the two apart by the answer.
//   - Both maps are always present, empty when nothing is in them.

// Keys the edge accepts from a caller. The schema says only "string";
// Cloudflare's own keys are 32 letters and digits. The simulator takes 16 to
// 128 characters of printable ASCII other than the space: enough to refuse an
// empty, short, unbounded or unprintable key, with room for any key a router
// can carry in its configuration.
const (
	MinSetPSKLength = 16
	MaxSetPSKLength = 128
)

// PSKRefusal says why the edge would refuse key from a caller, without
// quoting it; "" when it accepts it. It is the rule of the Set operation and
// of the tunnel update's psk field.
func PSKRefusal(key string) string {
	if len(key) < MinSetPSKLength || len(key) > MaxSetPSKLength {
		return fmt.Sprintf("psk must be %d to %d characters long", MinSetPSKLength, MaxSetPSKLength)
	}
	for i := 0; i < len(key); i++ {
		if key[i] <= ' ' || key[i] > '~' {
			return "psk must be printable ASCII characters other than space"
		}
	}
	return ""
}

// Reasons the simulator gives in unapplied_psks. Cloudflare publishes none.
const (
	reasonTunnelNotFound = "ipsec tunnel not found"
	reasonEdgeRefused    = "the edge could not apply the psk to this tunnel"
)

var (
	errBadBody       = func(what string) Message { return Message{Code: 1003, Message: "invalid request body: " + what} }
	errBatchTooLarge = func(limit int) Message {
		return Message{Code: 1004, Message: fmt.Sprintf("too many psks in one request: at most %d", limit)}
	}
)

// maxSetBody bounds what is read of a Set request's body: far more than
// any batch the edge takes (an entry is under 200 bytes), so that a body cut
// off by it fails to decode rather than being half applied.
const maxSetBody = 8 << 20

// SetPSKBatchLimit makes the Set operation refuse a batch of more than n
// keys, whole, with 413 and code 1004 (the simulator's choice: Cloudflare
// publishes neither a limit nor its answer); n <= 0 removes the limit, the
// default.
func (s *Server) SetPSKBatchLimit(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batchLimit = max(n, 0)
}

// pskEntry is one key of a Set request; ID is lower-cased.
type pskEntry struct {
	ID  string
	PSK string
}

// pskSetRequest is a Set request that passed every check the edge makes
// before it looks at the tunnels.
type pskSetRequest struct {
	accountID    string
	entries      []pskEntry
	validateOnly bool
	// unapplied is Fault.Unapplied, carried by the request's context.
	unapplied map[string]string
}

// readPSKSet checks a Set request: its account, its token, its body, its
// batch size. It writes the refusal and returns nil when the edge would
// refuse the whole request.
func (s *Server) readPSKSet(w http.ResponseWriter, r *http.Request) *pskSetRequest {
	accountID := r.PathValue("account_id")
	if !identifierPattern.MatchString(accountID) {
		writeFailure(w, http.StatusBadRequest, errNoRoute)
		return nil
	}
	if s.authorize(w, r, accountID) == nil {
		return nil
	}
	entries, problem := decodePSKSetBody(r)
	if problem != nil {
		writeFailure(w, http.StatusBadRequest, *problem)
		return nil
	}
	s.mu.Lock()
	limit := s.batchLimit
	s.mu.Unlock()
	if limit > 0 && len(entries) > limit {
		writeFailure(w, http.StatusRequestEntityTooLarge, errBatchTooLarge(limit))
		return nil
	}
	return &pskSetRequest{
		accountID:    accountID,
		entries:      entries,
		validateOnly: r.URL.Query().Get("validate_only") == "true",
		unapplied:    unappliedOf(r.Context()),
	}
}

// decodePSKSetBody reads {"psks":[{"id":..., "psk":...}, ...]} as the
// schema's magic_ipsec_tunnels_psk_request describes it. Fields the schema
// does not name are ignored, as the schema allows them.
func decodePSKSetBody(r *http.Request) ([]pskEntry, *Message) {
	body, ok := readJSONObject(r, maxSetBody)
	if !ok {
		return nil, &errBodyNotJSON
	}
	rawList, ok := body["psks"]
	if !ok {
		m := errBadBody("psks is required")
		return nil, &m
	}
	var list []json.RawMessage
	if json.Unmarshal(rawList, &list) != nil || list == nil {
		m := errBadBody("psks must be an array")
		return nil, &m
	}
	entries := make([]pskEntry, 0, len(list))
	seen := map[string]int{}
	for i, raw := range list {
		var entry map[string]json.RawMessage
		if json.Unmarshal(raw, &entry) != nil || entry == nil {
			m := errBadBody(fmt.Sprintf("psks[%d] must be an object", i))
			return nil, &m
		}
		id, ok := jsonString(entry["id"])
		if !ok {
			m := errBadBody(fmt.Sprintf("psks[%d].id is required and must be a string", i))
			return nil, &m
		}
		psk, ok := jsonString(entry["psk"])
		if !ok {
			m := errBadBody(fmt.Sprintf("psks[%d].psk is required and must be a string", i))
			return nil, &m
		}
		id = strings.ToLower(id)
		if first, dup := seen[id]; dup {
			m := errBadBody(fmt.Sprintf("psks[%d].id names the same tunnel as psks[%d]", i, first))
			return nil, &m
		}
		seen[id] = i
		entries = append(entries, pskEntry{ID: id, PSK: psk})
	}
	return entries, nil
}

// jsonString decodes a JSON string; a missing value (nil), null or any
// other type is not one.
func jsonString(raw json.RawMessage) (string, bool) {
	var v string
	if raw == nil || string(raw) == "null" || json.Unmarshal(raw, &v) != nil {
		return "", false
	}
	return v, true
}

func (s *Server) pskSet(w http.ResponseWriter, r *http.Request) {
	req := s.readPSKSet(w, r)
	if req == nil {
		return
	}
	s.mu.Lock()
	result := s.applyPSKSet(req)
	s.mu.Unlock()
	writeSuccess(w, result)
}

// applyPSKSet judges each key of a checked request and, unless it only
// validates, sets the keys the edge accepts. It returns the operation's
// result. The caller holds mu.
func (s *Server) applyPSKSet(req *pskSetRequest) map[string]any {
	applied := map[string]any{}
	unapplied := map[string]any{}
	for _, e := range req.entries {
		t := s.accounts[req.accountID][e.ID]
		reason, forced := req.unapplied[e.ID]
		switch {
		case t == nil:
			unapplied[e.ID] = reasonTunnelNotFound
			continue
		case forced:
			if reason == "" {
				reason = reasonEdgeRefused
			}
			unapplied[e.ID] = reason
			continue
		case t.RefusePSK != "":
			unapplied[e.ID] = t.RefusePSK
			continue
		}
		if refusal := PSKRefusal(e.PSK); refusal != "" {
			unapplied[e.ID] = refusal
			continue
		}
		if !req.validateOnly {
			s.setPSK(t, e.PSK)
		}
		entry := map[string]any{
			"ipsec_tunnel_id": t.ID,
			"ipsec_id":        ipsecIDOf(t),
			"psk":             e.PSK,
			// Required by the schema, with last_generated_on optional: a
			// validation for a tunnel that never had a key has nothing
			// to date.
			"psk_metadata": map[string]any{},
		}
		if !t.PSKGeneratedOn.IsZero() {
			entry["psk_metadata"] = map[string]any{"last_generated_on": formatTime(t.PSKGeneratedOn)}
		}
		applied[e.ID] = entry
	}
	return map[string]any{"successfully_applied_psks": applied, "unapplied_psks": unapplied}
}

// ipsecIDOf is a tunnel's ipsec_id in the Set operation's answer, where the
// schema requires one: Tunnel.IPsecID when set, else one of the form of the
// schema's example ("12345_abc123def4567890abcdef1234567890": a number, "_",
// 32 hex digits), made of the tunnel's id.
func ipsecIDOf(t *Tunnel) string {
	if t.IPsecID != "" {
		return t.IPsecID
	}
	return "12345_" + t.ID
}

// unappliedKey carries Fault.Unapplied in a request's context, from the
// fault to the handler that applies the batch (directly, after a commit, or
// late).
type unappliedKey struct{}

func withUnapplied(ctx context.Context, m map[string]string) context.Context {
	lower := make(map[string]string, len(m))
	for id, reason := range m {
		lower[strings.ToLower(id)] = reason
	}
	return context.WithValue(ctx, unappliedKey{}, lower)
}

func unappliedOf(ctx context.Context) map[string]string {
	m, _ := ctx.Value(unappliedKey{}).(map[string]string)
	return m
}
