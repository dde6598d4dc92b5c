package cloudflaresim_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// edge is a simulator behind an HTTP server with one token and one account,
// for the tests of how hard the double plays the real edge.
type edge struct {
	sim     *cloudflaresim.Server
	url     string
	token   string
	account string
}

func newEdge(t *testing.T) *edge {
	t.Helper()
	sim := cloudflaresim.New()
	srv := httptest.NewServer(sim)
	// Cleanups run last first: the simulator releases held requests and
	// drops delayed work before the server waits for its handlers.
	t.Cleanup(srv.Close)
	t.Cleanup(sim.Close)
	return &edge{
		sim:     sim,
		url:     srv.URL + cloudflaresim.BasePath,
		token:   sim.AddToken(cloudflaresim.Token{}).Value,
		account: cloudflaresim.NewID(),
	}
}

func (e *edge) tunnelPath(id string) string {
	return "/accounts/" + e.account + "/magic/ipsec_tunnels/" + id
}

// answer is the part of Cloudflare's envelope these tests read.
type answer struct {
	Success bool                       `json:"success"`
	Errors  []cloudflaresim.Message    `json:"errors"`
	Result  map[string]json.RawMessage `json:"result"`
}

// do makes one request with client (http.DefaultClient when nil) and
// returns the status and decoded envelope, or the transport error.
func (e *edge) do(t *testing.T, client *http.Client, method, path string, body []byte) (int, answer, error) {
	t.Helper()
	req, err := http.NewRequest(method, e.url+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+e.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, answer{}, err
	}
	defer resp.Body.Close()
	var a answer
	if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
		t.Fatalf("%s %s: answer is not an envelope: %v", method, path, err)
	}
	return resp.StatusCode, a, nil
}

// send makes one request with client and returns the status, or the
// transport error; it does not use t, so goroutines may call it.
func (e *edge) send(ctx context.Context, client *http.Client, method, path string, body []byte) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, e.url+path, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+e.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, err = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, err
}

// mustDo is do for a request that must be answered.
func (e *edge) mustDo(t *testing.T, method, path string, body []byte) (int, answer) {
	t.Helper()
	status, a, err := e.do(t, nil, method, path, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return status, a
}

// wireTunnel is the part of magic_ipsec-tunnel these tests read.
type wireTunnel struct {
	ID          string `json:"id"`
	PSK         string `json:"psk"`
	PSKMetadata *struct {
		LastGeneratedOn string `json:"last_generated_on"`
	} `json:"psk_metadata"`
}

func (e *edge) getTunnel(t *testing.T, id string) (int, wireTunnel) {
	t.Helper()
	status, a := e.mustDo(t, "GET", e.tunnelPath(id), nil)
	var tun wireTunnel
	if status == http.StatusOK {
		decode(t, a.Result["ipsec_tunnel"], &tun)
	}
	return status, tun
}

func (e *edge) listTunnels(t *testing.T) []wireTunnel {
	t.Helper()
	status, a := e.mustDo(t, "GET", "/accounts/"+e.account+"/magic/ipsec_tunnels", nil)
	if status != http.StatusOK {
		t.Fatalf("list: status %d, errors %v", status, a.Errors)
	}
	var list []wireTunnel
	decode(t, a.Result["ipsec_tunnels"], &list)
	return list
}

// generate calls psk_generate and returns the status, the key and its
// last_generated_on as sent.
func (e *edge) generate(t *testing.T, id string) (int, string, string) {
	t.Helper()
	status, a := e.mustDo(t, "POST", e.tunnelPath(id)+"/psk_generate", []byte(`{}`))
	var psk string
	var meta struct {
		LastGeneratedOn string `json:"last_generated_on"`
	}
	if status == http.StatusOK {
		decode(t, a.Result["psk"], &psk)
		decode(t, a.Result["psk_metadata"], &meta)
	}
	return status, psk, meta.LastGeneratedOn
}

func decode(t *testing.T, raw json.RawMessage, v any) {
	t.Helper()
	if err := json.Unmarshal(raw, v); err != nil {
		t.Fatalf("decode %s: %v", raw, err)
	}
}

func wireTime(t *testing.T, s string) time.Time {
	t.Helper()
	ts, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("last_generated_on %q: %v", s, err)
	}
	return ts
}

func TestTunnelsAreCreatedWithAKey(t *testing.T) {
	e := newEdge(t)
	before := time.Now().UTC().Truncate(time.Microsecond)
	created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	after := time.Now().UTC()

	if created.PSK == "" || created.PSKGeneratedOn.IsZero() {
		t.Fatalf("AddTunnel returned PSK set %v, PSKGeneratedOn %v: a real tunnel always has a key", created.PSK != "", created.PSKGeneratedOn)
	}
	if !created.PSKGeneratedOn.Equal(created.CreatedOn) {
		t.Errorf("PSKGeneratedOn = %v, want the creation time %v", created.PSKGeneratedOn, created.CreatedOn)
	}
	if created.PSKGeneratedOn.Before(before) || created.PSKGeneratedOn.After(after) {
		t.Errorf("PSKGeneratedOn = %v, not between %v and %v", created.PSKGeneratedOn, before, after)
	}
	if !slices.Equal(created.GeneratedPSKs, []string{created.PSK}) {
		t.Errorf("GeneratedPSKs does not hold exactly the creation key")
	}
	if !slices.Contains(e.sim.IssuedSecrets(), created.PSK) {
		t.Errorf("the creation key is not among the issued secrets")
	}

	status, got := e.getTunnel(t, created.ID)
	if status != http.StatusOK || got.PSKMetadata == nil {
		t.Fatalf("GET: status %d, psk_metadata %v: want 200 with psk_metadata", status, got.PSKMetadata)
	}
	if !wireTime(t, got.PSKMetadata.LastGeneratedOn).Equal(created.PSKGeneratedOn) {
		t.Errorf("GET last_generated_on = %s, want %v", got.PSKMetadata.LastGeneratedOn, created.PSKGeneratedOn)
	}
	if got.PSK != "" {
		t.Errorf("GET shows the key: Cloudflare never does")
	}
	list := e.listTunnels(t)
	if len(list) != 1 || list[0].PSKMetadata == nil || !wireTime(t, list[0].PSKMetadata.LastGeneratedOn).Equal(created.PSKGeneratedOn) {
		t.Errorf("list = %+v, want the one tunnel with psk_metadata", list)
	}

	// A generation replaces the creation key and is strictly later.
	status, psk, on := e.generate(t, created.ID)
	if status != http.StatusOK || psk == created.PSK || !wireTime(t, on).After(created.PSKGeneratedOn) {
		t.Errorf("psk_generate: status %d, same key %v, last_generated_on %s: want a new, later key", status, psk == created.PSK, on)
	}
	now, _ := e.sim.Tunnel(e.account, created.ID)
	if !slices.Equal(now.GeneratedPSKs, []string{created.PSK, psk}) {
		t.Errorf("GeneratedPSKs does not hold the creation key then the generated one")
	}
}

func TestAddTunnelKeyOptions(t *testing.T) {
	given := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	cases := []struct {
		name        string
		in          cloudflaresim.Tunnel
		wantPSK     string // "" with wantKey: any generated key
		wantKey     bool
		wantGivenOn bool
	}{
		{"default", cloudflaresim.Tunnel{}, "", true, false},
		{"no initial key", cloudflaresim.Tunnel{NoInitialKey: true}, "", false, false},
		{"given key", cloudflaresim.Tunnel{PSK: "GivenKey0123456789GivenKey012345"}, "GivenKey0123456789GivenKey012345", true, false},
		{"given key and time", cloudflaresim.Tunnel{PSK: "GivenKey0123456789GivenKey012345", PSKGeneratedOn: given}, "GivenKey0123456789GivenKey012345", true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEdge(t)
			tun := e.sim.AddTunnel(e.account, tc.in)
			if (tun.PSK != "") != tc.wantKey || tc.wantPSK != "" && tun.PSK != tc.wantPSK {
				t.Errorf("PSK set = %v, want %v (given %v)", tun.PSK != "", tc.wantKey, tc.wantPSK != "")
			}
			switch {
			case tc.wantGivenOn && !tun.PSKGeneratedOn.Equal(given):
				t.Errorf("PSKGeneratedOn = %v, want the given %v", tun.PSKGeneratedOn, given)
			case !tc.wantGivenOn && tc.wantKey && !tun.PSKGeneratedOn.Equal(tun.CreatedOn):
				t.Errorf("PSKGeneratedOn = %v, want the creation time %v", tun.PSKGeneratedOn, tun.CreatedOn)
			case !tc.wantKey && !tun.PSKGeneratedOn.IsZero():
				t.Errorf("PSKGeneratedOn = %v, want none", tun.PSKGeneratedOn)
			}
			wantHistory := 0
			if tc.wantKey {
				wantHistory = 1
			}
			if len(tun.GeneratedPSKs) != wantHistory {
				t.Errorf("GeneratedPSKs has %d keys, want %d", len(tun.GeneratedPSKs), wantHistory)
			}
			_, got := e.getTunnel(t, tun.ID)
			if (got.PSKMetadata != nil) != tc.wantKey {
				t.Errorf("GET psk_metadata present = %v, want %v", got.PSKMetadata != nil, tc.wantKey)
			}
		})
	}
}

func TestRegenerateOutOfBand(t *testing.T) {
	e := newEdge(t)
	created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	calls := e.sim.TotalCalls()

	changed, ok := e.sim.RegenerateOutOfBand(e.account, created.ID)
	if !ok {
		t.Fatal("RegenerateOutOfBand: no such tunnel")
	}
	if changed.PSK == created.PSK || !changed.PSKGeneratedOn.After(created.PSKGeneratedOn) {
		t.Errorf("the key did not change to a later one: same key %v, %v then %v", changed.PSK == created.PSK, created.PSKGeneratedOn, changed.PSKGeneratedOn)
	}
	if !slices.Equal(changed.GeneratedPSKs, []string{created.PSK, changed.PSK}) {
		t.Errorf("GeneratedPSKs does not record the out-of-band key after the creation key")
	}
	if !slices.Contains(e.sim.IssuedSecrets(), changed.PSK) {
		t.Errorf("the out-of-band key is not among the issued secrets")
	}
	if got := e.sim.TotalCalls(); got != calls {
		t.Errorf("TotalCalls went from %d to %d: an out-of-band change is no API call", calls, got)
	}
	_, got := e.getTunnel(t, created.ID)
	if got.PSKMetadata == nil || !wireTime(t, got.PSKMetadata.LastGeneratedOn).Equal(changed.PSKGeneratedOn) {
		t.Errorf("GET psk_metadata = %+v, want last_generated_on %v", got.PSKMetadata, changed.PSKGeneratedOn)
	}
	if _, ok := e.sim.RegenerateOutOfBand(e.account, cloudflaresim.NewID()); ok {
		t.Errorf("RegenerateOutOfBand of an unknown tunnel reported success")
	}
}

func TestDeletedTunnelIsGone(t *testing.T) {
	e := newEdge(t)
	kept := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	gone := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	if !e.sim.DeleteTunnel(e.account, gone.ID) {
		t.Fatal("DeleteTunnel: no such tunnel")
	}
	if e.sim.DeleteTunnel(e.account, gone.ID) {
		t.Error("a second DeleteTunnel reported success")
	}
	if _, ok := e.sim.Tunnel(e.account, gone.ID); ok {
		t.Error("Tunnel still returns the deleted tunnel")
	}

	cases := []struct {
		name   string
		method string
		path   string
		body   []byte
	}{
		{"get", "GET", e.tunnelPath(gone.ID), nil},
		{"generate", "POST", e.tunnelPath(gone.ID) + "/psk_generate", []byte(`{}`)},
		{"generate validate_only", "POST", e.tunnelPath(gone.ID) + "/psk_generate?validate_only=true", []byte(`{}`)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, a := e.mustDo(t, tc.method, tc.path, tc.body)
			if status != http.StatusNotFound || a.Success || len(a.Errors) != 1 || a.Errors[0].Code != 1002 {
				t.Errorf("status %d, success %v, errors %v: want 404 with code 1002", status, a.Success, a.Errors)
			}
		})
	}
	list := e.listTunnels(t)
	if len(list) != 1 || list[0].ID != kept.ID {
		t.Errorf("list = %+v, want only %s", list, kept.ID)
	}
	if _, ok := e.sim.RegenerateOutOfBand(e.account, gone.ID); ok {
		t.Error("RegenerateOutOfBand of a deleted tunnel reported success")
	}
}

// TestDeletionDuringRequests deletes tunnels while they are read and
// rotated: every answer is a success or the 404, never a crash.
func TestDeletionDuringRequests(t *testing.T) {
	e := newEdge(t)
	for range 20 {
		id := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{}).ID
		done := make(chan struct{})
		go func() {
			defer close(done)
			e.sim.DeleteTunnel(e.account, id)
		}()
		for _, req := range []struct {
			method, path string
			body         []byte
		}{{"GET", e.tunnelPath(id), nil}, {"POST", e.tunnelPath(id) + "/psk_generate", []byte(`{}`)}} {
			if status, a := e.mustDo(t, req.method, req.path, req.body); status != http.StatusOK && status != http.StatusNotFound {
				t.Errorf("%s during deletion: status %d, errors %v", req.method, status, a.Errors)
			}
		}
		<-done
	}
}

func TestTimestampPrecision(t *testing.T) {
	cases := []struct {
		name      string
		precision time.Duration
		want      time.Duration // what every timestamp is a multiple of
		canRepeat bool
		// mustRepeat: requests back to back are sure to fall in one tick
		// (a millisecond is too short for that under -race).
		mustRepeat bool
	}{
		{"default", 0, time.Microsecond, false, false},
		{"millisecond", time.Millisecond, time.Millisecond, true, false},
		{"second", time.Second, time.Second, true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEdge(t)
			if tc.precision != 0 {
				e.sim.SetTimestampPrecision(tc.precision)
			}
			created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			for _, ts := range []time.Time{created.CreatedOn, created.PSKGeneratedOn} {
				if !ts.Equal(ts.Truncate(tc.want)) {
					t.Errorf("creation timestamp %v is finer than %v", ts, tc.want)
				}
			}

			// Generate pairs of keys back to back until a pair falls in one
			// tick of the precision (a pair can straddle a tick boundary).
			repeated := false
			for attempt := 0; attempt < 5 && !repeated; attempt++ {
				var stamps []time.Time
				for range 2 {
					status, psk, on := e.generate(t, created.ID)
					if status != http.StatusOK || psk == "" {
						t.Fatalf("psk_generate: status %d", status)
					}
					wire := wireTime(t, on)
					if !wire.Equal(wire.Truncate(tc.want)) {
						t.Errorf("last_generated_on %s on the wire is finer than %v", on, tc.want)
					}
					stored, _ := e.sim.Tunnel(e.account, created.ID)
					if !stored.PSKGeneratedOn.Equal(wire) || stored.PSK != psk {
						t.Errorf("stored state (%v) differs from the answer (%s)", stored.PSKGeneratedOn, on)
					}
					_, got := e.getTunnel(t, created.ID)
					if got.PSKMetadata == nil || got.PSKMetadata.LastGeneratedOn != on {
						t.Errorf("GET last_generated_on = %+v, want %s", got.PSKMetadata, on)
					}
					stamps = append(stamps, wire)
				}
				switch {
				case stamps[1].Before(stamps[0]):
					t.Fatalf("a later generation is dated earlier: %v then %v", stamps[0], stamps[1])
				case stamps[1].Equal(stamps[0]):
					if !tc.canRepeat {
						t.Errorf("two generations share last_generated_on %v", stamps[0])
					}
					repeated = true
				}
				if !tc.mustRepeat {
					break
				}
			}
			if tc.mustRepeat && !repeated {
				t.Error("no two generations back to back shared a timestamp")
			}
		})
	}
}

// TestSecondPrecisionOutOfBandChangeCanBeInvisible is the case a
// reconciliation by timestamp cannot see: a key changed within the second
// of the last generation leaves last_generated_on as it was.
func TestSecondPrecisionOutOfBandChangeCanBeInvisible(t *testing.T) {
	e := newEdge(t)
	e.sim.SetTimestampPrecision(time.Second)
	for attempt := 0; attempt < 5; attempt++ {
		created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
		changed, _ := e.sim.RegenerateOutOfBand(e.account, created.ID)
		if changed.PSK == created.PSK {
			t.Fatal("the out-of-band change kept the key")
		}
		if changed.PSKGeneratedOn.Equal(created.PSKGeneratedOn) {
			return
		}
	}
	t.Error("five out-of-band changes right after creation all moved last_generated_on")
}

// waitFor polls cond for up to five seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

// abandon sends a request the edge holds without an answer (a ProcessAfter
// fault is queued for it) and gives up on it once the edge has accepted it.
// No timer decides anything: the test waits for the edge to have the request
// and then cancels it, and the late work runs when the test calls
// ProcessLateNow.
func (e *edge) abandon(t *testing.T, op cloudflaresim.Operation, path string, body []byte) {
	t.Helper()
	calls := e.sim.Calls(op)
	ctx, cancel := context.WithCancel(context.Background())
	result := make(chan error, 1)
	go func() {
		status, err := e.send(ctx, &http.Client{}, "POST", path, body)
		if err == nil {
			err = fmt.Errorf("answered with %d", status)
		}
		result <- err
	}()
	waitFor(t, "the edge has the request", func() bool { return e.sim.Calls(op) == calls+1 })
	e.sim.WaitAccepted()
	cancel()
	if err := <-result; !errors.Is(err, context.Canceled) {
		t.Fatalf("the held request: %v, want no answer before the caller gave up", err)
	}
}

// TestAbandonedGenerateIsProcessedLate plays the request a caller gave up
// on: it gets no answer, a later generation succeeds, and then the
// abandoned one changes the key anyway, so the key the caller stored last
// is not the edge's.
func TestAbandonedGenerateIsProcessedLate(t *testing.T) {
	e := newEdge(t)
	created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})

	e.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{ProcessAfter: time.Hour})
	e.abandon(t, cloudflaresim.OpPSKGenerate, e.tunnelPath(created.ID)+"/psk_generate", []byte(`{}`))
	if now, _ := e.sim.Tunnel(e.account, created.ID); now.PSK != created.PSK {
		t.Fatal("the key changed before the late work ran")
	}

	status, retried, retriedOn := e.generate(t, created.ID)
	if status != http.StatusOK {
		t.Fatalf("the retry: status %d", status)
	}
	processed := time.Now()
	e.sim.ProcessLateNow()
	e.sim.WaitIdle()

	final, _ := e.sim.Tunnel(e.account, created.ID)
	if final.PSK == retried || final.PSK == created.PSK {
		t.Fatal("the abandoned request was not processed: the edge still has a key a caller saw")
	}
	if !slices.Equal(final.GeneratedPSKs, []string{created.PSK, retried, final.PSK}) {
		t.Errorf("GeneratedPSKs does not hold creation, retry, late key in that order")
	}
	if !slices.Contains(e.sim.IssuedSecrets(), final.PSK) {
		t.Error("the late key is not among the issued secrets")
	}
	if earliest := processed.Truncate(time.Microsecond); final.PSKGeneratedOn.Before(earliest) {
		t.Errorf("the late key is dated %v, before it was processed (%v)", final.PSKGeneratedOn, earliest)
	}
	if !final.PSKGeneratedOn.After(wireTime(t, retriedOn)) {
		t.Errorf("the late key is dated %v, not after the retry's %s", final.PSKGeneratedOn, retriedOn)
	}
	_, got := e.getTunnel(t, created.ID)
	if got.PSKMetadata == nil || !wireTime(t, got.PSKMetadata.LastGeneratedOn).Equal(final.PSKGeneratedOn) {
		t.Errorf("GET psk_metadata = %+v, want the late key's %v", got.PSKMetadata, final.PSKGeneratedOn)
	}
	if n := e.sim.Calls(cloudflaresim.OpPSKGenerate); n != 2 {
		t.Errorf("psk_generate calls = %d, want 2", n)
	}
}

func TestProcessAfterCases(t *testing.T) {
	cases := []struct {
		name string
		// query is appended to the psk_generate path; body and token
		// override the defaults when set.
		query, body, token string
		// between runs after the request was abandoned.
		between    func(e *edge, id string)
		wantStatus int // 0: no answer
		wantChange bool
		wantGone   bool
	}{
		{name: "processed", wantChange: true},
		{name: "validate_only changes nothing", query: "?validate_only=true"},
		{name: "refused token answered at once", token: "no-such-token", wantStatus: http.StatusForbidden},
		{name: "no body answered at once", body: "-", wantStatus: http.StatusBadRequest},
		{name: "tunnel deleted meanwhile", between: func(e *edge, id string) { e.sim.DeleteTunnel(e.account, id) }, wantGone: true},
		{name: "tunnel re-created under its id", between: func(e *edge, id string) {
			e.sim.DeleteTunnel(e.account, id)
			e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{ID: id})
		}},
		{name: "out-of-band change meanwhile", between: func(e *edge, id string) { e.sim.RegenerateOutOfBand(e.account, id) }, wantChange: true},
		{name: "simulator closed first", between: func(e *edge, _ string) { e.sim.Close() }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEdge(t)
			created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			if tc.token != "" {
				e.token = tc.token
			}
			body := []byte(`{}`)
			if tc.body == "-" {
				body = nil
			}
			e.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{ProcessAfter: time.Hour})
			path := e.tunnelPath(created.ID) + "/psk_generate" + tc.query
			if tc.wantStatus == 0 {
				e.abandon(t, cloudflaresim.OpPSKGenerate, path, body)
			} else if status, _, err := e.do(t, &http.Client{Timeout: 10 * time.Second}, "POST", path, body); err != nil || status != tc.wantStatus {
				t.Fatalf("status %d, error %v: want %d at once", status, err, tc.wantStatus)
			}
			if tc.between != nil {
				tc.between(e, created.ID)
			}
			before, _ := e.sim.Tunnel(e.account, created.ID)
			e.sim.ProcessLateNow()
			e.sim.WaitIdle()

			after, exists := e.sim.Tunnel(e.account, created.ID)
			if exists == tc.wantGone {
				t.Fatalf("tunnel exists = %v after the late work, want %v", exists, !tc.wantGone)
			}
			if changed := exists && after.PSK != before.PSK; changed != tc.wantChange {
				t.Errorf("the late work changed the key: %v, want %v", changed, tc.wantChange)
			}
		})
	}
}

// TestCloseReleasesHeldRequests: a caller that never gives up is cut off by
// Close instead of holding the HTTP server's Close forever.
func TestCloseReleasesHeldRequests(t *testing.T) {
	cases := []struct {
		name  string
		op    cloudflaresim.Operation
		fault cloudflaresim.Fault
	}{
		{"ProcessAfter", cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{ProcessAfter: time.Hour}},
		{"ProcessAfter on a read", cloudflaresim.OpTunnelGet, cloudflaresim.Fault{ProcessAfter: time.Hour}},
		{"Delay", cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{Delay: time.Hour}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEdge(t)
			id := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{}).ID
			e.sim.FailNext(tc.op, tc.fault)
			method, path, body := "GET", e.tunnelPath(id), []byte(nil)
			if tc.op == cloudflaresim.OpPSKGenerate {
				method, path, body = "POST", path+"/psk_generate", []byte(`{}`)
			}
			errs := make(chan error, 1)
			go func() {
				_, err := e.send(context.Background(), &http.Client{}, method, path, body)
				errs <- err
			}()
			waitFor(t, "the request is held", func() bool { return e.sim.Calls(tc.op) == 1 })
			before, _ := e.sim.Tunnel(e.account, id)
			e.sim.Close()
			select {
			case err := <-errs:
				if err == nil {
					t.Error("the held request was answered, want it aborted")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Close did not release the held request")
			}
			e.sim.WaitIdle() // returns at once: Close dropped the work
			if after, _ := e.sim.Tunnel(e.account, id); after.PSK != before.PSK {
				t.Error("work dropped by Close still changed the key")
			}
		})
	}
}

// TestLateWorkUnderLoad mixes late and immediate generations for one
// tunnel, for the race detector, and checks that WaitIdle, once every
// request was counted, returns only after all of them were processed.
func TestLateWorkUnderLoad(t *testing.T) {
	e := newEdge(t)
	created := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	const late, immediate = 8, 8
	for range late {
		e.sim.FailNext(cloudflaresim.OpPSKGenerate, cloudflaresim.Fault{ProcessAfter: 20 * time.Millisecond})
	}
	ctx, giveUp := context.WithCancel(context.Background())
	defer giveUp()
	var answered atomic.Int32
	var wg sync.WaitGroup
	for range late + immediate {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if status, err := e.send(ctx, http.DefaultClient, "POST", e.tunnelPath(created.ID)+"/psk_generate", []byte(`{}`)); err == nil && status == http.StatusOK {
				answered.Add(1)
			}
		}()
	}
	waitFor(t, "every request is counted", func() bool { return e.sim.Calls(cloudflaresim.OpPSKGenerate) == late+immediate })
	waitFor(t, "the immediate requests are answered", func() bool { return answered.Load() == immediate })
	e.sim.WaitIdle()
	final, _ := e.sim.Tunnel(e.account, created.ID)
	giveUp()
	wg.Wait()
	if got := len(final.GeneratedPSKs); got != 1+late+immediate {
		t.Errorf("GeneratedPSKs has %d keys, want %d", got, 1+late+immediate)
	}
	if got := answered.Load(); got != immediate {
		t.Errorf("%d requests were answered, want %d: a late one was answered", got, immediate)
	}
}

// TestEditOutOfBandChangesTheTunnelNotItsKey: an edit at the dashboard
// shows in the tunnel's answers, costs no API call, and cannot touch the
// key, its history or the id.
func TestEditOutOfBandChangesTheTunnelNotItsKey(t *testing.T) {
	sim := cloudflaresim.New()
	t.Cleanup(sim.Close)
	account := cloudflaresim.NewID()
	before := sim.AddTunnel(account, cloudflaresim.Tunnel{})
	after, ok := sim.EditOutOfBand(account, before.ID, func(t *cloudflaresim.Tunnel) {
		t.CloudflareEndpoint = "172.64.244.68"
		t.CustomFQDNID = "b." + account + ".custom.ipsec.cloudflare.com"
		t.ID, t.PSK, t.GeneratedPSKs = "x", "chosen", nil
	})
	if !ok {
		t.Fatal("no such tunnel")
	}
	if after.CloudflareEndpoint != "172.64.244.68" || after.CustomFQDNID == "" {
		t.Errorf("the edit did not take: %+v", after.CloudflareEndpoint)
	}
	if after.ID != before.ID || after.PSK != before.PSK || len(after.GeneratedPSKs) != 1 {
		t.Error("an edit changed the id, the key or its history")
	}
	if sim.TotalCalls() != 0 {
		t.Errorf("an out-of-band edit counted %d calls", sim.TotalCalls())
	}
	if _, ok := sim.EditOutOfBand(account, cloudflaresim.NewID(), func(*cloudflaresim.Tunnel) {}); ok {
		t.Error("an unknown tunnel was edited")
	}
}

// TestEveryAnswerIsDatedByTheEdgesClock: Cloudflare's answers carry a Date
// header from Cloudflare's clock, which the engine reads to judge the edge's
// times by the edge's own clock. The simulator's Date comes from its clock,
// set apart from the real one here, on answers that succeed and on failures.
func TestEveryAnswerIsDatedByTheEdgesClock(t *testing.T) {
	e := newEdge(t)
	skewed := time.Date(2031, 5, 6, 7, 8, 9, 500_000_000, time.UTC)
	e.sim.SetClock(func() time.Time { return skewed })
	tunnel := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	e.sim.FailNext(cloudflaresim.OpTunnelGet, cloudflaresim.Fault{Status: 503})
	for _, path := range []string{e.tunnelPath(tunnel.ID), e.tunnelPath(tunnel.ID), "/no/such/route"} {
		req, err := http.NewRequest(http.MethodGet, e.url+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+e.token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		date, err := http.ParseTime(resp.Header.Get("Date"))
		if err != nil || !date.Equal(skewed.Truncate(time.Second)) {
			t.Errorf("GET %s (status %d): Date %q, want the simulator's clock %s", path, resp.StatusCode, resp.Header.Get("Date"), skewed.Truncate(time.Second))
		}
	}
}
