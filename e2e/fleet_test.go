package e2e

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestFleetRotationOnARealServer covers discovery, scheduled rotation (the
// shortest period, one minute, with min_rotation_period lowered to it, so
// the test waits for the scheduler) and bulk
// rotation of an account through the vault CLI and the HTTP API.
func TestFleetRotationOnARealServer(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	var tunnels []string
	for i := 0; i < 5; i++ {
		tunnels = append(tunnels, sim.AddTunnel(account, cloudflaresim.Tunnel{Name: fmt.Sprintf("branch_%d", i)}).ID)
	}
	psk := func(tun string) string { return "cloudflare-ipsec/psk/" + account + "/" + tun }
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, token.Value)

	t.Run("discovery shows which tunnels Vault manages", func(t *testing.T) {
		for _, tun := range tunnels[:3] {
			v.mustVault(t, root, "write", "-f", psk(tun))
		}
		status, body := v.api(t, root, "LIST", "cloudflare-ipsec/tunnels/"+account, nil)
		if status != http.StatusOK {
			t.Fatalf("LIST tunnels: HTTP %d", status)
		}
		info := body["data"].(map[string]any)["key_info"].(map[string]any)
		for i, tun := range tunnels {
			m, ok := info[tun].(map[string]any)
			if !ok {
				t.Fatalf("tunnel %s missing from discovery", tun)
			}
			if m["managed"] != (i < 3) || m["name"] != fmt.Sprintf("branch_%d", i) {
				t.Errorf("tunnel %d: %v", i, m)
			}
		}
		if strings.Contains(fmt.Sprint(body), `psk:`) {
			t.Error("discovery shows a key")
		}
	})

	t.Run("bulk rotation of an account", func(t *testing.T) {
		queued := v.mustVaultJSON(t, root, "write", "-f", "cloudflare-ipsec/rotate/"+account)
		if fmt.Sprint(field(t, queued, "queued")) != "3" {
			t.Fatalf("queued = %v, want 3", field(t, queued, "queued"))
		}
		deadline := time.Now().Add(60 * time.Second)
		for {
			p := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/rotate/"+account)
			if fmt.Sprint(field(t, p, "done")) == "3" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("bulk rotation did not finish: %v", p["data"])
			}
			time.Sleep(200 * time.Millisecond)
		}
		for _, tun := range tunnels[:3] {
			read := v.mustVaultJSON(t, root, "read", psk(tun))
			edge, _ := sim.Tunnel(account, tun)
			if fmt.Sprint(field(t, read, "version")) != "2" || field(t, read, "psk") != edge.PSK {
				t.Errorf("tunnel %s after bulk rotation: version %v, key is the edge's: %v", tun[:8], field(t, read, "version"), field(t, read, "psk") == edge.PSK)
			}
		}
	})

	t.Run("rotation_period rotates the tunnel again", func(t *testing.T) {
		// A one-minute period is below the default floor of 1h.
		v.mustVault(t, root, "write", "cloudflare-ipsec/config", "min_rotation_period=1m")
		v.mustVault(t, root, "write", psk(tunnels[3]), "rotation_period=1m")
		meta := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/metadata/"+account+"/"+tunnels[3])
		if fmt.Sprint(field(t, meta, "rotation_period")) != "60" || field(t, meta, "next_rotation") == "" {
			t.Fatalf("metadata = %v", meta["data"])
		}
		deadline := time.Now().Add(150 * time.Second)
		for {
			read := v.mustVaultJSON(t, root, "read", psk(tunnels[3]))
			if fmt.Sprint(field(t, read, "version")) == "2" {
				edge, _ := sim.Tunnel(account, tunnels[3])
				if field(t, read, "psk") != edge.PSK || field(t, read, "state") != "current" {
					t.Error("the scheduled rotation left Vault without the edge's key")
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the scheduler did not rotate the tunnel within two and a half minutes of a one-minute period")
			}
			time.Sleep(2 * time.Second)
		}
	})

	t.Run("disabling the mount stops its scheduler", func(t *testing.T) {
		// A budget so small that the bulk run below goes one call every few
		// seconds: a scheduler still alive after the disable would call
		// Cloudflare again within the time watched.
		v.mustVault(t, root, "write", "cloudflare-ipsec/config", "rate_limit=3", "rate_limit_window=4s")
		v.mustVault(t, root, "write", "-f", "cloudflare-ipsec/rotate/"+account)
		time.Sleep(time.Second)
		p := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/rotate/"+account)
		if fmt.Sprint(field(t, p, "remaining")) == "0" {
			t.Fatalf("the bulk run finished inside a budget of 3 calls: %v", p["data"])
		}
		v.mustVault(t, root, "secrets", "disable", "cloudflare-ipsec")
		calls := sim.TotalCalls()
		time.Sleep(6 * time.Second)
		if sim.TotalCalls() != calls {
			t.Errorf("%d Cloudflare calls after the mount was disabled", sim.TotalCalls()-calls)
		}
		if status, _ := v.api(t, root, "GET", "sys/health", nil); status != http.StatusOK {
			t.Errorf("server health after disable: HTTP %d", status)
		}
	})

	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}
