package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Explain evaluates like Decide, but on the policies as written rather than on the
// index, and records every step: which policies apply, and for each rule which clause
// and match held or why not. It allocates; it is for people (and for tests, which check
// that it always agrees with Decide).

// Explanation is the decision with the path that led to it.
type Explanation struct {
	Decision      Decision
	Connection    Connection
	Workload      Workload
	RootNamespace string
	Deny, Allow   []PolicyTrace // applicable policies, in evaluation order
	NotApplicable []Skipped     // in the root or the workload's namespace, selector does not match
	Ignored       []Skipped     // targetRef, AUDIT, CUSTOM
}

// Skipped is a policy that took no part, and why.
type Skipped struct {
	Policy *Policy
	Reason string
}

// PolicyTrace is one applicable policy's evaluation.
type PolicyTrace struct {
	Policy  *Policy
	Matched bool
	Rule    int // index of the first matching rule, or -1
	Rules   []RuleTrace
}

// RuleTrace is one rule's evaluation; Dropped rules are listed too (they never match).
type RuleTrace struct {
	Index   int
	Matched bool
	Dropped []string // the L7 fields it was dropped for
	Clauses []ClauseTrace
}

// ClauseTrace says which match held (Match >= 0) or why each failed.
type ClauseTrace struct {
	Origin  string
	Matched bool
	Match   int    // index of the first match that held, -1 if none
	Detail  string // the holding match, or why each failed
}

// Explain evaluates c against the policies that apply to w and records the path.
func (s *Snapshot) Explain(c Connection, w Workload) *Explanation {
	v := newView(&c)
	e := &Explanation{Connection: c, Workload: w, RootNamespace: s.root}
	root, local := s.namespaces(w.Namespace)
	for _, st := range []*nsState{root, local} {
		if st == nil {
			continue
		}
		for _, cp := range st.pols {
			p := cp.p
			switch {
			case p.Ignored != "":
				e.Ignored = append(e.Ignored, Skipped{p, p.Ignored})
			case !selects(p, w.Labels):
				e.NotApplicable = append(e.NotApplicable, Skipped{p, "selector " + selectorString(p.Selector) + " does not match the workload's labels"})
			case p.Action == Deny:
				e.Deny = append(e.Deny, tracePolicy(p, &v))
			default:
				e.Allow = append(e.Allow, tracePolicy(p, &v))
			}
		}
	}
	e.Decision = Decision{Allow: false, RuleIndex: -1, Reason: ReasonNoAllowMatched}
	switch {
	case firstMatched(e.Deny) >= 0:
		t := e.Deny[firstMatched(e.Deny)]
		e.Decision = Decision{Allow: false, Policy: t.Policy.Key(), RuleIndex: t.Rule, Reason: ReasonDenyMatched}
	case len(e.Allow) == 0:
		e.Decision = Decision{Allow: true, RuleIndex: -1, Reason: ReasonNoAllowPolicy}
	case firstMatched(e.Allow) >= 0:
		t := e.Allow[firstMatched(e.Allow)]
		e.Decision = Decision{Allow: true, Policy: t.Policy.Key(), RuleIndex: t.Rule, Reason: ReasonAllowMatched}
	}
	return e
}

func firstMatched(ts []PolicyTrace) int {
	return slices.IndexFunc(ts, func(t PolicyTrace) bool { return t.Matched })
}

// selects: a policy without selector applies to the whole namespace; one with a
// selector to workloads whose labels hold every selector label.
func selects(p *Policy, labels map[string]string) bool {
	if p.Scope != ScopeWorkload {
		return true
	}
	for k, want := range p.Selector {
		if got, ok := labels[k]; !ok || got != want {
			return false
		}
	}
	return true
}

func tracePolicy(p *Policy, v *view) PolicyTrace {
	t := PolicyTrace{Policy: p, Rule: -1}
	ri, di := 0, 0
	for ri < len(p.Rules) || di < len(p.Dropped) {
		if di < len(p.Dropped) && (ri == len(p.Rules) || p.Dropped[di].Index < p.Rules[ri].Index) {
			t.Rules = append(t.Rules, RuleTrace{Index: p.Dropped[di].Index, Dropped: p.Dropped[di].Fields})
			di++
			continue
		}
		rt := traceRule(&p.Rules[ri], v)
		ri++
		if rt.Matched && !t.Matched {
			t.Matched, t.Rule = true, rt.Index
		}
		t.Rules = append(t.Rules, rt)
	}
	return t
}

func traceRule(r *Rule, v *view) RuleTrace {
	rt := RuleTrace{Index: r.Index, Matched: true}
	for _, c := range r.Clauses {
		ct := ClauseTrace{Origin: c.Origin, Match: -1}
		var why []string
		for i := range c.Matches {
			ok, detail := explainMatch(&c.Matches[i], v)
			if ok {
				ct.Matched, ct.Match, ct.Detail = true, i, c.Matches[i].String()
				break
			}
			if len(c.Matches) > 1 {
				detail = "[" + strconv.Itoa(i) + "] " + detail
			}
			why = append(why, detail)
		}
		if !ct.Matched {
			ct.Detail = strings.Join(why, "; ")
			rt.Matched = false
		}
		rt.Clauses = append(rt.Clauses, ct)
	}
	return rt
}

// explainMatch evaluates m straight from its definition and says why it failed.
func explainMatch(m *Match, v *view) (bool, string) {
	if m.Empty() {
		return false, "nothing left at L4, never matches"
	}
	if len(m.DestinationPorts) > 0 && !slices.Contains(m.DestinationPorts, v.port) {
		return false, fmt.Sprintf("destination port %d is not in %s", v.port, portList(m.DestinationPorts))
	}
	if slices.Contains(m.NotDestinationPorts, v.port) {
		return false, fmt.Sprintf("destination port %d is excluded by not ports %s", v.port, portList(m.NotDestinationPorts))
	}
	if len(m.Principals) > 0 && !anyString(m.Principals, v.principal) {
		if v.principal == "" {
			return false, "plaintext: no principal to match principals " + stringList(m.Principals)
		}
		return false, fmt.Sprintf("principal %s matches none of %s", v.principal, stringList(m.Principals))
	}
	if anyString(m.NotPrincipals, v.principal) {
		return false, fmt.Sprintf("principal %s is excluded by not principals %s", v.principal, stringList(m.NotPrincipals))
	}
	if len(m.ServiceAccounts) > 0 && !anySA(m.ServiceAccounts, v) {
		if v.ns == "" {
			return false, "no service account (plaintext or not an Istio identity) to match service accounts " + saList(m.ServiceAccounts)
		}
		return false, fmt.Sprintf("service account %s/%s is not one of %s", v.ns, v.sa, saList(m.ServiceAccounts))
	}
	if anySA(m.NotServiceAccounts, v) {
		return false, fmt.Sprintf("service account %s/%s is excluded by not service accounts %s", v.ns, v.sa, saList(m.NotServiceAccounts))
	}
	if len(m.Namespaces) > 0 && !anyString(m.Namespaces, v.ns) {
		if v.ns == "" {
			return false, "no source namespace (plaintext or not an Istio identity) to match namespaces " + stringList(m.Namespaces)
		}
		return false, fmt.Sprintf("namespace %s matches none of %s", v.ns, stringList(m.Namespaces))
	}
	if anyString(m.NotNamespaces, v.ns) {
		return false, fmt.Sprintf("namespace %s is excluded by not namespaces %s", v.ns, stringList(m.NotNamespaces))
	}
	if len(m.SourceIPs) > 0 && !anyPrefix(m.SourceIPs, v.src) {
		return false, fmt.Sprintf("source IP %s is in none of %s", addrString(v.src), prefixList(m.SourceIPs))
	}
	if anyPrefix(m.NotSourceIPs, v.src) {
		return false, fmt.Sprintf("source IP %s is excluded by not source IPs %s", v.src, prefixList(m.NotSourceIPs))
	}
	if len(m.DestinationIPs) > 0 && !anyPrefix(m.DestinationIPs, v.dst) {
		return false, fmt.Sprintf("destination IP %s is in none of %s", addrString(v.dst), prefixList(m.DestinationIPs))
	}
	if anyPrefix(m.NotDestinationIPs, v.dst) {
		return false, fmt.Sprintf("destination IP %s is excluded by not destination IPs %s", v.dst, prefixList(m.NotDestinationIPs))
	}
	return true, ""
}

func anyString(ms []StringMatch, s string) bool {
	return slices.ContainsFunc(ms, func(m StringMatch) bool { return m.Matches(s) })
}

func anySA(sas []ServiceAccount, v *view) bool {
	return v.ns != "" && slices.Contains(sas, ServiceAccount{Namespace: v.ns, Name: v.sa})
}

func anyPrefix(ps []netip.Prefix, a netip.Addr) bool {
	return a.IsValid() && slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) })
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return "(unspecified)"
	}
	return a.String()
}

func stringList(ms []StringMatch) string {
	s := make([]string, len(ms))
	for i, m := range ms {
		s[i] = m.String()
	}
	return strings.Join(s, ", ")
}

func saList(sas []ServiceAccount) string {
	s := make([]string, len(sas))
	for i, x := range sas {
		s[i] = x.String()
	}
	return strings.Join(s, ", ")
}

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = prefixString(p)
	}
	return strings.Join(s, ", ")
}

func portList(ps []uint16) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = strconv.Itoa(int(p))
	}
	return strings.Join(s, ", ")
}

// Format renders the explanation: the decision first, then the path.
func (e *Explanation) Format() string {
	var b strings.Builder
	fmt.Fprintf(&b, "decision: %s\n", e.Decision)
	fmt.Fprintf(&b, "connection: %s\n", e.Connection)
	labels := "no labels"
	if len(e.Workload.Labels) > 0 {
		labels = "labels " + selectorString(e.Workload.Labels)
	}
	fmt.Fprintf(&b, "workload: namespace %s, %s (root namespace %s)\n", e.Workload.Namespace, labels, e.RootNamespace)
	b.WriteString("path:\n")
	step := 1
	line := func(format string, args ...any) {
		fmt.Fprintf(&b, "  %d. "+format+"\n", append([]any{step}, args...)...)
		step++
	}
	if len(e.Deny) == 0 {
		line("DENY policies: none apply")
	}
	decided := false
	for _, t := range e.Deny {
		e.formatPolicy(&b, &step, t, !decided)
		if t.Matched && !decided {
			decided = true
		}
	}
	if decided {
		if len(e.Allow) > 0 {
			line("ALLOW policies (%d apply) are not consulted: a DENY policy matched", len(e.Allow))
		}
	} else if len(e.Allow) == 0 {
		line("ALLOW policies: none apply, so the connection is allowed")
	} else {
		for _, t := range e.Allow {
			e.formatPolicy(&b, &step, t, !decided)
			if t.Matched && !decided {
				decided = true
			}
		}
		if !decided {
			line("no ALLOW policy matched, so the connection is denied")
		}
	}
	for _, s := range e.NotApplicable {
		fmt.Fprintf(&b, "not applicable: %s %s: %s\n", s.Policy.Action, s.Policy.Key(), s.Reason)
	}
	for _, s := range e.Ignored {
		fmt.Fprintf(&b, "ignored: %s: %s\n", s.Policy.Key(), s.Reason)
	}
	return b.String()
}

func (e *Explanation) formatPolicy(b *strings.Builder, step *int, t PolicyTrace, deciding bool) {
	p := t.Policy
	verdict := "no rule matched"
	if len(t.Rules) == 0 {
		verdict = "no rules, matches nothing"
	}
	if t.Matched {
		verdict = fmt.Sprintf("rule %d matched", t.Rule)
		if deciding {
			verdict += " -> " + strings.ToLower(p.Action.String())
		}
	}
	fmt.Fprintf(b, "  %d. %s %s (%s): %s\n", *step, p.Action, p.Key(), p.scopeString(), verdict)
	*step++
	for _, r := range t.Rules {
		switch {
		case r.Dropped != nil:
			fmt.Fprintf(b, "       rule %d: dropped at L4 (uses %s), never matches\n", r.Index, strings.Join(r.Dropped, ", "))
			continue
		case len(r.Clauses) == 0:
			fmt.Fprintf(b, "       rule %d: matched (no conditions: matches every connection)\n", r.Index)
			continue
		case r.Matched:
			fmt.Fprintf(b, "       rule %d: matched\n", r.Index)
		default:
			fmt.Fprintf(b, "       rule %d: no match\n", r.Index)
		}
		for _, c := range r.Clauses {
			if c.Matched {
				fmt.Fprintf(b, "         %s: matched by [%d] %s\n", c.Origin, c.Match, c.Detail)
			} else {
				fmt.Fprintf(b, "         %s: no match: %s\n", c.Origin, c.Detail)
			}
		}
	}
}
