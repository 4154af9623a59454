package kernel

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// The encoding nftmesh used before encode_linux.go: the model translated into
// github.com/google/nftables objects and expressions, which google/nftables encodes, kept
// as the reference that the direct encoding must match byte for byte
// (TestDirectEncodingMatchesGoogle, FuzzDirectEncoding). Production no longer uses it.

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

// gRuleUserData is ruleUserData as google/nftables' userdata package writes it.
func gRuleUserData(r ruleset.Rule, body string) []byte {
	var ud []byte
	if r.Comment != "" {
		ud = userdata.AppendString(ud, userdata.TypeComment, r.Comment)
	}
	return userdata.AppendString(ud, stampType, body)
}

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

func gSetElements(s *ruleset.Set) []nftables.SetElement {
	var out []nftables.SetElement
	for _, a := range s.Addrs {
		out = append(out, nftables.SetElement{Key: a.AsSlice()})
	}
	for _, p := range s.Ports {
		out = append(out, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(p)})
	}
	return out
}

// gExprBuilder tracks the protocol context of one rule: like nft, it loads the family
// (meta nfproto) before the first network-header match and the transport protocol
// (meta l4proto) before the first tcp/udp header match, unless the rule already did.
type gExprBuilder struct {
	exprs  []expr.Any
	family ruleset.IPFamily
	proto  ruleset.L4Proto
	sets   map[string]*nftables.Set
}

const gReg = reg // NFT_REG_1: 16 bytes, room for an IPv6 address

func (b *gExprBuilder) add(e ...expr.Any) { b.exprs = append(b.exprs, e...) }

func gCmpOp(negate bool) expr.CmpOp {
	if negate {
		return expr.CmpOpNeq
	}
	return expr.CmpOpEq
}

func gNative32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

func (b *gExprBuilder) needFamily(f ruleset.IPFamily) {
	if b.family == f {
		return
	}
	proto := byte(unix.NFPROTO_IPV4)
	if f == ruleset.IPv6 {
		proto = unix.NFPROTO_IPV6
	}
	b.add(&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: gReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: gReg, Data: []byte{proto}})
	b.family = f
}

func (b *gExprBuilder) needProto(p ruleset.L4Proto) {
	if b.proto == p {
		return
	}
	b.add(&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: gReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: gReg, Data: []byte{l4Number(p)}})
	b.proto = p
}

func (b *gExprBuilder) lookup(set string, negate bool) error {
	s, ok := b.sets[set]
	if !ok {
		return fmt.Errorf("set @%s is not defined", set)
	}
	b.add(&expr.Lookup{SourceRegister: gReg, SetName: s.Name, SetID: s.ID, Invert: negate})
	return nil
}

func (b *gExprBuilder) loadMark(kind ruleset.MarkKind) {
	if kind == ruleset.CtMark {
		b.add(&expr.Ct{Key: expr.CtKeyMARK, Register: gReg})
	} else {
		b.add(&expr.Meta{Key: expr.MetaKeyMARK, Register: gReg})
	}
}

func (b *gExprBuilder) match(m ruleset.Match) error {
	switch m := m.(type) {
	case ruleset.MetaL4Proto:
		b.add(&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: gReg},
			&expr.Cmp{Op: expr.CmpOpEq, Register: gReg, Data: []byte{l4Number(m.Proto)}})
		b.proto = m.Proto
	case ruleset.Mark:
		b.loadMark(m.Kind)
		if m.Mask != 0xffffffff {
			b.add(&expr.Bitwise{SourceRegister: gReg, DestRegister: gReg, Len: 4, Mask: gNative32(m.Mask), Xor: gNative32(0)})
		}
		b.add(&expr.Cmp{Op: gCmpOp(m.Negate), Register: gReg, Data: gNative32(m.Value)})
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
		b.add(&expr.Meta{Key: key, Register: gReg}, &expr.Cmp{Op: gCmpOp(m.Negate), Register: gReg, Data: name})
	case ruleset.SocketUID:
		b.add(&expr.Meta{Key: expr.MetaKeySKUID, Register: gReg})
		switch m.Op {
		case "", ruleset.OpEq, ruleset.OpNeq:
			b.add(&expr.Cmp{Op: gCmpOp(m.Op == ruleset.OpNeq), Register: gReg, Data: gNative32(m.UID)})
		default:
			// Ordered comparisons are byte-wise: compare big-endian, as nft does.
			ops := map[ruleset.CmpOp]expr.CmpOp{ruleset.OpLt: expr.CmpOpLt, ruleset.OpGt: expr.CmpOpGt, ruleset.OpLe: expr.CmpOpLte, ruleset.OpGe: expr.CmpOpGte}
			b.add(&expr.Byteorder{SourceRegister: gReg, DestRegister: gReg, Op: expr.ByteorderHton, Len: 4, Size: 4},
				&expr.Cmp{Op: ops[m.Op], Register: gReg, Data: binaryutil.BigEndian.PutUint32(m.UID)})
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
		b.add(&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: gReg, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: size})
		if m.Set != "" {
			return b.lookup(m.Set, m.Negate)
		}
		if !m.Prefix.IsSingleIP() {
			b.add(&expr.Bitwise{SourceRegister: gReg, DestRegister: gReg, Len: size, Mask: gPrefixMask(m.Prefix), Xor: make([]byte, size)})
		}
		b.add(&expr.Cmp{Op: gCmpOp(m.Negate), Register: gReg, Data: m.Prefix.Masked().Addr().AsSlice()})
	case ruleset.Port:
		if m.Proto != "" {
			b.needProto(m.Proto)
		}
		offset := uint32(2) // dport
		if m.Dir == ruleset.SPort {
			offset = 0
		}
		b.add(&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: gReg, Base: expr.PayloadBaseTransportHeader, Offset: offset, Len: 2})
		if m.Set != "" {
			return b.lookup(m.Set, m.Negate)
		}
		b.add(&expr.Cmp{Op: gCmpOp(m.Negate), Register: gReg, Data: binaryutil.BigEndian.PutUint16(m.Port)})
	case ruleset.CtState:
		b.add(&expr.Ct{Key: expr.CtKeySTATE, Register: gReg},
			&expr.Bitwise{SourceRegister: gReg, DestRegister: gReg, Len: 4, Mask: gNative32(uint32(m.States)), Xor: gNative32(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: gReg, Data: gNative32(0)})
	default:
		return fmt.Errorf("unknown match %T", m)
	}
	return nil
}

func gPrefixMask(p netip.Prefix) []byte {
	size := p.Addr().BitLen() / 8
	mask := make([]byte, size)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return mask
}

func (b *gExprBuilder) statement(s ruleset.Statement) error {
	switch s := s.(type) {
	case ruleset.SetMark:
		switch {
		case s.From == "":
			b.add(&expr.Immediate{Register: gReg, Data: gNative32(s.Value)})
		case s.Mask == 0:
			b.loadMark(s.From)
		default:
			// (x & ^mask) ^ value: the bits outside the mask kept, the value written in.
			b.loadMark(s.From)
			b.add(&expr.Bitwise{SourceRegister: gReg, DestRegister: gReg, Len: 4, Mask: gNative32(^s.Mask), Xor: gNative32(s.Value)})
		}
		if s.Target == ruleset.CtMark {
			b.add(&expr.Ct{Key: expr.CtKeyMARK, Register: gReg, SourceRegister: true})
		} else {
			b.add(&expr.Meta{Key: expr.MetaKeyMARK, Register: gReg, SourceRegister: true})
		}
	case ruleset.SetCtZone:
		b.add(&expr.Immediate{Register: gReg, Data: binaryutil.NativeEndian.PutUint16(s.Zone)},
			&expr.Ct{Key: expr.CtKey(unix.NFT_CT_ZONE), Register: gReg, SourceRegister: true})
	case ruleset.TProxy:
		b.add(&expr.Immediate{Register: gReg, Data: binaryutil.BigEndian.PutUint16(s.Port)},
			&expr.TProxy{Family: nfFamily(s.Family), TableFamily: unix.NFPROTO_INET, RegPort: gReg})
	case ruleset.Redirect:
		b.add(&expr.Immediate{Register: gReg, Data: binaryutil.BigEndian.PutUint16(s.Port)},
			&expr.Redir{RegisterProtoMin: gReg})
	case ruleset.SNAT:
		b.add(&expr.Immediate{Register: gReg, Data: s.Addr.AsSlice()},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: uint32(nfFamily(familyOf(s.Addr))), RegAddrMin: gReg})
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
func gRuleExprs(r ruleset.Rule, sets map[string]*nftables.Set) ([]expr.Any, error) {
	b := gExprBuilder{sets: sets}
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

// queueApplyGoogle queues on conn the transaction that makes the namespace, which holds
// live (nil: no table), hold exactly t, and returns the number of messages it queued, as
// Conn.write did before encode_linux.go. It only encodes: the caller flushes.
func queueApplyGoogle(conn *nftables.Conn, t *ruleset.Table, live *Live, rb [][]string) (int, error) {
	writes := 0
	nt := nfTable(t.Name)
	if live != nil {
		// The nft idiom "add, delete, add": the first add makes the delete valid even if
		// the table vanished since we read it.
		conn.AddTable(nt)
		conn.DelTable(nt)
		writes += 2
	}
	conn.AddTable(nt)
	writes++

	sets := map[string]*nftables.Set{}
	for i, s := range t.Sets {
		ns := nfSet(nt, s, uint32(i+1))
		elems := gSetElements(s)
		if s.Runtime && live != nil {
			elems = gKeptElements(live, s)
		}
		// A message's element list is one netlink attribute, whose length is 16 bits:
		// more elements go in more messages, like nft does (issue #11: a single list of
		// 2,000 elements wrapped the length, and the kernel kept 907).
		chunks := gElementChunks(elems)
		var first []nftables.SetElement
		if len(chunks) > 0 {
			first = chunks[0]
		}
		if err := conn.AddSet(ns, first); err != nil {
			return 0, fmt.Errorf("set %s: %w", s.Name, err)
		}
		sets[s.Name] = ns
		writes++
		for i, c := range chunks {
			if i > 0 {
				if err := conn.SetAddElements(ns, c); err != nil {
					return 0, fmt.Errorf("set %s: %w", s.Name, err)
				}
			}
			writes++
		}
	}
	chains := map[string]*nftables.Chain{}
	for _, c := range t.Chains {
		chains[c.Name] = conn.AddChain(nfChain(nt, c))
		writes++
	}
	for ci, c := range t.Chains {
		for i, r := range c.Rules {
			exprs, err := gRuleExprs(r, sets)
			if err != nil {
				return 0, fmt.Errorf("chain %s rule %d: %w", c.Name, i+1, err)
			}
			conn.AddRule(&nftables.Rule{Table: nt, Chain: chains[c.Name], Exprs: exprs, UserData: gRuleUserData(r, rb[ci][i])})
			writes++
		}
	}
	return writes, nil
}

// elementSize is the encoded size of e in an element list (google/nftables' encoding:
// the element's nest, its key nest holding the value, and its comment in user data),
// rounded up to whole attributes; never less than the real size.
func gElementSize(e nftables.SetElement) int {
	size := 4 + 4 + 4 + nlaAlign(len(e.Key)) // element nest, key nest, value
	if len(e.KeyEnd) > 0 {
		size += 4 + 4 + nlaAlign(len(e.KeyEnd))
	}
	if e.IntervalEnd {
		size += 8
	}
	if e.Timeout != 0 {
		size += 12
	}
	if len(e.Val) > 0 {
		size += 4 + 4 + nlaAlign(len(e.Val))
	}
	if e.Comment != "" {
		size += 4 + nlaAlign(2+len(e.Comment)+1) // user data: type, length, text, NUL
	}
	return size
}

// elementChunks splits elems into runs that each fit in one message's element list.
func gElementChunks(elems []nftables.SetElement) [][]nftables.SetElement {
	var out [][]nftables.SetElement
	start, size := 0, 0
	for i, e := range elems {
		es := gElementSize(e)
		if size+es > maxElementList && i > start {
			out = append(out, elems[start:i])
			start, size = i, 0
		}
		size += es
	}
	if start < len(elems) {
		out = append(out, elems[start:])
	}
	return out
}

// keptElements returns the live elements of a runtime set, comments (owners) included.
func gKeptElements(live *Live, s *ruleset.Set) []nftables.SetElement {
	var out []nftables.SetElement
	for _, ls := range live.Sets {
		if ls.Name != s.Name || ls.Type != s.Type {
			continue
		}
		for _, e := range ls.Elements {
			key := e.Key.AsSlice()
			if s.Type == ruleset.SetTypeInetService {
				key = binary.BigEndian.AppendUint16(nil, e.Port)
			}
			out = append(out, nftables.SetElement{Key: key, Comment: e.Comment})
		}
	}
	return out
}

// frameBatch encodes the batch as the bytes sendBatch sends: the messages numbered from
// firstSeq on, NLM_F_ECHO cleared everywhere and NLM_F_ACK only on the last message
// before BATCH_END, whatever the encoder asked for.
func frameBatch(msgs []netlink.Message, firstSeq uint32) []byte {
	size := 0
	for _, m := range msgs {
		size += unix.NLMSG_HDRLEN + nlmsgAlign(len(m.Data))
	}
	buf := make([]byte, 0, size)
	last := len(msgs) - 2 // the message before BATCH_END
	for i, m := range msgs {
		flags := uint16(m.Header.Flags) &^ (unix.NLM_F_ECHO | unix.NLM_F_ACK)
		if i == last {
			flags |= unix.NLM_F_ACK
		}
		buf = appendMessage(buf, uint16(m.Header.Type), flags, firstSeq+uint32(i), m.Data)
	}
	return buf
}

// The reference encoding runs google/nftables through its test-only dial hook
// (nftables.WithTestDial, which hands every netlink exchange of a Conn to a function
// instead of a socket), as production did before encode_linux.go: Flush hands the
// finished batch to send, and frameBatch frames it as sendBatch framed it (no echo, an
// ack on the last message before BATCH_END).
//
// What the harness relies on, pinned by encoder_linux_test.go: Flush passes the whole
// transaction to the hook once, as BATCH_BEGIN, the queued messages in order, BATCH_END;
// it then asks the hook for an answer per message by calling it with a nil request, and
// an ack (an NLMSG_ERROR with errno 0) for each satisfies it. The hook keeps send's error
// and encoder.Flush returns it, once and as send made it.

// encoder is a google/nftables Conn that only queues and encodes; Flush hands the queued
// transaction, as one batch, to send.
type encoder struct {
	*nftables.Conn
	sendErr error
}

// newEncoder returns an encoder whose Flush encodes the queued transaction and hands it,
// as one batch, to send; Flush returns send's error.
func newEncoder(send func(batch []netlink.Message) error) (*encoder, error) {
	e := &encoder{}
	conn, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		// google/nftables reads an answer per message; the batch has been answered whole.
		ack := []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 4)}}
		if req != nil {
			e.sendErr = send(req)
		}
		return ack, nil
	}))
	if err != nil {
		return nil, err
	}
	e.Conn = conn
	return e, nil
}

// Flush encodes the queued messages, sends them as one batch, and returns the encoding's
// or the send's error. With nothing queued it sends nothing.
func (e *encoder) Flush() error {
	e.sendErr = nil
	if err := e.Conn.Flush(); err != nil {
		return err
	}
	err := e.sendErr
	e.sendErr = nil
	return err
}
