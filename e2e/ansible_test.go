package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// ansibleRouters are the routers of the inventory the Ansible tests write,
// one per family of docs/examples/ansible/templates, named as in the
// example's inventory.yml. Each family renders what the Agent template of
// docs/examples renders from the same reads, but for its header: header is
// what the Jinja template writes there, agentHeader what the Agent template
// writes (the golden files hold the latter).
var ansibleRouters = []struct {
	host, family, file, agentTemplate string
	header, agentHeader               string
}{
	{host: "branch-1", family: "strongswan", file: "swanctl.conf", agentTemplate: "swanctl.conf.tpl",
		header: "# Rendered by Ansible from swanctl.conf.j2: changes made here are lost at the\n" +
			"# next rotation. Install it and run swanctl-reload.sh after each render.\n",
		agentHeader: "# Rendered by Vault Agent from swanctl.conf.tpl: changes made here are lost at\n" +
			"# the next rotation. Agent runs swanctl-reload.sh after each render.\n"},
	{host: "branch-2", family: "vyos", file: "vyos.vbash", agentTemplate: "vyos.vbash.tpl",
		header: "# Rendered by Ansible from vyos.vbash.j2: run it on the router with /bin/vbash.\n" +
			"# It commits and does not save: after a reboot, run it again (or add `save`,\n" +
			"# which also keeps the key in config.boot).\n",
		agentHeader: "# Rendered by Vault Agent from vyos.vbash.tpl: it rewrites this script at each\n" +
			"# rotation and runs it. Nothing is saved to config.boot: Agent renders and runs\n" +
			"# the script again when the router boots, so the key is not kept on disk twice.\n"},
	{host: "branch-3", family: "ios-xe", file: "ios-xe.cfg", agentTemplate: "ios-xe.cfg.tpl",
		header: "! Rendered by Ansible from ios-xe.cfg.j2: it is pushed again at each\n" +
			"! rotation, so make changes in the template.\n",
		agentHeader: "! Rendered by Vault Agent from ios-xe.cfg.tpl: it is pushed again at each\n" +
			"! rotation, so make changes in the template.\n"},
	// Junos's file holds no comment, so no header.
	{host: "branch-4", family: "junos", file: "junos.set", agentTemplate: "junos.set.tpl"},
}

// TestAnsiblePlaybookRotatesAndRenders runs docs/examples/ansible/playbook.yml
// with ansible-playbook (Debian's ansible package and its bundled
// community.hashi_vault collection) against a real Vault, as a network team
// would: the rotation with a token that carries docs/policies/operator.hcl,
// the render with one that carries only docs/policies/provisioner.hcl, one
// router of each family. Then:
//   - each rendered file holds the key the edge has for each tunnel, and the
//     tunnel's facts: with the keys replaced by placeholders and its header by
//     the Agent template's, it is the golden file the Agent template renders
//     to from the same tunnels (so the Jinja and Agent templates agree);
//   - neither Ansible's output nor its log (ANSIBLE_LOG_PATH) holds a key or a
//     token, at the default verbosity or at -vvv, and no file Ansible left
//     behind does;
//   - a render with a token that may not read the keys fails, naming the
//     tunnels and the policy, and writes nothing;
//   - --check rotates nothing and writes nothing;
//   - a rotation that fails is reported with Vault's reason, every router is
//     rendered all the same with the keys the edge uses, and the run fails.
func TestAnsiblePlaybookRotatesAndRenders(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, _ := newEdge(t)
	account := goldenAccount
	var ids []string
	for _, tun := range goldenTunnels() {
		ids = append(ids, sim.AddTunnel(account, tun).ID)
	}
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	operator, provisioner := policyTokens(t, v, secrets, account)

	work := t.TempDir()
	out := filepath.Join(work, "rendered")
	inventory := writeAnsibleInventory(t, work, account, ids, nil)

	// Rotation and render, as the example's usage says.
	tokens := []string{"CF_OPERATOR_TOKEN=" + operator, "VAULT_TOKEN=" + provisioner}
	run := runPlaybook(t, work, v.addr, tokens, "-i", inventory, "-e", "cf_render_dir="+out)
	placeholders := edgeKeyPlaceholders(t, sim, secrets, account, ids) // the new keys' base64 forms are secrets too
	checkAnsibleRun(t, secrets, "ansible-playbook", run)
	if run.code != 0 {
		t.Fatalf("ansible-playbook exited %d:\n%s", run.code, secrets.redact(run.output))
	}
	for _, id := range ids {
		// The key the tunnel was created with, and one rotation.
		if tun, _ := sim.Tunnel(account, id); len(tun.GeneratedPSKs) != 2 {
			t.Errorf("tunnel %s has had %d keys, want 2: the playbook rotates each tunnel once", id, len(tun.GeneratedPSKs))
		}
		if want := fmt.Sprintf("(item=cloudflare-ipsec/psk/%s/%s) => {\n    \"msg\": \"key version 1 (current)\"", account, id); !strings.Contains(run.output, want) {
			t.Errorf("the output does not report the rotation of %s (%q)", id, want)
		}
	}
	checkRendered := func(t *testing.T) {
		for _, r := range ansibleRouters {
			t.Run(r.family, func(t *testing.T) {
				dest := filepath.Join(out, r.host, r.file)
				info, err := os.Stat(dest)
				if err != nil {
					t.Fatalf("the playbook rendered nothing: %v", err)
				}
				if info.Mode().Perm() != 0o600 {
					t.Errorf("rendered with mode %v, want 0600: the file holds keys", info.Mode().Perm())
				}
				raw, err := os.ReadFile(dest)
				if err != nil {
					t.Fatal(err)
				}
				rendered := string(raw)
				for key, placeholder := range placeholders {
					rendered = strings.ReplaceAll(rendered, key, placeholder)
				}
				for _, tun := range goldenTunnels() {
					if !strings.Contains(rendered, "key of "+tun.Name+">") {
						t.Errorf("the file does not hold the edge's key of %s", tun.Name)
					}
				}
				if r.header != "" && strings.Count(rendered, r.header) != 1 {
					t.Fatalf("the file does not begin with the Jinja template's header %q", r.header)
				}
				rendered = strings.Replace(rendered, r.header, r.agentHeader, 1)
				golden := filepath.Join("testdata", "templates", r.agentTemplate+".golden")
				if !matchesGolden(t, secrets, golden, rendered) {
					t.Errorf("docs/examples/ansible/templates/%s.j2 and docs/examples/%s render differently from the same reads (the lines above)", r.file, r.agentTemplate)
				}
			})
		}
	}
	t.Run("rendered", checkRendered)

	// Render only, at -vvv: nothing rotates, the files stay as they are, and
	// the most Ansible prints holds no key.
	verbose := runPlaybook(t, work, v.addr, []string{"VAULT_TOKEN=" + provisioner}, "-i", inventory, "-e", "cf_render_dir="+out, "--tags", "render", "-vvv")
	checkAnsibleRun(t, secrets, "ansible-playbook --tags render -vvv", verbose)
	if verbose.code != 0 {
		t.Fatalf("ansible-playbook --tags render -vvv exited %d:\n%s", verbose.code, secrets.redact(verbose.output))
	}
	if strings.Contains(verbose.output, "Rotate each tunnel") {
		t.Error("--tags render ran the rotation")
	}
	t.Run("rendered again", checkRendered)

	// A token without the provisioner policy (the operator's may rotate, not
	// read): the render fails with a message that says what is missing, and
	// writes nothing.
	denied := filepath.Join(work, "denied")
	refused := runPlaybook(t, work, v.addr, []string{"VAULT_TOKEN=" + operator}, "-i", inventory, "-e", "cf_render_dir="+denied, "--tags", "render")
	checkAnsibleRun(t, secrets, "ansible-playbook with the operator's token", refused)
	if refused.code == 0 {
		t.Fatalf("the render succeeded with a token that may not read the keys:\n%s", secrets.redact(refused.output))
	}
	want := fmt.Sprintf("The token may not read the keys of tunnels %s under cloudflare-ipsec/psk/%s/ "+
		"(Vault gives its capabilities there as create, update): give it docs/policies/provisioner.hcl for account %s.",
		strings.Join(ids, ", "), account, account)
	if strings.Count(refused.output, want) != len(ansibleRouters) {
		t.Errorf("the refusal does not say, once for each of the %d routers, %q:\n%s", len(ansibleRouters), want, secrets.redact(refused.output))
	}
	if _, err := os.Stat(denied); !os.IsNotExist(err) {
		t.Errorf("the refused render created %s (%v)", denied, err)
	}
	for _, id := range ids {
		if tun, _ := sim.Tunnel(account, id); len(tun.GeneratedPSKs) != 2 {
			t.Errorf("tunnel %s has had %d keys after the renders, want 2: a render rotated", id, len(tun.GeneratedPSKs))
		}
	}

	// A dry run (--check) rotates nothing and writes nothing.
	dry := filepath.Join(work, "dry-run")
	checked := runPlaybook(t, work, v.addr, tokens, "-i", inventory, "-e", "cf_render_dir="+dry, "--check")
	checkAnsibleRun(t, secrets, "ansible-playbook --check", checked)
	if checked.code != 0 {
		t.Fatalf("ansible-playbook --check exited %d:\n%s", checked.code, secrets.redact(checked.output))
	}
	if strings.Count(checked.output, `"msg": "not rotated (check mode)"`) != len(ids) {
		t.Errorf("--check does not report each tunnel as not rotated:\n%s", secrets.redact(checked.output))
	}
	if _, err := os.Stat(dry); !os.IsNotExist(err) {
		t.Errorf("--check created %s (%v)", dry, err)
	}
	for _, id := range ids {
		if tun, _ := sim.Tunnel(account, id); len(tun.GeneratedPSKs) != 2 {
			t.Errorf("tunnel %s has had %d keys after --check, want 2: --check rotated", id, len(tun.GeneratedPSKs))
		}
	}

	// Rotation and render again, at -vvv: the rotation's part of the most
	// Ansible prints holds no key or token either.
	again := runPlaybook(t, work, v.addr, tokens, "-i", inventory, "-e", "cf_render_dir="+out, "-vvv")
	edgeKeyPlaceholders(t, sim, secrets, account, ids)
	checkAnsibleRun(t, secrets, "ansible-playbook -vvv", again)
	if again.code != 0 {
		t.Fatalf("ansible-playbook -vvv exited %d:\n%s", again.code, secrets.redact(again.output))
	}
	for _, id := range ids {
		if tun, _ := sim.Tunnel(account, id); len(tun.GeneratedPSKs) != 3 {
			t.Errorf("tunnel %s has had %d keys after the second rotation, want 3", id, len(tun.GeneratedPSKs))
		}
	}

	// A rotation that fails (Cloudflare answers 503, so the outcome is
	// unknown): the others are rotated, every router is rendered all the
	// same with the keys the edge uses, and the run fails naming the tunnel.
	sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 503, Errors: []cloudflaresim.Message{{Code: 1000, Message: "edge unavailable"}}})
	failed := filepath.Join(work, "after-failure")
	partial := runPlaybook(t, work, v.addr, tokens, "-i", inventory, "-e", "cf_render_dir="+failed)
	edgeKeyPlaceholders(t, sim, secrets, account, ids)
	checkAnsibleRun(t, secrets, "ansible-playbook with a failing rotation", partial)
	if partial.code == 0 {
		t.Errorf("the run succeeded although a rotation failed:\n%s", secrets.redact(partial.output))
	}
	first := "cloudflare-ipsec/psk/" + account + "/" + ids[0]
	for _, want := range []string{
		"(item=" + first + ") => {\n    \"msg\": \"not rotated: ",
		"edge unavailable",
		"Not rotated: " + first + " (see Report each rotation)",
	} {
		if !strings.Contains(partial.output, want) {
			t.Errorf("the output does not say %q:\n%s", want, secrets.redact(partial.output))
		}
	}
	for _, r := range ansibleRouters {
		raw, err := os.ReadFile(filepath.Join(failed, r.host, r.file))
		if err != nil {
			t.Errorf("%s: not rendered after the failed rotation: %v", r.family, err)
			continue
		}
		for _, id := range ids {
			tun, _ := sim.Tunnel(account, id)
			if !strings.Contains(string(raw), tun.PSK) && !strings.Contains(string(raw), base64.StdEncoding.EncodeToString([]byte(tun.PSK))) {
				t.Errorf("%s: the file does not hold the key the edge uses for %s", r.family, tun.Name)
			}
		}
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
	assertNoDataRace(t, v.log())
}

// TestAnsibleTemplatesCarryOrRefuseAnyKey renders every Jinja template of
// docs/examples/ansible with the playbook from reads whose key no Cloudflare
// answer could bring into Vault, as TestRouterTemplatesCarryOrRefuseAnyKey
// does for the Agent templates, and holds each to the same rule: carry the key
// exactly in the router's syntax, or refuse to render, and then the file is
// not written. The reads come from a KV mount (cf_mount) that holds what the
// engine's read returns with the key replaced.
func TestAnsibleTemplatesCarryOrRefuseAnyKey(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	tun := sim.AddTunnel(account, cloudflaresim.Tunnel{Name: "site_a_1", CustomerEndpoint: "198.51.100.7"})
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, apiToken.Value)
	v.mustVault(t, root, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+tun.ID)
	data, ok := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/psk/"+account+"/"+tun.ID)["data"].(map[string]any)
	if !ok {
		t.Fatal("the engine's read has no data")
	}
	v.mustVault(t, root, "secrets", "enable", "-path=anykey", "-version=1", "kv")
	// The KV mount is read with a token that carries the provisioner policy
	// for it, so that the playbook's capability check passes as it would.
	policy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "provisioner.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(v.dir, "anykey.hcl"), strings.ReplaceAll(strings.ReplaceAll(string(policy), "ACCOUNT_ID", account), "cloudflare-ipsec/", "anykey/"))
	v.mustVault(t, root, "policy", "write", "anykey-provisioner", filepath.Join(v.dir, "anykey.hcl"))
	reader := strings.TrimSpace(v.mustVault(t, root, "token", "create", "-policy=anykey-provisioner", "-field=token"))
	secrets.add(reader)

	work := t.TempDir()
	inventory := writeAnsibleInventory(t, work, account, []string{tun.ID}, map[string]any{"cf_mount": "anykey"})
	expect := anyKeyExpectations()
	for name, key := range anyKeys() {
		secrets.add(key)
		secrets.add(base64.StdEncoding.EncodeToString([]byte(key)))
		hostile := map[string]any{}
		for k, val := range data {
			hostile[k] = val
		}
		hostile["psk"] = key
		if status, _ := v.api(t, root, "PUT", "anykey/psk/"+account+"/"+tun.ID, hostile); status != 204 && status != 200 {
			t.Fatalf("write the key %q to KV: HTTP %d", name, status)
		}
		out := filepath.Join(work, strings.ReplaceAll(name, " ", "_"))
		run := runPlaybook(t, work, v.addr, []string{"VAULT_TOKEN=" + reader}, "-i", inventory, "-e", "cf_render_dir="+out, "--tags", "render")
		checkAnsibleRun(t, secrets, "ansible-playbook with "+name, run)
		for _, r := range ansibleRouters {
			t.Run(r.file+".j2 with "+name, func(t *testing.T) {
				want := expect[r.agentTemplate]
				rendered, readErr := os.ReadFile(filepath.Join(out, r.host, r.file))
				if !slices.Contains(want.carried, name) {
					if readErr == nil {
						t.Fatal("the template rendered a key it cannot carry")
					}
					// The template's own reason, which names the tunnel and
					// holds no key, and not a result hidden by no_log.
					if want := "fatal: [" + r.host + "]: FAILED! => {\"changed\": false, \"msg\": \"Not rendered: the key of tunnel " + tun.ID; !strings.Contains(run.output, want) {
						t.Errorf("the failed render of %s is not reported as %q:\n%s", r.host, want, ansibleFailures(secrets, run.output))
					}
					return
				}
				if readErr != nil {
					t.Fatalf("the template refused a key it can carry: %v\n%s", readErr, secrets.redact(run.output))
				}
				if strings.Contains(string(rendered), "intruder") {
					t.Error("the key's text reached the rendered file outside its quoting")
				}
				if got := want.decode(t, string(rendered)); got != key {
					t.Errorf("the rendered key is not the key read (%d characters, want %d)", len(got), len(key))
				}
			})
		}
	}
	assertNoSecretsIn(t, secrets, "the server log", v.log())
}

// requireAnsible fails the test, saying how to install it, when there is no
// ansible-playbook: `make test` installs it (scripts/install-ansible.sh).
func requireAnsible(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("ansible-playbook"); err != nil {
		t.Fatalf("no ansible-playbook on PATH (%v): `make test` installs Debian's ansible and python3-hvac (scripts/install-ansible.sh); elsewhere install Ansible with the community.hashi_vault collection and hvac", err)
	}
}

// policyTokens writes the operator and provisioner policies of docs/policies
// (the latter for account) and returns a token for each, as secrets.
func policyTokens(t *testing.T, v *vaultServer, secrets *secretSet, account string) (operator, provisioner string) {
	t.Helper()
	for _, name := range []string{"operator", "provisioner"} {
		policy, err := os.ReadFile(filepath.Join("..", "docs", "policies", name+".hcl"))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(v.dir, name+".hcl"), strings.ReplaceAll(string(policy), "ACCOUNT_ID", account))
		v.mustVault(t, v.rootToken, "policy", "write", "cf-ipsec-"+name, filepath.Join(v.dir, name+".hcl"))
	}
	create := func(policy string) string {
		tok := strings.TrimSpace(v.mustVault(t, v.rootToken, "token", "create", "-policy="+policy, "-ttl=30m", "-field=token"))
		if tok == "" {
			t.Fatalf("no token for %s", policy)
		}
		secrets.add(tok)
		return tok
	}
	return create("cf-ipsec-operator"), create("cf-ipsec-provisioner")
}

// writeAnsibleInventory writes an inventory of ansibleRouters in dir, every
// router with the same account and tunnels, and returns its path; extra are
// variables for all of them. JSON is YAML, which Ansible's inventory reads.
func writeAnsibleInventory(t *testing.T, dir, account string, ids []string, extra map[string]any) string {
	t.Helper()
	hosts := map[string]any{}
	for _, r := range ansibleRouters {
		hosts[r.host] = map[string]any{"cf_family": r.family}
	}
	vars := map[string]any{"cf_account_id": account, "cf_tunnel_ids": ids}
	for k, val := range extra {
		vars[k] = val
	}
	inv := map[string]any{"all": map[string]any{"children": map[string]any{
		"cf_routers": map[string]any{"hosts": hosts, "vars": vars},
	}}}
	b, err := json.MarshalIndent(inv, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "inventory.json")
	writeFile(t, path, string(b))
	return path
}

// ansibleRun is one ansible-playbook run.
type ansibleRun struct {
	output string // stdout and stderr, as a terminal shows them
	log    string // what ANSIBLE_LOG_PATH received
	home   string // HOME and every directory Ansible writes to
	code   int
}

// runPlaybook runs docs/examples/ansible/playbook.yml in a clean environment:
// HOME, Ansible's configuration, temporary directories and log in a fresh
// directory under dir, nothing of the caller's ANSIBLE_, VAULT_ or PYTHON
// variables, no retry files. tokens are NAME=value pairs for the environment,
// where the example takes its tokens from: never on the command line.
func runPlaybook(t *testing.T, dir, vaultAddr string, tokens []string, args ...string) ansibleRun {
	t.Helper()
	playbook, err := filepath.Abs(filepath.Join("..", "docs", "examples", "ansible", "playbook.yml"))
	if err != nil {
		t.Fatal(err)
	}
	home, err := os.MkdirTemp(dir, "ansible-home-")
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(home, "ansible.cfg")
	writeFile(t, config, "# Every setting comes from the environment (e2e/ansible_test.go).\n")
	logPath := filepath.Join(home, "ansible.log")
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "ANSIBLE_") || strings.HasPrefix(name, "VAULT_") || strings.HasPrefix(name, "PYTHON") ||
			strings.HasPrefix(name, "CF_") || name == "HOME" || name == "LANG" || strings.HasPrefix(name, "LC_") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env,
		"HOME="+home,
		"LC_ALL=C.UTF-8", // Ansible refuses a locale that is not UTF-8
		"ANSIBLE_CONFIG="+config,
		"ANSIBLE_LOG_PATH="+logPath,
		"ANSIBLE_LOCAL_TEMP="+filepath.Join(home, "tmp"),
		"ANSIBLE_REMOTE_TEMP="+filepath.Join(home, "remote-tmp"),
		"ANSIBLE_RETRY_FILES_ENABLED=false",
		"ANSIBLE_NOCOLOR=1",
		"ANSIBLE_LOCALHOST_WARNING=false",
		"ANSIBLE_STDOUT_CALLBACK=default",
		"VAULT_ADDR="+vaultAddr,
	)
	env = append(env, tokens...)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ansible-playbook", append(args, playbook)...)
	cmd.Dir = home
	cmd.Env = env
	var output bytes.Buffer
	cmd.Stdout, cmd.Stderr = &output, &output
	err = cmd.Run()
	run := ansibleRun{output: output.String(), home: home}
	if exitErr, ok := err.(*exec.ExitError); ok {
		run.code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("run ansible-playbook: %v", err)
	}
	if b, err := os.ReadFile(logPath); err == nil {
		run.log = string(b)
	}
	return run
}

// checkAnsibleRun fails if a secret appears in a run's output, in its log or
// in any file under its home (configuration, temporary files, caches), and if
// the log is missing: a check of an empty log would prove nothing.
func checkAnsibleRun(t *testing.T, secrets *secretSet, what string, run ansibleRun) {
	t.Helper()
	assertNoSecretsIn(t, secrets, what+"'s output", run.output)
	if !strings.Contains(run.log, "PLAY RECAP") {
		t.Errorf("%s wrote no log to ANSIBLE_LOG_PATH (%d bytes)", what, len(run.log))
	}
	assertNoSecretsIn(t, secrets, what+"'s log", run.log)
	err := filepath.WalkDir(run.home, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		assertNoSecretsIn(t, secrets, what+"'s file "+strings.TrimPrefix(path, run.home), string(b))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestAnsibleRendersOutsideTheCheckoutByDefault: without cf_render_dir, the
// files, which hold keys, go to ~/.cache/cf-ipsec/rendered/<host>/ on the
// host running Ansible: outside the playbook's directory, which is in a
// checkout (this repository's, or the site's own that it is copied into),
// where git add -A would take them. Each router's directory is 0700 and
// each file 0600.
func TestAnsibleRendersOutsideTheCheckoutByDefault(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	id := sim.AddTunnel(account, ansibleTunnel("site_a_1", 1)).ID
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	v.mustVault(t, v.rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+id)
	_, provisioner := policyTokens(t, v, secrets, account)
	edgeKeyPlaceholders(t, sim, secrets, account, []string{id})

	example := filepath.Join("..", "docs", "examples", "ansible")
	files := func() map[string]bool {
		found := map[string]bool{}
		err := filepath.WalkDir(example, func(path string, d fs.DirEntry, err error) error {
			found[path] = true
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return found
	}
	before := files()
	work := t.TempDir()
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: account, tunnels: []string{id}},
	})
	run := runPlaybook(t, work, v.addr, []string{"VAULT_TOKEN=" + provisioner}, "-i", inventory, "--tags", "render")
	for path := range files() {
		if !before[path] {
			t.Errorf("the render wrote %s, in the playbook's directory", path)
			_ = os.RemoveAll(path) // it may hold a key
		}
	}
	if run.code != 0 {
		t.Fatalf("ansible-playbook exited %d:\n%s", run.code, ansibleFailures(secrets, run.output))
	}
	root := filepath.Join(run.home, ".cache", "cf-ipsec")
	dest := filepath.Join(root, "rendered", "branch-1", "swanctl.conf")
	raw, err := os.ReadFile(dest)
	if err != nil {
		t.Fatalf("the render wrote nothing to ~/.cache/cf-ipsec/rendered/branch-1: %v", err)
	}
	if !holdsEdgeKey(sim, account, id, string(raw)) {
		t.Error("the file does not hold the edge's key")
	}
	for path, want := range map[string]fs.FileMode{dest: 0o600, filepath.Dir(dest): 0o700} {
		if info, err := os.Stat(path); err != nil {
			t.Error(err)
		} else if info.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", path, info.Mode().Perm(), want)
		}
	}
	// The file holds a key, and checkAnsibleRun looks for keys in every
	// file of Ansible's home: the render is checked above.
	if err := os.RemoveAll(root); err != nil {
		t.Fatal(err)
	}
	checkAnsibleRun(t, secrets, "ansible-playbook --tags render", run)
}

// TestAnsibleSaysWhyVaultDidNotAnswer: with VAULT_ADDR naming a port where
// nothing listens (a typo, a Vault that is down), the capability check, the
// first task that calls Vault, fails in the module with a traceback that
// Ansible hides under no_log. The run must refuse every router before
// rotating anything, and say why in words an operator can act on (the
// exception's last line), not "MODULE FAILURE".
func TestAnsibleSaysWhyVaultDidNotAnswer(t *testing.T) {
	requireAnsible(t)
	secrets := &secretSet{}
	token := "hvs.CAESIJustATokenNoVaultHasSeen0123456789abcdef"
	secrets.add(token)
	account, tunnel := cloudflaresim.NewID(), cloudflaresim.NewID()
	work := t.TempDir()
	out := filepath.Join(work, "rendered")
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: account, tunnels: []string{tunnel}},
	})
	run := runPlaybook(t, work, "http://127.0.0.1:1", []string{"CF_OPERATOR_TOKEN=" + token, "VAULT_TOKEN=" + token},
		"-i", inventory, "-e", "cf_render_dir="+out)
	checkAnsibleRun(t, secrets, "ansible-playbook with Vault unreachable", run)
	if run.code == 0 {
		t.Fatal("the run succeeded with Vault unreachable")
	}
	if strings.Contains(run.output, "Rotate each tunnel") && !strings.Contains(run.output, "TASK [Rotate each tunnel (the write answers without the key)] ******************\nskipping: [branch-1]") {
		t.Errorf("the run tried to rotate although it could not check the router:\n%s", ansibleFailures(secrets, run.output))
	}
	want := "Refused, so none of its tunnels was rotated and it was not rendered: Vault did not say what VAULT_TOKEN may do with its tunnels: requests.exceptions.ConnectionError: "
	if !strings.Contains(run.output, want) {
		t.Errorf("the output does not say %q:\n%s", want, ansibleFailures(secrets, run.output))
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("the run created %s (%v)", out, err)
	}
}

// ansibleHost is one router of an inventory written by writeAnsibleHosts.
type ansibleHost struct {
	name, family, account string
	tunnels               []string
	extra                 map[string]any
}

// writeAnsibleHosts writes an inventory where each router has its own
// account and variables, and returns its path. Hosts keep the given order
// (the inventory is built by hand: encoding/json would sort them).
func writeAnsibleHosts(t *testing.T, dir string, hosts []ansibleHost) string {
	t.Helper()
	var parts []string
	for _, h := range hosts {
		vars := map[string]any{"cf_family": h.family, "cf_account_id": h.account, "cf_tunnel_ids": h.tunnels}
		for k, v := range h.extra {
			vars[k] = v
		}
		b, err := json.Marshal(vars)
		if err != nil {
			t.Fatal(err)
		}
		parts = append(parts, fmt.Sprintf("%q: %s", h.name, b))
	}
	inv := `{"all": {"children": {"cf_routers": {"hosts": {` + strings.Join(parts, ", ") + `}}}}}`
	path := filepath.Join(dir, "inventory.json")
	writeFile(t, path, inv)
	return path
}

// ansibleTunnel is a tunnel with the facts every template needs; n sets its
// inside address apart from the others'.
func ansibleTunnel(name string, n int) cloudflaresim.Tunnel {
	return cloudflaresim.Tunnel{Name: name, CloudflareEndpoint: "162.159.66.1", CustomerEndpoint: "198.51.100.7",
		InterfaceAddress: fmt.Sprintf("10.252.2.%d/31", 2*n)}
}

// ansibleFailures is every line of a run's output that says a task failed,
// redacted, for a test's own messages.
func ansibleFailures(secrets *secretSet, output string) string {
	var out []string
	for _, line := range strings.Split(output, "\n") {
		if strings.Contains(line, "fatal:") || strings.Contains(line, "FAILED!") {
			out = append(out, secrets.redact(line))
		}
	}
	return strings.Join(out, "\n")
}

// holdsEdgeKey tells whether a rendered file holds the key the edge uses for
// the tunnel, as is or in base64 (strongSwan, VyOS).
func holdsEdgeKey(sim *cloudflaresim.Server, account, id, rendered string) bool {
	tun, _ := sim.Tunnel(account, id)
	return strings.Contains(rendered, tun.PSK) || strings.Contains(rendered, base64.StdEncoding.EncodeToString([]byte(tun.PSK)))
}

// generatedKeys is how many keys the edge has made for the tunnel.
func generatedKeys(sim *cloudflaresim.Server, account, id string) int {
	tun, _ := sim.Tunnel(account, id)
	return len(tun.GeneratedPSKs)
}

// TestAnsibleRefusesARouterBeforeRotatingAnything: every check that can
// refuse a router runs before anything is rotated. A router whose keys the
// render's token may not read (its account is not the provisioner policy's:
// docs/policies/provisioner.hcl is per account, the operator's policy covers
// them all) and one with a misspelt cf_family are refused: none of their
// tunnels is rotated (a tunnel rotated for a router that gets no
// configuration is down), the run fails saying why for each, and the other
// routers are rotated and rendered. A tunnel that an accepted router shares
// with a refused one is held back, for the refused one's sake.
//
// Before the fix (the review's TestReview17AnsibleRotatesTunnelsOfRoutersItThenRefusesToRender),
// the checks ran in the render play, after the rotation:
//
//	tunnel ... of branch-2 (account not covered by the provisioner token): rotated (the edge has had 2 keys) but branch-2/vyos.vbash was not rendered: ...
//	tunnel ... of branch-3 (cf_family "iosxe", misspelt): rotated (the edge has had 2 keys) but branch-3/ios-xe.cfg was not rendered: ...
func TestAnsibleRefusesARouterBeforeRotatingAnything(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, accountA := newEdge(t)
	accountB := cloudflaresim.NewID()
	a1 := sim.AddTunnel(accountA, ansibleTunnel("site_a_1", 1)).ID
	b1 := sim.AddTunnel(accountB, ansibleTunnel("site_b_1", 2)).ID
	a2 := sim.AddTunnel(accountA, ansibleTunnel("site_c_1", 3)).ID
	shared := sim.AddTunnel(accountA, ansibleTunnel("site_c_2", 4)).ID
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	// The shared tunnel is in service: Vault holds its key.
	v.mustVault(t, v.rootToken, "write", "-f", "cloudflare-ipsec/psk/"+accountA+"/"+shared)
	operator, provisioner := policyTokens(t, v, secrets, accountA)
	before := map[string]int{}
	for _, id := range []string{a1, a2, shared} {
		before[id] = generatedKeys(sim, accountA, id)
	}
	before[b1] = generatedKeys(sim, accountB, b1)

	work := t.TempDir()
	out := filepath.Join(work, "rendered")
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: accountA, tunnels: []string{a1, shared}},
		{name: "branch-2", family: "vyos", account: accountB, tunnels: []string{b1}},
		{name: "branch-3", family: "iosxe", account: accountA, tunnels: []string{a2, shared}},
	})
	run := runPlaybook(t, work, v.addr, []string{"CF_OPERATOR_TOKEN=" + operator, "VAULT_TOKEN=" + provisioner},
		"-i", inventory, "-e", "cf_render_dir="+out)
	edgeKeyPlaceholders(t, sim, secrets, accountA, []string{a1, a2, shared})
	edgeKeyPlaceholders(t, sim, secrets, accountB, []string{b1})
	checkAnsibleRun(t, secrets, "ansible-playbook", run)
	if run.code == 0 {
		t.Errorf("the run succeeded although two routers cannot be rendered")
	}
	for _, c := range []struct {
		host, why, account, tunnel, file string
		rotated                          bool
	}{
		{"branch-1", "a router the run can render", accountA, a1, "swanctl.conf", true},
		{"branch-1", "shared with branch-3, which is refused", accountA, shared, "swanctl.conf", false},
		{"branch-2", "account not covered by the provisioner token", accountB, b1, "vyos.vbash", false},
		{"branch-3", `cf_family "iosxe", misspelt`, accountA, a2, "ios-xe.cfg", false},
	} {
		if got := generatedKeys(sim, c.account, c.tunnel) > before[c.tunnel]; got != c.rotated {
			t.Errorf("tunnel %s of %s (%s): rotated %v, want %v", c.tunnel, c.host, c.why, got, c.rotated)
		}
		raw, err := os.ReadFile(filepath.Join(out, c.host, c.file))
		switch {
		case c.host == "branch-1" && err != nil:
			t.Errorf("branch-1 was not rendered: %v", err)
		case c.host == "branch-1" && !holdsEdgeKey(sim, c.account, c.tunnel, string(raw)):
			t.Errorf("branch-1/swanctl.conf does not hold the edge's key of %s (%s)", c.tunnel, c.why)
		case c.host != "branch-1" && err == nil:
			t.Errorf("%s (%s) was rendered", c.host, c.why)
		}
	}
	for _, want := range []string{
		"fatal: [branch-2]: FAILED! => {\"changed\": false, \"msg\": \"Refused, so none of its tunnels was rotated and it was not rendered: " +
			"The token may not read the keys of tunnels " + b1 + " under cloudflare-ipsec/psk/" + accountB + "/ (Vault gives its capabilities there as deny): " +
			"give it docs/policies/provisioner.hcl for account " + accountB + ".\"}",
		"fatal: [branch-3]: FAILED! => {\"changed\": false, \"msg\": \"Refused, so none of its tunnels was rotated and it was not rendered: " +
			"cf_family is \\\"iosxe\\\", not one of strongswan, vyos, ios-xe, junos.\"}",
		"fatal: [branch-1]: FAILED! => {\"changed\": false, \"msg\": \"Not rotated: cloudflare-ipsec/psk/" + accountA + "/" + shared +
			" (branch-1 shares it with branch-3, which this run refuses (see its report): rotated, it would leave them with the old key; run with every router that shares it).\"}",
	} {
		if !strings.Contains(run.output, want) {
			t.Errorf("the output does not say\n%s\nthe run's failures:\n%s", want, ansibleFailures(secrets, run.output))
		}
	}
}

// TestAnsibleRotatesEachRouterOnItsOwnMount: cf_mount is a router's
// variable, and each router's tunnels are rotated, and read, on its own
// mount. A site with a mount per Cloudflare account (or per team) runs one
// playbook over all of them.
//
// Before the fix (the review's TestReview17AnsibleRotatesEveryRouterOnTheFirstRoutersMount),
// the rotation built every path with the first router's mount:
//
//	the router's mount cf-b was not written: its key version is 1, want 2 ...
//	cf-b says current for a key the edge no longer uses (the edge has had 3 keys)
//	branch-2/vyos.vbash does not hold the key the edge uses for its tunnel: the router is down
//	the first router's mount cloudflare-ipsec now holds account ...'s tunnel ... too (HTTP 200)
func TestAnsibleRotatesEachRouterOnItsOwnMount(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, accountA := newEdge(t)
	accountB := cloudflaresim.NewID()
	a1 := sim.AddTunnel(accountA, ansibleTunnel("site_a_1", 1)).ID
	b1 := sim.AddTunnel(accountB, ansibleTunnel("site_b_1", 2)).ID
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, apiToken.Value)
	// A second mount; the same simulator serves both accounts.
	v.mustVault(t, root, "secrets", "enable", "-path=cf-b", pluginName)
	v.mustVault(t, root, "write", "cf-b/config", "api_token="+apiToken.Value, "base_url="+baseURL, "request_timeout=5s")
	// Each router's tunnel is managed by its own mount: one rotation each.
	v.mustVault(t, root, "write", "-f", "cloudflare-ipsec/psk/"+accountA+"/"+a1)
	v.mustVault(t, root, "write", "-f", "cf-b/psk/"+accountB+"/"+b1)

	// One token that may rotate and read on both mounts: the test is about
	// which mount the playbook writes, not about least privilege.
	writeFile(t, filepath.Join(v.dir, "both.hcl"), `
path "cloudflare-ipsec/psk/*" { capabilities = ["create", "update", "read"] }
path "cf-b/psk/*" { capabilities = ["create", "update", "read"] }
`)
	v.mustVault(t, root, "policy", "write", "both-mounts", filepath.Join(v.dir, "both.hcl"))
	token := strings.TrimSpace(v.mustVault(t, root, "token", "create", "-policy=both-mounts", "-ttl=30m", "-field=token"))
	secrets.add(token)

	work := t.TempDir()
	out := filepath.Join(work, "rendered")
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: accountA, tunnels: []string{a1}},
		{name: "branch-2", family: "vyos", account: accountB, tunnels: []string{b1}, extra: map[string]any{"cf_mount": "cf-b"}},
	})
	run := runPlaybook(t, work, v.addr, []string{"CF_OPERATOR_TOKEN=" + token, "VAULT_TOKEN=" + token},
		"-i", inventory, "-e", "cf_render_dir="+out)
	edgeKeyPlaceholders(t, sim, secrets, accountA, []string{a1})
	edgeKeyPlaceholders(t, sim, secrets, accountB, []string{b1})
	checkAnsibleRun(t, secrets, "ansible-playbook", run)
	if run.code != 0 {
		t.Fatalf("ansible-playbook exited %d:\n%s", run.code, ansibleFailures(secrets, run.output))
	}

	read := v.mustVaultJSON(t, root, "read", "cf-b/psk/"+accountB+"/"+b1)
	data, _ := read["data"].(map[string]any)
	tun, _ := sim.Tunnel(accountB, b1)
	if version, _ := data["version"].(float64); version != 2 {
		t.Errorf("the router's mount cf-b was not written: its key version is %v, want 2 (one rotation by the playbook)", data["version"])
	}
	if data["state"] == "current" && data["psk"] != tun.PSK {
		t.Errorf("cf-b says current for a key the edge no longer uses (the edge has had %d keys)", len(tun.GeneratedPSKs))
	}
	raw, err := os.ReadFile(filepath.Join(out, "branch-2", "vyos.vbash"))
	if err != nil {
		t.Fatalf("branch-2 was not rendered: %v", err)
	}
	if !holdsEdgeKey(sim, accountB, b1, string(raw)) {
		t.Errorf("branch-2/vyos.vbash does not hold the key the edge uses for its tunnel: the router is down")
	}
	if status, _ := v.api(t, root, "GET", "cloudflare-ipsec/psk/"+accountB+"/"+b1, nil); status != 404 {
		t.Errorf("the first router's mount cloudflare-ipsec now holds account %s's tunnel %s too (HTTP %d)", accountB, b1, status)
	}
	if n := generatedKeys(sim, accountA, a1); n != 3 {
		t.Errorf("branch-1's tunnel has had %d keys, want 3 (created, written before, rotated by the run)", n)
	}
}

// TestAnsibleRendersARouterWithoutATunnelVaultHasNoKeyFor: a tunnel added
// to a router, whose first rotation fails (Cloudflare answers 503), has no
// key in Vault, and its read fails (404). The router's other tunnel, rotated
// by the same run, must still reach the router: the file is rendered
// without the new tunnel, the other tunnel keeps its number (its position
// in cf_tunnel_ids: cf2 here, as in a full render, so that nothing on the
// router is renamed), and the run fails saying so.
//
// Before the fix (the review's TestReview17AnsibleFailedFirstRotationLeavesTheRoutersOtherTunnelsDown),
// the failed read failed the whole render, under no_log:
//
//	tunnel ... was rotated by the run (the edge has had 3 keys) but branch-1/swanctl.conf was not rendered: ...
//	fatal: [branch-1 -> localhost]: FAILED! => {"censored": "the output has been hidden due to the fact that 'no_log: true' was specified for this result"}
func TestAnsibleRendersARouterWithoutATunnelVaultHasNoKeyFor(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	added := sim.AddTunnel(account, ansibleTunnel("site_a_2", 2)).ID
	old := sim.AddTunnel(account, ansibleTunnel("site_a_1", 1)).ID
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	v.mustVault(t, v.rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+old)
	operator, provisioner := policyTokens(t, v, secrets, account)

	work := t.TempDir()
	out := filepath.Join(work, "rendered")
	// The new tunnel is listed first, so its rotation is the run's first
	// psk_generate, the one that fails.
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: account, tunnels: []string{added, old}},
	})
	sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 503, Errors: []cloudflaresim.Message{{Code: 1000, Message: "edge unavailable"}}})
	run := runPlaybook(t, work, v.addr, []string{"CF_OPERATOR_TOKEN=" + operator, "VAULT_TOKEN=" + provisioner},
		"-i", inventory, "-e", "cf_render_dir="+out)
	edgeKeyPlaceholders(t, sim, secrets, account, []string{added, old})
	checkAnsibleRun(t, secrets, "ansible-playbook", run)

	if n := generatedKeys(sim, account, old); n != 3 {
		t.Fatalf("the tunnel Vault held has had %d keys, want 3 (created, written before, rotated by the run)", n)
	}
	if status, _ := v.api(t, v.rootToken, "GET", "cloudflare-ipsec/psk/"+account+"/"+added, nil); status != 404 {
		t.Fatalf("Vault answers the new tunnel's read with HTTP %d, want 404: the test no longer makes a tunnel Vault holds no key for", status)
	}
	raw, err := os.ReadFile(filepath.Join(out, "branch-1", "swanctl.conf"))
	if err != nil {
		t.Fatalf("tunnel %s was rotated by the run but branch-1/swanctl.conf was not rendered: the router keeps its old key (%v)", old, err)
	}
	rendered := string(raw)
	if !holdsEdgeKey(sim, account, old, rendered) {
		t.Errorf("branch-1/swanctl.conf does not hold the edge's key of %s", old)
	}
	if strings.Contains(rendered, added) || strings.Contains(rendered, "cf1 {") {
		t.Errorf("branch-1/swanctl.conf holds the tunnel Vault has no key for, or gives its number to another:\n%s", secrets.redact(rendered))
	}
	if !strings.Contains(rendered, "  cf2 {") || !strings.Contains(rendered, "tunnel "+old) {
		t.Errorf("branch-1/swanctl.conf does not keep %s as cf2, its number in a full render:\n%s", old, secrets.redact(rendered))
	}
	if run.code == 0 {
		t.Error("the run succeeded although a tunnel was left out of a router's file")
	}
	want := "Rendered WITHOUT tunnel " + added + ": Vault holds no key for it"
	if !strings.Contains(run.output, want) {
		t.Errorf("the output does not say %q; the run's failures:\n%s", want, ansibleFailures(secrets, run.output))
	}
	if strings.Contains(run.output, "censored") && strings.Contains(run.output, "fatal: [branch-1 -> localhost]") {
		t.Errorf("a task failed under no_log, saying nothing:\n%s", ansibleFailures(secrets, run.output))
	}
}

// TestAnsibleFailsAFailedRotationWhateverTheTags: the run fails after a
// failed rotation when it only rotates, whichever way it is told to:
// --skip-tags render and --tags rotate. The last tasks carry the tag always.
//
// Before the fix (the review's TestReview17AnsibleSkipTagsRenderExitsZeroAfterAFailedRotation),
// the check sat in the render play, skipped with it:
//
//	ansible-playbook --skip-tags render exited 0 although the rotation of ... failed (the report says "not rotated: ...")
func TestAnsibleFailsAFailedRotationWhateverTheTags(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	id := sim.AddTunnel(account, ansibleTunnel("site_a_1", 1)).ID
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	operator, _ := policyTokens(t, v, secrets, account)

	work := t.TempDir()
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: account, tunnels: []string{id}},
	})
	for _, tags := range [][]string{{"--skip-tags", "render"}, {"--tags", "rotate"}} {
		sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Status: 503, Errors: []cloudflaresim.Message{{Code: 1000, Message: "edge unavailable"}}})
		// Without VAULT_TOKEN: a run that only rotates needs only the operator's.
		run := runPlaybook(t, work, v.addr, []string{"CF_OPERATOR_TOKEN=" + operator}, append([]string{"-i", inventory}, tags...)...)
		what := "ansible-playbook " + strings.Join(tags, " ")
		checkAnsibleRun(t, secrets, what, run)
		if !strings.Contains(run.output, `"msg": "not rotated: `) {
			t.Fatalf("%s: the rotation did not fail as the test meant it to:\n%s", what, secrets.redact(run.output))
		}
		if run.code == 0 {
			t.Errorf("%s exited 0 although the rotation of %s failed", what, id)
		}
		if want := "Not rotated: cloudflare-ipsec/psk/" + account + "/" + id + " (see Report each rotation)."; !strings.Contains(run.output, want) {
			t.Errorf("%s: the output does not say %q:\n%s", what, want, ansibleFailures(secrets, run.output))
		}
	}
}

// TestAnsibleStripsATokensLineBreak: a VAULT_TOKEN that ends in a line break
// (a Kubernetes secret made from a file, a CI variable pasted with one) is
// stripped before any module takes it, and the render works. A token with a
// space or a line break inside is refused, without being shown. No task
// handles a token outside no_log (TestAnsiblePlaybookHandlesKeysAndTokensUnderNoLog).
//
// Before the fix (the review's TestReview17AnsibleTokenWithATrailingNewlineIsPrinted),
// the capability check, which ran without no_log, crashed in http.client
// and Ansible printed the traceback, token included:
//
//	a secret (95 characters) appears in ansible-playbook --tags render's output
//	a secret (95 characters) appears in ansible-playbook --tags render's log
//	    ... ValueError: Invalid header value b'[REDACTED]\\n'\n", ..., "msg": "MODULE FAILURE ...
func TestAnsibleStripsATokensLineBreak(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	id := sim.AddTunnel(account, ansibleTunnel("site_a_1", 1)).ID
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	v.mustVault(t, v.rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+id)
	_, provisioner := policyTokens(t, v, secrets, account)
	edgeKeyPlaceholders(t, sim, secrets, account, []string{id})

	work := t.TempDir()
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: account, tunnels: []string{id}},
	})
	for _, c := range []struct {
		what, token string
		refused     bool
	}{
		{"a line break at the end", provisioner + "\n", false},
		{"white space at both ends", " \t" + provisioner + "\r\n", false},
		{"a line break inside", provisioner[:6] + "\n" + provisioner[6:], true},
		{"a space inside", provisioner[:6] + " " + provisioner[6:], true},
	} {
		t.Run(c.what, func(t *testing.T) {
			for _, part := range strings.Fields(c.token) {
				secrets.add(part) // what a message could show of a broken token
			}
			out := filepath.Join(work, strings.ReplaceAll(c.what, " ", "_"))
			run := runPlaybook(t, work, v.addr, []string{"VAULT_TOKEN=" + c.token}, "-i", inventory, "-e", "cf_render_dir="+out, "--tags", "render")
			checkAnsibleRun(t, secrets, "ansible-playbook --tags render", run)
			_, err := os.Stat(filepath.Join(out, "branch-1", "swanctl.conf"))
			switch {
			case !c.refused && (run.code != 0 || err != nil):
				t.Errorf("the render failed (exit %d, %v):\n%s", run.code, err, ansibleFailures(secrets, run.output))
			case c.refused && (run.code == 0 || err == nil):
				t.Errorf("the render took the token (exit %d)", run.code)
			case c.refused && !strings.Contains(run.output, "VAULT_TOKEN holds a space or a character that is not printable ASCII, which no Vault token has"):
				t.Errorf("the refusal does not say what is wrong:\n%s", ansibleFailures(secrets, run.output))
			}
		})
	}
}

// TestAnsibleDiffShowsNoKey: the playbook says a key is hidden "at any
// verbosity, even with --diff", where the template module returns the file's
// old and new text. A first render (the diff of a new file is all of it), a
// render after a rotation, and --check --diff, each at -vvv: no key or token
// in the output, the log or Ansible's files (no_log censors the diff).
// (From the review of issue 17; it held before the fixes.)
func TestAnsibleDiffShowsNoKey(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	var ids []string
	for i, tun := range goldenTunnels() {
		ids = append(ids, sim.AddTunnel(account, ansibleTunnel(tun.Name, i+1)).ID)
	}
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	operator, provisioner := policyTokens(t, v, secrets, account)
	for _, id := range ids {
		v.mustVault(t, v.rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+id)
	}
	work := t.TempDir()
	out := filepath.Join(work, "rendered")
	inventory := writeAnsibleInventory(t, work, account, ids, nil)
	tokens := []string{"CF_OPERATOR_TOKEN=" + operator, "VAULT_TOKEN=" + provisioner}
	for _, args := range [][]string{
		{"--tags", "render", "--diff", "-vvv"},
		{"--diff", "-vvv"},
		{"--check", "--diff", "-vvv"},
	} {
		run := runPlaybook(t, work, v.addr, tokens, append([]string{"-i", inventory, "-e", "cf_render_dir=" + out}, args...)...)
		edgeKeyPlaceholders(t, sim, secrets, account, ids)
		what := "ansible-playbook " + strings.Join(args, " ")
		checkAnsibleRun(t, secrets, what, run)
		if run.code != 0 {
			t.Fatalf("%s exited %d:\n%s", what, run.code, ansibleFailures(secrets, run.output))
		}
	}
}

// TestAnsibleCapabilityCheckNamesTheOneUnreadableTunnel: TestAnsiblePlaybookRotatesAndRenders
// refuses a token that may read none of the tunnels. Here the token may
// read one tunnel of a router's two (a policy for that path, and one that
// denies the other explicitly under a glob that allows it): the check names
// only the other, the router is not rendered, and nothing is written. (From
// the review of issue 17; it held before the fixes.)
func TestAnsibleCapabilityCheckNamesTheOneUnreadableTunnel(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	readable := sim.AddTunnel(account, ansibleTunnel("site_a_1", 1)).ID
	hidden := sim.AddTunnel(account, ansibleTunnel("site_a_2", 2)).ID
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, apiToken.Value)
	for _, id := range []string{readable, hidden} {
		v.mustVault(t, root, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+id)
	}
	for name, policy := range map[string]string{
		"one-path": fmt.Sprintf(`path "cloudflare-ipsec/psk/%s/%s" { capabilities = ["read"] }`, account, readable),
		"glob-but-deny": fmt.Sprintf(`path "cloudflare-ipsec/psk/%s/*" { capabilities = ["read"] }
path "cloudflare-ipsec/psk/%s/%s" { capabilities = ["deny"] }`, account, account, hidden),
	} {
		t.Run(name, func(t *testing.T) {
			writeFile(t, filepath.Join(v.dir, name+".hcl"), policy)
			v.mustVault(t, root, "policy", "write", name, filepath.Join(v.dir, name+".hcl"))
			token := strings.TrimSpace(v.mustVault(t, root, "token", "create", "-policy="+name, "-ttl=30m", "-field=token"))
			secrets.add(token)
			work := t.TempDir()
			out := filepath.Join(work, "rendered")
			inventory := writeAnsibleHosts(t, work, []ansibleHost{
				{name: "branch-1", family: "strongswan", account: account, tunnels: []string{readable, hidden}},
			})
			run := runPlaybook(t, work, v.addr, []string{"VAULT_TOKEN=" + token}, "-i", inventory, "-e", "cf_render_dir="+out, "--tags", "render")
			edgeKeyPlaceholders(t, sim, secrets, account, []string{readable, hidden})
			checkAnsibleRun(t, secrets, "ansible-playbook --tags render", run)
			if run.code == 0 {
				t.Fatal("the render succeeded with a token that may not read one of the router's tunnels")
			}
			want := fmt.Sprintf("The token may not read the keys of tunnels %s under cloudflare-ipsec/psk/%s/ (Vault gives its capabilities there as deny)", hidden, account)
			if !strings.Contains(run.output, want) {
				t.Errorf("the refusal does not say %q:\n%s", want, ansibleFailures(secrets, run.output))
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("the refused render created %s (%v)", out, err)
			}
		})
	}
}

// TestAnsibleHoldsBackATunnelSharedWithARouterOutsideTheLimit: two routers
// share a tunnel (a pair with one configuration). Run with --limit to one
// of them (Ansible's everyday way to work on one router), the playbook does
// not rotate the shared tunnel: rotated, it would leave the other router,
// which the run does not render, with the old key. Rendering a router
// outside the limit would not do either: --limit says which routers the run
// may touch. The run says which tunnel it held back and for which router,
// renders the router it was given with the key the edge uses, and fails.
//
// Before the fix (the review's TestReview17AnsibleLimitRotatesATunnelItsOtherRouterDoesNotGet):
//
//	--limit branch-1 rotated tunnel ..., which branch-2 (outside the limit) also uses, and branch-2 was not rendered: it keeps the old key
func TestAnsibleHoldsBackATunnelSharedWithARouterOutsideTheLimit(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	shared := sim.AddTunnel(account, ansibleTunnel("site_a_1", 1)).ID
	own := sim.AddTunnel(account, ansibleTunnel("site_a_2", 2)).ID
	v := startDevServer(t, secrets)
	v.mountEngine(t, baseURL, apiToken.Value)
	for _, id := range []string{shared, own} {
		v.mustVault(t, v.rootToken, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+id)
	}
	operator, provisioner := policyTokens(t, v, secrets, account)

	work := t.TempDir()
	out := filepath.Join(work, "rendered")
	inventory := writeAnsibleHosts(t, work, []ansibleHost{
		{name: "branch-1", family: "strongswan", account: account, tunnels: []string{shared, own}},
		{name: "branch-2", family: "strongswan", account: account, tunnels: []string{shared}},
	})
	run := runPlaybook(t, work, v.addr, []string{"CF_OPERATOR_TOKEN=" + operator, "VAULT_TOKEN=" + provisioner},
		"-i", inventory, "-e", "cf_render_dir="+out, "--limit", "branch-1")
	edgeKeyPlaceholders(t, sim, secrets, account, []string{shared, own})
	checkAnsibleRun(t, secrets, "ansible-playbook --limit branch-1", run)
	if n := generatedKeys(sim, account, shared); n != 2 {
		t.Errorf("--limit branch-1 rotated tunnel %s, which branch-2 (outside the limit) also uses: the edge has had %d keys, want 2", shared, n)
	}
	if n := generatedKeys(sim, account, own); n != 3 {
		t.Errorf("branch-1's own tunnel has had %d keys, want 3: the run held back more than the shared tunnel", n)
	}
	raw, err := os.ReadFile(filepath.Join(out, "branch-1", "swanctl.conf"))
	if err != nil {
		t.Fatalf("branch-1 was not rendered: %v", err)
	}
	for _, id := range []string{shared, own} {
		if !holdsEdgeKey(sim, account, id, string(raw)) {
			t.Errorf("branch-1/swanctl.conf does not hold the edge's key of %s", id)
		}
	}
	if _, err := os.Stat(filepath.Join(out, "branch-2")); !os.IsNotExist(err) {
		t.Errorf("the run rendered branch-2, which --limit left out (%v)", err)
	}
	if run.code == 0 {
		t.Error("the run succeeded although it held back a rotation")
	}
	want := "Not rotated: cloudflare-ipsec/psk/" + account + "/" + shared + " (branch-1 shares it with branch-2, which this run leaves out (--limit): " +
		"rotated, it would leave them with the old key; run with every router that shares it)."
	if !strings.Contains(run.output, want) {
		t.Errorf("the output does not say %q:\n%s", want, ansibleFailures(secrets, run.output))
	}
}

// TestAnsibleTemplatesCarryOrRefuseMoreKeys: TestAnsibleTemplatesCarryOrRefuseAnyKey
// tries three hostile keys; these are the others a router's syntax could
// trip on: non-ASCII, "#" and ";"
// (comments and statement ends), "$" inside a key and "$" without digits,
// spaces at both ends, a tab, a carriage return, a NUL, and Jinja
// delimiters whose text names the token (a key templated twice would put
// the token in the file). Each Jinja template must carry the key exactly or
// refuse it, by the Agent templates' rules: strongSwan and VyOS carry all
// (base64), Junos what is printable ASCII and does not begin like $9$, IOS
// XE only letters and digits. (From the review of issue 17; it held before
// the fixes.)
func TestAnsibleTemplatesCarryOrRefuseMoreKeys(t *testing.T) {
	requireAnsible(t)
	sim, baseURL, secrets, apiToken, account := newEdge(t)
	tun := sim.AddTunnel(account, cloudflaresim.Tunnel{Name: "site_a_1", CustomerEndpoint: "198.51.100.7"})
	v := startDevServer(t, secrets)
	root := v.rootToken
	v.mountEngine(t, baseURL, apiToken.Value)
	v.mustVault(t, root, "write", "-f", "cloudflare-ipsec/psk/"+account+"/"+tun.ID)
	data, ok := v.mustVaultJSON(t, root, "read", "cloudflare-ipsec/psk/"+account+"/"+tun.ID)["data"].(map[string]any)
	if !ok {
		t.Fatal("the engine's read has no data")
	}
	v.mustVault(t, root, "secrets", "enable", "-path=anykey", "-version=1", "kv")
	policy, err := os.ReadFile(filepath.Join("..", "docs", "policies", "provisioner.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(v.dir, "anykey.hcl"), strings.ReplaceAll(strings.ReplaceAll(string(policy), "ACCOUNT_ID", account), "cloudflare-ipsec/", "anykey/"))
	v.mustVault(t, root, "policy", "write", "anykey-provisioner", filepath.Join(v.dir, "anykey.hcl"))
	reader := strings.TrimSpace(v.mustVault(t, root, "token", "create", "-policy=anykey-provisioner", "-field=token"))
	secrets.add(reader)

	keys := map[string]string{
		"non-ASCII":              "Ab1\u00fc\u20ac\U0001F600",
		"hash and semicolon":     "Ab1#c;d!",
		"dollar inside":          "Ab$9$cd",
		"dollar without digits":  "$ab$cd",
		"spaces at both ends":    " Ab1 ",
		"a tab":                  "Ab\t1",
		"a carriage return":      "Ab1\r",
		"a NUL":                  "Ab\x001",
		"Jinja naming the token": "{{ lookup('env', 'VAULT_TOKEN') }}{% raw %}x",
	}
	printable := func(s string) bool {
		for _, r := range s {
			if r < ' ' || r > '~' {
				return false
			}
		}
		return true
	}
	carries := map[string]func(string) bool{
		"swanctl.conf.tpl": func(string) bool { return true },
		"vyos.vbash.tpl":   func(string) bool { return true },
		"junos.set.tpl": func(k string) bool {
			return printable(k) && !(len(k) > 2 && k[0] == '$' && strings.IndexByte(k[1:], '$') > 0 && strings.Trim(k[1:1+strings.IndexByte(k[1:], '$')], "0123456789") == "")
		},
		"ios-xe.cfg.tpl": func(string) bool { return false },
	}
	decode := anyKeyExpectations()
	work := t.TempDir()
	inventory := writeAnsibleInventory(t, work, account, []string{tun.ID}, map[string]any{"cf_mount": "anykey"})
	for name, key := range keys {
		secrets.add(key)
		secrets.add(base64.StdEncoding.EncodeToString([]byte(key)))
		hostile := map[string]any{}
		for k, val := range data {
			hostile[k] = val
		}
		hostile["psk"] = key
		if status, _ := v.api(t, root, "PUT", "anykey/psk/"+account+"/"+tun.ID, hostile); status != 204 && status != 200 {
			t.Fatalf("write the key %q to KV: HTTP %d", name, status)
		}
		out := filepath.Join(work, strings.ReplaceAll(name, " ", "_"))
		run := runPlaybook(t, work, v.addr, []string{"VAULT_TOKEN=" + reader}, "-i", inventory, "-e", "cf_render_dir="+out, "--tags", "render")
		checkAnsibleRun(t, secrets, "ansible-playbook with "+name, run)
		for _, r := range ansibleRouters {
			t.Run(r.file+".j2 with "+name, func(t *testing.T) {
				rendered, readErr := os.ReadFile(filepath.Join(out, r.host, r.file))
				if readErr == nil && strings.Contains(string(rendered), reader) {
					t.Fatal("the rendered file holds the Vault token: the key was templated")
				}
				if !carries[r.agentTemplate](key) {
					if readErr == nil {
						t.Fatal("the template rendered a key it cannot carry")
					}
					return
				}
				if readErr != nil {
					t.Fatalf("the template refused a key it can carry: %v\n%s", readErr, ansibleFailures(secrets, run.output))
				}
				if got := decode[r.agentTemplate].decode(t, string(rendered)); got != key {
					t.Errorf("the rendered key is not the key read (%d characters, want %d)", len(got), len(key))
				}
			})
		}
	}
}
