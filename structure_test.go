package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The engine's shape, held by a test so that it stays: the root is Vault
// glue; the core under internal/ depends one way down, background on
// rotation on store on schedule, with the Cloudflare client below rotation;
// nothing under internal/ knows Vault's request handling; and no function
// is too long or takes too much to read.

const module = "vault-plugin-secrets-cloudflare-ipsec"

// layers lists the core's packages from the top down: each may import only
// those after it (and the Cloudflare client, which imports none of them).
var layers = []string{"internal/background", "internal/mount", "internal/rotation", "internal/store", "internal/schedule"}

// goFiles parses every non-test Go file of the module, the build tools
// (tools/) left out.
func goFiles(t *testing.T) map[string]*ast.File {
	t.Helper()
	fset := token.NewFileSet()
	files := map[string]*ast.File{}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (path == "tools" || path == "e2e" || strings.HasPrefix(d.Name(), ".")) && path != "." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		files[path] = f
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// rankOf is the place of dir among the layers (a package under a layer
// counts as the layer), or -1 for a package outside them.
func rankOf(dir string) int {
	for i, l := range layers {
		if dir == l || strings.HasPrefix(dir, l+"/") {
			return i
		}
	}
	return -1
}

func TestTheCoreDependsOneWayDown(t *testing.T) {
	for path, f := range goFiles(t) {
		dir := filepath.ToSlash(filepath.Dir(path))
		if !strings.HasPrefix(dir, "internal/") {
			continue
		}
		rank := rankOf(dir)
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			if p == "github.com/hashicorp/vault/sdk/framework" || strings.HasPrefix(p, "github.com/hashicorp/vault/sdk/plugin") {
				t.Errorf("%s imports %s: the core knows nothing of Vault's request handling", path, p)
			}
			if !strings.HasPrefix(p, module+"/") {
				continue
			}
			target := strings.TrimPrefix(p, module+"/")
			switch {
			case !strings.HasPrefix(target, "internal/"):
				t.Errorf("%s imports %s, above the core", path, target)
			case rank < 0:
				// The Cloudflare client and its simulator stand apart:
				// they know nothing of the engine built on them.
				t.Errorf("%s imports %s: the Cloudflare client and simulator import nothing of the engine", path, target)
			case strings.HasPrefix(target, "internal/cloudflare"):
				if rank >= rankOf("internal/store") {
					t.Errorf("%s imports %s: what is stored and when it is due know nothing of Cloudflare", path, target)
				}
			case rankOf(target) <= rank:
				t.Errorf("%s imports %s, which is not below it (%s)", path, target, strings.Join(layers, " → "))
			}
		}
		// A request is the root's to turn into one engine call: nothing
		// below takes or returns one.
		ast.Inspect(f, func(n ast.Node) bool {
			if sel, ok := n.(*ast.SelectorExpr); ok && sel.Sel.Name == "Request" {
				if x, ok := sel.X.(*ast.Ident); ok && x.Name == "logical" {
					t.Errorf("%s uses logical.Request: the core is handed what a request asked, not the request", path)
				}
			}
			return true
		})
	}
}

func TestNoFunctionIsTooLongOrTakesTooMuch(t *testing.T) {
	const maxLines, maxParams = 80, 6
	fset := token.NewFileSet()
	for path := range goFiles(t) {
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			fn, ok := d.(*ast.FuncDecl)
			if !ok {
				continue
			}
			lines := fset.Position(fn.End()).Line - fset.Position(fn.Pos()).Line + 1
			params := 0
			for _, field := range fn.Type.Params.List {
				params += max(len(field.Names), 1)
			}
			if lines > maxLines || params > maxParams {
				t.Errorf("%s: %s is %d lines with %d parameters (at most %d and %d)", path, fn.Name.Name, lines, params, maxLines, maxParams)
			}
		}
	}
}
