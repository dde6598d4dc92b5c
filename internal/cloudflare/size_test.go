package cloudflare

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestListTunnelsReadsALargeAccount lists an account of 10,000 tunnels:
// the answer is megabytes long, and every tunnel must come back.
func TestListTunnelsReadsALargeAccount(t *testing.T) {
	const tunnels = 10_000
	f := newFixture(t)
	client, err := New(Config{APIToken: f.token.Value, BaseURL: f.baseURL, RequestTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < tunnels; i++ { // the fixture made one
		f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{CustomerEndpoint: "198.51.100.7", Description: "a tunnel of a large account"})
	}
	got, err := client.ListTunnels(context.Background(), f.account)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != tunnels {
		t.Fatalf("ListTunnels returned %d tunnels, want %d", len(got), tunnels)
	}
}

// TestAnswerSizeIsLimitedPerOperation sends answers just over each
// operation's limit. A one-tunnel answer has no reason to be large, so its
// limit is small; the error names the operation and the limit.
func TestAnswerSizeIsLimitedPerOperation(t *testing.T) {
	// padded is a well-formed success whose messages make it n bytes long.
	padded := func(n int, result string) string {
		head := `{"success":true,"errors":[],"messages":[{"code":1000,"message":"`
		tail := `"}],"result":` + result + `}`
		return head + strings.Repeat("x", n-len(head)-len(tail)) + tail
	}
	psk := `{"ipsec_tunnel_id":"%s","psk":"` + fuzzSecret + `","psk_metadata":{"last_generated_on":"2026-01-01T00:00:00Z"}}`
	cases := []struct {
		name    string
		op      cloudflaresim.Operation
		size    int
		result  string
		wantErr string
		call    func(f *fixture) error
	}{
		{"generate psk over 64 KiB", cloudflaresim.OpPSKGenerate, 64<<10 + 1, psk, "larger than the 64 KiB allowed for generate psk",
			func(f *fixture) error {
				_, err := f.client.GeneratePSK(context.Background(), f.account, f.tunnel, false)
				return err
			}},
		{"get tunnel over 64 KiB", cloudflaresim.OpTunnelGet, 64<<10 + 1, `{"ipsec_tunnel":{"id":"%s"}}`, "larger than the 64 KiB allowed for get tunnel",
			func(f *fixture) error {
				_, err := f.client.GetTunnel(context.Background(), f.account, f.tunnel)
				return err
			}},
		{"verify token over 64 KiB", cloudflaresim.OpUserTokenVerify, 64<<10 + 1, `{"id":"%s","status":"active"}`, "larger than the 64 KiB allowed for verify token",
			func(f *fixture) error { _, err := f.client.VerifyToken(context.Background(), ""); return err }},
		{"roll token over 64 KiB", cloudflaresim.OpUserTokenRoll, 64<<10 + 1, `"` + strings.Repeat("v", 40) + `"`, "larger than the 64 KiB allowed for roll token",
			func(f *fixture) error { _, err := f.client.RollToken(context.Background(), "", f.token.ID); return err }},
		{"list tunnels over 32 MiB", cloudflaresim.OpTunnelList, 32<<20 + 1, `{"ipsec_tunnels":[{"id":"%s"}]}`, "larger than the 32 MiB allowed for list tunnels",
			func(f *fixture) error { _, err := f.client.ListTunnels(context.Background(), f.account); return err }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			// Writing and reading 32 MiB under -race on a busy machine
			// takes longer than the fixture's one second.
			client, err := New(Config{APIToken: f.token.Value, BaseURL: f.baseURL, RequestTimeout: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			f.client = client
			f.sim.FailNext(tc.op, cloudflaresim.Fault{Body: padded(tc.size, strings.Replace(tc.result, "%s", f.tunnel, 1))})
			err = tc.call(f)
			var malformed *MalformedResponseError
			if !errors.As(err, &malformed) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want a malformed answer %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), fuzzSecret) {
				t.Error("the error quotes the answer")
			}
		})
	}
}
