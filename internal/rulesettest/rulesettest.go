// Package rulesettest holds a ruleset that uses every construct of the model, for the
// tests of package ruleset (rendering, validation) and package kernel (translation,
// apply), which both check it against the real nft.
package rulesettest

import (
	"net/netip"

	"github.com/nftmesh/nftmesh/ruleset"
)

// EveryConstruct uses each match and statement of the model at least once, so that
// the real nft checks every piece of rendered syntax, and the kernel package every
// piece of its translation. Tests rely on its order: change it with care.
func EveryConstruct() *ruleset.Table {
	pfx := netip.MustParsePrefix
	addr := netip.MustParseAddr
	return &ruleset.Table{
		Name: "nftmesh",
		Sets: []*ruleset.Set{
			{Name: "pods_v4", Type: ruleset.SetTypeIPv4Addr, Addrs: []netip.Addr{addr("10.0.0.2"), addr("10.0.0.1")}},
			{Name: "pods_v6", Type: ruleset.SetTypeIPv6Addr, Addrs: []netip.Addr{addr("fd00::1")}},
			{Name: "empty_v6", Type: ruleset.SetTypeIPv6Addr},
			{Name: "ports", Type: ruleset.SetTypeInetService, Ports: []uint16{8080, 53}},
		},
		Chains: []*ruleset.Chain{
			{Name: "mangle_prerouting", Base: &ruleset.BaseChain{Type: ruleset.ChainTypeFilter, Hook: ruleset.HookPrerouting, Priority: ruleset.PriorityMangle}, Rules: []ruleset.Rule{
				{Matches: []ruleset.Match{ruleset.Mark{Kind: ruleset.MetaMark, Mask: 0xfff, Value: 0x539}},
					Statements: []ruleset.Statement{ruleset.SetMark{Target: ruleset.CtMark, From: ruleset.CtMark, Mask: 0xfff, Value: 0x111}},
					Comment:    "proxy mark"},
				{Matches: []ruleset.Match{ruleset.Addr{Family: ruleset.IPv4, Dir: ruleset.Source, Prefix: pfx("169.254.7.127/32")}, ruleset.MetaL4Proto{Proto: ruleset.TCP}},
					Statements: []ruleset.Statement{ruleset.Verdict{Kind: ruleset.Accept}}},
				{Matches: []ruleset.Match{ruleset.Port{Proto: ruleset.TCP, Dir: ruleset.DPort, Port: 15008}, ruleset.Mark{Kind: ruleset.MetaMark, Mask: 0xfff, Value: 0x539, Negate: true}},
					Statements: []ruleset.Statement{ruleset.SetMark{Target: ruleset.MetaMark, From: ruleset.MetaMark, Mask: 0xfff, Value: 0x111}, ruleset.TProxy{Family: ruleset.IPv4, Port: 15008}}},
				{Matches: []ruleset.Match{ruleset.Port{Proto: ruleset.TCP, Dir: ruleset.DPort, Port: 15008}},
					Statements: []ruleset.Statement{ruleset.TProxy{Family: ruleset.IPAny, Port: 15008}}},
				{Matches: []ruleset.Match{ruleset.MetaL4Proto{Proto: ruleset.TCP}, ruleset.Addr{Family: ruleset.IPv6, Dir: ruleset.Destination, Prefix: pfx("::1/128"), Negate: true}},
					Statements: []ruleset.Statement{ruleset.TProxy{Family: ruleset.IPv6, Port: 15006}}},
				{Matches: []ruleset.Match{ruleset.MetaL4Proto{Proto: ruleset.TCP}, ruleset.CtState{States: ruleset.CtRelated | ruleset.CtEstablished}},
					Statements: []ruleset.Statement{ruleset.Counter{}, ruleset.Verdict{Kind: ruleset.Accept}}},
				{Matches: []ruleset.Match{ruleset.Interface{Name: "eth1"}, ruleset.Addr{Family: ruleset.IPv4, Dir: ruleset.Source, Prefix: pfx("10.0.0.0/8"), Negate: true}, ruleset.Addr{Family: ruleset.IPv4, Dir: ruleset.Destination, Set: "pods_v4"}},
					Statements: []ruleset.Statement{ruleset.Verdict{Kind: ruleset.Jump, Chain: "helper"}}},
				{Matches: []ruleset.Match{ruleset.Addr{Family: ruleset.IPv6, Dir: ruleset.Source, Set: "pods_v6", Negate: true}, ruleset.Port{Dir: ruleset.SPort, Port: 53, Negate: true}},
					Statements: []ruleset.Statement{ruleset.Verdict{Kind: ruleset.Return}}},
			}},
			{Name: "helper", Rules: []ruleset.Rule{
				{Matches: []ruleset.Match{ruleset.Port{Proto: ruleset.UDP, Dir: ruleset.SPort, Port: 53}, ruleset.Mark{Kind: ruleset.CtMark, Mask: 0xffffffff, Value: 7, Negate: true}},
					Statements: []ruleset.Statement{ruleset.SetCtZone{Zone: 1}}},
				{Matches: []ruleset.Match{ruleset.Port{Proto: ruleset.TCP, Dir: ruleset.DPort, Set: "ports"}},
					Statements: []ruleset.Statement{ruleset.SetMark{Target: ruleset.MetaMark, Value: 0x111}, ruleset.Verdict{Kind: ruleset.Drop}}},
			}},
			{Name: "mangle_output", Base: &ruleset.BaseChain{Type: ruleset.ChainTypeRoute, Hook: ruleset.HookOutput, Priority: ruleset.PriorityMangle}, Rules: []ruleset.Rule{
				{Matches: []ruleset.Match{ruleset.Mark{Kind: ruleset.CtMark, Mask: 0xfff, Value: 0x111}},
					Statements: []ruleset.Statement{ruleset.SetMark{Target: ruleset.MetaMark, From: ruleset.CtMark}}},
			}},
			{Name: "nat_output", Base: &ruleset.BaseChain{Type: ruleset.ChainTypeNAT, Hook: ruleset.HookOutput, Priority: ruleset.PriorityDstNAT}, Rules: []ruleset.Rule{
				{Matches: []ruleset.Match{ruleset.Interface{Out: true, Name: "lo", Negate: true}, ruleset.Port{Proto: ruleset.UDP, Dir: ruleset.DPort, Port: 53}},
					Statements: []ruleset.Statement{ruleset.Redirect{Port: 15053}}},
			}},
			{Name: "nat_postrouting", Base: &ruleset.BaseChain{Type: ruleset.ChainTypeNAT, Hook: ruleset.HookPostrouting, Priority: ruleset.PrioritySrcNAT}, Rules: []ruleset.Rule{
				{Matches: []ruleset.Match{ruleset.Addr{Family: ruleset.IPv4, Dir: ruleset.Destination, Set: "pods_v4"}, ruleset.SocketUID{Op: ruleset.OpGe, UID: 0}},
					Statements: []ruleset.Statement{ruleset.SNAT{Addr: addr("169.254.7.127")}}},
				{Matches: []ruleset.Match{ruleset.SocketUID{UID: 1000}, ruleset.Addr{Family: ruleset.IPv6, Dir: ruleset.Destination, Set: "pods_v6"}},
					Statements: []ruleset.Statement{ruleset.SNAT{Addr: addr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")}}},
			}},
			{Name: "filter_input", Base: &ruleset.BaseChain{Type: ruleset.ChainTypeFilter, Hook: ruleset.HookInput, Priority: ruleset.PriorityFilter, Policy: ruleset.PolicyDrop}},
		},
	}
}

// EveryConstructText is EveryConstruct rendered.
const EveryConstructText = `table inet nftmesh {
	set pods_v4 {
		type ipv4_addr
		elements = { 10.0.0.1, 10.0.0.2 }
	}

	set pods_v6 {
		type ipv6_addr
		elements = { fd00::1 }
	}

	set empty_v6 {
		type ipv6_addr
	}

	set ports {
		type inet_service
		elements = { 53, 8080 }
	}

	chain mangle_prerouting {
		type filter hook prerouting priority -150; policy accept;
		meta mark & 0x00000fff == 0x00000539 ct mark set ct mark & 0xfffff111 | 0x00000111 comment "proxy mark"
		ip saddr 169.254.7.127 meta l4proto tcp accept
		tcp dport 15008 meta mark & 0x00000fff != 0x00000539 meta mark set meta mark & 0xfffff111 | 0x00000111 tproxy ip to :15008
		tcp dport 15008 tproxy to :15008
		meta l4proto tcp ip6 daddr != ::1 tproxy ip6 to :15006
		meta l4proto tcp ct state established,related counter accept
		iifname "eth1" ip saddr != 10.0.0.0/8 ip daddr @pods_v4 jump helper
		ip6 saddr != @pods_v6 th sport != 53 return
	}

	chain helper {
		udp sport 53 ct mark != 0x00000007 ct zone set 1
		tcp dport @ports meta mark set 0x00000111 drop
	}

	chain mangle_output {
		type route hook output priority -150; policy accept;
		ct mark & 0x00000fff == 0x00000111 meta mark set ct mark
	}

	chain nat_output {
		type nat hook output priority -100; policy accept;
		oifname != "lo" udp dport 53 redirect to :15053
	}

	chain nat_postrouting {
		type nat hook postrouting priority 100; policy accept;
		ip daddr @pods_v4 meta skuid >= 0 snat ip to 169.254.7.127
		meta skuid 1000 ip6 daddr @pods_v6 snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff
	}

	chain filter_input {
		type filter hook input priority 0; policy drop;
	}
}
`
