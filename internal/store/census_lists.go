package store

// The census's lists in storage, and what bounds their size.
//
// The census is written to storage as one small entry (counts, drift,
// bulk jobs, the schedule) and one entry per attention kind with the
// tunnels it lists: 100 tunnels with a reason each. Vault's integrated
// storage refuses an entry larger than its max_entry_size (1 MiB by
// default, 128 KiB as e2e/bulk_test.go runs it), and a census that cannot
// be written freezes a standby's status and loses the counts' exactness at
// every restart. So each entry is bounded, in the worst case, well under
// 64 KiB (TestTheCensusEntriesStaySmall): a reason and a state are cut to
// a fixed number of bytes, and made of characters that JSON does not
// escape, so that their length is their encoded length. The whole reason
// stays in the tunnel's record (its metadata read).

import (
	"context"
	"fmt"
	"slices"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	// CensusListedPrefix holds the census's lists: census/listed/<kind>.
	CensusListedPrefix = "census/listed/"
	// MaxListedReason bounds a listed tunnel's reason, in bytes, and
	// maxListedState its state (one of States, unless a record was written
	// around the engine).
	MaxListedReason = 200
	maxListedState  = 32
)

// listedText is s cut to at most max bytes, with every character JSON would
// escape or write in more than one byte replaced: a double quote by a
// single one, anything else outside printable ASCII, and <, > and & (which
// Go's encoder escapes for HTML), by '?'. Its length is its length in JSON.
func listedText(s string, max int) string {
	const cut = "...(cut)"
	out := make([]byte, 0, len(s))
	for _, r := range s {
		switch {
		case r == '"':
			out = append(out, '\'')
		case r == '\\' || r == '<' || r == '>' || r == '&' || r < 0x20 || r > 0x7e:
			// utf8.RuneError, for a byte that is not UTF-8, is > 0x7e.
			out = append(out, '?')
		default:
			out = append(out, byte(r))
		}
	}
	if len(out) > max {
		out = append(out[:max-len(cut)], cut...)
	}
	return string(out)
}

// bounded is it with its state and reason as attentionOf makes them: what
// a list takes from storage (an index entry or a stored list written by an
// earlier version, or by hand) stays within the lists' bound.
func bounded(it AttentionItem) AttentionItem {
	it.State, it.Reason = listedText(it.State, maxListedState), listedText(it.Reason, MaxListedReason)
	return it
}

// censusList is one kind's list as stored. Owner is the process that wrote
// it: a closed census is taken with its lists only when they are its own.
type censusList struct {
	Owner string          `json:"owner"`
	Items []AttentionItem `json:"items"`
}

// readCensusList is kind's stored list; nil when there is none, or it does
// not decode (it is then refilled from the index).
func readCensusList(ctx context.Context, s logical.Storage, kind string) (*censusList, error) {
	entry, err := s.Get(ctx, CensusListedPrefix+kind)
	if err != nil {
		return nil, fmt.Errorf("read the census's %s list: %w", kind, err)
	}
	l := new(censusList)
	if entry == nil || entry.DecodeJSON(l) != nil {
		return nil, nil
	}
	return l, nil
}

func writeCensusList(ctx context.Context, s logical.Storage, kind string, l *censusList) error {
	entry, err := logical.StorageEntryJSON(CensusListedPrefix+kind, l)
	if err != nil {
		return fmt.Errorf("encode the census's %s list: %w", kind, err)
	}
	if err := s.Put(ctx, entry); err != nil {
		return fmt.Errorf("store the census's %s list: %w", kind, err)
	}
	return nil
}

// readCensusLists are the stored lists, by kind (a kind without one, or
// with one that does not decode, is left out).
func readCensusLists(ctx context.Context, s logical.Storage) (map[string]*censusList, error) {
	out := map[string]*censusList{}
	for _, kind := range AttentionKinds {
		l, err := readCensusList(ctx, s, kind)
		if err != nil {
			return nil, err
		}
		if l != nil {
			out[kind] = l
		}
	}
	return out, nil
}

// writeLists stores the lists that changed since they were last stored
// (every one when all), as owner's. The caller holds foldMu.
func (c *Census) writeLists(ctx context.Context, s logical.Storage, owner string, lists map[string][]AttentionItem, all bool) error {
	if c.listsOwner != owner {
		c.listsOwner, c.listsWritten = owner, map[string][]AttentionItem{}
	}
	for _, kind := range AttentionKinds {
		if written, ok := c.listsWritten[kind]; ok && !all && slices.Equal(written, lists[kind]) {
			continue
		}
		if err := writeCensusList(ctx, s, kind, &censusList{Owner: owner, Items: lists[kind]}); err != nil {
			return err
		}
		c.listsWritten[kind] = lists[kind]
	}
	return nil
}
