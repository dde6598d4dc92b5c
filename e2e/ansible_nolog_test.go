package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestAnsiblePlaybookHandlesKeysAndTokensUnderNoLog holds the playbook to
// what it promises: every task that handles a key or a token runs under
// no_log. The runs of the other tests cannot show it: the write answers
// without the key and the template task prints no content, so a task
// without no_log leaks nothing while all goes well. It is for the day
// something fails, or someone raises the verbosity: Ansible prints a failed
// task's error (a module's traceback can hold its token), and a task's
// result at -v and above.
func TestAnsiblePlaybookHandlesKeysAndTokensUnderNoLog(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "docs", "examples", "ansible", "playbook.yml"))
	if err != nil {
		t.Fatal(err)
	}
	check, err := checkPlaybookNoLog(raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, problem := range check.problems {
		t.Error(problem)
	}
	// The check must see the tasks that certainly handle a key or a token;
	// if it does not, it has stopped seeing the playbook.
	for _, name := range []string{
		"Ask Vault whether the render's token may read the routers' tunnels",
		"Rotate each tunnel (the write answers without the key)",
		"Read the router's keys",
		"Render the configuration (it holds the keys; nothing is shown)",
	} {
		if !slices.Contains(check.sensitive, name) {
			t.Errorf("the check does not see that task %q handles a key or a token (it saw %q)", name, check.sensitive)
		}
	}
}

// TestAnsibleNoLogCheckCatchesWhatItMust proves the check above on the
// playbook with a task added that leaks, each in a way a reader could miss:
//   - an unnamed task after the render, which prints every key at -vvvv. A
//     check that split the file on "- name: " read it as part of the render
//     task and let it inherit that task's no_log;
//   - a task that prints a fact a hidden task put the keys into;
//   - a task that prints the token through a variable of its own.
func TestAnsibleNoLogCheckCatchesWhatItMust(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "docs", "examples", "ansible", "playbook.yml"))
	if err != nil {
		t.Fatal(err)
	}
	const after = "Render the configuration (it holds the keys; nothing is shown)"
	for _, c := range []struct{ what, tasks, want string }{
		{"an unnamed task that prints the keys", `
- ansible.builtin.debug:
    msg: "{{ query('community.hashi_vault.vault_read', *cf_paths) | map(attribute='data.psk') | list }}"
  delegate_to: localhost
  when: ansible_verbosity >= 4
`, `an unnamed ansible.builtin.debug task`},
		{"a fact the keys were copied into", `
- name: Keep the keys
  ansible.builtin.set_fact:
    cf_keys: "{{ query('community.hashi_vault.vault_read', *cf_paths) | map(attribute='data.psk') | list }}"
  no_log: true
- name: Show what was kept
  ansible.builtin.debug:
    var: cf_keys
`, `task "Keep the keys" sets cf_keys`},
		{"a token through a task's variable", `
- name: Say which token
  ansible.builtin.debug:
    msg: "{{ t }}"
  vars:
    t: "{{ lookup('ansible.builtin.env', 'VAULT_TOKEN') }}"
`, `task "Say which token" (line`},
	} {
		t.Run(c.what, func(t *testing.T) {
			var doc, added yaml.Node
			if err := yaml.Unmarshal(raw, &doc); err != nil {
				t.Fatal(err)
			}
			if err := yaml.Unmarshal([]byte(c.tasks), &added); err != nil {
				t.Fatal(err)
			}
			if !insertTasksAfter(&doc, after, added.Content[0].Content) {
				t.Fatalf("the playbook has no task %q to add tasks after", after)
			}
			check, err := checkPlaybookNodeNoLog(&doc)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.ContainsFunc(check.problems, func(p string) bool { return strings.Contains(p, c.want) }) {
				t.Errorf("the check did not catch it (want a problem with %q; it found %q)", c.want, check.problems)
			}
		})
	}
}

// insertTasksAfter puts tasks into the list that holds the task named name,
// right after it, wherever that list is (a play's tasks, a block).
func insertTasksAfter(n *yaml.Node, name string, tasks []*yaml.Node) bool {
	if n.Kind == yaml.SequenceNode {
		for i, task := range n.Content {
			if _, v := mappingValue(task, "name"); v != nil && v.Value == name {
				n.Content = slices.Insert(n.Content, i+1, tasks...)
				return true
			}
		}
	}
	for _, c := range n.Content {
		if insertTasksAfter(c, name, tasks) {
			return true
		}
	}
	return false
}

// playbookNoLogCheck is what checkPlaybookNoLog found: the names of the
// tasks that handle a key or a token, and each problem.
type playbookNoLogCheck struct {
	sensitive []string
	problems  []string
}

// A value is sensitive when it uses the hashi_vault collection (a module
// or a lookup, which read keys or take a token), names a token's
// environment variable or file, or refers to a sensitive variable.
var sensitiveValue = regexp.MustCompile(`hashi_vault|VAULT_TOKEN|CF_OPERATOR_TOKEN|cf_operator_token|vault-token`)

// reviewedFacts are the facts that tasks under no_log distil from results
// that hold a key or a token. Each was read and holds none: only tunnel ids,
// paths, capabilities, the rendered file's name and Vault's error text with
// the token cut out. The check treats any other fact such a task sets as
// sensitive, so a new one must be reviewed and added here.
var reviewedFacts = []string{
	"cf_run_problems",  // what is wrong with VAULT_ADDR and the tokens
	"cf_refused",       // why a router is refused: capabilities, Vault's error
	"cf_rotations",     // each rotation's version and state, or Vault's error
	"cf_absent",        // the tunnels Vault holds no key for
	"cf_unread",        // the tunnels whose read failed otherwise, and why
	"cf_render_result", // whether the render was done, its file, a template's hint
}

// The keywords of a play that hold lists of tasks, and the modules that
// bring in tasks from elsewhere.
var (
	playTaskLists  = []string{"tasks", "pre_tasks", "post_tasks", "handlers"}
	includeModules = regexp.MustCompile(`(^|\.)(include_tasks|import_tasks|include_role|import_role|include|import_playbook)$`)
)

// checkPlaybookNoLog parses a playbook and finds every task (unnamed ones,
// and those in blocks, included) that handles a key or a token and does not
// itself say no_log: true. Variables of plays, blocks and tasks that hold
// something sensitive are followed, as are the results a sensitive task
// registers and the facts it sets (but for reviewedFacts), until nothing
// new turns up. It refuses what it cannot see into: roles and included or
// imported files.
func checkPlaybookNoLog(raw []byte) (playbookNoLogCheck, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return playbookNoLogCheck{}, fmt.Errorf("parse the playbook: %w", err)
	}
	return checkPlaybookNodeNoLog(&doc)
}

// checkPlaybookNodeNoLog is checkPlaybookNoLog for a parsed playbook.
func checkPlaybookNodeNoLog(doc *yaml.Node) (playbookNoLogCheck, error) {
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 || doc.Content[0].Kind != yaml.SequenceNode {
		return playbookNoLogCheck{}, fmt.Errorf("the playbook is not a list of plays")
	}
	var result playbookNoLogCheck
	for i, play := range doc.Content[0].Content {
		if play.Kind != yaml.MappingNode {
			return result, fmt.Errorf("play %d is not a mapping", i+1)
		}
		if key, _ := mappingValue(play, "roles"); key != nil {
			result.problems = append(result.problems, fmt.Sprintf("play %d has roles, which the check cannot see into", i+1))
		}
		if key, _ := mappingValue(play, "import_playbook"); key != nil {
			result.problems = append(result.problems, fmt.Sprintf("play %d imports a playbook, which the check cannot see into", i+1))
		}
		// Every task of the play, blocks flattened, and the mappings of
		// variables that tasks share (the play's and its blocks').
		var tasks []*yaml.Node
		varMaps := []*yaml.Node{}
		if _, vars := mappingValue(play, "vars"); vars != nil {
			varMaps = append(varMaps, vars)
		}
		var walk func(list *yaml.Node)
		walk = func(list *yaml.Node) {
			if list == nil || list.Kind != yaml.SequenceNode {
				return
			}
			for _, task := range list.Content {
				if task.Kind != yaml.MappingNode {
					continue
				}
				isBlock := false
				for _, k := range []string{"block", "rescue", "always"} {
					if _, sub := mappingValue(task, k); sub != nil {
						isBlock = true
						walk(sub)
					}
				}
				if !isBlock {
					// A task's own vars are part of its body.
					tasks = append(tasks, task)
				} else if _, vars := mappingValue(task, "vars"); vars != nil {
					varMaps = append(varMaps, vars)
				}
			}
		}
		for _, k := range playTaskLists {
			_, list := mappingValue(play, k)
			walk(list)
		}

		// Grow the set of sensitive names until it holds still.
		names := map[string]bool{}
		sensitive := func(n *yaml.Node) bool {
			for _, s := range scalarsOf(n) {
				if sensitiveValue.MatchString(s) {
					return true
				}
				for name := range names {
					if mentions(s, name) {
						return true
					}
				}
			}
			return false
		}
		for grown := true; grown; {
			grown = false
			add := func(name string) {
				if !names[name] {
					names[name] = true
					grown = true
				}
			}
			for _, vars := range varMaps {
				for j := 0; j+1 < len(vars.Content); j += 2 {
					if sensitive(vars.Content[j+1]) {
						add(vars.Content[j].Value)
					}
				}
			}
			for _, task := range tasks {
				if !sensitive(taskBody(task)) {
					continue
				}
				if _, reg := mappingValue(task, "register"); reg != nil {
					add(reg.Value)
				}
				if facts := setFactArgs(task); facts != nil {
					for j := 0; j+1 < len(facts.Content); j += 2 {
						if name := facts.Content[j].Value; name != "cacheable" && !slices.Contains(reviewedFacts, name) {
							add(name)
						}
					}
				}
			}
		}

		for _, task := range tasks {
			if !sensitive(taskBody(task)) {
				continue
			}
			name := taskName(task)
			if _, n := mappingValue(task, "name"); n != nil {
				result.sensitive = append(result.sensitive, n.Value)
			}
			if _, noLog := mappingValue(task, "no_log"); noLog == nil || noLog.Tag != "!!bool" || noLog.Value != "true" {
				result.problems = append(result.problems, fmt.Sprintf("%s (line %d) handles a key or a token and does not itself run under no_log: true", name, task.Line))
			}
			if facts := setFactArgs(task); facts != nil {
				for j := 0; j+1 < len(facts.Content); j += 2 {
					if fact := facts.Content[j].Value; fact != "cacheable" && !slices.Contains(reviewedFacts, fact) {
						result.problems = append(result.problems, fmt.Sprintf("%s sets %s from what holds a key or a token: no task may show it "+
							"(if it holds neither, review it and add it to reviewedFacts)", name, fact))
					}
				}
			}
		}
		for _, task := range tasks {
			for j := 0; j+1 < len(task.Content); j += 2 {
				if includeModules.MatchString(task.Content[j].Value) {
					result.problems = append(result.problems, fmt.Sprintf("%s includes %s, which the check cannot see into", taskName(task), task.Content[j].Value))
				}
			}
		}
	}
	return result, nil
}

// mappingValue returns a mapping's key node and value node for key, or nils.
func mappingValue(m *yaml.Node, key string) (*yaml.Node, *yaml.Node) {
	if m == nil || m.Kind != yaml.MappingNode {
		return nil, nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i], m.Content[i+1]
		}
	}
	return nil, nil
}

// taskBody is the task without its name: every key and value that decides
// what it does (its module and arguments, vars, loop, when and the rest).
func taskBody(task *yaml.Node) *yaml.Node {
	body := &yaml.Node{Kind: yaml.MappingNode}
	for i := 0; i+1 < len(task.Content); i += 2 {
		if task.Content[i].Value != "name" {
			body.Content = append(body.Content, task.Content[i], task.Content[i+1])
		}
	}
	return body
}

// taskName names a task for a message: its name, or its module when it has
// none.
func taskName(task *yaml.Node) string {
	if _, name := mappingValue(task, "name"); name != nil && name.Value != "" {
		return fmt.Sprintf("task %q", name.Value)
	}
	keywords := []string{"vars", "when", "loop", "loop_control", "register", "delegate_to", "run_once", "no_log", "tags",
		"changed_when", "failed_when", "check_mode", "ignore_errors", "become", "environment", "with_items", "until", "retries", "delay"}
	for i := 0; i+1 < len(task.Content); i += 2 {
		if k := task.Content[i].Value; !slices.Contains(keywords, k) {
			return fmt.Sprintf("an unnamed %s task", k)
		}
	}
	return "an unnamed task"
}

// setFactArgs returns the mapping of facts a set_fact task sets, or nil.
func setFactArgs(task *yaml.Node) *yaml.Node {
	for _, module := range []string{"set_fact", "ansible.builtin.set_fact", "ansible.legacy.set_fact"} {
		if _, args := mappingValue(task, module); args != nil && args.Kind == yaml.MappingNode {
			return args
		}
	}
	return nil
}

// scalarsOf is every scalar under n, keys included.
func scalarsOf(n *yaml.Node) []string {
	if n == nil {
		return nil
	}
	if n.Kind == yaml.ScalarNode {
		return []string{n.Value}
	}
	var out []string
	for _, c := range n.Content {
		out = append(out, scalarsOf(c)...)
	}
	if n.Alias != nil {
		out = append(out, scalarsOf(n.Alias)...)
	}
	return out
}

// mentions tells whether s refers to the variable name: the name as a whole
// word (letters, digits and _ on neither side).
func mentions(s, name string) bool {
	isWord := func(b byte) bool {
		return b == '_' || b >= '0' && b <= '9' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z'
	}
	for i := 0; ; {
		j := strings.Index(s[i:], name)
		if j < 0 {
			return false
		}
		start, end := i+j, i+j+len(name)
		if (start == 0 || !isWord(s[start-1])) && (end == len(s) || !isWord(s[end])) {
			return true
		}
		i = start + 1
	}
}
