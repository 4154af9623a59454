package ruleset

import (
	"crypto/sha256"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
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

// ContentHash is a digest of the rendered table: equal tables, equal hashes.
func (t *Table) ContentHash() string {
	sum := sha256.Sum256([]byte(t.Render()))
	return fmt.Sprintf("%x", sum[:12])
}

// Render returns the set's block as Table.Render prints it inside the table: tab
// indented, elements sorted, ending in a newline.
func (s *Set) Render() string {
	var b strings.Builder
	renderSet(&b, s)
	return b.String()
}

func renderSet(b *strings.Builder, s *Set) {
	fmt.Fprintf(b, "\tset %s {\n\t\ttype %s\n", s.Name, s.Type)
	if elems := s.ElementStrings(); len(elems) > 0 {
		fmt.Fprintf(b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
	}
	b.WriteString("\t}\n")
}

// ElementStrings returns the elements as Render prints them, in canonical (sorted)
// order: equal element sets, equal slices.
func (s *Set) ElementStrings() []string {
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
			c.Base.Type, c.Base.Hook, c.Base.Priority, c.Base.EffectivePolicy())
	}
	for _, r := range c.Rules {
		b.WriteString("\t\t")
		b.WriteString(r.String())
		b.WriteString("\n")
	}
	b.WriteString("\t}\n")
}

// EffectivePolicy is the chain's policy as the kernel holds it: accept when unset.
func (bc *BaseChain) EffectivePolicy() Policy {
	if bc.Policy == "" {
		return PolicyAccept
	}
	return bc.Policy
}

// body is the rule's text without its comment: what package kernel stamps into the
// rule's user data, to recognise the rule when it reads it back.
func (r Rule) body() string {
	c := r
	c.Comment = ""
	return c.String()
}

// RuleBodies renders every rule's body (its text without the comment), indexed
// [chain][rule] like t.Chains[chain].Rules[rule]. An applier renders them once per apply
// and passes them on: validation (ValidateBodies), the stamps, the cache key and the
// comparison with the live table all need them, and rendering is on the path of every
// apply.
func (t *Table) RuleBodies() [][]string {
	rb := make([][]string, len(t.Chains))
	for ci, c := range t.Chains {
		rb[ci] = make([]string, len(c.Rules))
		for i, r := range c.Rules {
			rb[ci][i] = r.body()
		}
	}
	return rb
}

// String renders one rule as nft prints it, without the chain. It is on the path of every
// apply (stamps, content hash), so it builds bytes directly instead of going through fmt.
func (r Rule) String() string {
	b := make([]byte, 0, 192)
	for i, m := range r.Matches {
		if i > 0 {
			b = append(b, ' ')
		}
		b = appendMatch(b, m)
	}
	for i, st := range r.Statements {
		if i > 0 || len(r.Matches) > 0 {
			b = append(b, ' ')
		}
		b = appendStatement(b, st)
	}
	if r.Comment != "" {
		b = append(b, " comment "...)
		b = strconv.AppendQuote(b, r.Comment)
	}
	return string(b)
}

func appendNeg(b []byte, negate bool) []byte {
	if negate {
		return append(b, "!= "...)
	}
	return b
}

func appendHex32(b []byte, v uint32) []byte {
	const digits = "0123456789abcdef"
	b = append(b, '0', 'x')
	for shift := 28; shift >= 0; shift -= 4 {
		b = append(b, digits[(v>>shift)&0xf])
	}
	return b
}

func hex32(v uint32) string { return string(appendHex32(nil, v)) }

func appendUint(b []byte, v uint64) []byte { return strconv.AppendUint(b, v, 10) }

func renderMatch(m Match) string { return string(appendMatch(nil, m)) }

func appendMatch(b []byte, m Match) []byte {
	switch m := m.(type) {
	case MetaL4Proto:
		return append(append(b, "meta l4proto "...), m.Proto...)
	case Mark:
		b = append(b, m.Kind...)
		if m.Mask == 0xffffffff {
			b = append(b, ' ')
			return appendHex32(appendNeg(b, m.Negate), m.Value)
		}
		b = appendHex32(append(b, " & "...), m.Mask)
		if m.Negate {
			b = append(b, " != "...)
		} else {
			b = append(b, " == "...)
		}
		return appendHex32(b, m.Value)
	case Interface:
		if m.Out {
			b = append(b, "oifname "...)
		} else {
			b = append(b, "iifname "...)
		}
		return strconv.AppendQuote(appendNeg(b, m.Negate), m.Name)
	case SocketUID:
		b = append(b, "meta skuid "...)
		if m.Op != OpEq && m.Op != "" {
			b = append(append(b, m.Op...), ' ')
		}
		return appendUint(b, uint64(m.UID))
	case Addr:
		b = append(append(append(append(b, m.Family...), ' '), m.Dir...), ' ')
		return append(appendNeg(b, m.Negate), m.operand()...)
	case Port:
		if m.Proto == "" {
			b = append(b, "th"...)
		} else {
			b = append(b, m.Proto...)
		}
		b = appendNeg(append(append(append(b, ' '), m.Dir...), ' '), m.Negate)
		if m.Set != "" {
			return append(append(b, '@'), m.Set...)
		}
		return appendUint(b, uint64(m.Port))
	case CtState:
		return append(append(b, "ct state "...), m.States.String()...)
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

func renderStatement(s Statement) string { return string(appendStatement(nil, s)) }

func appendStatement(b []byte, s Statement) []byte {
	switch s := s.(type) {
	case SetMark:
		return s.appendExpression(append(append(b, s.Target...), " set "...))
	case SetCtZone:
		return appendUint(append(b, "ct zone set "...), uint64(s.Zone))
	case TProxy:
		b = append(b, "tproxy "...)
		if s.Family != IPAny {
			b = append(append(b, s.Family...), ' ')
		}
		return appendUint(append(b, "to :"...), uint64(s.Port))
	case Redirect:
		return appendUint(append(b, "redirect to :"...), uint64(s.Port))
	case SNAT:
		b = append(append(append(b, "snat "...), familyOf(s.Addr)...), " to "...)
		return s.Addr.AppendTo(b)
	case Counter:
		return append(b, "counter"...)
	case Verdict:
		if s.Kind == Jump {
			return append(append(b, "jump "...), s.Chain...)
		}
		return append(b, s.Kind...)
	}
	panic(fmt.Sprintf("ruleset: unknown statement %T", s))
}

// expression renders the value written by SetMark the way nft prints it back: the
// kernel keeps (x & and) ^ xor, and nft shows that as `x & (and|xor) | xor`, so the
// mask printed includes the value's bits.
func (s SetMark) appendExpression(b []byte) []byte {
	if s.From == "" {
		return appendHex32(b, s.Value)
	}
	b = append(b, s.From...)
	if s.Mask == 0 {
		return b
	}
	if and := ^s.Mask | s.Value; and != 0xffffffff {
		b = appendHex32(append(b, " & "...), and)
	}
	if s.Value != 0 {
		b = appendHex32(append(b, " | "...), s.Value)
	}
	return b
}

// familyOf returns the family of an address, for family-specific statements.
func familyOf(a netip.Addr) IPFamily {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}
