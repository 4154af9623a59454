package policy

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const fixtures = "../fixtures/policy"

func loadFixture(t testing.TB, name string) []*Policy {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtures, name))
	if err != nil {
		t.Fatal(err)
	}
	return mustParse(t, string(data), Options{})
}

// The seed's example: only cluster.local/ns/ambient-demo/sa/sleep may reach app=httpbin
// in ambient-demo.
func TestSeedExample(t *testing.T) {
	snap := mustStore(t, Options{}, loadFixture(t, "ambient-demo.yaml")...).Snapshot()
	httpbin := Workload{Namespace: "ambient-demo", Labels: map[string]string{"app": "httpbin", "version": "v1"}}
	c := func(id string) Connection {
		return Connection{SrcPrincipal: id, SrcIP: netip.MustParseAddr("10.244.1.4"), DstIP: netip.MustParseAddr("10.244.1.5"), DstPort: 8000}
	}
	cases := []struct {
		name     string
		conn     Connection
		workload Workload
		want     Decision
		path     []string // lines the explanation must show
	}{
		{"sleep is allowed", c("spiffe://cluster.local/ns/ambient-demo/sa/sleep"), httpbin,
			allowedBy("ambient-demo/allow-sleep-to-httpbin", 0),
			[]string{"decision: allow: an ALLOW policy matched (ambient-demo/allow-sleep-to-httpbin rule 0)",
				"ALLOW ambient-demo/allow-sleep-to-httpbin (workload scope, selector app=httpbin): rule 0 matched -> allow",
				"from: matched by [0] principals cluster.local/ns/ambient-demo/sa/sleep"}},
		{"notsleep is denied", c("spiffe://cluster.local/ns/ambient-demo/sa/notsleep"), httpbin,
			noneMatched,
			[]string{"decision: deny: allow policies exist but none matched",
				"from: no match: principal cluster.local/ns/ambient-demo/sa/notsleep matches none of cluster.local/ns/ambient-demo/sa/sleep",
				"no ALLOW policy matched, so the connection is denied"}},
		{"plaintext is denied", c(""), httpbin, noneMatched,
			[]string{"connection: plaintext (no principal, no namespace)", "plaintext: no principal to match principals cluster.local/ns/ambient-demo/sa/sleep"}},
		{"sleep from another namespace is denied", c("spiffe://cluster.local/ns/other/sa/sleep"), httpbin, noneMatched, nil},
		{"other workloads are not selected", c("spiffe://cluster.local/ns/ambient-demo/sa/notsleep"), Workload{Namespace: "ambient-demo", Labels: map[string]string{"app": "sleep"}},
			noAllowPolicy,
			[]string{"ALLOW policies: none apply, so the connection is allowed",
				"not applicable: ALLOW ambient-demo/allow-sleep-to-httpbin: selector app=httpbin does not match the workload's labels"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := decideBoth(t, snap, tc.conn, tc.workload); got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
			out := snap.Explain(tc.conn, tc.workload).Format()
			for _, l := range tc.path {
				if !strings.Contains(out, l) {
					t.Errorf("explanation lacks %q:\n%s", l, out)
				}
			}
		})
	}
}

func TestMeshFixture(t *testing.T) {
	snap := mustStore(t, Options{}, loadFixture(t, "mesh.yaml")...).Snapshot()
	mon := Connection{SrcPrincipal: "cluster.local/ns/monitoring/sa/prometheus", SrcIP: netip.MustParseAddr("10.3.0.9"), DstIP: netip.MustParseAddr("10.4.0.1"), DstPort: 9090}
	plain := mon
	plain.SrcPrincipal = ""
	probe := plain
	probe.DstPort = 15021
	cases := []struct {
		conn Connection
		ns   string
		want Decision
	}{
		{plain, "open", deniedBy("istio-system/deny-plaintext", 0)},
		{probe, "open", allowedBy("open/allow-all", 0)}, // the health port is exempt
		{mon, "locked", noneMatched},
		{mon, "open", allowedBy("open/allow-all", 0)},
		{mon, "elsewhere", noAllowPolicy},
	}
	for _, tc := range cases {
		if got := decideBoth(t, snap, tc.conn, Workload{Namespace: tc.ns}); got != tc.want {
			t.Errorf("%v to %s: got %v, want %v", tc.conn, tc.ns, got, tc.want)
		}
	}
	// allow-monitoring alone (allow-all removed): kube-* namespaces from 10/8 on 9090-9091.
	s := mustStore(t, Options{}, loadFixture(t, "mesh.yaml")...)
	s.Delete("open", "allow-all")
	kube := mon
	kube.SrcPrincipal = "cluster.local/ns/kube-system/sa/x"
	wrongPort := mon
	wrongPort.DstPort = 8080
	outside := mon
	outside.SrcIP = netip.MustParseAddr("172.16.0.1")
	single := mon
	single.SrcIP = netip.MustParseAddr("192.168.1.7")
	for _, tc := range []struct {
		conn Connection
		want Decision
	}{
		{mon, allowedBy("open/allow-monitoring", 0)},
		{kube, allowedBy("open/allow-monitoring", 0)},
		{single, allowedBy("open/allow-monitoring", 0)},
		{wrongPort, noneMatched},
		{outside, noneMatched},
	} {
		if got := decideBoth(t, s.Snapshot(), tc.conn, Workload{Namespace: "open"}); got != tc.want {
			t.Errorf("%v: got %v, want %v", tc.conn, got, tc.want)
		}
	}
}

// What lint prints for the L7 fixture: kept rules, dropped rules, and every warning.
func TestFormatL7Fixture(t *testing.T) {
	var out strings.Builder
	for _, p := range loadFixture(t, "l7-mixed.yaml") {
		out.WriteString(p.Format())
	}
	want := `shop/allow-get-from-sleep: ALLOW, workload scope, selector app=catalog
  rule 0: all of
    from: namespaces frontend
    to: destination ports 8080
  rule 1: dropped (uses L7 fields: to[0].operation.methods, to[0].operation.paths)
  warning: rule 1: dropped: it uses to[0].operation.methods, to[0].operation.paths, which the node proxy cannot enforce at L4; an ALLOW rule with any such field is removed whole, so connections only this rule would allow are denied (fail closed)
shop/deny-admin: DENY, namespace scope, no selector
  rule 0: all of
    to: destination ports 9090
  rule 1: all of
    from: nothing left at L4: never matches
  rule 2: all of
    when[0]: nothing left at L4: never matches
  warning: rule 0: the L7 fields of to[0].operation (paths) are removed and its L4 part is kept, so the rule denies more connections than written
  warning: rule 1: from[0].source has only L7 fields (requestPrincipals), so nothing is left of it at L4 and it never matches
  warning: rule 1: its from clause has nothing left that can match at L4, so the rule never matches and has no effect
  warning: rule 2: when[0]: key request.headers[x-debug] is L7, so the condition never matches at L4
  warning: rule 2: its when[0] clause has nothing left that can match at L4, so the rule never matches and has no effect
shop/waypoint-only: ALLOW, namespace scope, no selector: IGNORED
  warning: ignored: targetRef binds it to a waypoint or gateway (an L7 proxy), not to the node proxy
`
	if out.String() != want {
		t.Errorf("got\n%s\nwant\n%s", out.String(), want)
	}
	// And what it means: a DENY rule's L4 part holds; the ignored ALLOW takes no part.
	snap := mustStore(t, Options{}, loadFixture(t, "l7-mixed.yaml")...).Snapshot()
	c := conn("spiffe://cluster.local/ns/frontend/sa/ui")
	catalog := Workload{Namespace: "shop", Labels: map[string]string{"app": "catalog"}}
	if got := decideBoth(t, snap, c, catalog); got != allowedBy("shop/allow-get-from-sleep", 0) {
		t.Errorf("frontend to catalog:8080: %v", got)
	}
	c.DstPort = 9090
	if got := decideBoth(t, snap, c, catalog); got != deniedBy("shop/deny-admin", 0) {
		t.Errorf("frontend to catalog:9090: %v", got)
	}
	sleep := conn("spiffe://cluster.local/ns/shop/sa/sleep")
	if got := decideBoth(t, snap, sleep, catalog); got != noneMatched {
		t.Errorf("sleep (only allowed by the dropped L7 rule): %v", got)
	}
	if got := decideBoth(t, snap, sleep, Workload{Namespace: "shop", Labels: map[string]string{"app": "cart"}}); got != noAllowPolicy {
		t.Errorf("sleep to cart (only the ignored ALLOW policy): %v", got)
	}
}

func TestFormatEdgeCases(t *testing.T) {
	for _, tc := range []struct{ spec, want string }{
		{"rules: []", "  no rules: matches nothing, so every connection to the workloads it applies to is denied\n"},
		{"action: DENY\nrules:\n- {}", "  rule 0: matches every connection\n"},
		{"rules:\n- from:\n  - source: {namespaces: [a]}\n  - source: {notIpBlocks: [10.0.0.0/8], notPrincipals: [x]}",
			"    from: any of\n      [0] namespaces a\n      [1] not principals x; not source IPs 10.0.0.0/8\n"},
	} {
		if out := mustParse(t, doc("app", "p", tc.spec), Options{})[0].Format(); !strings.Contains(out, tc.want) {
			t.Errorf("%s:\n%s\nlacks\n%s", tc.spec, out, tc.want)
		}
	}
}
