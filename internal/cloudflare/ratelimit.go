package cloudflare

import (
	"strconv"
	"strings"
	"time"
)

// parseRatelimit reads Cloudflare's Ratelimit header (all its lines). Its
// documentation (https://developers.cloudflare.com/fundamentals/api/
// reference/limits/, and the changelog of 2025-09-03 that introduced it)
// gives it as a list of service limit items in the IETF RateLimit header
// draft's structured-field form, each a limit name, the remaining quota r
// and the seconds t until the window resets:
//
//	Ratelimit: "default";r=50;t=30
//
// The companion Ratelimit-Policy ("burst";q=100;w=60: quota and window) is
// not read: r and t already say all the Budget needs.
//
// With several items the tightest one counts (fewest remaining; of those,
// the latest reset). Items without a usable r and t are skipped; ok is
// false when none is left. A reset past maxBlock is cut to it, as a
// Retry-After is. Nothing here trusts the header to be well-formed.
func parseRatelimit(values []string) (remaining int, reset time.Duration, ok bool) {
	for _, line := range values {
		for _, item := range splitOutsideQuotes(line, ',') {
			r, t, good := parseRatelimitItem(item)
			if !good {
				continue
			}
			if !ok || r < remaining || r == remaining && t > reset {
				remaining, reset, ok = r, t, true
			}
		}
	}
	return remaining, reset, ok
}

// parseRatelimitItem reads one item: a name, then ;key=value parameters,
// of which r and t must be non-negative integers (t positive).
func parseRatelimitItem(item string) (remaining int, reset time.Duration, ok bool) {
	parts := splitOutsideQuotes(item, ';')
	if parts == nil || strings.TrimSpace(parts[0]) == "" {
		return 0, 0, false
	}
	r, t := -1, -1
	for _, p := range parts[1:] {
		key, value, _ := strings.Cut(p, "=")
		n, err := strconv.Atoi(strings.TrimSpace(value))
		if err != nil || n < 0 || strings.ContainsAny(value, "+-") {
			n = -1
		}
		switch strings.TrimSpace(key) {
		case "r":
			r = n
		case "t":
			t = n
		}
	}
	if r < 0 || t <= 0 {
		return 0, 0, false
	}
	return r, time.Duration(min(t, int(maxBlock/time.Second))) * time.Second, true
}

// splitOutsideQuotes splits s at every sep that is not inside a quoted
// string (a structured-field name may hold a comma or a semicolon). It
// returns nil for an unterminated quote.
func splitOutsideQuotes(s string, sep byte) []string {
	var parts []string
	quoted, escaped, start := false, false, 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case escaped:
			escaped = false
		case quoted && c == '\\':
			escaped = true
		case c == '"':
			quoted = !quoted
		case !quoted && c == sep:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	if quoted {
		return nil
	}
	return append(parts, s[start:])
}
