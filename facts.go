package main

// Router facts: what Cloudflare knows of a tunnel that a router's
// configuration needs beside the key (the address to connect to, the
// tunnel's inside addresses, the IKE identity), kept in the tunnel's record
// so that one Vault read gives a provisioning tool or a Vault Agent template
// everything, with no Cloudflare credentials and no call to Cloudflare.
//
// No rotation asks Cloudflare for them: they come from reads the engine
// makes anyway. A tunnel's first rotation already reads the tunnel (to learn
// the key it is replacing); psk_generate's answer may carry ipsec_id; the
// drift sweep lists every managed tunnel of an account once per
// drift_check_interval, and tunnels/ reads and lists ask Cloudflare on an
// operator's behalf. A record is rewritten only when a fact changed.

import (
	"net/netip"
)

// customerSide is the router's address on a tunnel's inside subnet, with
// the prefix length: Cloudflare's interface_address is its own side, and
// the router takes the other usable address of the /31 or /30 (/127 for
// IPv6), which every router template needs and none can compute without
// bit arithmetic. "" for an empty value or any other prefix length, and for
// a /30 whose address is not one of its two usable ones.
func customerSide(prefix string) string {
	p, err := netip.ParsePrefix(prefix)
	if err != nil {
		return ""
	}
	b := p.Addr().AsSlice()
	last := len(b) - 1
	switch {
	case p.Bits() == len(b)*8-1: // /31, /127: the two addresses differ in the last bit
		b[last] ^= 1
	case p.Addr().Is4() && p.Bits() == 30: // hosts .1 and .2 of the four
		switch b[last] & 3 {
		case 1:
			b[last]++
		case 2:
			b[last]--
		default:
			return ""
		}
	default:
		return ""
	}
	other, _ := netip.AddrFromSlice(b)
	return netip.PrefixFrom(other, p.Bits()).String()
}
