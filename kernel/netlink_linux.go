package kernel

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// This file translates the model into github.com/google/nftables objects, the way nft
// itself encodes each construct, so that `nft list` prints back the rendered text. Tests
// apply every construct (here) and every golden ruleset (package dataplane) through it and
// compare nft's print-back with Render; testdata records the bytes of each golden's batch.

// stampType is the rule user-data TLV where nftmesh keeps the rule's canonical text
// (comment excluded; the comment has its own TLV, which nft prints). nft ignores TLV
// types it does not know. The kernel hands user data back intact, so the stamp tells
// whether a live rule is exactly one nftmesh wrote, without decoding expressions
// (google/nftables drops tproxy when it reads rules back).
const stampType userdata.Type = 0x6e // 'n'

// ruleUserData holds the comment and the stamp (the rule's body). Package ruleset's
// validation counts on this layout (a TLV each) to check that both fit the kernel's
// NFT_USERDATA_MAXLEN.
func ruleUserData(r ruleset.Rule, body string) []byte {
	var ud []byte
	if r.Comment != "" {
		ud = userdata.AppendString(ud, userdata.TypeComment, r.Comment)
	}
	return userdata.AppendString(ud, stampType, body)
}

var (
	chainTypes = map[ruleset.ChainType]nftables.ChainType{
		ruleset.ChainTypeFilter: nftables.ChainTypeFilter,
		ruleset.ChainTypeNAT:    nftables.ChainTypeNAT,
		ruleset.ChainTypeRoute:  nftables.ChainTypeRoute,
	}
	hooks = map[ruleset.Hook]*nftables.ChainHook{
		ruleset.HookPrerouting:  nftables.ChainHookPrerouting,
		ruleset.HookInput:       nftables.ChainHookInput,
		ruleset.HookForward:     nftables.ChainHookForward,
		ruleset.HookOutput:      nftables.ChainHookOutput,
		ruleset.HookPostrouting: nftables.ChainHookPostrouting,
	}
	setTypes = map[ruleset.SetType]nftables.SetDatatype{
		ruleset.SetTypeIPv4Addr:    nftables.TypeIPAddr,
		ruleset.SetTypeIPv6Addr:    nftables.TypeIP6Addr,
		ruleset.SetTypeInetService: nftables.TypeInetService,
	}
)

func nfTable(name string) *nftables.Table {
	return &nftables.Table{Name: name, Family: nftables.TableFamilyINet}
}

func nfChain(t *nftables.Table, c *ruleset.Chain) *nftables.Chain {
	nc := &nftables.Chain{Name: c.Name, Table: t}
	if c.Base != nil {
		policy := nftables.ChainPolicyAccept
		if c.Base.EffectivePolicy() == ruleset.PolicyDrop {
			policy = nftables.ChainPolicyDrop
		}
		nc.Type = chainTypes[c.Base.Type]
		nc.Hooknum = hooks[c.Base.Hook]
		nc.Priority = nftables.ChainPriorityRef(nftables.ChainPriority(c.Base.Priority))
		nc.Policy = &policy
	}
	return nc
}

// nfSet returns the set with a batch-local ID: google/nftables would otherwise take one
// from a package-global counter, which concurrent transactions would race on.
func nfSet(t *nftables.Table, s *ruleset.Set, id uint32) *nftables.Set {
	return &nftables.Set{Table: t, Name: s.Name, ID: id, KeyType: setTypes[s.Type]}
}

func setElements(s *ruleset.Set) []nftables.SetElement {
	var out []nftables.SetElement
	for _, a := range s.Addrs {
		out = append(out, nftables.SetElement{Key: a.AsSlice()})
	}
	for _, p := range s.Ports {
		out = append(out, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(p)})
	}
	return out
}

// exprBuilder tracks the protocol context of one rule: like nft, it loads the family
// (meta nfproto) before the first network-header match and the transport protocol
// (meta l4proto) before the first tcp/udp header match, unless the rule already did.
type exprBuilder struct {
	exprs  []expr.Any
	family ruleset.IPFamily
	proto  ruleset.L4Proto
	sets   map[string]*nftables.Set
}

const reg = 1 // NFT_REG_1: 16 bytes, room for an IPv6 address

func (b *exprBuilder) add(e ...expr.Any) { b.exprs = append(b.exprs, e...) }

func cmpOp(negate bool) expr.CmpOp {
	if negate {
		return expr.CmpOpNeq
	}
	return expr.CmpOpEq
}

func native32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

func (b *exprBuilder) needFamily(f ruleset.IPFamily) {
	if b.family == f {
		return
	}
	proto := byte(unix.NFPROTO_IPV4)
	if f == ruleset.IPv6 {
		proto = unix.NFPROTO_IPV6
	}
	b.add(&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{proto}})
	b.family = f
}

func l4Number(p ruleset.L4Proto) byte {
	if p == ruleset.UDP {
		return unix.IPPROTO_UDP
	}
	return unix.IPPROTO_TCP
}

func (b *exprBuilder) needProto(p ruleset.L4Proto) {
	if b.proto == p {
		return
	}
	b.add(&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{l4Number(p)}})
	b.proto = p
}

func (b *exprBuilder) lookup(set string, negate bool) error {
	s, ok := b.sets[set]
	if !ok {
		return fmt.Errorf("set @%s is not defined", set)
	}
	b.add(&expr.Lookup{SourceRegister: reg, SetName: s.Name, SetID: s.ID, Invert: negate})
	return nil
}

func (b *exprBuilder) loadMark(kind ruleset.MarkKind) {
	if kind == ruleset.CtMark {
		b.add(&expr.Ct{Key: expr.CtKeyMARK, Register: reg})
	} else {
		b.add(&expr.Meta{Key: expr.MetaKeyMARK, Register: reg})
	}
}

func (b *exprBuilder) match(m ruleset.Match) error {
	switch m := m.(type) {
	case ruleset.MetaL4Proto:
		b.add(&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{l4Number(m.Proto)}})
		b.proto = m.Proto
	case ruleset.Mark:
		b.loadMark(m.Kind)
		if m.Mask != 0xffffffff {
			b.add(&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: native32(m.Mask), Xor: native32(0)})
		}
		b.add(&expr.Cmp{Op: cmpOp(m.Negate), Register: reg, Data: native32(m.Value)})
	case ruleset.Interface:
		key := expr.MetaKeyIIFNAME
		if m.Out {
			key = expr.MetaKeyOIFNAME
		}
		var name []byte
		if prefix, ok := m.Wildcard(); ok {
			// "eth*" is a prefix match, encoded as nft encodes it: the cmp covers the
			// prefix's bytes only, without the terminating NUL.
			name = []byte(prefix)
		} else {
			name = make([]byte, unix.IFNAMSIZ)
			copy(name, m.Name)
		}
		b.add(&expr.Meta{Key: key, Register: reg}, &expr.Cmp{Op: cmpOp(m.Negate), Register: reg, Data: name})
	case ruleset.SocketUID:
		b.add(&expr.Meta{Key: expr.MetaKeySKUID, Register: reg})
		switch m.Op {
		case "", ruleset.OpEq, ruleset.OpNeq:
			b.add(&expr.Cmp{Op: cmpOp(m.Op == ruleset.OpNeq), Register: reg, Data: native32(m.UID)})
		default:
			// Ordered comparisons are byte-wise: compare big-endian, as nft does.
			ops := map[ruleset.CmpOp]expr.CmpOp{ruleset.OpLt: expr.CmpOpLt, ruleset.OpGt: expr.CmpOpGt, ruleset.OpLe: expr.CmpOpLte, ruleset.OpGe: expr.CmpOpGte}
			b.add(&expr.Byteorder{SourceRegister: reg, DestRegister: reg, Op: expr.ByteorderHton, Len: 4, Size: 4},
				&expr.Cmp{Op: ops[m.Op], Register: reg, Data: binaryutil.BigEndian.PutUint32(m.UID)})
		}
	case ruleset.Addr:
		b.needFamily(m.Family)
		offset, size := uint32(12), uint32(4) // ip saddr
		if m.Family == ruleset.IPv6 {
			offset, size = 8, 16
		}
		if m.Dir == ruleset.Destination {
			offset += size
		}
		b.add(&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: size})
		if m.Set != "" {
			return b.lookup(m.Set, m.Negate)
		}
		if !m.Prefix.IsSingleIP() {
			b.add(&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: size, Mask: prefixMask(m.Prefix), Xor: make([]byte, size)})
		}
		b.add(&expr.Cmp{Op: cmpOp(m.Negate), Register: reg, Data: m.Prefix.Masked().Addr().AsSlice()})
	case ruleset.Port:
		if m.Proto != "" {
			b.needProto(m.Proto)
		}
		offset := uint32(2) // dport
		if m.Dir == ruleset.SPort {
			offset = 0
		}
		b.add(&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: offset, Len: 2})
		if m.Set != "" {
			return b.lookup(m.Set, m.Negate)
		}
		b.add(&expr.Cmp{Op: cmpOp(m.Negate), Register: reg, Data: binaryutil.BigEndian.PutUint16(m.Port)})
	case ruleset.CtState:
		b.add(&expr.Ct{Key: expr.CtKeySTATE, Register: reg},
			&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: native32(uint32(m.States)), Xor: native32(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: reg, Data: native32(0)})
	default:
		return fmt.Errorf("unknown match %T", m)
	}
	return nil
}

func prefixMask(p netip.Prefix) []byte {
	size := p.Addr().BitLen() / 8
	mask := make([]byte, size)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return mask
}

// familyOf returns the family of an address, for family-specific statements.
func familyOf(a netip.Addr) ruleset.IPFamily {
	if a.Is4() {
		return ruleset.IPv4
	}
	return ruleset.IPv6
}

func nfFamily(f ruleset.IPFamily) byte {
	switch f {
	case ruleset.IPv4:
		return unix.NFPROTO_IPV4
	case ruleset.IPv6:
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_UNSPEC
}

func (b *exprBuilder) statement(s ruleset.Statement) error {
	switch s := s.(type) {
	case ruleset.SetMark:
		switch {
		case s.From == "":
			b.add(&expr.Immediate{Register: reg, Data: native32(s.Value)})
		case s.Mask == 0:
			b.loadMark(s.From)
		default:
			// (x & ^mask) ^ value: the bits outside the mask kept, the value written in.
			b.loadMark(s.From)
			b.add(&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: native32(^s.Mask), Xor: native32(s.Value)})
		}
		if s.Target == ruleset.CtMark {
			b.add(&expr.Ct{Key: expr.CtKeyMARK, Register: reg, SourceRegister: true})
		} else {
			b.add(&expr.Meta{Key: expr.MetaKeyMARK, Register: reg, SourceRegister: true})
		}
	case ruleset.SetCtZone:
		b.add(&expr.Immediate{Register: reg, Data: binaryutil.NativeEndian.PutUint16(s.Zone)},
			&expr.Ct{Key: expr.CtKey(unix.NFT_CT_ZONE), Register: reg, SourceRegister: true})
	case ruleset.TProxy:
		b.add(&expr.Immediate{Register: reg, Data: binaryutil.BigEndian.PutUint16(s.Port)},
			&expr.TProxy{Family: nfFamily(s.Family), TableFamily: unix.NFPROTO_INET, RegPort: reg})
	case ruleset.Redirect:
		b.add(&expr.Immediate{Register: reg, Data: binaryutil.BigEndian.PutUint16(s.Port)},
			&expr.Redir{RegisterProtoMin: reg})
	case ruleset.SNAT:
		b.add(&expr.Immediate{Register: reg, Data: s.Addr.AsSlice()},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: uint32(nfFamily(familyOf(s.Addr))), RegAddrMin: reg})
	case ruleset.Counter:
		b.add(&expr.Counter{})
	case ruleset.Verdict:
		kinds := map[ruleset.VerdictKind]expr.VerdictKind{ruleset.Accept: expr.VerdictAccept, ruleset.Drop: expr.VerdictDrop, ruleset.Return: expr.VerdictReturn, ruleset.Jump: expr.VerdictJump}
		b.add(&expr.Verdict{Kind: kinds[s.Kind], Chain: s.Chain})
	default:
		return fmt.Errorf("unknown statement %T", s)
	}
	return nil
}

// ruleExprs translates one rule. sets maps set names to the sets of the same batch (or
// the live ones).
func ruleExprs(r ruleset.Rule, sets map[string]*nftables.Set) ([]expr.Any, error) {
	b := exprBuilder{sets: sets}
	for _, m := range r.Matches {
		if err := b.match(m); err != nil {
			return nil, err
		}
	}
	for _, s := range r.Statements {
		if err := b.statement(s); err != nil {
			return nil, err
		}
	}
	return b.exprs, nil
}
