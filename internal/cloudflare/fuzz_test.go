package cloudflare

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"
)

// fuzzSecret stands for a key inside an answer. Whatever the answer looks
// like, an error that calls it malformed must not repeat the key.
const fuzzSecret = "Fz9SecretKeyThatMustNotLeak0000"

// FuzzDecodeEnvelope feeds arbitrary answers, with a key somewhere inside,
// to the envelope check. It must never panic, must return only this
// package's error types, must accept only a well-formed success, and must
// not quote the key when it calls an answer malformed.
func FuzzDecodeEnvelope(f *testing.F) {
	f.Add(200, `{"success":true,"errors":[],"messages":[],"result":{"psk":"`, `"}}`)
	f.Add(200, `{"success":false,"errors":[{"code":1000,"message":"x"}],"result":{"psk":"`, `"}}`)
	f.Add(200, `{"success":true,"result":{"psk":"`, ``)
	f.Add(200, `{"result":{"psk":"`, `"}}`)
	f.Add(403, `{"success":false,"errors":[{"code":9109,"message":"Invalid access token"}],"messages":[],"result":null,"x":"`, `"}`)
	f.Add(307, `{"success":true,"errors":[],"messages":[],"result":{"psk":"`, `"}}`)
	f.Add(429, `<html>`, `</html>`)
	f.Add(502, ``, ``)
	f.Add(200, `[`, `]`)
	f.Add(200, `{"success":"true","x":"`, `"}`)
	f.Fuzz(func(t *testing.T, status int, prefix, suffix string) {
		if status < 100 || status > 599 {
			status = 200 + (status%400+400)%400
		}
		body := []byte(prefix + fuzzSecret + suffix)
		err := decodeEnvelope(status, http.Header{"Retry-After": {"30"}}, body, time.Now())
		if err == nil {
			if status >= 300 {
				t.Fatalf("HTTP %d accepted", status)
			}
			return
		}
		var apiErr *APIError
		var malformed *MalformedResponseError
		switch {
		case errors.As(err, &apiErr):
		case errors.As(err, &malformed):
			if strings.Contains(err.Error(), fuzzSecret) {
				t.Fatalf("a malformed-answer error quotes the answer: %v", err)
			}
		default:
			t.Fatalf("unexpected error type %T", err)
		}
	})
}
