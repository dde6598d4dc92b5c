package store

// The tunnels a status read lists: the first ListedPerKind of each
// attention kind, in key order, kept by the census beside its counts and
// written with them, so that a status read lists them without reading the
// index (a hundred tunnels spread over a hundred accounts would be a
// hundred storage reads, and more: the read was 100 times a PSK read's cost
// before they were kept).
//
// Each change applies to them as to the counts: a tunnel that starts to
// need attention is listed if it sorts before the last one listed (or every
// tunnel of its kind is listed), one that stops is taken off, a changed
// reason replaces the old one. The list is always the first tunnels of its
// kind; when one is taken off while more exist, it is refilled from the
// attention/ index (a List, and a Get for each tunnel not listed yet) by
// the background's next pass (Fold) or the end of a walk, never by a status
// read, which reads nothing from storage: until then the list is short by
// the tunnels taken off, and still the first of its kind. The index is
// written before the change that puts a tunnel in it, and emptied before
// the change that takes one out is applied, so that a refill never lists a
// tunnel the change then forgets. A refill reads the index without holding
// the census's lock, and installs what it read only if no change to the
// list came meanwhile (refillLists), so neither a record's write nor a
// status read waits for its List. When an index write fails the counts are
// marked not exact (observe.go), since a refill may then list what the
// records do not say.

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/hashicorp/vault/sdk/logical"
)

// ListedPerKind bounds the tunnels of each attention kind the census lists.
const ListedPerKind = 100

// AttentionItem is one listed tunnel and what its attention/ entry says.
type AttentionItem struct {
	AccountID string `json:"account_id"`
	TunnelID  string `json:"tunnel_id"`
	AttentionEntry
}

func (it AttentionItem) tunnel() Tunnel {
	return Tunnel{AccountID: it.AccountID, TunnelID: it.TunnelID}
}

// attentionKey is t's entry in kind's index: attention/<kind>/<account>.<tunnel>,
// one List for the whole kind.
func (t Tunnel) attentionKey(kind string) string {
	return AttentionPrefix + kind + "/" + t.AccountID + "." + t.TunnelID
}

// attentionTunnel is the tunnel of an entry's name in a kind's index.
func attentionTunnel(name string) (Tunnel, bool) {
	account, tunnel, ok := strings.Cut(name, ".")
	if !ok || account == "" || tunnel == "" || strings.ContainsAny(tunnel, "./") {
		return Tunnel{}, false
	}
	return Tunnel{AccountID: account, TunnelID: tunnel}, true
}

// listAttention lists kind's index in key order.
func listAttention(ctx context.Context, s logical.Storage, kind string) ([]Tunnel, error) {
	names, err := s.List(ctx, AttentionPrefix+kind+"/")
	if err != nil {
		return nil, fmt.Errorf("list the %s tunnels of the attention index: %w", kind, err)
	}
	out := make([]Tunnel, 0, len(names))
	for _, name := range names {
		if t, ok := attentionTunnel(name); ok {
			out = append(out, t)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].less(out[j]) })
	return out, nil
}

func readAttention(ctx context.Context, s logical.Storage, t Tunnel, kind string) (*AttentionEntry, error) {
	entry, err := s.Get(ctx, t.attentionKey(kind))
	if err != nil {
		return nil, fmt.Errorf("read the attention index entry of %s: %w", t, err)
	}
	if entry == nil {
		return nil, nil
	}
	e := new(AttentionEntry)
	if err := entry.DecodeJSON(e); err != nil {
		return nil, fmt.Errorf("decode the attention index entry of %s: %w", t, err)
	}
	return e, nil
}

// listedFind is where t is, or would be, in kind's list. The caller holds mu.
func (c *Census) listedFind(kind string, t Tunnel) (int, bool) {
	l := c.listed[kind]
	i := sort.Search(len(l), func(i int) bool { return !l[i].tunnel().less(t) })
	return i, i < len(l) && l[i].tunnel() == t
}

// listedPut lists item, which needs kind's attention from now on (or says
// something new), where the list is the first tunnels of its kind. The
// caller holds mu and has counted the change.
func (c *Census) listedPut(kind string, item AttentionItem) {
	c.changedKind(kind)
	i, found := c.listedFind(kind, item.tunnel())
	l := c.listed[kind]
	if found {
		l[i] = item
		return
	}
	// Listed if it sorts before the last one listed, or if every other
	// tunnel of its kind was listed.
	if i == len(l) && len(l) < c.live.Attention[kind]-1 {
		return
	}
	l = append(l, AttentionItem{})
	copy(l[i+1:], l[i:])
	l[i] = item
	if len(l) > c.perKind {
		l = l[:c.perKind]
	}
	c.listed[kind] = l
}

// listedDrop takes t off kind's list, and has it refilled if more tunnels
// of the kind exist. The caller holds mu and has counted the change.
func (c *Census) listedDrop(kind string, t Tunnel) {
	c.changedKind(kind)
	i, found := c.listedFind(kind, t)
	if !found {
		return
	}
	l := c.listed[kind]
	c.listed[kind] = append(l[:i], l[i+1:]...)
	if len(c.listed[kind]) < min(c.perKind, c.live.Attention[kind]) {
		c.refill[kind] = refillMissing
	}
}

// How much of a list a refill reads again.
const (
	refillNone = iota
	// refillMissing reads the tunnels not listed yet.
	refillMissing
	// refillAll reads every one: what is listed may be out of date (the
	// census was loaded from an entry left open).
	refillAll
)

// refillTries bounds the refills of a list done without holding mu that a
// change to the same kind can spoil; the last is done holding it.
const refillTries = 3

// refillLists makes each list whose refill is due the first tunnels of its
// kind in the index again. It reads the index without holding mu, so that
// neither a record's write nor a status read waits for that List; a list
// that changed meanwhile (changedKind) is read again, and after refillTries
// such reads the last is made holding mu. Either way what it installs is
// what a refill holding mu throughout would have: the index is written
// before a change that puts a tunnel in it is applied, and emptied before
// one that takes a tunnel out is. The caller holds no lock but perhaps
// foldMu.
func (c *Census) refillLists(ctx context.Context, s logical.Storage) error {
	c.refillMu.Lock()
	defer c.refillMu.Unlock()
	for _, kind := range AttentionKinds {
		if err := c.refillKind(ctx, s, kind); err != nil {
			return err
		}
	}
	return nil
}

func (c *Census) refillKind(ctx context.Context, s logical.Storage, kind string) error {
	for try := 1; ; try++ {
		c.mu.Lock()
		how := c.refill[kind]
		if how == refillNone {
			c.mu.Unlock()
			return nil
		}
		if try == refillTries {
			defer c.mu.Unlock()
			l, err := c.readList(ctx, s, kind, how, c.listed[kind])
			if err == nil {
				c.installList(kind, l)
			}
			return err
		}
		changes, have := c.kindChanges[kind], slices.Clone(c.listed[kind])
		c.mu.Unlock()
		l, err := c.readList(ctx, s, kind, how, have)
		if err != nil {
			return err
		}
		c.mu.Lock()
		if c.kindChanges[kind] == changes {
			c.installList(kind, l)
			c.mu.Unlock()
			return nil
		}
		c.mu.Unlock()
	}
}

// readList reads the first tunnels of kind from the index: all of them
// (how refillAll), or those not in have, which are kept as they are.
func (c *Census) readList(ctx context.Context, s logical.Storage, kind string, how int, have []AttentionItem) ([]AttentionItem, error) {
	tunnels, err := listAttention(ctx, s, kind)
	if err != nil {
		return nil, err
	}
	listed := map[Tunnel]AttentionItem{}
	for _, it := range have {
		listed[it.tunnel()] = it
	}
	var l []AttentionItem
	for _, t := range tunnels[:min(len(tunnels), c.perKind)] {
		if it, ok := listed[t]; ok && how == refillMissing {
			l = append(l, it)
			continue
		}
		e, err := readAttention(ctx, s, t, kind)
		if err != nil {
			return nil, err
		}
		if e != nil {
			l = append(l, bounded(AttentionItem{AccountID: t.AccountID, TunnelID: t.TunnelID, AttentionEntry: *e}))
		}
	}
	return l, nil
}

// installList makes l kind's list. The caller holds mu.
func (c *Census) installList(kind string, l []AttentionItem) {
	if !slices.Equal(l, c.listed[kind]) {
		c.gen++
	}
	c.listed[kind], c.refill[kind] = l, refillNone
}

// changedKind notes a change to kind's list, or to what a refill under way
// may read for it. The caller holds mu.
func (c *Census) changedKind(kind string) {
	c.kindChanges[kind]++
}

// cloneListed copies the lists, for a view or the entry.
func (c *Census) cloneListed() map[string][]AttentionItem {
	out := make(map[string][]AttentionItem, len(AttentionKinds))
	for _, kind := range AttentionKinds {
		out[kind] = append([]AttentionItem{}, c.listed[kind]...)
	}
	return out
}
