package policy

import (
	"net/netip"
	"slices"
)

// The index makes a decision cost only the rules that can match the connection. Every
// rule that can match at all is filed under the values of one of its clauses: a rule
// can only match when that clause does, so only when the connection's principal,
// namespace, service account, port or address hits one of the filed values. Rules with
// a clause of negative matches only (not_*) or no clause at all go to `always`. Rule ids
// follow evaluation order, and every list is sorted, so scanning stops at the first
// match that beats the best one found so far: the result is the first matching rule in
// evaluation order, exactly what a linear scan would report.

type ids []int32

func (l ids) add(id int32) ids {
	if n := len(l); n > 0 && l[n-1] == id {
		return l // a rule filed twice under one value
	}
	return append(l, id)
}

// strIndex files rules under string matches; prefixes and suffixes are looked up once
// per distinct length, which stays small in practice.
type strIndex struct {
	exact      map[string]ids
	prefix     map[string]ids
	prefixLens []int
	suffix     map[string]ids
	suffixLens []int
	presence   ids
}

func (x *strIndex) add(m StringMatch, id int32) {
	put := func(mp *map[string]ids, k string) {
		if *mp == nil {
			*mp = map[string]ids{}
		}
		(*mp)[k] = (*mp)[k].add(id)
	}
	switch m.Kind {
	case Exact:
		put(&x.exact, m.Value)
	case Prefix:
		put(&x.prefix, m.Value)
	case Suffix:
		put(&x.suffix, m.Value)
	case Presence:
		x.presence = x.presence.add(id)
	}
}

func keyLens(m map[string]ids) []int {
	var ls []int
	for k := range m {
		ls = append(ls, len(k))
	}
	slices.Sort(ls)
	return slices.Compact(ls)
}

func (x *strIndex) finish() {
	x.prefixLens = keyLens(x.prefix)
	x.suffixLens = keyLens(x.suffix)
}

func (x *strIndex) scan(s string, sc *scanner) {
	if s == "" {
		return // no positive string match holds for an absent value
	}
	sc.scan(x.exact[s])
	for _, l := range x.prefixLens {
		if l > len(s) {
			break
		}
		sc.scan(x.prefix[s[:l]])
	}
	for _, l := range x.suffixLens {
		if l > len(s) {
			break
		}
		sc.scan(x.suffix[s[len(s)-l:]])
	}
	sc.scan(x.presence)
}

// ipIndex files rules under masked CIDRs; an address is looked up once per distinct
// prefix length of its family.
type ipIndex struct {
	m            map[netip.Prefix]ids
	lens4, lens6 []int
}

func (x *ipIndex) add(p netip.Prefix, id int32) {
	if x.m == nil {
		x.m = map[netip.Prefix]ids{}
	}
	p = p.Masked()
	x.m[p] = x.m[p].add(id)
}

func (x *ipIndex) finish() {
	for p := range x.m {
		if p.Addr().Is4() {
			x.lens4 = append(x.lens4, p.Bits())
		} else {
			x.lens6 = append(x.lens6, p.Bits())
		}
	}
	slices.Sort(x.lens4)
	x.lens4 = slices.Compact(x.lens4)
	slices.Sort(x.lens6)
	x.lens6 = slices.Compact(x.lens6)
}

func (x *ipIndex) scan(a netip.Addr, sc *scanner) {
	if !a.IsValid() || x.m == nil {
		return
	}
	lens := x.lens6
	if a.Is4() {
		lens = x.lens4
	}
	for _, l := range lens {
		p, _ := a.Prefix(l)
		sc.scan(x.m[p])
	}
}

// ruleSet indexes the rules of one action in one namespace.
type ruleSet struct {
	rules      []*cRule // by id, in evaluation order
	always     ids
	principals strIndex
	namespaces strIndex
	sas        map[ServiceAccount]ids
	ports      map[uint16]ids
	src, dst   ipIndex
}

// scanner walks candidate lists, keeping the smallest matching id.
type scanner struct {
	rs     *ruleSet
	v      *view
	labels map[string]string
	best   int32
}

func (sc *scanner) scan(l ids) {
	for _, id := range l {
		if id >= sc.best {
			return
		}
		r := sc.rs.rules[id]
		if r.pol.applies(sc.labels) && r.matches(sc.v) {
			sc.best = id
			return
		}
	}
}

// first returns the first rule, in evaluation order, that matches and whose policy
// selects the workload; nil if none.
func (rs *ruleSet) first(v *view, labels map[string]string) *cRule {
	if len(rs.rules) == 0 {
		return nil
	}
	sc := scanner{rs: rs, v: v, labels: labels, best: int32(len(rs.rules))}
	sc.scan(rs.always)
	rs.principals.scan(v.principal, &sc)
	rs.namespaces.scan(v.ns, &sc)
	if v.ns != "" {
		sc.scan(rs.sas[ServiceAccount{Namespace: v.ns, Name: v.sa}])
	}
	sc.scan(rs.ports[v.port])
	rs.src.scan(v.src, &sc)
	rs.dst.scan(v.dst, &sc)
	if int(sc.best) == len(rs.rules) {
		return nil
	}
	return rs.rules[sc.best]
}

// Index kinds, and the cost of filing under one value of each: a guess at how many
// connections share that value (an exact principal is nearly unique, a port is shared
// by everything on it).
const (
	kPrincipal = iota
	kServiceAccount
	kNamespace
	kSourceIP
	kDestinationIP
	kPort
	kNone
)

func strCost(ms []StringMatch, exact, affix, presence int) int {
	c := 0
	for _, m := range ms {
		switch m.Kind {
		case Exact:
			c += exact
		case Presence:
			c += presence
		default:
			c += affix
		}
	}
	return c
}

// matchKey picks the kind to file a match under, and its cost; kNone when the match has
// only negative kinds.
func matchKey(m *Match) (kind, cost int) {
	kind, cost = kNone, 0
	try := func(k, c int) {
		if c > 0 && (kind == kNone || c < cost) {
			kind, cost = k, c
		}
	}
	try(kPrincipal, strCost(m.Principals, 1, 2, 50))
	try(kServiceAccount, len(m.ServiceAccounts))
	try(kNamespace, strCost(m.Namespaces, 3, 6, 60))
	try(kSourceIP, 3*len(m.SourceIPs))
	try(kDestinationIP, 20*len(m.DestinationIPs))
	try(kPort, 30*len(m.DestinationPorts))
	return kind, cost
}

func (rs *ruleSet) file(m *Match, kind int, id int32) {
	switch kind {
	case kPrincipal:
		for _, s := range m.Principals {
			rs.principals.add(s, id)
		}
	case kServiceAccount:
		if rs.sas == nil {
			rs.sas = map[ServiceAccount]ids{}
		}
		for _, s := range m.ServiceAccounts {
			rs.sas[s] = rs.sas[s].add(id)
		}
	case kNamespace:
		for _, s := range m.Namespaces {
			rs.namespaces.add(s, id)
		}
	case kSourceIP:
		for _, p := range m.SourceIPs {
			rs.src.add(p, id)
		}
	case kDestinationIP:
		for _, p := range m.DestinationIPs {
			rs.dst.add(p, id)
		}
	case kPort:
		if rs.ports == nil {
			rs.ports = map[uint16]ids{}
		}
		for _, p := range m.DestinationPorts {
			rs.ports[p] = rs.ports[p].add(id)
		}
	}
}

// add files r under its cheapest clause; rules that can never match are left out.
func (rs *ruleSet) add(r *cRule) {
	if r.never {
		return
	}
	id := int32(len(rs.rules))
	rs.rules = append(rs.rules, r)
	best, bestCost := -1, 0
	for i := range r.clauses {
		c, ok := 0, true
		for _, m := range r.clauses[i].src {
			k, mc := matchKey(m)
			if k == kNone {
				ok = false
				break
			}
			c += mc
		}
		if ok && (best < 0 || c < bestCost) {
			best, bestCost = i, c
		}
	}
	if best < 0 {
		rs.always = rs.always.add(id)
		return
	}
	for _, m := range r.clauses[best].src {
		k, _ := matchKey(m)
		rs.file(m, k, id)
	}
}

func (rs *ruleSet) finish() {
	rs.principals.finish()
	rs.namespaces.finish()
	rs.src.finish()
	rs.dst.finish()
}

// nsIndex is everything a decision needs from one namespace's policies.
type nsIndex struct {
	deny, allow ruleSet
	// allowAll: an ALLOW policy applies to every workload (no selector, or an empty one).
	allowAll bool
	// allowBySel files selector ALLOW policies under their first label, so finding
	// whether any applies costs a lookup per workload label.
	allowBySel map[labelPair][]*cPolicy
}

// buildIndex indexes enforced policies, given in evaluation order (by name).
func buildIndex(pols []*cPolicy) *nsIndex {
	x := &nsIndex{}
	for _, p := range pols {
		if p.p.Ignored != "" {
			continue
		}
		rs := &x.deny
		if p.p.Action == Allow {
			rs = &x.allow
			if len(p.sel) == 0 {
				x.allowAll = true
			} else {
				if x.allowBySel == nil {
					x.allowBySel = map[labelPair][]*cPolicy{}
				}
				x.allowBySel[p.sel[0]] = append(x.allowBySel[p.sel[0]], p)
			}
		}
		for i := range p.rules {
			rs.add(&p.rules[i])
		}
	}
	x.deny.finish()
	x.allow.finish()
	return x
}

func (x *nsIndex) firstDeny(v *view, labels map[string]string) *cRule {
	if x == nil {
		return nil
	}
	return x.deny.first(v, labels)
}

func (x *nsIndex) firstAllow(v *view, labels map[string]string) *cRule {
	if x == nil {
		return nil
	}
	return x.allow.first(v, labels)
}

// allowApplies reports whether any ALLOW policy here selects the workload.
func (x *nsIndex) allowApplies(labels map[string]string) bool {
	if x == nil {
		return false
	}
	if x.allowAll {
		return true
	}
	if len(x.allowBySel) == 0 {
		return false
	}
	for k, v := range labels {
		for _, p := range x.allowBySel[labelPair{k, v}] {
			if p.applies(labels) {
				return true
			}
		}
	}
	return false
}
