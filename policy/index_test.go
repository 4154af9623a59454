package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// randomPolicies builds policies over small value pools, so that matches happen often
// and every index path (exact, prefix, suffix, presence, service accounts, CIDRs of
// several lengths, ports, negative-only matches, empty clauses, selectors, the root
// namespace) is taken.
type gen struct{ r *rand.Rand }

var (
	genNamespaces = []string{"istio-system", "a", "b"}
	genPrincipals = []StringMatch{
		{Exact, "cluster.local/ns/a/sa/x"}, {Exact, "cluster.local/ns/b/sa/y"}, {Prefix, "cluster.local/ns/a/"},
		{Prefix, "cluster.local/"}, {Suffix, "/sa/y"}, {Suffix, "sa/x"}, {Presence, ""}, {Exact, "example.org/w"},
	}
	genNSMatches = []StringMatch{{Exact, "a"}, {Exact, "b"}, {Prefix, "a"}, {Suffix, "b"}, {Presence, ""}}
	genSAs       = []ServiceAccount{{"a", "x"}, {"b", "y"}, {"a", "y"}}
	genPrefixes  = []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "10.1.2.0/24", "192.168.0.0/24", "0.0.0.0/0", "2001:db8::/32", "2001:db8::1/128", "::/0"}
	genPorts     = []uint16{80, 443, 8080}
	genLabels    = []map[string]string{nil, {"app": "x"}, {"app": "y"}, {"app": "x", "v": "1"}}
)

func pick[T any](g gen, xs []T) T { return xs[g.r.IntN(len(xs))] }

func some[T any](g gen, xs []T, max int) []T {
	n := g.r.IntN(max + 1)
	out := make([]T, n)
	for i := range out {
		out[i] = pick(g, xs)
	}
	return out
}

func (g gen) prefixes(max int) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range some(g, genPrefixes, max) {
		out = append(out, netip.MustParsePrefix(s))
	}
	if g.r.IntN(8) == 0 { // many: the sorted-range path of prefixSet
		for range 12 {
			out = append(out, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(g.r.IntN(4)), byte(g.r.IntN(4)), 0}), 24))
		}
	}
	return out
}

func (g gen) match() Match {
	var m Match
	// Each kind with probability 1/4, so most matches hold two or three kinds.
	if g.r.IntN(4) == 0 {
		m.Principals = some(g, genPrincipals, 2)
	}
	if g.r.IntN(6) == 0 {
		m.NotPrincipals = some(g, genPrincipals, 2)
	}
	if g.r.IntN(4) == 0 {
		m.Namespaces = some(g, genNSMatches, 2)
	}
	if g.r.IntN(6) == 0 {
		m.NotNamespaces = some(g, genNSMatches, 2)
	}
	if g.r.IntN(5) == 0 {
		m.ServiceAccounts = some(g, genSAs, 2)
	}
	if g.r.IntN(7) == 0 {
		m.NotServiceAccounts = some(g, genSAs, 2)
	}
	if g.r.IntN(4) == 0 {
		m.SourceIPs = g.prefixes(2)
	}
	if g.r.IntN(6) == 0 {
		m.NotSourceIPs = g.prefixes(2)
	}
	if g.r.IntN(6) == 0 {
		m.DestinationIPs = g.prefixes(2)
	}
	if g.r.IntN(8) == 0 {
		m.NotDestinationIPs = g.prefixes(2)
	}
	if g.r.IntN(4) == 0 {
		m.DestinationPorts = some(g, genPorts, 2)
	}
	if g.r.IntN(6) == 0 {
		m.NotDestinationPorts = some(g, genPorts, 2)
	}
	return m
}

func (g gen) policy(name, root string) *Policy {
	ns := pick(g, genNamespaces)
	p := &Policy{Name: name, Namespace: ns, Action: Action(g.r.IntN(2))}
	if g.r.IntN(3) == 0 {
		p.Selector = map[string]string{}
		for k, v := range pick(g, genLabels[1:]) {
			if g.r.IntN(3) > 0 {
				p.Selector[k] = v
			}
		}
	}
	p.Scope = scopeOf(ns, p.Selector != nil, root)
	for i := range g.r.IntN(4) {
		r := Rule{Index: i}
		for c := range g.r.IntN(3) {
			cl := Clause{Origin: fmt.Sprint("c", c)}
			for range 1 + g.r.IntN(2) {
				cl.Matches = append(cl.Matches, g.match())
			}
			r.Clauses = append(r.Clauses, cl)
		}
		p.Rules = append(p.Rules, r)
	}
	return p
}

func (g gen) conn() Connection {
	ids := []string{"", "spiffe://cluster.local/ns/a/sa/x", "cluster.local/ns/b/sa/y", "spiffe://cluster.local/ns/a/sa/y", "spiffe://example.org/w", "spiffe://cluster.local/ns/c/sa/x"}
	addrs := []string{"10.1.2.3", "10.1.9.9", "10.2.3.4", "10.3.1.7", "192.168.0.5", "172.16.0.1", "2001:db8::1", "2001:db8::2", "fe80::1", "::ffff:10.1.2.3"}
	c := Connection{SrcPrincipal: pick(g, ids), SrcIP: netip.MustParseAddr(pick(g, addrs)), DstIP: netip.MustParseAddr(pick(g, addrs)), DstPort: pick(g, []uint16{80, 443, 8080, 9090})}
	if g.r.IntN(10) == 0 {
		c.SrcIP = netip.Addr{} // unknown source address
	}
	return c
}

// The index must give exactly what a straight evaluation of the written policies gives:
// the same allow or deny, and the same deciding policy and rule.
func TestIndexAgreesWithDirectEvaluation(t *testing.T) {
	reasons := map[string]int{}
	total := 0
	for seed := range uint64(300) {
		g := gen{rand.New(rand.NewPCG(seed, 7))}
		root := DefaultRootNamespace
		s := NewStore(Options{})
		var ps []*Policy
		for i := range 1 + g.r.IntN(12) {
			ps = append(ps, g.policy(fmt.Sprint("p", i), root))
		}
		if err := s.Put(ps...); err != nil {
			t.Fatal(err)
		}
		if g.r.IntN(3) == 0 { // deletes rebuild namespaces too
			s.Delete(ps[0].Namespace, ps[0].Name)
		}
		snap := s.Snapshot()
		for range 40 {
			c := g.conn()
			w := Workload{Namespace: pick(g, genNamespaces[0:3]), Labels: pick(g, genLabels)}
			reasons[decideBoth(t, snap, c, w).Reason]++
			total++
		}
		if t.Failed() {
			t.Fatalf("seed %d", seed)
		}
	}
	// The comparison only means something if every outcome is common.
	for _, r := range []string{ReasonDenyMatched, ReasonNoAllowPolicy, ReasonAllowMatched, ReasonNoAllowMatched} {
		if reasons[r] < total/20 {
			t.Errorf("only %d of %d decisions were %q: the generator needs tuning", reasons[r], total, r)
		}
	}
	t.Logf("decisions: %v", reasons)
}

func TestPrefixSet(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	randAddr := func(v6 bool) netip.Addr {
		if v6 {
			var b [16]byte
			b[0], b[1] = 0x20, 0x01
			for i := 2; i < 16; i++ {
				b[i] = byte(r.IntN(4)) // a small space, so prefixes overlap and hit
			}
			return netip.AddrFrom16(b)
		}
		return netip.AddrFrom4([4]byte{10, byte(r.IntN(4)), byte(r.IntN(4)), byte(r.IntN(4))})
	}
	for round := range 400 {
		n := 1 + r.IntN(30) // both the linear (<= 8) and the range (> 8) paths
		var ps []netip.Prefix
		for range n {
			v6 := r.IntN(3) == 0
			a := randAddr(v6)
			bits := r.IntN(a.BitLen() + 1)
			if !v6 && r.IntN(2) == 0 {
				bits = 8 + 8*r.IntN(4) // the common /8, /16, /24, /32
			}
			ps = append(ps, netip.PrefixFrom(a, bits)) // not masked, as a user may write it
		}
		set := newPrefixSet(ps)
		for range 50 {
			a := randAddr(r.IntN(3) == 0)
			want := false
			for _, p := range ps {
				want = want || p.Contains(a)
			}
			if got := set.has(a); got != want {
				t.Fatalf("round %d: %v in %v: got %v, want %v", round, a, ps, got, want)
			}
		}
		if set.has(netip.Addr{}) {
			t.Fatal("an invalid address matched")
		}
	}
}

func TestPrefixSetEdges(t *testing.T) {
	many := func(extra ...string) prefixSet {
		var ps []netip.Prefix
		for i := range 10 { // force the range path
			ps = append(ps, netip.MustParsePrefix(fmt.Sprintf("172.16.%d.0/24", i)))
		}
		for _, e := range extra {
			ps = append(ps, netip.MustParsePrefix(e))
		}
		return newPrefixSet(ps)
	}
	cases := []struct {
		set  prefixSet
		addr string
		want bool
	}{
		{many("0.0.0.0/0"), "255.255.255.255", true},
		{many("0.0.0.0/0"), "::1", false},
		{many("::/0"), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true},
		{many("::/0"), "1.2.3.4", false},
		{many("2001:db8::/64"), "2001:db8::ffff:ffff:ffff:ffff", true},
		{many("2001:db8::/64"), "2001:db8:0:1::", false},
		{many("2001:db8::/65"), "2001:db8::7fff:ffff:ffff:ffff", true},
		{many("2001:db8::/65"), "2001:db8::8000:0:0:0", false},
		{many("2001:db8::/63"), "2001:db8:0:1:ffff:ffff:ffff:ffff", true},
		{many(), "172.16.9.255", true},
		{many(), "172.16.10.0", false},
		{many(), "172.15.255.255", false},
		{many("10.0.0.1/32"), "10.0.0.1", true},
		{many("10.0.0.1/32"), "10.0.0.2", false},
	}
	for _, tc := range cases {
		if got := tc.set.has(netip.MustParseAddr(tc.addr)); got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.addr, got, tc.want)
		}
	}
}

func TestStringAndPortSets(t *testing.T) {
	var ms []StringMatch
	for i := range 20 { // above linearMax: the map path
		ms = append(ms, StringMatch{Exact, fmt.Sprint("ns", i)})
	}
	ms = append(ms, StringMatch{Prefix, "team-"}, StringMatch{Suffix, "-prod"})
	s := newStrSet(ms)
	for v, want := range map[string]bool{"ns0": true, "ns19": true, "ns20": false, "team-a": true, "x-prod": true, "team": false, "": false} {
		if got := s.has(v); got != want {
			t.Errorf("strSet.has(%q) = %v, want %v", v, got, want)
		}
	}
	var ports []uint16
	for i := range 30 {
		ports = append(ports, uint16(1000+2*i))
	}
	p := newPortSet(append(ports, 1000, 1002)) // duplicates
	for v, want := range map[uint16]bool{1000: true, 1058: true, 1001: false, 999: false, 1060: false} {
		if got := p.has(v); got != want {
			t.Errorf("portSet.has(%d) = %v, want %v", v, got, want)
		}
	}
}

func TestParseStringMatch(t *testing.T) {
	cases := []struct {
		in   string
		want StringMatch
		hits []string
		miss []string
	}{
		{"abc", StringMatch{Exact, "abc"}, []string{"abc"}, []string{"ab", "abcd", ""}},
		{"ab*", StringMatch{Prefix, "ab"}, []string{"ab", "abc"}, []string{"a", "xab", ""}},
		{"*bc", StringMatch{Suffix, "bc"}, []string{"bc", "abc"}, []string{"bcd", ""}},
		{"*", StringMatch{Presence, ""}, []string{"x"}, []string{""}},
		{"a*c", StringMatch{Exact, "a*c"}, []string{"a*c"}, []string{"abc"}}, // '*' inside is literal, as in Istio
	}
	for _, tc := range cases {
		m := ParseStringMatch(tc.in)
		if m != tc.want {
			t.Errorf("ParseStringMatch(%q) = %+v, want %+v", tc.in, m, tc.want)
		}
		if m.String() != tc.in {
			t.Errorf("%+v.String() = %q, want %q", m, m.String(), tc.in)
		}
		for _, h := range tc.hits {
			if !m.Matches(h) {
				t.Errorf("%q should match %q", tc.in, h)
			}
		}
		for _, x := range tc.miss {
			if m.Matches(x) {
				t.Errorf("%q should not match %q", tc.in, x)
			}
		}
	}
}

func TestIdentity(t *testing.T) {
	cases := []struct{ id, principal, ns, sa string }{
		{"spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/b", "a", "b"},
		{"cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/b", "a", "b"},
		{"", "", "", ""},
		{"spiffe://example.org/workload", "example.org/workload", "", ""},
		{"spiffe://td/ns/a/sa/b/extra", "td/ns/a/sa/b/extra", "", ""},
		{"spiffe:///ns/a/sa/b", "/ns/a/sa/b", "", ""},
		{"td/ns//sa/b", "td/ns//sa/b", "", ""},
		{"td/ns/a/sa/", "td/ns/a/sa/", "", ""},
	}
	for _, tc := range cases {
		p, ns, sa := Connection{SrcPrincipal: tc.id}.Identity()
		if p != tc.principal || ns != tc.ns || sa != tc.sa {
			t.Errorf("Identity(%q) = %q %q %q, want %q %q %q", tc.id, p, ns, sa, tc.principal, tc.ns, tc.sa)
		}
	}
}
