package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// agentLagRotations is how many scheduled rotations the lag is measured
// over (one a minute: the shortest rotation_period, with the mount's
// min_rotation_period lowered to it).
const agentLagRotations = 2

// TestAgentFollowsScheduledRotations runs a long-running Vault Agent, as a
// router would, with a template on a tunnel that rotates every minute, and
// measures for each scheduled rotation the time from the edge's key change
// (Cloudflare activates it at once: the tunnel is down from then) to the
// rendered file holding the new key. Agent learns when to read again from
// the read's ttl (rotation-aware reads); without it, it would wait for
// static_secret_render_interval, five minutes by default.
func TestAgentFollowsScheduledRotations(t *testing.T) {
	lags := measureAgentLag(t, agentLagRotations)
	for i, lag := range lags {
		t.Logf("rotation %d: the router's file held the new key %s after the edge changed", i+1, lag.Round(time.Millisecond))
		if lag > 5*time.Second {
			t.Errorf("rotation %d: Agent rendered the new key %s after the edge changed; the target is 2s", i+1, lag.Round(time.Millisecond))
		}
	}
}

// measureAgentLag is the test and the benchmark's shared run: it returns one
// lag per scheduled rotation.
func measureAgentLag(t testing.TB, rotations int) []time.Duration {
	sim, baseURL, secrets, token, account := newEdge(t)
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	path := "cloudflare-ipsec/psk/" + account + "/" + tunnel

	v := startDevServerAt(t, secrets, "info")
	v.mountEngine(t, baseURL, token.Value)
	// One rotation a minute, below the default floor of 1h: a lab's
	// administrator lowers it.
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "min_rotation_period=1m")
	v.mustVault(t, v.rootToken, "write", path, "rotation_period=1m")

	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	writeFile(t, tokenFile, v.rootToken)
	writeFile(t, filepath.Join(dir, "psk.tpl"), fmt.Sprintf(`{{ with secret %q }}{{ .Data.psk }}{{ end }}`, path))
	dest := filepath.Join(dir, "psk")
	// Agent's defaults, as a router would run it: only the address, the
	// token (token_file is for this local test; docs/examples use AppRole)
	// and the template.
	writeFile(t, filepath.Join(dir, "agent.hcl"), fmt.Sprintf(`
vault { address = %q }
auto_auth {
  method "token_file" {
    config = { token_file_path = %q }
  }
}
template {
  source      = %q
  destination = %q
  perms       = "0600"
}
`, v.addr, tokenFile, filepath.Join(dir, "psk.tpl"), dest))

	ctx, cancel := context.WithCancel(context.Background())
	var out syncedBuffer
	cmd := exec.CommandContext(ctx, suite.vaultBin, "agent", "-config="+filepath.Join(dir, "agent.hcl"))
	cmd.Env = append(baseEnv(), "HOME="+dir)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		assertNoSecretsIn(t, secrets, "Vault Agent's output", out.String())
		assertNoSecretsIn(t, secrets, "the server log", v.log())
	})

	rendered := func() string { b, _ := os.ReadFile(dest); return string(b) }
	edgeKey := func() (string, time.Time) { e, _ := sim.Tunnel(account, tunnel); return e.PSK, e.PSKGeneratedOn }
	// The first render.
	waitFor(t, 30*time.Second, func() bool { k, _ := edgeKey(); return rendered() == k }, "Agent's first render")

	var lags []time.Duration
	for i := 0; i < rotations; i++ {
		before, _ := edgeKey()
		// The next scheduled rotation comes within a minute (plus the
		// scheduler's pacing).
		waitFor(t, 90*time.Second, func() bool { k, _ := edgeKey(); return k != before }, fmt.Sprintf("scheduled rotation %d", i+1))
		key, changed := edgeKey()
		waitFor(t, 6*time.Minute, func() bool { return rendered() == key }, fmt.Sprintf("Agent's render after rotation %d", i+1))
		lags = append(lags, time.Since(changed))
	}
	return lags
}

// waitFor polls cond every 50ms until it holds or limit passes.
func waitFor(t testing.TB, limit time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not happen within %s", what, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// syncedBuffer collects a process's output from its two pipes.
type syncedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Clone(b.buf.String())
}
