package main

import (
	"context"
	"fmt"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

var (
	wantIdentifier    = regexp.MustCompile(`^[0-9a-f]{32}$`)
	upperCaseVariant  = regexp.MustCompile(`^[0-9a-fA-F]{32}$`)
	canonicalRequired = "tunnel must be a Cloudflare identifier in its canonical form, 32 lower-case hexadecimal characters"
)

// FuzzParseIdentifier: an id is accepted, unchanged, exactly when it is 32
// lower-case hexadecimal characters; any other spelling is refused (an
// upper-case one with a word on why), and a refusal never repeats the id.
func FuzzParseIdentifier(f *testing.F) {
	for _, seed := range []string{
		"023e105f4ecef8ad9ca31a8372d0c353", "023E105F4ECEF8AD9CA31A8372D0C353", "", "..", "%2F",
		"023e105f4ecef8ad9ca31a8372d0c35", "023e105f4ecef8ad9ca31a8372d0c3533", "g23e105f4ecef8ad9ca31a8372d0c353",
		"023e105f4ecef8ad9ca31a8372d0c35\n", "ｆ23e105f4ecef8ad9ca31a8372d0c35", "023e105f4ecef8ad9ca31a8372d0c35\u212a",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		id, problem := store.ParseIdentifier("tunnel", raw)
		switch {
		case wantIdentifier.MatchString(raw):
			if problem != "" || id != raw {
				t.Fatalf("valid id refused or altered: %q -> %q (%s)", raw, id, problem)
			}
		case upperCaseVariant.MatchString(raw):
			if id != "" || !strings.HasPrefix(problem, canonicalRequired) {
				t.Fatalf("upper-case id %q: got (%q, %q)", raw, id, problem)
			}
		default:
			want := fmt.Sprintf("tunnel must be a Cloudflare identifier: 32 lower-case hexadecimal characters (got %d characters)", len(raw))
			if id != "" || problem != want {
				t.Fatalf("invalid id %q: got (%q, %q)", raw, id, problem)
			}
		}
		if raw != "" && len(raw) >= 4 && strings.Contains(problem, raw) {
			t.Fatalf("the refusal repeats the id: %q", problem)
		}
	})
}

// FuzzPSKPaths sends arbitrary account and tunnel segments through the
// router of a configured mount, as Vault would after URL decoding, against a
// Cloudflare simulator that has one tunnel (the first seed names it). No
// input may panic or turn into a server error; a record may exist only for
// the tunnel that exists at the edge, and whenever it says current it holds
// the edge's key: no input may make the engine lose a key or claim one.
func FuzzPSKPaths(f *testing.F) {
	const account, tunnel = "023e105f4ecef8ad9ca31a8372d0c353", "c4a7362d577a6c3019a474fd6f485821"
	for _, seed := range [][2]string{
		{account, tunnel},
		{strings.ToUpper(account), tunnel},
		{"..", tunnel},
		{account, "../config"},
		{account, "c4a7362d577a6c3019a474fd6f485822"},
		{"a/b", "c"}, {"", ""}, {"%00", "\x00"}, {strings.Repeat("f", 4096), "x"},
	} {
		f.Add(seed[0], seed[1])
	}
	sim := cloudflaresim.New()
	srv := httptest.NewServer(sim)
	f.Cleanup(srv.Close)
	token := sim.AddToken(cloudflaresim.Token{})
	sim.AddTunnel(account, cloudflaresim.Tunnel{ID: tunnel})
	b := newBackend()
	conf := logical.TestBackendConfig()
	conf.StorageView = &logical.InmemStorage{}
	if err := b.Setup(context.Background(), conf); err != nil {
		f.Fatal(err)
	}
	resp, err := b.HandleRequest(context.Background(), &logical.Request{Operation: logical.UpdateOperation, Path: "config", Storage: conf.StorageView,
		Data: map[string]any{"api_token": token.Value, "base_url": srv.URL + cloudflaresim.BasePath, "request_timeout": "5s"}})
	if err != nil || resp.IsError() {
		f.Fatalf("config: %v %v", resp, err)
	}
	f.Fuzz(func(t *testing.T, accountSegment, tunnelSegment string) {
		for _, op := range []logical.Operation{logical.ReadOperation, logical.UpdateOperation, logical.DeleteOperation, logical.ListOperation} {
			for _, path := range []string{"psk/" + accountSegment + "/" + tunnelSegment, "metadata/" + accountSegment + "/" + tunnelSegment, "psk/" + accountSegment + "/"} {
				req := &logical.Request{Operation: op, Path: path, Storage: conf.StorageView}
				resp, err := b.HandleRequest(context.Background(), req)
				if status := httpStatus(resp, err); status >= 500 {
					t.Fatalf("%s %.80q: HTTP %d: %v", op, path, status, errorText(resp, err))
				}
			}
			// After every operation: a record only for the real tunnel,
			// and a current one holds the edge's key.
			accounts, err := conf.StorageView.List(context.Background(), store.PSKPrefix)
			if err != nil {
				t.Fatal(err)
			}
			for _, a := range accounts {
				tunnels, err := conf.StorageView.List(context.Background(), store.PSKPrefix+a)
				if err != nil {
					t.Fatal(err)
				}
				for _, id := range tunnels {
					if a != account+"/" || id != tunnel {
						t.Fatalf("%s: a record for a tunnel the edge does not have: %.40q/%.40q", op, a, id)
					}
					rec, err := store.ReadRecord(context.Background(), conf.StorageView, store.Tunnel{AccountID: account, TunnelID: tunnel})
					if err != nil {
						t.Fatal(err)
					}
					edge, _ := sim.Tunnel(account, tunnel)
					if rec != nil && rec.Current() && rec.PSK != edge.PSK {
						t.Fatalf("%s: the record says current for a key the edge does not use", op)
					}
				}
			}
		}
	})
}
