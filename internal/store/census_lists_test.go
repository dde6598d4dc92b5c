package store

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// sizes records the size of the last Put of each key.
type sizes struct {
	logical.Storage
	mu sync.Mutex
	of map[string]int
}

func (s *sizes) Put(ctx context.Context, e *logical.StorageEntry) error {
	s.mu.Lock()
	s.of[e.Key] = len(e.Value)
	s.mu.Unlock()
	return s.Storage.Put(ctx, e)
}

// TestTheCensusEntriesStaySmall: the worst case of the census as stored.
// Raft refuses an entry over its max_entry_size (128 KiB as
// e2e/bulk_test.go runs it), and each census entry must stay well under:
// under 64 KiB. 100 tunnels of each kind are listed, with ids as long as
// the engine accepts (32 characters), the longest state, the largest
// failure count and retry time, and reasons as long as a record can hold,
// made of the characters JSON writes longest (six bytes each for a control
// character, U+2028 or <, two for a quote). Beside them: 100 running bulk
// jobs of a million tunnels and a year of days with keys stored.
func TestTheCensusEntriesStaySmall(t *testing.T) {
	ctx := context.Background()
	raw := &sizes{Storage: &logical.InmemStorage{}, of: map[string]int{}}
	now := time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC)
	c := NewCensus(CensusConfig{Now: func() time.Time { return now }})
	s := c.Observe(raw)
	worst := strings.Repeat("\x00<\u2028\"\\é\xff", 2000)
	for i := 0; i < 3*ListedPerKind; i++ {
		tun := Tunnel{AccountID: fmt.Sprintf("%032x", i%7), TunnelID: fmt.Sprintf("%032x", i)}
		rec := &Record{AccountID: tun.AccountID, TunnelID: tun.TunnelID, PSK: "k", Version: 1,
			StoredAt: now.Add(-time.Duration(i%366) * 24 * time.Hour), StateReason: worst}
		switch i % 3 {
		case 0:
			rec.State = StateStale
		case 1:
			rec.State = StateTunnelGone
		default:
			rec.State, rec.Failures, rec.LastFailure = StateRotationUnknown, math.MaxInt, worst
			rec.RetryAt = time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)
		}
		if err := WriteRecord(ctx, s, tun, rec); err != nil {
			t.Fatal(err)
		}
		c.NoteBulkJob(ctx, s, fmt.Sprintf("%032x", 1000+i%100), now, 1_000_000)
	}
	if err := c.Fold(ctx, s); err != nil { // refills
		t.Fatal(err)
	}
	if err := c.Close(ctx); err != nil {
		t.Fatal(err)
	}
	const limit = 64 << 10
	for _, key := range append([]string{CensusKey}, CensusListedPrefix+AttentionStale, CensusListedPrefix+AttentionFailing, CensusListedPrefix+AttentionGone) {
		n, ok := raw.of[key]
		t.Logf("%s: %d bytes", key, n)
		if !ok || n >= limit {
			t.Errorf("%s: %d bytes (written %v), want under %d", key, n, ok, limit)
		}
	}
	view, err := c.Stored(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range AttentionKinds {
		if n := len(view.Listed[kind]); n != ListedPerKind {
			t.Errorf("%s: %d listed, want %d", kind, n, ListedPerKind)
		}
	}
}

// TestAListedTextIsItsOwnJSON: a listed reason is cut to its bound, and
// encodes as itself: its length in bytes is its length in JSON.
func TestAListedTextIsItsOwnJSON(t *testing.T) {
	for _, s := range []string{"", "plain", "a\"b\\c<d>e&f\ng\u2028h\u2029i", "\xff\xfe", strings.Repeat("é<", 500), strings.Repeat("x", 5000)} {
		got := listedText(s, MaxListedReason)
		enc, _ := json.Marshal(got)
		if len(got) > MaxListedReason || len(enc) != len(got)+2 {
			t.Errorf("listedText(%q) = %q: %d bytes, %d in JSON", s[:min(len(s), 40)], got, len(got), len(enc)-2)
		}
	}
	if got := listedText("short \"quoted\" reason", MaxListedReason); got != "short 'quoted' reason" {
		t.Errorf("a short reason became %q", got)
	}
}

// TestAListTakenFromStorageIsBounded: an index entry written with a longer
// reason (by an earlier version, or by hand) is listed within the bound.
func TestAListTakenFromStorageIsBounded(t *testing.T) {
	ctx := context.Background()
	raw := &logical.InmemStorage{}
	tun := tunnelOf(1)
	rec := &Record{AccountID: tun.AccountID, TunnelID: tun.TunnelID, PSK: "k", Version: 1, StoredAt: censusBase, State: StateStale, StateReason: "x"}
	if err := WriteRecord(ctx, raw, tun, rec); err != nil {
		t.Fatal(err)
	}
	entry, _ := logical.StorageEntryJSON(tun.attentionKey(AttentionStale), AttentionEntry{State: StateStale, Reason: strings.Repeat("<", 1024)})
	if err := raw.Put(ctx, entry); err != nil {
		t.Fatal(err)
	}
	c := newTestCensus(censusBase)
	if err := c.Fold(ctx, c.Observe(raw)); err != nil { // loads and refills
		t.Fatal(err)
	}
	view, err := c.View(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	if l := view.Listed[AttentionStale]; len(l) != 1 || len(l[0].Reason) > MaxListedReason || strings.Contains(l[0].Reason, "<") {
		t.Fatalf("listed from the index: %+v", l)
	}
}
