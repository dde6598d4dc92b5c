package cloudflaresim

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
)

// The tunnel update: "Update IPsec Tunnel", PUT
// /accounts/{account_id}/magic/ipsec_tunnels/{tunnel_id}, whose body is the
// whole tunnel (the 2026-07-27 schema's magic_ipsec_tunnel_add_single_request:
// name, cloudflare_endpoint and interface_address required) and may carry a
// psk of the caller's choosing. It is a replacement, which is what makes it
// the weaker way to set a key: an optional field the body leaves out is
// reset (description, customer_endpoint and interface_address6 to empty,
// custom_remote_identities to none, replay_protection to false), so a
// caller must send back every field it does not mean to change, and a field
// added since the caller last read the tunnel is lost. A body without psk
// keeps the key.
//
// The simulator checks the body against the schema's types and enums, and
// what the field descriptions say of their form (IP addresses, a /31 and a
// /127, a name that is not empty and that no other tunnel of the account
// has); a body that fails is refused with 400, code 1003 (the simulator's
// choice), naming the field, and nothing changes. A psk the edge refuses
// (PSKRefusal, Tunnel.RefusePSK) is refused the same way, with code 1005,
// without quoting it. Fields the simulator's tunnels do not hold
// (health_check, bgp, automatic_return_routing) are checked and dropped. An
// accepted psk is set as the Set operation sets one (see setPSK). With
// ?validate_only=true nothing changes and the answer shows the tunnel as it
// would be, its psk_metadata as it is.

var errKeyRefused = func(reason string) Message { return Message{Code: 1005, Message: "invalid psk: " + reason} }

// tunnelUpdate is the body of a tunnel update, checked.
type tunnelUpdate struct {
	name, description                   string
	cloudflareEndpoint                  string
	customerEndpoint                    string
	interfaceAddress, interfaceAddress6 string
	customFQDNID                        string
	replayProtection                    bool
	psk                                 *string
}

func (s *Server) tunnelUpdate(w http.ResponseWriter, r *http.Request) {
	accountID, tunnelID, ok := s.tunnelFromPath(w, r)
	if !ok {
		return
	}
	body, ok := readJSONObject(r, 1<<16)
	if !ok {
		writeFailure(w, http.StatusBadRequest, errBodyNotJSON)
		return
	}
	u, problem := decodeTunnelUpdate(body)
	if problem != "" {
		writeFailure(w, http.StatusBadRequest, errBadBody(problem))
		return
	}
	if u.psk != nil {
		if reason := PSKRefusal(*u.psk); reason != "" {
			writeFailure(w, http.StatusBadRequest, errKeyRefused(reason))
			return
		}
	}
	validateOnly := r.URL.Query().Get("validate_only") == "true"

	s.mu.Lock()
	t := s.accounts[accountID][tunnelID]
	if t == nil { // deleted since tunnelFromPath looked
		s.mu.Unlock()
		writeFailure(w, http.StatusNotFound, errTunnelNotFound)
		return
	}
	if u.psk != nil && t.RefusePSK != "" {
		s.mu.Unlock()
		writeFailure(w, http.StatusBadRequest, errKeyRefused(t.RefusePSK))
		return
	}
	for _, other := range s.accounts[accountID] {
		if other != t && other.Name == u.name {
			s.mu.Unlock()
			writeFailure(w, http.StatusBadRequest, errBadBody("name is the name of another tunnel of the account"))
			return
		}
	}
	updated := copyTunnel(t)
	updated.Name, updated.Description = u.name, u.description
	updated.CloudflareEndpoint, updated.CustomerEndpoint = u.cloudflareEndpoint, u.customerEndpoint
	updated.InterfaceAddress, updated.InterfaceAddress6 = u.interfaceAddress, u.interfaceAddress6
	updated.CustomFQDNID, updated.ReplayProtected = u.customFQDNID, u.replayProtection
	if !validateOnly {
		updated.ModifiedOn = s.stamp()
		*t = updated
		if u.psk != nil {
			s.setPSK(t, *u.psk)
		}
		updated = copyTunnel(t)
	}
	s.mu.Unlock()
	writeSuccess(w, map[string]any{"modified": true, "modified_ipsec_tunnel": tunnelObject(&updated)})
}

// decodeTunnelUpdate checks a tunnel update's body field by field and
// returns what is wrong with it, "" when nothing is.
func decodeTunnelUpdate(body map[string]json.RawMessage) (tunnelUpdate, string) {
	var u tunnelUpdate
	str := func(field string, required bool, dst *string) string {
		raw, ok := body[field]
		if !ok {
			if required {
				return field + " is required"
			}
			return ""
		}
		v, ok := jsonString(raw)
		if !ok {
			return field + " must be a string"
		}
		*dst = v
		return ""
	}
	for _, f := range []struct {
		name     string
		required bool
		dst      *string
	}{
		{"name", true, &u.name},
		{"cloudflare_endpoint", true, &u.cloudflareEndpoint},
		{"interface_address", true, &u.interfaceAddress},
		{"description", false, &u.description},
		{"customer_endpoint", false, &u.customerEndpoint},
		{"interface_address6", false, &u.interfaceAddress6},
	} {
		if problem := str(f.name, f.required, f.dst); problem != "" {
			return u, problem
		}
	}
	if raw, ok := body["psk"]; ok {
		psk, ok := jsonString(raw)
		if !ok {
			return u, "psk must be a string"
		}
		u.psk = &psk
	}
	switch {
	case u.name == "":
		return u, "name must not be empty"
	case !isAddr(u.cloudflareEndpoint):
		return u, "cloudflare_endpoint must be an IP address"
	case u.customerEndpoint != "" && !isAddr(u.customerEndpoint):
		return u, "customer_endpoint must be an IP address"
	case !isPrefix(u.interfaceAddress, true, 31):
		return u, "interface_address must be an IPv4 /31 prefix"
	case u.interfaceAddress6 != "" && !isPrefix(u.interfaceAddress6, false, 127):
		return u, "interface_address6 must be an IPv6 /127 prefix"
	}
	for _, field := range []string{"replay_protection", "automatic_return_routing"} {
		if raw, ok := body[field]; ok {
			var b bool
			if json.Unmarshal(raw, &b) != nil || string(raw) == "null" {
				return u, field + " must be a boolean"
			}
			if field == "replay_protection" {
				u.replayProtection = b
			}
		}
	}
	problem := checkTunnelObjects(body, &u)
	return u, problem
}

// checkTunnelObjects checks a tunnel update's object fields
// (custom_remote_identities, health_check, bgp), keeping in u what the
// simulator's tunnels hold, and returns what is wrong, "" when nothing is.
func checkTunnelObjects(body map[string]json.RawMessage, u *tunnelUpdate) string {
	if raw, ok := body["custom_remote_identities"]; ok {
		var ids struct {
			FQDNID *string `json:"fqdn_id"`
		}
		if !isObject(raw) || json.Unmarshal(raw, &ids) != nil {
			return "custom_remote_identities must be an object whose fqdn_id is a string"
		}
		if ids.FQDNID != nil {
			u.customFQDNID = *ids.FQDNID
		}
	}
	if raw, ok := body["health_check"]; ok {
		if problem := checkHealthCheck(raw); problem != "" {
			return problem
		}
	}
	if raw, ok := body["bgp"]; ok {
		var bgp struct {
			CustomerASN   *int64    `json:"customer_asn"`
			ExtraPrefixes *[]string `json:"extra_prefixes"`
			MD5Key        *string   `json:"md5_key"`
		}
		if !isObject(raw) || json.Unmarshal(raw, &bgp) != nil {
			return "bgp must be an object with an integer customer_asn, a string array extra_prefixes and a string md5_key"
		}
		if bgp.CustomerASN == nil {
			return "bgp.customer_asn is required"
		}
	}
	return ""
}

// checkHealthCheck checks health_check against the schema's
// magic_health_check: enums for direction, rate and type, a boolean
// enabled, a target that is a string or, in the newer form, {"saved": ...}.
func checkHealthCheck(raw json.RawMessage) string {
	var hc struct {
		Direction *string         `json:"direction"`
		Enabled   *bool           `json:"enabled"`
		Rate      *string         `json:"rate"`
		Target    json.RawMessage `json:"target"`
		Type      *string         `json:"type"`
	}
	if !isObject(raw) || json.Unmarshal(raw, &hc) != nil {
		return "health_check must be an object with string direction, rate, type and target and a boolean enabled"
	}
	enums := []struct {
		field string
		value *string
		allow []string
	}{
		{"direction", hc.Direction, []string{"unidirectional", "bidirectional"}},
		{"rate", hc.Rate, []string{"low", "mid", "high"}},
		{"type", hc.Type, []string{"reply", "request"}},
	}
	for _, e := range enums {
		if e.value != nil && !slices.Contains(e.allow, *e.value) {
			return fmt.Sprintf("health_check.%s must be one of %s", e.field, strings.Join(e.allow, ", "))
		}
	}
	if hc.Target != nil {
		var target string
		var saved struct {
			Saved *string `json:"saved"`
		}
		if json.Unmarshal(hc.Target, &target) != nil && (!isObject(hc.Target) || json.Unmarshal(hc.Target, &saved) != nil) {
			return `health_check.target must be a string or {"saved": string}`
		}
	}
	return ""
}

func isObject(raw json.RawMessage) bool {
	var m map[string]json.RawMessage
	return json.Unmarshal(raw, &m) == nil && m != nil
}

func isAddr(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// isPrefix reports whether s is a prefix of the given family and length.
func isPrefix(s string, v4 bool, bits int) bool {
	p, err := netip.ParsePrefix(s)
	return err == nil && p.Addr().Is4() == v4 && p.Bits() == bits
}
