package cloudflaresim_test

import (
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// fullTunnel is a tunnel with every field the simulator holds set.
func fullTunnel(account string) cloudflaresim.Tunnel {
	return cloudflaresim.Tunnel{
		Description:       "site A",
		CustomerEndpoint:  "198.51.100.7",
		InterfaceAddress6: "2606:54c1:7:0:a9fe:12d2:1:200/127",
		CustomFQDNID:      "site-a." + account + ".custom.ipsec.cloudflare.com",
		ReplayProtected:   true,
	}
}

// requiredFields are the members of a tunnel update's body the schema
// requires, from t.
func requiredFields(t cloudflaresim.Tunnel) string {
	return `"name":"` + t.Name + `","cloudflare_endpoint":"` + t.CloudflareEndpoint + `","interface_address":"` + t.InterfaceAddress + `"`
}

// updateBody is a tunnel update's body: the required fields of t, then
// extra members.
func updateBody(t cloudflaresim.Tunnel, extra string) []byte {
	body := requiredFields(t)
	if extra != "" {
		body += "," + extra
	}
	return []byte("{" + body + "}")
}

// TestTunnelUpdateReplacesTheWholeTunnel: the update is a PUT. Its psk
// becomes the tunnel's key, recorded like any other; the optional fields it
// leaves out are reset, which is why it is the weaker way to set a key.
func TestTunnelUpdateReplacesTheWholeTunnel(t *testing.T) {
	e := newEdge(t)
	created := e.sim.AddTunnel(e.account, fullTunnel(e.account))
	status, a := e.mustDo(t, "PUT", e.tunnelPath(created.ID), updateBody(created, `"psk":"`+keyA+`"`))
	if status != http.StatusOK {
		t.Fatalf("status %d, errors %v", status, a.Errors)
	}
	now, _ := e.sim.Tunnel(e.account, created.ID)
	if now.PSK != keyA || !slices.Equal(now.GeneratedPSKs, []string{created.PSK, keyA}) || !slices.Contains(e.sim.IssuedSecrets(), keyA) {
		t.Error("the update's psk is not the edge's key, recorded")
	}
	if !now.PSKGeneratedOn.After(created.PSKGeneratedOn) || !now.ModifiedOn.Equal(now.PSKGeneratedOn) {
		t.Errorf("key dated %v (was %v), modified_on %v", now.PSKGeneratedOn, created.PSKGeneratedOn, now.ModifiedOn)
	}
	if now.Description != "" || now.CustomerEndpoint != "" || now.InterfaceAddress6 != "" || now.CustomFQDNID != "" || now.ReplayProtected {
		t.Errorf("fields the update left out were kept: %+v", now)
	}
	if strings.Contains(string(a.Result["modified_ipsec_tunnel"]), keyA) {
		t.Error("the answer shows the key")
	}
	var modified bool
	decode(t, a.Result["modified"], &modified)
	var shown wireTunnel
	decode(t, a.Result["modified_ipsec_tunnel"], &shown)
	if !modified || shown.ID != created.ID || shown.PSKMetadata == nil || !wireTime(t, shown.PSKMetadata.LastGeneratedOn).Equal(now.PSKGeneratedOn) {
		t.Errorf("answer: modified %v, tunnel %+v", modified, shown)
	}

	// Without a psk the key stays.
	full := `"description":"site B","customer_endpoint":"198.51.100.8","interface_address6":"2606:54c1:7:0:a9fe:12d2:1:202/127",` +
		`"custom_remote_identities":{"fqdn_id":"b.` + e.account + `.custom.ipsec.cloudflare.com"},"replay_protection":true,` +
		`"automatic_return_routing":true,"health_check":{"enabled":true,"rate":"low","type":"request","target":"203.0.113.9"},` +
		`"bgp":{"customer_asn":64512,"extra_prefixes":["10.0.0.0/24"],"md5_key":"x"}`
	if status, a := e.mustDo(t, "PUT", e.tunnelPath(created.ID), updateBody(created, full)); status != http.StatusOK {
		t.Fatalf("status %d, errors %v", status, a.Errors)
	}
	after, _ := e.sim.Tunnel(e.account, created.ID)
	if after.PSK != keyA || len(after.GeneratedPSKs) != 2 || !after.PSKGeneratedOn.Equal(now.PSKGeneratedOn) {
		t.Error("an update without psk changed the key or its date")
	}
	if after.Description != "site B" || after.CustomerEndpoint != "198.51.100.8" || !after.ReplayProtected || !strings.HasPrefix(after.CustomFQDNID, "b.") {
		t.Errorf("the update's fields did not take: %+v", after)
	}
}

// TestTunnelUpdateRefusals: a body that does not fit the schema, a key the
// edge refuses or a name taken is refused with 400, naming the field and
// never quoting a key, and changes nothing.
func TestTunnelUpdateRefusals(t *testing.T) {
	cases := []struct {
		name        string
		body        string // %R: the required fields
		refusePSK   string
		wantStatus  int
		wantCode    int
		wantMessage string
	}{
		{"no body", "", "", 400, 1001, "request body must be a JSON object"},
		{"no name", `{"cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31"}`, "", 400, 1003, "invalid request body: name is required"},
		{"name not a string", `{"name":1,"cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31"}`, "", 400, 1003, "invalid request body: name must be a string"},
		{"endpoint not an address", `{"name":"n","cloudflare_endpoint":"cloudflare","interface_address":"10.212.0.8/31"}`, "", 400, 1003, "invalid request body: cloudflare_endpoint must be an IP address"},
		{"interface address not a /31", `{"name":"n","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/30"}`, "", 400, 1003, "invalid request body: interface_address must be an IPv4 /31 prefix"},
		{"interface address6 not a /127", `{%R,"interface_address6":"10.0.0.0/31"}`, "", 400, 1003, "invalid request body: interface_address6 must be an IPv6 /127 prefix"},
		{"replay_protection not a boolean", `{%R,"replay_protection":"yes"}`, "", 400, 1003, "invalid request body: replay_protection must be a boolean"},
		{"health check rate", `{%R,"health_check":{"rate":"often"}}`, "", 400, 1003, "invalid request body: health_check.rate must be one of low, mid, high"},
		{"bgp without asn", `{%R,"bgp":{}}`, "", 400, 1003, "invalid request body: bgp.customer_asn is required"},
		{"identities not an object", `{%R,"custom_remote_identities":"x"}`, "", 400, 1003, "invalid request body: custom_remote_identities must be an object whose fqdn_id is a string"},
		{"psk null", `{%R,"psk":null}`, "", 400, 1003, "invalid request body: psk must be a string"},
		{"psk too short", `{%R,"psk":"short"}`, "", 400, 1005, "invalid psk: psk must be 16 to 128 characters long"},
		{"psk with a space", `{%R,"psk":"` + keyA[:20] + ` ` + keyA[:20] + `"}`, "", 400, 1005, "invalid psk: psk must be printable ASCII characters other than space"},
		{"tunnel refuses keys", `{%R,"psk":"` + keyA + `"}`, "tunnel is being migrated", 400, 1005, "invalid psk: tunnel is being migrated"},
		{"name of another tunnel", `{"name":"taken","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31"}`, "", 400, 1003, "invalid request body: name is the name of another tunnel of the account"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEdge(t)
			created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{RefusePSK: tc.refusePSK})
			e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{Name: "taken"})
			var body []byte
			if tc.body != "" {
				body = []byte(strings.Replace(tc.body, "%R", requiredFields(created), 1))
			}
			status, a := e.mustDo(t, "PUT", e.tunnelPath(created.ID), body)
			if status != tc.wantStatus || len(a.Errors) != 1 || a.Errors[0].Code != tc.wantCode || a.Errors[0].Message != tc.wantMessage {
				t.Fatalf("status %d, errors %v: want %d, %d %q", status, a.Errors, tc.wantStatus, tc.wantCode, tc.wantMessage)
			}
			if strings.Contains(a.Errors[0].Message, keyA[:20]) {
				t.Error("the refusal quotes the key")
			}
			if now, _ := e.sim.Tunnel(e.account, created.ID); !reflect.DeepEqual(now, created) {
				t.Errorf("a refused update changed the tunnel")
			}
		})
	}
	t.Run("unknown tunnel", func(t *testing.T) {
		e := newEdge(t)
		created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
		if status, a := e.mustDo(t, "PUT", e.tunnelPath(cloudflaresim.NewID()), updateBody(created, "")); status != 404 || a.Errors[0].Code != 1002 {
			t.Errorf("status %d, errors %v: want 404, code 1002", status, a.Errors)
		}
	})
}

// TestTunnelUpdateValidateOnlyChangesNothing: a validation answers with the
// tunnel as it would be and changes nothing; a lost answer after the
// change leaves the change made.
func TestTunnelUpdateValidateOnlyChangesNothing(t *testing.T) {
	e := newEdge(t)
	created := e.sim.AddTunnel(e.account, fullTunnel(e.account))
	status, a := e.mustDo(t, "PUT", e.tunnelPath(created.ID)+"?validate_only=true", updateBody(created, `"description":"would be","psk":"`+keyA+`"`))
	if status != http.StatusOK {
		t.Fatalf("status %d", status)
	}
	var shown struct {
		Description string `json:"description"`
	}
	decode(t, a.Result["modified_ipsec_tunnel"], &shown)
	if shown.Description != "would be" {
		t.Errorf("the validation shows description %q, want the one it would have", shown.Description)
	}
	if now, _ := e.sim.Tunnel(e.account, created.ID); !reflect.DeepEqual(now, created) {
		t.Error("a validation changed the tunnel")
	}

	e.sim.FailNext(cloudflaresim.OpTunnelUpdate, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
	if _, _, err := e.do(t, nil, "PUT", e.tunnelPath(created.ID), updateBody(created, `"psk":"`+keyA+`"`)); err == nil {
		t.Fatal("the lost answer was answered")
	}
	if now, _ := e.sim.Tunnel(e.account, created.ID); now.PSK != keyA {
		t.Error("the change before the lost answer was not made")
	}
	if n := e.sim.Calls(cloudflaresim.OpTunnelUpdate); n != 2 {
		t.Errorf("update calls = %d, want 2", n)
	}
}
