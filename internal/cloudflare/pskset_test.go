package cloudflare

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// Keys of the form the engine will send.
const (
	setKeyA = "SetKeyASetKeyASetKeyASetKeyA0001"
	setKeyB = "SetKeyBSetKeyBSetKeyBSetKeyB0002"
	setKeyC = "SetKeyCSetKeyCSetKeyCSetKeyC0003"
	setKeyD = "SetKeyDSetKeyDSetKeyDSetKeyD0004"
)

var setKeys = []string{setKeyA, setKeyB, setKeyC, setKeyD}

// assertNoKey fails when text holds one of the keys a test sent.
func assertNoKey(t *testing.T, what, text string) {
	t.Helper()
	for _, k := range append(setKeys, fuzzSecret) {
		if strings.Contains(text, k) {
			t.Errorf("%s quotes a key: %s", what, text)
		}
	}
}

// assertResultQuotesNoKey checks every text of a result.
func assertResultQuotesNoKey(t *testing.T, res *SetPSKsResult) {
	t.Helper()
	for _, tr := range res.Tunnels {
		assertNoKey(t, "a reason", tr.Reason)
	}
	for _, id := range res.Unexpected {
		assertNoKey(t, "an unexpected tunnel", id)
	}
}

// TestSetPSKsOutcomes: one call, every fate a tunnel can have in the
// answer, each checked against the edge.
func TestSetPSKsOutcomes(t *testing.T) {
	f := newFixture(t)
	clock := time.Date(2031, 5, 6, 7, 8, 9, 500_000_000, time.UTC)
	f.sim.SetClock(func() time.Time { return clock })
	applied := f.tunnel
	refusing := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{RefusePSK: "tunnel is being migrated"}).ID
	busy := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{}).ID
	missing := cloudflaresim.NewID()
	short := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{}).ID
	f.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Unapplied: map[string]string{busy: "busy; the key " + setKeyC + " was not applied"}})

	keys := []PSKToSet{{strings.ToUpper(applied), setKeyA}, {refusing, setKeyB}, {busy, setKeyC}, {missing, setKeyD}, {short, "short"}}
	res, err := f.client.SetPSKs(context.Background(), f.account, keys, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Tunnels) != len(keys) || res.ValidateOnly || !res.Date.Equal(clock.Truncate(time.Second)) || len(res.Unexpected) != 0 {
		t.Fatalf("result: %d tunnels, validate %v, date %v, unexpected %v", len(res.Tunnels), res.ValidateOnly, res.Date, res.Unexpected)
	}
	for i, k := range keys {
		if res.Tunnels[i].TunnelID != k.TunnelID {
			t.Errorf("Tunnels[%d] is %s, want %s: one per key, in order", i, res.Tunnels[i].TunnelID, k.TunnelID)
		}
	}
	edge, _ := f.sim.Tunnel(f.account, applied)
	got, _ := res.Tunnel(applied)
	if got.Outcome != PSKApplied || edge.PSK != setKeyA || !got.LastGeneratedOn.Equal(edge.PSKGeneratedOn) ||
		got.IPsecID == "" || !got.Date.Equal(res.Date) {
		t.Errorf("applied: %+v; edge took the key: %v, dated %v", got, edge.PSK == setKeyA, edge.PSKGeneratedOn)
	}
	wantUnapplied := map[string]string{
		refusing: "tunnel is being migrated",
		busy:     "busy; the key [a key sent] was not applied",
		missing:  "ipsec tunnel not found",
		short:    "psk must be 16 to 128 characters long",
	}
	for id, reason := range wantUnapplied {
		got, _ := res.Tunnel(id)
		if got.Outcome != PSKUnapplied || got.Reason != reason || !got.LastGeneratedOn.IsZero() {
			t.Errorf("tunnel %s: %v %q, want unapplied %q", id, got.Outcome, got.Reason, reason)
		}
		if now, ok := f.sim.Tunnel(f.account, id); ok && len(now.GeneratedPSKs) != 1 {
			t.Errorf("tunnel %s: unapplied, yet its key changed", id)
		}
	}
	assertResultQuotesNoKey(t, res)
	if n := f.sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
		t.Errorf("Set calls = %d, want 1", n)
	}
}

// TestSetPSKsValidateOnly: nothing changes, and each tunnel that would
// take its key reads as applied, dated as it is now.
func TestSetPSKsValidateOnly(t *testing.T) {
	f := newFixture(t)
	before, _ := f.sim.Tunnel(f.account, f.tunnel)
	res, err := f.client.SetPSKs(context.Background(), f.account, []PSKToSet{{f.tunnel, setKeyA}, {cloudflaresim.NewID(), setKeyB}}, true)
	if err != nil {
		t.Fatal(err)
	}
	after, _ := f.sim.Tunnel(f.account, f.tunnel)
	if after.PSK != before.PSK {
		t.Fatal("a validation changed the key")
	}
	if !res.ValidateOnly || res.Tunnels[0].Outcome != PSKApplied || !res.Tunnels[0].LastGeneratedOn.Equal(before.PSKGeneratedOn) || res.Tunnels[1].Outcome != PSKUnapplied {
		t.Errorf("result: %+v", res)
	}
}

// TestSetPSKsSameKeyAgain: sending the key the tunnel has is harmless and
// reads as applied, with a new date (the simulator's model of Cloudflare).
func TestSetPSKsSameKeyAgain(t *testing.T) {
	f := newFixture(t)
	var dates []time.Time
	for range 2 {
		res, err := f.client.SetPSKs(context.Background(), f.account, []PSKToSet{{f.tunnel, setKeyA}}, false)
		if err != nil || res.Tunnels[0].Outcome != PSKApplied {
			t.Fatalf("err %v, result %+v", err, res)
		}
		dates = append(dates, res.Tunnels[0].LastGeneratedOn)
	}
	if edge, _ := f.sim.Tunnel(f.account, f.tunnel); edge.PSK != setKeyA || !dates[1].After(dates[0]) {
		t.Errorf("dates %v, edge key kept: %v", dates, edge.PSK == setKeyA)
	}
}

// TestSetPSKsFailures plays each way the call can fail and checks the
// error's type, what it proves (NoEffect, BatchTooLarge), the edge, and
// that the call was sent once and quotes no key.
func TestSetPSKsFailures(t *testing.T) {
	html := "<html>413 Request Entity Too Large " + setKeyA + "</html>"
	cases := []struct {
		name       string
		fault      *cloudflaresim.Fault
		limit      int
		wantType   string
		noEffect   bool
		tooLarge   bool
		timedOut   bool
		edgeChange bool
	}{
		{name: "refused, nothing changed", fault: &cloudflaresim.Fault{Status: 403, Errors: []cloudflaresim.Message{{Code: 10000, Message: "Authentication error"}}},
			wantType: "api", noEffect: true},
		{name: "refused, quoting a key", fault: &cloudflaresim.Fault{Status: 400, Errors: []cloudflaresim.Message{{Code: 1003, Message: "invalid psk " + setKeyB + " for tunnel"}}},
			wantType: "api", noEffect: true},
		{name: "batch too large", limit: 1, wantType: "api", noEffect: true, tooLarge: true},
		{name: "413 not from Cloudflare", fault: &cloudflaresim.Fault{Status: 413, Body: html}, wantType: "malformed"},
		{name: "rate limited", fault: &cloudflaresim.Fault{Status: 429, RetryAfter: 60}, wantType: "api", noEffect: true},
		{name: "5xx after the change", fault: &cloudflaresim.Fault{Status: 502, AfterCommit: true}, wantType: "api", edgeChange: true},
		{name: "success false", fault: &cloudflaresim.Fault{SuccessFalse: true, Errors: []cloudflaresim.Message{{Code: 1000, Message: "x"}}}, wantType: "api"},
		{name: "answer lost after the change", fault: &cloudflaresim.Fault{AfterCommit: true, Hangup: true}, wantType: "transport", edgeChange: true},
		{name: "hang after the change", fault: &cloudflaresim.Fault{AfterCommit: true, Delay: time.Hour}, wantType: "transport", timedOut: true, edgeChange: true},
		{name: "result not an object", fault: &cloudflaresim.Fault{Body: `{"success":true,"errors":[],"messages":[],"result":"` + setKeyA + `"}`}, wantType: "malformed"},
		{name: "a map not an object", fault: &cloudflaresim.Fault{Body: `{"success":true,"errors":[],"messages":[],"result":{"successfully_applied_psks":["` + setKeyA + `"]}}`}, wantType: "malformed"},
		{name: "cut off", fault: &cloudflaresim.Fault{Body: `{"success":true,"errors":[],"messages":[],"result":{"successfully_applied_psks":{"x":{"psk":"` + setKeyA}, wantType: "malformed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			client, err := New(Config{APIToken: f.token.Value, BaseURL: f.baseURL, RequestTimeout: 500 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			second := f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{}).ID
			if tc.fault != nil {
				f.sim.FailNext(cloudflaresim.OpPSKSet, *tc.fault)
			}
			f.sim.SetPSKBatchLimit(tc.limit)
			res, err := client.SetPSKs(context.Background(), f.account, []PSKToSet{{f.tunnel, setKeyA}, {second, setKeyB}}, false)
			if err == nil {
				t.Fatalf("no error; result %+v", res)
			}
			var apiErr *APIError
			var malformed *MalformedResponseError
			var transport *TransportError
			gotType := map[bool]string{true: "api"}[errors.As(err, &apiErr)] +
				map[bool]string{true: "malformed"}[errors.As(err, &malformed)] +
				map[bool]string{true: "transport"}[errors.As(err, &transport)]
			if gotType != tc.wantType || NoEffect(err) != tc.noEffect || BatchTooLarge(err) != tc.tooLarge || TimedOut(err) != tc.timedOut {
				t.Errorf("err %v (%T): type %s, NoEffect %v, BatchTooLarge %v, TimedOut %v", err, err, gotType, NoEffect(err), BatchTooLarge(err), TimedOut(err))
			}
			if apiErr != nil && apiErr.Op != OpSetPSKs || malformed != nil && malformed.Op != OpSetPSKs || transport != nil && transport.Op != OpSetPSKs {
				t.Errorf("the error does not name the operation: %v", err)
			}
			assertNoKey(t, "the error", err.Error())
			if tc.edgeChange {
				// The change precedes the failure, but a hang's may
				// reach the edge after the client gave up.
				waitUntil(t, "the edge takes the keys", func() bool {
					edge, _ := f.sim.Tunnel(f.account, second)
					return edge.PSK == setKeyB
				})
			} else if edge, _ := f.sim.Tunnel(f.account, f.tunnel); edge.PSK == setKeyA {
				t.Error("the edge took a key")
			}
			if n := f.sim.Calls(cloudflaresim.OpPSKSet); n != 1 {
				t.Errorf("Set was sent %d times; it must never be retried", n)
			}
		})
	}
}

// waitUntil polls cond for up to five seconds.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

// TestSetPSKsProcessedLate: the caller gives up, the edge applies the batch
// as sent later; the error the client reports proves nothing.
func TestSetPSKsProcessedLate(t *testing.T) {
	f := newFixture(t)
	t.Cleanup(f.sim.Close)
	f.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{ProcessAfter: time.Second})
	// The caller gives up once the edge has the request, not on a timer
	// that might fire before it arrived.
	ctx, giveUp := context.WithCancel(context.Background())
	defer giveUp()
	go func() {
		for f.sim.Calls(cloudflaresim.OpPSKSet) == 0 && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		giveUp()
	}()
	_, err := f.client.SetPSKs(ctx, f.account, []PSKToSet{{f.tunnel, setKeyA}}, false)
	var transport *TransportError
	if !errors.As(err, &transport) || NoEffect(err) {
		t.Fatalf("err = %v, want a transport error that proves nothing", err)
	}
	if edge, _ := f.sim.Tunnel(f.account, f.tunnel); edge.PSK == setKeyA {
		t.Error("the batch was applied before the caller gave up")
	}
	f.sim.WaitIdle()
	if edge, _ := f.sim.Tunnel(f.account, f.tunnel); edge.PSK != setKeyA {
		t.Error("the late batch was not applied")
	}
}

// TestSetPSKsRefusesABadBatchUnsent: a batch the answer could not describe
// is not sent, and the error proves nothing changed.
func TestSetPSKsRefusesABadBatchUnsent(t *testing.T) {
	f := newFixture(t)
	cases := []struct {
		name string
		keys []PSKToSet
		want string
	}{
		{"empty", nil, "the batch has no keys"},
		{"no tunnel id", []PSKToSet{{"", setKeyA}}, "key 0 has no tunnel id"},
		{"no key", []PSKToSet{{f.tunnel, setKeyA}, {"b", ""}}, "key 1 (tunnel b) is empty"},
		{"one tunnel twice", []PSKToSet{{f.tunnel, setKeyA}, {strings.ToUpper(f.tunnel), setKeyB}}, "keys 0 and 1 are both for tunnel " + f.tunnel},
	}
	for _, tc := range cases {
		_, err := f.client.SetPSKs(context.Background(), f.account, tc.keys, false)
		var invalid *InvalidBatchError
		if !errors.As(err, &invalid) || !NoEffect(err) || IsCloudflare(err) || err.Error() != "cloudflare set psks: not sent: "+tc.want {
			t.Errorf("%s: err = %v (%T)", tc.name, err, err)
		}
		if err != nil {
			assertNoKey(t, "the error", err.Error())
		}
	}
	if n := f.sim.TotalCalls(); n != 0 {
		t.Errorf("%d calls sent", n)
	}
}

// TestSetPSKsCostsOneCallPerBatch: the budget and Cloudflare's rate limit
// count calls, not keys, so a batch of 200 keys costs one.
func TestSetPSKsCostsOneCallPerBatch(t *testing.T) {
	f := newFixture(t)
	budget := NewBudget(2, time.Hour, nil)
	client, err := New(Config{APIToken: f.token.Value, BaseURL: f.baseURL, RequestTimeout: 10 * time.Second, Budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	var keys []PSKToSet
	for i := range 200 {
		keys = append(keys, PSKToSet{f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{}).ID, fmt.Sprintf("Batch%027d", i)})
	}
	for i := range 2 {
		res, err := client.SetPSKs(context.Background(), f.account, keys, false)
		if err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
		for _, tr := range res.Tunnels {
			if tr.Outcome != PSKApplied {
				t.Fatalf("batch %d: %s %v (%s)", i, tr.TunnelID, tr.Outcome, tr.Reason)
			}
		}
	}
	_, err = client.SetPSKs(context.Background(), f.account, keys[:1], false)
	var budgetErr *BudgetError
	if !errors.As(err, &budgetErr) || !NoEffect(err) {
		t.Fatalf("third call: err = %v, want the budget's refusal", err)
	}
	if n := f.sim.Calls(cloudflaresim.OpPSKSet); n != 2 {
		t.Errorf("Set calls = %d, want 2", n)
	}
}

// TestSetPSKsAnswerLimitGrowsWithTheBatch: the answer may grow with the
// batch, so its limit does; an answer past it is malformed, naming the
// limit, never quoting the answer.
func TestSetPSKsAnswerLimitGrowsWithTheBatch(t *testing.T) {
	f := newFixture(t)
	client, err := New(Config{APIToken: f.token.Value, BaseURL: f.baseURL, RequestTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	var keys []PSKToSet
	for i := range 2000 {
		keys = append(keys, PSKToSet{f.sim.AddTunnel(f.account, cloudflaresim.Tunnel{}).ID, fmt.Sprintf("Limit%027d", i)})
	}
	// 2,000 applied entries are about 400 KB: far past the 64 KiB of a
	// one-tunnel answer, within the batch's limit.
	if _, err := client.SetPSKs(context.Background(), f.account, keys, false); err != nil {
		t.Fatalf("a batch of 2,000: %v", err)
	}
	padded := func(n int) string {
		head := `{"success":true,"errors":[],"messages":[{"code":1000,"message":"` + setKeyA
		tail := `"}],"result":{}}`
		return head + strings.Repeat("x", n-len(head)-len(tail)) + tail
	}
	limit := 64<<10 + 2*4<<10
	f.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Body: padded(limit + 1)})
	_, err = client.SetPSKs(context.Background(), f.account, keys[:2], false)
	var malformed *MalformedResponseError
	if !errors.As(err, &malformed) || !strings.Contains(err.Error(), "larger than the 72 KiB allowed for set psks") {
		t.Fatalf("err = %v, want the answer limit of a batch of two", err)
	}
	assertNoKey(t, "the error", err.Error())
	f.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{Body: padded(limit)})
	if _, err := client.SetPSKs(context.Background(), f.account, keys[:2], false); err != nil {
		t.Fatalf("an answer at the limit: %v", err)
	}
}

// TestSetPSKsValidateOnlyDroppedOnTheWay: a gateway that drops the query
// string makes a validation a real call, and the answer cannot show it:
// the key reads as applied, and it is on the edge (see SetPSKs).
func TestSetPSKsValidateOnlyDroppedOnTheWay(t *testing.T) {
	f := newFixture(t)
	f.sim.FailNext(cloudflaresim.OpPSKSet, cloudflaresim.Fault{IgnoreValidateOnly: true})
	res, err := f.client.SetPSKs(context.Background(), f.account, []PSKToSet{{f.tunnel, setKeyA}}, true)
	if err != nil {
		t.Fatal(err)
	}
	if edge, _ := f.sim.Tunnel(f.account, f.tunnel); edge.PSK != setKeyA || res.Tunnels[0].Outcome != PSKApplied {
		t.Errorf("query dropped: edge took the key %v, outcome %v", edge.PSK == setKeyA, res.Tunnels[0].Outcome)
	}
	if s := res.Tunnels[0].Outcome.String(); s != "applied" {
		t.Errorf("String() = %q", s)
	}
}
