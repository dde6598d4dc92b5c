package cloudflaresim

import (
	"slices"
	"strings"
	"time"
)

// Things that happen to a tunnel outside the engine's requests: the
// dashboard, Terraform or another Vault cluster changing its key, or the
// tunnel being deleted.

// RegenerateOutOfBand gives a tunnel a new key the way someone other than
// the engine would (the dashboard, Terraform, another cluster): it is
// recorded like any generation, but no API call is counted. It returns the
// tunnel as it stands afterwards, and false when there is no such tunnel.
func (s *Server) RegenerateOutOfBand(accountID, tunnelID string) (Tunnel, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.accounts[strings.ToLower(accountID)][strings.ToLower(tunnelID)]
	if !ok {
		return Tunnel{}, false
	}
	s.generatePSK(t)
	return copyTunnel(t), true
}

// EditOutOfBand changes a tunnel the way the dashboard or Terraform would
// (its endpoints, addresses, name or identities): edit is applied to the
// tunnel, and no API call is counted. The key and its history cannot be
// changed this way (RegenerateOutOfBand does that), nor the id. It returns
// the tunnel as it stands afterwards, and false when there is no such
// tunnel.
func (s *Server) EditOutOfBand(accountID, tunnelID string, edit func(*Tunnel)) (Tunnel, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.accounts[strings.ToLower(accountID)][strings.ToLower(tunnelID)]
	if !ok {
		return Tunnel{}, false
	}
	edited := copyTunnel(t)
	edit(&edited)
	edited.ID, edited.CreatedOn = t.ID, t.CreatedOn
	edited.PSK, edited.PSKGeneratedOn, edited.GeneratedPSKs = t.PSK, t.PSKGeneratedOn, t.GeneratedPSKs
	edited.ModifiedOn = s.stamp()
	*t = edited
	return copyTunnel(t), true
}

// DeleteTunnel removes a tunnel from its account, as a deletion at
// Cloudflare would: afterwards reading it or generating its key answers 404
// (code 1002) and the account's list omits it. It reports whether the
// tunnel existed.
func (s *Server) DeleteTunnel(accountID, tunnelID string) bool {
	accountID, tunnelID = strings.ToLower(accountID), strings.ToLower(tunnelID)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.accounts[accountID][tunnelID]; !ok {
		return false
	}
	delete(s.accounts[accountID], tunnelID)
	return true
}

// lateJob is one piece of work the edge does after a delay.
type lateJob struct {
	timer *time.Timer
	due   time.Time
	fn    func()
}

// later runs fn, holding mu, after d, unless Close comes first. A pending
// job costs a timer, not a goroutine. The caller holds mu.
func (s *Server) later(d time.Duration, fn func()) {
	if s.closed {
		return
	}
	job := &lateJob{due: time.Now().Add(d), fn: fn}
	s.late[job] = struct{}{}
	s.lateRunning.Add(1)
	job.timer = time.AfterFunc(d, func() {
		defer s.lateRunning.Done()
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, pending := s.late[job]; !pending {
			return // dropped by Close
		}
		delete(s.late, job)
		fn()
		s.idle.Broadcast()
	})
}

// WaitIdle blocks until the edge has done all the work it accepted for
// later (see Fault.ProcessAfter), or Close dropped it. A request counts from
// the moment Calls counts it: a test that waits for Calls to reach n and
// then for WaitIdle sees the late work of all n requests done.
func (s *Server) WaitIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.late) > 0 || s.lateFaults > s.queuedLateFaults() {
		s.idle.Wait()
	}
}

// WaitAccepted blocks until every request that took a ProcessAfter fault
// has been accepted for later work or refused: after it, a test may make
// the caller give up knowing the request already reached the edge.
func (s *Server) WaitAccepted() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.lateFaults > s.queuedLateFaults() {
		s.idle.Wait()
	}
}

// ProcessLateNow does, at once and in the order it was due, all the work
// the edge accepted for later (Fault.ProcessAfter): a test decides when
// an abandoned request lands instead of racing a timer.
func (s *Server) ProcessLateNow() {
	s.mu.Lock()
	defer s.mu.Unlock()
	jobs := make([]*lateJob, 0, len(s.late))
	for job := range s.late {
		jobs = append(jobs, job)
	}
	slices.SortFunc(jobs, func(a, b *lateJob) int { return a.due.Compare(b.due) })
	for _, job := range jobs {
		delete(s.late, job)
		if job.timer.Stop() {
			s.lateRunning.Done() // its timer will never run
		}
		job.fn()
	}
	s.idle.Broadcast()
}

// queuedLateFaults counts the ProcessAfter faults no call has taken yet.
// The caller holds mu.
func (s *Server) queuedLateFaults() int {
	n := 0
	for _, queue := range s.faults {
		for _, f := range queue {
			if f.ProcessAfter > 0 {
				n++
			}
		}
	}
	return n
}

// Close ends the simulator's life: delayed work not yet done is dropped,
// requests held without an answer (Fault.ProcessAfter, Fault.Delay) are
// aborted, and Close returns once no timer of the simulator can still run
// its work. Requests are still answered afterwards, but no work is
// scheduled and a fault that would hold a request aborts it. Close may be
// called more than once.
func (s *Server) Close() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.done)
	}
	for job := range s.late {
		delete(s.late, job)
		if job.timer.Stop() {
			s.lateRunning.Done() // its function will never run
		}
	}
	s.idle.Broadcast()
	s.mu.Unlock()
	s.lateRunning.Wait()
}
