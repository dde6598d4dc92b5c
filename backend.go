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
	"vault-plugin-secrets-cloudflare-ipsec/internal/mount"
	"vault-plugin-secrets-cloudflare-ipsec/internal/rotation"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// operationPrefix names the engine in the OpenAPI document Vault generates
// (operation ids such as "cloudflare-ipsec-read-psk").
const operationPrefix = "cloudflare-ipsec"

// backend is one mount of the engine. The plugin process serves many mounts
// at once, so everything a mount needs lives here.
type backend struct {
	*framework.Backend

	// engine runs the rotation protocol (internal/rotation) for this
	// mount; Setup builds it.
	engine *rotation.Engine

	// clients is the mount's way to Cloudflare: the cached client built
	// from config, the call budget and Cloudflare's stored block
	// (internal/mount).
	clients *mount.Clients

	// background is the scheduler, bulk jobs and the periodic sweep
	// (internal/background); Setup builds it.
	background *background.Worker
	// census counts the mount's tunnels for status reads (store.Census):
	// every request's storage is wrapped so that each record write is
	// counted as it is made (HandleRequest). Setup builds it.
	census *store.Census
	// configMu serialises config writes, deletes and root token rotation:
	// a write and a rotation read, call Cloudflare and store config, and a
	// delete in between would be undone by their store. Taken before the
	// client lock (mount.Clients).
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
		req.Storage = b.census.ObserveRequest(req.Storage)
	}
	return b.Backend.HandleRequest(ctx, req)
}

// periodic is the backend's PeriodicFunc, which Vault calls about once a
// minute: the background's sweep. Without config there is nothing to do
// yet.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if err := b.background.Periodic(ctx, req.Storage); err != nil && !errors.Is(err, mount.ErrNotConfigured) {
		return err
	}
	return nil
}

func (b *backend) invalidate(_ context.Context, key string) {
	switch key {
	case mount.ConfigKey:
		b.clients.Reset()
	case store.RateLimitKey:
		// The active node recorded a block: read it again before the next
		// call from here (a standby still calls Cloudflare for reads).
		b.clients.ForgetBlock()
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
		Connect: b.clients.Connect,
		// Keys made from config password_policy (key_source vault).
		Passwords: b.System().GeneratePasswordFromPolicy,
		Hooks:     rotation.Hooks{Scheduled: b.pokeScheduler, Rotated: b.announceRotation},
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
		Connect:  b.clients.Connect,
		MayWrite: b.mayWrite,
		Budget:   b.clients.Budget(),
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
// error such as mount.ErrNotConfigured carries. err's text says what the call was
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
	if rotation.KeyRefused(err) && !cloudflare.NotFound(err) {
		// Cloudflare's answer that it did not take the key Vault made: its
		// reason is the caller's to act on, as for a refusal.
		return logical.ErrorResponse(err.Error()), nil
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
	cfg, err := mount.ReadConfig(ctx, s)
	if err != nil {
		return 0, err
	}
	return cfg.MinRotation(), nil
}
