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
// whenever it changes. As Cloudflare does, it uses a new key at once; and
// here it plays the edge that also deletes the tunnel's IKE SA, the worst
// case (Cloudflare does not document it; TestRouterStaysUpWhenTheEdgeKeepsTheSA
// plays the other). Nothing pushes the key to the router; the router
// re-initiates because Agent's exec does (strongSwan does not retry a failed
// authentication, and Cloudflare never initiates).
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
	checkOutages(t, runIKEv2(t, 2, true, "cloudflare"))
}

// TestRouterReconnectsAfterEveryRotationWithVaultsKeys is the same run with
// config key_source=vault (issue 16): every key is one the engine makes,
// written ahead and set on the edge with Cloudflare's Set operation, and
// psk_generate is never called. The router, rendered by the same Agent from
// the same template, comes up and back up after every rotation as with
// Cloudflare's keys.
func TestRouterReconnectsAfterEveryRotationWithVaultsKeys(t *testing.T) {
	checkOutages(t, runIKEv2(t, 2, true, "vault"))
}

// checkOutages holds each scheduled rotation's outage to ikeOutageTarget.
func checkOutages(t *testing.T, outages []time.Duration) {
	t.Helper()
	for i, o := range outages {
		t.Logf("scheduled rotation %d: the router was down for %s (edge key change to IKE SA established again)", i+1, o.Round(time.Millisecond))
		if o > ikeOutageTarget {
			t.Errorf("scheduled rotation %d: the router was down for %s, more than %s", i+1, o.Round(time.Millisecond), ikeOutageTarget)
		}
	}
}

// ikeEdgeMode is what the edge does with an established IKE SA when the
// tunnel's key changes. Cloudflare does not document it. IKEv2 rekeying
// does not authenticate again, so the SA may well survive a new key; or
// Cloudflare may delete it, and the router must authenticate again, with the
// new key, at once. The rig plays both.
type ikeEdgeMode int

const (
	// edgeDropsSA loads the new key and deletes the IKE SA: the router is
	// down until Agent has rendered the new key and swanctl-reload.sh has
	// started the tunnel again.
	edgeDropsSA ikeEdgeMode = iota
	// edgeKeepsSA loads the new key and keeps the IKE SA: a scheduled
	// rotation must cost the router nothing, so Agent's reload must leave a
	// healthy SA alone.
	edgeKeepsSA
)

func (m ikeEdgeMode) String() string {
	if m == edgeKeepsSA {
		return "the edge keeps the IKE SA at a key change"
	}
	return "the edge deletes the IKE SA at a key change"
}

// ikeRun is one run of the rig: a Vault server with the engine, a tunnel
// rotated every minute, the two namespaces and daemons, and the router's
// Agent, whose first render has brought the IKE SA up.
type ikeRun struct {
	rig     *ikeRig
	v       *vaultServer
	agent   *ikeAgent
	path    string
	account string
	tunnel  string
	// edgeKey is the simulator's current state of the tunnel.
	edgeKey func() cloudflaresim.Tunnel
}

// startIKEv2 sets a run up and brings the IKE SA up (step 1). The rig is
// torn down when the test ends.
func startIKEv2(t testing.TB, mode ikeEdgeMode, keySource string) *ikeRun {
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
	tunnel := cloudflaresim.NewID()
	// The identity Cloudflare expects from a router whose tunnel has no
	// custom FQDN id (its strongSwan guide), independent of the template.
	routerID := tunnel + "." + account + ".ipsec.cloudflare.com"
	var ipsecID string
	if keySource == "vault" {
		// Every answer of the Set operation carries the tunnel's ipsec_id
		// (the schema requires it; psk_generate's carries it only
		// sometimes), and the template gives it to the router as its IKE
		// id, as Cloudflare's VyOS guide does: the edge expects that id.
		ipsecID = "12345_" + tunnel
		routerID = ipsecID
	}
	sim.AddTunnel(account, cloudflaresim.Tunnel{
		ID:                 tunnel,
		Name:               "site_ike",
		CloudflareEndpoint: ikeEdgeAddr,
		CustomerEndpoint:   ikeRouterAddr,
		InterfaceAddress:   "10.213.0.0/31",
		IPsecID:            ipsecID,
	})
	path := "cloudflare-ipsec/psk/" + account + "/" + tunnel

	v := startDevServerAt(t, secrets, "info")
	v.mountEngine(t, baseURL, token.Value)
	// One rotation a minute, below the default floor of 1h: a lab's
	// administrator lowers it.
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "min_rotation_period=1m", "key_source="+keySource)
	v.mustVault(t, v.rootToken, "write", path, "rotation_period=1m")
	if keySource == "vault" {
		// From here on every key is the engine's, set by the Set operation.
		t.Cleanup(func() {
			if n := sim.Calls(cloudflaresim.OpPSKGenerate); n != 0 {
				t.Errorf("key_source vault: psk_generate was called %d times", n)
			}
			if n := sim.Calls(cloudflaresim.OpPSKSet); n == 0 {
				t.Error("key_source vault: the Set operation was never called")
			}
		})
	}

	rig := newIKERig(t, bins, secrets)
	rig.edgeMode = mode
	t.Cleanup(rig.teardown)
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
	t.Logf("first render: IKE SA ESTABLISHED on both sides %s after Agent started (%s)", up.Sub(started).Round(time.Millisecond), mode)
	return &ikeRun{rig: rig, v: v, agent: agent, path: path, account: account, tunnel: tunnel, edgeKey: edgeKey}
}

// runIKEv2 is TestRouterReconnectsAfterEveryRotation's run (the edge that
// deletes the IKE SA), shared with BenchmarkRouterOutagePerScheduledRotation:
// it returns one outage per scheduled rotation, and runs steps 3 and 4 when
// failureSteps is set.
func runIKEv2(t testing.TB, scheduledRotations int, failureSteps bool, keySource string) []time.Duration {
	run := startIKEv2(t, edgeDropsSA, keySource)
	rig, v, agent, path, account, tunnel := run.rig, run.v, run.agent, run.path, run.account, run.tunnel

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
	started := time.Now()
	agent.start(rig.newSecretID(v))
	up := rig.waitRouterUp(started, 30*time.Second, "the router after Agent restarted")
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

// TestRouterStaysUpWhenTheEdgeKeepsTheSA plays the edge that keeps an
// established IKE SA when the key changes (it loads the new key, so that a
// new handshake needs it, and deletes nothing). Then a scheduled rotation
// must cost the router no outage at all: Agent renders the new key and runs
// swanctl-reload.sh, which loads it, and the router's IKE SA lives through
// it. For each of two scheduled rotations the test waits for that reload to
// end and checks, on both sides, that the IKE SA up since the first render
// is still the only one, ESTABLISHED, with the same unique id; that neither
// daemon's log shows an IKE SA deleted or established since the key
// changed; and that a watcher polling the router's SAs (every 100 ms) never
// saw it otherwise. At the end the edge deletes the SA and the router
// authenticates again: it holds the edge's key.
//
// On a kernel without ESP there is no CHILD_SA (see
// TestRouterReconnectsAfterEveryRotation): the test follows the IKE SA.
func TestRouterStaysUpWhenTheEdgeKeepsTheSA(t *testing.T) {
	for i, rot := range runIKEv2KeepsSA(t, 2) {
		t.Logf("scheduled rotation %d: the router's reload (Agent's render and swanctl-reload.sh) ended %s after the edge's key change; the router was down for %s",
			i+1, rot.reloaded.Round(time.Millisecond), rot.outage.Round(time.Millisecond))
		if len(rot.disturbed) > 0 {
			t.Errorf("scheduled rotation %d: the router's IKE SA did not live through the rotation (down for %s):\n  %s",
				i+1, rot.outage.Round(time.Millisecond), strings.Join(rot.disturbed, "\n  "))
		}
	}
}

// ikeKeptRotation is one scheduled rotation with the edge that keeps the
// IKE SA.
type ikeKeptRotation struct {
	// reloaded is from the edge's key change to the end of Agent's reload:
	// from then on the router holds the edge's key.
	reloaded time.Duration
	// outage is how long the router was without an IKE SA: zero when its
	// SA lived through the rotation.
	outage time.Duration
	// disturbed says what happened to the SA, if anything did.
	disturbed []string
}

// runIKEv2KeepsSA is TestRouterStaysUpWhenTheEdgeKeepsTheSA's run, shared
// with BenchmarkRouterOutageWhenTheEdgeKeepsTheSA.
func runIKEv2KeepsSA(t testing.TB, scheduledRotations int) []ikeKeptRotation {
	run := startIKEv2(t, edgeKeepsSA, "cloudflare")
	rig := run.rig
	routerSA := rig.onlyIKESA(rig.router, "cf1", "the router after the first render")
	edgeSA := rig.onlyIKESA(rig.edge, "edge", "the edge after the first render")
	watch := rig.watchRouterSA(routerSA)

	var rots []ikeKeptRotation
	for i := 1; i <= scheduledRotations; i++ {
		what := fmt.Sprintf("scheduled rotation %d", i)
		change := rig.nextEdgeChange(90*time.Second, what)
		reload := rig.waitReload(change.generated, 30*time.Second, what)
		rot := ikeKeptRotation{reloaded: reload.ended.Sub(change.generated)}
		if !rig.routerHasKey(run.edgeKey().PSK) {
			t.Fatalf("%s: Agent's reload ran, but the router's swanctl.conf does not hold the edge's new key", what)
		}
		if reload.status != 0 {
			rot.disturbed = append(rot.disturbed, fmt.Sprintf("swanctl-reload.sh exited with status %d", reload.status))
		}
		rot.disturbed = append(rot.disturbed, rig.ikeSAChanges(rig.router, "cf1", routerSA, change.generated)...)
		rot.disturbed = append(rot.disturbed, rig.ikeSAChanges(rig.edge, "edge", edgeSA, change.generated)...)
		rot.disturbed = append(rot.disturbed, watch.gaps(change.generated)...)
		if len(rot.disturbed) > 0 {
			// The outage, measured as with the edge that drops the SA:
			// from the moment the SA went to an IKE SA established again.
			down, ok := rig.router.firstDeleted("cf1", change.generated)
			if !ok {
				down = change.generated
			}
			up := rig.waitRouterUp(down, 60*time.Second, "the router after "+what)
			rot.outage = up.Sub(down)
			// Follow the router's SA from here.
			routerSA = rig.onlyIKESA(rig.router, "cf1", "the router after "+what)
			edgeSA = rig.onlyIKESA(rig.edge, "edge", "the edge after "+what)
			watch.follow(routerSA)
		}
		rots = append(rots, rot)
	}
	watch.stop()

	// The router holds the edge's key: once the edge deletes the SA, the
	// router authenticates again.
	if out, err := rig.edge.swanctl(15*time.Second, "--terminate", "--ike", "edge", "--timeout", "10"); err != nil {
		t.Fatalf("edge: swanctl --terminate: %v: %s", err, rig.secrets.redact(out))
	}
	since := time.Now()
	// A CHILD_SA that fails (no ESP) makes swanctl fail; the IKE SA is
	// what waitRouterUp checks.
	out, _ := rig.router.swanctl(20*time.Second, "--initiate", "--child", "cf1", "--timeout", "10")
	if strings.Contains(out, "AUTHENTICATION_FAILED") {
		t.Fatalf("after the last rotation the router does not hold the edge's key: %s", firstLineWith(out, "AUTHENTICATION_FAILED"))
	}
	rig.waitRouterUp(since, 20*time.Second, "the router authenticating again after the last rotation")
	return rots
}

// ikeSA is an IKE SA as swanctl --list-sas --raw lists it.
type ikeSA struct{ id, state string }

func (sa ikeSA) String() string { return "#" + sa.id + " " + sa.state }

// rawIKESA matches an IKE SA in swanctl --list-sas --raw (a CHILD_SA's
// key, <name>-<id>, does not match \w+).
var rawIKESA = regexp.MustCompile(`\{(\w+) \{uniqueid=(\d+) version=\d+ state=(\w+)`)

// ikeSAs lists the daemon's IKE SAs of connection conn.
func (c *charonProc) ikeSAs(conn string) ([]ikeSA, error) {
	out, err := c.swanctl(5*time.Second, "--list-sas", "--ike", conn, "--raw")
	if err != nil {
		return nil, fmt.Errorf("%s: swanctl --list-sas: %v: %s", c.name, err, strings.TrimSpace(out))
	}
	var sas []ikeSA
	for _, m := range rawIKESA.FindAllStringSubmatch(out, -1) {
		if m[1] == conn {
			sas = append(sas, ikeSA{id: m[2], state: m[3]})
		}
	}
	return sas, nil
}

// onlyIKESA returns the unique id of the daemon's IKE SA of conn, which
// must be its only one and ESTABLISHED.
func (r *ikeRig) onlyIKESA(c *charonProc, conn, what string) string {
	r.t.Helper()
	sas, err := c.ikeSAs(conn)
	if err != nil {
		r.t.Fatalf("%s: %s", what, r.secrets.redact(err.Error()))
	}
	if len(sas) != 1 || sas[0].state != "ESTABLISHED" {
		r.t.Fatalf("%s: want one ESTABLISHED IKE SA %s, have %v", what, conn, sas)
	}
	return sas[0].id
}

// ikeSAChanges lists what happened to the daemon's IKE SA id of conn since
// the given time: its state now, when it is not the only one and
// ESTABLISHED, and each IKE SA of conn its log shows deleted or
// established since.
func (r *ikeRig) ikeSAChanges(c *charonProc, conn, id string, since time.Time) []string {
	var changes []string
	sas, err := c.ikeSAs(conn)
	if err != nil {
		changes = append(changes, r.secrets.redact(err.Error()))
	} else if len(sas) != 1 || sas[0] != (ikeSA{id: id, state: "ESTABLISHED"}) {
		changes = append(changes, fmt.Sprintf("the %s's IKE SAs of %s are now %v, not only #%s ESTABLISHED", c.name, conn, sas, id))
	}
	for _, ev := range c.ikeSAEvents(conn, since) {
		sa := fmt.Sprintf("IKE SA %s[%s]", conn, ev.id)
		if ev.what == "established" {
			sa += " established"
		} else {
			sa = ev.what + " " + sa
		}
		changes = append(changes, fmt.Sprintf("the %s's log: %s at %s", c.name, sa, ev.at.Format("15:04:05.000")))
	}
	return changes
}

// ikeSAEvent is an IKE SA established, deleted or reauthenticated, from a
// daemon's log.
type ikeSAEvent struct {
	at       time.Time
	what, id string
}

// ikeSAEventLine is charon's log line for an IKE SA that came up or went.
var ikeSAEventLine = regexp.MustCompile(`(?m)^(\d+)\.(\d{3}) \d+\[IKE\] (?:IKE_SA (\w+)\[(\d+)\] (established) between|(deleting|reauthenticating) IKE_SA (\w+)\[(\d+)\])`)

// ikeSAEvents lists the IKE SA events of conn at or after since.
func (c *charonProc) ikeSAEvents(conn string, since time.Time) []ikeSAEvent {
	raw, _ := os.ReadFile(c.logPath)
	since = since.Truncate(time.Millisecond)
	var evs []ikeSAEvent
	for _, m := range ikeSAEventLine.FindAllStringSubmatch(string(raw), -1) {
		sec, _ := strconv.ParseInt(m[1], 10, 64)
		ms, _ := strconv.ParseInt(m[2], 10, 64)
		ev := ikeSAEvent{at: time.Unix(sec, ms*int64(time.Millisecond))}
		// One of the two alternatives matched; the other's groups are empty.
		name := m[3] + m[7]
		ev.id, ev.what = m[4]+m[8], m[5]+m[6]
		if name == conn && !ev.at.Before(since) {
			evs = append(evs, ev)
		}
	}
	return evs
}

// firstDeleted returns when the daemon's log first shows an IKE SA of conn
// deleted at or after since.
func (c *charonProc) firstDeleted(conn string, since time.Time) (time.Time, bool) {
	for _, ev := range c.ikeSAEvents(conn, since) {
		if ev.what != "established" {
			return ev.at, true
		}
	}
	return time.Time{}, false
}

// routerHasKey tells whether Agent's rendering of the router's swanctl.conf
// holds the key (as the template writes it, 0s<base64>).
func (r *ikeRig) routerHasKey(psk string) bool {
	raw, err := os.ReadFile(filepath.Join(r.router.swanctlDir, "swanctl.conf"))
	return err == nil && strings.Contains(string(raw), "secret = 0s"+base64.StdEncoding.EncodeToString([]byte(psk))+"\n")
}

// saWatch polls the router's IKE SAs and records each time they were not
// the one it follows, alone and ESTABLISHED: a gap a check after the reload
// would not see.
type saWatch struct {
	mu     sync.Mutex
	id     string
	bad    []string
	badAt  []time.Time
	cancel context.CancelFunc
	done   chan struct{}
}

func (r *ikeRig) watchRouterSA(id string) *saWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &saWatch{id: id, cancel: cancel, done: make(chan struct{})}
	r.t.Cleanup(w.stop) // before the teardown, should the test stop early
	go func() {
		defer close(w.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			at := time.Now()
			sas, err := r.router.ikeSAs("cf1")
			if err != nil {
				// swanctl itself failing says nothing about the SA.
				continue
			}
			w.mu.Lock()
			if len(sas) != 1 || sas[0] != (ikeSA{id: w.id, state: "ESTABLISHED"}) {
				w.bad = append(w.bad, fmt.Sprintf("the watcher saw the router's IKE SAs %v at %s, not only #%s ESTABLISHED", sas, at.Format("15:04:05.000"), w.id))
				w.badAt = append(w.badAt, at)
			}
			w.mu.Unlock()
		}
	}()
	return w
}

// gaps lists what the watcher saw at or after since.
func (w *saWatch) gaps(since time.Time) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for i, at := range w.badAt {
		if !at.Before(since) {
			out = append(out, w.bad[i])
		}
	}
	return out
}

// follow makes the watcher follow another SA.
func (w *saWatch) follow(id string) {
	w.mu.Lock()
	w.id = id
	w.mu.Unlock()
}

func (w *saWatch) stop() {
	w.cancel()
	<-w.done
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

	edgeMode   ikeEdgeMode
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
	// Not t.TempDir: unix socket paths are limited to 108 bytes.
	dir, err := makeIKERunDir(id)
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
// loads the new key into the edge, so that a new handshake needs it at
// once, as Cloudflare's does; deletes the edge's IKE SA if the rig plays the
// edge that drops it; and reports the change.
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
				// The edge that keeps the SA is done: the established SA lives
				// on with the keys it derived. The other deletes it; no IKE SA
				// (the router was already down) is not an error.
				if r.edgeMode == edgeDropsSA {
					if sas, _ := r.edge.swanctl(5*time.Second, "--list-sas", "--ike", "edge", "--raw"); strings.Contains(sas, "{edge {") {
						if out, err := r.edge.swanctl(10*time.Second, "--terminate", "--ike", "edge", "--timeout", "5"); err != nil {
							ev.err = fmt.Errorf("edge: swanctl --terminate: %v: %s", err, out)
						}
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
// template with swanctl-reload.sh as its exec, run through
// ikeReloadWrapper, which only records when each run began and ended),
// rendering the router's whole swanctl.conf.
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
    command = ["/bin/sh", "-c", %q, %q, %q]
    timeout = "30s"
  }
}
`, v.addr, filepath.Join(dir, "role-id"), filepath.Join(dir, "secret-id"), ikeRenderInterval.String(),
		source, filepath.Join(r.router.swanctlDir, "swanctl.conf"), ikeReloadWrapper, script, filepath.Join(dir, ikeReloadsFile)))
	env := append(baseEnv(), "HOME="+dir, "CF_ACCOUNT_ID="+account, "CF_TUNNEL_IDS="+tunnel,
		"PATH="+filepath.Dir(r.bins.swanctl)+":"+os.Getenv("PATH"))
	a := &ikeAgent{r: r, dir: dir, env: append(env, r.router.env()...)}
	r.agents = append(r.agents, a)
	return a
}

// ikeReloadWrapper runs swanctl-reload.sh as agent.hcl's exec does
// (/bin/sh <script>, Agent's environment, its exit status) and appends to a
// file when it began, when it ended and its exit status: the test waits for
// the reload of a new key to end before it looks at the router's SA.
const ikeReloadWrapper = `began=$(date +%s.%N); /bin/sh "$0"; rc=$?; echo "$began $(date +%s.%N) $rc" >>"$1"; exit "$rc"`

// ikeReloadsFile is the file, in Agent's directory, ikeReloadWrapper
// appends to.
const ikeReloadsFile = "reloads"

// ikeReload is one run of swanctl-reload.sh by Agent.
type ikeReload struct {
	began, ended time.Time
	status       int
}

// parseUnixNano reads date +%s.%N.
func parseUnixNano(s string) (time.Time, error) {
	sec, frac, _ := strings.Cut(s, ".")
	secs, err := strconv.ParseInt(sec, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("time %q: %w", s, err)
	}
	frac = (frac + "000000000")[:9]
	ns, err := strconv.ParseInt(frac, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("time %q: %w", s, err)
	}
	return time.Unix(secs, ns), nil
}

// waitReload waits for the first of Agent's reloads that began at or after
// since to end.
func (r *ikeRig) waitReload(since time.Time, limit time.Duration, what string) ikeReload {
	t := r.t
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		raw, _ := os.ReadFile(filepath.Join(r.dir, "agent", ikeReloadsFile))
		for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
			f := strings.Fields(line)
			if len(f) != 3 {
				continue
			}
			began, err1 := parseUnixNano(f[0])
			ended, err2 := parseUnixNano(f[1])
			status, err3 := strconv.Atoi(f[2])
			if err := errors.Join(err1, err2, err3); err != nil {
				t.Fatalf("%s: Agent's reload record %q: %v", what, line, err)
			}
			if !began.Before(since) {
				return ikeReload{began: began, ended: ended, status: status}
			}
		}
		for _, a := range r.agents {
			if a.exited() {
				t.Fatalf("%s: Vault Agent exited; its output:\n%s", what, r.secrets.redact(lastLines(a.out.String(), 30)))
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: Agent did not render the new key and run swanctl-reload.sh within %s", what, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
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
	// Whatever happens to the directory, no key is left in it: a later run
	// need not find it.
	defer func() {
		if err := unregisterIKERun(r.id); err != nil {
			t.Errorf("teardown: %v", err)
		}
	}()
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
