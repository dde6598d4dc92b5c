package main

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

var wantIdentifier = regexp.MustCompile(`^[0-9a-fA-F]{32}$`)

// FuzzNormaliseIdentifier: an id is accepted exactly when it is 32
// hexadecimal characters in either case, comes back lower case, and a
// refusal says what an id must be without repeating it.
func FuzzNormaliseIdentifier(f *testing.F) {
	for _, seed := range []string{
		"023e105f4ecef8ad9ca31a8372d0c353", "023E105F4ECEF8AD9CA31A8372D0C353", "", "..", "%2F",
		"023e105f4ecef8ad9ca31a8372d0c35", "023e105f4ecef8ad9ca31a8372d0c3533", "g23e105f4ecef8ad9ca31a8372d0c353",
		"023e105f4ecef8ad9ca31a8372d0c35\n", "ｆ23e105f4ecef8ad9ca31a8372d0c35",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		id, problem := normaliseIdentifier("tunnel", raw)
		if wantIdentifier.MatchString(raw) {
			if problem != "" || id != strings.ToLower(raw) {
				t.Fatalf("valid id refused or altered: %q -> %q (%s)", raw, id, problem)
			}
			return
		}
		want := fmt.Sprintf("tunnel must be a Cloudflare identifier: 32 hexadecimal characters (got %d characters)", len(strings.ToLower(raw)))
		if id != "" || problem != want {
			t.Fatalf("invalid id %q: got (%q, %q)", raw, id, problem)
		}
	})
}

// FuzzPSKPaths sends arbitrary account and tunnel segments through the
// backend's router, as Vault would after URL decoding. No input may panic or
// turn into a server error, and none may reach storage as a new key.
func FuzzPSKPaths(f *testing.F) {
	for _, seed := range [][2]string{
		{"023e105f4ecef8ad9ca31a8372d0c353", "c4a7362d577a6c3019a474fd6f485821"},
		{"..", "c4a7362d577a6c3019a474fd6f485821"},
		{"023e105f4ecef8ad9ca31a8372d0c353", "../config"},
		{"a/b", "c"}, {"", ""}, {"%00", "\x00"}, {strings.Repeat("f", 4096), "x"},
	} {
		f.Add(seed[0], seed[1])
	}
	b := newBackend()
	conf := logical.TestBackendConfig()
	conf.StorageView = &logical.InmemStorage{}
	if err := b.Setup(context.Background(), conf); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, account, tunnel string) {
		for _, op := range []logical.Operation{logical.ReadOperation, logical.UpdateOperation, logical.DeleteOperation, logical.ListOperation} {
			for _, path := range []string{"psk/" + account + "/" + tunnel, "metadata/" + account + "/" + tunnel, "psk/" + account + "/"} {
				req := &logical.Request{Operation: op, Path: path, Storage: conf.StorageView}
				resp, err := b.HandleRequest(context.Background(), req)
				if status := httpStatus(resp, err); status >= 500 {
					t.Fatalf("%s %.80q: HTTP %d: %v", op, path, status, errorText(resp, err))
				}
			}
		}
		keys, err := conf.StorageView.List(context.Background(), pskStoragePrefix)
		if err != nil || len(keys) != 0 {
			t.Fatalf("storage gained psk records without config: %v %v", keys, err)
		}
	})
}
