package policy

import (
	"net/netip"
	"strings"
	"testing"
)

// doc writes one AuthorizationPolicy document; spec is YAML indented as under `spec:`
// (leading blank line and common indentation are removed).
func doc(ns, name, spec string) string {
	var b strings.Builder
	b.WriteString("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: " + name + "\n  namespace: " + ns + "\nspec:\n")
	lines := strings.Split(strings.Trim(spec, "\n"), "\n")
	indent := -1
	for _, l := range lines {
		if strings.TrimSpace(l) == "" {
			continue
		}
		n := len(l) - len(strings.TrimLeft(l, " \t"))
		if indent < 0 || n < indent {
			indent = n
		}
	}
	for _, l := range lines {
		if len(l) >= indent {
			l = l[indent:]
		}
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

func docs(ds ...string) string { return strings.Join(ds, "---\n") }

func mustParse(t testing.TB, yaml string, opts Options) []*Policy {
	t.Helper()
	ps, err := Parse([]byte(yaml), opts)
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, yaml)
	}
	return ps
}

func mustStore(t testing.TB, opts Options, ps ...*Policy) *Store {
	t.Helper()
	s := NewStore(opts)
	if err := s.Put(ps...); err != nil {
		t.Fatalf("put: %v", err)
	}
	return s
}

// The usual test connection: mTLS from client/web at 10.1.2.3 to 10.9.9.9:8080.
const webID = "spiffe://cluster.local/ns/client/sa/web"

func conn(principal string) Connection {
	return Connection{
		SrcPrincipal: principal,
		SrcIP:        netip.MustParseAddr("10.1.2.3"),
		DstIP:        netip.MustParseAddr("10.9.9.9"),
		DstPort:      8080,
	}
}

// The usual workload: app=web in namespace app.
var webWorkload = Workload{Namespace: "app", Labels: map[string]string{"app": "web", "version": "v1"}}

func allowedBy(p string, rule int) Decision {
	return Decision{Allow: true, Policy: p, RuleIndex: rule, Reason: ReasonAllowMatched}
}

func deniedBy(p string, rule int) Decision {
	return Decision{Allow: false, Policy: p, RuleIndex: rule, Reason: ReasonDenyMatched}
}

var (
	noAllowPolicy = Decision{Allow: true, RuleIndex: -1, Reason: ReasonNoAllowPolicy}
	noneMatched   = Decision{Allow: false, RuleIndex: -1, Reason: ReasonNoAllowMatched}
)

// decideBoth decides with the index and with the explainer, which must agree.
func decideBoth(t testing.TB, s *Snapshot, c Connection, w Workload) Decision {
	t.Helper()
	d := s.Decide(c, w)
	e := s.Explain(c, w)
	if e.Decision != d {
		t.Errorf("Decide and Explain disagree for %v to %+v:\n  Decide:  %+v\n  Explain: %+v\n%s", c, w, d, e.Decision, e.Format())
	}
	return d
}
