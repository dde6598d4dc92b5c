package main

import (
	"context"
	"fmt"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// TestListRecordsAfterWalksEveryRecordOnce: the repair walk's listing, in
// pages, from any cursor, sees each record once and says when it is done.
func TestListRecordsAfterWalksEveryRecordOnce(t *testing.T) {
	ctx := context.Background()
	s := &logical.InmemStorage{}
	a, b := "a0000000000000000000000000000000", "b0000000000000000000000000000000"
	var all []tunnelRef
	for _, account := range []string{a, b} {
		for i := 0; i < 3; i++ {
			ref := tunnelRef{account, fmt.Sprintf("%031d%d", 0, i)}
			all = append(all, ref)
			if err := s.Put(ctx, &logical.StorageEntry{Key: ref.storageKey(), Value: []byte("{}")}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Not records: other indexes beside psk/.
	if err := s.Put(ctx, &logical.StorageEntry{Key: unresolvedPrefix + a + "/x"}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name         string
		after        tunnelRef
		n            int
		want         []tunnelRef
		wantComplete bool
	}{
		{"from the start, all fit", tunnelRef{}, 10, all, true},
		{"from the start, exactly all", tunnelRef{}, 6, all, true},
		{"from the start, a page", tunnelRef{}, 4, all[:4], false},
		{"across accounts", all[2], 2, all[3:5], false},
		{"to the end", all[3], 5, all[4:], true},
		{"after the last", all[5], 5, nil, true},
		{"after a record since deleted", tunnelRef{a, "0000000000000000000000000000000z"}, 1, all[3:4], false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, complete, err := listRecordsAfter(ctx, s, tc.after, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) || complete != tc.wantComplete {
				t.Errorf("got %v (complete %v), want %v (complete %v)", got, complete, tc.want, tc.wantComplete)
			}
		})
	}
}
