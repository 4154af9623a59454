package policy

import (
	"net/netip"
	"strconv"
	"strings"
)

// Connection is what the node proxy knows about an inbound connection.
type Connection struct {
	// SrcPrincipal is the peer's SPIFFE identity, with or without "spiffe://"
	// (spiffe://cluster.local/ns/x/sa/y); empty for plaintext.
	SrcPrincipal string
	SrcIP        netip.Addr // IPv4-mapped IPv6 addresses are compared as IPv4
	DstIP        netip.Addr
	DstPort      uint16
}

// Identity returns the principal as policies compare it (without "spiffe://") and the
// namespace and service account it names. Namespace and service account are empty for
// plaintext and for a principal not of the form <trust domain>/ns/<ns>/sa/<sa>.
func (c Connection) Identity() (principal, namespace, serviceAccount string) {
	principal = strings.TrimPrefix(c.SrcPrincipal, "spiffe://")
	td, rest, ok := strings.Cut(principal, "/")
	if !ok || td == "" {
		return principal, "", ""
	}
	rest, ok = strings.CutPrefix(rest, "ns/")
	if !ok {
		return principal, "", ""
	}
	ns, rest, ok := strings.Cut(rest, "/")
	if !ok || ns == "" {
		return principal, "", ""
	}
	sa, ok := strings.CutPrefix(rest, "sa/")
	if !ok || sa == "" || strings.Contains(sa, "/") {
		return principal, "", ""
	}
	return principal, ns, sa
}

// String renders the connection for people.
func (c Connection) String() string {
	p, ns, sa := c.Identity()
	var b strings.Builder
	if p == "" {
		b.WriteString("plaintext (no principal, no namespace)")
	} else {
		b.WriteString(p)
		if ns != "" {
			b.WriteString(" (namespace " + ns + ", service account " + sa + ")")
		}
	}
	b.WriteString(" from ")
	if c.SrcIP.IsValid() {
		b.WriteString(c.SrcIP.String())
	} else {
		b.WriteString("an unspecified source IP")
	}
	b.WriteString(" to ")
	b.WriteString(netip.AddrPortFrom(c.DstIP, c.DstPort).String())
	return b.String()
}

// Workload is the destination: its namespace and labels.
type Workload struct {
	Namespace string
	Labels    map[string]string
}

// The reasons a Decision gives. They are constants so that deciding never allocates.
const (
	ReasonDenyMatched    = "a DENY policy matched"
	ReasonNoAllowPolicy  = "no ALLOW policy applies to the workload"
	ReasonAllowMatched   = "an ALLOW policy matched"
	ReasonNoAllowMatched = "allow policies exist but none matched"
)

// Decision is the answer for one connection.
type Decision struct {
	Allow     bool
	Policy    string // namespace/name of the policy that decided; "" when none did
	RuleIndex int    // the index in that policy's spec.rules; -1 when no rule decided
	Reason    string // one of the Reason constants
}

// String renders the decision for people: "allow: an ALLOW policy matched (ns/name rule 0)".
func (d Decision) String() string {
	s := "deny: "
	if d.Allow {
		s = "allow: "
	}
	s += d.Reason
	if d.Policy != "" {
		s += " (" + d.Policy + " rule " + strconv.Itoa(d.RuleIndex) + ")"
	}
	return s
}
