//go:build !race

package e2e

// raceEnabled: without -race (make bench) the plugin is built plainly, so
// that benchmarks measure the plugin and not the race detector.
const raceEnabled = false
