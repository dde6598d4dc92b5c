package cloudflaresim_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// Keys of the form the engine will send: 32 letters and digits.
const (
	keyA = "KeyAKeyAKeyAKeyAKeyAKeyAKeyA0001"
	keyB = "KeyBKeyBKeyBKeyBKeyBKeyBKeyB0002"
	keyC = "KeyCKeyCKeyCKeyCKeyCKeyCKeyC0003"
)

// setAnswer is the Set operation's result.
type setAnswer struct {
	Applied map[string]struct {
		IPsecID       string `json:"ipsec_id"`
		IPsecTunnelID string `json:"ipsec_tunnel_id"`
		PSK           string `json:"psk"`
		PSKMetadata   struct {
			LastGeneratedOn string `json:"last_generated_on"`
		} `json:"psk_metadata"`
	} `json:"successfully_applied_psks"`
	Unapplied map[string]string `json:"unapplied_psks"`
}

func (e *edge) setPath() string { return "/accounts/" + e.account + "/magic/ipsec_tunnels/psk" }

// psks is a Set body for pairs of tunnel id and key.
func psks(pairs ...string) []byte {
	var entries []map[string]string
	for i := 0; i+1 < len(pairs); i += 2 {
		entries = append(entries, map[string]string{"id": pairs[i], "psk": pairs[i+1]})
	}
	body, err := json.Marshal(map[string]any{"psks": entries})
	if err != nil {
		panic(err)
	}
	return body
}

// set calls the Set operation and decodes its result when it succeeded.
func (e *edge) set(t *testing.T, query string, body []byte) (int, answer, setAnswer) {
	t.Helper()
	status, a := e.mustDo(t, "POST", e.setPath()+query, body)
	var res setAnswer
	if status == http.StatusOK {
		raw, err := json.Marshal(a.Result)
		if err != nil {
			t.Fatal(err)
		}
		decode(t, raw, &res)
	}
	return status, a, res
}

// TestSetAppliesEachKeyOrSaysWhyNot: one batch, four fates. A key the edge
// takes replaces the tunnel's and is recorded as psk_generate records one;
// a tunnel not in the account, a key the edge refuses and a tunnel that
// refuses keys are unapplied with a reason that does not quote the key.
func TestSetAppliesEachKeyOrSaysWhyNot(t *testing.T) {
	e := newEdge(t)
	a := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	short := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	stubborn := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{RefusePSK: "tunnel is being migrated"})
	other := cloudflaresim.NewID()
	otherAccount := cloudflaresim.NewID()
	elsewhere := e.sim.AddTunnel(otherAccount, cloudflaresim.Tunnel{})
	const shortKey = "tooShort1"

	before := time.Now().UTC().Truncate(time.Microsecond)
	status, _, res := e.set(t, "", psks(strings.ToUpper(a.ID), keyA, short.ID, shortKey, stubborn.ID, keyB, other, keyC, elsewhere.ID, keyC))
	if status != http.StatusOK {
		t.Fatalf("status %d", status)
	}

	edgeA, _ := e.sim.Tunnel(e.account, a.ID)
	got, ok := res.Applied[a.ID]
	switch {
	case !ok || len(res.Applied) != 1:
		t.Fatalf("applied = %v, want only %s (by its lower-case id)", keysOf(res.Applied), a.ID)
	case got.PSK != keyA || got.IPsecTunnelID != a.ID || got.IPsecID == "":
		t.Errorf("applied entry: tunnel %q, ipsec_id %q, psk echoed: %v", got.IPsecTunnelID, got.IPsecID, got.PSK == keyA)
	case edgeA.PSK != keyA:
		t.Error("the edge does not use the key it says it applied")
	case !wireTime(t, got.PSKMetadata.LastGeneratedOn).Equal(edgeA.PSKGeneratedOn) || edgeA.PSKGeneratedOn.Before(before):
		t.Errorf("last_generated_on %s, edge's %v, want now", got.PSKMetadata.LastGeneratedOn, edgeA.PSKGeneratedOn)
	case !slices.Equal(edgeA.GeneratedPSKs, []string{a.PSK, keyA}) || !slices.Contains(e.sim.IssuedSecrets(), keyA):
		t.Error("the key set is not recorded in GeneratedPSKs and among the issued secrets")
	case !edgeA.ModifiedOn.Equal(edgeA.PSKGeneratedOn):
		t.Error("modified_on did not move with the key")
	}

	wantReasons := map[string]string{
		short.ID:     "psk must be 16 to 128 characters long",
		stubborn.ID:  "tunnel is being migrated",
		other:        "ipsec tunnel not found",
		elsewhere.ID: "ipsec tunnel not found",
	}
	if len(res.Unapplied) != len(wantReasons) {
		t.Errorf("unapplied = %v", res.Unapplied)
	}
	for id, want := range wantReasons {
		if res.Unapplied[id] != want {
			t.Errorf("unapplied[%s] = %q, want %q", id, res.Unapplied[id], want)
		}
	}
	for _, id := range []string{short.ID, stubborn.ID} {
		if now, _ := e.sim.Tunnel(e.account, id); len(now.GeneratedPSKs) != 1 {
			t.Errorf("an unapplied tunnel's key changed")
		}
	}
	if now, _ := e.sim.Tunnel(otherAccount, elsewhere.ID); now.PSK == keyC {
		t.Error("another account's tunnel took a key")
	}
	if n := e.sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
		t.Errorf("Set calls = %d, want 1", n)
	}
}

func keysOf[V any](m map[string]V) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// TestSettingTheSameKeyAgainReDates: setting the key a tunnel already has
// changes nothing an IKE peer sees, but it is a write: the edge dates it
// anew, as the simulator models Cloudflare (see pskset.go).
func TestSettingTheSameKeyAgainReDates(t *testing.T) {
	e := newEdge(t)
	a := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
	_, _, first := e.set(t, "", psks(a.ID, keyA))
	status, _, second := e.set(t, "", psks(a.ID, keyA))
	if status != http.StatusOK {
		t.Fatalf("status %d", status)
	}
	edgeA, _ := e.sim.Tunnel(e.account, a.ID)
	if edgeA.PSK != keyA || second.Applied[a.ID].PSK != keyA {
		t.Fatal("the second set did not keep the key")
	}
	d1, d2 := wireTime(t, first.Applied[a.ID].PSKMetadata.LastGeneratedOn), wireTime(t, second.Applied[a.ID].PSKMetadata.LastGeneratedOn)
	if !d2.After(d1) || !d2.Equal(edgeA.PSKGeneratedOn) {
		t.Errorf("last_generated_on %v then %v (edge %v): want a new date", d1, d2, edgeA.PSKGeneratedOn)
	}
	if !slices.Equal(edgeA.GeneratedPSKs, []string{a.PSK, keyA, keyA}) {
		t.Errorf("GeneratedPSKs has %d keys, want creation and twice the key set", len(edgeA.GeneratedPSKs))
	}
}

// TestSetValidateOnlyChangesNothing: a validation answers as a real call
// would, with each tunnel's date as it is, and sets nothing; a gateway that
// drops the query string makes it real.
func TestSetValidateOnlyChangesNothing(t *testing.T) {
	for _, dropped := range []bool{false, true} {
		e := newEdge(t)
		a := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
		if dropped {
			e.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{IgnoreValidateOnly: true})
		}
		status, _, res := e.set(t, "?validate_only=true", psks(a.ID, keyA, cloudflaresim.NewID(), keyB))
		if status != http.StatusOK || len(res.Applied) != 1 || len(res.Unapplied) != 1 {
			t.Fatalf("query dropped %v: status %d, %d applied, %d unapplied", dropped, status, len(res.Applied), len(res.Unapplied))
		}
		now, _ := e.sim.Tunnel(e.account, a.ID)
		if changed := now.PSK != a.PSK; changed != dropped {
			t.Errorf("query dropped %v: the key changed: %v", dropped, changed)
		}
		if got := wireTime(t, res.Applied[a.ID].PSKMetadata.LastGeneratedOn); !got.Equal(now.PSKGeneratedOn) {
			t.Errorf("query dropped %v: last_generated_on %v, edge's %v", dropped, got, now.PSKGeneratedOn)
		}
	}
}

// TestSetRefusesABadBodyWhole: a body that does not fit the request schema,
// or names a tunnel twice, is refused with 400 and changes nothing.
func TestSetRefusesABadBodyWhole(t *testing.T) {
	cases := []struct {
		name, body, contentType string
		wantCode                int
		wantMessage             string
	}{
		{"not JSON", `{"psks":`, "", 1001, "request body must be a JSON object"},
		{"not an object", `[]`, "", 1001, "request body must be a JSON object"},
		{"no content type", `{"psks":[]}`, "-", 1001, "request body must be a JSON object"},
		{"no psks", `{}`, "", 1003, "invalid request body: psks is required"},
		{"psks not an array", `{"psks":{}}`, "", 1003, "invalid request body: psks must be an array"},
		{"psks null", `{"psks":null}`, "", 1003, "invalid request body: psks must be an array"},
		{"entry not an object", `{"psks":["x"]}`, "", 1003, "invalid request body: psks[0] must be an object"},
		{"no id", `{"psks":[{"psk":"` + keyA + `"}]}`, "", 1003, "invalid request body: psks[0].id is required and must be a string"},
		{"psk not a string", `{"psks":[{"id":"%s","psk":12}]}`, "", 1003, "invalid request body: psks[0].psk is required and must be a string"},
		{"psk null", `{"psks":[{"id":"%s","psk":null}]}`, "", 1003, "invalid request body: psks[0].psk is required and must be a string"},
		{"one tunnel twice", `{"psks":[{"id":"%s","psk":"` + keyA + `"},{"id":"%S","psk":"` + keyB + `"}]}`, "", 1003, "invalid request body: psks[1].id names the same tunnel as psks[0]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEdge(t)
			a := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			body := strings.ReplaceAll(strings.ReplaceAll(tc.body, "%s", a.ID), "%S", strings.ToUpper(a.ID))
			req, _ := http.NewRequest("POST", e.url+e.setPath(), strings.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+e.token)
			if tc.contentType != "-" {
				req.Header.Set("Content-Type", "application/json")
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var got answer
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != 400 || len(got.Errors) != 1 || got.Errors[0].Code != tc.wantCode || got.Errors[0].Message != tc.wantMessage {
				t.Errorf("status %d, errors %v: want 400, %d %q", resp.StatusCode, got.Errors, tc.wantCode, tc.wantMessage)
			}
			if now, _ := e.sim.Tunnel(e.account, a.ID); now.PSK != a.PSK {
				t.Error("a refused body changed a key")
			}
		})
	}
}

// TestSetBatchLimit: a batch longer than the limit is refused whole with
// 413, one at the limit is served; no limit by default.
func TestSetBatchLimit(t *testing.T) {
	e := newEdge(t)
	var pairs []string
	for _, key := range []string{keyA, keyB, keyC} {
		pairs = append(pairs, e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{}).ID, key)
	}
	if status, _, res := e.set(t, "", psks(pairs...)); status != 200 || len(res.Applied) != 3 {
		t.Fatalf("without a limit: status %d, %d applied", status, len(res.Applied))
	}
	e.sim.SetPSKBatchLimit(2)
	status, a, _ := e.set(t, "", psks(pairs...))
	if status != http.StatusRequestEntityTooLarge || len(a.Errors) != 1 || a.Errors[0].Code != 1004 || a.Errors[0].Message != "too many psks in one request: at most 2" {
		t.Fatalf("over the limit: status %d, errors %v", status, a.Errors)
	}
	if now, _ := e.sim.Tunnel(e.account, pairs[0]); len(now.GeneratedPSKs) != 2 {
		t.Error("a batch over the limit changed a key")
	}
	if status, _, res := e.set(t, "", psks(pairs[:4]...)); status != 200 || len(res.Applied) != 2 {
		t.Fatalf("at the limit: status %d, %d applied", status, len(res.Applied))
	}
	e.sim.SetPSKBatchLimit(0)
	if status, _, _ := e.set(t, "", psks(pairs...)); status != 200 {
		t.Fatalf("limit removed: status %d", status)
	}
}

// TestSetFaults plays the failures of issue 16 on the Set operation: some
// tunnels unapplied, the answer lost after the change, a hang after the
// change, and a refusal before any change.
func TestSetFaults(t *testing.T) {
	cases := []struct {
		name       string
		fault      cloudflaresim.Fault
		wantStatus int // 0: no answer
		// wantSet says, for tunnels a and b, whether the edge took the key.
		wantSet [2]bool
	}{
		{name: "some tunnels unapplied", fault: cloudflaresim.Fault{Unapplied: map[string]string{"B": ""}},
			wantStatus: 200, wantSet: [2]bool{true, false}},
		{name: "answer lost after the change", fault: cloudflaresim.Fault{AfterCommit: true, Hangup: true},
			wantSet: [2]bool{true, true}},
		{name: "5xx after the change", fault: cloudflaresim.Fault{AfterCommit: true, Status: 502},
			wantStatus: 502, wantSet: [2]bool{true, true}},
		{name: "hang after the change", fault: cloudflaresim.Fault{AfterCommit: true, Delay: time.Hour},
			wantSet: [2]bool{true, true}},
		{name: "unapplied, then the answer lost", fault: cloudflaresim.Fault{AfterCommit: true, Hangup: true, Unapplied: map[string]string{"A": "busy"}},
			wantSet: [2]bool{false, true}},
		{name: "refused before the change", fault: cloudflaresim.Fault{Status: 503},
			wantStatus: 503},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEdge(t)
			a := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			b := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			ids := map[string]string{"A": a.ID, "B": b.ID}
			if tc.fault.Unapplied != nil {
				named := map[string]string{}
				for k, reason := range tc.fault.Unapplied {
					named[strings.ToUpper(ids[k])] = reason
				}
				tc.fault.Unapplied = named
			}
			e.sim.FailNext(cloudflaresim.OpPSKSet, tc.fault)
			if tc.fault.Delay > 0 {
				// A hang: the change is made, then no answer comes until
				// the caller gives up.
				ctx, giveUp := context.WithCancel(context.Background())
				errs := make(chan error, 1)
				go func() {
					_, err := e.send(ctx, http.DefaultClient, "POST", e.setPath(), psks(a.ID, keyA, b.ID, keyB))
					errs <- err
				}()
				waitFor(t, "the batch is applied", func() bool {
					now, _ := e.sim.Tunnel(e.account, b.ID)
					return now.PSK == keyB
				})
				giveUp()
				if err := <-errs; err == nil {
					t.Fatal("the hanging request was answered")
				}
			}
			status, got, err := 0, answer{}, error(nil)
			if tc.fault.Delay == 0 {
				status, got, err = e.do(t, nil, "POST", e.setPath(), psks(a.ID, keyA, b.ID, keyB))
			} else {
				err = context.Canceled
			}
			switch {
			case tc.wantStatus == 0 && err == nil:
				t.Fatalf("answered with %d, want no answer", status)
			case tc.wantStatus != 0 && (err != nil || status != tc.wantStatus):
				t.Fatalf("status %d, error %v: want %d", status, err, tc.wantStatus)
			}
			for i, id := range []string{a.ID, b.ID} {
				now, _ := e.sim.Tunnel(e.account, id)
				if set := now.PSK == []string{keyA, keyB}[i]; set != tc.wantSet[i] {
					t.Errorf("tunnel %c took its key: %v, want %v", 'a'+i, set, tc.wantSet[i])
				}
			}
			if tc.name == "some tunnels unapplied" {
				var res setAnswer
				raw, _ := json.Marshal(got.Result)
				decode(t, raw, &res)
				if res.Unapplied[b.ID] != "the edge could not apply the psk to this tunnel" || len(res.Applied) != 1 {
					t.Errorf("unapplied = %v, applied %v", res.Unapplied, keysOf(res.Applied))
				}
			}
		})
	}
}

// TestSetProcessedLate: a batch the caller gave up on is applied later,
// as sent, tunnel by tunnel as the edge then stands; a batch refused whole
// is refused at once, and a validation changes nothing.
func TestSetProcessedLate(t *testing.T) {
	const processAfter = 500 * time.Millisecond
	cases := []struct {
		name       string
		query      string
		limit      int
		between    func(e *edge, a, b string)
		wantStatus int
		wantSet    [2]bool
	}{
		{name: "processed", wantSet: [2]bool{true, true}},
		{name: "a tunnel deleted meanwhile", between: func(e *edge, a, _ string) { e.sim.DeleteTunnel(e.account, a) }, wantSet: [2]bool{false, true}},
		{name: "a key generated meanwhile is replaced", between: func(e *edge, _, b string) { e.sim.RegenerateOutOfBand(e.account, b) }, wantSet: [2]bool{true, true}},
		{name: "validate_only", query: "?validate_only=true"},
		{name: "batch too large answered at once", limit: 1, wantStatus: http.StatusRequestEntityTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEdge(t)
			a := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			b := e.sim.AddTunnel(e.account, cloudflaresim.Tunnel{})
			e.sim.SetPSKBatchLimit(tc.limit)
			e.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: processAfter})
			// The caller gives up once the edge has the request, not on
			// a timer that might fire before it arrived.
			ctx, giveUp := context.WithCancel(context.Background())
			defer giveUp()
			type reply struct {
				status int
				err    error
			}
			replies := make(chan reply, 1)
			go func() {
				status, err := e.send(ctx, http.DefaultClient, "POST", e.setPath()+tc.query, psks(a.ID, keyA, b.ID, keyB))
				replies <- reply{status, err}
			}()
			if tc.wantStatus != 0 {
				if r := <-replies; r.err != nil || r.status != tc.wantStatus {
					t.Fatalf("status %d, error %v: want %d at once", r.status, r.err, tc.wantStatus)
				}
			} else {
				waitFor(t, "the edge has the request", func() bool { return e.sim.Calls(cloudflaresim.OpPSKSet) == 1 })
				giveUp()
				if r := <-replies; r.err == nil {
					t.Fatalf("answered with %d, want no answer", r.status)
				}
			}
			for _, id := range []string{a.ID, b.ID} {
				if now, _ := e.sim.Tunnel(e.account, id); now.PSK == keyA || now.PSK == keyB {
					t.Fatal("a key was set before ProcessAfter")
				}
			}
			if tc.between != nil {
				tc.between(e, a.ID, b.ID)
			}
			e.sim.WaitIdle()
			for i, id := range []string{a.ID, b.ID} {
				now, _ := e.sim.Tunnel(e.account, id)
				if set := now.PSK == []string{keyA, keyB}[i]; set != tc.wantSet[i] {
					t.Errorf("tunnel %c took its key: %v, want %v", 'a'+i, set, tc.wantSet[i])
				}
			}
		})
	}
}

// TestSetCountsOneCallPerBatch: Cloudflare's rate limit counts requests,
// so a batch of fifty keys costs what one key costs.
func TestSetCountsOneCallPerBatch(t *testing.T) {
	sim := cloudflaresim.New()
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	t.Cleanup(sim.Close)
	sim.SetRateLimit(3, time.Minute)
	e := &edge{sim: sim, url: srv.URL + cloudflaresim.BasePath, token: sim.AddToken(cloudflaresim.Token{}).Value, account: cloudflaresim.NewID()}
	var pairs []string
	for range 50 {
		pairs = append(pairs, sim.AddTunnel(e.account, cloudflaresim.Tunnel{}).ID, cloudflaresim.NewID())
	}
	req, _ := http.NewRequestWithContext(context.Background(), "POST", e.url+e.setPath(), strings.NewReader(string(psks(pairs...))))
	req.Header.Set("Authorization", "Bearer "+e.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Ratelimit"), `"default";r=2;`) {
		t.Errorf("status %d, Ratelimit %q: want one of three calls spent", resp.StatusCode, resp.Header.Get("Ratelimit"))
	}
	if n := sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
		t.Errorf("Set calls = %d, want 1", n)
	}
}
