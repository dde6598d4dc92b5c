package main

import (
	"context"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// configFields are config's fields: the token, where to send it, and how
// the engine paces and heals.
var configFields = map[string]*framework.FieldSchema{
	"api_token": {
		Type:        framework.TypeString,
		Description: "Cloudflare API token with Magic WAN Write or Magic Transit Write permission. Required on first write; never returned.",
		DisplayAttrs: &framework.DisplayAttributes{
			Name:      "API token",
			Sensitive: true,
		},
	},
	"base_url": {
		Type:        framework.TypeString,
		Description: "Cloudflare API base URL. Plain http:// is accepted only for a loopback host. Changing it requires api_token in the same write. Whatever answers there answers every call, the new keys included: whoever may set it, with a token of their own, can make the engine store keys they know.",
		Default:     cloudflare.DefaultBaseURL,
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Base URL",
		},
	},
	"request_timeout": {
		Type:        framework.TypeDurationSecond,
		Description: "Time limit for one Cloudflare call, as a duration (\"30s\") or seconds. At most 5m.",
		Default:     int(mount.DefaultRequestTimeout.Seconds()),
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Request timeout",
		},
	},
	"heal_stale_psk": {
		Type:        framework.TypeBool,
		Description: "When reconciliation finds that Cloudflare holds a key Vault does not, generate and store a new one at once. The tunnel is down until both sides share a key, so waiting for a person only prolongs the outage.",
		Default:     true,
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Heal stale PSKs",
		},
	},
	"rate_limit": {
		Type:        framework.TypeInt,
		Description: "Most Cloudflare calls this mount makes in any rate_limit_window, every kind of call counted. Cloudflare allows 1,200 calls per five minutes per user: all of the user's API tokens and dashboard use share that limit (an account-owned token has its own), and past it Cloudflare blocks them all for five minutes. The default, 600, leaves half for the user's other tools; mounts whose tokens belong to one user share one limit, so split it between them.",
		Default:     mount.DefaultRateLimit,
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Rate limit",
		},
	},
	"rate_limit_window": {
		Type:        framework.TypeDurationSecond,
		Description: "The window rate_limit counts over. Leave it at Cloudflare's 5m; tests shorten it to exercise pacing quickly.",
		Default:     int(mount.DefaultRateLimitWindow.Seconds()),
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Rate limit window",
		},
	},
	"drift_check_interval": {
		Type:        framework.TypeDurationSecond,
		Description: "How often the background lists each account with managed tunnels (one Cloudflare call per account) to find keys changed outside this engine, and tunnels recorded tunnel_gone that Cloudflare lists again (returned to management at most once a day each). At least 1m; 0 turns it off.",
		Default:     int(mount.DefaultDriftCheckInterval.Seconds()),
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Drift check interval",
		},
	},
	"min_rotation_period": {
		Type: framework.TypeDurationSecond,
		Description: "The shortest schedule any write of psk/ or psk/<account>/<tunnel>/schedule may set (rotation_period, or the times of a rotation_schedule), " +
			"and the least time a schedule change leaves after a tunnel's last key. Every rotation takes the tunnel down until its routers have the new key: " +
			"a team allowed only to reschedule can cause at most one rotation per tunnel per this period. Between 1m and 8760h.",
		Default: int(mount.DefaultMinRotationPeriod.Seconds()),
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Minimum rotation period",
		},
	},
	"key_source": {
		Type: framework.TypeString,
		Description: "Who makes each new key. \"cloudflare\" (the default): Cloudflare's psk_generate, so the key exists nowhere before Cloudflare has it. " +
			"\"vault\": the engine makes it, writes it ahead into the tunnel's record (state pending) and sets it with Cloudflare's Set operation, " +
			"so a lost answer or a crash is finished with the same key. May be changed at any time; see the path's help.",
		Default:       store.KeySourceCloudflare,
		AllowedValues: []any{store.KeySourceCloudflare, store.KeySourceVault},
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Key source",
		},
	},
	"password_policy": {
		Type: framework.TypeString,
		Description: "With key_source vault: the Vault password policy keys are made from (\"\": 32 letters and digits from crypto/rand). " +
			"Every key must be 16 to 128 letters and digits, which every shipped router template carries: a write is refused (400) if the policy " +
			"does not exist or makes another form, and a rotation sends nothing if it ever does.",
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Password policy",
		},
	},
	"set_batch_size": {
		Type: framework.TypeInt,
		Description: "With key_source vault: the most keys a bulk rotation (rotate/<account>) sends in one call of Cloudflare's Set operation, " +
			"which costs one call of the budget whatever its size. A batch Cloudflare refuses as too large is halved until it fits. " +
			"Every tunnel of a batch is written ahead before the call, and a lost answer leaves them all pending, each then finished by a call " +
			"of its own. Between 1 and 1000.",
		Default: mount.DefaultSetBatchSize,
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Set batch size",
		},
	},
	"token_account_id": {
		Type:        framework.TypeString,
		Description: "For an account-owned API token: the owning account's id (32 lower-case hexadecimal characters), so the token is verified at that account. Empty for a user token. Changing it requires api_token in the same write.",
		DisplayAttrs: &framework.DisplayAttributes{
			Name: "Token account ID",
		},
	},
}

func pathConfig(b *backend) *framework.Path {
	return &framework.Path{
		Pattern: "config",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationSuffix: "configuration",
		},
		Fields:         configFields,
		ExistenceCheck: b.configExists,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.readConfigPath,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
			},
			logical.CreateOperation: forwardedOperation(b.writeConfig, "configure", "Write the API token and settings; the token is verified with Cloudflare first."),
			logical.UpdateOperation: forwardedOperation(b.writeConfig, "configure", "Write the API token and settings; the token is verified with Cloudflare first."),
			logical.DeleteOperation: forwardedOperation(b.deleteConfig, "delete", "Remove the configuration and its token."),
		},
		HelpSynopsis:    pathConfigHelpSynopsis,
		HelpDescription: pathConfigHelpDescription,
	}
}

func (b *backend) configExists(ctx context.Context, req *logical.Request, _ *framework.FieldData) (bool, error) {
	cfg, err := mount.ReadConfig(ctx, req.Storage)
	return cfg != nil, err
}

func (b *backend) readConfigPath(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	cfg, err := mount.ReadConfig(ctx, req.Storage)
	if err != nil || cfg == nil {
		return nil, err
	}
	limit, window := cfg.CallBudget()
	// A block on record is read into the budget first: a backend that has
	// not called Cloudflare yet still knows of a block a previous process
	// met.
	if err := b.clients.LoadBlock(ctx, req.Storage); err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		"base_url":             cfg.BaseURL,
		"request_timeout":      int(cfg.RequestTimeout.Seconds()),
		"token_account_id":     cfg.TokenAccountID,
		"heal_stale_psk":       cfg.HealStalePSK,
		"rate_limit":           limit,
		"rate_limit_window":    int(window.Seconds()),
		"drift_check_interval": int(cfg.DriftCheckInterval.Seconds()),
		"min_rotation_period":  int(cfg.MinRotation().Seconds()),
		"key_source":           cfg.Source(),
		"password_policy":      cfg.PasswordPolicy,
		"set_batch_size":       cfg.BatchSize(),
		"token_id":             cfg.TokenID,
		"token_status":         cfg.TokenStatus,
		"token_expires_on":     store.FormatTime(cfg.TokenExpiresOn),
		"token_not_before":     store.FormatTime(cfg.TokenNotBefore),
		"token_verified_at":    store.FormatTime(cfg.VerifiedAt),
		"last_rotated":         store.FormatTime(cfg.LastRotated),
		"rate_limited_until":   store.FormatTime(b.clients.Budget().BlockedUntil()),
	}, Warnings: cfg.ExpiryWarnings(b.now())}, nil
}

func (b *backend) writeConfig(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	b.configMu.Lock()
	defer b.configMu.Unlock()
	cfg, err := mount.ReadConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	var stored *mount.Config
	if cfg == nil {
		cfg = mount.NewConfig()
	} else {
		copied := *cfg
		stored = &copied
	}
	if resp := rejectUnknownFields(req, d); resp != nil {
		return resp, nil
	}
	if problem := cfg.Apply(d.GetOk); problem != "" {
		return logical.ErrorResponse(problem), nil
	}
	if _, tokenGiven := d.GetOk("api_token"); !tokenGiven {
		if problem := cfg.EndpointChange(stored); problem != "" {
			return logical.ErrorResponse(problem), nil
		}
	}
	if problem := mount.CheckPasswordPolicy(ctx, cfg.PasswordPolicy, b.System().GeneratePasswordFromPolicy); problem != "" {
		return logical.ErrorResponse(problem), nil
	}

	client, err := b.clients.New(ctx, req.Storage, cfg)
	if err != nil {
		return failure(fmt.Errorf("build the Cloudflare client: %w", err))
	}
	if stored == nil || !stored.SameEndpoint(cfg) {
		// What a token and endpoint that are not stored yet answer (a 429
		// and its block, a Ratelimit count) says nothing of the stored
		// ones: if this write is refused it must leave the mount exactly
		// as it was. The verification runs on a budget of its own, which
		// still honours a block in force.
		if client, err = b.clients.Verifying(cfg); err != nil {
			return failure(fmt.Errorf("build the Cloudflare client: %w", err))
		}
	}
	status, err := client.VerifyToken(ctx, cfg.TokenAccountID)
	if err != nil {
		return failure(fmt.Errorf("verify the API token: %w", err))
	}
	if !status.Active() {
		return logical.ErrorResponse(fmt.Sprintf("cloudflare reports the API token %s as %q, not active: nothing was stored", status.ID, status.Status)), nil
	}
	cfg.ApplyVerification(status, b.now())

	// Stored, and the cached client dropped, under the client lock.
	if err := b.clients.Store(ctx, req.Storage, cfg); err != nil {
		return nil, err
	}
	b.Logger().Info("config written", "token_id", cfg.TokenID, "base_url", cfg.BaseURL)
	if warnings := cfg.ExpiryWarnings(b.now()); len(warnings) > 0 {
		return &logical.Response{Warnings: warnings}, nil
	}
	return nil, nil
}

func (b *backend) deleteConfig(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	// configMu first, as a config write and rotate-root take it: a
	// rotate-root inside its Cloudflare call would otherwise store config
	// again after this delete. The delete waits for it, then has the last
	// word.
	b.configMu.Lock()
	defer b.configMu.Unlock()
	if err := b.clients.Delete(ctx, req.Storage); err != nil {
		return nil, fmt.Errorf("delete config: %w", err)
	}
	return nil, nil
}

const pathConfigHelpSynopsis = `Configure the Cloudflare API token and endpoint the engine uses.`

const pathConfigHelpDescription = `
The engine calls Cloudflare's API with one API token. The token needs the
"Magic WAN Write" or "Magic Transit Write" permission on every account whose
tunnels the engine rotates.

Every write verifies the token with Cloudflare (GET /user/tokens/verify, or
GET /accounts/<token_account_id>/tokens/verify for an account-owned token) and
stores nothing if Cloudflare rejects it or reports it not active. A write
without api_token keeps the stored token and verifies it again against the new
settings, except that a write which changes base_url or token_account_id
(compared with the stored config, after trimming spaces and trailing slashes)
must carry api_token: otherwise it is refused with a 400, and nothing is sent
or stored. Verification sends the token to base_url, so without this rule
anyone allowed to update config could send the stored token, which no policy
lets them read, to a host of their own.

base_url decides who answers the engine, and nothing else can: whoever sets
it (with an api_token of their own, which such a write requires) controls
every answer the engine gets from then on, the keys psk_generate returns
included. They can hand the engine keys they know, which it stores and serves
as the tunnels' keys, and so know every later key without ever reading one
through Vault. The engine refuses a key that is not of the form Cloudflare
issues (16 to 128 letters and digits), so that no answer can put anything
into a router's configuration but a key, and then generates no key for that
tunnel by itself until an operator writes it; but it cannot tell a key
Cloudflare made from one another host made. Treat update on config as that
power: grant it only to those who may know the keys.

Reading config returns the settings (base_url, request_timeout,
token_account_id, heal_stale_psk, rate_limit, rate_limit_window,
drift_check_interval, min_rotation_period, key_source, password_policy,
set_batch_size) and what
Cloudflare said of the token: token_id, token_status, token_expires_on,
token_not_before, token_verified_at (when the engine last verified it) and
last_rotated (when config/rotate-root last rolled it). It never returns the
token.

rate_limit (default 600) caps the Cloudflare calls this mount makes in any
rate_limit_window (default 5m), every call counted. Cloudflare's global limit
is 1,200 calls per five minutes per user, not per token: all of a user's API
tokens, API keys and dashboard use share it (an account-owned token has its
own), and past it Cloudflare blocks them all for five minutes. Mounts whose
tokens belong to one user therefore share one limit: split it between them.
When Cloudflare answers 429, the engine sends nothing until the block it
announced ends (at most 15 minutes); when an answer's Ratelimit header says
no calls remain (other tools of the same user spend the limit too), it sends
nothing until Cloudflare's window resets (at most 15 minutes), since any
call before then would be refused and start Cloudflare's five-minute block.
Either is kept in Vault storage so that a plugin reload, a restart or a
failover honours it too; meanwhile every call fails at once with a 429, and
reading config shows rate_limited_until, when the later of the two ends (""
when neither is in force).

min_rotation_period (default 1h, between 1m and 8760h) is the floor under
every schedule. A write of psk/<account_id>/<tunnel_id> or of its /schedule
path is refused with a 400 (nothing sent, nothing stored) when its
rotation_period is shorter, or when two successive times of its
rotation_schedule can come closer (computed over a whole 400-year calendar
cycle); and a schedule change never sets the next rotation less than
min_rotation_period after the tunnel's stored key. So a team whose policy
grants only psk/+/+/schedule (docs/policies/operator.hcl) can make the
scheduler rotate a tunnel at most once per min_rotation_period (each
rotation an outage until the tunnel's routers have the new key), or turn
scheduled rotation off; it can never rotate at once. Raising it does not
rewrite stored schedules: a tunnel whose schedule is now shorter keeps its
next_rotation, and every later one is held back to min_rotation_period after
its stored key (a write of its /schedule path applies the new floor at once,
and must itself respect it). Lowering it changes nothing until a schedule
is written.

key_source (default cloudflare) says who makes each new key.
  cloudflare: Cloudflare's psk_generate makes it; the key exists nowhere
  before Cloudflare has it. A lost answer leaves the edge with a key nobody
  holds: the tunnel is rotation_unknown until the settle window ends and a
  heal makes another key.
  vault: the engine makes the key (32 letters and digits from crypto/rand,
  or from password_policy), writes it ahead into the tunnel's record (state
  pending, seal-wrapped storage) before any request carries it, and sets it
  with Cloudflare's Set operation (POST .../ipsec_tunnels/psk), whose answer
  echoes each key it applied. A lost answer, a timeout or a crash is
  finished with the same key, on the next read or write or in the
  background: no settle window, no second key. A different key still waits
  until a request abandoned earlier can no longer land (409 meanwhile).
  Either keeps every key out of human hands.
  It may be changed at any time. Keys already stored stay; the next
  rotation of each tunnel uses the new source. A pending key (vault) is
  always finished with its own key through the Set operation, even after a
  switch to cloudflare; a rotation_unknown left by psk_generate is resolved
  as ever, and healed with a key of the source in force.

password_policy (key_source vault; default "": 32 letters and digits) names a
Vault password policy (sys/policies/password) the keys are made from. Every
key must be 16 to 128 letters and digits: the shipped router templates
paste the key into configurations, and the IOS XE one has no quoting. A
config write makes a few keys from the policy and is refused (400, naming
the policy, nothing stored) if the policy does not exist, makes another
form, or makes the same key twice; a rotation whose key is of another form,
or is the tunnel's stored or pending key (the policy changed since), sends
nothing and changes nothing, and says why (a scheduled one keeps its
schedule and is retried with backoff, last_failure saying why).

set_batch_size (key_source vault; default 100, between 1 and 1000) is the
most keys a bulk rotation (rotate/<account_id>) sends in one call of the Set
operation, which costs one call of the budget whatever its size: 10,000
tunnels are 100 calls. Every tunnel of a batch is written ahead before the
call, and a lost answer leaves them all pending, each then finished with its
own key by a call of its own, so the batch size is also what one lost answer
can cost. A batch Cloudflare refuses as too large (HTTP 413) is halved until
it fits, and the size that fitted is used for the account for an hour.

heal_stale_psk (default true) decides what reconciliation does when it finds
that Cloudflare generated a key after the one Vault stored (a rotation whose
answer was lost): generate a new key at once and store it, or mark the tunnel
stale and wait for an operator. The tunnel cannot come up until the router
and Cloudflare share a key, and the key Cloudflare holds is lost for good, so
healing at once is the default.

Deleting config removes the token; PSKs already stored stay readable, but no
tunnel can be rotated until config is written again. Config writes, deletes
and config/rotate-root run one at a time: a delete that arrives during a
rotate-root waits for it to finish, then deletes.
`
