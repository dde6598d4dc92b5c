package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestVaultMadeKeys is issue 16's "done when" on a real Vault, with
// key_source vault: a write sets Vault's key on the edge and psk_generate is
// never called; after a lost answer, or the plugin killed mid-request, a
// read within seconds serves the edge's key as current, the edge having
// been given exactly one new key; and after an abandoned request lands late,
// no read calls current a key the edge does not use.
func TestVaultMadeKeys(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	v := startDevServer(t, secrets)
	root := v.rootToken
	auditLog := filepath.Join(v.dir, "audit.log")
	v.mustVault(t, root, "audit", "enable", "file", "file_path="+auditLog)
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, root, "write", "cloudflare-ipsec/config", "key_source=vault")

	// Each sequence has a tunnel of its own, so that none waits out the
	// settle window another left behind.
	t.Run("a write sets Vault's key and never calls psk_generate", func(t *testing.T) {
		tn := newVaultKeysTunnel(t, v, sim, account)
		out := v.mustVaultJSON(t, root, "write", "-f", tn.path)
		if field(t, out, "key_source") != "vault" || field(t, out, "psk") != nil {
			t.Fatalf("write answer: key_source %v, carries a key: %v", field(t, out, "key_source"), field(t, out, "psk") != nil)
		}
		tn.readCurrent(t, time.Second)
		if n := sim.Calls(cloudflaresim.OpPSKGenerate); n != 0 {
			t.Fatalf("psk_generate called %d times", n)
		}
		if n := sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
			t.Fatalf("Set called %d times, want 1", n)
		}
	})

	t.Run("a lost answer is finished with the same key by a read", func(t *testing.T) {
		tn := newVaultKeysTunnel(t, v, sim, account)
		sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Hangup: true})
		if res := v.vault(t, root, "write", "-f", tn.path); res.code == 0 || !strings.Contains(res.stderr, "pending") {
			t.Fatalf("write with the answer lost: exit %d, stderr:\n%s", res.code, secrets.redact(res.stderr))
		}
		tn.readCurrent(t, 3*time.Second)
		if got := tn.distinctNewKeys(); got != 1 {
			t.Fatalf("the edge was given %d new keys, want 1", got)
		}
	})

	t.Run("the plugin killed mid-request ends with the pending key current", func(t *testing.T) {
		tn := newVaultKeysTunnel(t, v, sim, account)
		sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{AfterCommit: true, Delay: time.Minute})
		writeDone := make(chan cliResult, 1)
		go func() { writeDone <- v.vault(t, root, "write", "-f", tn.path) }()
		deadline := time.Now().Add(10 * time.Second)
		for len(tn.edge().GeneratedPSKs) == 1 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if len(tn.edge().GeneratedPSKs) == 1 {
			t.Fatal("the edge never took the key")
		}
		killPlugin(t)
		if res := <-writeDone; res.code == 0 {
			t.Fatal("the write whose plugin was killed reported success")
		}
		killed := time.Now()
		tn.readCurrent(t, 10*time.Second)
		t.Logf("a current key %s after the kill", time.Since(killed).Round(100*time.Millisecond))
		if got := tn.distinctNewKeys(); got != 1 {
			t.Fatalf("the edge was given %d new keys, want 1", got)
		}
		if n := sim.Calls(cloudflaresim.OpPSKGenerate); n != 0 {
			t.Fatalf("psk_generate called %d times", n)
		}
	})

	t.Run("a late landing never makes a read call a key current the edge does not use", func(t *testing.T) {
		tn := newVaultKeysTunnel(t, v, sim, account)
		v.mustVault(t, root, "write", "-f", tn.path)
		sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Hour})
		if res := v.vault(t, root, "write", "-f", tn.path); res.code == 0 {
			t.Fatal("the write the edge held reported success")
		}
		sim.WaitAccepted()
		tn.readCurrent(t, 3*time.Second)
		res := v.vault(t, root, "write", "-f", tn.path)
		if res.code == 0 || !strings.Contains(res.stderr, "Code: 409") || !strings.Contains(res.stderr, "different key") {
			t.Fatalf("a different key while the abandoned request may land: exit %d, stderr:\n%s", res.code, secrets.redact(res.stderr))
		}
		sim.ProcessLateNow() // the abandoned request lands: the same key, re-dated
		tn.readCurrent(t, time.Second)
		sync := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/tunnels/"+account+"/"+tn.id)
		if field(t, sync, "in_sync") != false {
			t.Errorf("a listing after the re-date: in_sync %v, want false (not proven)", field(t, sync, "in_sync"))
		}
		tn.readCurrent(t, time.Second)
		if got := tn.distinctNewKeys(); got != 2 {
			t.Fatalf("the edge was given %d new keys, want 2", got)
		}
	})

	audit, err := os.ReadFile(auditLog)
	if err != nil {
		t.Fatal(err)
	}
	assertNoSecretsIn(t, secrets, "the audit log", string(audit))
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

// vaultKeysTunnel is one tunnel of TestVaultMadeKeys.
type vaultKeysTunnel struct {
	v    *vaultServer
	sim  *cloudflaresim.Server
	acc  string
	id   string
	path string
}

func newVaultKeysTunnel(t *testing.T, v *vaultServer, sim *cloudflaresim.Server, account string) *vaultKeysTunnel {
	id := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	return &vaultKeysTunnel{v: v, sim: sim, acc: account, id: id, path: "cloudflare-ipsec/psk/" + account + "/" + id}
}

func (tn *vaultKeysTunnel) edge() cloudflaresim.Tunnel {
	e, _ := tn.sim.Tunnel(tn.acc, tn.id)
	return e
}

// distinctNewKeys is how many different keys the edge was given after the
// one the tunnel was created with: one key set twice counts once.
func (tn *vaultKeysTunnel) distinctNewKeys() int {
	seen := map[string]bool{}
	for _, k := range tn.edge().GeneratedPSKs[1:] {
		seen[k] = true
	}
	return len(seen)
}

// readCurrent reads the path until it serves a current key (the mount may
// be coming back after a kill) or within passes, and checks that the key
// is the edge's: no read may call current a key the edge does not use.
func (tn *vaultKeysTunnel) readCurrent(t *testing.T, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if res := tn.v.run(t, "json", tn.v.rootToken, "read", tn.path); res.code == 0 {
			read := decodeJSON(t, res.stdout)
			state := field(t, read, "state")
			if state == "current" && field(t, read, "psk") != tn.edge().PSK {
				t.Fatal("a read serves as current a key the edge does not use")
			}
			if state == "current" {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no current key within %s", within)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// killPlugin kills every process of the suite's plugin with SIGKILL.
func killPlugin(t *testing.T) {
	t.Helper()
	pids := pluginPIDs(t)
	if len(pids) == 0 {
		t.Fatal("no plugin process found to kill")
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatalf("kill plugin %d: %v", pid, err)
		}
	}
}
