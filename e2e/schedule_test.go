package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestSchedulesOnARealServer drives rotation_schedule, rotation_window and
// the schedule-only path through the vault CLI, as operators do: a cron
// schedule is set with the key's rotation; the schedule path moves it
// without a call to Cloudflare or a new key, under the operator policy of
// docs/policies (which may reschedule, never read a key, and never set a
// schedule shorter than min_rotation_period); bad combinations are 400s
// that send nothing.
func TestSchedulesOnARealServer(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	psk := "cloudflare-ipsec/psk/" + account + "/" + tunnel
	schedule := psk + "/schedule"

	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, token.Value)
	v.mustVault(t, v.rootToken, "write", psk, "rotation_schedule=0 2 * * 6", "rotation_window=1h")
	read := v.mustVaultJSON(t, v.rootToken, "read", psk)
	if field(t, read, "rotation_schedule") != "0 2 * * 6" || fmt.Sprint(field(t, read, "ttl")) == "" {
		t.Fatalf("after a write with a schedule: rotation_schedule %v, ttl %v", field(t, read, "rotation_schedule"), field(t, read, "ttl"))
	}
	next, err := time.Parse(time.RFC3339Nano, fmt.Sprint(field(t, read, "next_rotation")))
	if err != nil || next.Weekday() != time.Saturday || next.Hour() != 2 || next.Minute() != 0 {
		t.Fatalf("next_rotation %v is not a Saturday at 02:00 UTC (%v)", field(t, read, "next_rotation"), err)
	}

	policy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "operator.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(v.dir, "operator.hcl"), string(policy))
	v.mustVault(t, v.rootToken, "policy", "write", "cf-ipsec-operator", filepath.Join(v.dir, "operator.hcl"))
	operator := v.mustVault(t, v.rootToken, "token", "create", "-field=token", "-policy=cf-ipsec-operator")
	secrets.add(operator)

	edgeBefore, _ := sim.Tunnel(account, tunnel)
	calls := sim.TotalCalls()
	v.mustVault(t, operator, "write", schedule, "rotation_period=1h")
	got := v.mustVaultJSON(t, operator, "read", schedule)
	if fmt.Sprint(field(t, got, "rotation_period")) != "3600" || field(t, got, "rotation_schedule") != "" {
		t.Errorf("after rescheduling: rotation_period %v, rotation_schedule %q", field(t, got, "rotation_period"), field(t, got, "rotation_schedule"))
	}
	if edge, _ := sim.Tunnel(account, tunnel); sim.TotalCalls() != calls || edge.PSK != edgeBefore.PSK {
		t.Errorf("rescheduling called Cloudflare %d times and changed the key: %v", sim.TotalCalls()-calls, edge.PSK != edgeBefore.PSK)
	}
	if res := v.vault(t, operator, "read", psk); res.code == 0 {
		t.Error("the operator policy reads a key")
	}

	// A team that may only reschedule cannot have a tunnel rotated more
	// often than min_rotation_period (1h by default), nor lower it.
	for _, short := range []string{"rotation_period=1m", "rotation_schedule=*/5 * * * *"} {
		res := v.vault(t, operator, "write", schedule, short)
		if res.code == 0 || !strings.Contains(res.stderr, "Code: 400") || !strings.Contains(res.stderr, "min_rotation_period") {
			t.Errorf("operator write %s: exit %d, stderr:\n%s", short, res.code, secrets.redact(res.stderr))
		}
	}
	if res := v.vault(t, operator, "write", "cloudflare-ipsec/config", "min_rotation_period=1m"); res.code == 0 {
		t.Error("the operator policy lowers min_rotation_period")
	}
	if got := v.mustVaultJSON(t, operator, "read", schedule); fmt.Sprint(field(t, got, "rotation_period")) != "3600" {
		t.Errorf("after refused schedules: rotation_period %v", field(t, got, "rotation_period"))
	}

	for _, bad := range [][]string{
		{"rotation_period=1h", "rotation_schedule=0 2 * * 6"},
		{"rotation_window=1h"},
		{"rotation_schedule=CRON_TZ=UTC"},
	} {
		res := v.vault(t, v.rootToken, append([]string{"write", schedule}, bad...)...)
		if res.code == 0 || !strings.Contains(res.stderr, "Code: 400") {
			t.Errorf("write %v: exit %d, stderr:\n%s", bad, res.code, secrets.redact(res.stderr))
		}
	}
	if sim.TotalCalls() != calls {
		t.Errorf("bad schedules called Cloudflare %d times", sim.TotalCalls()-calls)
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}
