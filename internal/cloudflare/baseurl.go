package cloudflare

import (
	"fmt"
	"net"
	"net/url"
	"strings"
)

// MaxBaseURLLength bounds the base URL a mount may be configured with.
const MaxBaseURLLength = 2048

// CheckBaseURL says what is wrong with raw as the API's base URL, "" when
// nothing is. It accepts https URLs, and http only for a loopback host (the
// simulator): the token sent in clear text must not leave the machine. The
// answer names base_url, the config field it comes from.
func CheckBaseURL(raw string) string {
	if len(raw) > MaxBaseURLLength {
		return fmt.Sprintf("base_url must be at most %d characters", MaxBaseURLLength)
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Sprintf("base_url %q is not an absolute URL", raw)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "base_url must not carry credentials, a query or a fragment"
	}
	switch u.Scheme {
	case "https":
		return ""
	case "http":
		if isLoopbackHost(u.Hostname()) {
			return ""
		}
		return fmt.Sprintf("base_url %q uses plain http to a host that is not loopback; use https", raw)
	}
	return fmt.Sprintf("base_url %q must use https", raw)
}

func isLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
