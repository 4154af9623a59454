package policy

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	apiv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// The mapping of docs/authorization.md#mapping-from-authorizationpolicy, field by field.
func TestTranslateMapping(t *testing.T) {
	ps := mustParse(t, doc("app", "full", `
selector:
  matchLabels: {app: web}
action: DENY
rules:
- from:
  - source:
      principals: ["cluster.local/ns/a/sa/b", "x*"]
      notPrincipals: ["*y"]
      namespaces: ["*"]
      notNamespaces: [kube-system]
      ipBlocks: ["10.0.0.0/8", "10.1.2.3"]
      notIpBlocks: ["2001:db8::/32"]
  - source:
      serviceAccounts: [web, other/db]
      notServiceAccounts: [other/x]
  to:
  - operation: {ports: ["80", "443"], notPorts: ["22"]}
  when:
  - {key: source.ip, values: [192.168.0.0/16], notValues: [192.168.1.1]}
  - {key: source.namespace, values: ["a*"], notValues: [ab]}
  - {key: source.principal, values: ["*"], notValues: [p]}
  - {key: destination.ip, values: [10.9.9.9], notValues: [10.9.9.8]}
  - {key: destination.port, values: ["8080"], notValues: ["8081"]}
`), Options{})
	want := &Policy{
		Name: "full", Namespace: "app", Scope: ScopeWorkload, Selector: map[string]string{"app": "web"}, Action: Deny,
		Rules: []Rule{{Index: 0, Clauses: []Clause{
			{Origin: "from", Matches: []Match{
				{
					Principals:    []StringMatch{{Exact, "cluster.local/ns/a/sa/b"}, {Prefix, "x"}},
					NotPrincipals: []StringMatch{{Suffix, "y"}},
					Namespaces:    []StringMatch{{Presence, ""}},
					NotNamespaces: []StringMatch{{Exact, "kube-system"}},
					SourceIPs:     []netip.Prefix{pfx("10.0.0.0/8"), pfx("10.1.2.3/32")},
					NotSourceIPs:  []netip.Prefix{pfx("2001:db8::/32")},
				},
				{
					ServiceAccounts:    []ServiceAccount{{"app", "web"}, {"other", "db"}},
					NotServiceAccounts: []ServiceAccount{{"other", "x"}},
				},
			}},
			{Origin: "to", Matches: []Match{{DestinationPorts: []uint16{80, 443}, NotDestinationPorts: []uint16{22}}}},
			{Origin: "when[0]", Matches: []Match{{SourceIPs: []netip.Prefix{pfx("192.168.0.0/16")}, NotSourceIPs: []netip.Prefix{pfx("192.168.1.1/32")}}}},
			{Origin: "when[1]", Matches: []Match{{Namespaces: []StringMatch{{Prefix, "a"}}, NotNamespaces: []StringMatch{{Exact, "ab"}}}}},
			{Origin: "when[2]", Matches: []Match{{Principals: []StringMatch{{Presence, ""}}, NotPrincipals: []StringMatch{{Exact, "p"}}}}},
			{Origin: "when[3]", Matches: []Match{{DestinationIPs: []netip.Prefix{pfx("10.9.9.9/32")}, NotDestinationIPs: []netip.Prefix{pfx("10.9.9.8/32")}}}},
			{Origin: "when[4]", Matches: []Match{{DestinationPorts: []uint16{8080}, NotDestinationPorts: []uint16{8081}}}},
		}}},
	}
	if !reflect.DeepEqual(ps[0], want) {
		t.Errorf("got\n%#v\nwant\n%#v", ps[0], want)
	}
}

// v1 and v1beta1 objects, decoded or built in Go, translate alike.
func TestTranslateV1AndV1beta1(t *testing.T) {
	spec := "action: ALLOW\nrules:\n- from:\n  - source: {principals: [cluster.local/ns/a/sa/b]}\n  to:\n  - operation: {ports: [\"80\"]}\n"
	v1 := mustParse(t, doc("app", "p", spec), Options{})
	v1beta1 := mustParse(t, strings.Replace(doc("app", "p", spec), "security.istio.io/v1", "security.istio.io/v1beta1", 1), Options{})
	if !reflect.DeepEqual(v1, v1beta1) {
		t.Errorf("v1 and v1beta1 differ:\n%#v\n%#v", v1[0], v1beta1[0])
	}
	rules := []*apiv1beta1.Rule{{
		From: []*apiv1beta1.Rule_From{{Source: &apiv1beta1.Source{Principals: []string{"cluster.local/ns/a/sa/b"}}}},
		To:   []*apiv1beta1.Rule_To{{Operation: &apiv1beta1.Operation{Ports: []string{"80"}}}},
	}}
	meta := metav1.ObjectMeta{Name: "p", Namespace: "app"}
	obj1 := &securityv1.AuthorizationPolicy{ObjectMeta: meta}
	obj1.Spec.Rules = rules
	obj2 := &securityv1beta1.AuthorizationPolicy{ObjectMeta: meta}
	obj2.Spec.Rules = rules
	p1, err1 := FromV1(obj1, Options{})
	p2, err2 := FromV1beta1(obj2, Options{})
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if !reflect.DeepEqual(p1, v1[0]) || !reflect.DeepEqual(p2, v1[0]) {
		t.Errorf("typed objects translate differently:\n%#v\n%#v\n%#v", p1, p2, v1[0])
	}
	if _, err := FromV1(nil, Options{}); err == nil {
		t.Error("FromV1(nil) succeeded")
	}
	// A typed object is validated too.
	obj1.Spec.Rules[0].From[0].Source.IpBlocks = []string{"nope"}
	if _, err := FromV1(obj1, Options{}); err == nil || !strings.Contains(err.Error(), "AuthorizationPolicy app/p: spec.rules[0].from[0].source.ipBlocks[0]: bad IP address \"nope\"") {
		t.Errorf("typed object with a bad ipBlock: %v", err)
	}
	obj1.Spec.Rules[0].From[0].Source.IpBlocks = nil
	obj1.Spec.TargetRefs = []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}}
	if p, err := FromV1(obj1, Options{}); err != nil || p.Ignored == "" || len(p.Rules) != 0 {
		t.Errorf("targetRefs: %+v, %v", p, err)
	}
}

func TestTranslateScopeAndNamespaces(t *testing.T) {
	cases := []struct {
		yaml      string
		opts      Options
		namespace string
		scope     Scope
	}{
		{doc("app", "p", "rules: []"), Options{}, "app", ScopeNamespace},
		{doc("istio-system", "p", "rules: []"), Options{}, "istio-system", ScopeGlobal},
		{doc("istio-system", "p", "selector: {matchLabels: {a: b}}"), Options{}, "istio-system", ScopeWorkload},
		{doc("mesh", "p", "rules: []"), Options{RootNamespace: "mesh"}, "mesh", ScopeGlobal},
		{doc("istio-system", "p", "rules: []"), Options{RootNamespace: "mesh"}, "istio-system", ScopeNamespace},
		{"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n", Options{}, "default", ScopeNamespace},
		{"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n", Options{DefaultNamespace: "team"}, "team", ScopeNamespace},
	}
	for _, tc := range cases {
		p := mustParse(t, tc.yaml, tc.opts)[0]
		if p.Namespace != tc.namespace || p.Scope != tc.scope || p.Action != Allow {
			t.Errorf("%s: namespace %s, scope %v, action %v; want %s, %v, ALLOW", tc.yaml, p.Namespace, p.Scope, p.Action, tc.namespace, tc.scope)
		}
	}
}

// Every case where L4 differs from what was written says so, per policy and rule.
func TestTranslateWarnings(t *testing.T) {
	cases := []struct {
		name     string
		spec     string
		rule     int      // the rule of the first warning; -1 for the policy
		want     []string // substrings of one warning each, in order
		ignored  bool
		dropped  []int
		keptRule []int
	}{
		{"ALLOW rule with L7 dropped", "rules:\n- from:\n  - source: {namespaces: [a]}\n  to:\n  - operation: {methods: [GET], paths: [/x]}\n- to:\n  - operation: {ports: [\"80\"]}",
			0, []string{"dropped: it uses to[0].operation.methods, to[0].operation.paths, which the node proxy cannot enforce at L4; an ALLOW rule with any such field is removed whole, so connections only this rule would allow are denied (fail closed)"}, false, []int{0}, []int{1}},
		{"ALLOW with every rule dropped", "rules:\n- when:\n  - {key: \"request.headers[x]\", values: [a]}",
			0, []string{"dropped: it uses when[0] (request.headers[x])", "no rule is left at L4, so this ALLOW policy denies every connection"}, false, []int{0}, nil},
		{"ALLOW requestPrincipals and remoteIpBlocks", "rules:\n- from:\n  - source: {requestPrincipals: [a], notRemoteIpBlocks: [1.2.3.4], principals: [x]}",
			0, []string{"from[0].source.requestPrincipals, from[0].source.notRemoteIpBlocks", "no rule is left"}, false, []int{0}, nil},
		{"DENY keeps the L4 part", "action: DENY\nrules:\n- to:\n  - operation: {ports: [\"80\"], hosts: [a.example]}",
			0, []string{"the L7 fields of to[0].operation (hosts) are removed and its L4 part is kept, so the rule denies more connections than written"}, false, nil, []int{0}},
		{"DENY L7-only operation never matches", "action: DENY\nrules:\n- to:\n  - operation: {notMethods: [GET]}",
			0, []string{"to[0].operation has only L7 fields (notMethods), so nothing is left of it at L4 and it never matches", "its to clause has nothing left that can match at L4, so the rule never matches and has no effect"}, false, nil, []int{0}},
		{"DENY L7-only source beside an L4 source", "action: DENY\nrules:\n- from:\n  - source: {requestPrincipals: [a]}\n  - source: {namespaces: [b]}",
			0, []string{"from[0].source has only L7 fields (requestPrincipals)"}, false, nil, []int{0}},
		{"DENY L7 when key", "action: DENY\nrules:\n- when:\n  - {key: connection.sni, values: [a]}",
			0, []string{"when[0]: key connection.sni is L7, so the condition never matches at L4", "its when[0] clause has nothing left"}, false, nil, []int{0}},
		{"targetRef ignored", "targetRef: {kind: Service, name: web}\nrules:\n- {}",
			-1, []string{"ignored: targetRef binds it to a waypoint or gateway"}, true, nil, nil},
		{"targetRefs ignored", "targetRefs:\n- {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\naction: DENY\nrules:\n- {}",
			-1, []string{"ignored: targetRef"}, true, nil, nil},
		{"AUDIT ignored", "action: AUDIT\nrules:\n- {}", -1, []string{"ignored: action AUDIT is not enforced"}, true, nil, nil},
		{"CUSTOM ignored", "action: CUSTOM\nprovider: {name: ext-authz}\nrules:\n- {}", -1, []string{"ignored: action CUSTOM is not enforced"}, true, nil, nil},
		{"spiffe:// in a principal", "rules:\n- from:\n  - source: {principals: [\"spiffe://cluster.local/ns/a/sa/b\"]}",
			0, []string{`principal "spiffe://cluster.local/ns/a/sa/b" starts with spiffe://, but principals are compared without it, so this value never matches`}, false, nil, []int{0}},
		{"trustDomains are handled like L7", "action: DENY\nrules:\n- from:\n  - source: {namespaces: [a], notTrustDomains: [evil.example]}",
			0, []string{"from[0].source: trustDomains and notTrustDomains are not part of the node proxy's L4 model", "the L7 fields of from[0].source (notTrustDomains) are removed and its L4 part is kept"}, false, nil, []int{0}},
		{"empty selector", "selector: {}\nrules: []", -1, []string{"the selector has no labels, so the policy applies to every workload in namespace app"}, false, nil, nil},
		{"no warning for L4 only", "rules:\n- from:\n  - source: {principals: [\"*\"]}", 0, nil, false, nil, []int{0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := mustParse(t, doc("app", "p", tc.spec), Options{})[0]
			if len(p.Warnings) != len(tc.want) {
				t.Fatalf("%d warnings, want %d: %v", len(p.Warnings), len(tc.want), p.Warnings)
			}
			for i, w := range tc.want {
				got := p.Warnings[i]
				if !strings.Contains(got.Message, w) || got.Policy != "app/p" {
					t.Errorf("warning %d: %q (policy %s), want it to contain %q", i, got.Message, got.Policy, w)
				}
			}
			if len(p.Warnings) > 0 && p.Warnings[0].Rule != tc.rule {
				t.Errorf("warning is for rule %d, want %d", p.Warnings[0].Rule, tc.rule)
			}
			if (p.Ignored != "") != tc.ignored {
				t.Errorf("Ignored = %q", p.Ignored)
			}
			var dropped, kept []int
			for _, d := range p.Dropped {
				dropped = append(dropped, d.Index)
			}
			for _, r := range p.Rules {
				kept = append(kept, r.Index)
			}
			if !reflect.DeepEqual(dropped, tc.dropped) || !reflect.DeepEqual(kept, tc.keptRule) {
				t.Errorf("dropped %v kept %v, want %v %v", dropped, kept, tc.dropped, tc.keptRule)
			}
		})
	}
}

// Bad input is an error naming the document, the object and the field.
func TestParseErrors(t *testing.T) {
	head := "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: app\n"
	cases := []struct {
		name string
		yaml string
		want []string
	}{
		{"not YAML", "a: [b", []string{"document 1 (line 1):"}},
		{"not an object", "- a\n- b\n", []string{"document 1 (line 1): not an object"}},
		{"unknown kind", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: app}\n", []string{`ConfigMap app/c: kind: "ConfigMap" is not supported (want AuthorizationPolicy)`}},
		{"no kind", "apiVersion: v1\nmetadata: {name: c}\n", []string{"object default/c: kind: required"}},
		{"unknown apiVersion", strings.Replace(head, "security.istio.io/v1", "security.istio.io/v2", 1), []string{`AuthorizationPolicy app/p: apiVersion: "security.istio.io/v2" is not supported`}},
		{"second document, line number", head + "---\n# two\n" + strings.Replace(head, "name: p", "name: q", 1) + "spec:\n  rulez: []\n",
			[]string{"document 2 (line 7): AuthorizationPolicy app/q: spec.rulez: unknown field (known: action, provider, rules, selector, targetRef, targetRefs)"}},
		{"leading ---, second document", "# policies\n---\n" + head + "---\n" + strings.Replace(head, "name: p", "name: q", 1) + "spec:\n  rulez: []\n",
			[]string{"document 2 (line 9): AuthorizationPolicy app/q: spec.rulez: unknown field"}},
		{"unknown top-level field", head + "specs: {}\n", []string{"AuthorizationPolicy app/p: specs: unknown field"}},
		{"unknown metadata field", strings.Replace(head, "metadata:\n", "metadata:\n  lables: {a: b}\n", 1), []string{"AuthorizationPolicy app/p: metadata.lables: unknown field"}},
		{"no name", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: app}\n", []string{"AuthorizationPolicy app/(no name): metadata.name: required"}},
		{"name not a string", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: 12}\n", []string{"metadata.name: must be a string"}},
		{"duplicate key", head + "spec:\n  action: ALLOW\n  action: DENY\n", []string{"document 1 (line 1):", `"action"`}},
		{"typo in a source", head + "spec:\n  rules:\n  - from:\n    - source:\n        principal: [a]\n", []string{"AuthorizationPolicy app/p: spec.rules[0].from[0].source.principal: unknown field (known: ipBlocks,"}},
		{"snake_case is accepted, typo is not", head + "spec:\n  rules:\n  - from:\n    - source:\n        not_principals: [a]\n        not_principalz: [a]\n", []string{"spec.rules[0].from[0].source.not_principalz: unknown field"}},
		{"list expected", head + "spec:\n  rules:\n  - from:\n    - source:\n        principals: a\n", []string{"spec.rules[0].from[0].source.principals: must be a list"}},
		{"port not quoted", head + "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [8080]\n", []string{`spec.rules[0].to[0].operation.ports[0]: must be a string (quote it: "8080")`}},
		{"bad action", head + "spec:\n  action: deny\n", []string{`spec.action: "deny" is not one of ALLOW, DENY, AUDIT, CUSTOM`}},
		{"selector labels must be strings", head + "spec:\n  selector:\n    matchLabels: {version: 2}\n", []string{"spec.selector.matchLabels.version: must be a string"}},
		{"rules not a list", head + "spec:\n  rules: {}\n", []string{"spec.rules: must be a list"}},
		{"empty from", head + "spec:\n  rules:\n  - from: []\n", []string{"spec.rules[0].from: must not be empty"}},
		{"empty to", head + "spec:\n  rules:\n  - to: []\n", []string{"spec.rules[0].to: must not be empty"}},
		{"empty source", head + "spec:\n  rules:\n  - from:\n    - source: {}\n", []string{"spec.rules[0].from[0].source: must not be empty"}},
		{"missing source", head + "spec:\n  rules:\n  - from:\n    - {}\n", []string{"spec.rules[0].from[0].source: required"}},
		{"empty operation", head + "spec:\n  rules:\n  - to:\n    - operation: {}\n", []string{"spec.rules[0].to[0].operation: must not be empty"}},
		{"bad CIDR", head + "spec:\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}\n", []string{`AuthorizationPolicy app/p: spec.rules[0].from[0].source.ipBlocks[1]: bad CIDR "10.0.0.0/33"`}},
		{"bad IP", head + "spec:\n  rules:\n  - from:\n    - source: {notIpBlocks: [host.example]}\n", []string{`spec.rules[0].from[0].source.notIpBlocks[0]: bad IP address "host.example"`}},
		{"bad port", head + "spec:\n  rules:\n  - to:\n    - operation: {notPorts: [\"70000\"]}\n", []string{`spec.rules[0].to[0].operation.notPorts[0]: bad port "70000"`}},
		{"empty value", head + "spec:\n  rules:\n  - from:\n    - source: {namespaces: [a, \"\"]}\n", []string{"spec.rules[0].from[0].source.namespaces[1]: empty value"}},
		{"serviceAccounts with principals", head + "spec:\n  rules:\n  - from:\n    - source: {serviceAccounts: [a], principals: [b]}\n", []string{"spec.rules[0].from[0].source: serviceAccounts cannot be set with namespaces or principals"}},
		{"serviceAccount wildcard", head + "spec:\n  rules:\n  - from:\n    - source: {serviceAccounts: [\"ns/*\"]}\n", []string{`spec.rules[0].from[0].source.serviceAccounts[0]: "ns/*": wildcards are not allowed`}},
		{"serviceAccount format", head + "spec:\n  rules:\n  - from:\n    - source: {notServiceAccounts: [a/b/c, /b]}\n", []string{"notServiceAccounts[0]", "notServiceAccounts[1]", "want serviceAccount or namespace/serviceAccount"}},
		{"when unknown key", head + "spec:\n  rules:\n  - when:\n    - {key: source.color, values: [red]}\n", []string{`spec.rules[0].when[0].key: unknown attribute "source.color"`}},
		{"when without values", head + "spec:\n  rules:\n  - when:\n    - {key: source.ip}\n", []string{"spec.rules[0].when[0]: at least one of values and notValues must be set"}},
		{"when bad port", head + "spec:\n  rules:\n  - when:\n    - {key: destination.port, notValues: [http]}\n", []string{`spec.rules[0].when[0].notValues[0]: bad port "http"`}},
		{"when bad header key", head + "spec:\n  rules:\n  - when:\n    - {key: request.headers, values: [a]}\n", []string{"spec.rules[0].when[0].key: \"request.headers\" should have the form name[key]"}},
		{"when destination.namespace", head + "spec:\n  rules:\n  - when:\n    - {key: destination.namespace, values: [a]}\n", []string{"replaced by the policy's metadata.namespace"}},
		{"DENY without rules", head + "spec:\n  action: DENY\n", []string{"AuthorizationPolicy app/p: spec.rules: a DENY policy without rules never matches"}},
		{"selector and targetRef", head + "spec:\n  selector: {matchLabels: {a: b}}\n  targetRef: {kind: Service, name: x}\n", []string{"AuthorizationPolicy app/p: spec: only one of selector, targetRef and targetRefs may be set"}},
		{"selector wildcard", head + "spec:\n  selector: {matchLabels: {app: \"web*\"}}\n", []string{"spec.selector.matchLabels.app: wildcards are not supported"}},
		{"provider with ALLOW", head + "spec:\n  provider: {name: x}\n", []string{"spec.provider: only allowed with action CUSTOM, not ALLOW"}},
		{"null rule", head + "spec:\n  rules: [null]\n", []string{"AuthorizationPolicy app/p: spec.rules[0]: must not be null"}},
		{"null port", head + "spec:\n  rules:\n  - to:\n    - operation: {ports: [null]}\n", []string{"spec.rules[0].to[0].operation.ports[0]: must not be null"}},
		{"targetRef without name", head + "spec:\n  targetRef: {kind: Service}\n", []string{"AuthorizationPolicy app/p: spec.targetRef.name: required"}},
		{"List item", "apiVersion: v1\nkind: List\nitems:\n- " + strings.ReplaceAll(head, "\n", "\n  ") + "spec: {action: nope}\n", []string{`List: items[0]: AuthorizationPolicy app/p: spec.action: "nope" is not one of`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ps, err := Parse([]byte(tc.yaml), Options{})
			if err == nil {
				t.Fatalf("no error; got %d policies", len(ps))
			}
			if ps != nil {
				t.Errorf("policies returned with an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error\n%v\nlacks %q", err, w)
				}
			}
		})
	}
}

func TestParseDocumentsAndLists(t *testing.T) {
	one := doc("app", "one", "rules: []")
	two := doc("app", "two", "action: DENY\nrules:\n- {}")
	list := "apiVersion: v1\nkind: List\nitems:\n- " + strings.ReplaceAll(strings.TrimSpace(one), "\n", "\n  ") + "\n- " + strings.ReplaceAll(strings.TrimSpace(two), "\n", "\n  ") + "\n"
	apList := strings.Replace(list, "apiVersion: v1\nkind: List", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicyList", 1)
	json := `{"apiVersion":"security.istio.io/v1beta1","kind":"AuthorizationPolicy","metadata":{"name":"one","namespace":"app"},"spec":{"rules":[]}}`
	cases := map[string]struct {
		yaml string
		want []string
	}{
		"documents":               {"# leading comment\n---\n" + one + "--- # separator with a comment\n\n---\n" + two + "---\n", []string{"app/one", "app/two"}},
		"CRLF":                    {strings.ReplaceAll(one+"---\n"+two, "\n", "\r\n"), []string{"app/one", "app/two"}},
		"List":                    {list, []string{"app/one", "app/two"}},
		"AuthorizationPolicyList": {apList, []string{"app/one", "app/two"}},
		"JSON":                    {json, []string{"app/one"}},
		"empty":                   {"", nil},
		"status is ignored":       {one + "status:\n  conditions: [{type: Ready}]\n", []string{"app/one"}},
	}
	for name, tc := range cases {
		ps, err := Parse([]byte(tc.yaml), Options{})
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if got := namesOf(ps); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %v, want %v", name, got, tc.want)
		}
	}
}
