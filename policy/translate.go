package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	apiv1beta1 "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Options configure translation and the store.
type Options struct {
	// RootNamespace holds mesh-wide policies; default istio-system.
	RootNamespace string
	// DefaultNamespace is used for objects without metadata.namespace, as kubectl
	// would; default "default".
	DefaultNamespace string
}

func (o Options) rootNamespace() string {
	if o.RootNamespace == "" {
		return DefaultRootNamespace
	}
	return o.RootNamespace
}

func (o Options) defaultNamespace() string {
	if o.DefaultNamespace == "" {
		return "default"
	}
	return o.DefaultNamespace
}

// FieldError is an invalid field of one object.
type FieldError struct {
	Object string // "AuthorizationPolicy namespace/name"
	Field  string // "spec.rules[0].from[0].source.ipBlocks[1]"
	Detail string
}

func (e *FieldError) Error() string { return e.Object + ": " + e.Field + ": " + e.Detail }

// FromV1 translates a security.istio.io/v1 AuthorizationPolicy. An invalid policy (what
// Istio's validation would refuse) is an error naming the object and the field.
func FromV1(ap *securityv1.AuthorizationPolicy, opts Options) (*Policy, error) {
	if ap == nil {
		return nil, errors.New("nil AuthorizationPolicy")
	}
	return translate(&ap.ObjectMeta, &ap.Spec, opts)
}

// FromV1beta1 translates a security.istio.io/v1beta1 AuthorizationPolicy (the same
// spec as v1).
func FromV1beta1(ap *securityv1beta1.AuthorizationPolicy, opts Options) (*Policy, error) {
	if ap == nil {
		return nil, errors.New("nil AuthorizationPolicy")
	}
	return translate(&ap.ObjectMeta, &ap.Spec, opts)
}

// The `when` keys the node proxy enforces; every other valid key is L7.
var l4WhenKeys = []string{"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}

type translator struct {
	p    *Policy
	obj  string
	errs []error
}

func (t *translator) errf(field, format string, args ...any) {
	t.errs = append(t.errs, &FieldError{Object: t.obj, Field: field, Detail: fmt.Sprintf(format, args...)})
}

func (t *translator) warn(rule int, format string, args ...any) {
	t.p.Warnings = append(t.p.Warnings, Warning{Policy: t.p.Key(), Rule: rule, Message: fmt.Sprintf(format, args...)})
}

func translate(meta *metav1.ObjectMeta, spec *apiv1beta1.AuthorizationPolicy, opts Options) (*Policy, error) {
	ns := meta.Namespace
	if ns == "" {
		ns = opts.defaultNamespace()
	}
	t := &translator{
		p:   &Policy{Name: meta.Name, Namespace: ns},
		obj: "AuthorizationPolicy " + ns + "/" + meta.Name,
	}
	if meta.Name == "" {
		t.errf("metadata.name", "required")
	}
	t.validate(spec)
	if len(t.errs) > 0 {
		return nil, errors.Join(t.errs...)
	}
	p := t.p
	root := opts.rootNamespace()
	if sel := spec.GetSelector(); sel != nil {
		p.Selector = map[string]string{}
		for k, v := range sel.GetMatchLabels() {
			p.Selector[k] = v
		}
		if len(p.Selector) == 0 {
			where := "namespace " + ns
			if ns == root {
				where = "the mesh (root namespace)"
			}
			t.warn(-1, "the selector has no labels, so the policy applies to every workload in %s", where)
		}
	}
	p.Scope = scopeOf(ns, spec.GetSelector() != nil, root)
	switch spec.GetAction() {
	case apiv1beta1.AuthorizationPolicy_ALLOW:
		p.Action = Allow
	case apiv1beta1.AuthorizationPolicy_DENY:
		p.Action = Deny
	default:
		p.Ignored = fmt.Sprintf("action %s is not enforced by the node proxy", spec.GetAction())
	}
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		p.Ignored = "targetRef binds it to a waypoint or gateway (an L7 proxy), not to the node proxy"
	}
	if p.Ignored != "" {
		t.warn(-1, "ignored: %s", p.Ignored)
		return p, nil
	}
	for i, r := range spec.GetRules() {
		t.rule(i, r)
	}
	if p.Action == Allow && len(p.Rules) == 0 && len(p.Dropped) > 0 {
		t.warn(-1, "no rule is left at L4, so this ALLOW policy denies every connection to the workloads it applies to")
	}
	return p, nil
}

// validate mirrors Istio's validation of AuthorizationPolicy, so that what the API
// server would refuse is refused here too, with the field's path.
func (t *translator) validate(spec *apiv1beta1.AuthorizationPolicy) {
	n := 0
	if spec.GetSelector() != nil {
		n++
	}
	if spec.GetTargetRef() != nil {
		n++
	}
	if len(spec.GetTargetRefs()) > 0 {
		n++
	}
	if n > 1 {
		t.errf("spec", "only one of selector, targetRef and targetRefs may be set")
	}
	if r := spec.GetTargetRef(); r != nil && r.GetName() == "" {
		t.errf("spec.targetRef.name", "required")
	}
	for i, r := range spec.GetTargetRefs() {
		if r.GetName() == "" {
			t.errf(fmt.Sprintf("spec.targetRefs[%d].name", i), "required")
		}
	}
	for _, k := range sortedKeys(spec.GetSelector().GetMatchLabels()) {
		v := spec.GetSelector().GetMatchLabels()[k]
		switch {
		case k == "":
			t.errf("spec.selector.matchLabels", "empty label key")
		case strings.Contains(k, "*") || strings.Contains(v, "*"):
			t.errf("spec.selector.matchLabels."+k, "wildcards are not supported in selectors (%s=%s)", k, v)
		}
	}
	action := spec.GetAction()
	if spec.GetProvider() != nil && action != apiv1beta1.AuthorizationPolicy_CUSTOM {
		t.errf("spec.provider", "only allowed with action CUSTOM, not %s", action)
	}
	if action == apiv1beta1.AuthorizationPolicy_CUSTOM && spec.GetProvider().GetName() == "" {
		t.errf("spec.provider.name", "required with action CUSTOM")
	}
	if (action == apiv1beta1.AuthorizationPolicy_DENY || action == apiv1beta1.AuthorizationPolicy_CUSTOM) && spec.GetRules() == nil {
		t.errf("spec.rules", "a %s policy without rules never matches; write `rules: [{}]` to match every connection", action)
	}
	for i, r := range spec.GetRules() {
		path := fmt.Sprintf("spec.rules[%d]", i)
		if r == nil {
			t.errf(path, "must not be null")
			continue
		}
		for j, f := range r.GetFrom() {
			fp := fmt.Sprintf("%s.from[%d]", path, j)
			if f == nil || f.GetSource() == nil {
				t.errf(fp+".source", "required")
				continue
			}
			t.validateSource(fp+".source", f.GetSource())
		}
		for j, to := range r.GetTo() {
			tp := fmt.Sprintf("%s.to[%d]", path, j)
			if to == nil || to.GetOperation() == nil {
				t.errf(tp+".operation", "required")
				continue
			}
			op := to.GetOperation()
			if len(op.Ports)+len(op.NotPorts)+len(op.Methods)+len(op.NotMethods)+len(op.Paths)+len(op.NotPaths)+len(op.Hosts)+len(op.NotHosts) == 0 {
				t.errf(tp+".operation", "must not be empty")
			}
			t.ports(tp+".operation.ports", op.Ports)
			t.ports(tp+".operation.notPorts", op.NotPorts)
			t.nonEmpty(tp+".operation.hosts", op.Hosts)
			t.nonEmpty(tp+".operation.notHosts", op.NotHosts)
			t.nonEmpty(tp+".operation.methods", op.Methods)
			t.nonEmpty(tp+".operation.notMethods", op.NotMethods)
			t.nonEmpty(tp+".operation.paths", op.Paths)
			t.nonEmpty(tp+".operation.notPaths", op.NotPaths)
		}
		for j, c := range r.GetWhen() {
			t.validateCondition(fmt.Sprintf("%s.when[%d]", path, j), c)
		}
	}
}

func (t *translator) validateSource(path string, s *apiv1beta1.Source) {
	if len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces)+len(s.ServiceAccounts)+len(s.NotServiceAccounts)+
		len(s.IpBlocks)+len(s.NotIpBlocks)+len(s.RemoteIpBlocks)+len(s.NotRemoteIpBlocks)+len(s.RequestPrincipals)+len(s.NotRequestPrincipals) == 0 {
		t.errf(path, "must not be empty")
	}
	if len(s.ServiceAccounts)+len(s.NotServiceAccounts) > 0 && len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces) > 0 {
		t.errf(path, "serviceAccounts cannot be set with namespaces or principals")
	}
	t.ips(path+".ipBlocks", s.IpBlocks)
	t.ips(path+".notIpBlocks", s.NotIpBlocks)
	t.ips(path+".remoteIpBlocks", s.RemoteIpBlocks)
	t.ips(path+".notRemoteIpBlocks", s.NotRemoteIpBlocks)
	t.serviceAccounts(path+".serviceAccounts", s.ServiceAccounts)
	t.serviceAccounts(path+".notServiceAccounts", s.NotServiceAccounts)
	t.nonEmpty(path+".principals", s.Principals)
	t.nonEmpty(path+".notPrincipals", s.NotPrincipals)
	t.nonEmpty(path+".namespaces", s.Namespaces)
	t.nonEmpty(path+".notNamespaces", s.NotNamespaces)
	t.nonEmpty(path+".requestPrincipals", s.RequestPrincipals)
	t.nonEmpty(path+".notRequestPrincipals", s.NotRequestPrincipals)
	t.nonEmpty(path+".trustDomains", s.TrustDomains)
	t.nonEmpty(path+".notTrustDomains", s.NotTrustDomains)
}

func (t *translator) validateCondition(path string, c *apiv1beta1.Condition) {
	if c == nil {
		t.errf(path, "must not be null")
		return
	}
	key := c.GetKey()
	if key == "" {
		t.errf(path+".key", "required")
		return
	}
	if len(c.Values) == 0 && len(c.NotValues) == 0 {
		t.errf(path, "at least one of values and notValues must be set for key %s", key)
		return
	}
	for _, f := range []struct {
		name string
		vs   []string
	}{{"values", c.Values}, {"notValues", c.NotValues}} {
		fp := path + "." + f.name
		t.nonEmpty(fp, f.vs)
		switch {
		case key == "source.ip" || key == "remote.ip" || key == "destination.ip":
			t.ips(fp, f.vs)
		case key == "destination.port":
			t.ports(fp, f.vs)
		case key == "source.serviceAccount":
			t.serviceAccounts(fp, f.vs)
		case key == "source.namespace", key == "source.principal", key == "request.auth.principal",
			key == "request.auth.audiences", key == "request.auth.presenter", key == "connection.sni":
		case strings.HasPrefix(key, "request.headers"), strings.HasPrefix(key, "request.experimental.inline.headers"),
			strings.HasPrefix(key, "request.auth.claims"), strings.HasPrefix(key, "experimental.envoy.filters."):
			if open := strings.Index(key, "["); !strings.HasSuffix(key, "]") || open <= 0 || open >= len(key)-2 {
				t.errf(path+".key", "%q should have the form name[key]", key)
				return
			}
		case key == "destination.namespace":
			t.errf(path+".key", "%s is replaced by the policy's metadata.namespace", key)
			return
		case strings.HasPrefix(key, "destination.labels"):
			t.errf(path+".key", "%s is replaced by the workload selector", key)
			return
		default:
			t.errf(path+".key", "unknown attribute %q", key)
			return
		}
	}
}

func (t *translator) nonEmpty(path string, vs []string) {
	for i, v := range vs {
		if v == "" {
			t.errf(fmt.Sprintf("%s[%d]", path, i), "empty value")
		}
	}
}

func (t *translator) ips(path string, vs []string) {
	for i, v := range vs {
		if _, err := parseIP(v); err != nil {
			t.errf(fmt.Sprintf("%s[%d]", path, i), "%v", err)
		}
	}
}

func (t *translator) ports(path string, vs []string) {
	for i, v := range vs {
		if _, err := parsePort(v); err != nil {
			t.errf(fmt.Sprintf("%s[%d]", path, i), "%v", err)
		}
	}
}

func (t *translator) serviceAccounts(path string, vs []string) {
	if len(vs) > 16 {
		t.errf(path, "at most 16 values, found %d", len(vs))
	}
	for i, v := range vs {
		fp := fmt.Sprintf("%s[%d]", path, i)
		ns, sa, hasNS := strings.Cut(v, "/")
		switch {
		case v == "":
			t.errf(fp, "empty value")
		case strings.Contains(v, "*"):
			t.errf(fp, "%q: wildcards are not allowed", v)
		case len(v) > 320:
			t.errf(fp, "longer than 320 characters")
		case strings.Count(v, "/") > 1 || (hasNS && (ns == "" || sa == "")):
			t.errf(fp, "%q: want serviceAccount or namespace/serviceAccount", v)
		}
	}
}

// parseIP reads "10.0.0.1" as a /32 (or /128) and "10.0.0.0/8" as is.
func parseIP(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, fmt.Errorf("bad CIDR %q", s)
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("bad IP address %q", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func parsePort(s string) (uint16, error) {
	p, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("bad port %q (want 0-65535)", s)
	}
	return uint16(p), nil
}

// The L7 fields of a source and an operation, in the order Istio's docs list them.
func sourceL7(s *apiv1beta1.Source) []string {
	var f []string
	for _, x := range []struct {
		name string
		n    int
	}{
		{"requestPrincipals", len(s.RequestPrincipals)}, {"notRequestPrincipals", len(s.NotRequestPrincipals)},
		{"remoteIpBlocks", len(s.RemoteIpBlocks)}, {"notRemoteIpBlocks", len(s.NotRemoteIpBlocks)},
		// Not L7, but not in the node proxy's L4 model either (docs/authorization.md#the-l4-model):
		// treated like L7, so an ALLOW fails closed instead of matching more than written.
		{"trustDomains", len(s.TrustDomains)}, {"notTrustDomains", len(s.NotTrustDomains)},
	} {
		if x.n > 0 {
			f = append(f, x.name)
		}
	}
	return f
}

func operationL7(o *apiv1beta1.Operation) []string {
	var f []string
	for _, x := range []struct {
		name string
		n    int
	}{
		{"hosts", len(o.Hosts)}, {"notHosts", len(o.NotHosts)}, {"methods", len(o.Methods)},
		{"notMethods", len(o.NotMethods)}, {"paths", len(o.Paths)}, {"notPaths", len(o.NotPaths)},
	} {
		if x.n > 0 {
			f = append(f, x.name)
		}
	}
	return f
}

func prefixed(prefix string, fields []string) []string {
	out := make([]string, len(fields))
	for i, f := range fields {
		out[i] = prefix + f
	}
	return out
}

// rule translates spec.rules[i]: one clause for all `from` sources, one for all `to`
// operations, one per `when` condition. L7 fields are removed from each match; an ALLOW
// rule that had any is dropped whole (fail closed); in a DENY rule the L4 part stays
// and an L7-only match is left empty, which never matches.
func (t *translator) rule(i int, r *apiv1beta1.Rule) {
	p := t.p
	rule := Rule{Index: i}
	var l7 []string      // every L7 field of the rule, for the ALLOW case
	var partial []string // DENY: matches that lost L7 fields but kept L4 ones
	var emptied []string // DENY: matches left with nothing
	var odd []string     // values that can never match (or never exclude) a connection

	if len(r.GetFrom()) > 0 {
		c := Clause{Origin: "from"}
		for j, f := range r.GetFrom() {
			s := f.GetSource()
			m := Match{
				Principals:         t.stringMatches(i, s.Principals),
				NotPrincipals:      t.stringMatches(i, s.NotPrincipals),
				Namespaces:         stringMatches(s.Namespaces),
				NotNamespaces:      stringMatches(s.NotNamespaces),
				ServiceAccounts:    serviceAccounts(s.ServiceAccounts, p.Namespace),
				NotServiceAccounts: serviceAccounts(s.NotServiceAccounts, p.Namespace),
				SourceIPs:          prefixes(s.IpBlocks),
				NotSourceIPs:       prefixes(s.NotIpBlocks),
			}
			where := fmt.Sprintf("from[%d].source", j)
			odd = append(odd, mappedIPs(where+".ipBlocks", s.IpBlocks, false)...)
			odd = append(odd, mappedIPs(where+".notIpBlocks", s.NotIpBlocks, true)...)
			if len(s.TrustDomains)+len(s.NotTrustDomains) > 0 {
				t.warn(i, "%s: trustDomains and notTrustDomains are not part of the node proxy's L4 model (docs/authorization.md#the-l4-model), so they are handled like L7 fields", where)
			}
			if f7 := sourceL7(s); len(f7) > 0 {
				l7 = append(l7, prefixed(where+".", f7)...)
				if m.Empty() {
					emptied = append(emptied, fmt.Sprintf("%s has only L7 fields (%s), so nothing is left of it at L4 and it never matches", where, strings.Join(f7, ", ")))
				} else {
					partial = append(partial, fmt.Sprintf("%s (%s)", where, strings.Join(f7, ", ")))
				}
			}
			c.Matches = append(c.Matches, m)
		}
		rule.Clauses = append(rule.Clauses, c)
	}
	if len(r.GetTo()) > 0 {
		c := Clause{Origin: "to"}
		for j, to := range r.GetTo() {
			o := to.GetOperation()
			m := Match{DestinationPorts: ports(o.Ports), NotDestinationPorts: ports(o.NotPorts)}
			where := fmt.Sprintf("to[%d].operation", j)
			odd = append(odd, zeroPorts(where+".ports", o.Ports, false)...)
			odd = append(odd, zeroPorts(where+".notPorts", o.NotPorts, true)...)
			if f7 := operationL7(o); len(f7) > 0 {
				l7 = append(l7, prefixed(where+".", f7)...)
				if m.Empty() {
					emptied = append(emptied, fmt.Sprintf("%s has only L7 fields (%s), so nothing is left of it at L4 and it never matches", where, strings.Join(f7, ", ")))
				} else {
					partial = append(partial, fmt.Sprintf("%s (%s)", where, strings.Join(f7, ", ")))
				}
			}
			c.Matches = append(c.Matches, m)
		}
		rule.Clauses = append(rule.Clauses, c)
	}
	for j, cond := range r.GetWhen() {
		c := Clause{Origin: fmt.Sprintf("when[%d]", j)}
		var m Match
		where := fmt.Sprintf("when[%d]", j)
		switch cond.GetKey() {
		case "source.ip", "destination.ip":
			odd = append(odd, mappedIPs(where+".values", cond.Values, false)...)
			odd = append(odd, mappedIPs(where+".notValues", cond.NotValues, true)...)
		case "destination.port":
			odd = append(odd, zeroPorts(where+".values", cond.Values, false)...)
			odd = append(odd, zeroPorts(where+".notValues", cond.NotValues, true)...)
		}
		switch cond.GetKey() {
		case "source.ip":
			m.SourceIPs, m.NotSourceIPs = prefixes(cond.Values), prefixes(cond.NotValues)
		case "source.namespace":
			m.Namespaces, m.NotNamespaces = stringMatches(cond.Values), stringMatches(cond.NotValues)
		case "source.principal":
			m.Principals, m.NotPrincipals = t.stringMatches(i, cond.Values), t.stringMatches(i, cond.NotValues)
		case "destination.ip":
			m.DestinationIPs, m.NotDestinationIPs = prefixes(cond.Values), prefixes(cond.NotValues)
		case "destination.port":
			m.DestinationPorts, m.NotDestinationPorts = ports(cond.Values), ports(cond.NotValues)
		default:
			l7 = append(l7, where+" ("+cond.GetKey()+")")
			emptied = append(emptied, fmt.Sprintf("%s: key %s is L7, so the condition never matches at L4", where, cond.GetKey()))
		}
		c.Matches = []Match{m}
		rule.Clauses = append(rule.Clauses, c)
	}

	if p.Action == Allow {
		if len(l7) > 0 {
			p.Dropped = append(p.Dropped, DroppedRule{Index: i, Fields: l7})
			t.warn(i, "dropped: it uses %s, which the node proxy cannot enforce at L4; an ALLOW rule with any such field is removed whole, so connections only this rule would allow are denied (fail closed)", strings.Join(l7, ", "))
			return
		}
		for _, w := range odd {
			t.warn(i, "%s", w)
		}
		p.Rules = append(p.Rules, rule)
		return
	}
	for _, w := range odd {
		t.warn(i, "%s", w)
	}
	for _, w := range partial {
		t.warn(i, "the L7 fields of %s are removed and its L4 part is kept, so the rule denies more connections than written", w)
	}
	for _, w := range emptied {
		t.warn(i, "%s", w)
	}
	for _, c := range rule.Clauses {
		if !slices.ContainsFunc(c.Matches, func(m Match) bool { return !m.Empty() }) {
			t.warn(i, "its %s clause has nothing left that can match at L4, so the rule never matches and has no effect", c.Origin)
		}
	}
	p.Rules = append(p.Rules, rule)
}

// mappedIPs describes the values of path that are IPv4-mapped IPv6 addresses or ranges
// (::ffff:10.0.0.0/104). A connection from or to an IPv4 address is compared in its
// IPv4 form (the proxy unmaps the addresses of dual-stack sockets), so such a value
// never matches: a DENY with one denies nothing, a not- form excludes nothing.
func mappedIPs(path string, vs []string, not bool) []string {
	var out []string
	for k, v := range vs {
		p, err := parseIP(v)
		if err != nil || !p.Addr().Is4In6() || p.Bits() < 96 {
			continue
		}
		v4 := netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96).Masked()
		effect := "it never matches a connection"
		if not {
			effect = "it never excludes a connection"
		}
		out = append(out, fmt.Sprintf("%s[%d]: %q is an IPv4-mapped IPv6 address, but IPv4 connections are compared in their IPv4 form, so %s; write %q", path, k, v, effect, prefixString(v4)))
	}
	return out
}

// zeroPorts describes the "0" values of path: no connection has destination port 0.
func zeroPorts(path string, vs []string, not bool) []string {
	var out []string
	for k, v := range vs {
		if p, err := parsePort(v); err != nil || p != 0 {
			continue
		}
		effect := "it never matches a connection"
		if not {
			effect = "it excludes no connection"
		}
		out = append(out, fmt.Sprintf("%s[%d]: port %q: no connection has destination port 0, so %s", path, k, v, effect))
	}
	return out
}

// stringMatches for principals, warning about values that can never match.
func (t *translator) stringMatches(rule int, vs []string) []StringMatch {
	for _, v := range vs {
		if m := ParseStringMatch(v); (m.Kind == Exact || m.Kind == Prefix) && strings.HasPrefix(m.Value, "spiffe://") {
			t.warn(rule, "principal %q starts with spiffe://, but principals are compared without it, so this value never matches", v)
		}
	}
	return stringMatches(vs)
}

func stringMatches(vs []string) []StringMatch {
	if len(vs) == 0 {
		return nil
	}
	out := make([]StringMatch, len(vs))
	for i, v := range vs {
		out[i] = ParseStringMatch(v)
	}
	return out
}

// serviceAccounts reads "ns/sa", or a bare "sa" in the policy's namespace.
func serviceAccounts(vs []string, policyNS string) []ServiceAccount {
	if len(vs) == 0 {
		return nil
	}
	out := make([]ServiceAccount, len(vs))
	for i, v := range vs {
		if ns, sa, ok := strings.Cut(v, "/"); ok {
			out[i] = ServiceAccount{Namespace: ns, Name: sa}
		} else {
			out[i] = ServiceAccount{Namespace: policyNS, Name: v}
		}
	}
	return out
}

// prefixes and ports parse values that validate() has checked.
func prefixes(vs []string) []netip.Prefix {
	if len(vs) == 0 {
		return nil
	}
	out := make([]netip.Prefix, 0, len(vs))
	for _, v := range vs {
		if p, err := parseIP(v); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func ports(vs []string) []uint16 {
	if len(vs) == 0 {
		return nil
	}
	out := make([]uint16, 0, len(vs))
	for _, v := range vs {
		if p, err := parsePort(v); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
