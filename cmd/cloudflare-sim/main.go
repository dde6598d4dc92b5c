// Command cloudflare-sim serves the Cloudflare API simulator on loopback for
// `make dev`, so the engine can be tried without a Magic WAN account. It seeds
// one API token and some tunnels and writes them to a file (mode 0600) for the
// dev script; the token is never printed.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// seed is what the dev script needs to configure the engine.
type seed struct {
	BaseURL  string              `json:"base_url"`
	APIToken string              `json:"api_token"`
	TokenID  string              `json:"token_id"`
	Tunnels  map[string][]string `json:"tunnels"` // account id -> tunnel ids
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8787", "loopback address to serve on")
	seedFile := flag.String("seed-file", "cloudflare-sim.json", "where to write the seeded token and tunnel ids")
	accounts := flag.Int("accounts", 1, "accounts to create")
	tunnels := flag.Int("tunnels", 3, "tunnels to create in each account")
	flag.Parse()

	host, _, err := net.SplitHostPort(*listen)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		log.Fatalf("cloudflare-sim: -listen must be a loopback address, got %q", *listen)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("cloudflare-sim: %v", err)
	}

	sim := cloudflaresim.New()
	token := sim.AddToken(cloudflaresim.Token{ExpiresOn: time.Now().AddDate(1, 0, 0).UTC().Truncate(time.Second)})
	s := seed{
		BaseURL:  "http://" + ln.Addr().String() + cloudflaresim.BasePath,
		APIToken: token.Value,
		TokenID:  token.ID,
		Tunnels:  map[string][]string{},
	}
	for a := 0; a < *accounts; a++ {
		account := cloudflaresim.NewID()
		for i := 0; i < *tunnels; i++ {
			t := sim.AddTunnel(account, cloudflaresim.Tunnel{Name: fmt.Sprintf("IPsec_%d", i+1)})
			s.Tunnels[account] = append(s.Tunnels[account], t.ID)
		}
	}
	out, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile(*seedFile, append(out, '\n'), 0o600); err != nil {
		log.Fatalf("cloudflare-sim: write seed file: %v", err)
	}
	log.Printf("cloudflare-sim: serving %s (token id %s, seed in %s)", s.BaseURL, token.ID, *seedFile)
	log.Fatal(http.Serve(ln, sim))
}
