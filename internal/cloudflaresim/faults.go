package cloudflaresim

import (
	"net/http"
	"strconv"
	"time"
)

// Fault is one failure the simulator plays instead of a normal answer.
type Fault struct {
	// Status is the HTTP status of the failure; 500 when zero.
	Status int
	// Errors go in the envelope; a default for Status when empty.
	Errors []Message
	// RetryAfter, in seconds, is sent as the Retry-After header when set.
	RetryAfter int
	// SuccessFalse answers HTTP 200 with "success": false.
	SuccessFalse bool
	// Body, when set, is sent as the raw answer instead of an envelope: a
	// malformed or truncated answer.
	Body string
	// Delay holds the answer back, or until the caller gives up.
	Delay time.Duration
	// AfterCommit first does what the request asked (a psk_generate rotates
	// the edge's key), then plays the rest of the fault (delay included):
	// the answer is lost, the change is not.
	AfterCommit bool
	// Hangup closes the connection without any answer.
	Hangup bool
}

// FailNext queues a fault for the next call of op. Faults queued for one
// operation are played in order, one per call.
func (s *Server) FailNext(op Operation, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[op] = append(s.faults[op], f)
}

func (s *Server) applyFault(w http.ResponseWriter, r *http.Request, op Operation, f Fault, h func(http.ResponseWriter, *http.Request)) {
	if f.AfterCommit {
		// Run the real operation against a throwaway writer so that the edge
		// changes, then answer with the fault.
		h(discardWriter{header: http.Header{}}, r)
	}
	if f.Delay > 0 {
		select {
		case <-r.Context().Done():
			return
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
	if f.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(f.RetryAfter))
	}
	writeFailure(w, status, errs...)
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
