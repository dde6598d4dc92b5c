package cloudflaresim_test

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestValidateOnlyGeneratesNothing: a validate_only psk_generate changes
// nothing and, as Cloudflare's documentation implies, its answer carries no
// key. IgnoreValidateOnly plays a gateway that dropped the query string: the
// edge generates a real key and the answer carries it, alone or with the
// rest of a fault (a lost answer after the change).
func TestValidateOnlyGeneratesNothing(t *testing.T) {
	cases := []struct {
		name       string
		fault      *cloudflaresim.Fault
		wantStatus int // 0: no answer
		wantChange bool
		wantPSK    bool
	}{
		{name: "validate_only", wantStatus: http.StatusOK},
		{name: "query dropped on the way", fault: &cloudflaresim.Fault{IgnoreValidateOnly: true},
			wantStatus: http.StatusOK, wantChange: true, wantPSK: true},
		{name: "query dropped, answer lost", fault: &cloudflaresim.Fault{IgnoreValidateOnly: true, AfterCommit: true, Hangup: true},
			wantChange: true},
		{name: "query dropped, refused", fault: &cloudflaresim.Fault{IgnoreValidateOnly: true, Status: http.StatusServiceUnavailable},
			wantStatus: http.StatusServiceUnavailable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEdge(t)
			created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			if tc.fault != nil {
				e.sim.FailNext(cloudflaresim.OpPSKGenerate, *tc.fault)
			}
			client := &http.Client{Timeout: 5 * time.Second}
			status, a, err := e.do(t, client, "POST", e.tunnelPath(created.ID)+"/psk_generate?validate_only=true", []byte(`{}`))
			switch {
			case tc.wantStatus == 0 && err == nil:
				t.Fatalf("answered with %d, want no answer", status)
			case tc.wantStatus != 0 && (err != nil || status != tc.wantStatus):
				t.Fatalf("status %d, error %v: want %d", status, err, tc.wantStatus)
			}
			after, _ := e.sim.Tunnel(e.account, created.ID)
			if changed := after.PSK != created.PSK; changed != tc.wantChange {
				t.Errorf("the edge's key changed: %v, want %v", changed, tc.wantChange)
			}
			raw, hasPSK := a.Result["psk"]
			if hasPSK != tc.wantPSK {
				t.Fatalf("answer carries psk: %v, want %v", hasPSK, tc.wantPSK)
			}
			if hasPSK {
				var psk string
				if err := json.Unmarshal(raw, &psk); err != nil || psk != after.PSK {
					t.Errorf("the answer's psk is not the edge's new key (err %v)", err)
				}
			}
		})
	}
}
