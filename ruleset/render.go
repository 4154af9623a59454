package ruleset

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Render returns the table as canonical `nft -f` text: the layout `nft -y list table`
// prints (tabs, a blank line between objects, numeric priorities), objects in model
// order, sets before chains as nft prints them. The same table always gives the same
// bytes. Where nft's printing carries state or is unordered, Render is canonical instead:
//   - counters render as `counter`; nft prints `counter packets N bytes M`;
//   - set elements render sorted on one line; nft prints them in kernel order and
//     wraps long lists.
func (t *Table) Render() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s {\n", Family, t.Name)
	first := true
	sep := func() {
		if !first {
			b.WriteString("\n")
		}
		first = false
	}
	for _, s := range t.Sets {
		sep()
		renderSet(&b, s)
	}
	for _, c := range t.Chains {
		sep()
		renderChain(&b, c)
	}
	b.WriteString("}\n")
	return b.String()
}

func renderSet(b *strings.Builder, s *Set) {
	fmt.Fprintf(b, "\tset %s {\n\t\ttype %s\n", s.Name, s.Type)
	if elems := s.elementStrings(); len(elems) > 0 {
		fmt.Fprintf(b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
	}
	b.WriteString("\t}\n")
}

// elementStrings returns the elements in canonical (sorted) order.
func (s *Set) elementStrings() []string {
	var out []string
	switch s.Type {
	case SetTypeInetService:
		ports := slices.Clone(s.Ports)
		slices.Sort(ports)
		for _, p := range ports {
			out = append(out, fmt.Sprint(p))
		}
	default:
		addrs := slices.Clone(s.Addrs)
		slices.SortFunc(addrs, func(a, b netip.Addr) int { return a.Compare(b) })
		for _, a := range addrs {
			out = append(out, a.String())
		}
	}
	return out
}

func renderChain(b *strings.Builder, c *Chain) {
	fmt.Fprintf(b, "\tchain %s {\n", c.Name)
	if c.Base != nil {
		fmt.Fprintf(b, "\t\ttype %s hook %s priority %d; policy %s;\n",
			c.Base.Type, c.Base.Hook, c.Base.Priority, c.Base.policy())
	}
	for _, r := range c.Rules {
		b.WriteString("\t\t")
		b.WriteString(r.String())
		b.WriteString("\n")
	}
	b.WriteString("\t}\n")
}

func (bc *BaseChain) policy() Policy {
	if bc.Policy == "" {
		return PolicyAccept
	}
	return bc.Policy
}

// String renders one rule as nft prints it, without the chain.
func (r Rule) String() string {
	parts := make([]string, 0, len(r.Matches)+len(r.Statements)+1)
	for _, m := range r.Matches {
		parts = append(parts, renderMatch(m))
	}
	for _, s := range r.Statements {
		parts = append(parts, renderStatement(s))
	}
	if r.Comment != "" {
		parts = append(parts, fmt.Sprintf("comment %q", r.Comment))
	}
	return strings.Join(parts, " ")
}

func neg(negate bool) string {
	if negate {
		return "!= "
	}
	return ""
}

func hex32(v uint32) string { return fmt.Sprintf("0x%08x", v) }

func renderMatch(m Match) string {
	switch m := m.(type) {
	case MetaL4Proto:
		return "meta l4proto " + string(m.Proto)
	case Mark:
		if m.Mask == 0xffffffff {
			return fmt.Sprintf("%s %s%s", m.Kind, neg(m.Negate), hex32(m.Value))
		}
		op := "=="
		if m.Negate {
			op = "!="
		}
		return fmt.Sprintf("%s & %s %s %s", m.Kind, hex32(m.Mask), op, hex32(m.Value))
	case Interface:
		key := "iifname"
		if m.Out {
			key = "oifname"
		}
		return fmt.Sprintf("%s %s%q", key, neg(m.Negate), m.Name)
	case SocketUID:
		if m.Op == OpEq || m.Op == "" {
			return fmt.Sprintf("meta skuid %d", m.UID)
		}
		return fmt.Sprintf("meta skuid %s %d", m.Op, m.UID)
	case Addr:
		return fmt.Sprintf("%s %s %s%s", m.Family, m.Dir, neg(m.Negate), m.operand())
	case Port:
		proto := string(m.Proto)
		if proto == "" {
			proto = "th"
		}
		operand := fmt.Sprint(m.Port)
		if m.Set != "" {
			operand = "@" + m.Set
		}
		return fmt.Sprintf("%s %s %s%s", proto, m.Dir, neg(m.Negate), operand)
	case CtState:
		return "ct state " + m.States.String()
	}
	panic(fmt.Sprintf("ruleset: unknown match %T", m))
}

func (m Addr) operand() string {
	if m.Set != "" {
		return "@" + m.Set
	}
	if m.Prefix.IsSingleIP() {
		return m.Prefix.Addr().String()
	}
	return m.Prefix.String()
}

var ctStateNames = []struct {
	bit  CtStates
	name string
}{
	{CtInvalid, "invalid"},
	{CtEstablished, "established"},
	{CtRelated, "related"},
	{CtNew, "new"},
	{CtUntracked, "untracked"},
}

// String lists the states in the kernel's bit order, as nft prints them.
func (s CtStates) String() string {
	var names []string
	for _, n := range ctStateNames {
		if s&n.bit != 0 {
			names = append(names, n.name)
		}
	}
	return strings.Join(names, ",")
}

func renderStatement(s Statement) string {
	switch s := s.(type) {
	case SetMark:
		return fmt.Sprintf("%s set %s", s.Target, s.expression())
	case SetCtZone:
		return fmt.Sprintf("ct zone set %d", s.Zone)
	case TProxy:
		if s.Family == IPAny {
			return fmt.Sprintf("tproxy to :%d", s.Port)
		}
		return fmt.Sprintf("tproxy %s to :%d", s.Family, s.Port)
	case Redirect:
		return fmt.Sprintf("redirect to :%d", s.Port)
	case SNAT:
		return fmt.Sprintf("snat %s to %s", familyOf(s.Addr), s.Addr)
	case Counter:
		return "counter"
	case Verdict:
		if s.Kind == Jump {
			return "jump " + s.Chain
		}
		return string(s.Kind)
	}
	panic(fmt.Sprintf("ruleset: unknown statement %T", s))
}

// expression renders the value written by SetMark the way nft prints it back: the
// kernel keeps (x & and) ^ xor, and nft shows that as `x & (and|xor) | xor`, so the
// mask printed includes the value's bits.
func (s SetMark) expression() string {
	if s.From == "" {
		return hex32(s.Value)
	}
	if s.Mask == 0 {
		return string(s.From)
	}
	and := ^s.Mask | s.Value
	out := string(s.From)
	if and != 0xffffffff {
		out += " & " + hex32(and)
	}
	if s.Value != 0 {
		out += " | " + hex32(s.Value)
	}
	return out
}

// familyOf returns the family of an address, for family-specific statements.
func familyOf(a netip.Addr) IPFamily {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}
