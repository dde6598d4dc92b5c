package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// The addresses of the veth pair between the two namespaces: the edge's is
// the tunnel's cloudflare_endpoint, the router's its customer_endpoint.
const (
	ikeEdgeAddr   = "192.0.2.1"
	ikeRouterAddr = "192.0.2.2"
)

// ikeOutageTarget is how long a router may stay down after a scheduled
// rotation before the test fails (the aim, issue 12, is under 3 seconds for
// the median; docs/benchmarks.md has the measured figure).
const ikeOutageTarget = 5 * time.Second

// TestRouterReconnectsAfterEveryRotation proves, with a real IKEv2 peer, that
// a strongSwan router configured by a long-running Vault Agent from
// docs/examples/swanctl.conf.tpl brings its tunnel up, and up again after
// every scheduled rotation, without anyone touching it:
//
//  1. Agent's first render (AppRole, the template's exec running
//     docs/examples/swanctl-reload.sh) brings the IKE SA up, ESTABLISHED on
//     both sides.
//  2. Two scheduled rotations (rotation_period=1m): each changes the edge's
//     key, and the router is up again with the new key within
//     ikeOutageTarget. The outage is measured from the edge's key change
//     (the simulator's psk_generate) to the first IKE SA the router
//     establishes after the edge loaded the new key.
//  3. With Agent stopped, a rotation (vault write) leaves the router with the
//     stale key: its handshake fails with AUTHENTICATION_FAILED. This is
//     what the test would see if Agent or the template did not do its part.
//  4. Agent restarted with docs/examples/agent.hcl's settings: it brings the
//     router back at once. Then a manual rotation (vault write) reaches the
//     router within the documented time: (a) on a tunnel with a schedule,
//     when the ttl of Agent's last read runs out, that is at the tunnel's
//     former next_rotation plus one or two seconds, whatever
//     static_secret_render_interval says; (b) on a tunnel without one,
//     within static_secret_render_interval (10s in agent.hcl).
//
// The edge plays Cloudflare: its identity is the tunnel's cloudflare_endpoint,
// it expects the router's FQDN id, and its key is the simulator's current key
// for the tunnel, read from the simulator (never through Vault) and loaded
// whenever it changes. As Cloudflare does, it uses a new key at once: it
// loads it and deletes the tunnel's IKE SA. Nothing pushes the key to the
// router; the router re-initiates because Agent's exec does (strongSwan does
// not retry a failed authentication, and Cloudflare never initiates).
//
// The test asserts IKE SAs, where the pre-shared key authenticates. A
// CHILD_SA needs ESP in the kernel; on a kernel without it the IKE SA comes
// up and the CHILD_SA fails with NO_PROPOSAL_CHOSEN, which changes nothing
// here.
//
// It needs root (network namespaces), ip, and strongSwan's charon-systemd and
// swanctl (Debian: apt-get install charon-systemd strongswan-swanctl; .ci/run
// installs them). Without them it fails, saying what is missing.
func TestRouterReconnectsAfterEveryRotation(t *testing.T) {
	outages := runIKEv2(t, 2, true)
	for i, o := range outages {
		t.Logf("scheduled rotation %d: the router was down for %s (edge key change to IKE SA established again)", i+1, o.Round(time.Millisecond))
		if o > ikeOutageTarget {
			t.Errorf("scheduled rotation %d: the router was down for %s, more than %s", i+1, o.Round(time.Millisecond), ikeOutageTarget)
		}
	}
}

// runIKEv2 is the test's run, shared with BenchmarkRouterOutagePerScheduled
// Rotation: it returns one outage per scheduled rotation, and runs steps 3
// and 4 when failureSteps is set.
func runIKEv2(t testing.TB, scheduledRotations int, failureSteps bool) []time.Duration {
	bins := ikePreflight(t)

	sim, baseURL, secrets, token, account := newEdge(t)
	// The base64 forms the router's and the edge's files hold are secrets too.
	secrets.source = func() []string {
		var all []string
		for _, s := range sim.IssuedSecrets() {
			all = append(all, s, base64.StdEncoding.EncodeToString([]byte(s)))
		}
		return all
	}
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{
		Name:               "site_ike",
		CloudflareEndpoint: ikeEdgeAddr,
		CustomerEndpoint:   ikeRouterAddr,
		InterfaceAddress:   "10.213.0.0/31",
	}).ID
	path := "cloudflare-ipsec/psk/" + account + "/" + tunnel
	// The identity Cloudflare expects from a router whose tunnel has no
	// custom FQDN id (its strongSwan guide), independent of the template.
	routerID := tunnel + "." + account + ".ipsec.cloudflare.com"

	v := startDevServerAt(t, secrets, "info")
	v.mountEngine(t, baseURL, token.Value)
	// One rotation a minute, below the default floor of 1h: a lab's
	// administrator lowers it.
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "min_rotation_period=1m")
	v.mustVault(t, v.rootToken, "write", path, "rotation_period=1m")

	rig := newIKERig(t, bins, secrets)
	defer rig.teardown()
	rig.startNetwork()
	rig.edge = rig.startCharon("edge", rig.edgeNS)
	rig.router = rig.startCharon("router", rig.routerNS)

	// The edge: the simulator's current key, reloaded whenever it changes.
	edgeKey := func() cloudflaresim.Tunnel { tun, _ := sim.Tunnel(account, tunnel); return tun }
	if err := rig.writeEdgeConf(routerID, edgeKey().PSK); err != nil {
		t.Fatalf("write the edge's swanctl.conf: %v", err)
	}
	if out, err := rig.edge.swanctl(10*time.Second, "--load-all"); err != nil {
		t.Fatalf("edge: swanctl --load-all: %v\n%s", err, secrets.redact(out))
	}
	rig.watchEdge(routerID, edgeKey)

	// Vault Agent, as docs/examples/agent.hcl configures it.
	roleID, secretID := approleForProvisioner(t, v, secrets, account)
	agent := rig.agentConfig(v, roleID, account, tunnel)

	// 1. The first render brings the IKE SA up.
	started := time.Now()
	agent.start(secretID)
	up := rig.waitRouterUp(started, 30*time.Second, "the first render")
	t.Logf("first render: IKE SA ESTABLISHED on both sides %s after Agent started", up.Sub(started).Round(time.Millisecond))

	// 2. Scheduled rotations: the router comes back by itself.
	var outages []time.Duration
	for i := 1; i <= scheduledRotations; i++ {
		change := rig.nextEdgeChange(90*time.Second, fmt.Sprintf("scheduled rotation %d", i))
		up := rig.waitRouterUp(change.loaded, 60*time.Second, fmt.Sprintf("the router after scheduled rotation %d", i))
		outages = append(outages, up.Sub(change.generated))
	}
	if !failureSteps {
		return outages
	}

	// 3. Agent stopped: the router keeps the stale key and cannot come back.
	agent.stop()
	v.mustVault(t, v.rootToken, "write", "-f", path)
	change := rig.nextEdgeChange(30*time.Second, "the rotation with Agent stopped")
	rig.assertRouterStale(change.loaded)

	// 4a. Agent restarted with the documented settings brings the router
	// back at once (it renders on start). Then a manual rotation of the
	// scheduled tunnel: Agent reads again when the ttl of its last read runs
	// out, ttl+1 seconds after it.
	started = time.Now()
	agent.start(rig.newSecretID(v))
	up = rig.waitRouterUp(started, 30*time.Second, "the router after Agent restarted")
	t.Logf("Agent restarted: the router, stale since step 3, up again %s after Agent started", up.Sub(started).Round(time.Millisecond))
	next := nextRotation(t, v, account, tunnel)
	v.mustVault(t, v.rootToken, "write", "-f", path)
	change = rig.nextEdgeChange(30*time.Second, "the manual rotation of a scheduled tunnel")
	bound := next.Add(2 * time.Second).Sub(change.generated)
	up = rig.waitRouterUp(change.loaded, bound+15*time.Second, "the router after the manual rotation of a scheduled tunnel")
	outage := up.Sub(change.generated)
	t.Logf("manual rotation, tunnel with a schedule: the router was down for %s; Agent's last read pointed at next_rotation, %s after the write (documented bound: that +2s)",
		outage.Round(time.Millisecond), next.Sub(change.generated).Round(time.Millisecond))
	if outage > bound+3*time.Second {
		t.Errorf("manual rotation of a scheduled tunnel: the router was down for %s, more than the documented %s (+3s)", outage.Round(time.Millisecond), bound.Round(time.Millisecond))
	}

	// 4b. The same without a schedule: static_secret_render_interval (10s
	// in agent.hcl) decides. Agent is restarted so that its next read is
	// not the one the last ttl asked for.
	v.mustVault(t, v.rootToken, "write", path+"/schedule", "rotation_period=0")
	agent.stop()
	agent.start(rig.newSecretID(v))
	time.Sleep(3 * time.Second) // Agent's first read, which renders nothing new
	v.mustVault(t, v.rootToken, "write", "-f", path)
	change = rig.nextEdgeChange(30*time.Second, "the manual rotation of a tunnel without a schedule")
	up = rig.waitRouterUp(change.loaded, 30*time.Second, "the router after the manual rotation of a tunnel without a schedule")
	outage = up.Sub(change.generated)
	t.Logf("manual rotation, tunnel without a schedule: the router was down for %s (documented: within static_secret_render_interval, %s)", outage.Round(time.Millisecond), ikeRenderInterval)
	if outage > ikeRenderInterval+3*time.Second {
		t.Errorf("manual rotation of a tunnel without a schedule: the router was down for %s, more than static_secret_render_interval %s (+3s)", outage.Round(time.Millisecond), ikeRenderInterval)
	}
	return outages
}

// ikeRenderInterval is agent.hcl's static_secret_render_interval.
const ikeRenderInterval = 10 * time.Second

// nextRotation reads the tunnel's next_rotation from metadata/.
func nextRotation(t testing.TB, v *vaultServer, account, tunnel string) time.Time {
	t.Helper()
	meta := v.mustVaultJSON(t, v.rootToken, "read", "cloudflare-ipsec/metadata/"+account+"/"+tunnel)
	raw, _ := field(t, meta, "next_rotation").(string)
	next, err := time.Parse(time.RFC3339Nano, raw)
	if err != nil {
		t.Fatalf("next_rotation %q: %v", raw, err)
	}
	return next
}

// ikeBins are the programs the test runs, by absolute path.
type ikeBins struct{ ip, charon, swanctl string }

// ikePreflight fails the test, saying what is missing, unless it can create
// network namespaces and run strongSwan. It never skips.
func ikePreflight(t testing.TB) ikeBins {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (network namespaces and veth pairs need it; run the suite as root)")
	}
	find := func(name, pkg string) string {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
		for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
			if p := filepath.Join(dir, name); isExecutable(p) {
				return p
			}
		}
		missing = append(missing, fmt.Sprintf("%s (Debian package %s)", name, pkg))
		return ""
	}
	bins := ikeBins{ip: find("ip", "iproute2"), charon: find("charon-systemd", "charon-systemd"), swanctl: find("swanctl", "strongswan-swanctl")}
	if len(missing) > 0 {
		t.Fatalf("the IKEv2 test cannot run; missing: %s. As root: apt-get update && apt-get install -y iproute2 charon-systemd strongswan-swanctl (.ci/run does this)",
			strings.Join(missing, "; "))
	}
	return bins
}

func isExecutable(p string) bool {
	info, err := os.Stat(p)
	return err == nil && !info.IsDir() && info.Mode()&0o111 != 0
}

// ikeRig is the two namespaces, the veth pair and the two strongSwan daemons
// of one run, named uniquely so that parallel runs cannot collide.
type ikeRig struct {
	t       testing.TB
	bins    ikeBins
	secrets *secretSet
	dir     string
	id      string

	edgeNS, routerNS     string
	vethEdge, vethRouter string
	nsCreated            []string
	vethCreated          bool

	edge, router *charonProc

	edgeConf   string
	edgeEvents chan edgeChange
	stopWatch  context.CancelFunc
	watchDone  chan struct{}

	agents []*ikeAgent
}

// edgeChange is one key change at the edge: when the simulator generated the
// key, and when the edge daemon had loaded it and deleted the old IKE SA.
type edgeChange struct {
	generated, loaded time.Time
	err               error
}

// newIKERig first clears what killed runs left (ikev2_leftovers_test.go),
// then makes the run's directory and records in it that this test process
// owns it.
func newIKERig(t testing.TB, bins ikeBins, secrets *secretSet) *ikeRig {
	clearIKELeftovers(t, bins.ip)
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	id := hex.EncodeToString(b)
	// Not t.TempDir: unix socket paths are limited to 108 bytes. The id in
	// its name ties it to the run's namespaces.
	dir, err := os.MkdirTemp("", "cfike-"+id+"-")
	if err != nil {
		t.Fatal(err)
	}
	if err := writeProcID(filepath.Join(dir, ikeOwnerFile), os.Getpid()); err != nil {
		t.Fatal(err)
	}
	return &ikeRig{
		t: t, bins: bins, secrets: secrets, dir: dir, id: id,
		edgeNS: "cfike-" + id + "-edge", routerNS: "cfike-" + id + "-rtr",
		vethEdge: "cfk" + id + "e", vethRouter: "cfk" + id + "r",
		edgeEvents: make(chan edgeChange, 16),
	}
}

// ip runs ip(8) and returns its error with its output.
func (r *ikeRig) ip(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, r.bins.ip, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (r *ikeRig) startNetwork() {
	t := r.t
	t.Helper()
	for _, ns := range []string{r.edgeNS, r.routerNS} {
		if err := r.ip("netns", "add", ns); err != nil {
			t.Fatalf("cannot create a network namespace (needs root with CAP_SYS_ADMIN and a kernel with network namespaces): %v", err)
		}
		r.nsCreated = append(r.nsCreated, ns)
	}
	if err := r.ip("link", "add", r.vethEdge, "type", "veth", "peer", "name", r.vethRouter); err != nil {
		t.Fatalf("cannot create a veth pair (needs the veth kernel module): %v", err)
	}
	r.vethCreated = true
	steps := [][]string{
		{"link", "set", r.vethEdge, "netns", r.edgeNS},
		{"link", "set", r.vethRouter, "netns", r.routerNS},
		{"-n", r.edgeNS, "address", "add", ikeEdgeAddr + "/24", "dev", r.vethEdge},
		{"-n", r.routerNS, "address", "add", ikeRouterAddr + "/24", "dev", r.vethRouter},
		{"-n", r.edgeNS, "link", "set", "lo", "up"},
		{"-n", r.routerNS, "link", "set", "lo", "up"},
		{"-n", r.edgeNS, "link", "set", r.vethEdge, "up"},
		{"-n", r.routerNS, "link", "set", r.vethRouter, "up"},
	}
	for _, s := range steps {
		if err := r.ip(s...); err != nil {
			t.Fatalf("cannot set up the veth pair between the namespaces: %v", err)
		}
	}
}

// charonProc is one strongSwan daemon (charon-systemd) in a namespace, with
// its own strongswan.conf, vici socket, swanctl directory and log file.
type charonProc struct {
	name, dir, conf, swanctlDir, logPath string
	swanctlBin                           string
	cmd                                  *exec.Cmd
	done                                 chan struct{}
}

func (r *ikeRig) startCharon(name, ns string) *charonProc {
	t := r.t
	t.Helper()
	dir := filepath.Join(r.dir, name)
	c := &charonProc{name: name, dir: dir, conf: filepath.Join(dir, "strongswan.conf"), swanctlDir: filepath.Join(dir, "swanctl"),
		logPath: filepath.Join(dir, "charon.log"), swanctlBin: r.bins.swanctl}
	// swanctl reads these directories on --load-creds; they exist, empty,
	// so that it says nothing about them.
	for _, sub := range []string{"x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private", "rsa", "ecdsa", "bliss", "pkcs8", "pkcs12"} {
		mkdir(t, filepath.Join(c.swanctlDir, sub))
	}
	socket := "unix://" + filepath.Join(dir, "charon.vici")
	// Only the plugins a PSK handshake needs, no routes, and a file log with
	// milliseconds (the outage is read from it); charon-systemd would log
	// to journald otherwise. swanctl takes the socket from its own section.
	writeFile(t, c.conf, fmt.Sprintf(`charon {
  load_modular = no
  load = random nonce openssl kdf kernel-netlink socket-default vici
  install_routes = no
  plugins {
    vici {
      socket = %[1]s
    }
  }
  filelog {
    main {
      path = %[2]s
      time_format = %%s
      time_add_ms = yes
      flush_line = yes
      default = 1
    }
  }
}
charon-systemd {
  journal {
    default = -1
  }
}
swanctl {
  load = random openssl
  plugins {
    vici {
      socket = %[1]s
    }
  }
}
`, socket, c.logPath))
	out, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	// ip netns exec execs charon-systemd: the PID is the daemon's, which
	// writes no pid file.
	c.cmd = exec.Command(r.bins.ip, "netns", "exec", ns, r.bins.charon)
	c.cmd.Env = append(baseEnv(), "STRONGSWAN_CONF="+c.conf)
	c.cmd.Stdout, c.cmd.Stderr = out, out
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		out.Close()
		t.Fatalf("start charon-systemd (%s): %v", name, err)
	}
	c.done = make(chan struct{})
	go func() {
		_ = c.cmd.Wait()
		out.Close()
		close(c.done)
	}()
	// For a later run, should this one be killed: the daemon outlives it.
	if err := writeProcID(filepath.Join(dir, ikePidFile), c.cmd.Process.Pid); err != nil {
		t.Errorf("charon-systemd (%s): %v", name, err)
	}
	if name == "edge" {
		r.edge = c
	} else {
		r.router = c
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(dir, "charon.vici")); err == nil {
			if _, err := c.swanctl(5*time.Second, "--stats"); err == nil {
				return c
			}
		}
		select {
		case <-c.done:
			t.Fatalf("charon-systemd (%s) exited at start; log:\n%s", name, r.secrets.redact(tail(c.logPath, 30)))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("charon-systemd (%s) did not open its vici socket; log:\n%s", name, r.secrets.redact(tail(c.logPath, 30)))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// env is what swanctl needs to reach this daemon and read its swanctl.conf.
func (c *charonProc) env() []string {
	return []string{"STRONGSWAN_CONF=" + c.conf, "SWANCTL_DIR=" + c.swanctlDir}
}

// swanctl runs swanctl against this daemon, killed after limit.
func (c *charonProc) swanctl(limit time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.swanctlBin, args...)
	cmd.Env = append(baseEnv(), c.env()...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *charonProc) stop() {
	if c == nil || c.cmd == nil || c.cmd.Process == nil {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

// writeEdgeConf writes the edge's swanctl.conf: Cloudflare's side of the
// tunnel, which answers and never initiates, and accepts only the router's
// identity.
//
// It returns an error rather than failing the test: the watcher goroutine
// calls it, and t.Fatal outside the test's goroutine would only stop that.
func (r *ikeRig) writeEdgeConf(routerID, psk string) error {
	return os.WriteFile(filepath.Join(r.edge.swanctlDir, "swanctl.conf"), []byte(fmt.Sprintf(`connections {
  edge {
    version = 2
    local_addrs = %[1]s
    remote_addrs = %%any
    proposals = aes256-sha256-modp2048
    local {
      auth = psk
      id = %[1]s
    }
    remote {
      auth = psk
      id = %[2]s
    }
    children {
      edge {
        local_ts = 0.0.0.0/0
        remote_ts = 0.0.0.0/0
        esp_proposals = aes256-sha256-modp2048
        replay_window = 0
      }
    }
  }
}
secrets {
  ike-edge {
    id-edge = %[1]s
    id-router = %[2]s
    secret = 0s%[3]s
  }
}
`, ikeEdgeAddr, routerID, base64.StdEncoding.EncodeToString([]byte(psk)))), 0o600)
}

// watchEdge follows the simulator's key for the tunnel: on each change it
// loads the new key into the edge and deletes the edge's IKE SA, as
// Cloudflare's edge stops accepting the old key at once, and reports the
// change.
func (r *ikeRig) watchEdge(routerID string, current func() cloudflaresim.Tunnel) {
	ctx, cancel := context.WithCancel(context.Background())
	r.stopWatch, r.watchDone = cancel, make(chan struct{})
	last := current().PSK
	go func() {
		defer close(r.watchDone)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			tun := current()
			if tun.PSK == last {
				continue
			}
			last = tun.PSK
			ev := edgeChange{generated: tun.PSKGeneratedOn}
			if err := r.writeEdgeConf(routerID, tun.PSK); err != nil {
				ev.err = fmt.Errorf("edge: write swanctl.conf: %v", err)
			} else if out, err := r.edge.swanctl(10*time.Second, "--load-creds"); err != nil {
				ev.err = fmt.Errorf("edge: swanctl --load-creds: %v: %s", err, out)
			} else {
				ev.loaded = time.Now()
				// No IKE SA (the router was already down) is not an error.
				if sas, _ := r.edge.swanctl(5*time.Second, "--list-sas", "--ike", "edge", "--raw"); strings.Contains(sas, "{edge {") {
					if out, err := r.edge.swanctl(10*time.Second, "--terminate", "--ike", "edge", "--timeout", "5"); err != nil {
						ev.err = fmt.Errorf("edge: swanctl --terminate: %v: %s", err, out)
					}
				}
			}
			select {
			case r.edgeEvents <- ev:
			default:
			}
		}
	}()
}

// nextEdgeChange waits for the edge's next key change.
func (r *ikeRig) nextEdgeChange(limit time.Duration, what string) edgeChange {
	r.t.Helper()
	select {
	case ev := <-r.edgeEvents:
		if ev.err != nil {
			r.t.Fatalf("%s: %s", what, r.secrets.redact(ev.err.Error()))
		}
		return ev
	case <-time.After(limit):
		r.t.Fatalf("%s: the edge's key did not change within %s", what, limit)
	}
	return edgeChange{}
}

// establishedLine is charon's log line for an IKE SA that came up (filelog
// with time_format %s and time_add_ms).
var establishedLine = regexp.MustCompile(`(?m)^(\d+)\.(\d{3}) \d+\[IKE\] IKE_SA (\w+)\[(\d+)\] established between`)

// firstEstablished returns the time and unique id of the first IKE SA of
// connection conn that the daemon's log shows established at or after since.
func (c *charonProc) firstEstablished(conn string, since time.Time) (time.Time, string, bool) {
	raw, _ := os.ReadFile(c.logPath)
	since = since.Truncate(time.Millisecond)
	for _, m := range establishedLine.FindAllStringSubmatch(string(raw), -1) {
		if m[3] != conn {
			continue
		}
		sec, _ := strconv.ParseInt(m[1], 10, 64)
		ms, _ := strconv.ParseInt(m[2], 10, 64)
		at := time.Unix(sec, ms*int64(time.Millisecond))
		if !at.Before(since) {
			return at, m[4], true
		}
	}
	return time.Time{}, "", false
}

// failureLine is a log line of charon's that says why a handshake failed.
var failureLine = regexp.MustCompile(`(?m)^(\d+)\.\d{3} \d+\[(IKE|CFG)\] .*(AUTHENTICATION_FAILED|failed|mismatched|no matching peer config|no shared key).*$`)

// lastFailure returns the daemon's last log line, at or after since, that
// says why a handshake failed, or "nothing" when there is none.
func (c *charonProc) lastFailure(since time.Time) string {
	raw, _ := os.ReadFile(c.logPath)
	last := "nothing"
	for _, m := range failureLine.FindAllStringSubmatch(string(raw), -1) {
		if sec, _ := strconv.ParseInt(m[1], 10, 64); sec >= since.Unix() {
			last = fmt.Sprintf("%q", m[0])
		}
	}
	return last
}

// waitRouterUp waits for the router's first IKE SA established at or after
// since, checks that it is ESTABLISHED on both sides, and returns when it
// came up.
func (r *ikeRig) waitRouterUp(since time.Time, limit time.Duration, what string) time.Time {
	t := r.t
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		at, id, ok := r.router.firstEstablished("cf1", since)
		if ok {
			routerSAs, _ := r.router.swanctl(5*time.Second, "--list-sas", "--ike", "cf1")
			if !strings.Contains(routerSAs, "cf1: #"+id+", ESTABLISHED") {
				t.Fatalf("%s: the router's IKE SA #%s came up, then was gone:\n%s", what, id, r.secrets.redact(routerSAs))
			}
			edgeSAs, _ := r.edge.swanctl(5*time.Second, "--list-sas", "--ike", "edge")
			if !strings.Contains(edgeSAs, "ESTABLISHED") {
				t.Fatalf("%s: the router has an IKE SA, the edge none:\n%s", what, r.secrets.redact(edgeSAs))
			}
			return at
		}
		for _, a := range r.agents {
			if a.exited() {
				t.Fatalf("%s: Vault Agent exited; its output:\n%s", what, r.secrets.redact(lastLines(a.out.String(), 30)))
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no IKE SA established within %s; the router's log says: %s; the edge's: %s", what, limit,
				r.secrets.redact(r.router.lastFailure(since)), r.secrets.redact(r.edge.lastFailure(since)))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// assertRouterStale checks that the router, whose key is older than the
// edge's, is down and that its handshake fails with AUTHENTICATION_FAILED.
// It initiates once, as a router's own retry would.
func (r *ikeRig) assertRouterStale(since time.Time) {
	t := r.t
	t.Helper()
	time.Sleep(2 * time.Second) // anything the router would do by itself
	if at, _, ok := r.router.firstEstablished("cf1", since); ok {
		t.Fatalf("with Agent stopped, the router came up at %s with a key it cannot have", at.Format(time.RFC3339Nano))
	}
	out, err := r.router.swanctl(20*time.Second, "--initiate", "--child", "cf1", "--timeout", "10")
	if err == nil || !strings.Contains(out, "AUTHENTICATION_FAILED") {
		t.Fatalf("with Agent stopped, the router's handshake with the stale key should fail with AUTHENTICATION_FAILED; swanctl --initiate (%v):\n%s", err, r.secrets.redact(out))
	}
	t.Logf("Agent stopped, rotation: the router's handshake with the stale key fails: %s", firstLineWith(out, "AUTHENTICATION_FAILED"))
}

func firstLineWith(text, s string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, s) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

// ikeAgent is the router's Vault Agent: long-running, configured as
// docs/examples/agent.hcl is (AppRole, error_on_missing_key,
// exit_on_retry_failure, static_secret_render_interval, the strongSwan
// template with swanctl-reload.sh as its exec), rendering the router's
// whole swanctl.conf.
type ikeAgent struct {
	r        *ikeRig
	dir      string
	env      []string
	cmd      *exec.Cmd
	done     chan struct{}
	out      *syncedBuffer
	outputMu sync.Mutex
	outputs  []string
}

func (r *ikeRig) agentConfig(v *vaultServer, roleID, account, tunnel string) *ikeAgent {
	t := r.t
	t.Helper()
	dir := filepath.Join(r.dir, "agent")
	mkdir(t, dir)
	writeFile(t, filepath.Join(dir, "role-id"), roleID)
	source, err := filepath.Abs(filepath.Join("..", "docs", "examples", "swanctl.conf.tpl"))
	if err != nil {
		t.Fatal(err)
	}
	script, err := filepath.Abs(filepath.Join("..", "docs", "examples", "swanctl-reload.sh"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "agent.hcl"), fmt.Sprintf(`
vault { address = %q }
auto_auth {
  method "approle" {
    mount_path = "auth/approle"
    config = {
      role_id_file_path   = %q
      secret_id_file_path = %q
    }
  }
}
template_config {
  exit_on_retry_failure         = true
  static_secret_render_interval = %q
}
template {
  source               = %q
  destination          = %q
  perms                = "0600"
  error_on_missing_key = true
  exec {
    command = ["/bin/sh", %q]
    timeout = "30s"
  }
}
`, v.addr, filepath.Join(dir, "role-id"), filepath.Join(dir, "secret-id"), ikeRenderInterval.String(),
		source, filepath.Join(r.router.swanctlDir, "swanctl.conf"), script))
	env := append(baseEnv(), "HOME="+dir, "CF_ACCOUNT_ID="+account, "CF_TUNNEL_IDS="+tunnel,
		"PATH="+filepath.Dir(r.bins.swanctl)+":"+os.Getenv("PATH"))
	a := &ikeAgent{r: r, dir: dir, env: append(env, r.router.env()...)}
	r.agents = append(r.agents, a)
	return a
}

// newSecretID issues a secret id for a restarted Agent: Agent removes the
// file once read, as in production.
func (r *ikeRig) newSecretID(v *vaultServer) string {
	id := strings.TrimSpace(v.mustVault(r.t, v.rootToken, "write", "-f", "-field=secret_id", "auth/approle/role/router/secret-id"))
	r.secrets.add(id)
	return id
}

func (a *ikeAgent) start(secretID string) {
	t := a.r.t
	t.Helper()
	writeFile(t, filepath.Join(a.dir, "secret-id"), secretID)
	a.out = &syncedBuffer{}
	a.cmd = exec.Command(suite.vaultBin, "agent", "-config="+filepath.Join(a.dir, "agent.hcl"))
	a.cmd.Env = a.env
	a.cmd.Stdout, a.cmd.Stderr = a.out, a.out
	// Its own process group: the exec's children end with it.
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := a.cmd.Start(); err != nil {
		t.Fatalf("start vault agent: %v", err)
	}
	a.done = make(chan struct{})
	cmd, done := a.cmd, a.done
	go func() { _ = cmd.Wait(); close(done) }()
	if err := writeProcID(filepath.Join(a.dir, ikePidFile), cmd.Process.Pid); err != nil {
		t.Errorf("vault agent: %v", err)
	}
}

// exited tells whether Agent, started and not stopped, has exited.
func (a *ikeAgent) exited() bool {
	if a.cmd == nil {
		return false
	}
	select {
	case <-a.done:
		return true
	default:
		return false
	}
}

func (a *ikeAgent) stop() {
	if a.cmd == nil {
		return
	}
	stopGroup(a.cmd, a.done, 15*time.Second)
	a.cmd = nil
	a.outputMu.Lock()
	a.outputs = append(a.outputs, a.out.String())
	a.outputMu.Unlock()
}

// teardown ends everything the run started, also when it failed: Agent, the
// edge watcher, both daemons, the namespaces and the veth pair. On failure it
// shows the ends of the logs, secrets redacted.
func (r *ikeRig) teardown() {
	t := r.t
	for _, a := range r.agents {
		a.stop()
	}
	if r.stopWatch != nil {
		r.stopWatch()
		<-r.watchDone
	}
	r.edge.stop()
	r.router.stop()
	var errs []error
	for _, ns := range r.nsCreated {
		if err := r.ip("netns", "delete", ns); err != nil {
			errs = append(errs, err)
		}
	}
	if r.vethCreated {
		// Gone with its namespace; still here if it never moved.
		if err := r.ip("link", "show", r.vethEdge); err == nil {
			if err := r.ip("link", "delete", r.vethEdge); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		t.Errorf("teardown: %v", errors.Join(errs...))
	}

	var logs strings.Builder
	for _, c := range []*charonProc{r.router, r.edge} {
		if c == nil {
			continue
		}
		raw, _ := os.ReadFile(c.logPath)
		assertNoSecretsIn(t, r.secrets, "the "+c.name+"'s charon log", string(raw))
		fmt.Fprintf(&logs, "--- %s's charon log (last lines) ---\n%s\n", c.name, tail(c.logPath, 25))
	}
	for _, a := range r.agents {
		a.outputMu.Lock()
		for i, out := range a.outputs {
			assertNoSecretsIn(t, r.secrets, "Vault Agent's output", out)
			if i == len(a.outputs)-1 {
				fmt.Fprintf(&logs, "--- Vault Agent's output (last run, last lines) ---\n%s\n", lastLines(out, 25))
			}
		}
		a.outputMu.Unlock()
	}
	if t.Failed() {
		t.Logf("the rig's logs:\n%s", r.secrets.redact(logs.String()))
	}
	if !t.Failed() {
		_ = os.RemoveAll(r.dir)
	} else {
		// The rendered and the edge's files and Agent's secret id hold
		// keys: remove them, keep the logs for a look. Without its owner
		// record and its keys, a later run leaves the directory alone.
		for _, f := range ikeKeyFiles {
			_ = os.Remove(filepath.Join(r.dir, f))
		}
		for _, sub := range []string{"edge", "router", "agent"} {
			_ = os.Remove(filepath.Join(r.dir, sub, ikePidFile))
		}
		_ = os.Remove(filepath.Join(r.dir, ikeOwnerFile))
		t.Logf("logs kept in %s", r.dir)
	}
}

func tail(path string, n int) string {
	raw, _ := os.ReadFile(path)
	return lastLines(string(raw), n)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
