package policy

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// The compiled form: the same rules, with every value set prepared for a cheap,
// allocation-free test. Empty matches are dropped here (they never match), so a clause
// left without matches marks its rule as never matching.

// view is a connection with its derived attributes, computed once per decision.
type view struct {
	principal string // without "spiffe://"; "" for plaintext
	ns, sa    string // from the principal; "" when absent or not an Istio identity
	src, dst  netip.Addr
	port      uint16
}

func newView(c *Connection) view {
	v := view{src: c.SrcIP.Unmap(), dst: c.DstIP.Unmap(), port: c.DstPort}
	v.principal, v.ns, v.sa = c.Identity()
	return v
}

// strSet tests a value against StringMatches.
type strSet struct {
	presence bool
	exact    []string
	exactMap map[string]struct{} // instead of exact when there are many values
	prefix   []string
	suffix   []string
}

const linearMax = 8 // below this, a linear scan beats a map or a binary search

func newStrSet(ms []StringMatch) strSet {
	var s strSet
	for _, m := range ms {
		switch m.Kind {
		case Presence:
			s.presence = true
		case Exact:
			s.exact = append(s.exact, m.Value)
		case Prefix:
			s.prefix = append(s.prefix, m.Value)
		case Suffix:
			s.suffix = append(s.suffix, m.Value)
		}
	}
	if len(s.exact) > linearMax {
		s.exactMap = make(map[string]struct{}, len(s.exact))
		for _, e := range s.exact {
			s.exactMap[e] = struct{}{}
		}
		s.exact = nil
	}
	return s
}

func (s *strSet) has(v string) bool {
	if v == "" {
		return false // no principal or namespace: no positive match can hold
	}
	if s.presence {
		return true
	}
	if s.exactMap != nil {
		if _, ok := s.exactMap[v]; ok {
			return true
		}
	}
	for _, e := range s.exact {
		if e == v {
			return true
		}
	}
	for _, p := range s.prefix {
		if strings.HasPrefix(v, p) {
			return true
		}
	}
	for _, x := range s.suffix {
		if strings.HasSuffix(v, x) {
			return true
		}
	}
	return false
}

// saSet tests the source's namespace and service account.
type saSet []ServiceAccount

func (s saSet) has(ns, sa string) bool {
	if ns == "" {
		return false
	}
	for _, x := range s {
		if x.Name == sa && x.Namespace == ns {
			return true
		}
	}
	return false
}

// portSet is sorted and deduplicated.
type portSet []uint16

func newPortSet(ps []uint16) portSet {
	if len(ps) == 0 {
		return nil
	}
	s := slices.Clone(ps)
	slices.Sort(s)
	return slices.Compact(s)
}

func (s portSet) has(p uint16) bool {
	if len(s) <= linearMax {
		for _, x := range s {
			if x == p {
				return true
			}
		}
		return false
	}
	_, ok := slices.BinarySearch(s, p)
	return ok
}

// prefixSet tests an address against CIDRs: a linear scan for a few, and for many a
// binary search over sorted, merged address ranges (one list per family).
type prefixSet struct {
	small []netip.Prefix
	v4    []range4
	v6    []range6
}

type range4 struct{ lo, hi uint32 }
type range6 struct{ lo, hi u128 }

type u128 struct{ hi, lo uint64 }

func (a u128) less(b u128) bool { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo) }

func addr6(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func newPrefixSet(ps []netip.Prefix) prefixSet {
	var s prefixSet
	if len(ps) <= linearMax {
		for _, p := range ps {
			s.small = append(s.small, p.Masked())
		}
		return s
	}
	for _, p := range ps {
		p = p.Masked()
		if p.Addr().Is4() {
			b := p.Addr().As4()
			lo := binary.BigEndian.Uint32(b[:])
			hi := lo | uint32(uint64(1)<<(32-p.Bits())-1)
			s.v4 = append(s.v4, range4{lo, hi})
			continue
		}
		lo := addr6(p.Addr())
		hi := lo
		host := 128 - p.Bits() // bits to set in the last address
		switch {
		case host >= 64:
			hi.lo = ^uint64(0)
			if host > 64 {
				hi.hi |= uint64(1)<<(host-64) - 1
				if host == 128 {
					hi.hi = ^uint64(0)
				}
			}
		case host > 0:
			hi.lo |= uint64(1)<<host - 1
		}
		s.v6 = append(s.v6, range6{lo, hi})
	}
	slices.SortFunc(s.v4, func(a, b range4) int { return cmp.Compare(a.lo, b.lo) })
	s.v4 = mergeRanges(s.v4, func(a, b range4) (range4, bool) {
		if b.lo > a.hi && b.lo-a.hi > 1 {
			return a, false
		}
		return range4{a.lo, max(a.hi, b.hi)}, true
	})
	slices.SortFunc(s.v6, func(a, b range6) int {
		if a.lo.less(b.lo) {
			return -1
		}
		if b.lo.less(a.lo) {
			return 1
		}
		return 0
	})
	s.v6 = mergeRanges(s.v6, func(a, b range6) (range6, bool) {
		if a.hi.less(b.lo) {
			return a, false // disjoint (adjacent ranges stay apart; harmless)
		}
		if a.hi.less(b.hi) {
			a.hi = b.hi
		}
		return a, true
	})
	return s
}

// mergeRanges folds sorted ranges that overlap.
func mergeRanges[R any](rs []R, merge func(a, b R) (R, bool)) []R {
	if len(rs) == 0 {
		return rs
	}
	out := rs[:1]
	for _, r := range rs[1:] {
		if m, ok := merge(out[len(out)-1], r); ok {
			out[len(out)-1] = m
		} else {
			out = append(out, r)
		}
	}
	return out
}

func (s *prefixSet) has(a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	if s.small != nil {
		for _, p := range s.small {
			if p.Contains(a) {
				return true
			}
		}
		return false
	}
	if a.Is4() {
		b := a.As4()
		x := binary.BigEndian.Uint32(b[:])
		// The last range starting at or before x is the only one that can hold it.
		i, _ := slices.BinarySearchFunc(s.v4, x, func(r range4, x uint32) int {
			if r.lo <= x {
				return -1
			}
			return 1
		})
		return i > 0 && x <= s.v4[i-1].hi
	}
	x := addr6(a)
	i, _ := slices.BinarySearchFunc(s.v6, x, func(r range6, x u128) int {
		if !x.less(r.lo) {
			return -1
		}
		return 1
	})
	return i > 0 && !s.v6[i-1].hi.less(x)
}

// cMatch is a compiled, non-empty Match. Kinds a match does not use are nil, so a
// typical match (one or two kinds) stays small.
type cMatch struct {
	ports, notPorts           portSet
	sas, notSAs               saSet
	principals, notPrincipals *strSet
	namespaces, notNamespaces *strSet
	src, notSrc, dst, notDst  *prefixSet
}

func strSetOf(ms []StringMatch) *strSet {
	if len(ms) == 0 {
		return nil
	}
	s := newStrSet(ms)
	return &s
}

func prefixSetOf(ps []netip.Prefix) *prefixSet {
	if len(ps) == 0 {
		return nil
	}
	s := newPrefixSet(ps)
	return &s
}

func compileMatch(m *Match) cMatch {
	return cMatch{
		ports:         newPortSet(m.DestinationPorts),
		notPorts:      newPortSet(m.NotDestinationPorts),
		sas:           slices.Clip(slices.Clone(m.ServiceAccounts)),
		notSAs:        slices.Clip(slices.Clone(m.NotServiceAccounts)),
		principals:    strSetOf(m.Principals),
		notPrincipals: strSetOf(m.NotPrincipals),
		namespaces:    strSetOf(m.Namespaces),
		notNamespaces: strSetOf(m.NotNamespaces),
		src:           prefixSetOf(m.SourceIPs),
		notSrc:        prefixSetOf(m.NotSourceIPs),
		dst:           prefixSetOf(m.DestinationIPs),
		notDst:        prefixSetOf(m.NotDestinationIPs),
	}
}

// matches: every kind set must hold. Cheap, selective kinds first.
func (m *cMatch) matches(v *view) bool {
	if len(m.ports) > 0 && !m.ports.has(v.port) {
		return false
	}
	if len(m.notPorts) > 0 && m.notPorts.has(v.port) {
		return false
	}
	if m.principals != nil && !m.principals.has(v.principal) {
		return false
	}
	if m.notPrincipals != nil && m.notPrincipals.has(v.principal) {
		return false
	}
	if len(m.sas) > 0 && !m.sas.has(v.ns, v.sa) {
		return false
	}
	if len(m.notSAs) > 0 && m.notSAs.has(v.ns, v.sa) {
		return false
	}
	if m.namespaces != nil && !m.namespaces.has(v.ns) {
		return false
	}
	if m.notNamespaces != nil && m.notNamespaces.has(v.ns) {
		return false
	}
	if m.src != nil && !m.src.has(v.src) {
		return false
	}
	if m.notSrc != nil && m.notSrc.has(v.src) {
		return false
	}
	if m.dst != nil && !m.dst.has(v.dst) {
		return false
	}
	if m.notDst != nil && m.notDst.has(v.dst) {
		return false
	}
	return true
}

type cClause struct {
	matches []cMatch
	src     []*Match // the model matches, for index keys
}

type cRule struct {
	pol     *cPolicy
	index   int // spec.rules index
	clauses []cClause
	never   bool // a clause has no match left: the rule can never match
}

func (r *cRule) matches(v *view) bool {
	for i := range r.clauses {
		c := &r.clauses[i]
		ok := false
		for j := range c.matches {
			if c.matches[j].matches(v) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

type labelPair struct{ k, v string }

// cPolicy is a compiled Policy.
type cPolicy struct {
	p      *Policy
	key    string // namespace/name, kept so a Decision never allocates
	hasSel bool
	sel    []labelPair
	rules  []cRule
}

// applies reports whether the policy's selector selects a workload with these labels
// (namespace placement is the index's job).
func (c *cPolicy) applies(labels map[string]string) bool {
	if !c.hasSel {
		return true
	}
	for _, l := range c.sel {
		if v, ok := labels[l.k]; !ok || v != l.v {
			return false
		}
	}
	return true
}

// compile checks what the type system cannot (values a translator would have rejected)
// and prepares p for evaluation.
func compile(p *Policy) (*cPolicy, error) {
	if p.Name == "" || p.Namespace == "" {
		return nil, fmt.Errorf("policy %q: name and namespace are required", p.Key())
	}
	if p.Action != Allow && p.Action != Deny {
		return nil, fmt.Errorf("policy %s: invalid action %v", p.Key(), p.Action)
	}
	c := &cPolicy{p: p, key: p.Key(), hasSel: p.Scope == ScopeWorkload}
	if p.Scope > ScopeGlobal {
		return nil, fmt.Errorf("policy %s: invalid scope %v", p.Key(), p.Scope)
	}
	if p.Scope != ScopeWorkload && len(p.Selector) > 0 {
		return nil, fmt.Errorf("policy %s: a selector needs the workload scope, not %v", p.Key(), p.Scope)
	}
	for k, v := range p.Selector {
		c.sel = append(c.sel, labelPair{k, v})
	}
	slices.SortFunc(c.sel, func(a, b labelPair) int { return cmp.Compare(a.k, b.k) })
	if p.Ignored != "" {
		return c, nil
	}
	var errs []error
	c.rules = make([]cRule, len(p.Rules))
	for i := range p.Rules {
		r := &p.Rules[i]
		cr := cRule{pol: c, index: r.Index, clauses: make([]cClause, 0, len(r.Clauses))}
		for j := range r.Clauses {
			var cc cClause
			for k := range r.Clauses[j].Matches {
				m := &r.Clauses[j].Matches[k]
				if err := checkMatch(m); err != nil {
					errs = append(errs, fmt.Errorf("policy %s: rule %d: %s[%d]: %w", p.Key(), r.Index, r.Clauses[j].Origin, k, err))
				}
				if m.Empty() {
					continue
				}
				cc.matches = append(cc.matches, compileMatch(m))
				cc.src = append(cc.src, m)
			}
			if len(cc.matches) == 0 {
				cr.never = true
			}
			cr.clauses = append(cr.clauses, cc)
		}
		c.rules[i] = cr
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}

func checkMatch(m *Match) error {
	for _, ms := range [][]StringMatch{m.Principals, m.NotPrincipals, m.Namespaces, m.NotNamespaces} {
		for _, s := range ms {
			if s.Kind > Presence || (s.Kind != Presence && s.Value == "") {
				return fmt.Errorf("invalid string match %+v", s)
			}
		}
	}
	for _, ps := range [][]netip.Prefix{m.SourceIPs, m.NotSourceIPs, m.DestinationIPs, m.NotDestinationIPs} {
		for _, p := range ps {
			if !p.IsValid() {
				return fmt.Errorf("invalid prefix %v", p)
			}
		}
	}
	for _, sas := range [][]ServiceAccount{m.ServiceAccounts, m.NotServiceAccounts} {
		for _, s := range sas {
			if s.Namespace == "" || s.Name == "" {
				return fmt.Errorf("invalid service account %q", s.String())
			}
		}
	}
	return nil
}
