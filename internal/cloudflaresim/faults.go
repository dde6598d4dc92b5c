package cloudflaresim

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Fault is one failure the simulator plays instead of a normal answer.
type Fault struct {
	// Status is the HTTP status of the failure; 500 when zero.
	Status int
	// Errors go in the envelope; a default for Status when empty.
	Errors []Message
	// RetryAfter, in seconds, is sent as the Retry-After header when set,
	// with Body too.
	RetryAfter int
	// SuccessFalse answers HTTP 200 with "success": false.
	SuccessFalse bool
	// Body, when set, is sent as the raw answer instead of an envelope, under
	// Status (200 when zero): a malformed or truncated answer, or the page a
	// proxy or gateway answers with.
	Body string
	// Delay holds the answer back, or until the caller gives up.
	Delay time.Duration
	// AfterCommit first does what the request asked (a psk_generate rotates
	// the edge's key), then plays the rest of the fault (delay included):
	// the answer is lost, the change is not.
	AfterCommit bool
	// Hangup closes the connection without any answer.
	Hangup bool
	// IgnoreValidateOnly plays a gateway between the engine and Cloudflare
	// that dropped the query string: a psk_generate?validate_only=true is
	// carried out as a real generation (the edge's key changes and the
	// answer carries it). With no other field set the request is otherwise
	// answered normally; with others, they are played as usual.
	IgnoreValidateOnly bool
	// Unapplied makes a Set request (OpPSKSet) leave the keys of these
	// tunnels (ids, any case) unset and report each in unapplied_psks with
	// its reason ("": a default one), whatever the edge would have done
	// with them; the rest of the batch is applied as usual. It is played
	// wherever the batch is applied: in the normal answer, before a lost
	// answer (AfterCommit) and in late processing (ProcessAfter). With no
	// other field set the request is otherwise answered normally. Other
	// operations ignore it.
	Unapplied map[string]string
	// ProcessAfter plays a request the edge accepted but processed late:
	// the caller gets no answer (the request is held until the caller gives
	// up), and ProcessAfter after the request arrived the edge does what it
	// asked anyway, whether or not the caller is still there and whatever
	// was processed in between. For psk_generate that is a new key, dated
	// when it is processed, which replaces any key generated meanwhile: the
	// late request wins, as it would at Cloudflare. For the Set operation
	// it is the batch as sent, judged tunnel by tunnel when it is
	// processed (a tunnel deleted meanwhile gets nothing) and dated then.
	// A request the edge would refuse whole (bad token, unknown tunnel, no
	// body, a batch too large) is refused at once, and a validate_only
	// request changes nothing. On other operations the request is only
	// held. When set, the fault's other fields are ignored, but for
	// Unapplied.
	// Server.WaitIdle waits for the late work; Server.Close drops it.
	ProcessAfter time.Duration
}

// FailNext queues a fault for the next call of op. Faults queued for one
// operation are played in order, one per call.
func (s *Server) FailNext(op Operation, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[op] = append(s.faults[op], f)
	if f.ProcessAfter > 0 {
		s.lateFaults++
	}
}

func (s *Server) applyFault(w http.ResponseWriter, r *http.Request, op Operation, f Fault, h func(http.ResponseWriter, *http.Request)) {
	arrived := time.Now()
	if f.ProcessAfter > 0 {
		if s.acceptLate(w, r, op, arrived, f.ProcessAfter) {
			s.hold(r)
		}
		return
	}
	if f.AfterCommit {
		// Run the real operation against a throwaway writer so that the edge
		// changes, then answer with the fault.
		h(discardWriter{header: http.Header{}}, r)
	}
	if f.Delay > 0 {
		select {
		case <-r.Context().Done():
			return
		case <-s.done:
			panic(http.ErrAbortHandler)
		case <-time.After(f.Delay):
		}
	}
	if f.Hangup {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	if f.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(f.RetryAfter))
	}
	if f.Body != "" {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(statusOr(f.Status, http.StatusOK))
		_, _ = w.Write([]byte(f.Body))
		return
	}
	status := statusOr(f.Status, http.StatusInternalServerError)
	if f.SuccessFalse {
		status = http.StatusOK
	}
	errs := f.Errors
	if len(errs) == 0 {
		if m, ok := defaultFaultErrors[status]; ok {
			errs = []Message{m}
		} else {
			errs = []Message{errInternal}
		}
	}
	writeFailure(w, status, errs...)
}

// acceptLate plays the arrival of a request with a ProcessAfter fault: a
// psk_generate or Set request the edge would refuse is answered at once
// (false); one it accepts is scheduled to be processed after a delay counted
// from arrived (true: hold the request). Requests of other operations are
// accepted with nothing to do. Either way the fault stops counting as
// accepted work that WaitIdle has not yet seen.
func (s *Server) acceptLate(w http.ResponseWriter, r *http.Request, op Operation, arrived time.Time, after time.Duration) bool {
	var accountID, tunnelID string
	var set *pskSetRequest
	ok := true
	switch op {
	case OpPSKGenerate:
		accountID, tunnelID, ok = s.tunnelFromPath(w, r)
		if ok && !jsonObjectBody(r) {
			writeFailure(w, http.StatusBadRequest, errBodyNotJSON)
			ok = false
		}
	case OpPSKSet:
		set = s.readPSKSet(w, r)
		ok = set != nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lateFaults--
	s.idle.Broadcast()
	if !ok || r.URL.Query().Get("validate_only") == "true" {
		return ok
	}
	switch op {
	case OpPSKGenerate:
		if t := s.accounts[accountID][tunnelID]; t != nil {
			s.later(after-time.Since(arrived), func() {
				// A tunnel deleted meanwhile (or deleted and added again
				// under its id) gets nothing.
				if s.accounts[accountID][tunnelID] == t {
					s.generatePSK(t)
				}
			})
		}
	case OpPSKSet:
		// Each tunnel is judged when the batch is processed, as the
		// edge would: one deleted meanwhile is not found, one created
		// meanwhile under a named id takes its key.
		s.later(after-time.Since(arrived), func() { s.applyPSKSet(set) })
	}
	return true
}

// jsonObjectBody reports whether a request carries a JSON object, as
// psk_generate requires (the same check as pskGenerate's).
// readJSONObject reads r's body, at most limit bytes, as a JSON object
// sent as application/json; false when it is not one.
func readJSONObject(r *http.Request, limit int64) (map[string]json.RawMessage, bool) {
	if !strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
		return nil, false
	}
	var body map[string]json.RawMessage
	if json.NewDecoder(io.LimitReader(r.Body, limit)).Decode(&body) != nil || body == nil {
		return nil, false
	}
	return body, true
}

func jsonObjectBody(r *http.Request) bool {
	var body map[string]any
	return strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") &&
		json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&body) == nil && body != nil
}

// hold keeps a request unanswered until the caller gives up; Close aborts
// it, so that no handler outlives the simulator.
func (s *Server) hold(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-s.done:
		panic(http.ErrAbortHandler)
	}
}

func statusOr(status, fallback int) int {
	if status == 0 {
		return fallback
	}
	return status
}

type discardWriter struct{ header http.Header }

func (d discardWriter) Header() http.Header         { return d.header }
func (d discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d discardWriter) WriteHeader(int)             {}
