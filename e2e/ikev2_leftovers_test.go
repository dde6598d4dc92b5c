package e2e

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
