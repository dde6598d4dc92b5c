package main

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// pskStoragePrefix holds one entry per tunnel at psk/<account>/<tunnel>, so
// that listing an account is one storage List and reading a tunnel is one Get.
const pskStoragePrefix = "psk/"

// pskRecord is a tunnel's PSK as stored in Vault.
type pskRecord struct {
	AccountID string `json:"account_id"`
	TunnelID  string `json:"tunnel_id"`
	PSK       string `json:"psk"`
	// LastGeneratedOn is Cloudflare's psk_metadata.last_generated_on for PSK.
	LastGeneratedOn time.Time `json:"last_generated_on"`
	// Version counts rotations stored by this engine, from 1.
	Version  int       `json:"version"`
	StoredAt time.Time `json:"stored_at"`
}

// metadata is everything a read returns except the key itself.
func (r *pskRecord) metadata() map[string]any {
	return map[string]any{
		"account_id":        r.AccountID,
		"tunnel_id":         r.TunnelID,
		"last_generated_on": formatTime(r.LastGeneratedOn),
		"version":           r.Version,
		"stored_at":         formatTime(r.StoredAt),
	}
}

// tunnelRef names one tunnel by its normalised Cloudflare identifiers.
type tunnelRef struct {
	AccountID string
	TunnelID  string
}

func (t tunnelRef) storageKey() string {
	return pskStoragePrefix + t.AccountID + "/" + t.TunnelID
}

func (t tunnelRef) String() string {
	return fmt.Sprintf("tunnel %s of account %s", t.TunnelID, t.AccountID)
}

func readPSKRecord(ctx context.Context, s logical.Storage, t tunnelRef) (*pskRecord, error) {
	entry, err := s.Get(ctx, t.storageKey())
	if err != nil {
		return nil, fmt.Errorf("read psk record for %s: %w", t, err)
	}
	if entry == nil {
		return nil, nil
	}
	rec := new(pskRecord)
	if err := entry.DecodeJSON(rec); err != nil {
		return nil, fmt.Errorf("decode psk record for %s: %w", t, err)
	}
	return rec, nil
}

func writePSKRecord(ctx context.Context, s logical.Storage, t tunnelRef, rec *pskRecord) error {
	entry, err := logical.StorageEntryJSON(t.storageKey(), rec)
	if err != nil {
		return fmt.Errorf("encode psk record for %s: %w", t, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store psk record for %s: %w", t, err)
	}
	return nil
}

var identifierPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// normaliseIdentifier lower-cases a Cloudflare identifier, so that one tunnel
// never has two records, and checks its form. The value is not repeated in
// the problem it returns: a mistyped path can hold anything, a key included.
func normaliseIdentifier(field, raw string) (string, string) {
	id := strings.ToLower(raw)
	if problem := checkIdentifier(field, id); problem != "" {
		return "", problem
	}
	return id, ""
}

func checkIdentifier(field, id string) string {
	if identifierPattern.MatchString(id) {
		return ""
	}
	return fmt.Sprintf("%s must be a Cloudflare identifier: 32 hexadecimal characters (got %d characters)", field, len(id))
}
