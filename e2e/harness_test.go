// Package e2e runs the plugin inside a real Vault server (v1.21.0, built by
// tools/vault) and drives it with the vault CLI and the HTTP API, as
// operators and provisioning tools do. Cloudflare is the in-repo simulator,
// served on loopback from the test process so that each test can compare
// Vault's state with the edge's.
package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

const pluginName = "vault-plugin-secrets-cloudflare-ipsec"

// suite holds what TestMain prepares once: the Vault binary and a plugin
// built from this tree (with the race detector when the suite runs with it,
// so a data race inside the plugin under a real server shows in the
// server's log).
var suite struct {
	vaultBin  string
	pluginDir string
	pluginSHA string
	version   string
}

func TestMain(m *testing.M) {
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) int {
	root, err := filepath.Abs("..")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	suite.vaultBin = os.Getenv("VAULT_BIN")
	if suite.vaultBin == "" {
		suite.vaultBin = filepath.Join(root, "tools", "vault", "bin", "vault")
	}
	if _, err := os.Stat(suite.vaultBin); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: no Vault binary at %s: run `make vault` (or `make test`, which builds it) first\n", suite.vaultBin)
		return 1
	}
	dir, err := os.MkdirTemp("", "cf-ipsec-e2e-plugins-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	suite.pluginDir = dir
	suite.version = "v0.0.0-e2e"
	bin := filepath.Join(dir, pluginName)
	args := []string{"build", "-ldflags", "-X main.version=" + suite.version, "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, ".")...)
	build.Dir = root
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: build plugin: %v\n", err)
		return 1
	}
	body, err := os.ReadFile(bin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sum := sha256.Sum256(body)
	suite.pluginSHA = hex.EncodeToString(sum[:])
	return m.Run()
}

// newEdge serves a fresh Cloudflare simulator on loopback with one API token
// and one account, and returns them with the set of secrets to search logs
// for: every value the simulator issues.
func newEdge(t testing.TB) (*cloudflaresim.Server, string, *secretSet, cloudflaresim.Token, string) {
	t.Helper()
	sim, baseURL := simulator(t)
	return sim, baseURL, &secretSet{source: sim.IssuedSecrets}, sim.AddToken(cloudflaresim.Token{}), cloudflaresim.NewID()
}

// simulator serves a fresh Cloudflare simulator on loopback.
func simulator(t testing.TB) (*cloudflaresim.Server, string) {
	t.Helper()
	sim := cloudflaresim.New()
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	return sim, srv.URL + cloudflaresim.BasePath
}

// vaultServer is one Vault server process.
type vaultServer struct {
	dir       string
	addr      string
	rootToken string
	logPath   string
	cmd       *exec.Cmd
	done      chan struct{}
	// secrets are redacted from anything this harness prints.
	secrets *secretSet
}

// secretSet collects the values that must never be printed.
type secretSet struct {
	mu     sync.Mutex
	values []string
	source func() []string
}

func (s *secretSet) all() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := append([]string(nil), s.values...)
	if s.source != nil {
		out = append(out, s.source()...)
	}
	return out
}

func (s *secretSet) add(v string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.values = append(s.values, v)
}

// redact replaces every known secret in s, so a failing test cannot print one.
func (s *secretSet) redact(text string) string {
	for _, v := range s.all() {
		if v != "" {
			text = strings.ReplaceAll(text, v, "[REDACTED]")
		}
	}
	return text
}

func freePort(t testing.TB) int {
	t.Helper()
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		// Vault also takes the next port for its cluster listener.
		if l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1)); err == nil {
			l2.Close()
			return port
		}
	}
	t.Fatal("no free pair of loopback ports")
	return 0
}

// startDevServer starts `vault server -dev` with the plugin directory set,
// logging at trace so that the secret checks search everything the plugin
// and Vault can log.
func startDevServer(t testing.TB, secrets *secretSet) *vaultServer {
	t.Helper()
	return startDevServerAt(t, secrets, "trace")
}

// startDevServerAt starts a dev server at a given log level; benchmarks use
// info, as a production server would.
func startDevServerAt(t testing.TB, secrets *secretSet, logLevel string) *vaultServer {
	t.Helper()
	return startDevServerWith(t, secrets, logLevel, suite.pluginDir)
}

// startDevServerWith starts a dev server whose plugin directory is pluginDir.
func startDevServerWith(t testing.TB, secrets *secretSet, logLevel, pluginDir string) *vaultServer {
	t.Helper()
	return startDevServerConfig(t, secrets, logLevel, pluginDir, "")
}

// startDevServerConfig starts a dev server whose plugin directory is
// pluginDir, with extra lines of server configuration.
func startDevServerConfig(t testing.TB, secrets *secretSet, logLevel, pluginDir, extra string) *vaultServer {
	t.Helper()
	dir := t.TempDir()
	port := freePort(t)
	cfg := fmt.Sprintf("plugin_directory = %q\n%s", pluginDir, extra)
	writeFile(t, filepath.Join(dir, "plugins.hcl"), cfg)
	v := &vaultServer{dir: dir, addr: fmt.Sprintf("http://127.0.0.1:%d", port), rootToken: "root", secrets: secrets}
	v.start(t, "server", "-dev", "-dev-root-token-id=root", fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port),
		"-config="+filepath.Join(dir, "plugins.hcl"), "-log-level="+logLevel)
	v.waitReady(t)
	return v
}

// startFileServer starts a server with file storage in dir, so that it can be
// stopped and started again over the same data. The caller initialises or
// unseals it.
func startFileServer(t testing.TB, dir string, port int, secrets *secretSet) *vaultServer {
	t.Helper()
	cfg := fmt.Sprintf(`
storage "file" { path = %q }
listener "tcp" {
  address         = "127.0.0.1:%d"
  cluster_address = "127.0.0.1:%d"
  tls_disable     = true
}
api_addr         = "http://127.0.0.1:%d"
cluster_addr     = "http://127.0.0.1:%d"
plugin_directory = %q
disable_mlock    = true
log_level        = "trace"
`, filepath.Join(dir, "data"), port, port+1, port, port+1, suite.pluginDir)
	writeFile(t, filepath.Join(dir, "server.hcl"), cfg)
	v := &vaultServer{dir: dir, addr: fmt.Sprintf("http://127.0.0.1:%d", port), secrets: secrets}
	v.start(t, "server", "-config="+filepath.Join(dir, "server.hcl"))
	v.waitReady(t)
	return v
}

// raftServerConfig is the config of a server with integrated storage (Raft)
// under dir, listening on port (API) and port+1 (cluster); raftExtra goes
// into the storage stanza (retry_join blocks, max_entry_size).
func raftServerConfig(dir, nodeID string, port int, raftExtra string) string {
	return fmt.Sprintf(`
storage "raft" {
  path    = %q
  node_id = %q
%s}
listener "tcp" {
  address         = "127.0.0.1:%d"
  cluster_address = "127.0.0.1:%d"
  tls_disable     = true
}
api_addr         = "http://127.0.0.1:%d"
cluster_addr     = "https://127.0.0.1:%d"
plugin_directory = %q
disable_mlock    = true
log_level        = "trace"
`, filepath.Join(dir, "raft"), nodeID, raftExtra, port, port+1, port, port+1, suite.pluginDir)
}

// vaultInit is what operator init answers.
type vaultInit struct {
	UnsealKeys []string `json:"unseal_keys_b64"`
	RootToken  string   `json:"root_token"`
}

// initServer initialises v with one key share, adds the unseal key and
// root token to secrets, and returns them.
func initServer(t testing.TB, v *vaultServer, secrets *secretSet) vaultInit {
	t.Helper()
	var init vaultInit
	out := v.mustRun(t, "json", "", "operator", "init", "-key-shares=1", "-key-threshold=1")
	if err := json.Unmarshal([]byte(out), &init); err != nil || len(init.UnsealKeys) != 1 {
		t.Fatalf("decode operator init output: %v", err)
	}
	secrets.add(init.UnsealKeys[0])
	secrets.add(init.RootToken)
	return init
}

// startRaftServer starts a single-node Vault with integrated storage, as a
// production server stores, initialised, unsealed and active, with its root
// token set; raftExtra goes into the storage stanza (max_entry_size = ...).
func startRaftServer(t testing.TB, secrets *secretSet, raftExtra string) *vaultServer {
	t.Helper()
	dir, port := t.TempDir(), freePort(t)
	mkdir(t, filepath.Join(dir, "raft"))
	writeFile(t, filepath.Join(dir, "server.hcl"), raftServerConfig(dir, "node1", port, raftExtra))
	v := &vaultServer{dir: dir, addr: fmt.Sprintf("http://127.0.0.1:%d", port), secrets: secrets}
	v.start(t, "server", "-config="+filepath.Join(dir, "server.hcl"))
	v.waitReady(t)
	init := initServer(t, v, secrets)
	v.mustVault(t, "", "operator", "unseal", init.UnsealKeys[0])
	waitActive(t, v)
	v.rootToken = init.RootToken
	return v
}

func (v *vaultServer) start(t testing.TB, args ...string) {
	t.Helper()
	v.logPath = filepath.Join(v.dir, fmt.Sprintf("vault-%d.log", time.Now().UnixNano()))
	logFile, err := os.Create(v.logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(suite.vaultBin, args...)
	cmd.Env = baseEnv()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Pdeathsig: a test binary killed outright (a timeout, kill -9) runs
	// no cleanup, and its Vault servers, with their mounts' keys in
	// memory, would live on as orphans; the kernel kills them with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start vault: %v", err)
	}
	v.cmd = cmd
	v.done = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(v.done)
	}()
	t.Cleanup(v.stop)
}

// stop ends the server and its plugin processes.
func (v *vaultServer) stop() {
	if v.cmd == nil {
		return
	}
	stopGroup(v.cmd, v.done, 20*time.Second)
	v.cmd = nil
}

// stopGroup ends a process started in a process group of its own, and
// whatever it started (Vault's plugins, Agent's exec): SIGTERM, then SIGKILL
// after grace. done is closed when the process has been waited for.
func stopGroup(cmd *exec.Cmd, done <-chan struct{}, grace time.Duration) {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

// waitReady polls sys/health until the server answers (sealed or not).
func (v *vaultServer) waitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-v.done:
			t.Fatalf("vault exited early; log:\n%s", v.secrets.redact(v.log()))
		default:
		}
		resp, err := http.Get(v.addr + "/v1/sys/health?sealedcode=200&uninitcode=200")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("vault at %s not ready; log:\n%s", v.addr, v.secrets.redact(v.log()))
}

func (v *vaultServer) log() string {
	b, _ := os.ReadFile(v.logPath)
	return string(b)
}

// baseEnv is the environment for vault processes: the test's own, without
// any VAULT_ variable that could point the CLI elsewhere.
func baseEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			env = append(env, kv)
		}
	}
	return env
}

// cliResult is one vault CLI run.
type cliResult struct {
	stdout, stderr string
	code           int
}

// vault runs the CLI against this server with a token.
func (v *vaultServer) vault(t testing.TB, token string, args ...string) cliResult {
	t.Helper()
	return v.run(t, "table", token, args...)
}

func (v *vaultServer) run(t testing.TB, format, token string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, suite.vaultBin, args...)
	cmd.Env = append(baseEnv(), "VAULT_ADDR="+v.addr, "VAULT_TOKEN="+token, "VAULT_FORMAT="+format, "HOME="+v.dir)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	if exitErr, ok := err.(*exec.ExitError); ok {
		res.code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("run vault %s: %v", v.secrets.redact(strings.Join(args, " ")), err)
	}
	return res
}

// mustVault runs the CLI and fails the test unless it succeeds.
func (v *vaultServer) mustVault(t testing.TB, token string, args ...string) string {
	t.Helper()
	return v.mustRun(t, "table", token, args...)
}

func (v *vaultServer) mustRun(t testing.TB, format, token string, args ...string) string {
	t.Helper()
	res := v.run(t, format, token, args...)
	if res.code != 0 {
		t.Fatalf("vault %s: exit %d\n%s", v.secrets.redact(strings.Join(args, " ")), res.code, v.secrets.redact(res.stderr+res.stdout))
	}
	return res.stdout
}

// mustVaultJSON runs the CLI with VAULT_FORMAT=json and decodes its output.
func (v *vaultServer) mustVaultJSON(t testing.TB, token string, args ...string) map[string]any {
	t.Helper()
	return decodeJSON(t, v.mustRun(t, "json", token, args...))
}

func decodeJSON(t testing.TB, out string) map[string]any {
	t.Helper()
	var decoded map[string]any
	if err := json.Unmarshal([]byte(out), &decoded); err != nil {
		t.Fatalf("decode vault output: %v", err)
	}
	return decoded
}

// api calls Vault's HTTP API as a provisioning tool would.
func (v *vaultServer) api(t testing.TB, token, method, path string, body any) (int, map[string]any) {
	t.Helper()
	var reader io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		reader = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, v.addr+"/v1/"+path, reader)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Vault-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var decoded map[string]any
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &decoded); err != nil {
			t.Fatalf("%s %s: decode %d answer: %v", method, path, resp.StatusCode, err)
		}
	}
	return resp.StatusCode, decoded
}

// mountEngine registers the plugin by SHA-256, enables it at
// cloudflare-ipsec/ and configures it against the simulator.
func (v *vaultServer) mountEngine(t testing.TB, baseURL, apiToken string) {
	t.Helper()
	v.mustVault(t, v.rootToken, "plugin", "register", "-sha256="+suite.pluginSHA, "secret", pluginName)
	v.mustVault(t, v.rootToken, "secrets", "enable", "-path=cloudflare-ipsec", pluginName)
	v.mustVault(t, v.rootToken, "write", "cloudflare-ipsec/config", "api_token="+apiToken, "base_url="+baseURL, "request_timeout=5s")
}

// assertNoSecretsIn fails if any secret occurs in text; what names the text.
func assertNoSecretsIn(t testing.TB, secrets *secretSet, what, text string) {
	t.Helper()
	all := secrets.all()
	if len(all) == 0 {
		t.Fatalf("no secrets to look for in %s: the check would prove nothing", what)
	}
	for _, s := range all {
		if s != "" && strings.Contains(text, s) {
			t.Errorf("a secret (%d characters) appears in %s", len(s), what)
		}
	}
}

// assertNoDataRace fails if the race detector reported anything in the
// server's log (the plugin's stderr reaches it).
func assertNoDataRace(t testing.TB, log string) {
	t.Helper()
	i := strings.Index(log, "WARNING: DATA RACE")
	if i < 0 {
		return
	}
	// The report itself, up to the detector's closing line: the server's
	// log lives in the test's temporary directory, gone once it ends. A
	// report holds stacks (functions, files, lines), never values.
	report := log[i:]
	if end := strings.Index(report, "=================="); end > 0 {
		report = report[:end]
	}
	t.Errorf("the race detector reported a data race in the plugin:\n%s", report[:min(len(report), 8000)])
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func field(t testing.TB, secret map[string]any, name string) any {
	t.Helper()
	data, ok := secret["data"].(map[string]any)
	if !ok {
		t.Fatalf("response has no data")
	}
	return data[name]
}

// pluginPIDs returns the processes running this suite's plugin binary.
func pluginPIDs(t testing.TB) []int {
	t.Helper()
	bin := filepath.Join(suite.pluginDir, pluginName)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if argv0, _, _ := strings.Cut(string(cmdline), "\x00"); argv0 == bin {
			pids = append(pids, pid)
		}
	}
	return pids
}

func mkdir(t testing.TB, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
}
