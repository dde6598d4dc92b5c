package main

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/background"
	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// operationPrefix names the engine in the OpenAPI document Vault generates
// (operation ids such as "cloudflare-ipsec-read-psk").
const operationPrefix = "cloudflare-ipsec"

// errNotConfigured is returned by paths that need Cloudflare before config
// has been written. It carries its HTTP status, so handlers pass it on as is.
var errNotConfigured = logical.CodedError(http.StatusBadRequest, "the engine is not configured: write an API token to config first")

// backend is one mount of the engine. The plugin process serves many mounts
// at once, so everything a mount needs lives here.
type backend struct {
	*framework.Backend

	// engine runs the rotation protocol (internal/rotation) for this
	// mount; Setup builds it.
	engine *rotation.Engine

	// clientMu guards client, the Cloudflare client built from config, and
	// config itself, both built on first use by cloudflareClient. Whatever
	// changes config drops them under this lock: a config write or delete,
	// a root token rotation, and Invalidate (a standby seeing the active
	// node's write).
	clientMu sync.RWMutex
	client   *cloudflare.Client
	config   *configRecord

	// budget counts every Cloudflare call the mount makes and caps them per
	// config rate_limit. It outlives client rebuilds: Cloudflare keeps
	// counting across them.
	budget *cloudflare.Budget

	// blockMu guards blockStorage and blockLoaded. Cloudflare's block (a
	// 429's, or a Ratelimit header's count of no calls left, until its
	// window resets) is kept in storage (store.RateLimitKey) as well as
	// in the budget, so that a reloaded, restarted or failed-over backend
	// does not send calls into a block Cloudflare still enforces.
	// blockStorage is the storage of the last request that built a
	// client, where the budget's hook stores a block; blockLoaded says
	// whether the stored block was read into the budget.
	blockMu      sync.Mutex
	blockStorage logical.Storage
	blockLoaded  bool

	// background is the scheduler, bulk jobs and the periodic sweep
	// (internal/background); Setup builds it.
	background *background.Worker
	// census counts the mount's tunnels for status reads (store.Census):
	// every request's storage is wrapped so that each record write is
	// counted as it is made (HandleRequest). Setup builds it.
	census *store.Census
	// configMu serialises config writes, deletes and root token rotation:
	// a write and a rotation read, call Cloudflare and store config, and a
	// delete in between would be undone by their store. Taken before
	// clientMu.
	configMu sync.Mutex

	// now is the clock; tests move it to pass settle windows and rate-limit
	// blocks without sleeping.
	now func() time.Time
	// events counts the rotation events on their way (announceRotation),
	// so that a test can wait for them.
	events sync.WaitGroup

	// after is how the scheduler's loop sleeps (nil: time.After); tests
	// set it before Setup to drive the loop themselves.
	after func(time.Duration) <-chan time.Time
}

// initialize starts the scheduler, on the node that may write.
func (b *backend) initialize(_ context.Context, req *logical.InitializationRequest) error {
	b.background.Start(req.Storage)
	return nil
}

// clean stops the scheduler when the mount is unmounted or the plugin stops,
// and writes the census down closed, so that the next process takes its
// counts as exact. It does not wait for rotation events on their way: they
// are best effort, each bounded by eventTimeout, and an event bus that does
// not take one must not hold up an unmount, a seal or a plugin reload.
func (b *backend) clean(ctx context.Context) {
	b.background.Stop()
	if err := b.census.Close(ctx); err != nil {
		b.Logger().Warn("could not write the census at cleanup; the next process recounts", "error", err)
	}
}

// HandleRequest is framework.Backend's, over the request's storage wrapped
// by the census, so that every record the request writes, whichever path
// and whichever part of the engine writes it, is counted.
func (b *backend) HandleRequest(ctx context.Context, req *logical.Request) (*logical.Response, error) {
	if req != nil && req.Storage != nil && b.census != nil {
		req.Storage = b.census.Observe(req.Storage)
	}
	return b.Backend.HandleRequest(ctx, req)
}

// periodic is the backend's PeriodicFunc, which Vault calls about once a
// minute: the background's sweep. Without config there is nothing to do
// yet.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if err := b.background.Periodic(ctx, req.Storage); err != nil && !errors.Is(err, errNotConfigured) {
		return err
	}
	return nil
}

func (b *backend) invalidate(_ context.Context, key string) {
	switch key {
	case configStorageKey:
		b.resetClient()
	case store.RateLimitKey:
		// The active node recorded a block: read it again before the next
		// call from here (a standby still calls Cloudflare for reads).
		b.blockMu.Lock()
		b.blockLoaded = false
		b.blockMu.Unlock()
		b.resetClient()
	}
}

// Setup is framework.Backend's, and then builds the rotation engine and the
// background worker, which log through the logger Setup provides.
func (b *backend) Setup(ctx context.Context, conf *logical.BackendConfig) error {
	if err := b.Backend.Setup(ctx, conf); err != nil {
		return err
	}
	b.engine = rotation.New(rotation.Config{
		// The backend's clock, read at each call: tests move it.
		Now:     func() time.Time { return b.now() },
		Logger:  b.Logger(),
		Connect: b.connect,
		Hooks:   rotation.Hooks{Scheduled: b.pokeScheduler, Rotated: b.announceRotation},
	})
	b.census = store.NewCensus(store.CensusConfig{
		Now:      func() time.Time { return b.now() },
		Logger:   b.Logger(),
		MayWrite: b.mayWrite,
	})
	b.background = background.New(background.Config{
		Census:   b.census,
		Engine:   b.engine,
		Now:      func() time.Time { return b.now() },
		Logger:   b.Logger(),
		Connect:  b.connect,
		MayWrite: b.mayWrite,
		Budget:   b.budget,
		After:    b.after,
	})
	return nil
}

// announceRotation is the engine's Rotated hook. Events are best effort and
// go to Vault over a round trip of their own, so they do not hold up the
// answer.
func (b *backend) announceRotation(rec *store.Record, trigger rotation.Trigger) {
	b.events.Add(1)
	go func() {
		defer b.events.Done()
		ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
		defer cancel()
		sendRotateEvent(ctx, b, b.Logger(), rec, string(trigger))
	}()
}

// pokeScheduler is the engine's Scheduled hook: a next rotation was stored,
// which may fall due before the scheduler would wake.
func (b *backend) pokeScheduler() {
	b.background.Poke()
}

// connect is the engine's way to Cloudflare: the cached client and the
// settings of the config it was built from.
func (b *backend) connect(ctx context.Context, s logical.Storage) (rotation.Conn, error) {
	client, cfg, err := b.cloudflareClient(ctx, s)
	if err != nil {
		return rotation.Conn{}, err
	}
	return rotation.Conn{Edge: client, Settings: cfg.settings()}, nil
}

// tunnelLogger is the mount's logger with the tunnel's identifiers on every
// line.
func (b *backend) tunnelLogger(t store.Tunnel) hclog.Logger {
	return b.Logger().With("account_id", t.AccountID, "tunnel_id", t.TunnelID)
}

// forwardedOperation is an operation that changes storage: a performance
// standby or secondary forwards it to the node that may write.
func forwardedOperation(cb framework.OperationFunc, verb, summary string) *framework.PathOperation {
	return &framework.PathOperation{
		Callback:                    cb,
		ForwardPerformanceStandby:   true,
		ForwardPerformanceSecondary: true,
		DisplayAttrs:                &framework.DisplayAttributes{OperationVerb: verb},
		Summary:                     summary,
	}
}

func (b *backend) resetClient() {
	b.clientMu.Lock()
	defer b.clientMu.Unlock()
	b.client, b.config = nil, nil
}

// cloudflareClient returns the cached client and the config it was built
// from, building both on first use.
func (b *backend) cloudflareClient(ctx context.Context, s logical.Storage) (*cloudflare.Client, *configRecord, error) {
	b.clientMu.RLock()
	client, cfg := b.client, b.config
	b.clientMu.RUnlock()
	if client != nil {
		return client, cfg, nil
	}

	// Config is read under the write lock so that a config write, which
	// stores and resets under the same lock, cannot be undone by a build
	// from the config it replaced.
	b.clientMu.Lock()
	defer b.clientMu.Unlock()
	if b.client != nil {
		return b.client, b.config, nil
	}
	cfg, err := readConfig(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	if cfg == nil {
		return nil, nil, errNotConfigured
	}
	client, err = b.newCloudflareClient(ctx, s, cfg)
	if err != nil {
		return nil, nil, err
	}
	b.budget.Resize(cfg.rateLimit())
	b.client, b.config = client, cfg
	return client, cfg, nil
}

// newCloudflareClient builds a client from cfg that shares the mount's
// budget. s is the request's storage: before the first client is built the
// budget learns any block of Cloudflare's on record there, and later blocks
// are stored there.
func (b *backend) newCloudflareClient(ctx context.Context, s logical.Storage, cfg *configRecord) (*cloudflare.Client, error) {
	if err := b.loadBlock(ctx, s); err != nil {
		return nil, err
	}
	return b.clientWithBudget(cfg, b.budget)
}

// verifyingClient builds a client from cfg whose calls count on a budget of
// their own, which starts with the mount's block (if any) and gives nothing
// back to the mount: for verifying a token and endpoint before they are
// stored.
func (b *backend) verifyingClient(cfg *configRecord) (*cloudflare.Client, error) {
	budget := cloudflare.NewBudget(0, 0, b.now)
	budget.RestoreBlock(b.budget.BlockedUntil())
	return b.clientWithBudget(cfg, budget)
}

func (b *backend) clientWithBudget(cfg *configRecord, budget *cloudflare.Budget) (*cloudflare.Client, error) {
	return cloudflare.New(cloudflare.Config{
		APIToken:       cfg.APIToken,
		BaseURL:        cfg.BaseURL,
		RequestTimeout: cfg.RequestTimeout,
		UserAgent:      "vault-plugin-secrets-cloudflare-ipsec/" + version,
		Now:            b.now,
		Budget:         budget,
	})
}

// blockStoreTimeout bounds the storing of a block. The store is detached
// from the request that met the 429: that request's caller may be gone, and
// the block matters to the next one.
const blockStoreTimeout = 5 * time.Second

// loadBlock reads the block on record in s into the budget, once per
// backend (again after Invalidate), and remembers s for storeBlock.
func (b *backend) loadBlock(ctx context.Context, s logical.Storage) error {
	b.blockMu.Lock()
	defer b.blockMu.Unlock()
	b.blockStorage = s
	if b.blockLoaded {
		return nil
	}
	rec, err := store.ReadRateLimitBlock(ctx, s)
	if err != nil {
		return err
	}
	if rec != nil {
		// Capped by the budget as any block is: a bogus record cannot
		// disable the mount for long.
		b.budget.RestoreBlock(rec.BlockedUntil)
	}
	b.blockLoaded = true
	return nil
}

// storeBlock is the budget's hook: it stores the block in force, so that a
// new backend over the same storage honours it. It stores BlockedUntil at
// the time, not its argument, under blockMu, so that of two overlapping
// calls the later end is stored last. A failure is logged and otherwise
// ignored: this process still honours the block in memory.
func (b *backend) storeBlock(time.Time) {
	b.blockMu.Lock()
	defer b.blockMu.Unlock()
	until := b.budget.BlockedUntil()
	if b.blockStorage == nil || until.IsZero() || !b.mayWrite() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), blockStoreTimeout)
	defer cancel()
	err := store.WriteRateLimitBlock(ctx, b.blockStorage, until)
	if err != nil {
		b.Logger().Warn("could not store Cloudflare's rate-limit block; a restarted backend may send calls into it",
			"blocked_until", store.FormatTime(until), "error", err)
	}
}

// mayWrite reports whether this node may change storage: not a performance
// standby or secondary, where storage is read-only and writes are forwarded.
func (b *backend) mayWrite() bool {
	state := b.System().ReplicationState()
	return !state.HasState(consts.ReplicationPerformanceStandby | consts.ReplicationPerformanceSecondary)
}

// failure turns an error into what the Vault client sees. An error from a
// Cloudflare call is Cloudflare's verdict, told as such: a refusal is the
// caller's to fix, so it is a 400 that carries Cloudflare's status, codes and
// messages; a rate limit is a 429; no answer or a broken one is a 502 (504 on
// timeout): Vault could not reach a verdict. Any other error is the engine's
// own (Vault storage, mostly) and is returned as is: a 500, or the status an
// error such as errNotConfigured carries. err's text says what the call was
// for ("generate psk for tunnel X of account Y: ...").
func failure(err error) (*logical.Response, error) {
	if errors.Is(err, rotation.ErrOutcomeUnknown) {
		// Checked before Cloudflare's verdict: the refusal it carries did
		// not settle what happened.
		return nil, logical.CodedError(http.StatusBadGateway, err.Error())
	}
	var running *background.JobRunningError
	if errors.As(err, &running) {
		return nil, logical.CodedError(http.StatusConflict, err.Error())
	}
	var settling *rotation.SettlingError
	if errors.As(err, &settling) {
		return nil, logical.CodedError(http.StatusConflict, err.Error())
	}
	if errors.Is(err, rotation.ErrNotStored) {
		return nil, logical.CodedError(http.StatusNotFound, err.Error())
	}
	if !cloudflare.IsCloudflare(err) {
		return nil, err
	}
	msg := err.Error()
	if cloudflare.TokenRefused(err) {
		msg += "; Cloudflare refused the engine's API token (invalid, expired, disabled or rolled elsewhere): write a working api_token to this mount's config"
	}
	switch {
	case cloudflare.RetryAfter(err) > 0:
		return nil, logical.CodedError(http.StatusTooManyRequests, msg)
	case cloudflare.Refused(err):
		return logical.ErrorResponse(msg), nil
	case cloudflare.TimedOut(err):
		return nil, logical.CodedError(http.StatusGatewayTimeout, msg)
	}
	return nil, logical.CodedError(http.StatusBadGateway, msg)
}

// minRotationPeriod reads the mount's floor under every schedule from
// storage (the default while the engine is not configured). It reads
// storage rather than the cached client's config, so that a write refused
// or accepted always answers to the config stored at that moment.
func (b *backend) minRotationPeriod(ctx context.Context, s logical.Storage) (time.Duration, error) {
	cfg, err := readConfig(ctx, s)
	if err != nil {
		return 0, err
	}
	return cfg.minRotationPeriod(), nil
}
