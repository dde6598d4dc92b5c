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
	"slices"
	"strconv"
	"strings"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8787", "loopback address to serve on")
	seedFile := flag.String("seed-file", "cloudflare-sim.env", "where to write the seeded token and tunnel ids, as shell variables")
	accounts := flag.Int("accounts", 1, "accounts to create")
	tunnels := flag.Int("tunnels", 3, "tunnels to create in each account")
	precision := flag.Duration("timestamp-precision", 0, "truncate the edge's timestamps to this (1s: as coarse as Cloudflare may be); 0 keeps microseconds")
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
	sim.SetTimestampPrecision(*precision)
	token := sim.AddToken(cloudflaresim.Token{ExpiresOn: time.Now().AddDate(1, 0, 0).UTC().Truncate(time.Second)})
	baseURL := "http://" + ln.Addr().String() + cloudflaresim.BasePath
	var env strings.Builder
	fmt.Fprintf(&env, "CF_SIM_BASE_URL=%s\nCF_SIM_API_TOKEN=%s\nCF_SIM_TOKEN_ID=%s\n", baseURL, token.Value, token.ID)
	for a := 0; a < *accounts; a++ {
		account := cloudflaresim.NewID()
		var ids []string
		for i := 0; i < *tunnels; i++ {
			// As Cloudflare recommends: the tunnels alternate between the
			// account's two anycast endpoints, each with its own /31.
			ids = append(ids, sim.AddTunnel(account, cloudflaresim.Tunnel{
				Name:               fmt.Sprintf("IPsec_%d", i+1),
				CloudflareEndpoint: fmt.Sprintf("203.0.113.%d", 1+i%2),
				CustomerEndpoint:   "198.51.100.7",
				InterfaceAddress:   fmt.Sprintf("10.212.0.%d/31", 2*i),
			}).ID)
		}
		fmt.Fprintf(&env, "CF_SIM_ACCOUNT_%d=%s\nCF_SIM_TUNNELS_%d=\"%s\"\n", a+1, account, a+1, strings.Join(ids, " "))
	}
	// Values are hex and letters only, so the file is safe to source.
	if err := os.WriteFile(*seedFile, []byte(env.String()), 0o600); err != nil {
		log.Fatalf("cloudflare-sim: write seed file: %v", err)
	}
	log.Printf("cloudflare-sim: serving %s (token id %s, seed in %s)", baseURL, token.ID, *seedFile)
	log.Fatal(http.Serve(ln, withControl(sim)))
}

// withControl adds endpoints beside the API, so a person trying the engine
// (or an end-to-end test) can play what happens at the real edge. Make the
// next call of an operation fail:
//
//	curl -X POST 'http://127.0.0.1:8787/_sim/fail-next?op=psk_generate' \
//	     -d '{"Status": 500, "AfterCommit": true}'
//
// The body is a cloudflaresim.Fault in JSON (Delay and ProcessAfter in
// nanoseconds: {"ProcessAfter": 5000000000} processes an abandoned
// psk_generate five seconds after it arrived). The operations are those of
// cloudflaresim's Operation constants; psk_set, the Set operation that takes
// the caller's keys for many tunnels, has the faults of issue 16:
//
//	# some tunnels unapplied (reason "" is the simulator's default)
//	curl -X POST 'http://127.0.0.1:8787/_sim/fail-next?op=psk_set' \
//	     -d '{"Unapplied": {"TUNNEL": "tunnel is busy"}}'
//	# processed late, after the caller gave up
//	curl -X POST 'http://127.0.0.1:8787/_sim/fail-next?op=psk_set' -d '{"ProcessAfter": 5000000000}'
//	# the answer lost after the change; a hang after the change
//	curl -X POST 'http://127.0.0.1:8787/_sim/fail-next?op=psk_set' -d '{"AfterCommit": true, "Hangup": true}'
//	curl -X POST 'http://127.0.0.1:8787/_sim/fail-next?op=psk_set' -d '{"AfterCommit": true, "Delay": 3600000000000}'
//
// A batch too large is a limit rather than a one-off fault: from then on a
// Set request of more than max keys is refused whole (413, code 1004); max=0
// removes the limit:
//
//	curl -X POST 'http://127.0.0.1:8787/_sim/psk-batch-limit?max=100'
//
// Change a tunnel's key as the dashboard, Terraform or another cluster
// would, or delete a tunnel:
//
//	curl -X POST 'http://127.0.0.1:8787/_sim/regenerate?account=ACCOUNT&tunnel=TUNNEL'
//	curl -X DELETE 'http://127.0.0.1:8787/_sim/tunnel?account=ACCOUNT&tunnel=TUNNEL'
//
// Each answers 204, or 404 for an unknown tunnel; none returns a key.
func withControl(sim *cloudflaresim.Server) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", sim)
	mux.HandleFunc("POST /_sim/fail-next", func(w http.ResponseWriter, r *http.Request) {
		var f cloudflaresim.Fault
		if err := json.NewDecoder(r.Body).Decode(&f); err != nil {
			http.Error(w, "body must be a JSON Fault: "+err.Error(), http.StatusBadRequest)
			return
		}
		op := cloudflaresim.Operation(r.URL.Query().Get("op"))
		if !slices.Contains(sim.Operations(), op) {
			http.Error(w, fmt.Sprintf("op must be one of %s", strings.Join(opNames(sim), ", ")), http.StatusBadRequest)
			return
		}
		sim.FailNext(op, f)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /_sim/psk-batch-limit", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(r.URL.Query().Get("max"))
		if err != nil || n < 0 {
			http.Error(w, "max must be a whole number of keys, 0 for no limit", http.StatusBadRequest)
			return
		}
		sim.SetPSKBatchLimit(n)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /_sim/regenerate", func(w http.ResponseWriter, r *http.Request) {
		account, tunnel, ok := tunnelParams(w, r)
		if !ok {
			return
		}
		// The new key stays inside the simulator: the engine must find
		// out about it from psk_metadata, as it would at Cloudflare.
		if _, found := sim.RegenerateOutOfBand(account, tunnel); !found {
			http.Error(w, "no such tunnel", http.StatusNotFound)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("DELETE /_sim/tunnel", func(w http.ResponseWriter, r *http.Request) {
		account, tunnel, ok := tunnelParams(w, r)
		if !ok {
			return
		}
		if !sim.DeleteTunnel(account, tunnel) {
			http.Error(w, "no such tunnel", http.StatusNotFound)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return mux
}

// opNames lists the operations fail-next can aim at: a fault queued for a
// name no request matches would wait forever, and a typo would look like a
// fault that did not fire.
func opNames(sim *cloudflaresim.Server) []string {
	var names []string
	for _, op := range sim.Operations() {
		names = append(names, string(op))
	}
	return names
}

// tunnelParams reads the account and tunnel query parameters, answering 400
// when either is missing.
func tunnelParams(w http.ResponseWriter, r *http.Request) (account, tunnel string, ok bool) {
	account, tunnel = r.URL.Query().Get("account"), r.URL.Query().Get("tunnel")
	if account == "" || tunnel == "" {
		http.Error(w, "account and tunnel are required", http.StatusBadRequest)
		return "", "", false
	}
	return account, tunnel, true
}
