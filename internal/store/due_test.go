package store

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// TestListRecordsAfterWalksEveryRecordOnce: the repair walk's listing, in
// pages, from any cursor, sees each record once and says when it is done.
func TestListRecordsAfterWalksEveryRecordOnce(t *testing.T) {
	ctx := context.Background()
	s := &logical.InmemStorage{}
	a, b := "a0000000000000000000000000000000", "b0000000000000000000000000000000"
	var all []Tunnel
	for _, account := range []string{a, b} {
		for i := 0; i < 3; i++ {
			ref := Tunnel{AccountID: account, TunnelID: fmt.Sprintf("%031d%d", 0, i)}
			all = append(all, ref)
			if err := s.Put(ctx, &logical.StorageEntry{Key: ref.StorageKey(), Value: []byte("{}")}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Not records: other indexes beside psk/.
	if err := s.Put(ctx, &logical.StorageEntry{Key: UnresolvedPrefix + a + "/x"}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name         string
		after        Tunnel
		n            int
		want         []Tunnel
		wantComplete bool
	}{
		{"from the start, all fit", Tunnel{}, 10, all, true},
		{"from the start, exactly all", Tunnel{}, 6, all, true},
		{"from the start, a page", Tunnel{}, 4, all[:4], false},
		{"across accounts", all[2], 2, all[3:5], false},
		{"to the end", all[3], 5, all[4:], true},
		{"after the last", all[5], 5, nil, true},
		{"after a record since deleted", Tunnel{AccountID: a, TunnelID: "0000000000000000000000000000000z"}, 1, all[3:4], false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, complete, err := ListRecordsAfter(ctx, s, tc.after, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) || complete != tc.wantComplete {
				t.Errorf("got %v (complete %v), want %v (complete %v)", got, complete, tc.want, tc.wantComplete)
			}
		})
	}
}

// TestLoadDueResumesAfterAKey: a pass loads batch after batch, each after
// the last key of the one before, so every due entry is loaded once, in key
// order, and later minutes are reached whatever comes before them.
func TestLoadDueResumesAfterAKey(t *testing.T) {
	ctx := context.Background()
	s := &logical.InmemStorage{}
	now := time.Unix(1_000_000*60+30, 0)
	current := DueMinute(now, false)
	var want []string
	for _, minute := range []int64{current - 2, current - 1, current} {
		for i := 0; i < 3; i++ {
			ref := Tunnel{AccountID: fmt.Sprintf("%032x", i), TunnelID: fmt.Sprintf("%032x", minute)}
			key := DueKey(minute, ref)
			if i == 1 {
				key = BulkDueKey(minute, ref)
			}
			want = append(want, key)
			if err := s.Put(ctx, &logical.StorageEntry{Key: key, Value: []byte("{}")}); err != nil {
				t.Fatal(err)
			}
		}
	}
	later := DueKey(current+5, Tunnel{AccountID: fmt.Sprintf("%032x", 9), TunnelID: fmt.Sprintf("%032x", 9)})
	if err := s.Put(ctx, &logical.StorageEntry{Key: later, Value: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		after string
		want  []string
	}{
		{"from the start", "", want},
		{"within a minute", want[1], want[2:]},
		{"at a minute's last key", want[2], want[3:]},
		{"after a key since removed", want[4] + "x", want[5:]},
		{"after the last due key", want[len(want)-1], nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			items, next, err := LoadDue(ctx, s, now, tc.after)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, item := range items {
				got = append(got, item.Key)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) || !next.Equal(time.Unix((current+5)*60, 0)) {
				t.Errorf("got %v (next %v), want %v (next %v)", got, next, tc.want, time.Unix((current+5)*60, 0))
			}
		})
	}
}
