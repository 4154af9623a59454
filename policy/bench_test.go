package policy

import (
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"
)

// go test -run '^$' -bench . -benchmem ./policy/
//
// The policies all apply to the benchmark's workload (namespace bench, app=bench): half
// namespace-wide, half selecting app=bench; one in ten is a DENY policy. Each has 10
// rules in the shapes people write: exact principals, a namespace's principal prefix,
// namespaces, service accounts, CIDRs, `when` conditions, most with ports.

var benchWorkload = Workload{Namespace: "bench", Labels: map[string]string{"app": "bench", "version": "v1"}}

func benchRule(i, j int, deny bool) Rule {
	id := func(ns string) string { return fmt.Sprintf("cluster.local/ns/%s-%d/sa/sa-%d", ns, i, j) }
	owner := "ns"
	if deny {
		owner = "bad"
	}
	ports := []uint16{8080}
	var m Match
	var extra []Clause
	switch j {
	case 0, 1, 2, 3:
		m.Principals = []StringMatch{{Exact, id(owner)}}
	case 4:
		m.Principals = []StringMatch{{Prefix, fmt.Sprintf("cluster.local/ns/%s-team-%d/", owner, i)}}
	case 5:
		m.Namespaces = []StringMatch{{Exact, fmt.Sprintf("%s-%d", owner, i)}}
	case 6:
		m.ServiceAccounts = []ServiceAccount{{fmt.Sprintf("%s-%d", owner, i), "sa-6"}}
	case 7:
		m.SourceIPs = []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)}
		ports = []uint16{8080, 8443}
	case 8:
		m.Principals = []StringMatch{{Exact, id(owner)}}
		extra = []Clause{{Origin: "when[0]", Matches: []Match{{DestinationIPs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}}}}}
	case 9:
		m.Principals = []StringMatch{{Exact, id(owner)}}
		m.NotSourceIPs = []netip.Prefix{netip.MustParsePrefix("192.168.0.0/16")}
	}
	r := Rule{Index: j, Clauses: []Clause{{Origin: "from", Matches: []Match{m}}}}
	r.Clauses = append(r.Clauses, Clause{Origin: "to", Matches: []Match{{DestinationPorts: ports}}})
	return Rule{Index: j, Clauses: append(r.Clauses, extra...)}
}

func benchPolicies(n int) []*Policy {
	ps := make([]*Policy, n)
	for i := range ps {
		p := &Policy{Name: fmt.Sprintf("p%05d", i), Namespace: "bench", Scope: ScopeNamespace, Action: Allow}
		if i%2 == 1 {
			p.Scope, p.Selector = ScopeWorkload, map[string]string{"app": "bench"}
		}
		if i%10 == 9 {
			p.Action = Deny
		}
		for j := range 10 {
			p.Rules = append(p.Rules, benchRule(i, j, p.Action == Deny))
		}
		ps[i] = p
	}
	return ps
}

// unindexedPolicies is the worst case: every rule has only negative matches, so no
// value narrows the candidates and every rule is evaluated.
func unindexedPolicies(n int) []*Policy {
	ps := make([]*Policy, n)
	for i := range ps {
		p := &Policy{Name: fmt.Sprintf("u%05d", i), Namespace: "bench", Scope: ScopeNamespace, Action: Allow}
		for j := range 10 {
			p.Rules = append(p.Rules, Rule{Index: j, Clauses: []Clause{{Origin: "from", Matches: []Match{{
				NotPrincipals: []StringMatch{{Prefix, "cluster.local/ns/bench/"}},
				NotSourceIPs:  []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), byte(j)}), 32)},
			}}}, {Origin: "to", Matches: []Match{{NotDestinationPorts: []uint16{uint16(1000 + j)}}}}}})
		}
		ps[i] = p
	}
	return ps
}

var sink Decision

func benchConn(principal string) Connection {
	return Connection{SrcPrincipal: "spiffe://" + principal, SrcIP: netip.MustParseAddr("172.16.0.1"), DstIP: netip.MustParseAddr("10.96.0.10"), DstPort: 8080}
}

// reportPercentiles times decisions one by one, after the b.N loop, and reports the
// median and the 99th percentile next to the mean (ns/op).
func reportPercentiles(b *testing.B, decide func()) {
	samples := 20000
	if per := b.Elapsed() / time.Duration(b.N); per > 50*time.Microsecond {
		samples = max(200, int(2*time.Second/per)) // slow cases: about two seconds of samples
	}
	overhead := make([]time.Duration, samples)
	for i := range overhead {
		t0 := time.Now()
		overhead[i] = time.Since(t0)
	}
	slices.Sort(overhead)
	d := make([]time.Duration, samples)
	for i := range d {
		t0 := time.Now()
		decide()
		d[i] = time.Since(t0)
	}
	slices.Sort(d)
	clock := overhead[samples/2] // the cost of reading the clock, taken off each sample
	b.ReportMetric(float64(max(d[samples/2]-clock, 0)), "p50-ns/op")
	b.ReportMetric(float64(max(d[samples*99/100]-clock, 0)), "p99-ns/op")
}

func BenchmarkDecide(b *testing.B) {
	for _, n := range []int{1, 100, 10000} {
		s := NewStore(Options{})
		if err := s.Put(benchPolicies(n)...); err != nil {
			b.Fatal(err)
		}
		snap := s.Snapshot()
		target := fmt.Sprintf("bench/p%05d", n/2)
		for _, tc := range []struct {
			name string
			conn Connection
			want Decision
		}{
			// Allowed by the middle policy's first rule.
			{"allowed", benchConn(fmt.Sprintf("cluster.local/ns/ns-%d/sa/sa-0", n/2)), allowedBy(target, 0)},
			// Matches nothing: every candidate the index finds must be ruled out.
			{"denied", benchConn("cluster.local/ns/stranger/sa/x"), noneMatched},
		} {
			if got := decideBoth(b, snap, tc.conn, benchWorkload); got != tc.want {
				b.Fatalf("%d policies, %s: got %v, want %v", n, tc.name, got, tc.want)
			}
			b.Run(fmt.Sprintf("policies=%d/%s", n, tc.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					sink = snap.Decide(tc.conn, benchWorkload)
				}
				reportPercentiles(b, func() { sink = snap.Decide(tc.conn, benchWorkload) })
			})
		}
	}
}

func BenchmarkDecideUnindexed(b *testing.B) {
	for _, n := range []int{100, 10000} {
		snap := mustStore(b, Options{}, unindexedPolicies(n)...).Snapshot()
		c := benchConn("cluster.local/ns/bench/sa/x") // excluded by every rule: all are evaluated
		if got := decideBoth(b, snap, c, benchWorkload); got != noneMatched {
			b.Fatalf("got %v", got)
		}
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				sink = snap.Decide(c, benchWorkload)
			}
			reportPercentiles(b, func() { sink = snap.Decide(c, benchWorkload) })
		})
	}
}

// BenchmarkStoreMemory reports what 10,000 policies (100,000 rules) cost in memory: the
// policies themselves (the model Explain reads), and what the store adds to decide fast
// (compiled matches and the index); and how long the store takes to take them and build
// its index.
func BenchmarkStoreMemory(b *testing.B) {
	const n = 10000
	b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
		var model, store, build float64
		heap := func() uint64 {
			var m runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&m)
			return m.HeapAlloc
		}
		for b.Loop() {
			h0 := heap()
			ps := benchPolicies(n)
			h1 := heap()
			t0 := time.Now()
			s := NewStore(Options{})
			if err := s.Put(ps...); err != nil {
				b.Fatal(err)
			}
			s.Decide(benchConn("x"), benchWorkload) // builds the index
			build += float64(time.Since(t0).Milliseconds())
			h2 := heap()
			model += float64(h1 - h0)
			store += float64(h2 - h1)
			runtime.KeepAlive(s)
		}
		iters := float64(b.N)
		b.ReportMetric(model/iters, "policies-bytes")
		b.ReportMetric(store/iters, "store-bytes")
		b.ReportMetric((model+store)/iters/(n*10), "total-bytes/rule")
		b.ReportMetric(build/iters, "build-ms")
	})
}
