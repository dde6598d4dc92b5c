package cloudflare

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	cf "github.com/cloudflare/cloudflare-go/v6"
	"github.com/cloudflare/cloudflare-go/v6/option"
)

// PSKToSet is one tunnel's key for SetPSKs: the key the caller made and
// means the tunnel to use.
type PSKToSet struct {
	TunnelID string
	PSK      string
}

// PSKOutcome is what one answer of Cloudflare's Set operation proves about
// one tunnel's key.
type PSKOutcome int

const (
	// PSKUnknown: the answer proves nothing about this tunnel, so the edge
	// may use the key sent or the one it had. It is the zero value, so a
	// result nobody filled in claims nothing.
	PSKUnknown PSKOutcome = iota
	// PSKApplied: Cloudflare says the edge took the key sent, and echoed
	// it (SetPSKs checks that it is the key sent). With validateOnly: the
	// key passed validation and was not set, unless something between the
	// engine and Cloudflare dropped the query string (see SetPSKs).
	PSKApplied
	// PSKUnapplied: Cloudflare says it did not set the key, and why. The
	// tunnel keeps the key it had, as after a refusal in Cloudflare's
	// envelope.
	PSKUnapplied
)

func (o PSKOutcome) String() string {
	switch o {
	case PSKApplied:
		return "applied"
	case PSKUnapplied:
		return "unapplied"
	}
	return "unknown"
}

// TunnelPSKResult is what became of one tunnel's key.
type TunnelPSKResult struct {
	// TunnelID is the id as the caller gave it.
	TunnelID string
	Outcome  PSKOutcome
	// LastGeneratedOn is the answer's psk_metadata.last_generated_on for an
	// applied key: when the edge took it, by Cloudflare's clock. Setting
	// the key the tunnel already had moves it too, as far as anyone knows,
	// so it dates the write, not the key. With validateOnly it is the date
	// of the key the tunnel has now, zero when the answer gives none.
	LastGeneratedOn time.Time
	// IPsecID is the answer's ipsec_id for an applied key ("" when it has
	// none, or not as a string): the IKE identity Cloudflare's edge uses
	// for the tunnel.
	IPsecID string
	// Date is Cloudflare's time of the answer (see answerDate), the same
	// for every tunnel of the batch; zero for a tunnel of unknown outcome.
	Date time.Time
	// Reason is, for PSKUnapplied, Cloudflare's reason, with every key of
	// the batch cut out of it should it appear there, control characters
	// replaced and its length bounded; for PSKUnknown, why the answer
	// proves nothing about the tunnel. It never holds a key this client
	// sent.
	Reason string
}

// SetPSKsResult is Cloudflare's answer to one SetPSKs call, tunnel by tunnel.
type SetPSKsResult struct {
	// Tunnels has one entry for each key sent, in the order sent.
	Tunnels []TunnelPSKResult
	// ValidateOnly is the call's validateOnly.
	ValidateOnly bool
	// Date is Cloudflare's time of the answer (see answerDate).
	Date time.Time
	// Unexpected lists the tunnels (lower-case ids, sorted) that the
	// answer names but the call did not send. Their entries change nothing
	// in Tunnels: each entry about a tunnel sent is checked against the key
	// sent for it. But an answer that says a key was applied to a tunnel
	// nobody asked about may mean that tunnel's key changed: a caller that
	// manages one of them should look at it.
	Unexpected []string
}

// Tunnel returns the result for one tunnel id (any case).
func (r *SetPSKsResult) Tunnel(id string) (TunnelPSKResult, bool) {
	for _, t := range r.Tunnels {
		if strings.EqualFold(t.TunnelID, id) {
			return t, true
		}
	}
	return TunnelPSKResult{}, false
}

// InvalidBatchError is a batch SetPSKs refused to send: the caller's
// mistake, not Cloudflare's answer. Nothing was sent. Its text never quotes a
// key.
type InvalidBatchError struct {
	Reason string
}

func (e *InvalidBatchError) Error() string {
	return fmt.Sprintf("cloudflare %s: not sent: %s", OpSetPSKs, e.Reason)
}

// perTunnelAnswer is what the answer limit grows by for each key of a
// batch. An applied entry is about 200 bytes (two ids, the ipsec_id, the key,
// a date), an unapplied one a reason: 4 KiB leaves room for long reasons and
// for a key escaped six times over, while the limit still bounds what a
// broken answer can make the engine hold.
const perTunnelAnswer = 4 << 10

// SetPSKs asks Cloudflare to set the keys the caller made, one per tunnel,
// in one call ("Set Pre-Shared Keys (PSK) for IPsec tunnels", POST
// /accounts/{account_id}/magic/ipsec_tunnels/psk). The call is never
// retried, here or by the SDK: it changes keys, and a lost answer leaves
// each tunnel with the key sent or the one it had. It costs one call of the
// budget and of Cloudflare's rate limit whatever the batch size.
//
// When it returns an error, nothing is known tunnel by tunnel, and what is
// known of the whole batch is what the error says (NoEffect: no tunnel's key
// changed; BatchTooLarge: send fewer keys at once; anything else: every
// tunnel may have taken its key or kept its own). An *InvalidBatchError
// means nothing was sent: an empty batch, an empty tunnel id or key, or one
// tunnel twice (ids compared without case, as the answer is a map by id).
// An answer whose result is not the schema's shape, so that no tunnel's
// entry can be read, is a *MalformedResponseError.
//
// Otherwise the result has each tunnel's outcome. Each entry of the answer
// is checked against the key sent for its tunnel, and an entry that does not
// hold up makes that tunnel PSKUnknown, with the reason, rather than the
// whole answer: an entry that echoes the key sent can only be about this
// call, whatever else the answer says, since the key is new. A tunnel is
// PSKUnknown when the answer says nothing of it, names it twice (in one map
// or both), says it was applied with a key other than the one sent, with no
// key, without a date or with an entry for another tunnel, or says it was
// not applied without a reason as a string. Tunnels the answer names but the
// call did not send are listed in Unexpected. No error and no Reason ever
// quotes a key.
//
// With validateOnly Cloudflare only checks the request. Its answer has the
// same form as a real call's, so something between the engine and
// Cloudflare that dropped the query string would make it a real call that
// the answer cannot tell apart: validate only with keys that are harmless to
// set, such as the key the tunnel already uses.
func (c *Client) SetPSKs(ctx context.Context, accountID string, keys []PSKToSet, validateOnly bool) (*SetPSKsResult, error) {
	if err := checkBatch(keys); err != nil {
		return nil, err
	}
	ctx, cancel, err := c.start(ctx, OpSetPSKs)
	if err != nil {
		return nil, err
	}
	defer cancel()
	ctx = withResponseLimit(ctx, smallResponseLimit+len(keys)*perTunnelAnswer)

	type entry struct {
		ID  string `json:"id"`
		PSK string `json:"psk"`
	}
	entries := make([]entry, len(keys))
	for i, k := range keys {
		entries[i] = entry{ID: k.TunnelID, PSK: k.PSK}
	}
	body, err := json.Marshal(struct {
		PSKs []entry `json:"psks"`
	}{entries})
	if err != nil {
		return nil, fmt.Errorf("cloudflare %s: encode the request: %w", OpSetPSKs, err)
	}

	var raw *http.Response
	var answer []byte
	opts := []option.RequestOption{option.WithResponseInto(&raw), option.WithMaxRetries(0)}
	if validateOnly {
		opts = append(opts, option.WithQuery("validate_only", "true"))
	}
	path := "accounts/" + url.PathEscape(accountID) + "/magic/ipsec_tunnels/psk"
	// The SDK's generic client, from the services' options (never the
	// SDK's NewClient, which reads the process environment). It is made
	// here and never kept in a field: its type has a field for every
	// Cloudflare service, and a Client that held it would link every
	// service of the SDK into the plugin (TestTheSDKsOtherServicesStayUnlinked).
	api := cf.Client{Options: c.opts}
	if err := api.Post(ctx, path, body, &answer, opts...); err != nil {
		return nil, redactKeys(c.describe(OpSetPSKs, err), keys)
	}
	res, err := decodeSetPSKs(answer, keys, validateOnly)
	if err != nil {
		return nil, err
	}
	res.Date = answerDate(raw)
	for i := range res.Tunnels {
		if res.Tunnels[i].Outcome != PSKUnknown {
			res.Tunnels[i].Date = res.Date
		}
	}
	return res, nil
}

// There is no UpdateTunnelPSK, for the tunnel update's psk field: that
// update is a PUT of the whole tunnel, so setting a key through it means
// reading the tunnel and sending every field back. The read's form is not
// the update's (tunnel_health_check against health_check, read-only fields,
// fields the SDK does not decode), so a field could be lost or reset; a
// change made by someone else between the read and the PUT would be undone,
// as Cloudflare offers no condition on the write; and it costs two calls a
// tunnel where SetPSKs costs one a batch.

// redactKeys cuts the batch's keys out of the messages Cloudflare put in an
// error: a refusal of the request may quote what it refused, and the
// messages end up in logs and in the engine's answers.
func redactKeys(err error, batch []PSKToSet) error {
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		r := newRedactor(batch)
		for i := range apiErr.Errors {
			apiErr.Errors[i].Message = cleanText(apiErr.Errors[i].Message, r)
		}
	}
	return err
}

// checkBatch refuses a batch that cannot be sent as it is.
func checkBatch(keys []PSKToSet) error {
	if len(keys) == 0 {
		return &InvalidBatchError{Reason: "the batch has no keys"}
	}
	seen := make(map[string]int, len(keys))
	for i, k := range keys {
		switch {
		case k.TunnelID == "":
			return &InvalidBatchError{Reason: fmt.Sprintf("key %d has no tunnel id", i)}
		case k.PSK == "":
			return &InvalidBatchError{Reason: fmt.Sprintf("key %d (tunnel %s) is empty", i, k.TunnelID)}
		}
		id := strings.ToLower(k.TunnelID)
		if first, dup := seen[id]; dup {
			return &InvalidBatchError{Reason: fmt.Sprintf("keys %d and %d are both for tunnel %s", first, i, id)}
		}
		seen[id] = i
	}
	return nil
}

// BatchTooLarge reports whether Cloudflare refused a SetPSKs batch for its
// size (HTTP 413 in Cloudflare's envelope). No key of it was set, so the
// caller may send the same keys again in smaller batches. Cloudflare
// publishes neither its limit nor this answer: 413 is the status HTTP gives
// the case, and the one the simulator plays. A limit Cloudflare answers
// otherwise shows as a Refused error.
func BatchTooLarge(err error) bool {
	var apiErr *APIError
	return errors.As(err, &apiErr) && apiErr.HTTPStatus == http.StatusRequestEntityTooLarge && !apiErr.NoEnvelope
}

// member is one name and value of a JSON object, in the order of the text.
type member struct {
	name  string
	value json.RawMessage
}

// objectMembers reads a JSON object's members in order, duplicates
// included (encoding/json would keep only the last). ok is false when raw
// is not an object.
func objectMembers(raw json.RawMessage) ([]member, bool) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, false
	}
	var members []member
	for dec.More() {
		tok, err := dec.Token()
		name, isName := tok.(string)
		if err != nil || !isName {
			return nil, false
		}
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil, false
		}
		members = append(members, member{name: name, value: value})
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
		return nil, false
	}
	return members, true
}

// answerEntry is one tunnel's entry in the answer.
type answerEntry struct {
	applied bool
	value   json.RawMessage
}

// decodeSetPSKs reads the Set operation's answer (the whole envelope,
// already known to be a success) against the keys sent. It never quotes
// the answer.
func decodeSetPSKs(body []byte, keys []PSKToSet, validateOnly bool) (*SetPSKsResult, error) {
	malformed := func(reason string) error {
		return &MalformedResponseError{Op: OpSetPSKs, HTTPStatus: http.StatusOK, Reason: reason}
	}
	var env struct {
		Result json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		return nil, malformed("not a JSON envelope")
	}
	result, ok := objectMembers(env.Result)
	if !ok {
		return nil, malformed("the result is not an object")
	}
	entries := map[string][]answerEntry{}
	var seenMaps []string
	for _, m := range result {
		applied := m.name == "successfully_applied_psks"
		if !applied && m.name != "unapplied_psks" {
			continue // fields the schema may gain
		}
		if slices.Contains(seenMaps, m.name) {
			return nil, malformed("the result has " + m.name + " twice")
		}
		seenMaps = append(seenMaps, m.name)
		if string(m.value) == "null" {
			continue
		}
		tunnels, ok := objectMembers(m.value)
		if !ok {
			return nil, malformed(m.name + " is not an object")
		}
		for _, t := range tunnels {
			id := strings.ToLower(t.name)
			entries[id] = append(entries[id], answerEntry{applied: applied, value: t.value})
		}
	}

	res := &SetPSKsResult{ValidateOnly: validateOnly, Tunnels: make([]TunnelPSKResult, len(keys))}
	sent := make(map[string]bool, len(keys))
	redact := newRedactor(keys)
	for i, k := range keys {
		id := strings.ToLower(k.TunnelID)
		sent[id] = true
		res.Tunnels[i] = judgeEntry(k, entries[id], validateOnly, redact)
	}
	for id := range entries {
		if !sent[id] {
			// A name is not a secret, but one made of a key sent
			// would be passed on by whoever logs the list.
			res.Unexpected = append(res.Unexpected, cleanText(id, redact))
		}
	}
	slices.Sort(res.Unexpected)
	return res, nil
}

// judgeEntry says what the answer's entries about one tunnel prove.
// redact cuts every key sent, none of which a Reason may quote.
func judgeEntry(k PSKToSet, found []answerEntry, validateOnly bool, redact *redactor) TunnelPSKResult {
	unknown := func(reason string) TunnelPSKResult {
		return TunnelPSKResult{TunnelID: k.TunnelID, Outcome: PSKUnknown, Reason: reason}
	}
	switch len(found) {
	case 0:
		return unknown("the answer says nothing of this tunnel")
	case 1:
	default:
		return unknown("the answer names this tunnel more than once")
	}
	e := found[0]
	if !e.applied {
		var reason string
		if string(e.value) == "null" || json.Unmarshal(e.value, &reason) != nil {
			return unknown("the answer lists this tunnel as unapplied without a reason as a string")
		}
		reason = cleanText(reason, redact)
		if strings.TrimSpace(reason) == "" {
			reason = "(Cloudflare gave no reason)"
		}
		return TunnelPSKResult{TunnelID: k.TunnelID, Outcome: PSKUnapplied, Reason: reason}
	}

	fields, ok := objectMembers(e.value)
	if !ok {
		return unknown("the answer's entry for this tunnel in successfully_applied_psks is not an object")
	}
	// A field is taken only when the entry carries it exactly once.
	get := func(name string) (json.RawMessage, bool) {
		if f := fieldsNamed(fields, name); len(f) == 1 {
			return f[0].value, true
		}
		return nil, false
	}
	var psk string
	if raw, ok := get("psk"); !ok || string(raw) == "null" || json.Unmarshal(raw, &psk) != nil {
		return unknown("the answer says the key was applied but does not carry it once as a string")
	}
	if subtle.ConstantTimeCompare([]byte(psk), []byte(k.PSK)) != 1 {
		return unknown("the answer says a key was applied, but not the key sent")
	}
	// The schema requires ipsec_tunnel_id; an entry without it is still
	// tied to the tunnel by its name in the map and by the key it echoes.
	if ids := fieldsNamed(fields, "ipsec_tunnel_id"); len(ids) > 0 {
		var id string
		if len(ids) > 1 || json.Unmarshal(ids[0].value, &id) != nil || !strings.EqualFold(id, k.TunnelID) {
			return unknown("the answer's entry for this tunnel names another tunnel in ipsec_tunnel_id")
		}
	}
	var meta struct {
		LastGeneratedOn *string `json:"last_generated_on"`
	}
	rawMeta, hasMeta := get("psk_metadata")
	if !hasMeta || !isJSONObject(rawMeta) || json.Unmarshal(rawMeta, &meta) != nil {
		return unknown("the answer says the key was applied but has no psk_metadata object")
	}
	var generatedOn time.Time
	if meta.LastGeneratedOn != nil {
		t, err := time.Parse(time.RFC3339Nano, *meta.LastGeneratedOn)
		if err != nil {
			return unknown("the answer's psk_metadata.last_generated_on is not a date")
		}
		generatedOn = t.UTC()
	} else if !validateOnly {
		// A validation of a tunnel that has never had a key has nothing
		// to date; a key that was set has a date.
		return unknown("the answer says the key was applied but does not date it")
	}
	var ipsecID string
	if raw, ok := get("ipsec_id"); ok {
		ipsecID = extraString(string(raw))
	}
	return TunnelPSKResult{TunnelID: k.TunnelID, Outcome: PSKApplied, LastGeneratedOn: generatedOn, IPsecID: ipsecID}
}

func fieldsNamed(fields []member, name string) []member {
	var out []member
	for _, f := range fields {
		if f.name == name {
			out = append(out, f)
		}
	}
	return out
}

func isJSONObject(raw json.RawMessage) bool {
	_, ok := objectMembers(raw)
	return ok
}

// maxText bounds a text of the answer (a reason, a tunnel's name) as this
// client passes it on.
const maxText = 300

// cleanText makes a text of the answer fit for an error or a log line:
// every key of the batch, and every part of one, is cut out should the text
// quote it (redactor), control characters become spaces, and the length is
// bounded. A nil redact cuts nothing.
func cleanText(text string, redact *redactor) string {
	text = redact.cut(text)
	text = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, text)
	if len(text) > maxText {
		cut := maxText
		for cut > 0 && !utf8.RuneStart(text[cut]) {
			cut--
		}
		text = text[:cut] + "…"
	}
	return text
}

// minQuoted is the shortest run of a key's characters that a text passed
// on may not hold: an API that refuses a value often quotes part of it
// ("psk 'AbCd…' is not accepted"), and a part of a key is most of the
// work of guessing it. Eight characters of a key's alphabet are one in
// 2.8 trillion (in any case), so a text that merely happens to hold one is
// rare, and loses only those characters.
const minQuoted = 8

// redactor cuts the keys of a batch, and any run of minQuoted or more of
// their characters in a row, out of texts, in any case (a key in other
// case is all but the key). It is made once per call: every such run of
// every key, looked up by each minQuoted-byte window of a text.
type redactor struct {
	runs map[string]struct{}
	// short are keys shorter than minQuoted, cut only whole.
	short []string
}

func newRedactor(batch []PSKToSet) *redactor {
	r := &redactor{runs: map[string]struct{}{}}
	for _, k := range batch {
		if len(k.PSK) < minQuoted {
			r.short = append(r.short, k.PSK)
			continue
		}
		key := asciiLower(k.PSK)
		for i := 0; i+minQuoted <= len(key); i++ {
			r.runs[key[i:i+minQuoted]] = struct{}{}
		}
	}
	return r
}

// cut replaces each stretch of text made of runs of a key with
// "[a key sent]".
func (r *redactor) cut(text string) string {
	if r == nil {
		return text
	}
	for _, k := range r.short {
		text = replaceFold(text, k, "[a key sent]")
	}
	if len(r.runs) == 0 || len(text) < minQuoted {
		return text
	}
	lower := asciiLower(text)
	covered := make([]bool, len(text))
	found := false
	for i := 0; i+minQuoted <= len(lower); i++ {
		if _, ok := r.runs[lower[i:i+minQuoted]]; ok {
			for j := i; j < i+minQuoted; j++ {
				covered[j] = true
			}
			found = true
		}
	}
	if !found {
		return text
	}
	var b strings.Builder
	for i := 0; i < len(text); {
		if !covered[i] {
			b.WriteByte(text[i])
			i++
			continue
		}
		for i < len(text) && covered[i] {
			i++
		}
		b.WriteString("[a key sent]")
	}
	return b.String()
}

// asciiLower lower-cases ASCII letters only, so that byte offsets stay
// those of s.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// replaceFold replaces every occurrence of old in s, compared without case,
// with new. An empty old changes nothing.
func replaceFold(s, old, new string) string {
	if old == "" {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		if i+len(old) <= len(s) && strings.EqualFold(s[i:i+len(old)], old) {
			b.WriteString(new)
			i += len(old)
			continue
		}
		b.WriteByte(s[i])
		i++
	}
	return b.String()
}
