package ruleset

import (
	"net/netip"
	"strings"
	"testing"
)

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
