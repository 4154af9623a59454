package ruleset

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
)

// everyConstruct uses each match and statement of the model at least once, so that
// the real nft checks every piece of rendered syntax.
func everyConstruct() *Table {
	pfx := netip.MustParsePrefix
	addr := netip.MustParseAddr
	return &Table{
		Name: "nftmesh",
		Sets: []*Set{
			{Name: "pods_v4", Type: SetTypeIPv4Addr, Addrs: []netip.Addr{addr("10.0.0.2"), addr("10.0.0.1")}},
			{Name: "pods_v6", Type: SetTypeIPv6Addr, Addrs: []netip.Addr{addr("fd00::1")}},
			{Name: "empty_v6", Type: SetTypeIPv6Addr},
			{Name: "ports", Type: SetTypeInetService, Ports: []uint16{8080, 53}},
		},
		Chains: []*Chain{
			{Name: "mangle_prerouting", Base: &BaseChain{Type: ChainTypeFilter, Hook: HookPrerouting, Priority: PriorityMangle}, Rules: []Rule{
				{Matches: []Match{Mark{Kind: MetaMark, Mask: 0xfff, Value: 0x539}},
					Statements: []Statement{SetMark{Target: CtMark, From: CtMark, Mask: 0xfff, Value: 0x111}},
					Comment:    "proxy mark"},
				{Matches: []Match{Addr{Family: IPv4, Dir: Source, Prefix: pfx("169.254.7.127/32")}, MetaL4Proto{Proto: TCP}},
					Statements: []Statement{Verdict{Kind: Accept}}},
				{Matches: []Match{Port{Proto: TCP, Dir: DPort, Port: 15008}, Mark{Kind: MetaMark, Mask: 0xfff, Value: 0x539, Negate: true}},
					Statements: []Statement{SetMark{Target: MetaMark, From: MetaMark, Mask: 0xfff, Value: 0x111}, TProxy{Family: IPv4, Port: 15008}}},
				{Matches: []Match{Port{Proto: TCP, Dir: DPort, Port: 15008}},
					Statements: []Statement{TProxy{Family: IPAny, Port: 15008}}},
				{Matches: []Match{MetaL4Proto{Proto: TCP}, Addr{Family: IPv6, Dir: Destination, Prefix: pfx("::1/128"), Negate: true}},
					Statements: []Statement{TProxy{Family: IPv6, Port: 15006}}},
				{Matches: []Match{MetaL4Proto{Proto: TCP}, CtState{States: CtRelated | CtEstablished}},
					Statements: []Statement{Counter{}, Verdict{Kind: Accept}}},
				{Matches: []Match{Interface{Name: "eth1"}, Addr{Family: IPv4, Dir: Source, Prefix: pfx("10.0.0.0/8"), Negate: true}, Addr{Family: IPv4, Dir: Destination, Set: "pods_v4"}},
					Statements: []Statement{Verdict{Kind: Jump, Chain: "helper"}}},
				{Matches: []Match{Addr{Family: IPv6, Dir: Source, Set: "pods_v6", Negate: true}, Port{Dir: SPort, Port: 53, Negate: true}},
					Statements: []Statement{Verdict{Kind: Return}}},
			}},
			{Name: "helper", Rules: []Rule{
				{Matches: []Match{Port{Proto: UDP, Dir: SPort, Port: 53}, Mark{Kind: CtMark, Mask: 0xffffffff, Value: 7, Negate: true}},
					Statements: []Statement{SetCtZone{Zone: 1}}},
				{Matches: []Match{Port{Proto: TCP, Dir: DPort, Set: "ports"}},
					Statements: []Statement{SetMark{Target: MetaMark, Value: 0x111}, Verdict{Kind: Drop}}},
			}},
			{Name: "mangle_output", Base: &BaseChain{Type: ChainTypeRoute, Hook: HookOutput, Priority: PriorityMangle}, Rules: []Rule{
				{Matches: []Match{Mark{Kind: CtMark, Mask: 0xfff, Value: 0x111}},
					Statements: []Statement{SetMark{Target: MetaMark, From: CtMark}}},
			}},
			{Name: "nat_output", Base: &BaseChain{Type: ChainTypeNAT, Hook: HookOutput, Priority: PriorityDstNAT}, Rules: []Rule{
				{Matches: []Match{Interface{Out: true, Name: "lo", Negate: true}, Port{Proto: UDP, Dir: DPort, Port: 53}},
					Statements: []Statement{Redirect{Port: 15053}}},
			}},
			{Name: "nat_postrouting", Base: &BaseChain{Type: ChainTypeNAT, Hook: HookPostrouting, Priority: PrioritySrcNAT}, Rules: []Rule{
				{Matches: []Match{Addr{Family: IPv4, Dir: Destination, Set: "pods_v4"}, SocketUID{Op: OpGe, UID: 0}},
					Statements: []Statement{SNAT{Addr: addr("169.254.7.127")}}},
				{Matches: []Match{SocketUID{UID: 1000}, Addr{Family: IPv6, Dir: Destination, Set: "pods_v6"}},
					Statements: []Statement{SNAT{Addr: addr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")}}},
			}},
			{Name: "filter_input", Base: &BaseChain{Type: ChainTypeFilter, Hook: HookInput, Priority: PriorityFilter, Policy: PolicyDrop}},
		},
	}
}

const everyConstructText = `table inet nftmesh {
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

func TestRenderEveryConstruct(t *testing.T) {
	tbl := everyConstruct()
	if err := tbl.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	got := tbl.Render()
	if got != everyConstructText {
		t.Errorf("Render mismatch:\n%s", lineDiff(everyConstructText, got))
	}
	if again := everyConstruct().Render(); again != got {
		t.Error("Render is not deterministic")
	}
}

// The real nft must accept the rendered text and print the same text back.
func TestRenderMatchesNFTPrintBack(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	text := everyConstruct().Render()
	if back := ns.NFTPrintBack(t, text, "nftmesh"); back != text {
		t.Errorf("nft prints the table back differently:\n%s", lineDiff(text, back))
	}
}

func lineDiff(want, got string) string {
	return textdiff.Unified("want", "got", want, got)
}

func TestValidateRejects(t *testing.T) {
	base := func() *Table {
		return &Table{Name: "t", Sets: []*Set{{Name: "s4", Type: SetTypeIPv4Addr}}, Chains: []*Chain{
			{Name: "pre", Base: &BaseChain{Type: ChainTypeFilter, Hook: HookPrerouting, Priority: PriorityMangle}},
			{Name: "out", Base: &BaseChain{Type: ChainTypeFilter, Hook: HookOutput}},
			{Name: "sub"},
		}}
	}
	withRule := func(chain string, r Rule) func(*Table) {
		return func(t *Table) { c := t.Chain(chain); c.Rules = append(c.Rules, r) }
	}
	accept := []Statement{Verdict{Kind: Accept}}
	cases := []struct {
		name   string
		mutate func(*Table)
		want   string
	}{
		{"bad table name", func(t *Table) { t.Name = "1x" }, `table "1x": invalid name`},
		{"duplicate chain", func(t *Table) { t.Chains = append(t.Chains, &Chain{Name: "sub"}) }, `chain "sub": defined twice`},
		{"nat in forward", func(t *Table) {
			t.Chains[0].Base = &BaseChain{Type: ChainTypeNAT, Hook: HookForward}
		}, `a nat chain cannot attach to hook "forward"`},
		{"route in prerouting", func(t *Table) {
			t.Chains[0].Base = &BaseChain{Type: ChainTypeRoute, Hook: HookPrerouting}
		}, `a route chain cannot attach to hook "prerouting"`},
		{"no statement", withRule("out", Rule{Matches: []Match{MetaL4Proto{Proto: TCP}}}), "at least one statement"},
		{"verdict not last", withRule("out", Rule{Statements: []Statement{Verdict{Kind: Accept}, Counter{}}}), "must be the last statement"},
		{"jump undefined", withRule("out", Rule{Statements: []Statement{Verdict{Kind: Jump, Chain: "nope"}}}), `undefined chain "nope"`},
		{"jump base", withRule("out", Rule{Statements: []Statement{Verdict{Kind: Jump, Chain: "pre"}}}), `jump to base chain "pre"`},
		{"unknown set", withRule("out", Rule{Matches: []Match{Addr{Family: IPv4, Dir: Destination, Set: "nope"}}, Statements: accept}), "set @nope is not defined"},
		{"set type", withRule("out", Rule{Matches: []Match{Addr{Family: IPv6, Dir: Destination, Set: "s4"}}, Statements: accept}), "has type ipv4_addr, want ipv6_addr"},
		{"family conflict", withRule("out", Rule{Matches: []Match{
			Addr{Family: IPv4, Dir: Source, Prefix: netip.MustParsePrefix("10.0.0.0/8")},
			Addr{Family: IPv6, Dir: Destination, Prefix: netip.MustParsePrefix("::1/128")}}, Statements: accept}), "conflicting families"},
		{"proto conflict", withRule("out", Rule{Matches: []Match{Port{Proto: TCP, Dir: DPort, Port: 1}, Port{Proto: UDP, Dir: DPort, Port: 1}}, Statements: accept}), "conflicting protocols"},
		{"v6 prefix on ip", withRule("out", Rule{Matches: []Match{Addr{Family: IPv4, Dir: Source, Prefix: netip.MustParsePrefix("fd00::/8")}}, Statements: accept}), "is not an ip address"},
		{"host bits", withRule("out", Rule{Matches: []Match{Addr{Family: IPv4, Dir: Source, Prefix: netip.MustParsePrefix("10.0.0.1/8")}}, Statements: accept}), "host bits set (want 10.0.0.0/8)"},
		{"mark outside mask", withRule("out", Rule{Matches: []Match{Mark{Kind: MetaMark, Mask: 0xff, Value: 0x539}}, Statements: accept}), "outside mask"},
		{"mark mask zero", withRule("out", Rule{Matches: []Match{Mark{Kind: MetaMark, Value: 0}}, Statements: accept}), "mask 0"},
		{"tproxy in output", withRule("out", Rule{Matches: []Match{Port{Proto: TCP, Dir: DPort, Port: 1}}, Statements: []Statement{TProxy{Family: IPv4, Port: 1}}}), "tproxy only works in prerouting"},
		{"tproxy without proto", withRule("pre", Rule{Statements: []Statement{TProxy{Family: IPv4, Port: 1}}}), "needs a tcp or udp match"},
		{"redirect in filter", withRule("out", Rule{Statements: []Statement{Redirect{Port: 1}}}), "redirect only works in nat chains"},
		{"snat in filter", withRule("out", Rule{Statements: []Statement{SNAT{Addr: netip.MustParseAddr("10.0.0.1")}}}), "snat only works in nat postrouting"},
		{"long interface", withRule("out", Rule{Matches: []Match{Interface{Name: "abcdefghijklmnop"}}, Statements: accept}), "longer than 15 bytes"},
		{"quote in comment", withRule("out", Rule{Statements: accept, Comment: `a"b`}), "holds a quote"},
		{"l4proto with th", withRule("out", Rule{Matches: []Match{MetaL4Proto{Proto: UDP}, Port{Dir: DPort, Port: 53}}, Statements: accept}), "use Port.Proto"},
		{"l4proto after port", withRule("out", Rule{Matches: []Match{Port{Proto: TCP, Dir: DPort, Port: 53}, MetaL4Proto{Proto: TCP}}, Statements: accept}), "nft drops it as implied"},
		{"set element type", func(t *Table) { t.Sets[0].Addrs = []netip.Addr{netip.MustParseAddr("fd00::1")} }, "is not of type ipv4_addr"},
		{"set mask no source", withRule("out", Rule{Statements: []Statement{SetMark{Target: MetaMark, Mask: 0xff, Value: 1}}}), "needs a source mark"},
	}
	if err := base().Validate(); err != nil {
		t.Fatalf("base table: %v", err)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tbl := base()
			tc.mutate(tbl)
			err := tbl.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
