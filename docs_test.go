package main

import (
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

const pathsDoc = "docs/paths.md"

// TestPathsDocMatchesTheBackend keeps docs/paths.md true: it is rendered
// from the paths, operations and fields the backend declares, and the test
// fails when the file differs. UPDATE_DOCS=1 go test -run PathsDoc . rewrites
// it.
func TestPathsDocMatchesTheBackend(t *testing.T) {
	want := renderPathsDoc(newBackend())
	if os.Getenv("UPDATE_DOCS") == "1" {
		if err := os.WriteFile(pathsDoc, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(pathsDoc)
	if err != nil {
		t.Fatalf("%v (UPDATE_DOCS=1 go test -run PathsDoc . writes it)", err)
	}
	if string(got) != want {
		t.Fatalf("%s is not what the backend declares; rerun with UPDATE_DOCS=1 and review the diff", pathsDoc)
	}
}

var captureGroup = regexp.MustCompile(`\(\?P<(\w+)>[^)]*\)`)

// vaultPath renders a path pattern as users write it: psk/:account/:tunnel.
func vaultPath(pattern string) string {
	p := captureGroup.ReplaceAllString(pattern, ":$1")
	p = strings.TrimSuffix(p, "$")
	p = strings.TrimSuffix(p, "/?")
	p = strings.TrimSuffix(p, "?")
	return p
}

var operationOrder = []logical.Operation{logical.CreateOperation, logical.ReadOperation, logical.UpdateOperation, logical.DeleteOperation, logical.ListOperation}

func renderPathsDoc(b *backend) string {
	var sb strings.Builder
	sb.WriteString("# Paths\n\nGenerated from the backend by `UPDATE_DOCS=1 go test -run PathsDoc .`; a test fails when this file and the backend disagree. Paths are relative to the mount (`cloudflare-ipsec/` in the README). `vault path-help cloudflare-ipsec/<path>` shows the same, with the full description.\n")
	for _, p := range b.Paths {
		fmt.Fprintf(&sb, "\n## `%s`\n\n%s\n\n", vaultPath(p.Pattern), strings.TrimSpace(p.HelpSynopsis))
		sb.WriteString("| Operation | Vault CLI | Forwarded to the active node |\n|---|---|---|\n")
		for _, op := range operationOrder {
			h, ok := p.Operations[op]
			if !ok {
				continue
			}
			props := h.Properties()
			fmt.Fprintf(&sb, "| %s | `vault %s` | %v |\n", op, cliVerb(op), props.ForwardPerformanceStandby)
		}
		var names []string
		for name := range p.Fields {
			names = append(names, name)
		}
		sort.Strings(names)
		if len(names) == 0 {
			continue
		}
		sb.WriteString("\n| Field | Type | Default | Description |\n|---|---|---|---|\n")
		for _, name := range names {
			f := p.Fields[name]
			def := ""
			if f.Default != nil {
				def = fmt.Sprintf("`%v`", f.Default)
			}
			where := ""
			if strings.Contains(p.Pattern, "<"+name+">") {
				where = " (in the path)"
			}
			fmt.Fprintf(&sb, "| `%s`%s | %s | %s | %s |\n", name, where, fieldType(f.Type), def, strings.ReplaceAll(f.Description, "|", "\\|"))
		}
	}
	return sb.String()
}

func cliVerb(op logical.Operation) string {
	switch op {
	case logical.CreateOperation, logical.UpdateOperation:
		return "write"
	case logical.ListOperation:
		return "list"
	}
	return string(op)
}

func fieldType(t framework.FieldType) string {
	switch t {
	case framework.TypeDurationSecond:
		return "duration (\"90s\", \"24h\" or seconds)"
	}
	return t.String()
}

// TestHelpNamesEveryReturnedField reads each path as a user would and fails
// when a field of the answer is not named in that path's help: help that
// lists five fields of ten tells a provisioning tool's author nothing of the
// other five.
func TestHelpNamesEveryReturnedField(t *testing.T) {
	env := newConfiguredEnv(t)
	env.must(env.request(logical.UpdateOperation, env.pskPath(), map[string]any{"rotation_period": "1h"}))
	env.must(env.request(logical.UpdateOperation, "rotate/"+env.account, nil))
	for _, path := range []string{
		env.pskPath(),
		env.metaPath(),
		env.schedulePath(),
		"config",
		"rotate/" + env.account,
		"tunnels/" + env.account + "/" + env.tunnel.ID,
	} {
		resp := env.must(env.request(logical.ReadOperation, path, nil))
		route := env.b.Route(path)
		if route == nil {
			t.Fatalf("no route for %s", path)
		}
		help := route.HelpDescription
		for field := range resp.Data {
			if !regexp.MustCompile(`\b` + regexp.QuoteMeta(field) + `\b`).MatchString(help) {
				t.Errorf("read %s returns %q, which its help does not name", route.Pattern, field)
			}
		}
	}
}
