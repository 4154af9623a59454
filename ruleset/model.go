// Package ruleset is the typed model of everything nftmesh writes into nftables.
//
// A Table holds named sets and chains; a Rule is a list of typed matches followed by
// typed statements. There are no free-form rule strings: every construct renders to
// canonical nft text (Render), and package kernel translates the same values to netlink
// expressions. The model knows nothing of Kubernetes or of the intent that produced it,
// nor of the kernel: this package is the standard library only, and builds anywhere.
package ruleset

import (
	"net/netip"
	"strings"
)

// Family is always inet: one table serves IPv4 and IPv6.
const Family = "inet"

// Table is one nftables table of family inet, owned by nftmesh alone.
type Table struct {
	Name   string
	Sets   []*Set
	Chains []*Chain
}

// SetType is the key type of a named set.
type SetType string

const (
	SetTypeIPv4Addr    SetType = "ipv4_addr"
	SetTypeIPv6Addr    SetType = "ipv6_addr"
	SetTypeInetService SetType = "inet_service"
)

// Set is a named set. Elements are kept as typed values; only the ones matching Type
// are valid (Validate checks).
type Set struct {
	Name  string
	Type  SetType
	Addrs []netip.Addr // ipv4_addr and ipv6_addr sets
	Ports []uint16     // inet_service sets
	// Runtime sets have their elements managed while the table lives (pod IPs on the
	// node): Apply keeps the live elements and does not compare them.
	Runtime bool
}

// ChainType, Hook and Policy describe a base chain.
type ChainType string

const (
	ChainTypeFilter ChainType = "filter"
	ChainTypeNAT    ChainType = "nat"
	ChainTypeRoute  ChainType = "route"
)

type Hook string

const (
	HookPrerouting  Hook = "prerouting"
	HookInput       Hook = "input"
	HookForward     Hook = "forward"
	HookOutput      Hook = "output"
	HookPostrouting Hook = "postrouting"
)

type Policy string

const (
	PolicyAccept Policy = "accept"
	PolicyDrop   Policy = "drop"
)

// Well-known base chain priorities, as numbers: nft 1.0.6 rejects some of the
// keywords in inet nat chains, and numbers read the same in every nft version.
const (
	PriorityRaw    = -300
	PriorityMangle = -150
	PriorityDstNAT = -100
	PriorityFilter = 0
	PrioritySrcNAT = 100
)

// BaseChain attaches a chain to a netfilter hook.
type BaseChain struct {
	Type     ChainType
	Hook     Hook
	Priority int
	Policy   Policy
}

// Chain is a base chain (Base set) or a regular chain reached by jump.
type Chain struct {
	Name  string
	Base  *BaseChain
	Rules []Rule
}

// Rule is matches, all of which must hold, then statements in order. Comment is kept in
// the kernel as rule user data and printed by nft.
type Rule struct {
	Matches    []Match
	Statements []Statement
	Comment    string
}

// Match is one typed condition of a rule.
type Match interface{ isMatch() }

// Statement is one typed action of a rule.
type Statement interface{ isStatement() }

// L4Proto is a transport protocol.
type L4Proto string

const (
	TCP L4Proto = "tcp"
	UDP L4Proto = "udp"
)

// IPFamily selects IPv4 or IPv6 for address matches and family-specific statements.
type IPFamily string

const (
	// IPAny is only meaningful for TProxy: the kernel uses the packet's family.
	IPAny IPFamily = ""
	IPv4  IPFamily = "ip"
	IPv6  IPFamily = "ip6"
)

// Direction picks the source or destination field of a header.
type Direction string

const (
	Source      Direction = "saddr"
	Destination Direction = "daddr"
)

// MetaL4Proto matches `meta l4proto tcp`.
type MetaL4Proto struct{ Proto L4Proto }

// Mark matches the packet mark (`meta mark`) or the conntrack mark (`ct mark`), under
// Mask. A Mask of 0xffffffff compares the whole mark.
type Mark struct {
	Kind   MarkKind
	Mask   uint32
	Value  uint32
	Negate bool
}

// MarkKind is where a mark lives.
type MarkKind string

const (
	MetaMark MarkKind = "meta mark"
	CtMark   MarkKind = "ct mark"
)

// Interface matches `iifname`/`oifname`. As in nft, a Name ending in `*` is a
// wildcard: it matches every interface whose name starts with what precedes the `*`
// ("eth*" matches "eth0" and "eth1"). A `*` anywhere else is not allowed (Validate).
type Interface struct {
	Out    bool // oifname when true, iifname otherwise
	Name   string
	Negate bool
}

// Wildcard reports whether the name is a prefix wildcard, and the prefix it matches.
func (i Interface) Wildcard() (prefix string, ok bool) {
	return strings.CutSuffix(i.Name, "*")
}

// CmpOp compares a number.
type CmpOp string

const (
	OpEq  CmpOp = "=="
	OpNeq CmpOp = "!="
	OpLt  CmpOp = "<"
	OpGt  CmpOp = ">"
	OpLe  CmpOp = "<="
	OpGe  CmpOp = ">="
)

// SocketUID matches `meta skuid`. It only matches packets that carry a full local
// socket, so `meta skuid >= 0` means "locally originated": forwarded packets have none.
type SocketUID struct {
	Op  CmpOp
	UID uint32
}

// Addr matches `ip saddr`/`ip6 daddr` and friends against an address or prefix
// (Prefix, a single address when its bits are the full length) or a named set (Set).
type Addr struct {
	Family IPFamily // IPv4 or IPv6
	Dir    Direction
	Prefix netip.Prefix
	Set    string
	Negate bool
}

// Port matches `tcp dport`, `udp sport`, `th dport` (Proto empty: any transport header)
// against a port or a named inet_service set.
type Port struct {
	Proto  L4Proto // TCP, UDP, or "" for th
	Dir    PortDirection
	Port   uint16
	Set    string
	Negate bool
}

// PortDirection picks dport or sport.
type PortDirection string

const (
	DPort PortDirection = "dport"
	SPort PortDirection = "sport"
)

// CtState matches `ct state` against any of the given states.
type CtState struct{ States CtStates }

// CtStates is a bit set of conntrack states, in the kernel's bit order.
type CtStates uint32

const (
	CtInvalid     CtStates = 1 << 0
	CtEstablished CtStates = 1 << 1
	CtRelated     CtStates = 1 << 2
	CtNew         CtStates = 1 << 3
	CtUntracked   CtStates = 1 << 6
)

func (Mark) isMatch()        {}
func (MetaL4Proto) isMatch() {}
func (Interface) isMatch()   {}
func (SocketUID) isMatch()   {}
func (Addr) isMatch()        {}
func (Port) isMatch()        {}
func (CtState) isMatch()     {}

// SetMark writes a mark. With From empty it sets Target to Value. Otherwise it takes
// From and replaces the bits under Mask with Value, keeping the others; a zero Mask
// copies From unchanged (`meta mark set ct mark`).
type SetMark struct {
	Target MarkKind
	From   MarkKind
	Mask   uint32
	Value  uint32
}

// SetCtZone is `ct zone set N`.
type SetCtZone struct{ Zone uint16 }

// TProxy is `tproxy ip to :port`: deliver to a local transparent socket on Port.
type TProxy struct {
	Family IPFamily
	Port   uint16
}

// Redirect is `redirect to :port` (nat chains only).
type Redirect struct{ Port uint16 }

// SNAT is `snat ip to ADDR` (nat postrouting or input only).
type SNAT struct{ Addr netip.Addr }

// Counter counts packets and bytes. nft prints it with its current values
// (`counter packets 0 bytes 0`); the rendered text leaves them out.
type Counter struct{}

// Verdict ends rule evaluation: accept, drop, return, or jump to Chain.
type Verdict struct {
	Kind  VerdictKind
	Chain string // for jump
}

// VerdictKind names a verdict.
type VerdictKind string

const (
	Accept VerdictKind = "accept"
	Drop   VerdictKind = "drop"
	Return VerdictKind = "return"
	Jump   VerdictKind = "jump"
)

func (SetMark) isStatement()   {}
func (SetCtZone) isStatement() {}
func (TProxy) isStatement()    {}
func (Redirect) isStatement()  {}
func (SNAT) isStatement()      {}
func (Counter) isStatement()   {}
func (Verdict) isStatement()   {}

// Chain returns the chain named name, or nil.
func (t *Table) Chain(name string) *Chain {
	for _, c := range t.Chains {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// Set returns the set named name, or nil.
func (t *Table) Set(name string) *Set {
	for _, s := range t.Sets {
		if s.Name == name {
			return s
		}
	}
	return nil
}
