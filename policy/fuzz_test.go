package policy

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseDecide feeds arbitrary bytes through YAML decoding, translation, the store
// and both evaluators. It must never panic; what Parse accepts the store must accept;
// and the index must agree with the direct evaluation.
//
//	go test ./policy -run '^$' -fuzz FuzzParseDecide -fuzztime 60s
func FuzzParseDecide(f *testing.F) {
	seeds, _ := filepath.Glob(filepath.Join(fixtures, "*.yaml"))
	if len(seeds) == 0 {
		f.Fatal("no fixtures to seed the corpus")
	}
	for _, s := range seeds {
		data, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(doc("app", "p", "rules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/8], serviceAccounts: [a]}\n  when:\n  - {key: destination.port, notValues: [\"80\"]}")))
	f.Add([]byte("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: security.istio.io/v1beta1, kind: AuthorizationPolicy, metadata: {name: a}, spec: {action: DENY, rules: [{}]}}\n"))
	conns := []Connection{
		{},
		conn(webID),
		{SrcPrincipal: "cluster.local/ns/ambient-demo/sa/sleep", SrcIP: netip.MustParseAddr("10.0.0.1"), DstIP: netip.MustParseAddr("10.0.0.2"), DstPort: 80},
		{SrcIP: netip.MustParseAddr("2001:db8::1"), DstIP: netip.MustParseAddr("::1"), DstPort: 15021},
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ps, err := Parse(data, Options{})
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		s := NewStore(Options{})
		if err := s.Put(ps...); err != nil {
			t.Fatalf("Parse accepted what the store refuses: %v", err)
		}
		snap := s.Snapshot()
		workloads := []Workload{{Namespace: "default"}}
		for _, p := range ps {
			_ = p.Format()
			workloads = append(workloads, Workload{Namespace: p.Namespace, Labels: p.Selector})
		}
		for _, w := range workloads {
			for _, c := range conns {
				decideBoth(t, snap, c, w)
				_ = snap.Explain(c, w).Format()
			}
		}
	})
}
