// Package rotation is the engine's protocol for putting a new key on the
// edge without ever losing one: begin (the record written rotation_unknown
// before anything is sent, or pending with the key when Vault makes it),
// send, finish (the key stored), and, when an outcome is lost, reconcile and
// heal from Cloudflare's own account of the tunnel, or, for a key Vault made,
// finish by sending the same key again (vaultkeys.go). validate_only, forgetting a tunnel and rescheduling it run under
// the same per-tunnel lock and rules.
//
// The package knows nothing of Vault's request handling: the root package
// turns a request into one call here and this package's typed errors into
// responses. It asks Cloudflare only through Edge, has keys made through a
// KeySource, reads the time from an injected clock, and tells the outside
// what happened through Hooks.
package rotation

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflare"
	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

// ErrOutcomeUnknown marks a failure after which the edge may use a key
// Vault does not hold although Cloudflare's answer looked like a refusal:
// the record says rotation_unknown, and the caller should not tell the
// operator that nothing happened.
var ErrOutcomeUnknown = errors.New("the outcome is unknown")

// Edge is what the protocol asks of Cloudflare. *cloudflare.Client is one.
type Edge interface {
	// GetTunnel reads a tunnel's record: its key's time of generation and
	// what a router needs of it. It never carries a key.
	GetTunnel(ctx context.Context, accountID, tunnelID string) (*cloudflare.TunnelState, error)
	// GeneratePSK asks the edge to make a new key and put it into effect
	// (or, with validateOnly, only to check that it would).
	GeneratePSK(ctx context.Context, accountID, tunnelID string, validateOnly bool) (*cloudflare.GeneratedPSK, error)
	// ListTunnels reads every tunnel of an account, as GetTunnel reads
	// one: the drift sweep's one call per account.
	ListTunnels(ctx context.Context, accountID string) ([]cloudflare.TunnelState, error)
	// SetPSKs asks the edge to take keys the caller made (Cloudflare's Set
	// operation), and says tunnel by tunnel whether it did.
	SetPSKs(ctx context.Context, accountID string, keys []cloudflare.PSKToSet, validateOnly bool) (*cloudflare.SetPSKsResult, error)
}

// KeySource is where a tunnel's next key comes from; the engine chooses one
// from Settings for each attempt (keySource). A source that makes the key
// itself returns it from MakeKey, and the protocol writes it ahead into the
// record (state pending) before any request carries it and sets it on the
// edge with Cloudflare's Set operation, so that a lost answer is finished
// with the same key (vaultkeys.go). A source whose keys the edge makes
// returns "" and has the edge generate one (Send).
type KeySource interface {
	// Name is the source's key_source, recorded with each key it made.
	Name() string
	// MakeKey returns a new key, or "" when the edge makes it.
	MakeKey(ctx context.Context) (string, error)
}

// CloudflareKeys has Cloudflare make every key (psk_generate): the key
// exists nowhere before Cloudflare has it.
type CloudflareKeys struct{}

// Name is "cloudflare".
func (CloudflareKeys) Name() string { return store.KeySourceCloudflare }

// MakeKey makes none: the edge does.
func (CloudflareKeys) MakeKey(context.Context) (string, error) { return "", nil }

// Send calls psk_generate.
func (CloudflareKeys) Send(ctx context.Context, edge Edge, t store.Tunnel, validateOnly bool) (*cloudflare.GeneratedPSK, error) {
	return edge.GeneratePSK(ctx, t.AccountID, t.TunnelID, validateOnly)
}

// Settings are the mount's configuration as the protocol needs it.
type Settings struct {
	// RequestTimeout bounds one Cloudflare call; the settle window of an
	// attempt is derived from it (settleWindow).
	RequestTimeout time.Duration
	// HealStalePSK lets reconciliation generate a key when it finds that
	// the edge uses one Vault does not hold.
	HealStalePSK bool
	// DriftInterval is how often the drift sweep looks at every tunnel (0:
	// never); a tunnel is healed at most once per two of them (mayHeal).
	DriftInterval time.Duration
	// MinRotationPeriod is the floor under every schedule.
	MinRotationPeriod time.Duration
	// KeySource is config key_source: store.KeySourceCloudflare ("" too)
	// or store.KeySourceVault.
	KeySource string
	// PasswordPolicy, with KeySource vault, names the Vault password
	// policy the keys are made from ("": 32 letters and digits).
	PasswordPolicy string
	// SetBatchSize is config set_batch_size: the most keys a bulk job
	// sends in one Set call (KeySource vault; batch.go). Not the
	// protocol's, which takes any batch, but the background's, which
	// reads config only through a Conn.
	SetBatchSize int
}

// DefaultSetBatchSize is config set_batch_size's default (internal/mount's
// config.go says why).
const DefaultSetBatchSize = 100

// Conn is a connection to the edge with the settings it was made from: the
// two change together when config is written.
type Conn struct {
	Edge     Edge
	Settings Settings
}

// Hooks are what the protocol tells the outside. Either may be nil.
type Hooks struct {
	// Scheduled is told that a tunnel's next rotation was stored: the
	// scheduler may have to wake sooner than it planned.
	Scheduled func()
	// Rotated is told of every key stored, and who asked for it. It must
	// not block: it runs before the caller gets its answer.
	Rotated func(rec *store.Record, trigger Trigger)
}

// Trigger says who asked for a key. It is the rotation event's "trigger".
type Trigger string

const (
	// TriggerWrite is an operator's write of psk/<account>/<tunnel>: the
	// one rotation that also takes back a tunnel held from healing or held
	// for its last answer.
	TriggerWrite Trigger = "write"
	// TriggerValidate is a validate_only write, run as a rotation because
	// Cloudflare may turn it into one (validate.go).
	TriggerValidate Trigger = "validate_only"
	// TriggerSchedule is the scheduler, at the tunnel's next_rotation.
	TriggerSchedule Trigger = "schedule"
	// TriggerBulk is the scheduler working a bulk job (rotate/<account>).
	TriggerBulk Trigger = "bulk"
	// TriggerHeal is reconciliation, replacing a key the edge uses and
	// Vault does not hold.
	TriggerHeal Trigger = "heal"
)

// Config is what an Engine is made of.
type Config struct {
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// Logger receives the engine's log lines; never a key or a token.
	Logger hclog.Logger
	// Connect returns the edge and settings of this moment, built from the
	// config in s. It is asked again for every tunnel a long pass works,
	// because config (and the token) can change under it.
	Connect func(ctx context.Context, s logical.Storage) (Conn, error)
	// Passwords generates a password from a named Vault password policy
	// (the system view's GeneratePasswordFromPolicy), for key_source vault
	// with password_policy. Nil: a policy cannot be used.
	Passwords func(ctx context.Context, policy string) (string, error)
	Hooks     Hooks
}

// Engine runs the protocol for one mount. It is safe for concurrent use:
// every call that changes a tunnel holds that tunnel's lock.
type Engine struct {
	now       func() time.Time
	logger    hclog.Logger
	connect   func(ctx context.Context, s logical.Storage) (Conn, error)
	passwords func(ctx context.Context, policy string) (string, error)
	hooks     Hooks
	locks     *tunnelLocks
}

// New returns an Engine.
func New(cfg Config) *Engine {
	e := &Engine{now: cfg.Now, logger: cfg.Logger, connect: cfg.Connect, passwords: cfg.Passwords, hooks: cfg.Hooks, locks: newTunnelLocks()}
	if e.now == nil {
		e.now = time.Now
	}
	if e.logger == nil {
		e.logger = hclog.NewNullLogger()
	}
	return e
}

// Lock takes t's lock, waiting for it, and returns its release. The
// background holds it while it decides about a tunnel and rotates it.
func (e *Engine) Lock(t store.Tunnel) (unlock func()) {
	return e.locks.lock(t.StorageKey())
}

// TryLock takes t's lock if no one holds it: readers and the background
// pass over a tunnel whose rotation is in flight.
func (e *Engine) TryLock(t store.Tunnel) (unlock func(), ok bool) {
	return e.locks.tryLock(t.StorageKey())
}

// LockHolders is how many callers hold or wait for t's lock: a diagnostic,
// and how a test knows that a caller waits.
func (e *Engine) LockHolders(t store.Tunnel) int {
	return e.locks.holders(t.StorageKey())
}

// TunnelLogger is the engine's logger with the tunnel's identifiers on
// every line.
func (e *Engine) TunnelLogger(t store.Tunnel) hclog.Logger {
	return e.logger.With("account_id", t.AccountID, "tunnel_id", t.TunnelID)
}

// scheduled tells the scheduler that a next rotation was stored.
func (e *Engine) scheduled() {
	if e.hooks.Scheduled != nil {
		e.hooks.Scheduled()
	}
}

// rotated tells the outside that a key was stored.
func (e *Engine) rotated(rec *store.Record, trigger Trigger) {
	if e.hooks.Rotated != nil {
		e.hooks.Rotated(rec, trigger)
	}
}
