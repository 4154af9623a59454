package kernel

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// This file encodes nftables transactions straight from the model (package ruleset) into
// the bytes of one nfnetlink batch, the way nft itself encodes each construct, so that
// `nft list` prints back the rendered text. Root tests apply every construct (here) and
// every golden ruleset (package dataplane) and compare nft's print-back with Render;
// testdata records the bytes of each golden's batch.
//
// The bytes are exactly those google/nftables v0.3.0 produces for the same objects and
// expressions (as sendBatch frames them: no echo, an ack on the last message only), which
// is what nftmesh sent before it encoded on its own: TestDirectEncodingMatchesGoogle
// compares the two, message by message, for every golden intent, a replace carrying set
// elements and every construct, and FuzzDirectEncoding for compiled intents. Encoding
// here costs one buffer per transaction instead of an object, a few slices and a
// marshal per expression and per attribute (about 1,500 allocations for a pod's table).
// See docs/encoding.md.

// stampType is the rule user-data TLV where nftmesh keeps the rule's canonical text
// (comment excluded; the comment has its own TLV, which nft prints). nft ignores TLV
// types it does not know. The kernel hands user data back intact, so the stamp tells
// whether a live rule is exactly one nftmesh wrote, without decoding expressions.
const stampType = 0x6e // 'n'

// udataComment is the user-data TLV type of a rule's comment (NFTNL_UDATA_RULE_COMMENT)
// and of a set element's (NFTNL_UDATA_SET_ELEM_COMMENT): both are 0.
const udataComment = 0

// appendUserData appends a user-data TLV holding s and its NUL, as libnftnl does.
func appendUserData(b []byte, typ byte, s string) []byte {
	b = append(b, typ, byte(len(s)+1))
	b = append(b, s...)
	return append(b, 0)
}

// ruleUserData holds the comment and the stamp (the rule's body). Package ruleset's
// validation counts on this layout (a TLV each) to check that both fit the kernel's
// NFT_USERDATA_MAXLEN.
func ruleUserData(r ruleset.Rule, body string) []byte {
	return appendRuleUserData(nil, r, body)
}

func appendRuleUserData(b []byte, r ruleset.Rule, body string) []byte {
	if r.Comment != "" {
		b = appendUserData(b, udataComment, r.Comment)
	}
	return appendUserData(b, stampType, body)
}

func ruleUserDataLen(r ruleset.Rule, body string) int {
	n := 2 + len(body) + 1
	if r.Comment != "" {
		n += 2 + len(r.Comment) + 1
	}
	return n
}

// Header flags of the messages in our batches. google/nftables asks for an ack (and, for
// rules, an echo) of every message; sendBatch asked only for the ack of the last one, as
// a batch is then answered whole: so do we (batch.finish).
const (
	flagsNew  = unix.NLM_F_REQUEST | unix.NLM_F_CREATE
	flagsRule = unix.NLM_F_REQUEST | unix.NLM_F_CREATE | unix.NLM_F_APPEND
	flagsDel  = unix.NLM_F_REQUEST
)

func nftType(msg int) uint16 { return uint16(unix.NFNL_SUBSYS_NFTABLES<<8 | msg) }

// batch is an nfnetlink batch being encoded: BATCH_BEGIN, the transaction's messages,
// BATCH_END (finish), each nftables message for family inet.
type batch struct {
	*msgBuf
}

// newBatch starts a batch; size is a guess of its bytes. Release it once sent.
func newBatch(size, msgs int) *batch {
	b := &batch{newMsgBuf(size, msgs)}
	b.control(unix.NFNL_MSG_BATCH_BEGIN)
	return b
}

// control appends BATCH_BEGIN or BATCH_END: their nfgenmsg carries the subsystem.
func (b *batch) control(typ uint16) {
	b.begin(typ, unix.NLM_F_REQUEST)
	b.buf = append(b.buf, unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES)
	b.end()
}

// msg starts an nftables message of family inet.
func (b *batch) msg(typ int, flags uint16) {
	b.begin(nftType(typ), flags)
	b.buf = append(b.buf, unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0)
}

// finish appends BATCH_END and asks for the ack of the message before it: the kernel
// answers that one after every other (and answers every refused message anyway).
func (b *batch) finish() {
	b.setFlags(b.count()-1, unix.NLM_F_ACK)
	b.control(unix.NFNL_MSG_BATCH_END)
}

// writes is the number of messages between BATCH_BEGIN and BATCH_END.
func (b *batch) writes() int { return b.count() - 2 }

func (b *batch) newTable(name string) {
	b.msg(unix.NFT_MSG_NEWTABLE, flagsNew)
	b.attrString(unix.NFTA_TABLE_NAME, name)
	b.attrU32(unix.NFTA_TABLE_FLAGS, 0)
	b.end()
}

func (b *batch) delTable(name string) {
	b.msg(unix.NFT_MSG_DELTABLE, flagsDel)
	b.attrString(unix.NFTA_TABLE_NAME, name)
	b.attrU32(unix.NFTA_TABLE_FLAGS, 0)
	b.end()
}

// setKeyTypes are the kernel's key type (nft's datatype number) and length of each set
// type.
var setKeyTypes = map[ruleset.SetType]struct{ magic, len uint32 }{
	ruleset.SetTypeIPv4Addr:    {7, 4},
	ruleset.SetTypeIPv6Addr:    {8, 16},
	ruleset.SetTypeInetService: {13, 2},
}

// newSet adds a set with a batch-local ID (elements and lookups of the same batch refer
// to it by name and ID).
func (b *batch) newSet(table string, s *ruleset.Set, id uint32) {
	kt := setKeyTypes[s.Type]
	b.msg(unix.NFT_MSG_NEWSET, flagsNew)
	b.attrString(unix.NFTA_SET_TABLE, table)
	b.attrString(unix.NFTA_SET_NAME, s.Name)
	b.attrU32(unix.NFTA_SET_FLAGS, 0)
	b.attrU32(unix.NFTA_SET_KEY_TYPE, kt.magic)
	b.attrU32(unix.NFTA_SET_KEY_LEN, kt.len)
	b.attrU32(unix.NFTA_SET_ID, id)
	b.end()
}

// element is a set element to write: its key (an address's 4 or 16 bytes, or a port's
// 2, big-endian) and its comment.
type element struct {
	key     [16]byte
	keyLen  uint8
	comment string
}

func addrElement(a netip.Addr, comment string) element {
	e := element{comment: comment}
	switch {
	case a.Is4():
		k := a.As4()
		copy(e.key[:], k[:])
		e.keyLen = 4
	case a.IsValid():
		e.key = a.As16()
		e.keyLen = 16
	}
	return e
}

func portElement(p uint16, comment string) element {
	e := element{keyLen: 2, comment: comment}
	binary.BigEndian.PutUint16(e.key[:], p)
	return e
}

// size is the element's encoded size in an element list: its nest, its key nest holding
// the value, and its comment in user data, rounded up to whole attributes.
func (e *element) size() int {
	size := 4 + 4 + 4 + nlaAlign(int(e.keyLen)) // element nest, key nest, value
	if e.comment != "" {
		size += 4 + nlaAlign(2+len(e.comment)+1) // user data: type, length, text, NUL
	}
	return size
}

func nlaAlign(l int) int { return (l + 3) &^ 3 }

// maxElementList is the most bytes of elements one NEWSETELEM message carries: the
// element list attribute's length is 16 bits, and the message's other attributes (table
// and set names, at most 256 bytes each, and the set id) must fit beside it, so that the
// whole message stays under maxMessagePayload (checked before every send).
const maxElementList = 0xffff - 1024

// elementChunks splits elems into runs that each fit in one message's element list
// (issue #11: a single list of 2,000 elements wrapped its 16-bit length, and the kernel
// kept 907), as nft does.
func elementChunks(elems []element) [][]element {
	var out [][]element
	start, size := 0, 0
	for i := range elems {
		es := elems[i].size()
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

// elements writes a NEWSETELEM or DELSETELEM message of the elements, for the set named
// set with batch-local id (0: a set of an earlier transaction).
func (b *batch) elements(msgType int, table, set string, id uint32, elems []element) {
	b.msg(msgType, flagsNew) // google/nftables asks NLM_F_CREATE of deletes too
	b.attrString(unix.NFTA_SET_ELEM_LIST_SET, set)
	b.attrU32(unix.NFTA_SET_ELEM_LIST_SET_ID, id)
	b.attrString(unix.NFTA_SET_ELEM_LIST_TABLE, table)
	list := b.nest(unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS)
	for i := range elems {
		e := &elems[i]
		item := b.nest(uint16(i+1) | unix.NLA_F_NESTED)
		key := b.nest(unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_KEY)
		b.attr(unix.NFTA_DATA_VALUE, e.key[:e.keyLen])
		b.unnest(key)
		if e.comment != "" {
			b.attrHeader(unix.NFTA_SET_ELEM_USERDATA, 4+2+len(e.comment)+1)
			b.buf = appendUserData(b.buf, udataComment, e.comment)
			b.pad()
		}
		b.unnest(item)
	}
	b.unnest(list)
	b.end()
}

// setElements returns the elements of s to write: its own, or for a runtime set that a
// replace carries over, the live ones, comments (owners) included.
func setElements(s *ruleset.Set, live *Live) []element {
	if s.Runtime && live != nil {
		var out []element
		for _, ls := range live.Sets {
			if ls.Name != s.Name || ls.Type != s.Type {
				continue
			}
			for _, e := range ls.Elements {
				if s.Type == ruleset.SetTypeInetService {
					out = append(out, portElement(e.Port, e.Comment))
				} else {
					out = append(out, addrElement(e.Key, e.Comment))
				}
			}
		}
		return out
	}
	if len(s.Addrs)+len(s.Ports) == 0 {
		return nil
	}
	out := make([]element, 0, len(s.Addrs)+len(s.Ports))
	for _, a := range s.Addrs {
		out = append(out, addrElement(a, ""))
	}
	for _, p := range s.Ports {
		out = append(out, portElement(p, ""))
	}
	return out
}

var (
	hookNums = map[ruleset.Hook]uint32{
		ruleset.HookPrerouting:  unix.NF_INET_PRE_ROUTING,
		ruleset.HookInput:       unix.NF_INET_LOCAL_IN,
		ruleset.HookForward:     unix.NF_INET_FORWARD,
		ruleset.HookOutput:      unix.NF_INET_LOCAL_OUT,
		ruleset.HookPostrouting: unix.NF_INET_POST_ROUTING,
	}
	chainTypeNames = map[ruleset.ChainType]string{
		ruleset.ChainTypeFilter: "filter",
		ruleset.ChainTypeNAT:    "nat",
		ruleset.ChainTypeRoute:  "route",
	}
)

const (
	nfDrop   = 0 // NF_DROP, a chain policy and a verdict code
	nfAccept = 1 // NF_ACCEPT
)

func (b *batch) newChain(table string, c *ruleset.Chain) {
	b.msg(unix.NFT_MSG_NEWCHAIN, flagsNew)
	b.attrString(unix.NFTA_CHAIN_TABLE, table)
	b.attrString(unix.NFTA_CHAIN_NAME, c.Name)
	if c.Base != nil {
		if hook, ok := hookNums[c.Base.Hook]; ok {
			h := b.nest(unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK)
			b.attrU32(unix.NFTA_HOOK_HOOKNUM, hook)
			b.attrU32(unix.NFTA_HOOK_PRIORITY, uint32(int32(c.Base.Priority)))
			b.unnest(h)
		}
		policy := uint32(nfAccept)
		if c.Base.EffectivePolicy() == ruleset.PolicyDrop {
			policy = nfDrop
		}
		b.attrU32(unix.NFTA_CHAIN_POLICY, policy)
		if typ := chainTypeNames[c.Base.Type]; typ != "" {
			b.attrString(unix.NFTA_CHAIN_TYPE, typ)
		}
	}
	b.end()
}

// setRef is a set of the batch (or of the live table), as lookups name it.
type setRef struct {
	name string
	id   uint32
}

// newRule appends the rule to chain, with its comment and stamp (body) as user data.
// sets are the sets its lookups may name.
func (b *batch) newRule(table, chain string, r ruleset.Rule, body string, sets []setRef) error {
	b.msg(unix.NFT_MSG_NEWRULE, flagsRule)
	b.attrString(unix.NFTA_RULE_TABLE, table)
	b.attrString(unix.NFTA_RULE_CHAIN, chain)
	list := b.nest(unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS)
	w := exprWriter{b: b, sets: sets}
	for _, m := range r.Matches {
		if err := w.match(m); err != nil {
			return err
		}
	}
	for _, s := range r.Statements {
		if err := w.statement(s); err != nil {
			return err
		}
	}
	b.unnest(list)
	b.attrHeader(unix.NFTA_RULE_USERDATA, 4+ruleUserDataLen(r, body))
	b.buf = appendRuleUserData(b.buf, r, body)
	b.pad()
	b.end()
	return nil
}

// encodeApply encodes the transaction that makes a namespace holding live (nil: no
// table) hold exactly t: a pure add of the table, or the nft idiom for a replace (add,
// delete, add: the first add makes the delete valid even if the table vanished since it
// was read), with the live elements of runtime sets carried over. rb is t.RuleBodies().
func encodeApply(t *ruleset.Table, live *Live, rb [][]string) (*batch, error) {
	msgs, size := 2+len(t.Sets)+len(t.Chains), 64+64*len(t.Sets)+96*len(t.Chains)
	for ci, c := range t.Chains {
		msgs += len(c.Rules)
		for i, r := range c.Rules {
			size += 128 + 64*(len(r.Matches)+len(r.Statements)) + len(r.Comment) + len(rb[ci][i])
		}
	}
	b := newBatch(size, msgs+2)
	if live != nil {
		b.newTable(t.Name)
		b.delTable(t.Name)
	}
	b.newTable(t.Name)

	sets := make([]setRef, len(t.Sets))
	for i, s := range t.Sets {
		id := uint32(i + 1)
		sets[i] = setRef{s.Name, id}
		b.newSet(t.Name, s, id)
		// A message's element list is one netlink attribute, whose length is 16 bits:
		// more elements go in more messages.
		for _, chunk := range elementChunks(setElements(s, live)) {
			b.elements(unix.NFT_MSG_NEWSETELEM, t.Name, s.Name, id, chunk)
		}
	}
	for _, c := range t.Chains {
		b.newChain(t.Name, c)
	}
	for ci, c := range t.Chains {
		for i, r := range c.Rules {
			if err := b.newRule(t.Name, c.Name, r, rb[ci][i], sets); err != nil {
				return nil, fmt.Errorf("chain %s rule %d: %w", c.Name, i+1, err)
			}
		}
	}
	b.finish()
	return b, nil
}

// exprWriter writes the expressions of one rule and tracks its protocol context: like
// nft, it loads the family (meta nfproto) before the first network-header match and the
// transport protocol (meta l4proto) before the first tcp/udp header match, unless the
// rule already did.
type exprWriter struct {
	b      *batch
	sets   []setRef
	family ruleset.IPFamily
	proto  ruleset.L4Proto
}

const reg = 1 // NFT_REG_1: 16 bytes, room for an IPv6 address

// Expression keys and codes google/nftables and the kernel headers name.
const (
	ctKeyState  = unix.NFT_CT_STATE
	ctKeyMark   = unix.NFT_CT_MARK
	ctKeyZone   = unix.NFT_CT_ZONE
	tproxyFam   = 1 // NFTA_TPROXY_FAMILY
	tproxyPort  = 3 // NFTA_TPROXY_REG_PORT
	verdictJump = unix.NFT_JUMP
	verdictRet  = unix.NFT_RETURN
)

// expr opens an expression (a list element holding its name and its data) and returns
// what close needs.
func (w *exprWriter) expr(name string) (elem, data int) {
	b := w.b
	elem = b.nest(unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM)
	b.attrString(unix.NFTA_EXPR_NAME, name)
	data = b.nest(unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA)
	return elem, data
}

func (w *exprWriter) close(elem, data int) {
	w.b.unnest(data)
	w.b.unnest(elem)
}

// value writes a nested NFTA_DATA_VALUE under typ.
func (w *exprWriter) value(typ uint16, v []byte) {
	n := w.b.nest(unix.NLA_F_NESTED | typ)
	w.b.attr(unix.NFTA_DATA_VALUE, v)
	w.b.unnest(n)
}

func (w *exprWriter) meta(key uint32, source bool) {
	e, d := w.expr("meta")
	w.b.attrU32(unix.NFTA_META_KEY, key)
	if source {
		w.b.attrU32(unix.NFTA_META_SREG, reg)
	} else {
		w.b.attrU32(unix.NFTA_META_DREG, reg)
	}
	w.close(e, d)
}

func (w *exprWriter) ct(key uint32, source bool) {
	e, d := w.expr("ct")
	w.b.attrU32(unix.NFTA_CT_KEY, key)
	if source {
		w.b.attrU32(unix.NFTA_CT_SREG, reg)
	} else {
		w.b.attrU32(unix.NFTA_CT_DREG, reg)
	}
	w.close(e, d)
}

func (w *exprWriter) cmp(op uint32, data []byte) {
	e, d := w.expr("cmp")
	w.b.attrU32(unix.NFTA_CMP_SREG, reg)
	w.b.attrU32(unix.NFTA_CMP_OP, op)
	w.value(unix.NFTA_CMP_DATA, data)
	w.close(e, d)
}

func (w *exprWriter) cmpNative32(op, v uint32) {
	var d [4]byte
	binary.NativeEndian.PutUint32(d[:], v)
	w.cmp(op, d[:])
}

func (w *exprWriter) bitwise(length uint32, mask, xor []byte) {
	e, d := w.expr("bitwise")
	w.b.attrU32(unix.NFTA_BITWISE_SREG, reg)
	w.b.attrU32(unix.NFTA_BITWISE_DREG, reg)
	w.b.attrU32(unix.NFTA_BITWISE_LEN, length)
	w.value(unix.NFTA_BITWISE_MASK, mask)
	w.value(unix.NFTA_BITWISE_XOR, xor)
	w.close(e, d)
}

func (w *exprWriter) bitwise32(mask, xor uint32) {
	var m, x [4]byte
	binary.NativeEndian.PutUint32(m[:], mask)
	binary.NativeEndian.PutUint32(x[:], xor)
	w.bitwise(4, m[:], x[:])
}

func (w *exprWriter) payload(base, offset, length uint32) {
	e, d := w.expr("payload")
	w.b.attrU32(unix.NFTA_PAYLOAD_DREG, reg)
	w.b.attrU32(unix.NFTA_PAYLOAD_BASE, base)
	w.b.attrU32(unix.NFTA_PAYLOAD_OFFSET, offset)
	w.b.attrU32(unix.NFTA_PAYLOAD_LEN, length)
	w.close(e, d)
}

func (w *exprWriter) immediate(data []byte) {
	e, d := w.expr("immediate")
	w.b.attrU32(unix.NFTA_IMMEDIATE_DREG, reg)
	w.value(unix.NFTA_IMMEDIATE_DATA, data)
	w.close(e, d)
}

func (w *exprWriter) immediatePort(port uint16) {
	var d [2]byte
	binary.BigEndian.PutUint16(d[:], port)
	w.immediate(d[:])
}

func cmpOp(negate bool) uint32 {
	if negate {
		return unix.NFT_CMP_NEQ
	}
	return unix.NFT_CMP_EQ
}

func l4Number(p ruleset.L4Proto) byte {
	if p == ruleset.UDP {
		return unix.IPPROTO_UDP
	}
	return unix.IPPROTO_TCP
}

func (w *exprWriter) needFamily(f ruleset.IPFamily) {
	if w.family == f {
		return
	}
	proto := byte(unix.NFPROTO_IPV4)
	if f == ruleset.IPv6 {
		proto = unix.NFPROTO_IPV6
	}
	w.meta(unix.NFT_META_NFPROTO, false)
	w.cmp(unix.NFT_CMP_EQ, []byte{proto})
	w.family = f
}

func (w *exprWriter) l4proto(p ruleset.L4Proto) {
	w.meta(unix.NFT_META_L4PROTO, false)
	w.cmp(unix.NFT_CMP_EQ, []byte{l4Number(p)})
	w.proto = p
}

func (w *exprWriter) needProto(p ruleset.L4Proto) {
	if w.proto != p {
		w.l4proto(p)
	}
}

func (w *exprWriter) lookup(set string, negate bool) error {
	for i := len(w.sets) - 1; i >= 0; i-- { // the last of a name, as a map would keep
		s := w.sets[i]
		if s.name != set {
			continue
		}
		e, d := w.expr("lookup")
		w.b.attrU32(unix.NFTA_LOOKUP_SREG, reg)
		if negate {
			w.b.attrU32(unix.NFTA_LOOKUP_FLAGS, unix.NFT_LOOKUP_F_INV)
		}
		w.b.attrString(unix.NFTA_LOOKUP_SET, s.name)
		w.b.attrU32(unix.NFTA_LOOKUP_SET_ID, s.id)
		w.close(e, d)
		return nil
	}
	return fmt.Errorf("set @%s is not defined", set)
}

func (w *exprWriter) loadMark(kind ruleset.MarkKind) {
	if kind == ruleset.CtMark {
		w.ct(ctKeyMark, false)
	} else {
		w.meta(unix.NFT_META_MARK, false)
	}
}

// uidOps are the ordered comparisons of meta skuid; an unknown operator is equality.
var uidOps = map[ruleset.CmpOp]uint32{
	ruleset.OpLt: unix.NFT_CMP_LT, ruleset.OpGt: unix.NFT_CMP_GT,
	ruleset.OpLe: unix.NFT_CMP_LTE, ruleset.OpGe: unix.NFT_CMP_GTE,
}

func (w *exprWriter) match(m ruleset.Match) error {
	switch m := m.(type) {
	case ruleset.MetaL4Proto:
		w.l4proto(m.Proto)
	case ruleset.Mark:
		w.loadMark(m.Kind)
		if m.Mask != 0xffffffff {
			w.bitwise32(m.Mask, 0)
		}
		w.cmpNative32(cmpOp(m.Negate), m.Value)
	case ruleset.Interface:
		key := uint32(unix.NFT_META_IIFNAME)
		if m.Out {
			key = unix.NFT_META_OIFNAME
		}
		w.meta(key, false)
		if prefix, ok := m.Wildcard(); ok {
			// "eth*" is a prefix match, encoded as nft encodes it: the cmp covers the
			// prefix's bytes only, without the terminating NUL.
			w.cmp(cmpOp(m.Negate), []byte(prefix))
		} else {
			var name [unix.IFNAMSIZ]byte
			copy(name[:], m.Name)
			w.cmp(cmpOp(m.Negate), name[:])
		}
	case ruleset.SocketUID:
		w.meta(unix.NFT_META_SKUID, false)
		switch m.Op {
		case "", ruleset.OpEq, ruleset.OpNeq:
			w.cmpNative32(cmpOp(m.Op == ruleset.OpNeq), m.UID)
		default:
			// Ordered comparisons are byte-wise: compare big-endian, as nft does.
			e, d := w.expr("byteorder")
			w.b.attrU32(unix.NFTA_BYTEORDER_SREG, reg)
			w.b.attrU32(unix.NFTA_BYTEORDER_DREG, reg)
			w.b.attrU32(unix.NFTA_BYTEORDER_OP, unix.NFT_BYTEORDER_HTON)
			w.b.attrU32(unix.NFTA_BYTEORDER_LEN, 4)
			w.b.attrU32(unix.NFTA_BYTEORDER_SIZE, 4)
			w.close(e, d)
			var uid [4]byte
			binary.BigEndian.PutUint32(uid[:], m.UID)
			w.cmp(uidOps[m.Op], uid[:])
		}
	case ruleset.Addr:
		w.needFamily(m.Family)
		offset, size := uint32(12), uint32(4) // ip saddr
		if m.Family == ruleset.IPv6 {
			offset, size = 8, 16
		}
		if m.Dir == ruleset.Destination {
			offset += size
		}
		w.payload(unix.NFT_PAYLOAD_NETWORK_HEADER, offset, size)
		if m.Set != "" {
			return w.lookup(m.Set, m.Negate)
		}
		if !m.Prefix.IsSingleIP() {
			var mask, xor [16]byte
			n := prefixMask(m.Prefix, mask[:])
			w.bitwise(size, mask[:n], xor[:size])
		}
		a := m.Prefix.Masked().Addr()
		if a.Is4() {
			k := a.As4()
			w.cmp(cmpOp(m.Negate), k[:])
		} else {
			w.cmp(cmpOp(m.Negate), a.AsSlice())
		}
	case ruleset.Port:
		if m.Proto != "" {
			w.needProto(m.Proto)
		}
		offset := uint32(2) // dport
		if m.Dir == ruleset.SPort {
			offset = 0
		}
		w.payload(unix.NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2)
		if m.Set != "" {
			return w.lookup(m.Set, m.Negate)
		}
		var p [2]byte
		binary.BigEndian.PutUint16(p[:], m.Port)
		w.cmp(cmpOp(m.Negate), p[:])
	case ruleset.CtState:
		w.ct(ctKeyState, false)
		w.bitwise32(uint32(m.States), 0)
		w.cmpNative32(unix.NFT_CMP_NEQ, 0)
	default:
		return fmt.Errorf("unknown match %T", m)
	}
	return nil
}

// prefixMask writes p's mask into mask and returns its length in bytes (the address's).
func prefixMask(p netip.Prefix, mask []byte) int {
	size := p.Addr().BitLen() / 8
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return size
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

// verdictCodes are the kernel's verdict codes; an unknown kind is drop (0).
var verdictCodes = map[ruleset.VerdictKind]int32{
	ruleset.Accept: nfAccept, ruleset.Drop: nfDrop, ruleset.Return: verdictRet, ruleset.Jump: verdictJump,
}

func (w *exprWriter) statement(s ruleset.Statement) error {
	b := w.b
	switch s := s.(type) {
	case ruleset.SetMark:
		switch {
		case s.From == "":
			var v [4]byte
			binary.NativeEndian.PutUint32(v[:], s.Value)
			w.immediate(v[:])
		case s.Mask == 0:
			w.loadMark(s.From)
		default:
			// (x & ^mask) ^ value: the bits outside the mask kept, the value written in.
			w.loadMark(s.From)
			w.bitwise32(^s.Mask, s.Value)
		}
		if s.Target == ruleset.CtMark {
			w.ct(ctKeyMark, true)
		} else {
			w.meta(unix.NFT_META_MARK, true)
		}
	case ruleset.SetCtZone:
		var z [2]byte
		binary.NativeEndian.PutUint16(z[:], s.Zone)
		w.immediate(z[:])
		w.ct(ctKeyZone, true)
	case ruleset.TProxy:
		w.immediatePort(s.Port)
		e, d := w.expr("tproxy")
		b.attrU32(tproxyFam, uint32(nfFamily(s.Family)))
		b.attrU32(tproxyPort, reg)
		w.close(e, d)
	case ruleset.Redirect:
		w.immediatePort(s.Port)
		e, d := w.expr("redir")
		b.attrU32(unix.NFTA_REDIR_REG_PROTO_MIN, reg)
		w.close(e, d)
	case ruleset.SNAT:
		if s.Addr.Is4() {
			a := s.Addr.As4()
			w.immediate(a[:])
		} else {
			w.immediate(s.Addr.AsSlice())
		}
		e, d := w.expr("nat")
		b.attrU32(unix.NFTA_NAT_TYPE, unix.NFT_NAT_SNAT)
		b.attrU32(unix.NFTA_NAT_FAMILY, uint32(nfFamily(familyOf(s.Addr))))
		b.attrU32(unix.NFTA_NAT_REG_ADDR_MIN, reg)
		w.close(e, d)
	case ruleset.Counter:
		e, d := w.expr("counter")
		b.attrU64(unix.NFTA_COUNTER_BYTES, 0)
		b.attrU64(unix.NFTA_COUNTER_PACKETS, 0)
		w.close(e, d)
	case ruleset.Verdict:
		e, d := w.expr("immediate")
		b.attrU32(unix.NFTA_IMMEDIATE_DREG, unix.NFT_REG_VERDICT)
		data := b.nest(unix.NLA_F_NESTED | unix.NFTA_IMMEDIATE_DATA)
		v := b.nest(unix.NLA_F_NESTED | unix.NFTA_DATA_VERDICT)
		b.attrU32(unix.NFTA_VERDICT_CODE, uint32(verdictCodes[s.Kind]))
		if s.Chain != "" {
			b.attrString(unix.NFTA_VERDICT_CHAIN, s.Chain)
		}
		b.unnest(v)
		b.unnest(data)
		w.close(e, d)
	default:
		return fmt.Errorf("unknown statement %T", s)
	}
	return nil
}

// encodeDelete encodes the deletion of the table named name.
func encodeDelete(name string) *batch {
	b := newBatch(128, 3)
	b.delTable(name)
	b.finish()
	return b
}

// encodeElementChange encodes a change of one address in a set of an existing table:
// delete it (del), add it with owner as its comment (add), or both in that order (the
// address changes owner).
func encodeElementChange(table, set string, addr netip.Addr, owner string, del, add bool) *batch {
	b := newBatch(256, 4)
	if del {
		b.elements(unix.NFT_MSG_DELSETELEM, table, set, 0, []element{addrElement(addr, "")})
	}
	if add {
		b.elements(unix.NFT_MSG_NEWSETELEM, table, set, 0, []element{addrElement(addr, owner)})
	}
	b.finish()
	return b
}
