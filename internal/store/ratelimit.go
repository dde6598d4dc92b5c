package store

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// RateLimitKey holds Cloudflare's last rate-limit block of the mount's
// token (a RateLimitBlock).
const RateLimitKey = "ratelimit"

// RateLimitBlock is a block Cloudflare announced, with a 429 or with a
// Ratelimit header that said no calls remain until its window resets: no
// call is sent before BlockedUntil. It is kept in storage because
// Cloudflare goes on enforcing it whatever becomes of the process that
// learnt it.
type RateLimitBlock struct {
	BlockedUntil time.Time `json:"blocked_until"`
	Reason       string    `json:"reason"`
}

// ReadRateLimitBlock returns the block on record, nil when there is none.
func ReadRateLimitBlock(ctx context.Context, s logical.Storage) (*RateLimitBlock, error) {
	entry, err := s.Get(ctx, RateLimitKey)
	if err != nil {
		return nil, fmt.Errorf("read Cloudflare's rate-limit block from Vault storage: %w", err)
	}
	if entry == nil {
		return nil, nil
	}
	block := new(RateLimitBlock)
	if err := entry.DecodeJSON(block); err != nil {
		return nil, fmt.Errorf("decode Cloudflare's rate-limit block: %w", err)
	}
	return block, nil
}

// WriteRateLimitBlock stores a block until until.
func WriteRateLimitBlock(ctx context.Context, s logical.Storage, until time.Time) error {
	entry, err := logical.StorageEntryJSON(RateLimitKey, &RateLimitBlock{
		BlockedUntil: until.UTC(),
		Reason:       "Cloudflare's rate limit blocks this API token's user: it answered HTTP 429, or said no calls remain until its window resets",
	})
	if err != nil {
		return err
	}
	return s.Put(ctx, entry)
}
