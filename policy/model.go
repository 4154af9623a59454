// Package policy is nftmesh's L4 authorization: Istio AuthorizationPolicy objects
// translated to what a node proxy can enforce on a connection (docs/authorization.md),
// precompiled and indexed so that a decision costs only the few rules that can match it,
// and explained so that a person can see why a connection was refused.
//
// The model: a Policy has a scope (global, namespace, workload), an action (ALLOW or
// DENY) and rules. A rule matches when all of its clauses match; a clause matches when
// one of its matches does; a match holds when every kind it lists holds (any value within
// a kind; none for a not_ kind). A match with nothing in it never matches.
package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// DefaultRootNamespace is Istio's root namespace: a policy there without a selector
// applies to every workload in the mesh.
const DefaultRootNamespace = "istio-system"

// Scope says which workloads a policy applies to.
type Scope uint8

const (
	// ScopeWorkload: a policy with a selector; it applies to the workloads whose labels
	// hold the selector's, in its namespace (in every namespace for the root namespace).
	ScopeWorkload Scope = iota
	// ScopeNamespace: no selector; every workload in the policy's namespace.
	ScopeNamespace
	// ScopeGlobal: no selector, in the root namespace; every workload.
	ScopeGlobal
)

func (s Scope) String() string {
	switch s {
	case ScopeWorkload:
		return "workload"
	case ScopeNamespace:
		return "namespace"
	case ScopeGlobal:
		return "global"
	}
	return "Scope(" + strconv.Itoa(int(s)) + ")"
}

// Action is what a matching policy does with the connection.
type Action uint8

const (
	Allow Action = iota
	Deny
)

func (a Action) String() string {
	switch a {
	case Allow:
		return "ALLOW"
	case Deny:
		return "DENY"
	}
	return "Action(" + strconv.Itoa(int(a)) + ")"
}

// MatchKind is how a StringMatch compares.
type MatchKind uint8

const (
	Exact    MatchKind = iota // "x": equal to x
	Prefix                    // "x*": starts with x
	Suffix                    // "*x": ends with x
	Presence                  // "*": any non-empty value
)

// StringMatch is one namespace or principal value of a policy.
type StringMatch struct {
	Kind  MatchKind
	Value string // without the '*'; empty for Presence
}

// ParseStringMatch reads Istio's notation: "*" presence, "*x" suffix, "x*" prefix,
// anything else exact (a '*' inside a value is a literal character, as in Istio).
func ParseStringMatch(s string) StringMatch {
	switch {
	case s == "*":
		return StringMatch{Kind: Presence}
	case strings.HasPrefix(s, "*"):
		return StringMatch{Kind: Suffix, Value: s[1:]}
	case strings.HasSuffix(s, "*"):
		return StringMatch{Kind: Prefix, Value: s[:len(s)-1]}
	}
	return StringMatch{Kind: Exact, Value: s}
}

// Matches reports whether s satisfies m. An empty s (no principal, no namespace) never
// satisfies a positive match.
func (m StringMatch) Matches(s string) bool {
	if s == "" {
		return false
	}
	switch m.Kind {
	case Exact:
		return s == m.Value
	case Prefix:
		return strings.HasPrefix(s, m.Value)
	case Suffix:
		return strings.HasSuffix(s, m.Value)
	case Presence:
		return true
	}
	return false
}

// String writes m back in Istio's notation.
func (m StringMatch) String() string {
	switch m.Kind {
	case Prefix:
		return m.Value + "*"
	case Suffix:
		return "*" + m.Value
	case Presence:
		return "*"
	}
	return m.Value
}

// ServiceAccount is a Kubernetes service account, matched against the namespace and
// service account of the source principal (trust domain ignored, as in Istio).
type ServiceAccount struct {
	Namespace string
	Name      string
}

func (s ServiceAccount) String() string { return s.Namespace + "/" + s.Name }

// Match is one alternative of a clause. Every kind it lists must hold; within a kind any
// value will do; a Not kind holds when none of its values does.
type Match struct {
	Namespaces          []StringMatch
	NotNamespaces       []StringMatch
	Principals          []StringMatch // without "spiffe://"
	NotPrincipals       []StringMatch
	ServiceAccounts     []ServiceAccount
	NotServiceAccounts  []ServiceAccount
	SourceIPs           []netip.Prefix
	NotSourceIPs        []netip.Prefix
	DestinationIPs      []netip.Prefix
	NotDestinationIPs   []netip.Prefix
	DestinationPorts    []uint16
	NotDestinationPorts []uint16
}

// Empty reports whether m lists nothing: such a match never matches (an L7-only source
// or operation leaves one behind).
func (m *Match) Empty() bool {
	return len(m.Namespaces)+len(m.NotNamespaces)+len(m.Principals)+len(m.NotPrincipals)+
		len(m.ServiceAccounts)+len(m.NotServiceAccounts)+len(m.SourceIPs)+len(m.NotSourceIPs)+
		len(m.DestinationIPs)+len(m.NotDestinationIPs)+len(m.DestinationPorts)+len(m.NotDestinationPorts) == 0
}

// Clause matches when any of its non-empty matches does; with none, it never matches.
// (ztunnel's code lets a clause with no matches at all match, but istiod never sends
// one: a translated clause always holds at least one match, possibly empty.)
type Clause struct {
	Origin  string // where it came from: "from", "to", "when[1]"
	Matches []Match
}

// Rule matches when all of its clauses do; a rule without clauses matches everything.
type Rule struct {
	Index   int // the rule's index in spec.rules, so reasons name the rule people wrote
	Clauses []Clause
}

// DroppedRule is an ALLOW rule removed whole because it used fields L4 cannot enforce.
type DroppedRule struct {
	Index  int
	Fields []string // e.g. "to[0].operation.methods"
}

// Warning says where the L4 policy differs from what was written, and why.
type Warning struct {
	Policy  string // namespace/name
	Rule    int    // index in spec.rules; -1 for the whole policy
	Message string // one sentence
}

func (w Warning) String() string {
	if w.Rule < 0 {
		return w.Policy + ": " + w.Message
	}
	return w.Policy + ": rule " + strconv.Itoa(w.Rule) + ": " + w.Message
}

// Policy is an AuthorizationPolicy as the node proxy enforces it. Once given to a Store
// it must not be modified.
type Policy struct {
	Name      string
	Namespace string
	Scope     Scope
	// Selector is the workload selector's matchLabels (ScopeWorkload only; may be empty,
	// which selects every workload).
	Selector map[string]string
	Action   Action
	Rules    []Rule
	Dropped  []DroppedRule
	// Ignored, when set, says why the node proxy does not enforce this policy at all
	// (targetRef, AUDIT or CUSTOM action). Rules is then empty.
	Ignored  string
	Warnings []Warning
}

// Key is namespace/name.
func (p *Policy) Key() string { return p.Namespace + "/" + p.Name }

// selectorString renders the selector as sorted k=v pairs.
func selectorString(sel map[string]string) string {
	if len(sel) == 0 {
		return "{} (every workload)"
	}
	kv := make([]string, 0, len(sel))
	for k, v := range sel {
		kv = append(kv, k+"="+v)
	}
	slices.Sort(kv)
	return strings.Join(kv, ",")
}

// scopeString describes where p applies.
func (p *Policy) scopeString() string {
	switch p.Scope {
	case ScopeWorkload:
		return "workload scope, selector " + selectorString(p.Selector)
	case ScopeGlobal:
		return "global scope, root namespace without selector"
	}
	return "namespace scope, no selector"
}

// String renders m as "kind values; kind values".
func (m *Match) String() string {
	if m.Empty() {
		return "nothing left at L4: never matches"
	}
	var parts []string
	str := func(name string, v []StringMatch) {
		if len(v) > 0 {
			s := make([]string, len(v))
			for i, x := range v {
				s[i] = x.String()
			}
			parts = append(parts, name+" "+strings.Join(s, ", "))
		}
	}
	sas := func(name string, v []ServiceAccount) {
		if len(v) > 0 {
			s := make([]string, len(v))
			for i, x := range v {
				s[i] = x.String()
			}
			parts = append(parts, name+" "+strings.Join(s, ", "))
		}
	}
	ips := func(name string, v []netip.Prefix) {
		if len(v) > 0 {
			s := make([]string, len(v))
			for i, x := range v {
				s[i] = prefixString(x)
			}
			parts = append(parts, name+" "+strings.Join(s, ", "))
		}
	}
	ports := func(name string, v []uint16) {
		if len(v) > 0 {
			s := make([]string, len(v))
			for i, x := range v {
				s[i] = strconv.Itoa(int(x))
			}
			parts = append(parts, name+" "+strings.Join(s, ", "))
		}
	}
	str("principals", m.Principals)
	str("not principals", m.NotPrincipals)
	str("namespaces", m.Namespaces)
	str("not namespaces", m.NotNamespaces)
	sas("service accounts", m.ServiceAccounts)
	sas("not service accounts", m.NotServiceAccounts)
	ips("source IPs", m.SourceIPs)
	ips("not source IPs", m.NotSourceIPs)
	ips("destination IPs", m.DestinationIPs)
	ips("not destination IPs", m.NotDestinationIPs)
	ports("destination ports", m.DestinationPorts)
	ports("not destination ports", m.NotDestinationPorts)
	return strings.Join(parts, "; ")
}

// prefixString prints a single address without its /32 or /128.
func prefixString(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// Format renders what p becomes at L4, dropped rules and warnings included; it is what
// `nftmesh policy lint` prints.
func (p *Policy) Format() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s, %s", p.Key(), p.Action, p.scopeString())
	if p.Ignored != "" {
		b.WriteString(": IGNORED\n") // the warning says why
	} else {
		b.WriteString("\n")
		p.formatRules(&b)
	}
	for _, w := range p.Warnings {
		if w.Rule < 0 {
			fmt.Fprintf(&b, "  warning: %s\n", w.Message)
		} else {
			fmt.Fprintf(&b, "  warning: rule %d: %s\n", w.Rule, w.Message)
		}
	}
	return b.String()
}

func (p *Policy) formatRules(b *strings.Builder) {
	if len(p.Rules) == 0 {
		if p.Action == Allow {
			b.WriteString("  no rules: matches nothing, so every connection to the workloads it applies to is denied\n")
		} else {
			b.WriteString("  no rules: matches nothing, so it denies nothing\n")
		}
	}
	// Print kept and dropped rules in the order they were written.
	ri, di := 0, 0
	for ri < len(p.Rules) || di < len(p.Dropped) {
		if di < len(p.Dropped) && (ri == len(p.Rules) || p.Dropped[di].Index < p.Rules[ri].Index) {
			d := p.Dropped[di]
			fmt.Fprintf(b, "  rule %d: dropped (uses L7 fields: %s)\n", d.Index, strings.Join(d.Fields, ", "))
			di++
			continue
		}
		r := &p.Rules[ri]
		ri++
		if len(r.Clauses) == 0 {
			fmt.Fprintf(b, "  rule %d: matches every connection\n", r.Index)
			continue
		}
		fmt.Fprintf(b, "  rule %d: all of\n", r.Index)
		for _, c := range r.Clauses {
			if len(c.Matches) == 1 {
				fmt.Fprintf(b, "    %s: %s\n", c.Origin, c.Matches[0].String())
				continue
			}
			fmt.Fprintf(b, "    %s: any of\n", c.Origin)
			for i := range c.Matches {
				fmt.Fprintf(b, "      [%d] %s\n", i, c.Matches[i].String())
			}
		}
	}
}
