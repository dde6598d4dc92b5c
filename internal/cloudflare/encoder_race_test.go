//go:build race

package cloudflare

import (
	"context"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// firstCallsEnv marks the child process of TestTheFirstRequestsOfAProcessDoNotRace.
const firstCallsEnv = "CLOUDFLARE_FIRST_CALLS_CHILD"

// TestTheFirstRequestsOfAProcessDoNotRace (review of 7f3d9a9): the SDK
// caches its JSON encoders for the whole process, and a cached map encoder
// keeps the encoder of the call that built it, which that call still
// writes while another call uses it. The race shows only in the first
// requests of a process, so each run is a fresh process (this test binary,
// run again for this test alone), built with the race detector, that sends
// every request body the client has (psk_generate, validate_only, a user
// and an account token roll) from many goroutines at once, released
// together. Only under -race: without the detector there is nothing to see.
//
// It passes with init's warm-up. With the warm-up removed it failed:
//
//	child run 1: WARNING: DATA RACE ... apijson.(*encoder).typeEncoder ... apijson.(*encoder).newTypeEncoder
func TestTheFirstRequestsOfAProcessDoNotRace(t *testing.T) {
	if os.Getenv(firstCallsEnv) == "1" {
		firstCallsAtOnce(t)
		return
	}
	for run := 1; run <= 3; run++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestTheFirstRequestsOfAProcessDoNotRace$", "-test.count=1")
		cmd.Env = append(os.Environ(), firstCallsEnv+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil || strings.Contains(string(out), "DATA RACE") {
			text := string(out)
			if i := strings.Index(text, "WARNING: DATA RACE"); i >= 0 {
				text = text[i:min(len(text), i+3000)]
			}
			t.Fatalf("child run %d (%v): %s", run, err, text)
		}
	}
}

// firstCallsAtOnce is the child: the process's first requests, all at once.
func firstCallsAtOnce(t *testing.T) {
	sim := cloudflaresim.New()
	srv := httptest.NewServer(sim)
	defer srv.Close()
	baseURL := srv.URL + cloudflaresim.BasePath
	account := cloudflaresim.NewID()
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	const n = 16
	clients := make([]*Client, n)
	tokens := make([]cloudflaresim.Token, n)
	for i := range clients {
		owner := ""
		if i%4 == 3 {
			owner = account
		}
		tokens[i] = sim.AddToken(cloudflaresim.Token{OwnerAccount: owner})
		c, err := New(Config{APIToken: tokens[i].Value, BaseURL: baseURL, RequestTimeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		clients[i] = c
	}
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ctx := context.Background()
			// Errors do not matter here: the bodies are encoded before
			// anything is sent.
			switch i % 4 {
			case 0:
				_, _ = c.GeneratePSK(ctx, account, tunnel, false)
			case 1:
				_, _ = c.GeneratePSK(ctx, account, tunnel, true)
			case 2:
				_, _ = c.RollToken(ctx, "", tokens[i].ID)
			case 3:
				_, _ = c.RollToken(ctx, account, tokens[i].ID)
			}
		}()
	}
	close(start)
	wg.Wait()
}
