package cloudflaresim_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestSetSchemaRefusesWhatItShould checks the derived psk_set_200 itself:
// answers the schema rules out must fail it, or the conformance test of the
// simulator's answers would prove nothing.
func TestSetSchemaRefusesWhatItShould(t *testing.T) {
	schema := compile(t, loadSchemaDoc(t), "psk_set_200")
	envelope := func(result string) string {
		return `{"success":true,"errors":[],"messages":[],"result":` + result + `}`
	}
	applied := func(fields string) string {
		return envelope(`{"successfully_applied_psks":{"023e105f4ecef8ad9ca31a8372d0c353":{` + fields + `}},"unapplied_psks":{}}`)
	}
	const entry = `"ipsec_id":"12345_x","ipsec_tunnel_id":"023e105f4ecef8ad9ca31a8372d0c353","psk":"k","psk_metadata":{"last_generated_on":"2026-01-01T00:00:00Z"}`
	cases := []struct {
		name, body string
		valid      bool
	}{
		{"well-formed", applied(entry), true},
		{"no ipsec_id", applied(strings.Replace(entry, `"ipsec_id":"12345_x",`, "", 1)), false},
		{"no psk", applied(strings.Replace(entry, `"psk":"k",`, "", 1)), false},
		{"no psk_metadata", applied(strings.Replace(entry, `,"psk_metadata":{"last_generated_on":"2026-01-01T00:00:00Z"}`, "", 1)), false},
		{"date not a date", applied(strings.Replace(entry, "2026-01-01T00:00:00Z", "yesterday", 1)), false},
		{"reason not a string", envelope(`{"unapplied_psks":{"x":{"why":"no"}}}`), false},
		{"maps absent", envelope(`{}`), true},
		{"result an array", envelope(`[]`), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v, err := jsonschema.UnmarshalJSON(strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if err := schema.Validate(v); (err == nil) != tc.valid {
				t.Errorf("valid = %v, want %v (%v)", err == nil, tc.valid, err)
			}
		})
	}
}

// TestRequestsTheSimulatorTakesFitTheSchema holds the simulator's reading
// of a request to the request schemas: a body the schema rules out is
// refused, and a body the simulator refuses but the schema allows is one
// of the documented rules the schema does not express.
func TestRequestsTheSimulatorTakesFitTheSchema(t *testing.T) {
	doc := loadSchemaDoc(t)
	f := newFixture(t)
	other := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{Name: "other"}).ID
	required := `"name":"n","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31"`
	cases := []struct {
		schema, method, path, body string
		// beyondSchema: the simulator refuses a body the schema allows,
		// by a rule of its own that pskset.go or tunnelupdate.go states.
		beyondSchema bool
	}{
		{"psk_set_request", "POST", "/psk", `{"psks":[{"id":"` + f.tunnel + `","psk":"` + keyA + `"}]}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":[]}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":[{"id":"` + f.tunnel + `","psk":"` + keyA + `","extra":1}],"other":true}`, false},
		{"psk_set_request", "POST", "/psk", `{}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":{}}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":[1]}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":[{"id":"` + f.tunnel + `"}]}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":[{"psk":"` + keyA + `"}]}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":[{"id":7,"psk":"` + keyA + `"}]}`, false},
		{"psk_set_request", "POST", "/psk", `{"psks":[{"id":"` + f.tunnel + `","psk":"` + keyA + `"},{"id":"` + f.tunnel + `","psk":"` + keyB + `"}]}`, true},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `,"psk":"` + keyA + `","replay_protection":true,"health_check":{"rate":"high","target":"203.0.113.2"},"bgp":{"customer_asn":64512},"automatic_return_routing":false}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{"name":"n","cloudflare_endpoint":"203.0.113.1"}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `,"psk":5}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `,"replay_protection":"yes"}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `,"health_check":{"type":"ping"}}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `,"bgp":{"md5_key":"x"}}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `,"custom_remote_identities":{"fqdn_id":3}}`, false},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{` + required + `,"psk":"short"}`, true},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{"name":"n","cloudflare_endpoint":"somewhere","interface_address":"10.212.0.8/31"}`, true},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{"name":"n","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/24"}`, true},
		{"tunnel_update_request", "PUT", "/" + f.tunnel, `{"name":"other","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31"}`, true},
		{"tunnel_update_request", "PUT", "/" + other, `{"name":"","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31"}`, true},
	}
	for _, tc := range cases {
		v, err := jsonschema.UnmarshalJSON(bytes.NewReader([]byte(tc.body)))
		if err != nil {
			t.Fatal(err)
		}
		fits := compile(t, doc, tc.schema).Validate(v) == nil
		status, _ := f.call(t, tc.method, "/accounts/"+f.account+"/magic/ipsec_tunnels"+tc.path+"?validate_only=true", f.token.Value, []byte(tc.body))
		taken := status == 200
		switch {
		case taken && !fits:
			t.Errorf("%s %s: the simulator took a body the schema rules out", tc.schema, tc.body)
		case !taken && fits && !tc.beyondSchema:
			t.Errorf("%s %s: the simulator refused (%d) a body the schema allows", tc.schema, tc.body, status)
		case tc.beyondSchema && (taken || !fits):
			t.Errorf("%s %s: want a body the schema allows and the simulator refuses (fits %v, status %d)", tc.schema, tc.body, fits, status)
		}
	}
}
