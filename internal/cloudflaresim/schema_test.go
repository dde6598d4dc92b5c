package cloudflaresim_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// schemaFile holds the sections of Cloudflare's published OpenAPI fragments
// that these tests use, inside the repository so that a fresh clone tests on
// its own (testdata/README.md says where they come from).
var schemaFile = filepath.Join("testdata", "ipsec-openapi.json")

// loadSchemaDoc reads the fragments file; its absence fails the test, since
// conformance would otherwise go unchecked.
func loadSchemaDoc(t *testing.T) map[string]any {
	t.Helper()
	raw, err := os.ReadFile(schemaFile)
	if err != nil {
		t.Fatalf("Cloudflare's schema fragments are missing (%v): the simulator cannot be checked against them", err)
	}
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

// compile turns one of the file's resolved definitions into a JSON Schema
// validator. The definitions are OpenAPI 3.0, where "nullable": true means
// null is allowed too; JSON Schema says that with a type list.
func compile(t *testing.T, doc map[string]any, name string) *jsonschema.Schema {
	t.Helper()
	resolved := doc["derived_resolved_for_validation"].(map[string]any)
	def, ok := resolved[name]
	if !ok {
		t.Fatalf("no resolved definition %q in the schema file", name)
	}
	c := jsonschema.NewCompiler()
	c.AssertFormat()
	if err := c.AddResource("mem://"+name, openAPIToJSONSchema(def)); err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile("mem://" + name)
	if err != nil {
		t.Fatalf("compile %s: %v", name, err)
	}
	return s
}

func openAPIToJSONSchema(v any) any {
	switch x := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, val := range x {
			if k == "nullable" || k == "example" {
				continue
			}
			out[k] = openAPIToJSONSchema(val)
		}
		if nullable, _ := x["nullable"].(bool); nullable {
			if typ, ok := x["type"].(string); ok {
				out["type"] = []any{typ, "null"}
			}
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, val := range x {
			out[i] = openAPIToJSONSchema(val)
		}
		return out
	}
	return v
}

type fixture struct {
	sim     *cloudflaresim.Server
	url     string
	token   cloudflaresim.Token
	account string
	tunnel  string
}

func newFixture(t *testing.T) *fixture {
	sim := cloudflaresim.New()
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	account := cloudflaresim.NewID()
	return &fixture{
		sim:     sim,
		url:     srv.URL + cloudflaresim.BasePath,
		token:   sim.AddToken(cloudflaresim.Token{}),
		account: account,
		// Every optional field set, so that each appears in the answers
		// the schema checks.
		tunnel: sim.AddTunnel(account, cloudflaresim.Tunnel{
			CustomerEndpoint:  "198.51.100.7",
			InterfaceAddress6: "2606:54c1:7:0:a9fe:12d2:1:200/127",
			CustomFQDNID:      "site-a." + account + ".custom.ipsec.cloudflare.com",
			IPsecID:           "12345_" + account,
		}).ID,
	}
}

// call makes one request and returns the status and decoded body.
func (f *fixture) call(t *testing.T, method, path, token string, body []byte) (int, any) {
	t.Helper()
	req, err := http.NewRequest(method, f.url+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	decoded, err := jsonschema.UnmarshalJSON(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("%s %s: answer is not JSON: %v", method, path, err)
	}
	return resp.StatusCode, decoded
}

func TestAnswersSatisfyCloudflaresSchema(t *testing.T) {
	doc := loadSchemaDoc(t)
	f := newFixture(t)
	tunnelPath := "/accounts/" + f.account + "/magic/ipsec_tunnels/" + f.tunnel
	accountOwned := f.sim.AddToken(cloudflaresim.Token{OwnerAccount: f.account})
	rollable := f.sim.AddToken(cloudflaresim.Token{})
	setPath := "/accounts/" + f.account + "/magic/ipsec_tunnels/psk"
	second := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{}).ID
	keyless := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{NoInitialKey: true}).ID
	// Every fate a tunnel can have in one batch: applied, not found,
	// refused key.
	mixedBatch := []byte(`{"psks":[{"id":"` + f.tunnel + `","psk":"` + keyA + `"},{"id":"` + cloudflaresim.NewID() + `","psk":"` + keyB + `"},{"id":"` + second + `","psk":"short"}]}`)
	fullUpdate := []byte(`{"name":"site-a","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31","customer_endpoint":"198.51.100.7",` +
		`"interface_address6":"2606:54c1:7:0:a9fe:12d2:1:200/127","description":"site A","replay_protection":true,` +
		`"custom_remote_identities":{"fqdn_id":"site-a.` + f.account + `.custom.ipsec.cloudflare.com"},"psk":"` + keyC + `"}`)

	cases := []struct {
		name       string
		setup      func()
		method     string
		path       string
		token      string
		body       []byte
		wantStatus int
		schema     string
	}{
		{"psk_generate", nil, "POST", tunnelPath + "/psk_generate", f.token.Value, []byte(`{}`), 200, "psk_generate_200"},
		{"psk_generate validate_only", nil, "POST", tunnelPath + "/psk_generate?validate_only=true", f.token.Value, []byte(`{}`), 200, "psk_generate_200"},
		{"tunnel get", nil, "GET", tunnelPath, f.token.Value, nil, 200, "tunnel_single_200"},
		{"tunnel list", nil, "GET", "/accounts/" + f.account + "/magic/ipsec_tunnels", f.token.Value, nil, 200, "tunnels_collection_200"},
		{"user token verify", nil, "GET", "/user/tokens/verify", f.token.Value, nil, 200, "user_token_verify_200"},
		{"account token verify", nil, "GET", "/accounts/" + f.account + "/tokens/verify", accountOwned.Value, nil, 200, "user_token_verify_200"},
		{"unknown token", nil, "POST", tunnelPath + "/psk_generate", "no-such-token", []byte(`{}`), 403, "failure_envelope"},
		{"no authorization header", nil, "GET", tunnelPath, "", nil, 400, "failure_envelope"},
		{"unknown tunnel", nil, "POST", "/accounts/" + f.account + "/magic/ipsec_tunnels/" + cloudflaresim.NewID() + "/psk_generate", f.token.Value, []byte(`{}`), 404, "failure_envelope"},
		{"malformed identifier", nil, "GET", "/accounts/xyz/magic/ipsec_tunnels/" + f.tunnel, f.token.Value, nil, 400, "failure_envelope"},
		{"no body", nil, "POST", tunnelPath + "/psk_generate", f.token.Value, nil, 400, "failure_envelope"},
		{"unrouted path", nil, "GET", "/zones", f.token.Value, nil, 404, "failure_envelope"},
		{"user token roll", nil, "PUT", "/user/tokens/" + rollable.ID + "/value", rollable.Value, []byte(`{}`), 200, "token_roll_200"},
		{"injected 503", func() { f.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: 503}) },
			"GET", tunnelPath, f.token.Value, nil, 503, "failure_envelope"},
		{"psk set", nil, "POST", setPath, f.token.Value, mixedBatch, 200, "psk_set_200"},
		{"psk set validate_only", nil, "POST", setPath + "?validate_only=true", f.token.Value, mixedBatch, 200, "psk_set_200"},
		{"psk set validate_only, keyless tunnel", nil, "POST", setPath + "?validate_only=true", f.token.Value,
			[]byte(`{"psks":[{"id":"` + keyless + `","psk":"` + keyA + `"}]}`), 200, "psk_set_200"},
		{"psk set, tunnel unapplied by a fault", func() {
			f.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{f.tunnel: ""}})
		}, "POST", setPath, f.token.Value, mixedBatch, 200, "psk_set_200"},
		{"psk set, empty batch", nil, "POST", setPath, f.token.Value, []byte(`{"psks":[]}`), 200, "psk_set_200"},
		{"psk set, bad body", nil, "POST", setPath, f.token.Value, []byte(`{"psks":{}}`), 400, "failure_envelope"},
		{"tunnel update", nil, "PUT", tunnelPath, f.token.Value, fullUpdate, 200, "tunnel_modified_200"},
		{"tunnel update validate_only", nil, "PUT", tunnelPath + "?validate_only=true", f.token.Value, fullUpdate, 200, "tunnel_modified_200"},
		{"tunnel update, bad body", nil, "PUT", tunnelPath, f.token.Value, []byte(`{"name":"x"}`), 400, "failure_envelope"},
		{"tunnel update, refused key", nil, "PUT", tunnelPath, f.token.Value, []byte(`{"name":"x","cloudflare_endpoint":"203.0.113.1","interface_address":"10.212.0.8/31","psk":"short"}`), 400, "failure_envelope"},
		// Last: the limit stays.
		{"psk set, batch too large", func() { f.sim.SetPSKBatchLimit(2) }, "POST", setPath, f.token.Value, mixedBatch, 413, "failure_envelope"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup()
			}
			status, body := f.call(t, tc.method, tc.path, tc.token, tc.body)
			if status != tc.wantStatus {
				t.Fatalf("status = %d, want %d", status, tc.wantStatus)
			}
			if err := compile(t, doc, tc.schema).Validate(body); err != nil {
				t.Fatalf("answer does not satisfy %s: %v", tc.schema, err)
			}
			var inner any
			switch tc.schema {
			case "tunnel_single_200":
				inner = body.(map[string]any)["result"].(map[string]any)["ipsec_tunnel"]
			case "tunnel_modified_200":
				inner = body.(map[string]any)["result"].(map[string]any)["modified_ipsec_tunnel"]
			}
			if inner != nil {
				if err := compile(t, doc, "ipsec_tunnel_object").Validate(inner); err != nil {
					t.Fatalf("tunnel does not satisfy ipsec_tunnel_object: %v", err)
				}
			}
		})
	}
}

// TestFailuresMatchObservedCloudflareBodies compares the simulator's answers
// with the bodies publicly reported from Cloudflare (derived_examples). The
// 429 body is checked here rather than against the schema: its code, 971,
// is below the minimum of 1000 that the schema gives error codes.
func TestFailuresMatchObservedCloudflareBodies(t *testing.T) {
	doc := loadSchemaDoc(t)
	examples := doc["derived_examples"].(map[string]any)
	f := newFixture(t)
	tunnelPath := "/accounts/" + f.account + "/magic/ipsec_tunnels/" + f.tunnel

	f.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 429, RetryAfter: 300})
	cases := []struct {
		example    string
		token      string
		wantStatus int
	}{
		{"observed_429", f.token.Value, 429},
		{"observed_403_bad_token", "no-such-token", 403},
	}
	for _, tc := range cases {
		t.Run(tc.example, func(t *testing.T) {
			status, body := f.call(t, "POST", tunnelPath+"/psk_generate", tc.token, []byte(`{}`))
			if status != tc.wantStatus {
				t.Fatalf("status = %d, want %d", status, tc.wantStatus)
			}
			want := normalise(t, examples[tc.example])
			if got := normalise(t, body); !reflect.DeepEqual(got, want) {
				t.Errorf("body = %v\nwant %v", got, want)
			}
		})
	}
}

// normalise round-trips a value through encoding/json so that numbers
// decoded by different decoders compare equal.
func normalise(t *testing.T, v any) any {
	t.Helper()
	raw, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}
