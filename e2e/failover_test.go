package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// raftNode is one node of a three-node Raft cluster on loopback.
type raftNode struct {
	*vaultServer
	name string
	port int
}

// startRaftCluster starts three Vault processes with integrated storage,
// initialises the first, and joins and unseals the others. It returns the
// nodes and the root token.
func startRaftCluster(t *testing.T, secrets *secretSet) ([]*raftNode, string) {
	t.Helper()
	var nodes []*raftNode
	for i := 1; i <= 3; i++ {
		nodes = append(nodes, &raftNode{name: fmt.Sprintf("node%d", i), port: freePort(t)})
	}
	var joins strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&joins, "  retry_join { leader_api_addr = \"http://127.0.0.1:%d\" }\n", n.port)
	}
	for _, n := range nodes {
		dir := filepath.Join(t.TempDir(), n.name)
		cfg := raftServerConfig(dir, n.name, n.port, joins.String())
		mkdir(t, filepath.Join(dir, "raft"))
		writeFile(t, filepath.Join(dir, "server.hcl"), cfg)
		n.vaultServer = &vaultServer{dir: dir, addr: fmt.Sprintf("http://127.0.0.1:%d", n.port), secrets: secrets}
		n.start(t, "server", "-config="+filepath.Join(dir, "server.hcl"))
		n.waitReady(t)
	}

	init := initServer(t, nodes[0].vaultServer, secrets)
	for i, n := range nodes {
		n.rootToken = init.RootToken
		if i == 0 {
			n.mustVault(t, "", "operator", "unseal", init.UnsealKeys[0])
			waitActive(t, n.vaultServer)
			// Autopilot promotes a joined node to voter only after it has
			// been healthy this long (10s by default).
			n.mustVault(t, init.RootToken, "operator", "raft", "autopilot", "set-config", "-server-stabilization-time=2s")
			continue
		}
		// A joining node unseals once it has joined; retry_join may need a
		// moment to reach the leader.
		deadline := time.Now().Add(60 * time.Second)
		for {
			res := n.vault(t, "", "operator", "unseal", init.UnsealKeys[0])
			if res.code == 0 && healthStatus(n.vaultServer) == http.StatusTooManyRequests {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not join and unseal:\n%s", n.name, secrets.redact(res.stderr))
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	// Killing the leader keeps a quorum only once all three are voters.
	deadline := time.Now().Add(90 * time.Second)
	for {
		var peers struct {
			Data struct {
				Config struct {
					Servers []struct {
						Voter bool `json:"voter"`
					} `json:"servers"`
				} `json:"config"`
			} `json:"data"`
		}
		res := nodes[0].run(t, "json", init.RootToken, "operator", "raft", "list-peers")
		voters := 0
		if res.code == 0 && json.Unmarshal([]byte(res.stdout), &peers) == nil {
			for _, s := range peers.Data.Config.Servers {
				if s.Voter {
					voters++
				}
			}
		}
		if voters == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cluster has %d voters, want 3", voters)
		}
		time.Sleep(500 * time.Millisecond)
	}
	return nodes, init.RootToken
}

// healthStatus is sys/health's status: 200 active, 429 standby, 503 sealed.
func healthStatus(v *vaultServer) int {
	resp, err := http.Get(v.addr + "/v1/sys/health")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func activeNode(nodes []*raftNode) *raftNode {
	for _, n := range nodes {
		if n.cmd != nil && healthStatus(n.vaultServer) == http.StatusOK {
			return n
		}
	}
	return nil
}

// kill ends a node and its plugin processes at once, as a crash would.
func (n *raftNode) kill() {
	_ = syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
	<-n.done
	n.cmd = nil
}

// TestFailoverDuringRotations sends rotations to a standby, which forwards
// them to the active node, and kills the active node while one of them sits
// between "Cloudflare generated" and "Vault stored". Afterwards no tunnel
// may be silently stale: each is current with the edge's key or says it is
// not; reads on the new active node reconcile; and a write leaves every
// tunnel current.
func TestFailoverDuringRotations(t *testing.T) {
	sim, baseURL, secrets, token, account := newEdge(t)
	var tunnels []string
	for i := 0; i < 6; i++ {
		tunnels = append(tunnels, sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID)
	}
	path := func(tun string) string { return "cloudflare-ipsec/psk/" + account + "/" + tun }

	nodes, root := startRaftCluster(t, secrets)
	active := activeNode(nodes)
	if active == nil {
		t.Fatal("no active node")
	}
	active.mountEngine(t, baseURL, token.Value)
	for _, tun := range tunnels {
		active.mustVault(t, root, "write", "-f", path(tun))
	}
	var standby *raftNode
	for _, n := range nodes {
		if n != active {
			standby = n
			break
		}
	}

	// The first tunnel's next rotation commits at Cloudflare and then hangs,
	// so the kill lands between generate and store.
	sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{AfterCommit: true, Delay: 30 * time.Second})
	callsBefore := sim.Calls(cloudflaresim.OpPSKGenerate)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		standby.vault(t, root, "write", "-f", path(tunnels[0]))
	}()
	deadline := time.Now().Add(15 * time.Second)
	for sim.Calls(cloudflaresim.OpPSKGenerate) == callsBefore && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if sim.Calls(cloudflaresim.OpPSKGenerate) == callsBefore {
		t.Fatal("the forwarded rotation never reached Cloudflare")
	}
	// More rotations through the standby while the active node dies.
	for _, tun := range tunnels[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			standby.vault(t, root, "write", "-f", path(tun))
		}()
	}
	// Let some of them finish, and some be in flight, when the node dies.
	for deadline := time.Now().Add(5 * time.Second); sim.Calls(cloudflaresim.OpPSKGenerate) < callsBefore+3 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	active.kill()
	wg.Wait()

	var next *raftNode
	deadline = time.Now().Add(90 * time.Second)
	for next == nil && time.Now().Before(deadline) {
		next = activeNode(nodes)
		time.Sleep(250 * time.Millisecond)
	}
	if next == nil {
		t.Fatal("no node took over")
	}

	// No tunnel may be silently stale: metadata (which reconciles on the
	// active node) is either current and the edge's, or says otherwise.
	for _, tun := range tunnels {
		var meta map[string]any
		for i := 0; i < 40 && meta == nil; i++ {
			if res := standbyOrActive(nodes).run(t, "json", root, "read", "cloudflare-ipsec/metadata/"+account+"/"+tun); res.code == 0 {
				meta = decodeJSON(t, res.stdout)
			} else {
				time.Sleep(250 * time.Millisecond)
			}
		}
		if meta == nil {
			t.Fatalf("tunnel %s: metadata unreadable after failover", tun)
		}
		edge, _ := sim.Tunnel(account, tun)
		state := field(t, meta, "state")
		t.Logf("tunnel %s after failover: state %v, version %v, edge generations %d", tun[:8], state, field(t, meta, "version"), len(edge.GeneratedPSKs))
		if state == "current" && field(t, meta, "last_generated_on") != edge.PSKGeneratedOn.Format(time.RFC3339Nano) {
			t.Errorf("tunnel %s is silently stale after failover", tun)
		}
		if state != "current" {
			if warnings, _ := meta["warnings"].([]any); len(warnings) == 0 {
				t.Errorf("tunnel %s: state %v without a warning", tun, state)
			}
		}
	}
	// The next write leaves every tunnel current with the edge's key, once
	// the settle window of any rotation the failover interrupted has
	// passed (before it, a write is refused with 409: the interrupted
	// request could still land).
	for _, tun := range tunnels {
		meta := next.mustVaultJSON(t, root, "read", "cloudflare-ipsec/metadata/"+account+"/"+tun)
		if until, err := time.Parse(time.RFC3339Nano, fmt.Sprint(field(t, meta, "settle_until"))); err == nil {
			time.Sleep(time.Until(until) + time.Second)
		}
	}
	for _, tun := range tunnels {
		next.mustVault(t, root, "write", "-f", path(tun))
		read := next.mustVaultJSON(t, root, "read", path(tun))
		edge, _ := sim.Tunnel(account, tun)
		if field(t, read, "state") != "current" || field(t, read, "psk") != edge.PSK {
			t.Errorf("tunnel %s after the next write: state %v, key is the edge's: %v", tun, field(t, read, "state"), field(t, read, "psk") == edge.PSK)
		}
	}
	for _, n := range nodes {
		assertNoSecretsIn(t, secrets, n.name+"'s log", n.log())
		assertNoDataRace(t, n.log())
	}
}

// standbyOrActive returns a running node, the active one first.
func standbyOrActive(nodes []*raftNode) *raftNode {
	if a := activeNode(nodes); a != nil {
		return a
	}
	for _, n := range nodes {
		if n.cmd != nil {
			return n
		}
	}
	return nodes[0]
}
