package kernel

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/nftmesh/nftmesh/ruleset"
)

// Live is nftmesh's table as the kernel holds it.
type Live struct {
	Name string
	// Flags are the table's flags (NFTA_TABLE_FLAGS); nftmesh sets none, so any is
	// drift: dormant, for one, turns every chain of the table off.
	Flags  uint32
	Sets   []*LiveSet
	Chains []*LiveChain
	// Objects are the table's stateful objects and flowtables: nftmesh writes none, so
	// each is drift.
	Objects []LiveObject
}

// LiveObject is an object in the table that nftmesh did not write: a named stateful
// object (Kind as nft names it: "counter", "quota", "ct helper", ...) or a flowtable.
type LiveObject struct {
	Kind string
	Name string
}

// tableFlagNames are nft's names of the table flags.
var tableFlagNames = []string{"dormant", "owner", "persist"}

// flagNames renders table flags as nft does ("dormant"), unknown bits in hex.
func flagNames(flags uint32) string {
	var names []string
	for i, n := range tableFlagNames {
		if flags&(1<<i) != 0 {
			names = append(names, n)
			flags &^= 1 << i
		}
	}
	if flags != 0 {
		names = append(names, fmt.Sprintf("%#x", flags))
	}
	return strings.Join(names, ", ")
}

// LiveSet is a set of the live table.
type LiveSet struct {
	Name     string
	Type     ruleset.SetType // empty when the kernel's key type is not one nftmesh writes
	Elements []LiveElement
}

// LiveElement is a set element and its comment (nftmesh keeps the owner there).
type LiveElement struct {
	Key     netip.Addr // zero for inet_service sets
	Port    uint16
	Comment string
}

// LiveChain is a chain of the live table.
type LiveChain struct {
	Name  string
	Base  *ruleset.BaseChain
	Rules []LiveRule
}

// LiveRule is a rule as nftmesh stamped it. Foreign is true for a rule without an
// nftmesh stamp: somebody else wrote it.
type LiveRule struct {
	Handle  uint64
	Body    string
	Comment string
	Foreign bool
}

// Matches reports whether the live table is exactly the desired one: the same sets (with
// the same elements, except for sets whose elements are managed at run time), the same
// chains with the same hooks, and in each chain the same rules, all stamped by nftmesh,
// in the same order.
func (l *Live) Matches(t *ruleset.Table) bool { return l.matches(t, t.RuleBodies()) }

func (l *Live) matches(t *ruleset.Table, rb [][]string) bool {
	if l == nil || l.Name != t.Name || len(l.Sets) != len(t.Sets) || len(l.Chains) != len(t.Chains) {
		return false
	}
	if l.Flags != 0 || len(l.Objects) > 0 {
		return false
	}
	liveSets := map[string]*LiveSet{}
	for _, s := range l.Sets {
		liveSets[s.Name] = s
	}
	for _, s := range t.Sets {
		ls := liveSets[s.Name]
		if ls == nil || ls.Type != s.Type {
			return false
		}
		if !s.Runtime && !slices.Equal(ls.elementStrings(), s.ElementStrings()) {
			return false
		}
	}
	liveChains := map[string]*LiveChain{}
	for _, c := range l.Chains {
		liveChains[c.Name] = c
	}
	for ci, c := range t.Chains {
		lc := liveChains[c.Name]
		if lc == nil || (lc.Base == nil) != (c.Base == nil) || len(lc.Rules) != len(c.Rules) {
			return false
		}
		if c.Base != nil {
			want := *c.Base
			want.Policy = c.Base.EffectivePolicy()
			if *lc.Base != want {
				return false
			}
		}
		for i, r := range c.Rules {
			lr := lc.Rules[i]
			if lr.Foreign || lr.Body != rb[ci][i] || lr.Comment != r.Comment {
				return false
			}
		}
	}
	return true
}

func (s *LiveSet) elementStrings() []string {
	set := &ruleset.Set{Type: s.Type}
	for _, e := range s.Elements {
		if s.Type == ruleset.SetTypeInetService {
			set.Ports = append(set.Ports, e.Port)
		} else {
			set.Addrs = append(set.Addrs, e.Key)
		}
	}
	return set.ElementStrings()
}

// Render prints the live table in the layout of ruleset.Table.Render. Rules come from their
// stamps; a rule nftmesh did not write shows as a comment line with its handle, and table
// flags and objects nftmesh did not write show as comment lines at the top, so that a
// diff against the desired table points at them.
func (l *Live) Render() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s {\n", ruleset.Family, l.Name)
	if l.Flags != 0 {
		fmt.Fprintf(&b, "\t# table flags: %s\n", flagNames(l.Flags))
	}
	for _, o := range l.Objects {
		fmt.Fprintf(&b, "\t# %s %s was not written by nftmesh (see nft list table %s %s)\n", o.Kind, o.Name, ruleset.Family, l.Name)
	}
	first := true
	sep := func() {
		if !first {
			b.WriteString("\n")
		}
		first = false
	}
	for _, s := range l.Sets {
		sep()
		typ := s.Type
		if typ == "" {
			typ = "unknown"
		}
		set := &ruleset.Set{Name: s.Name, Type: typ}
		for _, e := range s.Elements {
			if typ == ruleset.SetTypeInetService {
				set.Ports = append(set.Ports, e.Port)
			} else if e.Key.IsValid() {
				set.Addrs = append(set.Addrs, e.Key)
			}
		}
		b.WriteString(set.Render())
	}
	for _, c := range l.Chains {
		sep()
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if c.Base != nil {
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %d; policy %s;\n", c.Base.Type, c.Base.Hook, c.Base.Priority, c.Base.EffectivePolicy())
		}
		for _, r := range c.Rules {
			if r.Foreign {
				fmt.Fprintf(&b, "\t\t# rule handle %d was not written by nftmesh (see nft -a list table inet %s)\n", r.Handle, l.Name)
				continue
			}
			line := r.Body
			if r.Comment != "" {
				line += fmt.Sprintf(" comment %q", r.Comment)
			}
			fmt.Fprintf(&b, "\t\t%s\n", line)
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}
