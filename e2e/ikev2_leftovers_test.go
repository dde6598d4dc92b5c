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
	"slices"
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

// TestIKERigClearsKeysOfAKilledRunUnderAnotherTMPDIR: a run puts its
// directory, with both daemons' swanctl.conf (live keys) and Agent's secret
// id, in the TempDir of its own environment, which need not be the next
// run's (a login shell with pam_tmpdir's /tmp/user/0, a CI job's TMPDIR,
// `sudo make test` with /tmp). The next run, with its own TMPDIR, must find
// it all the same and remove it: while the killed run's daemon still runs,
// and when nothing of it runs any more and its namespaces are gone, as
// after a reboot, when only the run's record in the registry names it.
//
// Before the fix (the review's TestReview17IKELeftoversOfARunWithAnotherTMPDIRKeepTheirKeys),
// the rig looked in its own TempDir only:
//
//	cleared what a killed IKEv2 run left (it has no owner record and its processes are orphans): 1 processes, namespaces [cfike-e766da-edge cfike-e766da-rtr], directories []
//	a killed run whose TMPDIR was /tmp/TestReview17IKE.../001: its directory .../cfike-e766da-4011131116, with the daemons' keys, is still there
//	    (its daemon ended: true; its namespaces deleted: true)
func TestIKERigClearsKeysOfAKilledRunUnderAnotherTMPDIR(t *testing.T) {
	bins := ikePreflight(t)
	for _, afterReboot := range []bool{false, true} {
		t.Run(map[bool]string{false: "its daemon still runs", true: "nothing of it runs"}[afterReboot], func(t *testing.T) {
			other := t.TempDir()
			orig, had := os.LookupEnv("TMPDIR")
			t.Setenv("TMPDIR", other) // restored when the test ends; by hand below
			killed := plantIKERun(t, bins, true, false)
			if had {
				os.Setenv("TMPDIR", orig)
			} else {
				os.Unsetenv("TMPDIR")
			}
			if os.TempDir() == other || !strings.HasPrefix(killed.dir, other+string(filepath.Separator)) {
				t.Fatalf("the planted run's directory %s is not under TMPDIR %s, or TMPDIR was not restored", killed.dir, other)
			}
			if afterReboot {
				_ = syscall.Kill(killed.daemon.pid, syscall.SIGKILL)
				for _, ns := range killed.namespaces {
					if out, err := exec.Command(bins.ip, "netns", "delete", ns).CombinedOutput(); err != nil {
						t.Fatalf("ip netns delete %s: %v: %s", ns, err, out)
					}
				}
				if err := endProcs(map[int]procID{killed.daemon.pid: killed.daemon}); err != nil {
					t.Fatal(err)
				}
			}

			clearIKELeftovers(t, bins.ip)

			if _, err := os.Stat(killed.dir); err == nil {
				t.Errorf("a killed run whose TMPDIR was %s: its directory %s, with the daemons' keys, is still there", other, killed.dir)
			}
			if killed.daemon.running() {
				t.Errorf("its daemon (pid %d) still runs", killed.daemon.pid)
			}
			for _, ns := range killed.namespaces {
				if namespaceExists(ns) {
					t.Errorf("its network namespace %s is still there", ns)
				}
			}
			if _, err := os.Stat(filepath.Join(ikeRunRegistry, killed.id)); !os.IsNotExist(err) {
				t.Errorf("its record in %s is still there (%v)", ikeRunRegistry, err)
			}
		})
	}
}

// TestIKERigRefusesARegistryItCannotTrust: the rig removes, as root, the
// directories the registry names, so it refuses a registry that another
// user could write, and a record that names anything but a run directory of
// the rig for the record's run.
func TestIKERigRefusesARegistryItCannotTrust(t *testing.T) {
	registry := filepath.Join(t.TempDir(), "registry")
	if dirs, err := registeredIKERuns(registry); err != nil || len(dirs) != 0 {
		t.Fatalf("a registry that does not exist: %q, %v; want nothing and no error", dirs, err)
	}
	runDir := filepath.Join(t.TempDir(), "cfike-0a1b2c-123")
	mkdir(t, runDir)
	if err := registerIKERun(registry, "0a1b2c", runDir); err != nil {
		t.Fatal(err)
	}
	if dirs, err := registeredIKERuns(registry); err != nil || !slices.Equal(dirs, []string{runDir}) {
		t.Fatalf("the registry gives %q, %v; want [%s]", dirs, err, runDir)
	}
	home := t.TempDir()
	for _, c := range []struct {
		what, id, names string
	}{
		{"a directory that is not a run's", "0a1b2d", home},
		{"a run directory of another run", "0a1b2e", runDir},
		{"a path that is not clean", "0a1b2f", filepath.Dir(runDir) + "/x/../cfike-0a1b2f-123"},
	} {
		t.Run(c.what, func(t *testing.T) {
			record := filepath.Join(registry, c.id)
			writeFile(t, record, c.names+"\n")
			defer os.Remove(record)
			if dirs, err := registeredIKERuns(registry); err == nil {
				t.Errorf("the registry gave %q, and no error", dirs)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(registry, "0a1b2c")); err != nil {
		t.Fatalf("the good record went with the bad ones: %v", err)
	}
	if err := os.Chmod(registry, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := registeredIKERuns(registry); err == nil || !strings.Contains(err.Error(), "mode 0700") {
		t.Errorf("a registry others may read and enter is taken (%v)", err)
	}
	if err := os.Chmod(registry, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(runDir); err != nil {
		t.Fatal(err)
	}
	if dirs, err := registeredIKERuns(registry); err != nil || len(dirs) != 0 {
		t.Errorf("a record of a directory that is gone: %q, %v; want nothing", dirs, err)
	}
	if _, err := os.Stat(filepath.Join(registry, "0a1b2c")); !os.IsNotExist(err) {
		t.Errorf("the record of a directory that is gone was kept (%v)", err)
	}
}

// plantedRun is what plantIKERun left, as a run of the rig would have.
type plantedRun struct {
	what       string
	id         string
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
	var dir string
	var err error
	if legacy {
		p.what += " from before the owner record"
		dir, err = os.MkdirTemp("", "cfike-")
	} else {
		dir, err = makeIKERunDir(id)
		t.Cleanup(func() { _ = unregisterIKERun(id) })
	}
	if err != nil {
		t.Fatal(err)
	}
	p.dir = dir
	p.id = id
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
// <tmp> is the TempDir of the run's own environment, which need not be the
// next run's (pam_tmpdir's /tmp/user/0 in a login shell, a CI job's
// TMPDIR, /tmp under sudo). So each run records its directory in a
// registry at a fixed place, ikeRunRegistry (<id> holds the directory's
// path; root's, mode 0700, in /var/tmp so that it outlives a reboot as a
// directory under /var/tmp would), and a run looks there as well as in
// its own TempDir, /tmp and /var/tmp. A daemon's environment names its
// directory too, wherever it is.
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
// and returns the dead ones. It looks for their directories in roots and in
// the registry.
func findIKELeftovers(roots []string, registry string, now time.Time) ([]ikeLeftover, error) {
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
	for _, root := range roots {
		entries, err := os.ReadDir(root)
		if err != nil {
			if os.IsNotExist(err) {
				continue
			}
			return nil, fmt.Errorf("list %s: %w", root, err)
		}
		for _, e := range entries {
			if e.IsDir() && (ikeRigDirName.MatchString(e.Name()) || ikeLegacyDirName.MatchString(e.Name())) {
				dirs[filepath.Join(root, e.Name())] = dirKey(e.Name())
			}
		}
	}
	registered, err := registeredIKERuns(registry)
	if err != nil {
		return nil, err
	}
	for _, dir := range registered {
		dirs[dir] = dirKey(filepath.Base(dir))
	}
	// runDir is the run directory a path lies in: one under a root, a
	// registered one or, for a process in a run's namespace (which ties it
	// to the rig), any directory named as the rig names them.
	runDir := func(path string, inRunNamespace bool) (string, bool) {
		if !filepath.IsAbs(path) {
			return "", false
		}
		path = filepath.Clean(path)
		for dir := path; dir != "/" && dir != "."; dir = filepath.Dir(dir) {
			name := filepath.Base(dir)
			if !ikeRigDirName.MatchString(name) && !ikeLegacyDirName.MatchString(name) {
				continue
			}
			_, known := dirs[dir]
			if known || inRunNamespace || slices.Contains(roots, filepath.Dir(dir)) {
				return dir, true
			}
			return "", false
		}
		return "", false
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
		inRunNamespace := false
		if ino, ok := processNetns(pid); ok {
			if ns, ok := nsByInode[ino]; ok {
				keys = append(keys, namespaces[ns])
				inRunNamespace = true
			}
		}
		environ, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		for _, kv := range strings.Split(string(environ), "\x00") {
			_, v, _ := strings.Cut(kv, "=")
			path, ok := runDir(v, inRunNamespace)
			if !ok {
				continue
			}
			if _, ok := dirs[path]; !ok {
				// Its directory is gone, or under no root; the process
				// still counts.
				dirs[path] = dirKey(filepath.Base(path))
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
	dead, err := findIKELeftovers(ikeTempRoots(), ikeRunRegistry, time.Now())
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
	for id := range l.ids {
		if err := unregisterIKERun(id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ikeRunRegistry is where each run records its directory, whatever its
// TempDir: a file per run, named by its id, that holds the directory's path.
const ikeRunRegistry = "/var/tmp/cfike-runs"

// ikeTempRoots are the directories a run's directory is looked for in, but
// for the registry: this process's TempDir and the usual ones.
func ikeTempRoots() []string {
	var roots []string
	for _, r := range []string{os.TempDir(), "/tmp", "/var/tmp"} {
		if r = filepath.Clean(r); !slices.Contains(roots, r) {
			roots = append(roots, r)
		}
	}
	return roots
}

// makeIKERunDir makes a run's directory, <TempDir>/cfike-<id>-<random>,
// and records it in the registry before anything is put in it.
func makeIKERunDir(id string) (string, error) {
	dir, err := os.MkdirTemp("", "cfike-"+id+"-")
	if err != nil {
		return "", err
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return "", err
	}
	if err := registerIKERun(ikeRunRegistry, id, dir); err != nil {
		_ = os.RemoveAll(dir)
		return "", err
	}
	return dir, nil
}

// registerIKERun records the run's directory in the registry, which it
// makes root's own (mode 0700) if it is not there yet.
func registerIKERun(registry, id, dir string) error {
	if err := os.Mkdir(registry, 0o700); err != nil && !os.IsExist(err) {
		return fmt.Errorf("make the IKEv2 rig's registry of run directories: %w", err)
	}
	if err := checkIKERegistry(registry); err != nil {
		return err
	}
	f, err := os.CreateTemp(registry, ".new-"+id+"-")
	if err != nil {
		return fmt.Errorf("record the run's directory: %w", err)
	}
	_, werr := f.WriteString(dir + "\n")
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(f.Name(), filepath.Join(registry, id))
	}
	if werr != nil {
		_ = os.Remove(f.Name())
		return fmt.Errorf("record the run's directory in %s: %w", registry, werr)
	}
	return nil
}

// unregisterIKERun drops the run's record, once its directory holds no key.
func unregisterIKERun(id string) error {
	if err := os.Remove(filepath.Join(ikeRunRegistry, id)); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("drop the run's record from %s: %w", ikeRunRegistry, err)
	}
	return nil
}

// checkIKERegistry refuses a registry that someone else could have written:
// the rig removes the directories it names, as root.
func checkIKERegistry(registry string) error {
	info, err := os.Lstat(registry)
	if err != nil {
		return err
	}
	st, _ := info.Sys().(*syscall.Stat_t)
	if !info.IsDir() || st == nil || int(st.Uid) != os.Geteuid() || info.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%s, the IKEv2 rig's registry of run directories, is not a directory of uid %d with mode 0700 (%v): "+
			"the rig removes what it names, so it trusts no other; remove it", registry, os.Geteuid(), info.Mode())
	}
	return nil
}

// registeredIKERuns returns the directories the registry names that exist,
// and drops the records of those that do not. A record that does not name a
// directory of the rig's own, named for its id, is refused.
func registeredIKERuns(registry string) ([]string, error) {
	if err := checkIKERegistry(registry); err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, err
	}
	entries, err := os.ReadDir(registry)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", registry, err)
	}
	var dirs []string
	for _, e := range entries {
		record := filepath.Join(registry, e.Name())
		if !ikeRigID.MatchString(e.Name()) {
			continue // a record being written, or not the rig's
		}
		raw, err := os.ReadFile(record)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", record, err)
		}
		dir := strings.TrimSuffix(string(raw), "\n")
		m := ikeRigDirName.FindStringSubmatch(filepath.Base(dir))
		if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || m == nil || m[1] != e.Name() {
			return nil, fmt.Errorf("%s names %q, not a run directory of the rig for run %s: remove the record", record, dir, e.Name())
		}
		info, err := os.Lstat(dir)
		if os.IsNotExist(err) {
			_ = os.Remove(record) // its run cleared it, or its owner did
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("look at %s, which %s names: %w", dir, record, err)
		}
		if st, _ := info.Sys().(*syscall.Stat_t); !info.IsDir() || st == nil || int(st.Uid) != os.Geteuid() {
			return nil, fmt.Errorf("%s names %s, which is not a directory of uid %d: remove the record", record, dir, os.Geteuid())
		}
		dirs = append(dirs, dir)
	}
	return dirs, nil
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
