package e2e

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestIKERigClearsLeftoversOfKilledRuns plants what a killed IKEv2 run
// leaves (its namespaces, a daemon in one of them that outlived the test,
// its directory with the daemons' swanctl.conf, which hold keys) and checks
// that the rig, as it sets up, removes all of it; and that it leaves alone
// the same things of a run whose test process still runs, as another
// engineer's run on the same machine would be.
//
// Two layouts are planted: the rig's (the directory cfike-<id>-<random>
// records its owner, the test process, and its daemons' pids) and the one
// of runs from before the owner record (cfike-<random>: nothing records who
// started it, so the rig goes by the daemons' parents).
func TestIKERigClearsLeftoversOfKilledRuns(t *testing.T) {
	bins := ikePreflight(t)

	killed := plantIKERun(t, bins, true, false)
	killedLegacy := plantIKERun(t, bins, true, true)
	alive := plantIKERun(t, bins, false, false)
	aliveLegacy := plantIKERun(t, bins, false, true)

	rig := newIKERig(t, bins, &secretSet{})
	defer rig.teardown()

	for _, p := range []*plantedRun{killed, killedLegacy} {
		for _, ns := range p.namespaces {
			if namespaceExists(ns) {
				t.Errorf("%s: its network namespace %s is still there", p.what, ns)
			}
		}
		if p.daemon.running() {
			t.Errorf("%s: its daemon (pid %d) still runs", p.what, p.daemon.pid)
		}
		if _, err := os.Stat(p.dir); err == nil {
			t.Errorf("%s: its directory %s, with the daemons' keys, is still there", p.what, p.dir)
		}
	}
	for _, p := range []*plantedRun{alive, aliveLegacy} {
		for _, ns := range p.namespaces {
			if !namespaceExists(ns) {
				t.Errorf("%s: its network namespace %s was removed", p.what, ns)
			}
		}
		if !p.daemon.running() {
			t.Errorf("%s: its daemon (pid %d) was ended", p.what, p.daemon.pid)
		}
		for _, f := range p.keyFiles {
			if _, err := os.Stat(f); err != nil {
				t.Errorf("%s: its file %s was removed: %v", p.what, f, err)
			}
		}
	}
}

// plantedRun is what plantIKERun left, as a run of the rig would have.
type plantedRun struct {
	what       string
	dir        string
	namespaces []string
	keyFiles   []string
	daemon     procID
}

// procID names a process by its pid and its start time (in clock ticks
// since boot, /proc/<pid>/stat), so that a pid the kernel has given to
// another process is not taken for it.
type procID struct {
	pid   int
	start uint64
}

func (p procID) String() string { return fmt.Sprintf("%d %d\n", p.pid, p.start) }

// running tells whether the process still runs (a zombie does not).
func (p procID) running() bool {
	st, ok := readProcStat(p.pid)
	return ok && st.start == p.start && st.state != "Z" && st.state != "X"
}

// procStat is what the rig reads of /proc/<pid>/stat.
type procStat struct {
	state string
	ppid  int
	start uint64
}

func readProcStat(pid int) (procStat, bool) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, false
	}
	// The command name, in parentheses, may hold spaces: the fields that
	// follow it are counted from its closing parenthesis.
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return procStat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return procStat{}, false
	}
	return procStat{state: f[0], ppid: ppid, start: start}, true
}

func namespaceExists(name string) bool {
	_, err := os.Stat(filepath.Join(ikeNetnsDir, name))
	return err == nil
}

// ikeNetnsDir is where ip netns keeps its namespaces.
const ikeNetnsDir = "/run/netns"

// plantIKERun plants the namespaces, a daemon and the directory of a run of
// the rig: a killed one (its test process has exited and its daemon is an
// orphan, a child of init) or a live one (its owner is this test process,
// and so is the daemon's parent). legacy plants the layout of the runs from
// before the rig recorded owners and pids. Whatever the rig under test does,
// the planted things are removed when the test ends.
func plantIKERun(t *testing.T, bins ikeBins, killed, legacy bool) *plantedRun {
	t.Helper()
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	id := hex.EncodeToString(b)
	p := &plantedRun{what: map[bool]string{true: "a killed run", false: "a live run"}[killed]}
	pattern := "cfike-" + id + "-"
	if legacy {
		p.what += " from before the owner record"
		pattern = "cfike-"
	}
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		t.Fatal(err)
	}
	p.dir = dir
	t.Cleanup(func() { _ = os.RemoveAll(dir) })

	for _, ns := range []string{"cfike-" + id + "-edge", "cfike-" + id + "-rtr"} {
		if out, err := exec.Command(bins.ip, "netns", "add", ns).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add %s: %v: %s", ns, err, out)
		}
		p.namespaces = append(p.namespaces, ns)
		t.Cleanup(func() {
			if namespaceExists(ns) {
				_ = exec.Command(bins.ip, "netns", "delete", ns).Run()
			}
		})
	}
	for _, side := range []string{"edge", "router"} {
		mkdir(t, filepath.Join(dir, side, "swanctl"))
		key := make([]byte, 24)
		if _, err := rand.Read(key); err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(dir, side, "swanctl", "swanctl.conf")
		writeFile(t, f, "secrets {\n  ike-cf1 {\n    secret = 0s"+base64.StdEncoding.EncodeToString(key)+"\n  }\n}\n")
		p.keyFiles = append(p.keyFiles, f)
	}

	// The daemon stands in for charon: a process in the edge's namespace
	// with the environment the rig gives charon.
	env := append(baseEnv(), "STRONGSWAN_CONF="+filepath.Join(dir, "edge", "strongswan.conf"))
	if killed {
		// Started by a shell that exits at once: it is an orphan, as a
		// daemon is whose test process was killed.
		sh := exec.Command("/bin/sh", "-c", `"$0" netns exec "$1" sleep 600 </dev/null >/dev/null 2>&1 & echo $!`, bins.ip, p.namespaces[0])
		sh.Env = env
		sh.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		out, err := sh.Output()
		if err != nil {
			t.Fatalf("start the planted daemon: %v", err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
		if err != nil {
			t.Fatalf("the planted daemon's pid %q: %v", out, err)
		}
		p.daemon = waitProcID(t, pid, p.namespaces[0])
	} else {
		cmd := exec.Command(bins.ip, "netns", "exec", p.namespaces[0], "sleep", "600")
		cmd.Env = env
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatalf("start the planted daemon: %v", err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
		p.daemon = waitProcID(t, cmd.Process.Pid, p.namespaces[0])
	}
	daemon := p.daemon
	t.Cleanup(func() {
		if daemon.running() {
			_ = syscall.Kill(daemon.pid, syscall.SIGKILL)
		}
	})

	if !legacy {
		owner := selfProcID(t)
		if killed {
			owner = exitedProcID(t)
		}
		writeFile(t, filepath.Join(dir, ikeOwnerFile), owner.String())
		writeFile(t, filepath.Join(dir, "edge", ikePidFile), daemon.String())
	}
	return p
}

// waitProcID returns the process's pid and start time once it runs in the
// namespace (ip netns exec has entered it and executed the program).
func waitProcID(t *testing.T, pid int, ns string) procID {
	t.Helper()
	want, err := namespaceInode(ns)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, ok := readProcStat(pid)
		if ok {
			if got, ok := processNetns(pid); ok && got == want {
				if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) == "sleep" {
					return procID{pid: pid, start: st.start}
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the planted daemon (pid %d) did not start in %s", pid, ns)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// selfProcID is this test process.
func selfProcID(t *testing.T) procID {
	t.Helper()
	st, ok := readProcStat(os.Getpid())
	if !ok {
		t.Fatal("cannot read /proc/self/stat")
	}
	return procID{pid: os.Getpid(), start: st.start}
}

// exitedProcID is a process that has run and exited: the owner of a killed
// run.
func exitedProcID(t *testing.T) procID {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	st, ok := readProcStat(cmd.Process.Pid)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if !ok {
		t.Fatal("cannot read the stat of a process just started")
	}
	return procID{pid: cmd.Process.Pid, start: st.start}
}

// namespaceInode is the inode of a named network namespace, which
// /proc/<pid>/ns/net names for each process in it.
func namespaceInode(name string) (uint64, error) {
	info, err := os.Stat(filepath.Join(ikeNetnsDir, name))
	if err != nil {
		return 0, fmt.Errorf("network namespace %s: %w", name, err)
	}
	return info.Sys().(*syscall.Stat_t).Ino, nil
}

// processNetns is the inode of the process's network namespace.
func processNetns(pid int) (uint64, bool) {
	link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil || !strings.HasPrefix(link, "net:[") {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "net:["), "]"), 10, 64)
	return n, err == nil
}

// The rig's records in its directory: the owner (the test process) at the
// top, each daemon's pid file in the daemon's own directory.
const (
	ikeOwnerFile = "owner"
	ikePidFile   = "pid"
)

// Leftovers of killed runs. A run that is killed (go test's -timeout, a
// cancelled CI job, kill -9) runs no teardown: its charon daemons and its
// Vault Agent live on, in its namespaces, and its directory holds live keys
// (both daemons' swanctl.conf, Agent's secret id). newIKERig clears them
// before it sets anything up.
//
// A run's things carry its id (six hex digits): its namespaces
// (cfike-<id>-edge, cfike-<id>-rtr), its veth pair (cfk<id>e, cfk<id>r) and
// its directory (<tmp>/cfike-<id>-<random>). The directory's owner file
// names the test process (pid and start time, so that a pid given to
// another process is not taken for the owner) and each daemon's pid file
// names the daemon. A run is a leftover once its owner has exited; a run
// whose owner lives, another engineer's on the same machine, is never
// touched.
//
// Runs from before the owner record (directories <tmp>/cfike-<random>)
// record nothing; their processes name their directory in their
// environment (STRONGSWAN_CONF, HOME) and live in their namespaces. Such a
// run is a leftover when none of its processes has a parent outside it but
// init (its test process is gone and they were given to init), or, when it
// has no process, when it is older than ikeLegacyGrace: a run sets up its
// namespaces a moment before it starts its daemons. A directory of such a
// run with no process and no key file in it is the logs a failed run kept
// on purpose, and is left alone.

// ikeLegacyGrace is how old a run without an owner record and without a
// process must be to count as a leftover.
const ikeLegacyGrace = 2 * time.Minute

var (
	ikeRigDirName    = regexp.MustCompile(`^cfike-([0-9a-f]{6})-[0-9]+$`)
	ikeLegacyDirName = regexp.MustCompile(`^cfike-[0-9]+$`)
	ikeNamespaceName = regexp.MustCompile(`^cfike-(.+)-(edge|rtr)$`)
	ikeRigID         = regexp.MustCompile(`^[0-9a-f]{6}$`)
)

// ikeKeyFiles are the files of a run's directory that hold secrets.
var ikeKeyFiles = []string{
	filepath.Join("edge", "swanctl", "swanctl.conf"),
	filepath.Join("router", "swanctl", "swanctl.conf"),
	filepath.Join("agent", "secret-id"),
}

// writeProcID records a process in a file of the run's directory.
func writeProcID(path string, pid int) error {
	st, ok := readProcStat(pid)
	if !ok {
		return fmt.Errorf("record pid %d in %s: the process has exited", pid, path)
	}
	return os.WriteFile(path, []byte(procID{pid: pid, start: st.start}.String()), 0o600)
}

// readProcID reads a record written by writeProcID.
func readProcID(path string) (procID, bool) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return procID{}, false
	}
	var p procID
	if _, err := fmt.Sscan(string(raw), &p.pid, &p.start); err != nil {
		return procID{}, false
	}
	return p, true
}

// ikeProc is a running process that belongs to some run.
type ikeProc struct {
	procID
	ppid int
}

// ikeRunRemains is what one run left on the machine.
type ikeRunRemains struct {
	ids        map[string]bool // the run's ids, for its veth pair
	dirs       map[string]bool
	namespaces map[string]bool
	procs      map[int]ikeProc
	owners     []procID
	youngest   time.Time
}

// ikeLeftover is a run found dead, and why.
type ikeLeftover struct {
	*ikeRunRemains
	why string
}

// findIKELeftovers lists the runs of the rig on this machine, live or not,
// and returns the dead ones.
func findIKELeftovers(tmp string, now time.Time) ([]ikeLeftover, error) {
	// Every thing is keyed by its run; things that a process ties together
	// (its directory, its namespace) are one run.
	parent := map[string]string{}
	var find func(string) string
	find = func(k string) string {
		if p, ok := parent[k]; ok && p != k {
			r := find(p)
			parent[k] = r
			return r
		}
		parent[k] = k
		return k
	}
	union := func(a, b string) { parent[find(a)] = find(b) }
	dirKey := func(name string) string {
		if m := ikeRigDirName.FindStringSubmatch(name); m != nil {
			return "id:" + m[1]
		}
		return "dir:" + name
	}
	nsKey := func(name string) string {
		if m := ikeNamespaceName.FindStringSubmatch(name); m != nil {
			return "id:" + m[1]
		}
		return "ns:" + name
	}

	dirs := map[string]string{} // path: its own key
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", tmp, err)
	}
	for _, e := range entries {
		if e.IsDir() && (ikeRigDirName.MatchString(e.Name()) || ikeLegacyDirName.MatchString(e.Name())) {
			dirs[filepath.Join(tmp, e.Name())] = dirKey(e.Name())
		}
	}
	namespaces := map[string]string{} // name: its own key
	nsByInode := map[uint64]string{}
	nsEntries, err := os.ReadDir(ikeNetnsDir)
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("list %s: %w", ikeNetnsDir, err)
	}
	for _, e := range nsEntries {
		if !strings.HasPrefix(e.Name(), "cfike-") {
			continue
		}
		namespaces[e.Name()] = nsKey(e.Name())
		if ino, err := namespaceInode(e.Name()); err == nil {
			nsByInode[ino] = e.Name()
		}
	}

	// Processes: those in a run's namespace, and those whose environment
	// names a run's directory.
	procs := map[int]ikeProc{}
	procKeys := map[int][]string{}
	procEntries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list /proc: %w", err)
	}
	dirPrefix := filepath.Join(tmp, "cfike-")
	for _, e := range procEntries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		st, ok := readProcStat(pid)
		if !ok || st.state == "Z" || st.state == "X" {
			continue
		}
		var keys []string
		if ino, ok := processNetns(pid); ok {
			if ns, ok := nsByInode[ino]; ok {
				keys = append(keys, namespaces[ns])
			}
		}
		environ, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		for _, kv := range strings.Split(string(environ), "\x00") {
			_, v, _ := strings.Cut(kv, "=")
			if !strings.HasPrefix(v, dirPrefix) {
				continue
			}
			name, _, _ := strings.Cut(strings.TrimPrefix(v, tmp+string(filepath.Separator)), string(filepath.Separator))
			if !ikeRigDirName.MatchString(name) && !ikeLegacyDirName.MatchString(name) {
				continue
			}
			path := filepath.Join(tmp, name)
			if _, ok := dirs[path]; !ok {
				// Its directory is gone; the process still counts.
				dirs[path] = dirKey(name)
			}
			keys = append(keys, dirs[path])
		}
		if len(keys) == 0 {
			continue
		}
		procs[pid] = ikeProc{procID: procID{pid: pid, start: st.start}, ppid: st.ppid}
		procKeys[pid] = keys
		for _, k := range keys[1:] {
			union(keys[0], k)
		}
	}

	runs := map[string]*ikeRunRemains{}
	run := func(key string) *ikeRunRemains {
		root := find(key)
		r := runs[root]
		if r == nil {
			r = &ikeRunRemains{ids: map[string]bool{}, dirs: map[string]bool{}, namespaces: map[string]bool{}, procs: map[int]ikeProc{}}
			runs[root] = r
		}
		if id, ok := strings.CutPrefix(key, "id:"); ok && ikeRigID.MatchString(id) {
			r.ids[id] = true
		}
		return r
	}
	seen := func(r *ikeRunRemains, path string) {
		if info, err := os.Stat(path); err == nil && info.ModTime().After(r.youngest) {
			r.youngest = info.ModTime()
		}
	}
	for path, key := range dirs {
		r := run(key)
		r.dirs[path] = true
		seen(r, path)
		if owner, ok := readProcID(filepath.Join(path, ikeOwnerFile)); ok {
			r.owners = append(r.owners, owner)
		}
	}
	for name, key := range namespaces {
		r := run(key)
		r.namespaces[name] = true
		seen(r, filepath.Join(ikeNetnsDir, name))
	}
	for pid, keys := range procKeys {
		r := run(keys[0])
		r.procs[pid] = procs[pid]
	}

	var dead []ikeLeftover
	for _, r := range runs {
		if why, isDead := r.dead(now); isDead && r.holdsSomething() {
			dead = append(dead, ikeLeftover{ikeRunRemains: r, why: why})
		}
	}
	return dead, nil
}

// dead tells whether the run's test process has exited, and how it knows.
func (r *ikeRunRemains) dead(now time.Time) (string, bool) {
	if len(r.owners) > 0 {
		for _, o := range r.owners {
			if o.running() {
				return "", false
			}
		}
		return fmt.Sprintf("its test process, pid %d, has exited", r.owners[0].pid), true
	}
	for _, p := range r.procs {
		if _, inRun := r.procs[p.ppid]; !inRun && p.ppid != 1 {
			return "", false // started by a process that still runs
		}
	}
	if len(r.procs) > 0 {
		return "it has no owner record and its processes are orphans", true
	}
	if now.Sub(r.youngest) < ikeLegacyGrace {
		return "", false // perhaps a run that is setting up
	}
	return fmt.Sprintf("it has no owner record and no process, and is older than %s", ikeLegacyGrace), true
}

// holdsSomething tells whether a dead run left anything to clear: a
// directory with no key, no process and no namespace is the logs a failed
// run kept for a look.
func (r *ikeRunRemains) holdsSomething() bool {
	if len(r.procs) > 0 || len(r.namespaces) > 0 || len(r.owners) > 0 {
		return true
	}
	for dir := range r.dirs {
		for _, f := range ikeKeyFiles {
			if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
				return true
			}
		}
	}
	return false
}

// clearIKELeftovers ends the processes of every dead run of the rig on
// this machine, deletes its namespaces and veth pair, and removes its
// directory and so the keys in it.
func clearIKELeftovers(t testing.TB, ip string) {
	t.Helper()
	dead, err := findIKELeftovers(os.TempDir(), time.Now())
	if err != nil {
		t.Fatalf("look for what killed IKEv2 runs left: %v", err)
	}
	for _, l := range dead {
		if err := l.clear(ip); err != nil {
			t.Fatalf("clear what a killed IKEv2 run left (%s): %v", l.why, err)
		}
		t.Logf("cleared what a killed IKEv2 run left (%s): %d processes, namespaces %v, directories %v",
			l.why, len(l.procs), sortedKeys(l.namespaces), sortedKeys(l.dirs))
	}
}

func sortedKeys(m map[string]bool) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	sort.Strings(s)
	return s
}

func (l ikeLeftover) clear(ip string) error {
	// Its processes: those found, and those its pid files name (which
	// still run: the start time tells).
	victims := map[int]procID{}
	for pid, p := range l.procs {
		victims[pid] = p.procID
	}
	for dir := range l.dirs {
		for _, sub := range []string{"edge", "router", "agent"} {
			if p, ok := readProcID(filepath.Join(dir, sub, ikePidFile)); ok && p.running() {
				victims[p.pid] = p
			}
		}
	}
	if err := endProcs(victims); err != nil {
		return err
	}
	var errs []error
	for ns := range l.namespaces {
		if out, err := exec.Command(ip, "netns", "delete", ns).CombinedOutput(); err != nil && namespaceExists(ns) {
			errs = append(errs, fmt.Errorf("ip netns delete %s: %v: %s", ns, err, strings.TrimSpace(string(out))))
		}
	}
	// The veth pair is gone with the namespaces, unless the run was killed
	// before it moved the ends into them.
	for id := range l.ids {
		for _, end := range []string{"cfk" + id + "e", "cfk" + id + "r"} {
			if exec.Command(ip, "link", "show", end).Run() == nil {
				if out, err := exec.Command(ip, "link", "delete", end).CombinedOutput(); err != nil {
					errs = append(errs, fmt.Errorf("ip link delete %s: %v: %s", end, err, strings.TrimSpace(string(out))))
				}
			}
		}
	}
	for dir := range l.dirs {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// endProcs sends SIGTERM (charon deletes its SAs, Agent stops), then
// SIGKILL to what still runs, and waits for all to end.
func endProcs(procs map[int]procID) error {
	wait := func(limit time.Duration) []procID {
		deadline := time.Now().Add(limit)
		for {
			var left []procID
			for _, p := range procs {
				if p.running() {
					left = append(left, p)
				}
			}
			if len(left) == 0 || time.Now().After(deadline) {
				return left
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for _, p := range procs {
		if p.running() {
			_ = syscall.Kill(p.pid, syscall.SIGTERM)
		}
	}
	left := wait(10 * time.Second)
	for _, p := range left {
		if p.running() {
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
	}
	if left = wait(5 * time.Second); len(left) > 0 {
		var pids []string
		for _, p := range left {
			pids = append(pids, strconv.Itoa(p.pid))
		}
		return fmt.Errorf("processes %s still run after SIGKILL", strings.Join(pids, ", "))
	}
	return nil
}
