package cloudflare

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

type fixture struct {
	sim     *cloudflaresim.Server
	client  *Client
	baseURL string
	token   cloudflaresim.Token
	account string
	tunnel  string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	sim := cloudflaresim.New()
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	token := sim.AddToken(cloudflaresim.Token{})
	baseURL := srv.URL + cloudflaresim.BasePath
	client, err := New(Config{APIToken: token.Value, BaseURL: baseURL, RequestTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	account := cloudflaresim.NewID()
	return &fixture{sim: sim, client: client, baseURL: baseURL, token: token, account: account,
		tunnel: sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID}
}

func TestGeneratePSKReturnsTheEdgesKey(t *testing.T) {
	f := newFixture(t)
	got, err := f.client.GeneratePSK(context.Background(), f.account, f.tunnel, false)
	if err != nil {
		t.Fatal(err)
	}
	edge, _ := f.sim.Tunnel(f.account, f.tunnel)
	if got.PSK != edge.PSK || !got.LastGeneratedOn.Equal(edge.PSKGeneratedOn) {
		t.Fatalf("GeneratePSK = key generated at %s, edge's generated at %s (keys equal: %v)",
			got.LastGeneratedOn, edge.PSKGeneratedOn, got.PSK == edge.PSK)
	}
}

// TestValidateOnlyPassesOnAKeyTheEdgeGenerated: a validation's answer
// carries no key and GeneratePSK returns none; an answer that carries one
// means the edge generated it (a gateway dropped the query), and the key is
// returned so that the caller can store it rather than lose it.
func TestValidateOnlyPassesOnAKeyTheEdgeGenerated(t *testing.T) {
	cases := []struct {
		name    string
		fault   *cloudflaresim.Fault
		wantKey bool
	}{
		{name: "validated"},
		{name: "query dropped on the way", fault: &cloudflaresim.Fault{IgnoreValidateOnly: true}, wantKey: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			before, _ := f.sim.Tunnel(f.account, f.tunnel)
			if tc.fault != nil {
				f.sim.FailNext(cloudflaresim.OpPSKGenerate, *tc.fault)
			}
			got, err := f.client.GeneratePSK(context.Background(), f.account, f.tunnel, true)
			if err != nil {
				t.Fatal(err)
			}
			edge, _ := f.sim.Tunnel(f.account, f.tunnel)
			if changed := edge.PSK != before.PSK; changed != tc.wantKey {
				t.Fatalf("the edge's key changed: %v, want %v", changed, tc.wantKey)
			}
			if tc.wantKey {
				if got.PSK != edge.PSK || !got.LastGeneratedOn.Equal(edge.PSKGeneratedOn) {
					t.Errorf("GeneratePSK returned a key generated at %s, the edge's is of %s (keys equal: %v)",
						got.LastGeneratedOn, edge.PSKGeneratedOn, got.PSK == edge.PSK)
				}
				return
			}
			if got.PSK != "" {
				t.Error("a validation returned a key")
			}
		})
	}
}

// TestNothingIsReadFromTheEnvironment sets the variables the SDK's NewClient
// would read; the client must ignore them.
func TestNothingIsReadFromTheEnvironment(t *testing.T) {
	t.Setenv("CLOUDFLARE_API_TOKEN", "env-token-that-must-not-be-used")
	t.Setenv("CLOUDFLARE_BASE_URL", "http://127.0.0.1:1/client/v4")
	f := newFixture(t)
	if _, err := f.client.VerifyToken(context.Background(), ""); err != nil {
		t.Fatalf("the client used the environment: %v", err)
	}
}

func TestErrorsAreTypedAndCarryCloudflaresDetail(t *testing.T) {
	const leaked = "LEAKEDLEAKEDLEAKEDLEAKEDLEAKED12"
	cases := []struct {
		name  string
		fault cloudflaresim.Fault
		check func(t *testing.T, err error)
	}{
		{"4xx refusal", cloudflaresim.Fault{Status: 403, Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}},
			func(t *testing.T, err error) {
				var e *APIError
				if !errors.As(err, &e) || e.HTTPStatus != 403 || !e.Rejected() || e.Errors[0].Code != 10000 || e.Op != OpGeneratePSK {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"rate limit", cloudflaresim.Fault{Status: 429, RetryAfter: 300},
			func(t *testing.T, err error) {
				var e *APIError
				if !errors.As(err, &e) || !e.RateLimited() || e.Rejected() || e.RetryAfter != 5*time.Minute || e.Errors[0].Code != 971 {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"5xx", cloudflaresim.Fault{Status: 502},
			func(t *testing.T, err error) {
				var e *APIError
				if !errors.As(err, &e) || e.HTTPStatus != 502 || e.Rejected() {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"success false under 200", cloudflaresim.Fault{SuccessFalse: true, Errors: []cloudflaresim.Message{{Code: 1015, Message: "busy"}}},
			func(t *testing.T, err error) {
				var e *APIError
				if !errors.As(err, &e) || e.HTTPStatus != 200 || e.Rejected() || !strings.Contains(err.Error(), `"success": false`) {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"cut-off body holding a key", cloudflaresim.Fault{Body: `{"success":true,"errors":[],"messages":[],"result":{"psk":"` + leaked},
			func(t *testing.T, err error) {
				var e *MalformedResponseError
				if !errors.As(err, &e) {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"key of the wrong type", cloudflaresim.Fault{Body: `{"success":true,"errors":[],"messages":[],"result":{"psk":["` + leaked + `"]}}`},
			func(t *testing.T, err error) {
				var e *MalformedResponseError
				if !errors.As(err, &e) {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"answer for another tunnel", cloudflaresim.Fault{Body: `{"success":true,"errors":[],"messages":[],"result":{"ipsec_tunnel_id":"00000000000000000000000000000000","psk":"` + leaked + `","psk_metadata":{"last_generated_on":"2026-01-01T00:00:00Z"}}}`},
			func(t *testing.T, err error) {
				var e *MalformedResponseError
				if !errors.As(err, &e) || !strings.Contains(err.Error(), "not") {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"error body that is not JSON", cloudflaresim.Fault{Status: 500, Body: "<html>" + leaked + "</html>"},
			func(t *testing.T, err error) {
				var e *APIError
				if !errors.As(err, &e) || e.HTTPStatus != 500 || len(e.Errors) != 0 {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"timeout", cloudflaresim.Fault{Delay: 3 * time.Second},
			func(t *testing.T, err error) {
				var e *TransportError
				if !errors.As(err, &e) || !e.Timeout() {
					t.Fatalf("err = %#v", err)
				}
			}},
		{"hang-up", cloudflaresim.Fault{Hangup: true},
			func(t *testing.T, err error) {
				var e *TransportError
				if !errors.As(err, &e) || e.Timeout() {
					t.Fatalf("err = %#v", err)
				}
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			f.sim.FailNext(cloudflaresim.OpPSKGenerate, tc.fault)
			_, err := f.client.GeneratePSK(context.Background(), f.account, f.tunnel, false)
			if err == nil {
				t.Fatal("no error")
			}
			tc.check(t, err)
			if msg := err.Error(); strings.Contains(msg, leaked) || strings.Contains(msg, f.token.Value) {
				t.Error("the error quotes a secret")
			}
			if n := f.sim.Calls(cloudflaresim.OpPSKGenerate); n != 1 {
				t.Errorf("psk_generate was sent %d times; it must never be retried", n)
			}
		})
	}
}

func TestVerifyTokenRetriesOnlyWhatIsSafe(t *testing.T) {
	cases := []struct {
		name      string
		faults    []cloudflaresim.Fault
		wantErr   bool
		wantCalls int
	}{
		{"two 5xx then success", []cloudflaresim.Fault{{Status: 503}, {Status: 500}}, false, 3},
		{"three 5xx", []cloudflaresim.Fault{{Status: 503}, {Status: 503}, {Status: 503}}, true, 3},
		{"hang-up then success", []cloudflaresim.Fault{{Hangup: true}}, false, 2},
		{"rate limited", []cloudflaresim.Fault{{Status: 429, RetryAfter: 300}}, true, 1},
		{"refused", []cloudflaresim.Fault{{Status: 403, Errors: []cloudflaresim.Message{{Code: 9109, Message: "Invalid access token"}}}}, true, 1},
		{"malformed", []cloudflaresim.Fault{{Body: "{"}}, true, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			for _, fault := range tc.faults {
				f.sim.FailNext(cloudflaresim.OpUserTokenVerify, fault)
			}
			status, err := f.client.VerifyToken(context.Background(), "")
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error: %v", err, tc.wantErr)
			}
			if err == nil && (status.ID != f.token.ID || !status.Active()) {
				t.Errorf("status = %+v", status)
			}
			if n := f.sim.Calls(cloudflaresim.OpUserTokenVerify); n != tc.wantCalls {
				t.Errorf("calls = %d, want %d", n, tc.wantCalls)
			}
		})
	}
}

func TestVerifyAccountOwnedToken(t *testing.T) {
	f := newFixture(t)
	owned := f.sim.AddToken(cloudflaresim.Token{OwnerAccount: f.account, Status: "disabled"})
	client, err := New(Config{APIToken: owned.Value, BaseURL: f.baseURL, RequestTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	status, err := client.VerifyToken(context.Background(), f.account)
	if err != nil {
		t.Fatal(err)
	}
	if status.ID != owned.ID || status.Active() || status.Status != "disabled" {
		t.Errorf("status = %+v", status)
	}
	if f.sim.Calls(cloudflaresim.OpAccountTokenVerify) != 1 {
		t.Error("the account endpoint was not used")
	}
}

// TestNoProxyFromTheEnvironment: Go's default transport takes its proxy
// from HTTPS_PROXY and friends, which config never names. (A reviewer's
// sequence: with HTTPS_PROXY set, every call went to that proxy. The check
// is on the transport itself, because Go reads those variables only once
// per process, so setting them inside one test of many proves nothing.)
func TestNoProxyFromTheEnvironment(t *testing.T) {
	transport, ok := newHTTPClient().Transport.(*http.Transport)
	if !ok {
		t.Fatalf("transport is %T", newHTTPClient().Transport)
	}
	if transport.Proxy != nil {
		t.Fatal("the transport takes a proxy from somewhere config does not name")
	}
	if newHTTPClient().CheckRedirect == nil {
		t.Fatal("redirects are followed")
	}
}

// TestAnswersCarryRouterFacts: what a router's configuration needs is
// decoded from the reads the engine already makes (tunnel get and list) and
// from psk_generate's ipsec_id, which the SDK does not decode; a tunnel
// without the optional fields reads as empty strings.
func TestAnswersCarryRouterFacts(t *testing.T) {
	f := newFixture(t)
	full := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{
		Name:               "site_a_1",
		CloudflareEndpoint: "162.159.66.1",
		CustomerEndpoint:   "198.51.100.7",
		InterfaceAddress:   "10.252.2.34/31",
		InterfaceAddress6:  "2606:54c1:7:0:a9fe:12d2:1:200/127",
		CustomFQDNID:       "site-a." + f.account + ".custom.ipsec.cloudflare.com",
		IPsecID:            "12345_" + f.account,
	})
	want := TunnelState{
		ID: full.ID, Name: "site_a_1", CloudflareEndpoint: "162.159.66.1", CustomerEndpoint: "198.51.100.7",
		InterfaceAddress: "10.252.2.34/31", InterfaceAddress6: "2606:54c1:7:0:a9fe:12d2:1:200/127",
		CustomFQDNID: full.CustomFQDNID, PSKLastGeneratedOn: full.PSKGeneratedOn,
	}
	got, err := f.client.GetTunnel(context.Background(), f.account, full.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !got.PSKLastGeneratedOn.Equal(want.PSKLastGeneratedOn) {
		t.Errorf("last_generated_on = %s, want %s", got.PSKLastGeneratedOn, want.PSKLastGeneratedOn)
	}
	got.PSKLastGeneratedOn = want.PSKLastGeneratedOn
	got.Date = time.Time{} // the answer's time: TestAnswersCarryCloudflaresTime
	if *got != want {
		t.Errorf("GetTunnel = %+v\nwant %+v", *got, want)
	}
	list, err := f.client.ListTunnels(context.Background(), f.account)
	if err != nil {
		t.Fatal(err)
	}
	for _, listed := range list {
		listed.PSKLastGeneratedOn, listed.Date = time.Time{}, time.Time{}
		bare := TunnelState{ID: f.tunnel, Name: listed.Name, CloudflareEndpoint: listed.CloudflareEndpoint, InterfaceAddress: listed.InterfaceAddress}
		switch listed.ID {
		case full.ID:
			w := want
			w.PSKLastGeneratedOn = time.Time{}
			if listed != w {
				t.Errorf("ListTunnels has %+v\nwant %+v", listed, w)
			}
		case f.tunnel:
			if listed != bare || listed.Name == "" || listed.CloudflareEndpoint == "" {
				t.Errorf("a tunnel without the optional fields lists as %+v", listed)
			}
		}
	}
	generated, err := f.client.GeneratePSK(context.Background(), f.account, full.ID, false)
	if err != nil {
		t.Fatal(err)
	}
	if generated.IPsecID != full.IPsecID {
		t.Errorf("GeneratePSK's ipsec_id = %q, want %q", generated.IPsecID, full.IPsecID)
	}
	generated, err = f.client.GeneratePSK(context.Background(), f.account, f.tunnel, false)
	if err != nil {
		t.Fatal(err)
	}
	if generated.IPsecID != "" {
		t.Errorf("an answer without ipsec_id gave %q", generated.IPsecID)
	}
}

func TestExtraStringReadsOnlyJSONStrings(t *testing.T) {
	for raw, want := range map[string]string{``: "", `null`: "", `12`: "", `{"a":1}`: "", `"x_1"`: "x_1", `"a\"b"`: `a"b`} {
		if got := extraString(raw); got != want {
			t.Errorf("extraString(%s) = %q, want %q", raw, got, want)
		}
	}
}

// TestGeneratePSKChecksTheKeysForm: a key that is not 16 to 128 letters and
// digits (Cloudflare's are 32) is never returned, in a generation's answer or
// in a validate_only answer that carries one: it is a WrongKeyForm error that
// says what is wrong without quoting the key.
func TestGeneratePSKChecksTheKeysForm(t *testing.T) {
	random := func(n int) string { return strings.Repeat(cloudflaresim.NewID(), 5)[:n] }
	cases := []struct {
		name string
		key  string
		ok   bool
		want string // in the error
	}{
		{name: "Cloudflare's form", key: random(32), ok: true},
		{name: "16 characters", key: random(16), ok: true},
		{name: "128 characters", key: random(128), ok: true},
		{name: "15 characters", key: random(15), want: "it has 15 characters"},
		{name: "129 characters", key: random(129), want: "it has 129 characters"},
		{name: "a quote and a line break", key: random(32) + "\"\nset system login user x", want: "other than letters and digits"},
		{name: "a backslash", key: random(31) + `\`, want: "other than letters and digits"},
		{name: "a space", key: random(16) + " " + random(15), want: "other than letters and digits"},
		{name: "base64 padding", key: random(30) + "==", want: "other than letters and digits"},
		{name: "non-ASCII letters", key: random(30) + "é", want: "other than letters and digits"},
	}
	for _, tc := range cases {
		for _, validateOnly := range []bool{false, true} {
			name := tc.name
			if validateOnly {
				name += ", in a validate_only answer"
			}
			t.Run(name, func(t *testing.T) {
				f := newFixture(t)
				f.sim.SetPSKValue(func() string { return tc.key })
				if validateOnly {
					f.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{IgnoreValidateOnly: true})
				}
				got, err := f.client.GeneratePSK(context.Background(), f.account, f.tunnel, validateOnly)
				if tc.ok {
					if err != nil || got.PSK != tc.key {
						t.Fatalf("a key of Cloudflare's form was not returned: %v", err)
					}
					return
				}
				if err == nil {
					t.Fatal("a key of the wrong form was returned")
				}
				if !WrongKeyForm(err) || NoEffect(err) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("WrongKeyForm %v, NoEffect %v: %v", WrongKeyForm(err), NoEffect(err), err)
				}
				if strings.Contains(err.Error(), tc.key[:15]) {
					t.Fatal("the error quotes the key")
				}
			})
		}
	}
}

// TestAnswersCarryCloudflaresTime: every operation that reads the edge's key
// time also returns Cloudflare's time of the answer, from its Date header,
// so that the engine judges the one by the other and never by its own
// clock. The simulator's clock is set apart from the real one; a missing or
// unparseable header gives the zero time.
func TestAnswersCarryCloudflaresTime(t *testing.T) {
	f := newFixture(t)
	edgeNow := time.Now().Add(-42 * time.Second).UTC()
	f.sim.SetClock(func() time.Time { return edgeNow })
	want := edgeNow.Truncate(time.Second)
	ctx := context.Background()

	got, err := f.client.GetTunnel(ctx, f.account, f.tunnel)
	if err != nil || !got.Date.Equal(want) {
		t.Errorf("GetTunnel: Date %s, err %v; want %s", got.Date, err, want)
	}
	list, err := f.client.ListTunnels(ctx, f.account)
	if err != nil || len(list) != 1 || !list[0].Date.Equal(want) {
		t.Errorf("ListTunnels: %d tunnels, err %v; want one dated %s", len(list), err, want)
	}
	generated, err := f.client.GeneratePSK(ctx, f.account, f.tunnel, false)
	if err != nil || !generated.Date.Equal(want) {
		t.Errorf("GeneratePSK: err %v; want Date %s", err, want)
	}
	validated, err := f.client.GeneratePSK(ctx, f.account, f.tunnel, true)
	if err != nil || !validated.Date.Equal(want) {
		t.Errorf("GeneratePSK validate_only: err %v; want Date %s", err, want)
	}

	for name, date := range map[string]string{"absent": "", "unparseable": "yesterday, about noon"} {
		t.Run(name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				f.sim.ServeHTTP(dateless{w, date}, r)
			}))
			t.Cleanup(srv.Close)
			client, err := New(Config{APIToken: f.token.Value, BaseURL: srv.URL + cloudflaresim.BasePath, RequestTimeout: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			got, err := client.GetTunnel(ctx, f.account, f.tunnel)
			if err != nil || !got.Date.IsZero() {
				t.Errorf("GetTunnel with the Date header %s: Date %s, err %v; want zero", name, got.Date, err)
			}
		})
	}
}

// dateless passes a handler's answer on with the Date header forced to
// date, whatever the handler set; "" removes it (Go's server adds a Date
// unless the header is set to nil).
type dateless struct {
	http.ResponseWriter
	date string
}

func (d dateless) WriteHeader(status int) {
	if d.date == "" {
		d.Header()["Date"] = nil
	} else {
		d.Header().Set("Date", d.date)
	}
	d.ResponseWriter.WriteHeader(status)
}
