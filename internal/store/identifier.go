package store

// Cloudflare identifiers (accounts, tunnels) in their one canonical form.

import (
	"fmt"
	"regexp"
)

var (
	identifierPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)
	// upperCaseIdentifier is an identifier spelt with upper-case letters.
	upperCaseIdentifier = regexp.MustCompile(`^[0-9a-fA-F]{32}$`)
)

// ParseIdentifier checks that raw is a Cloudflare identifier in its one
// canonical form, 32 lower-case hexadecimal characters, and returns it. Any
// other spelling is refused, never folded: Vault matches policy paths
// case-sensitively, so an engine that took "ABC…" for "abc…" would let a
// caller reach a tunnel a policy denies by spelling its id in upper case.
// The problem never repeats the value: a mistyped path can hold anything, a
// key included.
func ParseIdentifier(field, raw string) (string, string) {
	if problem := CheckIdentifier(field, raw); problem != "" {
		return "", problem
	}
	return raw, ""
}

// CheckIdentifier is ParseIdentifier's check: a problem naming field, or "".
func CheckIdentifier(field, id string) string {
	switch {
	case identifierPattern.MatchString(id):
		return ""
	case upperCaseIdentifier.MatchString(id):
		return fmt.Sprintf("%s must be a Cloudflare identifier in its canonical form, 32 lower-case hexadecimal characters: "+
			"this one has upper-case letters. Vault matches policy paths case-sensitively, so the engine takes each id "+
			"in one spelling only; write it in lower case", field)
	}
	return fmt.Sprintf("%s must be a Cloudflare identifier: 32 lower-case hexadecimal characters (got %d characters)", field, len(id))
}
