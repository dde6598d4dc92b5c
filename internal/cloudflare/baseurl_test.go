package cloudflare

import (
	"strings"
	"testing"
)

func TestCheckBaseURL(t *testing.T) {
	cases := []struct {
		raw  string
		want string // a part of the answer; "" for none
	}{
		{"https://api.cloudflare.com/client/v4", ""},
		{"http://127.0.0.1:8787/client/v4", ""},
		{"http://[::1]:8787/client/v4", ""},
		{"http://LocalHost:8787/client/v4", ""},
		{"http://api.cloudflare.com/client/v4", "plain http to a host that is not loopback"},
		{"http://127.0.0.1.example.com/", "plain http to a host that is not loopback"},
		{"ftp://api.cloudflare.com/", "must use https"},
		{"api.cloudflare.com/client/v4", "not an absolute URL"},
		{"https://user:pass@api.cloudflare.com/", "must not carry credentials"},
		{"https://api.cloudflare.com/?x=1", "must not carry credentials, a query"},
		{"https://api.cloudflare.com/#f", "a fragment"},
		{"https://api.cloudflare.com/" + strings.Repeat("a", MaxBaseURLLength), "at most 2048 characters"},
	}
	for _, tc := range cases {
		got := CheckBaseURL(tc.raw)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("CheckBaseURL(%.60q) = %q, want %q", tc.raw, got, tc.want)
		}
	}
}
