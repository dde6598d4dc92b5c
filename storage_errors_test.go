package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/store"

	"github.com/hashicorp/vault/sdk/logical"
)

// TestStorageFailuresAreNotCloudflares: when Vault storage fails during a
// write's reconciliation step (Cloudflare answered; storing what it said
// failed), the answer is a 500 about storage, not a 502 blaming Cloudflare:
// an operator must look at Vault, not at Cloudflare.
func TestStorageFailuresAreNotCloudflares(t *testing.T) {
	cases := []struct {
		name string
		// fails picks the Put that fails.
		fails func(*logical.StorageEntry) bool
	}{
		{"the reconciled record", func(e *logical.StorageEntry) bool { return strings.HasPrefix(e.Key, store.PSKPrefix) }},
		{"the record marked for the rotation after reconciling", func(e *logical.StorageEntry) bool {
			return strings.HasPrefix(e.Key, store.PSKPrefix) && strings.Contains(string(e.Value), `"state":"`+store.StateRotationUnknown+`"`)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newConfiguredEnv(t)
			env.must(env.request(logical.UpdateOperation, env.pskPath(), nil))
			storage := &failingStorage{Storage: env.storage}
			env.storage = storage

			// A rotation whose outcome is unknown, past its settle time;
			// Cloudflare's key is still the stored one, so reconciliation
			// will store the record back as current.
			tun := store.Tunnel{AccountID: env.account, TunnelID: env.tunnel.ID}
			rec, err := store.ReadRecord(context.Background(), env.storage, tun)
			if err != nil || rec == nil {
				t.Fatalf("read record: %v", err)
			}
			started := env.clock.Now().Add(-time.Hour).UTC()
			rec.State, rec.StateReason = store.StateRotationUnknown, "played by the test"
			rec.RotationStartedAt, rec.SettleUntil = started, started.Add(time.Minute)
			if err := store.MarkUnresolved(context.Background(), env.storage, tun); err != nil {
				t.Fatal(err)
			}
			if err := store.WriteRecord(context.Background(), env.storage, tun, rec); err != nil {
				t.Fatal(err)
			}

			storage.setFailPut(tc.fails)
			resp, err := env.request(logical.UpdateOperation, env.pskPath(), nil)
			storage.setFailPut(nil)
			if got := httpStatus(resp, err); got != http.StatusInternalServerError {
				t.Fatalf("status = %d, want 500: %s", got, errorText(resp, err))
			}
			msg := errorText(resp, err)
			if !strings.Contains(msg, "store psk record") || !strings.Contains(msg, "injected storage failure") {
				t.Errorf("error %q does not name the storage step that failed", msg)
			}
			if strings.Contains(strings.ToLower(msg), "cloudflare") {
				t.Errorf("error %q blames Cloudflare for a storage failure", msg)
			}
		})
	}
}
