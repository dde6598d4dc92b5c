package mount

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// ErrNotConfigured is what every way to Cloudflare answers before config
// is written: the caller's to fix, so it carries Vault's 400.
var ErrNotConfigured = logical.CodedError(http.StatusBadRequest, "the engine is not configured: write an API token to config first")

// blockStoreTimeout bounds the storing of a block. The store is detached
// from the request that met the 429: that request's caller may be gone, and
// the block matters to the next one.
const blockStoreTimeout = 5 * time.Second

// ClientsConfig is what Clients is built from. Now and Logger may be nil.
type ClientsConfig struct {
	Now func() time.Time
	// Logger returns the logger to warn on; asked at each warning, since a
	// backend's logger exists only once Vault has set it up.
	Logger func() hclog.Logger
	// MayWrite reports whether this node may change storage: a block is
	// stored only where it may.
	MayWrite func() bool
	// UserAgent names the engine and its version to Cloudflare.
	UserAgent string
}

// Clients is the mount's way to Cloudflare: the client built from the
// stored config, cached, and the budget every one of the mount's calls
// counts on.
type Clients struct {
	// mu guards client, the Cloudflare client built from config, and
	// config itself, both built on first use by Get. Whatever changes
	// config drops them under this lock (Store, Delete, Reset): a config
	// write or delete, a root token rotation, and Invalidate (a standby
	// seeing the active node's write).
	mu     sync.RWMutex
	client *cloudflare.Client
	config *Config

	// budget counts every Cloudflare call the mount makes and caps them per
	// config rate_limit. It outlives client rebuilds: Cloudflare keeps
	// counting across them.
	budget *cloudflare.Budget

	// blockMu guards blockStorage and blockLoaded. Cloudflare's block (a
	// 429's, or a Ratelimit header's count of no calls left, until its
	// window resets) is kept in storage (store.RateLimitKey) as well as in
	// the budget, so that a reloaded, restarted or failed-over backend
	// does not send calls into a block Cloudflare still enforces.
	// blockStorage is the storage of the last request that built a client,
	// where the budget's hook stores a block; blockLoaded says whether the
	// stored block was read into the budget.
	blockMu      sync.Mutex
	blockStorage logical.Storage
	blockLoaded  bool

	now       func() time.Time
	logger    func() hclog.Logger
	mayWrite  func() bool
	userAgent string
}

// NewClients returns the mount's Clients, with no client built yet and the
// default budget until config says otherwise.
func NewClients(cfg ClientsConfig) *Clients {
	c := &Clients{now: cfg.Now, logger: cfg.Logger, mayWrite: cfg.MayWrite, userAgent: cfg.UserAgent}
	if c.now == nil {
		c.now = time.Now
	}
	if c.logger == nil {
		c.logger = hclog.NewNullLogger
	}
	if c.mayWrite == nil {
		c.mayWrite = func() bool { return true }
	}
	c.budget = cloudflare.NewBudget(DefaultRateLimit, DefaultRateLimitWindow, c.now)
	c.budget.SetOnBlock(c.storeBlock)
	return c
}

// Budget is the mount's call budget.
func (c *Clients) Budget() *cloudflare.Budget { return c.budget }

// Connect is the engine's and the background's way to Cloudflare: the
// cached client and the settings of the config it was built from.
func (c *Clients) Connect(ctx context.Context, s logical.Storage) (rotation.Conn, error) {
	client, cfg, err := c.Get(ctx, s)
	if err != nil {
		return rotation.Conn{}, err
	}
	return rotation.Conn{Edge: client, Settings: cfg.Settings()}, nil
}

// Get returns the cached client and the config it was built from, building
// both on first use.
func (c *Clients) Get(ctx context.Context, s logical.Storage) (*cloudflare.Client, *Config, error) {
	c.mu.RLock()
	client, cfg := c.client, c.config
	c.mu.RUnlock()
	if client != nil {
		return client, cfg, nil
	}

	// Config is read under the write lock so that a config write, which
	// stores and resets under the same lock, cannot be undone by a build
	// from the config it replaced.
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.client != nil {
		return c.client, c.config, nil
	}
	cfg, err := ReadConfig(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	if cfg == nil {
		return nil, nil, ErrNotConfigured
	}
	client, err = c.New(ctx, s, cfg)
	if err != nil {
		return nil, nil, err
	}
	c.budget.Resize(cfg.CallBudget())
	c.client, c.config = client, cfg
	return client, cfg, nil
}

// Reset drops the cached client: the next Get builds it from storage.
func (c *Clients) Reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.client, c.config = nil, nil
}

// Store stores cfg as the mount's config and drops the cached client, under
// the client lock (see Get), and sizes the budget to it.
func (c *Clients) Store(ctx context.Context, s logical.Storage, cfg *Config) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := cfg.Store(ctx, s); err != nil {
		return err
	}
	c.client, c.config = nil, nil
	c.budget.Resize(cfg.CallBudget())
	return nil
}

// Delete deletes the mount's config and drops the cached client, under the
// client lock (see Get).
func (c *Clients) Delete(ctx context.Context, s logical.Storage) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := s.Delete(ctx, ConfigKey); err != nil {
		return err
	}
	c.client, c.config = nil, nil
	return nil
}

// New builds a client from cfg that shares the mount's budget. s is the
// request's storage: before the first client is built the budget learns
// any block of Cloudflare's on record there, and later blocks are stored
// there.
func (c *Clients) New(ctx context.Context, s logical.Storage, cfg *Config) (*cloudflare.Client, error) {
	if err := c.LoadBlock(ctx, s); err != nil {
		return nil, err
	}
	return c.withBudget(cfg, c.budget)
}

// Verifying builds a client from cfg whose calls count on a budget of
// their own, which starts with the mount's block (if any) and gives nothing
// back to the mount: for verifying a token and endpoint before they are
// stored.
func (c *Clients) Verifying(cfg *Config) (*cloudflare.Client, error) {
	budget := cloudflare.NewBudget(0, 0, c.now)
	budget.RestoreBlock(c.budget.BlockedUntil())
	return c.withBudget(cfg, budget)
}

func (c *Clients) withBudget(cfg *Config, budget *cloudflare.Budget) (*cloudflare.Client, error) {
	return cloudflare.New(cloudflare.Config{
		APIToken:       cfg.APIToken,
		BaseURL:        cfg.BaseURL,
		RequestTimeout: cfg.RequestTimeout,
		UserAgent:      c.userAgent,
		Now:            c.now,
		Budget:         budget,
	})
}

// LoadBlock reads the block on record in s into the budget, once (again
// after ForgetBlock), and remembers s for storing later blocks.
func (c *Clients) LoadBlock(ctx context.Context, s logical.Storage) error {
	c.blockMu.Lock()
	defer c.blockMu.Unlock()
	c.blockStorage = s
	if c.blockLoaded {
		return nil
	}
	rec, err := store.ReadRateLimitBlock(ctx, s)
	if err != nil {
		return err
	}
	if rec != nil {
		// Capped by the budget as any block is: a bogus record cannot
		// disable the mount for long.
		c.budget.RestoreBlock(rec.BlockedUntil)
	}
	c.blockLoaded = true
	return nil
}

// ForgetBlock makes the next LoadBlock read the block on record again, and
// drops the cached client: the active node recorded a block, which this
// node (a standby still calls Cloudflare for reads) must honour.
func (c *Clients) ForgetBlock() {
	c.blockMu.Lock()
	c.blockLoaded = false
	c.blockMu.Unlock()
	c.Reset()
}

// storeBlock is the budget's hook: it stores the block in force, so that a
// new backend over the same storage honours it. It stores BlockedUntil at
// the time, not its argument, under blockMu, so that of two overlapping
// calls the later end is stored last. A failure is logged and otherwise
// ignored: this process still honours the block in memory.
func (c *Clients) storeBlock(time.Time) {
	c.blockMu.Lock()
	defer c.blockMu.Unlock()
	until := c.budget.BlockedUntil()
	if c.blockStorage == nil || until.IsZero() || !c.mayWrite() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), blockStoreTimeout)
	defer cancel()
	if err := store.WriteRateLimitBlock(ctx, c.blockStorage, until); err != nil {
		c.logger().Warn("could not store Cloudflare's rate-limit block; a restarted backend may send calls into it",
			"blocked_until", store.FormatTime(until), "error", err)
	}
}
