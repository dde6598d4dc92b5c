package store

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// refusing is storage that refuses the Puts whose key starts with a prefix.
type refusing struct {
	logical.Storage
	prefix string
}

func (r *refusing) Put(ctx context.Context, e *logical.StorageEntry) error {
	if r.prefix != "" && strings.HasPrefix(e.Key, r.prefix) {
		return errors.New("refused")
	}
	return r.Storage.Put(ctx, e)
}

// TestSaveScheduledNeverLosesARotation: whichever write storage refuses,
// a record never points at a next rotation that has no entry, and the
// entry it had before is dropped only once the record that replaces it is
// stored. A key that exists nowhere else is stored even when its entry
// cannot be.
func TestSaveScheduledNeverLosesARotation(t *testing.T) {
	ctx := context.Background()
	tun := Tunnel{AccountID: "023e105f4ecef8ad9ca31a8372d0c353", TunnelID: "c4a7362d577a6c3019a474fd6f485821"}
	old := time.Date(2030, 1, 1, 10, 0, 0, 0, time.UTC)
	next := old.Add(time.Hour)
	exists := func(s logical.Storage, key string) bool {
		e, err := s.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return e != nil
	}
	for _, tc := range []struct {
		name        string
		refuse      string
		keyOnlyHere bool
		wantErr     bool
		wantRecord  bool // the new record is stored
		wantNew     bool // the new entry is stored
		wantOld     bool // the superseded entry is still there
		wantNotes   int
	}{
		{name: "nothing refused", wantRecord: true, wantNew: true},
		{name: "entry refused", refuse: DuePrefix, wantErr: true, wantOld: true},
		{name: "record refused", refuse: PSKPrefix, wantErr: true, wantNew: true, wantOld: true},
		{name: "entry refused, key only here", refuse: DuePrefix, keyOnlyHere: true, wantRecord: true, wantNotes: 1},
		{name: "record refused, key only here", refuse: PSKPrefix, keyOnlyHere: true, wantErr: true, wantNew: true, wantOld: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inner := &logical.InmemStorage{}
			if err := ScheduleRotation(ctx, inner, tun, old); err != nil {
				t.Fatal(err)
			}
			s := &refusing{Storage: inner, prefix: tc.refuse}
			rec := &Record{AccountID: tun.AccountID, TunnelID: tun.TunnelID, PSK: "k", Version: 2, NextRotation: next}
			notes, err := SaveScheduled(ctx, s, rec, old, tc.keyOnlyHere)
			if (err != nil) != tc.wantErr || len(notes) != tc.wantNotes {
				t.Fatalf("err %v, notes %v", err, notes)
			}
			stored, rerr := ReadRecord(ctx, inner, tun)
			if rerr != nil {
				t.Fatal(rerr)
			}
			if got := stored != nil && stored.Version == 2; got != tc.wantRecord {
				t.Errorf("record stored: %v, want %v", got, tc.wantRecord)
			}
			if got := exists(inner, DueKey(DueMinute(next, false), tun)); got != tc.wantNew {
				t.Errorf("new entry stored: %v, want %v", got, tc.wantNew)
			}
			if got := exists(inner, DueKey(DueMinute(old, false), tun)); got != tc.wantOld {
				t.Errorf("superseded entry still there: %v, want %v", got, tc.wantOld)
			}
		})
	}
}
