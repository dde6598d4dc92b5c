package rotation

// Router facts: what Cloudflare knows of a tunnel that a router's
// configuration needs beside the key (the address to connect to, the
// tunnel's inside addresses, the IKE identity), kept in the tunnel's record
// so that one Vault read gives a provisioning tool or a Vault Agent template
// everything, with no Cloudflare credentials and no call to Cloudflare.
//
// No rotation asks Cloudflare for them: they come from reads the engine
// makes anyway. A tunnel's first rotation already reads the tunnel (to learn
// the key it is replacing); psk_generate's answer may carry ipsec_id; the
// drift sweep lists every managed tunnel of an account once per
// drift_check_interval, and tunnels/ reads and lists ask Cloudflare on an
// operator's behalf. A record is rewritten only when a fact changed.

import (
	"context"
	"net/netip"
	"regexp"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// factText is what a name or an identity may hold to be pasted into a
// router's configuration: Cloudflare's names have no spaces or special
// characters, and IKE identities are FQDNs, user@FQDNs or tokens like
// 12345_abc. Nothing that could end a quoted string or a line.
var factText = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,254}$`)

// edgeFacts turns what Cloudflare said of t into router facts; known
// supplies ipsec_id when the answer carries none. A value that does not
// parse as what it should be (an address, a prefix, a name or identity in
// factText) is left out and logged by field name: the templates paste these
// values into router configurations, where a line break or a quote would let
// a value add configuration of its own.
func (e *Engine) edgeFacts(t store.Tunnel, edge *cloudflare.TunnelState, known store.Facts) store.Facts {
	var refused []string
	check := func(field, value string, parse func(string) (string, bool)) string {
		if value == "" {
			return ""
		}
		clean, ok := parse(value)
		if !ok {
			refused = append(refused, field)
			return ""
		}
		return clean
	}
	facts := store.Facts{
		Name:               check("name", edge.Name, asText),
		CloudflareEndpoint: check("cloudflare_endpoint", edge.CloudflareEndpoint, asAddr),
		CustomerEndpoint:   check("customer_endpoint", edge.CustomerEndpoint, asAddr),
		InterfaceAddress:   check("interface_address", edge.InterfaceAddress, asPrefix),
		InterfaceAddress6:  check("interface_address6", edge.InterfaceAddress6, asPrefix),
		CustomFQDNID:       check("custom_remote_identities.fqdn_id", edge.CustomFQDNID, asText),
		IPsecID:            known.IPsecID,
	}
	if id := check("ipsec_id", edge.IPsecID, asText); id != "" {
		facts.IPsecID = id
	}
	if len(refused) > 0 {
		e.TunnelLogger(t).Warn("cloudflare described the tunnel with values a router configuration cannot hold; they are left out", "fields", refused)
	}
	return facts
}

// withIPsecID is known with the ipsec_id of a psk_generate answer, when the
// answer carries a usable one.
func (e *Engine) withIPsecID(t store.Tunnel, known store.Facts, ipsecID string) store.Facts {
	if ipsecID == "" {
		return known
	}
	if !factText.MatchString(ipsecID) {
		e.TunnelLogger(t).Warn("cloudflare described the tunnel with values a router configuration cannot hold; they are left out", "fields", []string{"ipsec_id"})
		return known
	}
	known.IPsecID = ipsecID
	return known
}

func asText(v string) (string, bool) { return v, factText.MatchString(v) }

func asAddr(v string) (string, bool) {
	a, err := netip.ParseAddr(v)
	if err != nil || a.Zone() != "" {
		return "", false
	}
	return a.String(), true
}

func asPrefix(v string) (string, bool) {
	p, err := netip.ParsePrefix(v)
	if err != nil {
		return "", false
	}
	return p.String(), true
}

// refreshFacts records what Cloudflare just said of a managed tunnel (a
// listing or read the caller made anyway) when its router facts changed,
// and returns the record as it stands. The caller holds t's lock and passes
// the record read under it.
//
// In the same write it keeps, once, what the answer proves of the stored
// key: an answer Cloudflare dated well past the stored key's second that
// shows that key's time (KeySeenAt) proves that a later attempt which
// changed nothing changed nothing, at whole-second precision
// (keyChangeSince).
func (e *Engine) refreshFacts(ctx context.Context, s logical.Storage, t store.Tunnel, rec *store.Record, edge *cloudflare.TunnelState) (*store.Record, error) {
	updated := e.refreshed(t, rec, edge)
	if updated == *rec {
		return rec, nil
	}
	if err := store.WriteRecord(ctx, s, t, &updated); err != nil {
		return rec, err
	}
	if updated.Facts != rec.Facts {
		e.TunnelLogger(t).Info("router facts updated from cloudflare", "fields", changedFacts(rec.Facts, updated.Facts))
	}
	return &updated, nil
}

// refreshed is rec with what edge, the caller's listing or read of the
// tunnel, says: the router facts, and for a current record whose key the
// edge still dates the same, a later answer that proves it (KeySeenAt).
func (e *Engine) refreshed(t store.Tunnel, rec *store.Record, edge *cloudflare.TunnelState) store.Record {
	updated := *rec
	updated.Facts = e.edgeFacts(t, edge, rec.Facts)
	proven := func(at time.Time) bool {
		return !at.IsZero() && !at.Before(rec.LastGeneratedOn.Add(dateProofMargin))
	}
	if rec.Current() && edge.PSKLastGeneratedOn.Equal(rec.LastGeneratedOn) && !proven(rec.KeySeenAt) && proven(edge.Date) {
		updated.KeySeenAt = edge.Date.UTC()
	}
	return updated
}

// changedFacts names the facts that differ, for the log.
func changedFacts(a, b store.Facts) []string {
	var changed []string
	for _, f := range []struct {
		name string
		a, b string
	}{
		{"name", a.Name, b.Name},
		{"cloudflare_endpoint", a.CloudflareEndpoint, b.CloudflareEndpoint},
		{"customer_endpoint", a.CustomerEndpoint, b.CustomerEndpoint},
		{"interface_address", a.InterfaceAddress, b.InterfaceAddress},
		{"interface_address6", a.InterfaceAddress6, b.InterfaceAddress6},
		{"custom_fqdn_id", a.CustomFQDNID, b.CustomFQDNID},
		{"ipsec_id", a.IPsecID, b.IPsecID},
	} {
		if f.a != f.b {
			changed = append(changed, f.name)
		}
	}
	return changed
}
