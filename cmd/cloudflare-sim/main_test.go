package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestControlPlaysTheSetFaults drives the Set operation's faults through
// the control API, as a person trying the engine under make dev would.
func TestControlPlaysTheSetFaults(t *testing.T) {
	sim := cloudflaresim.New()
	srv := httptest.NewServer(withControl(sim))
	t.Cleanup(srv.Close)
	t.Cleanup(sim.Close)
	token := sim.AddToken(cloudflaresim.Token{}).Value
	account := cloudflaresim.NewID()
	a := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	b := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	const keyA, keyB = "KeyAKeyAKeyAKeyAKeyAKeyAKeyA0001", "KeyBKeyBKeyBKeyBKeyBKeyBKeyB0002"

	control := func(path, body string) int {
		t.Helper()
		resp, err := http.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		return resp.StatusCode
	}
	set := func() (int, string) {
		t.Helper()
		body := `{"psks":[{"id":"` + a + `","psk":"` + keyA + `"},{"id":"` + b + `","psk":"` + keyB + `"}]}`
		req, _ := http.NewRequest("POST", srv.URL+cloudflaresim.BasePath+"/accounts/"+account+"/magic/ipsec_tunnels/psk", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(raw)
	}

	if got := control("/_sim/fail-next?op=psk_set", `{"Unapplied":{"`+b+`":"tunnel is busy"}}`); got != http.StatusNoContent {
		t.Fatalf("fail-next: %d", got)
	}
	status, body := set()
	var env struct {
		Result struct {
			Unapplied map[string]string `json:"unapplied_psks"`
		} `json:"result"`
	}
	if err := json.Unmarshal([]byte(body), &env); err != nil || status != 200 || env.Result.Unapplied[b] != "tunnel is busy" {
		t.Errorf("with Unapplied: status %d, unapplied %v (%v)", status, env.Result.Unapplied, err)
	}

	if got := control("/_sim/psk-batch-limit?max=1", ""); got != http.StatusNoContent {
		t.Fatalf("psk-batch-limit: %d", got)
	}
	if status, _ := set(); status != http.StatusRequestEntityTooLarge {
		t.Errorf("over the batch limit: status %d, want 413", status)
	}
	if got := control("/_sim/psk-batch-limit?max=0", ""); got != http.StatusNoContent {
		t.Fatalf("psk-batch-limit: %d", got)
	}
	if status, _ := set(); status != http.StatusOK {
		t.Errorf("limit removed: status %d", status)
	}

	for _, bad := range []string{"/_sim/fail-next?op=psk_sett", "/_sim/fail-next", "/_sim/psk-batch-limit?max=-1", "/_sim/psk-batch-limit?max=many"} {
		if got := control(bad, `{}`); got != http.StatusBadRequest {
			t.Errorf("%s: %d, want 400", bad, got)
		}
	}
	if n := sim.Calls(cloudflaresim.OpPSKSet); n != 3 {
		t.Errorf("Set calls = %d, want 3", n)
	}
}
