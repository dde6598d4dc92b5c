package cloudflaresim

import "strings"

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
