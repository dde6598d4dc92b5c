package cloudflare

import (
	"errors"
	"strings"
	"testing"
	"time"
)

const (
	tunnelA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	tunnelB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	tunnelC = "cccccccccccccccccccccccccccccccc"
)

// setEnvelope wraps a result in a success envelope.
func setEnvelope(result string) []byte {
	return []byte(`{"success":true,"errors":[],"messages":[],"result":` + result + `}`)
}

// appliedEntry is a well-formed applied entry for a tunnel and key.
func appliedEntry(tunnel, key string) string {
	return `{"ipsec_id":"12345_` + tunnel + `","ipsec_tunnel_id":"` + tunnel + `","psk":"` + key + `","psk_metadata":{"last_generated_on":"2026-03-04T05:06:07.123456Z"}}`
}

// TestDecodeSetPSKs holds each rule of the answer's reading to a case: what
// makes a tunnel applied, unapplied or unknown, and what makes the whole
// answer malformed.
func TestDecodeSetPSKs(t *testing.T) {
	sent := []PSKToSet{{tunnelA, setKeyA}, {strings.ToUpper(tunnelB), setKeyB}}
	good := appliedEntry(tunnelA, setKeyA)
	cases := []struct {
		name     string
		result   string
		validate bool
		// want is each sent tunnel's outcome; wantReason a part of the
		// first tunnel's reason.
		want       [2]PSKOutcome
		wantReason string
		wantUnexp  []string
		malformed  string
	}{
		{name: "both fates", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + good + `},"unapplied_psks":{"` + tunnelB + `":"not found"}}`,
			want: [2]PSKOutcome{PSKApplied, PSKUnapplied}},
		{name: "ids in another case", result: `{"successfully_applied_psks":{"` + strings.ToUpper(tunnelA) + `":` + good + `},"unapplied_psks":{"` + tunnelB + `":"x"}}`,
			want: [2]PSKOutcome{PSKApplied, PSKUnapplied}},
		{name: "maps absent", result: `{}`, want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "says nothing of this tunnel"},
		{name: "maps null", result: `{"successfully_applied_psks":null,"unapplied_psks":null}`, want: [2]PSKOutcome{PSKUnknown, PSKUnknown}},
		{name: "fields the schema may gain", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `{`, `{"new":[1],`, 1) + `},"more":{}}`,
			want: [2]PSKOutcome{PSKApplied, PSKUnknown}},
		{name: "another key", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + appliedEntry(tunnelA, setKeyB) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "not the key sent"},
		{name: "keys swapped between tunnels", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + appliedEntry(tunnelA, setKeyB) + `,"` + tunnelB + `":` + appliedEntry(tunnelB, setKeyA) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "not the key sent"},
		{name: "no key", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `"psk":"`+setKeyA+`",`, "", 1) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "does not carry it"},
		{name: "key not a string", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `"psk":"`+setKeyA+`"`, `"psk":["`+setKeyA+`"]`, 1) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "does not carry it"},
		{name: "key twice in the entry", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `{`, `{"psk":"`+setKeyB+`",`, 1) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "does not carry it once"},
		{name: "entry for another tunnel", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `"ipsec_tunnel_id":"`+tunnelA, `"ipsec_tunnel_id":"`+tunnelC, 1) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "names another tunnel"},
		{name: "no ipsec_tunnel_id", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `"ipsec_tunnel_id":"`+tunnelA+`",`, "", 1) + `}}`,
			want: [2]PSKOutcome{PSKApplied, PSKUnknown}},
		{name: "no date", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `"last_generated_on":"2026-03-04T05:06:07.123456Z"`, "", 1) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "does not date it"},
		{name: "no date, validating", validate: true, result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `"last_generated_on":"2026-03-04T05:06:07.123456Z"`, "", 1) + `}}`,
			want: [2]PSKOutcome{PSKApplied, PSKUnknown}},
		{name: "no psk_metadata", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, `,"psk_metadata":{"last_generated_on":"2026-03-04T05:06:07.123456Z"}`, "", 1) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "no psk_metadata"},
		{name: "date not a date", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + strings.Replace(good, "2026-03-04T05:06:07.123456Z", "yesterday", 1) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "not a date"},
		{name: "entry not an object", result: `{"successfully_applied_psks":{"` + tunnelA + `":"` + setKeyA + `"}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "not an object"},
		{name: "in both maps", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + good + `},"unapplied_psks":{"` + tunnelA + `":"no"}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "more than once"},
		{name: "twice in one map, differing in case", result: `{"unapplied_psks":{"` + tunnelA + `":"no","` + strings.ToUpper(tunnelA) + `":"no"}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "more than once"},
		{name: "twice in one map, a duplicate name", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + good + `,"` + tunnelA + `":` + appliedEntry(tunnelA, setKeyB) + `}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "more than once"},
		{name: "reason not a string", result: `{"unapplied_psks":{"` + tunnelA + `":{"why":"no"},"` + tunnelB + `":null}}`,
			want: [2]PSKOutcome{PSKUnknown, PSKUnknown}, wantReason: "without a reason as a string"},
		{name: "reason quoting keys, with control characters", result: `{"unapplied_psks":{"` + tunnelA + `":"bad key ` + setKeyA + ` (like ` + setKeyB + `)\n"}}`,
			want: [2]PSKOutcome{PSKUnapplied, PSKUnknown}, wantReason: "bad key [a key sent] (like [a key sent]) "},
		{name: "empty reason", result: `{"unapplied_psks":{"` + tunnelA + `":""}}`,
			want: [2]PSKOutcome{PSKUnapplied, PSKUnknown}, wantReason: "(Cloudflare gave no reason)"},
		{name: "a tunnel not sent", result: `{"successfully_applied_psks":{"` + tunnelA + `":` + good + `,"` + tunnelC + `":` + appliedEntry(tunnelC, setKeyC) + `},"unapplied_psks":{"` + setKeyB + `":"x"}}`,
			want: [2]PSKOutcome{PSKApplied, PSKUnknown}, wantUnexp: []string{"[a key sent]", tunnelC}},
		{name: "result not an object", result: `[]`, malformed: "the result is not an object"},
		{name: "result null", result: `null`, malformed: "the result is not an object"},
		{name: "a map not an object", result: `{"unapplied_psks":["` + setKeyA + `"]}`, malformed: "unapplied_psks is not an object"},
		{name: "a map twice", result: `{"unapplied_psks":{},"unapplied_psks":{}}`, malformed: "the result has unapplied_psks twice"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res, err := decodeSetPSKs(setEnvelope(tc.result), sent, tc.validate)
			if tc.malformed != "" {
				var malformed *MalformedResponseError
				if !errors.As(err, &malformed) || !strings.Contains(err.Error(), tc.malformed) {
					t.Fatalf("err = %v, want malformed: %s", err, tc.malformed)
				}
				assertNoKey(t, "the error", err.Error())
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for i, want := range tc.want {
				if got := res.Tunnels[i]; got.Outcome != want || got.TunnelID != sent[i].TunnelID {
					t.Errorf("tunnel %d: %s %v (%s), want %v", i, got.TunnelID, got.Outcome, got.Reason, want)
				}
			}
			if !strings.Contains(res.Tunnels[0].Reason, tc.wantReason) {
				t.Errorf("reason %q, want it to hold %q", res.Tunnels[0].Reason, tc.wantReason)
			}
			if strings.Join(res.Unexpected, ",") != strings.Join(tc.wantUnexp, ",") {
				t.Errorf("unexpected = %v, want %v", res.Unexpected, tc.wantUnexp)
			}
			if a := res.Tunnels[0]; a.Outcome == PSKApplied && !tc.validate {
				if !a.LastGeneratedOn.Equal(time.Date(2026, 3, 4, 5, 6, 7, 123456000, time.UTC)) || a.IPsecID != "12345_"+tunnelA {
					t.Errorf("applied: %+v", a)
				}
			}
			assertResultQuotesNoKey(t, res)
		})
	}
}

// TestCleanTextBoundsLength: a long reason is cut at a character
// boundary.
func TestCleanTextBoundsLength(t *testing.T) {
	got := cleanText(strings.Repeat("é", 400), nil)
	if len(got) > maxText+len("…") || !strings.HasSuffix(got, "…") || strings.ContainsRune(got, '\uFFFD') {
		t.Errorf("cleanText gave %d bytes: %q", len(got), got)
	}
}

// TestCleanTextCutsPartsOfKeys: a refusal that quotes part of a key sent
// (as APIs quote a value: "psk 'AbCd…' is not accepted"), in any case,
// passes none of it on; fewer than minQuoted characters in a row are left.
func TestCleanTextCutsPartsOfKeys(t *testing.T) {
	keys := []PSKToSet{{TunnelID: tunnelA, PSK: "Q7dKp2LmZx9RtVb4Nc8WyHs3Jf6Ge1Ua"}, {TunnelID: tunnelB, PSK: "short"}}
	r := newRedactor(keys)
	for _, c := range []struct{ in, want string }{
		{"psk 'Q7dKp2LmZx9RtVb4Nc8WyHs3…' is not accepted", "psk '[a key sent]…' is not accepted"},
		{"near Nc8WyHs3 and q7DKP2LM", "near [a key sent] and [a key sent]"},
		{"whole Q7dKp2LmZx9RtVb4Nc8WyHs3Jf6Ge1Ua.", "whole [a key sent]."},
		{"seven Nc8WyHs only", "seven Nc8WyHs only"},
		{"a SHORT key", "a [a key sent] key"},
	} {
		if got := cleanText(c.in, r); got != c.want {
			t.Errorf("cleanText(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// FuzzDecodeSetPSKs feeds arbitrary results, with the batch's keys
// somewhere inside, to the answer's reading. It must never panic, must
// call a tunnel applied only on an entry that echoes its key, must give one
// result per key sent, in order, and must never quote a key sent, in any
// case, in an error, a reason or an unexpected tunnel.
func FuzzDecodeSetPSKs(f *testing.F) {
	good := appliedEntry(tunnelA, setKeyA)
	f.Add(`{"successfully_applied_psks":{"`+tunnelA+`":`+good, `},"unapplied_psks":{"`+tunnelB+`":"x"}}`)
	f.Add(`{"unapplied_psks":{"`+tunnelA+`":"`, `"}}`)
	f.Add(`{"successfully_applied_psks":{"`, `":`+good+`}}`)
	f.Add(`{"successfully_applied_psks":{"`+tunnelA+`":{"psk":"`, `","psk_metadata":{"last_generated_on":"2026-01-01T00:00:00Z"}}}}`)
	f.Add(`[`, `]`)
	f.Add(`{"unapplied_psks":`, `}`)
	f.Fuzz(func(t *testing.T, prefix, suffix string) {
		sent := []PSKToSet{{tunnelA, setKeyA}, {tunnelB, setKeyB}}
		quotesAKeySent := func(text string) bool {
			lower := strings.ToLower(text)
			return strings.Contains(lower, strings.ToLower(setKeyA)) || strings.Contains(lower, strings.ToLower(setKeyB))
		}
		for _, inside := range []string{setKeyA, setKeyB} {
			res, err := decodeSetPSKs(setEnvelope(prefix+inside+suffix), sent, false)
			if err != nil {
				var malformed *MalformedResponseError
				if !errors.As(err, &malformed) {
					t.Fatalf("unexpected error type %T", err)
				}
				if quotesAKeySent(err.Error()) {
					t.Fatalf("the error quotes a key sent: %v", err)
				}
				continue
			}
			if len(res.Tunnels) != len(sent) {
				t.Fatalf("%d results for %d keys", len(res.Tunnels), len(sent))
			}
			for i, tr := range res.Tunnels {
				if tr.TunnelID != sent[i].TunnelID {
					t.Fatalf("result %d is for %s", i, tr.TunnelID)
				}
				if tr.Outcome == PSKApplied && (tr.LastGeneratedOn.IsZero() || !strings.Contains(prefix+inside+suffix, sent[i].PSK)) {
					t.Fatalf("tunnel %d applied without its key echoed and dated", i)
				}
			}
			for _, tr := range res.Tunnels {
				if quotesAKeySent(tr.Reason) {
					t.Fatalf("a reason quotes a key sent: %q", tr.Reason)
				}
			}
			for _, id := range res.Unexpected {
				if quotesAKeySent(id) {
					t.Fatalf("an unexpected tunnel's name quotes a key sent: %q", id)
				}
			}
		}
	})
}
