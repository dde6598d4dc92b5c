package e2e

// Skeptic's review of issue 17's "The IKEv2 rig cleans up after itself"
// (e2e/ikev2_leftovers_test.go, branch i17-ike).

import (
	"os"
	"testing"
)

// TestReview17IKELeftoversOfARunWithAnotherTMPDIRKeepTheirKeys: the rig
// looks for killed runs' directories in its own os.TempDir() only, while a
// run puts its directory, with both daemons' swanctl.conf (live keys) and
// Agent's secret id, in the TempDir of its own environment. A run killed
// under another TMPDIR (a login shell with pam_tmpdir's /tmp/user/0, a CI
// job's TMPDIR, versus `sudo make test` with /tmp) is found by its
// namespaces alone: the next run ends its daemon and deletes its namespaces
// (it takes them for a run from before the owner record), and leaves its
// directory, and the keys in it, where they are. Nothing clears them until
// a run happens to have that TMPDIR again.
//
// On main (d9b8c26) it printed:
//
//	a killed run whose TMPDIR was /tmp/TestReview17IKE.../001: its directory .../cfike-<id>-<n>, with the daemons' keys, is still there
//	    (its daemon ended: true; its namespaces deleted: true)
func TestReview17IKELeftoversOfARunWithAnotherTMPDIRKeepTheirKeys(t *testing.T) {
	bins := ikePreflight(t)
	other := t.TempDir()
	orig, had := os.LookupEnv("TMPDIR")
	t.Setenv("TMPDIR", other) // restored when the test ends; by hand below
	killed := plantIKERun(t, bins, true, false)
	if had {
		os.Setenv("TMPDIR", orig)
	} else {
		os.Unsetenv("TMPDIR")
	}
	if os.TempDir() == other {
		t.Fatal("TMPDIR was not restored")
	}

	clearIKELeftovers(t, bins.ip)

	nsGone := true
	for _, ns := range killed.namespaces {
		if namespaceExists(ns) {
			nsGone = false
		}
	}
	if _, err := os.Stat(killed.dir); err == nil {
		t.Errorf("a killed run whose TMPDIR was %s: its directory %s, with the daemons' keys, is still there\n"+
			"(its daemon ended: %v; its namespaces deleted: %v)", other, killed.dir, !killed.daemon.running(), nsGone)
	}
}
