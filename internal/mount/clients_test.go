package mount

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"
)

func testConfig() *Config {
	return &Config{APIToken: "t0ken-t0ken-t0ken-t0ken-t0ken-t0ken-t0ken", BaseURL: "http://127.0.0.1:1/client/v4",
		RequestTimeout: time.Second, RateLimit: 7, RateLimitWindow: time.Minute}
}

// TestClientsCacheUntilConfigChanges: the client is built once from stored
// config and dropped by whatever changes config, so no call ever goes out
// with a token or endpoint that is no longer the stored one.
func TestClientsCacheUntilConfigChanges(t *testing.T) {
	ctx, s := context.Background(), &logical.InmemStorage{}
	c := NewClients(ClientsConfig{})
	if _, _, err := c.Get(ctx, s); !errors.Is(err, ErrNotConfigured) {
		t.Fatalf("Get without config: %v, want ErrNotConfigured", err)
	}
	if err := c.Store(ctx, s, testConfig()); err != nil {
		t.Fatal(err)
	}
	if limit, window := c.Budget().Limit(); limit != 7 || window != time.Minute {
		t.Errorf("budget after Store: %d per %s, want config's 7 per 1m", limit, window)
	}
	first, cfg, err := c.Get(ctx, s)
	if err != nil || cfg.RateLimit != 7 {
		t.Fatalf("Get after Store: %v, %+v", err, cfg)
	}
	if again, _, _ := c.Get(ctx, s); again != first {
		t.Error("a second Get built a new client: the cache does not hold")
	}
	changed := testConfig()
	changed.BaseURL = "http://127.0.0.1:2/client/v4"
	if err := c.Store(ctx, s, changed); err != nil {
		t.Fatal(err)
	}
	if after, cfg, _ := c.Get(ctx, s); after == first || cfg.BaseURL != changed.BaseURL {
		t.Error("after a config write the cached client of the old config is still handed out")
	}
	if err := c.Delete(ctx, s); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Get(ctx, s); !errors.Is(err, ErrNotConfigured) {
		t.Errorf("Get after Delete: %v, want ErrNotConfigured", err)
	}
}

// TestABlockOnRecordIsHonouredAndStored: a block a previous process stored
// is read into the budget before the first client is built, again after
// ForgetBlock (a standby seeing the active node's write), and a block the
// budget learns is stored where the next process finds it.
func TestABlockOnRecordIsHonouredAndStored(t *testing.T) {
	ctx, s := context.Background(), &logical.InmemStorage{}
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	if err := store.WriteRateLimitBlock(ctx, s, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	c := NewClients(ClientsConfig{Now: clock})
	if err := c.Store(ctx, s, testConfig()); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Get(ctx, s); err != nil {
		t.Fatal(err)
	}
	if got := c.Budget().BlockedUntil(); !got.Equal(now.Add(time.Minute)) {
		t.Errorf("blocked until %s after the first Get, want the stored %s", got, now.Add(time.Minute))
	}

	if err := store.WriteRateLimitBlock(ctx, s, now.Add(3*time.Minute)); err != nil {
		t.Fatal(err)
	}
	c.ForgetBlock()
	if _, _, err := c.Get(ctx, s); err != nil {
		t.Fatal(err)
	}
	if got := c.Budget().BlockedUntil(); !got.Equal(now.Add(3 * time.Minute)) {
		t.Errorf("blocked until %s after ForgetBlock, want the newly stored %s", got, now.Add(3*time.Minute))
	}

	c.Budget().Block(now.Add(5 * time.Minute))
	block, err := store.ReadRateLimitBlock(ctx, s)
	if err != nil || block == nil || !block.BlockedUntil.Equal(now.Add(5*time.Minute)) {
		t.Errorf("the budget's new block was not stored: %+v, %v", block, err)
	}

	standby := NewClients(ClientsConfig{Now: clock, MayWrite: func() bool { return false }})
	if err := standby.LoadBlock(ctx, s); err != nil {
		t.Fatal(err)
	}
	standby.Budget().Block(now.Add(9 * time.Minute))
	if block, _ := store.ReadRateLimitBlock(ctx, s); !block.BlockedUntil.Equal(now.Add(5 * time.Minute)) {
		t.Errorf("a node that may not write stored a block: %s", block.BlockedUntil)
	}
}
