package mount

// A config write's fields, checked and applied to the config (the root's
// config path hands them over).

import (
	"context"
	"fmt"
	"strings"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/schedule"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// NewConfig is the config a mount's first config write starts from: every
// field at its default.
func NewConfig() *Config {
	return &Config{BaseURL: cloudflare.DefaultBaseURL, RequestTimeout: DefaultRequestTimeout, HealStalePSK: true,
		RateLimit: DefaultRateLimit, RateLimitWindow: DefaultRateLimitWindow, DriftCheckInterval: DefaultDriftCheckInterval,
		MinRotationPeriod: DefaultMinRotationPeriod}
}

// Apply copies a config write's fields onto cfg and validates the result.
// get is the request's field lookup (framework.FieldData's GetOk): a value
// and whether the write gave it. It returns a problem to show the caller,
// or "".
func (cfg *Config) Apply(get func(string) (any, bool)) string {
	if v, ok := get("api_token"); ok {
		cfg.APIToken = strings.TrimSpace(v.(string))
	}
	if cfg.APIToken == "" {
		return "api_token is required"
	}
	// Cloudflare's tokens are 40 to 80 printable characters; the value is
	// never repeated, only what is wrong with it.
	if !cloudflare.ValidToken(cfg.APIToken) {
		return fmt.Sprintf("api_token must be at most %d printable ASCII characters without spaces", MaxTokenLength)
	}
	if v, ok := get("heal_stale_psk"); ok {
		cfg.HealStalePSK = v.(bool)
	}
	if v, ok := get("base_url"); ok {
		cfg.BaseURL = strings.TrimRight(strings.TrimSpace(v.(string)), "/")
	}
	if problem := cloudflare.CheckBaseURL(cfg.BaseURL); problem != "" {
		return problem
	}
	if v, ok := get("request_timeout"); ok {
		cfg.RequestTimeout = time.Duration(v.(int)) * time.Second
	}
	if cfg.RequestTimeout <= 0 || cfg.RequestTimeout > MaxRequestTimeout {
		return fmt.Sprintf("request_timeout must be between 1s and %s", MaxRequestTimeout)
	}
	if v, ok := get("rate_limit"); ok {
		cfg.RateLimit = v.(int)
	}
	if cfg.RateLimit < 1 || cfg.RateLimit > MaxRateLimit {
		return fmt.Sprintf("rate_limit must be between 1 and %d (Cloudflare's own limit per user, or per account-owned token)", MaxRateLimit)
	}
	if v, ok := get("rate_limit_window"); ok {
		cfg.RateLimitWindow = time.Duration(v.(int)) * time.Second
	}
	if cfg.RateLimitWindow < time.Second || cfg.RateLimitWindow > time.Hour {
		return "rate_limit_window must be between 1s and 1h"
	}
	if v, ok := get("drift_check_interval"); ok {
		cfg.DriftCheckInterval = time.Duration(v.(int)) * time.Second
	}
	if cfg.DriftCheckInterval != 0 && (cfg.DriftCheckInterval < MinDriftCheckInterval || cfg.DriftCheckInterval > 7*24*time.Hour) {
		return fmt.Sprintf("drift_check_interval must be 0 (off) or between %s and 168h", MinDriftCheckInterval)
	}
	cfg.MinRotationPeriod = cfg.MinRotation() // a config stored before the field: the default
	if v, ok := get("min_rotation_period"); ok {
		cfg.MinRotationPeriod = time.Duration(v.(int)) * time.Second
	}
	if cfg.MinRotationPeriod < schedule.MinPeriod || cfg.MinRotationPeriod > MaxMinRotationPeriod {
		return fmt.Sprintf("min_rotation_period must be between %s and %s", schedule.MinPeriod, MaxMinRotationPeriod)
	}
	if problem := applyKeyFields(cfg, get); problem != "" {
		return problem
	}
	if v, ok := get("token_account_id"); ok {
		// Taken as written, never trimmed or folded: Vault matches a
		// policy's parameter values case-sensitively, as it does paths, so
		// a folded value would escape a denied_parameters rule.
		id := v.(string)
		if id != "" {
			if problem := store.CheckIdentifier("token_account_id", id); problem != "" {
				return problem
			}
		}
		cfg.TokenAccountID = id
	}
	return ""
}

// applyKeyFields copies the fields of keys Vault makes onto cfg and
// validates them: key_source, password_policy, set_batch_size.
func applyKeyFields(cfg *Config, get func(string) (any, bool)) string {
	if v, ok := get("key_source"); ok {
		cfg.KeySource = v.(string)
	}
	if ks := cfg.Source(); ks != store.KeySourceCloudflare && ks != store.KeySourceVault {
		return fmt.Sprintf("key_source must be %q or %q", store.KeySourceCloudflare, store.KeySourceVault)
	}
	if v, ok := get("password_policy"); ok {
		cfg.PasswordPolicy = strings.TrimSpace(v.(string))
	}
	cfg.SetBatchSize = cfg.BatchSize()
	if v, ok := get("set_batch_size"); ok {
		cfg.SetBatchSize = v.(int)
	}
	if cfg.SetBatchSize < 1 || cfg.SetBatchSize > MaxSetBatchSize {
		return fmt.Sprintf("set_batch_size must be between 1 and %d", MaxSetBatchSize)
	}
	return ""
}

// policySamples is how many keys a config write has a password policy make
// to check their form, and that they differ: a policy that can make a key
// of another form at all, or repeats its keys, usually does so within a
// few.
const policySamples = 5

// CheckPasswordPolicy checks that the password policy named policy (config
// password_policy; "": none, nothing to check) exists and makes keys the
// engine sends (rotation.KeyProblem), by making a few with generate (the
// system view's GeneratePasswordFromPolicy): a policy found wanting only at
// the next rotation would stop every rotation. The keys made are dropped
// unseen. It returns a problem naming the policy, never a key, or "".
func CheckPasswordPolicy(ctx context.Context, policy string, generate func(context.Context, string) (string, error)) string {
	if policy == "" {
		return ""
	}
	made := make(map[string]bool, policySamples)
	for range policySamples {
		key, err := generate(ctx, policy)
		if err != nil {
			return fmt.Sprintf("password_policy %q: Vault could not generate a password from it (%v); create it with "+
				"vault write sys/policies/password/%s policy=@<file>, or leave password_policy empty; nothing was stored", policy, err, policy)
		}
		if problem := rotation.KeyProblem(key); problem != "" {
			return fmt.Sprintf("password_policy %q made a key that %s (every key must be 16 to 128 letters and digits, "+
				"which every shipped router template carries); nothing was stored", policy, problem)
		}
		if made[key] {
			// A rotation must change the key; a policy that repeats one
			// within a few samples would make rotations that change nothing
			// (the engine refuses those keys: internal/rotation's freshKey).
			return fmt.Sprintf("password_policy %q made the same key twice in %d samples: its keys repeat, and every rotation must change the key "+
				"(make its keys longer or from more characters); nothing was stored", policy, policySamples)
		}
		made[key] = true
	}
	return ""
}

// EndpointChange refuses a write that would send the stored token
// somewhere it was not sent before, unless the write carries the token. The
// config write verifies the token at once, against the new base_url and
// token_account_id: without this rule anyone allowed to update config (the
// admin policy, which promises that admins never see the token) could point
// base_url at a host of their own and receive "Authorization: Bearer
// <token>". Whoever supplies api_token in the same write already knows it.
// The caller asks only of a write without api_token. stored is the config
// before the write (nil on the first one, which needs api_token anyway);
// cfg is the config after the write's fields, normalised.
func (cfg *Config) EndpointChange(stored *Config) string {
	if stored == nil {
		return ""
	}
	var changed []string
	if cfg.BaseURL != stored.BaseURL {
		changed = append(changed, "base_url")
	}
	if cfg.TokenAccountID != stored.TokenAccountID {
		changed = append(changed, "token_account_id")
	}
	if len(changed) == 0 {
		return ""
	}
	return fmt.Sprintf("changing %s requires api_token in the same write: the stored token is never sent to a new endpoint "+
		"or account on the strength of a config update alone; nothing was sent or stored", strings.Join(changed, " and "))
}
