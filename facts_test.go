package main

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// routerTunnel gives the test env a tunnel with every router fact set, and
// makes it the env's tunnel.
func routerTunnel(env *testEnv) cloudflaresim.Tunnel {
	env.tunnel = env.sim.AddTunnel(env.account, cloudflaresim.Tunnel{
		Name:               "site_a_1",
		CloudflareEndpoint: "162.159.66.1",
		CustomerEndpoint:   "198.51.100.7",
		InterfaceAddress:   "10.252.2.34/31",
		InterfaceAddress6:  "2606:54c1:7:0:a9fe:12d2:1:200/127",
		CustomFQDNID:       "site-a." + env.account + ".custom.ipsec.cloudflare.com",
		IPsecID:            "12345_abc123def4567890abcdef1234567890",
	})
	return env.tunnel
}

// wantFacts is what psk/ and metadata/ must return for a tunnel.
func wantFacts(tun cloudflaresim.Tunnel, customerSide, customerSide6 string) map[string]string {
	return map[string]string{
		"name":                        tun.Name,
		"cloudflare_endpoint":         tun.CloudflareEndpoint,
		"customer_endpoint":           tun.CustomerEndpoint,
		"interface_address":           tun.InterfaceAddress,
		"interface_address6":          tun.InterfaceAddress6,
		"customer_interface_address":  customerSide,
		"customer_interface_address6": customerSide6,
		"custom_fqdn_id":              tun.CustomFQDNID,
		"ipsec_id":                    tun.IPsecID,
	}
}

// assertFacts reads psk/ and metadata/ and compares their router facts with
// want.
func assertFacts(t *testing.T, env *testEnv, when string, want map[string]string) {
	t.Helper()
	for _, path := range []string{env.pskPath(), env.metaPath()} {
		data := env.must(env.request(logical.ReadOperation, path, nil)).Data
		for field, w := range want {
			if got, _ := data[field].(string); got != w {
				t.Errorf("%s: %s %s = %q, want %q", when, strings.SplitN(path, "/", 2)[0], field, got, w)
			}
		}
	}
}

// TestFirstRotationKeepsRouterFacts: the read a first rotation makes anyway
// and psk_generate's answer give psk/ and metadata/ everything a router
// needs; a second rotation costs exactly one call, a psk_generate, and
// carries the facts over.
func TestFirstRotationKeepsRouterFacts(t *testing.T) {
	env := newConfiguredEnv(t)
	tun := routerTunnel(env)
	want := wantFacts(tun, "10.252.2.35/31", "2606:54c1:7:0:a9fe:12d2:1:201/127")

	gets, generates := env.sim.Calls(cloudflaresim.OpTunnelGet), env.sim.Calls(cloudflaresim.OpPSKGenerate)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if n := env.sim.Calls(cloudflaresim.OpTunnelGet) - gets; n != 1 {
		t.Errorf("the first rotation read the tunnel %d times, want 1 (the read it always made)", n)
	}
	if n := env.sim.Calls(cloudflaresim.OpPSKGenerate) - generates; n != 1 {
		t.Errorf("the first rotation generated %d keys", n)
	}
	assertFacts(t, env, "after the first rotation", want)

	calls, generates := env.sim.TotalCalls(), env.sim.Calls(cloudflaresim.OpPSKGenerate)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	assertFacts(t, env, "after the second rotation", want)
	if n := env.sim.Calls(cloudflaresim.OpPSKGenerate) - generates; n != 1 || env.sim.TotalCalls()-calls != 1 {
		t.Errorf("the second rotation and three reads made %d Cloudflare calls (%d psk_generate), want exactly one psk_generate",
			env.sim.TotalCalls()-calls, n)
	}
	assertCurrent(t, env, "after the second rotation")
}

// TestEdgeChangesReachTheRecord: an endpoint or identity changed at the
// dashboard shows in psk/ after a tunnels/ read, a tunnels/ listing or a
// drift sweep, each of which already asks Cloudflare; ipsec_id, which those
// answers do not carry, survives them. The record is written only when a
// fact changed.
func TestEdgeChangesReachTheRecord(t *testing.T) {
	for _, tc := range []struct {
		name    string
		observe func(env *testEnv)
	}{
		{"tunnels/ read", func(env *testEnv) {
			env.must(env.request(logical.ReadOperation, "tunnels/"+env.account+"/"+env.tunnel.ID, nil))
		}},
		{"tunnels/ list", func(env *testEnv) {
			env.must(env.request(logical.ListOperation, "tunnels/"+env.account, nil))
		}},
		{"drift sweep", func(env *testEnv) {
			env.clock.Advance(10 * time.Minute)
			backgroundPass(t, env)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
			tun := routerTunnel(env)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))

			edited, _ := env.sim.EditOutOfBand(env.account, tun.ID, func(t *cloudflaresim.Tunnel) {
				t.CloudflareEndpoint = "172.64.244.68"
				t.InterfaceAddress = "10.252.2.21/30"
				t.InterfaceAddress6 = ""
				t.CustomFQDNID = ""
			})
			storage := &failingStorage{Storage: env.storage}
			var factWrites atomic.Int32
			storage.setFailPut(func(e *logical.StorageEntry) bool {
				if e.Key == store.PSKPrefix+env.account+"/"+tun.ID {
					factWrites.Add(1)
				}
				return false
			})
			env.storage = storage
			tc.observe(env)
			if n := factWrites.Load(); n != 1 {
				t.Errorf("the record was written %d times for one change, want 1", n)
			}
			want := wantFacts(edited, "10.252.2.22/30", "")
			want["ipsec_id"] = tun.IPsecID
			calls := env.sim.TotalCalls()
			assertFacts(t, env, "after the change was seen", want)
			if env.sim.TotalCalls() != calls {
				t.Error("reading the facts called Cloudflare")
			}

			tc.observe(env)
			if n := factWrites.Load(); n != 1 {
				t.Errorf("nothing changed, yet the record was written again (%d writes in all)", n)
			}
			assertCurrent(t, env, "after the facts changed")
		})
	}
}

// TestUnsafeFactsAreLeftOut: the templates paste facts into router
// configurations, so a value that could carry configuration of its own (a
// line break, a quote, an address that is none) is not stored, and the log
// names the field, never a key.
func TestUnsafeFactsAreLeftOut(t *testing.T) {
	env := newConfiguredEnv(t)
	tun := routerTunnel(env)
	env.sim.EditOutOfBand(env.account, tun.ID, func(t *cloudflaresim.Tunnel) {
		t.Name = "site\nset system login user x"
		t.CustomFQDNID = `a".example`
		t.CloudflareEndpoint = "162.159.66.1; reboot"
	})
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	want := wantFacts(tun, "10.252.2.35/31", "2606:54c1:7:0:a9fe:12d2:1:201/127")
	want["name"], want["custom_fqdn_id"], want["cloudflare_endpoint"] = "", "", ""
	assertFacts(t, env, "after a rotation read unsafe values", want)
	logs := env.logs.String()
	if !strings.Contains(logs, "cannot hold") || !strings.Contains(logs, "custom_remote_identities.fqdn_id") {
		t.Errorf("the refused fields are not logged by name")
	}
	if strings.Contains(logs, "set system login") {
		t.Error("the log repeats a refused value")
	}
}

func TestCustomerSideIsTheOtherAddress(t *testing.T) {
	for in, want := range map[string]string{
		"10.252.2.34/31":                    "10.252.2.35/31",
		"10.252.2.35/31":                    "10.252.2.34/31",
		"10.252.2.21/30":                    "10.252.2.22/30",
		"10.252.2.22/30":                    "10.252.2.21/30",
		"10.252.2.20/30":                    "", // the network address: not Cloudflare's side
		"10.252.2.23/30":                    "",
		"10.252.2.0/24":                     "",
		"2606:54c1:7:0:a9fe:12d2:1:200/127": "2606:54c1:7:0:a9fe:12d2:1:201/127",
		"2606:54c1:7:0:a9fe:12d2:1:201/127": "2606:54c1:7:0:a9fe:12d2:1:200/127",
		"2606:54c1:7::/64":                  "",
		"":                                  "",
		"10.0.0.1":                          "",
	} {
		if got := store.CustomerSide(in); got != want {
			t.Errorf("customerSide(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestRecordsWithoutFactsGetThemFromTheSweep: a record stored before the
// engine kept router facts (or whose first rotation's read said little)
// gets them from the next drift sweep, not from a call of its own.
func TestRecordsWithoutFactsGetThemFromTheSweep(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": "10m"}))
	tun := routerTunnel(env)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	ref := store.Tunnel{AccountID: env.account, TunnelID: tun.ID}
	rec, err := store.ReadRecord(context.Background(), env.storage, ref)
	if err != nil || rec == nil {
		t.Fatalf("read record: %v", err)
	}
	ipsecID := rec.Facts.IPsecID
	rec.Facts = store.Facts{}
	if err := store.WriteRecord(context.Background(), env.storage, ref, rec); err != nil {
		t.Fatal(err)
	}
	assertFacts(t, env, "with no facts stored", map[string]string{"cloudflare_endpoint": "", "customer_interface_address": ""})

	env.clock.Advance(10 * time.Minute)
	backgroundPass(t, env)
	want := wantFacts(tun, "10.252.2.35/31", "2606:54c1:7:0:a9fe:12d2:1:201/127")
	want["ipsec_id"] = "" // only a psk_generate answer carries it
	assertFacts(t, env, "after the sweep", want)
	if ipsecID != tun.IPsecID {
		t.Errorf("the first rotation kept ipsec_id %q, want %q", ipsecID, tun.IPsecID)
	}
}

// TestARecordWithoutFactsGetsThemOnItsNextRotation: a record stored before
// router facts existed (or whose first read did not give them) gets them
// on its next rotation, with one read of the tunnel, instead of never (a
// reviewer's sequence: with the drift sweep off, such a record kept empty
// addresses for ever, and the IOS-XE template could not render).
func TestARecordWithoutFactsGetsThemOnItsNextRotation(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, "config", map[string]any{"drift_check_interval": 0}))
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	rec := record(t, env, env.tunnel.ID)
	rec.Facts = store.Facts{}
	if err := store.WriteRecord(context.Background(), env.storage, store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}, rec); err != nil {
		t.Fatal(err)
	}
	gets := env.sim.Calls(cloudflaresim.OpTunnelGet)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if got := record(t, env, env.tunnel.ID).Facts; got.CloudflareEndpoint == "" || got.InterfaceAddress == "" {
		t.Fatalf("after a rotation the record still has no router facts: %+v", got)
	}
	if n := env.sim.Calls(cloudflaresim.OpTunnelGet) - gets; n != 1 {
		t.Errorf("the rotation read the tunnel %d times, want 1", n)
	}
	gets = env.sim.Calls(cloudflaresim.OpTunnelGet)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
	if n := env.sim.Calls(cloudflaresim.OpTunnelGet) - gets; n != 0 {
		t.Errorf("a rotation of a record with facts read the tunnel %d times, want 0 (steady state)", n)
	}
}
