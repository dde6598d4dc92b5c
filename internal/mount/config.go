package mount

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// The config's key in storage, and the bounds and defaults of its fields.
const (
	ConfigKey             = "config"
	DefaultRequestTimeout = 30 * time.Second
	MaxRequestTimeout     = 5 * time.Minute
	MaxTokenLength        = cloudflare.MaxTokenLength
	// Cloudflare allows 1,200 requests per five minutes per user (all of
	// the user's tokens and dashboard use together; an account-owned token
	// has its own); the default leaves half for the user's other tools.
	DefaultRateLimit       = 600
	MaxRateLimit           = 1200
	DefaultRateLimitWindow = 5 * time.Minute
	// The drift sweep lists each managed account once per interval.
	DefaultDriftCheckInterval = time.Hour
	MinDriftCheckInterval     = time.Minute
	// A rotation is an outage until the tunnel's routers have the new key;
	// hourly is already far more often than any policy asks for, and a
	// team allowed only to reschedule (docs/policies/operator.hcl) can
	// cause no more than one rotation per tunnel per min_rotation_period.
	// The least it may be is schedule.MinPeriod (internal/schedule), the shortest
	// schedule the engine has ever taken.
	DefaultMinRotationPeriod = time.Hour
	MaxMinRotationPeriod     = 8760 * time.Hour
	// set_batch_size: how many keys Vault made a bulk job sends in one
	// Set call. Cloudflare publishes no limit (a batch it finds too large
	// is halved until it fits), so the bounds are the engine's own. Every
	// tunnel of a batch is locked and written ahead before the call, and
	// an answer lost leaves all of them pending, each then finished by a
	// Set call of its own: the batch size is also what one lost answer
	// can cost. 100 makes 10,000 tunnels 100 calls (a sixth of the
	// default rate_limit's window) while a lost answer costs at most 100
	// resends; 1,000 bounds the answer the engine reads (4 KiB a key, so
	// 4 MiB) and the locks one batch holds.
	DefaultSetBatchSize = rotation.DefaultSetBatchSize
	MaxSetBatchSize     = 1000
)

// Config is the mount's configuration as stored. APIToken never
// leaves storage except to authenticate calls to Cloudflare.
type Config struct {
	APIToken       string        `json:"api_token"`
	BaseURL        string        `json:"base_url"`
	RequestTimeout time.Duration `json:"request_timeout"`
	TokenAccountID string        `json:"token_account_id,omitempty"`
	// HealStalePSK lets reconciliation generate a new key when it finds that
	// Cloudflare's key is not the stored one.
	HealStalePSK bool `json:"heal_stale_psk"`
	// RateLimit caps this mount's Cloudflare calls per RateLimitWindow.
	RateLimit       int           `json:"rate_limit"`
	RateLimitWindow time.Duration `json:"rate_limit_window"`
	// DriftCheckInterval is how often the background compares every managed
	// tunnel's key time at Cloudflare with the record; 0 turns it off.
	DriftCheckInterval time.Duration `json:"drift_check_interval"`
	// MinRotationPeriod is the shortest schedule a write may set, and the
	// least time a schedule change or a schedule written before it was
	// raised leaves after a tunnel's stored key (internal/schedule). 0, in a
	// config stored before the field existed: DefaultMinRotationPeriod.
	MinRotationPeriod time.Duration `json:"min_rotation_period"`
	// KeySource is who makes new keys: store.KeySourceCloudflare (""
	// in a config stored before the field existed) or store.KeySourceVault.
	KeySource string `json:"key_source,omitempty"`
	// PasswordPolicy, with KeySource vault, names the Vault password
	// policy keys are made from ("": 32 letters and digits).
	PasswordPolicy string `json:"password_policy,omitempty"`
	// SetBatchSize is the most keys a bulk job with KeySource vault sends
	// in one Set call; 0, in a config stored before the field existed:
	// DefaultSetBatchSize.
	SetBatchSize int `json:"set_batch_size,omitempty"`

	// What Cloudflare's token-verify endpoint said when config was written.
	TokenID        string    `json:"token_id"`
	TokenStatus    string    `json:"token_status"`
	TokenExpiresOn time.Time `json:"token_expires_on"`
	TokenNotBefore time.Time `json:"token_not_before"`
	VerifiedAt     time.Time `json:"verified_at"`
	// LastRotated is when config/rotate-root last rolled the token.
	LastRotated time.Time `json:"last_rotated"`
}

// tokenExpiryWarning is how close to its expiry a token draws a warning.
const tokenExpiryWarning = 30 * 24 * time.Hour

// ExpiryWarnings warns when the token expires soon.
func (c *Config) ExpiryWarnings(now time.Time) []string {
	if c.TokenExpiresOn.IsZero() || c.TokenExpiresOn.Sub(now) > tokenExpiryWarning {
		return nil
	}
	return []string{fmt.Sprintf("the API token %s expires on %s, in %s: create a new token at Cloudflare and write it to config before then",
		c.TokenID, store.FormatTime(c.TokenExpiresOn), c.TokenExpiresOn.Sub(now).Round(time.Hour))}
}

// DriftInterval is how often the drift sweep runs (0: never).
func (c *Config) DriftInterval() time.Duration { return c.DriftCheckInterval }

// MinRotation is the floor under every schedule (see
// MinRotationPeriod); without config, or in a config stored before the
// field existed, the default.
func (c *Config) MinRotation() time.Duration {
	if c == nil || c.MinRotationPeriod <= 0 {
		return DefaultMinRotationPeriod
	}
	return c.MinRotationPeriod
}

// Settings are what the rotation engine needs of config.
func (c *Config) Settings() rotation.Settings {
	return rotation.Settings{
		RequestTimeout:    c.RequestTimeout,
		HealStalePSK:      c.HealStalePSK,
		DriftInterval:     c.DriftInterval(),
		MinRotationPeriod: c.MinRotation(),
		KeySource:         c.Source(),
		PasswordPolicy:    c.PasswordPolicy,
		SetBatchSize:      c.BatchSize(),
	}
}

// BatchSize is config set_batch_size, the default in a config stored
// before the field existed.
func (c *Config) BatchSize() int {
	if c == nil || c.SetBatchSize <= 0 {
		return DefaultSetBatchSize
	}
	return c.SetBatchSize
}

// Source is config key_source, Cloudflare in a config stored before the
// field existed.
func (c *Config) Source() string {
	if c.KeySource == "" {
		return store.KeySourceCloudflare
	}
	return c.KeySource
}

// CallBudget returns the mount's cap on Cloudflare calls.
func (c *Config) CallBudget() (int, time.Duration) { return c.RateLimit, c.RateLimitWindow }

// ReadConfig returns the config stored in s, nil when there is none.
func ReadConfig(ctx context.Context, s logical.Storage) (*Config, error) {
	entry, err := s.Get(ctx, ConfigKey)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if entry == nil {
		return nil, nil
	}
	cfg := new(Config)
	if err := entry.DecodeJSON(cfg); err != nil {
		return nil, fmt.Errorf("decode config: %w", err)
	}
	return cfg, nil
}

// SameEndpoint reports whether c and other send calls with the same token
// to the same place, so that Cloudflare's answers to one are the other's.
func (c *Config) SameEndpoint(other *Config) bool {
	return c.APIToken == other.APIToken && c.BaseURL == other.BaseURL && c.TokenAccountID == other.TokenAccountID
}

// ApplyVerification records what Cloudflare's token-verify endpoint said
// of the token, at now.
func (c *Config) ApplyVerification(status *cloudflare.TokenStatus, now time.Time) {
	c.TokenID, c.TokenStatus = status.ID, status.Status
	c.TokenExpiresOn, c.TokenNotBefore = status.ExpiresOn, status.NotBefore
	c.VerifiedAt = now.UTC()
}

// Store stores c, as a config write does.
func (c *Config) Store(ctx context.Context, s logical.Storage) error {
	entry, err := logical.StorageEntryJSON(ConfigKey, c)
	if err != nil {
		return fmt.Errorf("encode config: %w", err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store config: %w", err)
	}
	return nil
}

// StoreRetrying stores c, retrying storage: for a config holding a token
// value that exists nowhere else (a rolled token).
func (c *Config) StoreRetrying(ctx context.Context, s logical.Storage) error {
	entry, err := logical.StorageEntryJSON(ConfigKey, c)
	if err != nil {
		return err
	}
	return store.PutRetrying(ctx, s, entry)
}
