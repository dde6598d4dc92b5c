package cloudflaresim

import (
	"fmt"
	"net/http"
	"strings"
	"time"
)

// limitKey returns whose window a request with this bearer token counts
// against. Cloudflare's limit is per user: every token, API key and
// dashboard session of one user share it, while an account-owned token has
// its own. Keys use the token's id, not its value, so that rolling a token
// does not give it a fresh window. An unknown value counts on its own. The
// caller holds mu.
func (s *Server) limitKey(bearer string) string {
	t, known := s.tokens[bearer]
	switch {
	case !known:
		return "value:" + bearer
	case t.OwnerAccount != "":
		return "token:" + t.ID
	case t.User != "":
		return "user:" + t.User
	default:
		return "token:" + t.ID
	}
}

// announceRateLimit sets the headers Cloudflare sends with every answer of
// its REST API, in the form its documentation gives
// (https://developers.cloudflare.com/fundamentals/api/reference/limits/,
// after the IETF RateLimit header draft):
//
//	Ratelimit: "default";r=50;t=30        remaining quota, seconds to reset
//	Ratelimit-Policy: "default";q=100;w=60   quota, window in seconds
//
// blocked is how long the key is still blocked (then nothing remains until
// the block ends). The caller holds mu and has counted the request.
func (s *Server) announceRateLimit(h http.Header, key string, blocked time.Duration) {
	if s.limit == nil {
		return
	}
	remaining, reset := 0, blocked
	if blocked <= 0 {
		w := s.limit.tokens[key]
		remaining = max(s.limit.limit-w.count, 0)
		reset = w.start.Add(s.limit.window).Sub(s.now())
	}
	h.Set("Ratelimit", fmt.Sprintf(`"default";r=%d;t=%d`, remaining, ceilSeconds(reset)))
	h.Set("Ratelimit-Policy", fmt.Sprintf(`"default";q=%d;w=%d`, s.limit.limit, ceilSeconds(s.limit.window)))
}

// ceilSeconds rounds up, as Cloudflare does for Retry-After: a scaled-down
// window of a fraction of a second still announces one.
func ceilSeconds(d time.Duration) int {
	return int((max(d, 0) + time.Second - 1) / time.Second)
}

// checkRateLimit counts a request against its user's window and announces
// the window's state on w. It returns how long the user is blocked, zero
// when the request may proceed.
func (s *Server) checkRateLimit(w http.ResponseWriter, r *http.Request) time.Duration {
	bearer, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.mu.Lock()
	defer s.mu.Unlock()
	key := s.limitKey(bearer)
	blocked := s.overLimit(key)
	s.announceRateLimit(w.Header(), key, blocked)
	return blocked
}
