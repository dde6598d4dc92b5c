package main

import (
	"fmt"
	"os"
	"path/filepath"
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
		"status",
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

// readmeMaxLines keeps the README a front door: what the engine is, the two
// commands, a short tour and where to read on. The manual lives in docs/.
const readmeMaxLines = 350

func TestReadmeIsAFrontDoor(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n > readmeMaxLines {
		t.Errorf("README.md has %d lines, more than %d: move the manual's part of it into docs/", n, readmeMaxLines)
	}
}

// markdownFiles are the pages a reader of the repository sees: the README
// and docs/.
func markdownFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{"README.md"}, files...)
}

var (
	inlineLink    = regexp.MustCompile(`\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)`)
	referenceLink = regexp.MustCompile(`(?m)^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)`)
	codeSpan      = regexp.MustCompile("`+[^`]*`+")
	headingLine   = regexp.MustCompile(`^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$`)
	notInSlug     = regexp.MustCompile(`[^\p{L}\p{N}\s_-]`)
)

// proseOf returns a Markdown page's lines outside fenced code blocks, and
// its headings: links and anchors live there, not in examples.
func proseOf(text string) (prose []string, headings []string) {
	fence := ""
	for _, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimLeft(line, " ")
		if fence != "" {
			if strings.HasPrefix(trimmed, fence) {
				fence = ""
			}
			continue
		}
		if strings.HasPrefix(trimmed, "```") || strings.HasPrefix(trimmed, "~~~") {
			fence = trimmed[:3]
			continue
		}
		prose = append(prose, line)
		if m := headingLine.FindStringSubmatch(line); m != nil {
			headings = append(headings, m[1])
		}
	}
	return prose, headings
}

// anchors are the fragment ids GitHub gives a page's headings: lower case,
// punctuation dropped, spaces as hyphens, a repeated heading numbered.
func anchors(headings []string) map[string]bool {
	ids := map[string]bool{}
	seen := map[string]int{}
	for _, h := range headings {
		h = regexp.MustCompile(`\[([^\]]*)\]\([^)]*\)`).ReplaceAllString(h, "$1")
		id := strings.ReplaceAll(notInSlug.ReplaceAllString(strings.ToLower(h), ""), " ", "-")
		if n := seen[id]; n > 0 {
			ids[fmt.Sprintf("%s-%d", id, n)] = true
		} else {
			ids[id] = true
		}
		seen[id]++
	}
	return ids
}

// TestDocLinksResolve fails when a relative link of the README or of a page
// in docs/ points at nothing in the repository (a file that moved, a
// heading that was renamed), or out of it: a fresh clone is all a reader
// has.
func TestDocLinksResolve(t *testing.T) {
	root, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	pageAnchors := map[string]map[string]bool{}
	anchorsOf := func(page string) map[string]bool {
		if a, ok := pageAnchors[page]; ok {
			return a
		}
		b, err := os.ReadFile(page)
		if err != nil {
			t.Fatal(err)
		}
		_, headings := proseOf(string(b))
		pageAnchors[page] = anchors(headings)
		return pageAnchors[page]
	}
	for _, page := range markdownFiles(t) {
		b, err := os.ReadFile(page)
		if err != nil {
			t.Fatal(err)
		}
		prose, _ := proseOf(string(b))
		text := codeSpan.ReplaceAllString(strings.Join(prose, "\n"), "``")
		var targets []string
		for _, m := range inlineLink.FindAllStringSubmatch(text, -1) {
			targets = append(targets, m[1])
		}
		for _, m := range referenceLink.FindAllStringSubmatch(text, -1) {
			targets = append(targets, m[1])
		}
		for _, target := range targets {
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file, fragment, _ := strings.Cut(target, "#")
			if strings.HasPrefix(file, "/") {
				t.Errorf("%s: link %q is absolute; link within the repository by a relative path", page, target)
				continue
			}
			dest := page
			if file != "" {
				dest = filepath.Join(filepath.Dir(page), filepath.FromSlash(file))
			}
			abs, err := filepath.Abs(dest)
			if err != nil {
				t.Fatal(err)
			}
			if abs != root && !strings.HasPrefix(abs, root+string(filepath.Separator)) {
				t.Errorf("%s: link %q leads out of the repository", page, target)
				continue
			}
			info, err := os.Stat(dest)
			if err != nil {
				t.Errorf("%s: link %q: %s does not exist", page, target, filepath.ToSlash(dest))
				continue
			}
			if fragment != "" && !info.IsDir() && strings.HasSuffix(dest, ".md") && !anchorsOf(dest)[fragment] {
				t.Errorf("%s: link %q: %s has no heading #%s", page, target, filepath.ToSlash(dest), fragment)
			}
		}
	}
}

// machinePaths match what names this machine rather than the repository:
// the project's shared folder beside the repository, the repository's own
// absolute path and its parent's, the home directory, and the usual roots
// of people's and projects' folders.
func machinePaths(t *testing.T) []*regexp.Regexp {
	t.Helper()
	res := []*regexp.Regexp{
		regexp.MustCompile(`\.\./shared\b`),
		regexp.MustCompile("(^|[\\s\"'`(=:])/(home|root|Users|work)/"),
	}
	root, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	// The repository's own path, not its parent's: a clone may sit right
	// under /tmp, which the docs' example output names on its own account.
	dirs := []string{root}
	if home, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, home)
	}
	for _, d := range dirs {
		if len(d) > 1 {
			res = append(res, regexp.MustCompile(regexp.QuoteMeta(filepath.ToSlash(d))+`\b`))
		}
	}
	return res
}

// TestDocsNameNothingOutsideTheRepository fails when the README or a page
// in docs/ names ../shared or an absolute path of the machine it was
// written on, in prose or in an example: a reader's clone has neither.
func TestDocsNameNothingOutsideTheRepository(t *testing.T) {
	res := machinePaths(t)
	for _, page := range markdownFiles(t) {
		b, err := os.ReadFile(page)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(b), "\n") {
			for _, re := range res {
				if m := re.FindString(line); m != "" {
					t.Errorf("%s:%d names %q, which is outside the repository", page, i+1, strings.TrimSpace(m))
				}
			}
		}
	}
}
