package policy

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

// Each case writes policies as people do (YAML), decides one connection to one
// workload, and states the expected answer by hand: allow or deny, and which policy
// and rule (or which default) decided.
func TestDecide(t *testing.T) {
	mtls := conn(webID)
	plain := conn("")
	withPort := func(c Connection, p uint16) Connection { c.DstPort = p; return c }
	withSrc := func(c Connection, ip string) Connection { c.SrcIP = netip.MustParseAddr(ip); return c }
	withDst := func(c Connection, ip string) Connection { c.DstIP = netip.MustParseAddr(ip); return c }
	withID := func(id string) Connection { return conn(id) }
	allow := func(spec string) string { return doc("app", "p", "action: ALLOW\n"+spec) }
	deny := func(spec string) string { return doc("app", "d", "action: DENY\n"+spec) }
	from := func(source string) string { return "rules:\n- from:\n  - source:\n      " + source + "\n" }
	to := func(op string) string { return "rules:\n- to:\n  - operation:\n      " + op + "\n" }
	when := func(cond string) string { return "rules:\n- when:\n  - " + cond + "\n" }

	cases := []struct {
		name     string
		policies string
		opts     Options
		conn     Connection
		workload Workload
		want     Decision
	}{
		// Every match kind and its negation.
		{"principals hit", allow(from(`principals: ["cluster.local/ns/client/sa/web"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"principals miss", allow(from(`principals: ["cluster.local/ns/client/sa/db"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"principals with spiffe:// in the connection only", allow(from(`principals: ["cluster.local/ns/client/sa/web"]`)), Options{}, withID("cluster.local/ns/client/sa/web"), webWorkload, allowedBy("app/p", 0)},
		{"principals any of several", allow(from(`principals: ["x/ns/a/sa/b", "cluster.local/ns/client/sa/web"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"notPrincipals excludes", allow(from(`notPrincipals: ["cluster.local/ns/client/sa/web"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notPrincipals passes others", allow(from(`notPrincipals: ["cluster.local/ns/client/sa/db"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"namespaces hit", allow(from(`namespaces: ["client"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"namespaces miss", allow(from(`namespaces: ["other"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notNamespaces excludes", allow(from(`notNamespaces: ["client"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notNamespaces passes others", allow(from(`notNamespaces: ["other"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"serviceAccounts ns/sa hit", allow(from(`serviceAccounts: ["client/web"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"serviceAccounts ns/sa miss", allow(from(`serviceAccounts: ["client/db"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"serviceAccounts bare sa is the policy's namespace", allow(from(`serviceAccounts: ["web"]`)), Options{}, withID("spiffe://cluster.local/ns/app/sa/web"), webWorkload, allowedBy("app/p", 0)},
		{"serviceAccounts bare sa not another namespace", allow(from(`serviceAccounts: ["web"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"serviceAccounts ignore the trust domain", allow(from(`serviceAccounts: ["client/web"]`)), Options{}, withID("spiffe://other.domain/ns/client/sa/web"), webWorkload, allowedBy("app/p", 0)},
		{"notServiceAccounts excludes", allow(from(`notServiceAccounts: ["client/web"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notServiceAccounts passes others", allow(from(`notServiceAccounts: ["client/db"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"ipBlocks CIDR hit", allow(from(`ipBlocks: ["10.1.0.0/16"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"ipBlocks CIDR miss", allow(from(`ipBlocks: ["10.2.0.0/16"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"ipBlocks single address", allow(from(`ipBlocks: ["10.1.2.3"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"ipBlocks single address miss", allow(from(`ipBlocks: ["10.1.2.4"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"ipBlocks IPv6", allow(from(`ipBlocks: ["2001:db8::/32"]`)), Options{}, withSrc(mtls, "2001:db8::7"), webWorkload, allowedBy("app/p", 0)},
		{"ipBlocks IPv4-mapped source compares as IPv4", allow(from(`ipBlocks: ["10.1.0.0/16"]`)), Options{}, withSrc(mtls, "::ffff:10.1.2.3"), webWorkload, allowedBy("app/p", 0)},
		{"notIpBlocks excludes", allow(from(`notIpBlocks: ["10.0.0.0/8"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notIpBlocks passes others", allow(from(`notIpBlocks: ["192.168.0.0/16"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"ports hit", allow(to(`ports: ["8080"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"ports miss", allow(to(`ports: ["9090"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notPorts excludes", allow(to(`notPorts: ["8080"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notPorts passes others", allow(to(`notPorts: ["9090"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},

		// Within a match every kind must hold; within a clause any match; all clauses.
		{"all kinds of a match must hold", allow(from(`{principals: ["cluster.local/ns/client/sa/web"], ipBlocks: ["192.168.0.0/16"]}`)), Options{}, mtls, webWorkload, noneMatched},
		{"positive and negative of a kind", allow(from(`{namespaces: ["client", "other"], notNamespaces: ["client"]}`)), Options{}, mtls, webWorkload, noneMatched},
		{"any source of from", allow("rules:\n- from:\n  - source: {namespaces: [other]}\n  - source: {ipBlocks: [10.0.0.0/8]}\n"), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"any operation of to", allow("rules:\n- to:\n  - operation: {ports: [\"1\"]}\n  - operation: {ports: [\"8080\"]}\n"), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"from and to must both hold", allow("rules:\n- from:\n  - source: {namespaces: [client]}\n  to:\n  - operation: {ports: [\"9090\"]}\n"), Options{}, mtls, webWorkload, noneMatched},
		{"from and to both hold", allow("rules:\n- from:\n  - source: {namespaces: [client]}\n  to:\n  - operation: {ports: [\"8080\"]}\n"), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"the second rule matches", allow("rules:\n- to:\n  - operation: {ports: [\"1\"]}\n- to:\n  - operation: {ports: [\"8080\"]}\n"), Options{}, mtls, webWorkload, allowedBy("app/p", 1)},
		{"every when condition must hold", allow("rules:\n- when:\n  - {key: source.namespace, values: [client]}\n  - {key: destination.port, values: [\"9090\"]}\n"), Options{}, mtls, webWorkload, noneMatched},

		// String match kinds.
		{"prefix hit", allow(from(`principals: ["cluster.local/ns/client/*"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"prefix miss", allow(from(`principals: ["cluster.local/ns/other/*"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"suffix hit", allow(from(`principals: ["*/sa/web"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"suffix miss", allow(from(`principals: ["*/sa/db"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"presence hit", allow(from(`principals: ["*"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"exact is not a prefix", allow(from(`principals: ["cluster.local/ns/client/sa/we"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"namespace prefix", allow(from(`namespaces: ["cli*"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"namespace suffix", allow(from(`namespaces: ["*ent"]`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"namespace suffix miss", allow(from(`namespaces: ["*xyz"]`)), Options{}, mtls, webWorkload, noneMatched},
		{"notNamespaces prefix excludes", allow(from(`notNamespaces: ["cli*"]`)), Options{}, mtls, webWorkload, noneMatched},

		// The empty edge cases.
		{"no rules: ALLOW denies all", allow(""), Options{}, mtls, webWorkload, noneMatched},
		{"rules: [] is no rules", allow("rules: []"), Options{}, mtls, webWorkload, noneMatched},
		{"rules: [{}] allows all", allow("rules:\n- {}"), Options{}, plain, webWorkload, allowedBy("app/p", 0)},
		{"DENY rules: [{}] denies all", deny("rules:\n- {}"), Options{}, mtls, webWorkload, deniedBy("app/d", 0)},
		{"DENY rule whose clause is left empty has no effect", deny(from(`requestPrincipals: ["*"]`)), Options{}, mtls, webWorkload, noAllowPolicy},
		{"ALLOW with only dropped rules denies all", allow("rules:\n- to:\n  - operation: {methods: [GET]}"), Options{}, mtls, webWorkload, noneMatched},

		// Evaluation order.
		{"DENY before ALLOW", docs(allow("rules:\n- {}"), deny(from(`namespaces: ["client"]`))), Options{}, mtls, webWorkload, deniedBy("app/d", 0)},
		{"DENY not matching, ALLOW matching", docs(allow("rules:\n- {}"), deny(from(`namespaces: ["other"]`))), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"no ALLOW policy means allow", deny(from(`namespaces: ["other"]`)), Options{}, mtls, webWorkload, noAllowPolicy},
		{"no policy at all means allow", "", Options{}, mtls, webWorkload, noAllowPolicy},
		{"the first matching DENY policy by name is reported", docs(doc("app", "z", "action: DENY\nrules:\n- {}"), doc("app", "b", "action: DENY\nrules:\n- to:\n  - operation: {ports: [\"1\"]}\n- {}")), Options{}, mtls, webWorkload, deniedBy("app/b", 1)},
		{"root namespace DENY before the workload's", docs(doc("istio-system", "z", "action: DENY\nrules:\n- {}"), doc("app", "a", "action: DENY\nrules:\n- {}")), Options{}, mtls, webWorkload, deniedBy("istio-system/z", 0)},

		// Plaintext: no principal, no namespace.
		{"plaintext fails principals", allow(from(`principals: ["*"]`)), Options{}, plain, webWorkload, noneMatched},
		{"plaintext passes notPrincipals", allow(from(`notPrincipals: ["cluster.local/ns/client/sa/web"]`)), Options{}, plain, webWorkload, allowedBy("app/p", 0)},
		{"plaintext fails namespaces", allow(from(`namespaces: ["*"]`)), Options{}, plain, webWorkload, noneMatched},
		{"plaintext passes notNamespaces", allow(from(`notNamespaces: ["client"]`)), Options{}, plain, webWorkload, allowedBy("app/p", 0)},
		{"plaintext fails serviceAccounts", allow(from(`serviceAccounts: ["client/web"]`)), Options{}, plain, webWorkload, noneMatched},
		{"plaintext passes notServiceAccounts", allow(from(`notServiceAccounts: ["client/web"]`)), Options{}, plain, webWorkload, allowedBy("app/p", 0)},
		{"plaintext fails when source.namespace", allow(when(`{key: source.namespace, values: ["*"]}`)), Options{}, plain, webWorkload, noneMatched},
		{"plaintext passes when source.principal notValues", allow(when(`{key: source.principal, notValues: ["*"]}`)), Options{}, plain, webWorkload, allowedBy("app/p", 0)},
		{"DENY notPrincipals * denies plaintext", deny(from(`notPrincipals: ["*"]`)), Options{}, plain, webWorkload, deniedBy("app/d", 0)},
		{"DENY notPrincipals * lets mTLS through", deny(from(`notPrincipals: ["*"]`)), Options{}, mtls, webWorkload, noAllowPolicy},
		{"not an Istio identity has a principal but no namespace", allow(from(`namespaces: ["*"]`)), Options{}, withID("spiffe://example.org/workload/x"), webWorkload, noneMatched},
		{"not an Istio identity still has a principal", allow(from(`principals: ["*"]`)), Options{}, withID("spiffe://example.org/workload/x"), webWorkload, allowedBy("app/p", 0)},

		// Scope.
		{"global: root namespace without selector applies everywhere", doc("istio-system", "g", "rules:\n- from:\n  - source: {namespaces: [other]}"), Options{}, mtls, webWorkload, noneMatched},
		{"global policy matching", doc("istio-system", "g", "rules:\n- from:\n  - source: {namespaces: [client]}"), Options{}, mtls, webWorkload, allowedBy("istio-system/g", 0)},
		{"namespace: another namespace's policy does not apply", doc("other", "ns-wide", "rules: []"), Options{}, mtls, webWorkload, noAllowPolicy},
		{"namespace: the workload's namespace policy applies", doc("app", "ns-wide", "rules: []"), Options{}, mtls, webWorkload, noneMatched},
		{"workload: selector matches labels", doc("app", "w", "selector:\n  matchLabels: {app: web}\nrules: []"), Options{}, mtls, webWorkload, noneMatched},
		{"workload: all selector labels must match", doc("app", "w", "selector:\n  matchLabels: {app: web, version: v2}\nrules: []"), Options{}, mtls, webWorkload, noAllowPolicy},
		{"workload: selector does not match", doc("app", "w", "selector:\n  matchLabels: {app: db}\nrules: []"), Options{}, mtls, webWorkload, noAllowPolicy},
		{"workload: a selector needs labels", doc("app", "w", "selector:\n  matchLabels: {app: web}\nrules: []"), Options{}, mtls, Workload{Namespace: "app"}, noAllowPolicy},
		{"workload: empty selector selects every workload", doc("app", "w", "selector: {}\nrules: []"), Options{}, mtls, Workload{Namespace: "app"}, noneMatched},
		{"workload: root namespace selector applies in every namespace", doc("istio-system", "w", "selector:\n  matchLabels: {app: web}\nrules: []"), Options{}, mtls, webWorkload, noneMatched},
		{"workload: other namespace selector does not apply", doc("other", "w", "selector:\n  matchLabels: {app: web}\nrules: []"), Options{}, mtls, webWorkload, noAllowPolicy},
		{"configurable root namespace makes its policies global", doc("mesh", "g", "rules: []"), Options{RootNamespace: "mesh"}, mtls, webWorkload, noneMatched},
		{"istio-system is not special with another root", doc("istio-system", "g", "rules: []"), Options{RootNamespace: "mesh"}, mtls, webWorkload, noAllowPolicy},
		{"a workload in the root namespace", doc("istio-system", "g", "rules:\n- {}"), Options{}, mtls, Workload{Namespace: "istio-system"}, allowedBy("istio-system/g", 0)},

		// L7 fields in ALLOW: the rule is dropped whole, the policy still applies.
		{"ALLOW rule with methods is dropped: deny", allow("rules:\n- from:\n  - source: {namespaces: [client]}\n  to:\n  - operation: {methods: [GET]}"), Options{}, mtls, webWorkload, noneMatched},
		{"ALLOW rule with requestPrincipals is dropped", allow("rules:\n- from:\n  - source: {namespaces: [client], requestPrincipals: [\"*\"]}"), Options{}, mtls, webWorkload, noneMatched},
		{"ALLOW rule with an L7 when key is dropped", allow("rules:\n- when:\n  - {key: \"request.headers[x-user]\", values: [a]}"), Options{}, mtls, webWorkload, noneMatched},
		{"ALLOW keeps the L4 rule beside a dropped one, with its index", allow("rules:\n- to:\n  - operation: {paths: [/a]}\n- from:\n  - source: {namespaces: [client]}"), Options{}, mtls, webWorkload, allowedBy("app/p", 1)},
		{"ALLOW rule with trustDomains is dropped (not in the L4 model)", allow("rules:\n- from:\n  - source: {namespaces: [client], trustDomains: [cluster.local]}"), Options{}, mtls, webWorkload, noneMatched},

		// L7 fields in DENY: the L4 part is kept; an L7-only source or operation never matches.
		{"DENY keeps ports beside methods: denies all of the port", deny("rules:\n- to:\n  - operation: {ports: [\"8080\"], methods: [POST]}"), Options{}, mtls, webWorkload, deniedBy("app/d", 0)},
		{"DENY L4 part kept, other port untouched", deny("rules:\n- to:\n  - operation: {ports: [\"8080\"], methods: [POST]}"), Options{}, withPort(mtls, 9090), webWorkload, noAllowPolicy},
		{"DENY with an L7-only operation has no effect", deny("rules:\n- to:\n  - operation: {methods: [POST]}"), Options{}, mtls, webWorkload, noAllowPolicy},
		{"DENY L7-only source skipped, the other source matches", deny("rules:\n- from:\n  - source: {requestPrincipals: [\"*\"]}\n  - source: {namespaces: [client]}"), Options{}, mtls, webWorkload, deniedBy("app/d", 0)},
		{"DENY with an L7 when key has no effect", deny("rules:\n- from:\n  - source: {namespaces: [client]}\n  when:\n  - {key: \"request.auth.claims[group]\", values: [admin]}"), Options{}, mtls, webWorkload, noAllowPolicy},
		{"DENY remoteIpBlocks removed, ipBlocks kept", deny(from(`{ipBlocks: ["10.0.0.0/8"], remoteIpBlocks: ["1.2.3.4"]}`)), Options{}, mtls, webWorkload, deniedBy("app/d", 0)},

		// when conditions with values and notValues, for each L4 key.
		{"when source.ip values", allow(when(`{key: source.ip, values: ["10.1.2.0/24"]}`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"when source.ip notValues", allow(when(`{key: source.ip, notValues: ["10.1.2.0/24"]}`)), Options{}, mtls, webWorkload, noneMatched},
		{"when source.namespace values", allow(when(`{key: source.namespace, values: ["client"]}`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"when source.namespace notValues", allow(when(`{key: source.namespace, notValues: ["client"]}`)), Options{}, mtls, webWorkload, noneMatched},
		{"when source.principal values", allow(when(`{key: source.principal, values: ["cluster.local/ns/client/sa/web"]}`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"when source.principal notValues", allow(when(`{key: source.principal, notValues: ["*/sa/web"]}`)), Options{}, mtls, webWorkload, noneMatched},
		{"when destination.ip values", allow(when(`{key: destination.ip, values: ["10.9.9.9"]}`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"when destination.ip values miss", allow(when(`{key: destination.ip, values: ["10.9.9.9"]}`)), Options{}, withDst(mtls, "10.9.9.8"), webWorkload, noneMatched},
		{"when destination.ip notValues", allow(when(`{key: destination.ip, notValues: ["10.9.0.0/16"]}`)), Options{}, mtls, webWorkload, noneMatched},
		{"when destination.port values", allow(when(`{key: destination.port, values: ["8080", "8443"]}`)), Options{}, mtls, webWorkload, allowedBy("app/p", 0)},
		{"when destination.port notValues", allow(when(`{key: destination.port, notValues: ["8080"]}`)), Options{}, mtls, webWorkload, noneMatched},
		{"when values and notValues together", allow(when(`{key: destination.port, values: ["8080"], notValues: ["8080"]}`)), Options{}, mtls, webWorkload, noneMatched},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var ps []*Policy
			if tc.policies != "" {
				ps = mustParse(t, tc.policies, tc.opts)
			}
			s := mustStore(t, tc.opts, ps...)
			if got := decideBoth(t, s.Snapshot(), tc.conn, tc.workload); got != tc.want {
				t.Errorf("got  %v\nwant %v\n%s", got, tc.want, s.Snapshot().Explain(tc.conn, tc.workload).Format())
			}
		})
	}
}

// A clause built without any match (only possible through the Go model) never matches,
// so its rule never matches; a rule without clauses matches everything.
func TestEmptyClauseModel(t *testing.T) {
	s := mustStore(t, Options{},
		&Policy{Name: "empty-clause", Namespace: "app", Scope: ScopeNamespace, Action: Deny,
			Rules: []Rule{{Index: 0, Clauses: []Clause{{Origin: "from"}}}}},
		&Policy{Name: "empty-match", Namespace: "app", Scope: ScopeNamespace, Action: Deny,
			Rules: []Rule{{Index: 0, Clauses: []Clause{{Origin: "to", Matches: []Match{{}}}}}}},
		&Policy{Name: "no-clauses", Namespace: "app", Scope: ScopeNamespace, Action: Allow,
			Rules: []Rule{{Index: 3}}},
	)
	if got := decideBoth(t, s.Snapshot(), conn(webID), webWorkload); got != allowedBy("app/no-clauses", 3) {
		t.Errorf("got %v", got)
	}
}

// Decide never allocates: the proxy calls it for every connection.
func TestDecideDoesNotAllocate(t *testing.T) {
	var many []string
	for i := range 20 {
		many = append(many, `"10.`+strconv.Itoa(i)+`.0.0/16"`)
	}
	ps := mustParse(t, docs(
		doc("istio-system", "deny-plaintext", "action: DENY\nrules:\n- from:\n  - source: {notPrincipals: [\"*\"]}"),
		doc("app", "allow-web", "selector:\n  matchLabels: {app: web}\nrules:\n- from:\n  - source: {principals: [\"cluster.local/ns/client/*\"]}\n  to:\n  - operation: {ports: [\"8080\"]}"),
		doc("app", "allow-nets", "rules:\n- from:\n  - source: {ipBlocks: ["+strings.Join(many, ", ")+"]}\n  when:\n  - {key: destination.ip, values: [10.9.0.0/16]}"),
		doc("app", "deny-sa", "action: DENY\nrules:\n- from:\n  - source: {serviceAccounts: [client/db]}\n- to:\n  - operation: {notPorts: [\"8080\", \"9090\"]}"),
	), Options{})
	snap := mustStore(t, Options{}, ps...).Snapshot()
	for _, c := range []Connection{conn(webID), conn(""), conn("spiffe://cluster.local/ns/client/sa/db"), conn("spiffe://cluster.local/ns/x/sa/y")} {
		for _, w := range []Workload{webWorkload, {Namespace: "app"}, {Namespace: "none"}} {
			d := snap.Decide(c, w)
			if n := testing.AllocsPerRun(200, func() { snap.Decide(c, w) }); n != 0 {
				t.Errorf("Decide(%v, %v) = %v: %v allocations per run, want 0", c, w, d, n)
			}
		}
	}
}
