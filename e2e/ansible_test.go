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
					if !strings.Contains(run.output, "fatal: ["+r.host+" -> localhost]: FAILED!") {
						t.Errorf("the render of %s did not fail:\n%s", r.host, secrets.redact(run.output))
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
