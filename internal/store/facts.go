package store

import "net/netip"

// CustomerSide is the router's address on a tunnel's inside subnet, with
// the prefix length: Cloudflare's interface_address is its own side, and
// the router takes the other usable address of the /31 or /30 (/127 for
// IPv6), which every router template needs and none can compute without
// bit arithmetic. "" for an empty value or any other prefix length, and for
// a /30 whose address is not one of its two usable ones.
func CustomerSide(prefix string) string {
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
