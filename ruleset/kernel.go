package ruleset

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"

	"github.com/nftmesh/nftmesh/internal/nlraw"
	"golang.org/x/sys/unix"
)

// This file reads nftmesh's table back from the kernel and applies a desired table as one
// transaction. Reads use raw netlink dumps that decode only names, hooks and rule user
// data: enough to tell whether the live table is exactly what nftmesh wrote, robust to
// expressions google/nftables cannot decode, and one socket for the whole read.

// Action says what Apply did.
type Action string

const (
	Unchanged Action = "unchanged" // the live table was identical: nothing written
	Created   Action = "created"   // the table was absent: a pure add
	Replaced  Action = "replaced"  // the table differed: replaced in one transaction
)

// Result reports one Apply.
type Result struct {
	Action Action
	// Writes counts the netlink messages of the transaction (0 when unchanged).
	Writes int
}

// Live is nftmesh's table as the kernel holds it.
type Live struct {
	Name   string
	Sets   []*LiveSet
	Chains []*LiveChain
}

// LiveSet is a set of the live table.
type LiveSet struct {
	Name     string
	Type     SetType // empty when the kernel's key type is not one nftmesh writes
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
	Base  *BaseChain
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

// Conn is a connection to nftables in one network namespace: one blocking netlink socket,
// for reads and for the transactions that google/nftables encodes. Not safe for concurrent
// use; after an error, close it.
type Conn struct {
	raw *nlraw.Conn
}

// NewConn connects to nftables in the network namespace of the calling thread: call it on
// a thread that is inside the target namespace; the socket stays there and the Conn can
// then be used from any thread.
func NewConn() (*Conn, error) {
	raw, err := nlraw.Open(unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, err
	}
	return &Conn{raw: raw}, nil
}

// DialNetNS connects to nftables in the namespace of nsFD without moving the calling
// thread: the socket is made on a thread that is ended after. Code that applies often
// should call NewConn from a thread it keeps in the namespace (package netnsexec).
func DialNetNS(nsFD int) (*Conn, error) {
	if nsFD <= 0 {
		return nil, fmt.Errorf("invalid netns fd %d (0 would mean the current namespace)", nsFD)
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(nsFD, &fs); err != nil || fs.Type != unix.NSFS_MAGIC {
		return nil, fmt.Errorf("fd %d is not a network namespace", nsFD)
	}
	raw, err := nlraw.OpenAt(nsFD, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, err
	}
	return &Conn{raw: raw}, nil
}

// txConn returns a google/nftables connection that queues and encodes a transaction and
// hands the finished batch to this Conn's socket (mdlayher/netlink's nltest.Func is the
// seam): google/nftables remains the encoder, the send is one sendmsg and one receive.
func (n *Conn) txConn() (*nftables.Conn, error) {
	return nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		// google/nftables reads an answer per message; the batch has been answered whole.
		ack := []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 4)}}
		if req == nil {
			return ack, nil
		}
		if err := n.raw.SendBatch(req); err != nil {
			return nil, err
		}
		return ack, nil
	}))
}

// Close closes the socket.
func (n *Conn) Close() error { return n.raw.Close() }

// NetNSCookie identifies the Conn's namespace for as long as the system runs.
func (n *Conn) NetNSCookie() (uint64, error) { return n.raw.NetNSCookie() }

func nfgenmsg(family uint8) []byte { return []byte{family, unix.NFNETLINK_V0, 0, 0} }

func (n *Conn) dump(msgType int, attrs []netlink.Attribute) ([]netlink.Message, error) {
	data := nfgenmsg(unix.NFPROTO_INET)
	if len(attrs) > 0 {
		b, err := netlink.MarshalAttributes(attrs)
		if err != nil {
			return nil, err
		}
		data = append(data, b...)
	}
	return n.raw.Execute(uint16(unix.NFNL_SUBSYS_NFTABLES<<8|msgType), netlink.Dump, data)
}

// Generation returns the namespace's nftables ruleset generation: it changes with every
// committed transaction, by anyone.
func (n *Conn) Generation() (uint32, error) {
	msgs, err := n.raw.Execute(uint16(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETGEN), 0, nfgenmsg(unix.NFPROTO_UNSPEC))
	if err != nil {
		return 0, err
	}
	for _, m := range msgs {
		ad, err := attrs(m)
		if err != nil {
			return 0, err
		}
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
	}
	return 0, errors.New("no generation id in reply")
}

func attrs(m netlink.Message) (*netlink.AttributeDecoder, error) {
	if len(m.Data) < 4 {
		return nil, errors.New("short nftables message")
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	return ad, nil
}

var hookNames = map[uint32]Hook{
	unix.NF_INET_PRE_ROUTING:  HookPrerouting,
	unix.NF_INET_LOCAL_IN:     HookInput,
	unix.NF_INET_FORWARD:      HookForward,
	unix.NF_INET_LOCAL_OUT:    HookOutput,
	unix.NF_INET_POST_ROUTING: HookPostrouting,
}

var setTypeByMagic = map[uint32]SetType{7: SetTypeIPv4Addr, 8: SetTypeIPv6Addr, 13: SetTypeInetService}

// ReadLive returns the table named name, or nil when the namespace has none. Set
// elements are read only when withElements is set.
func (n *Conn) ReadLive(name string, withElements bool) (*Live, error) {
	return n.readLive(name, withElements)
}

func (n *Conn) readLive(name string, withElements bool) (*Live, error) {
	tableAttr := func(typ uint16) []netlink.Attribute {
		return []netlink.Attribute{{Type: typ, Data: []byte(name + "\x00")}}
	}
	tables, err := n.dump(unix.NFT_MSG_GETTABLE, nil)
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	found := false
	for _, m := range tables {
		ad, err := attrs(m)
		if err != nil {
			return nil, err
		}
		for ad.Next() {
			if ad.Type() == unix.NFTA_TABLE_NAME && ad.String() == name {
				found = true
			}
		}
	}
	if !found {
		return nil, nil
	}
	live := &Live{Name: name}

	sets, err := n.dump(unix.NFT_MSG_GETSET, tableAttr(unix.NFTA_SET_TABLE))
	if err != nil {
		return nil, fmt.Errorf("list sets: %w", err)
	}
	for _, m := range sets {
		ad, err := attrs(m)
		if err != nil {
			return nil, err
		}
		s := &LiveSet{}
		var table string
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_SET_TABLE:
				table = ad.String()
			case unix.NFTA_SET_NAME:
				s.Name = ad.String()
			case unix.NFTA_SET_KEY_TYPE:
				s.Type = setTypeByMagic[ad.Uint32()]
			}
		}
		if table != name {
			continue
		}
		if withElements {
			if s.Elements, err = n.readElements(name, s); err != nil {
				return nil, fmt.Errorf("set %s: %w", s.Name, err)
			}
		}
		live.Sets = append(live.Sets, s)
	}

	chains, err := n.dump(unix.NFT_MSG_GETCHAIN, tableAttr(unix.NFTA_CHAIN_TABLE))
	if err != nil {
		return nil, fmt.Errorf("list chains: %w", err)
	}
	byName := map[string]*LiveChain{}
	for _, m := range chains {
		c, table, err := decodeChain(m)
		if err != nil {
			return nil, err
		}
		if table != name {
			continue
		}
		live.Chains = append(live.Chains, c)
		byName[c.Name] = c
	}

	rules, err := n.dump(unix.NFT_MSG_GETRULE, tableAttr(unix.NFTA_RULE_TABLE))
	if err != nil {
		return nil, fmt.Errorf("list rules: %w", err)
	}
	for _, m := range rules {
		ad, err := attrs(m)
		if err != nil {
			return nil, err
		}
		var table, chain string
		r := LiveRule{Foreign: true}
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_RULE_TABLE:
				table = ad.String()
			case unix.NFTA_RULE_CHAIN:
				chain = ad.String()
			case unix.NFTA_RULE_HANDLE:
				r.Handle = ad.Uint64()
			case unix.NFTA_RULE_USERDATA:
				ud := ad.Bytes()
				r.Comment, _ = userdata.GetString(ud, userdata.TypeComment)
				if body, ok := userdata.GetString(ud, stampType); ok {
					r.Body, r.Foreign = body, false
				}
			}
		}
		if c := byName[chain]; c != nil && table == name {
			c.Rules = append(c.Rules, r)
		}
	}
	return live, nil
}

func decodeChain(m netlink.Message) (*LiveChain, string, error) {
	ad, err := attrs(m)
	if err != nil {
		return nil, "", err
	}
	c := &LiveChain{}
	var table string
	var base BaseChain
	hooked := false
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_CHAIN_TABLE:
			table = ad.String()
		case unix.NFTA_CHAIN_NAME:
			c.Name = ad.String()
		case unix.NFTA_CHAIN_TYPE:
			base.Type = ChainType(ad.String())
		case unix.NFTA_CHAIN_POLICY:
			base.Policy = PolicyAccept
			if ad.Uint32() == 0 { // NF_DROP
				base.Policy = PolicyDrop
			}
		case unix.NFTA_CHAIN_HOOK:
			hooked = true
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					switch nad.Type() {
					case unix.NFTA_HOOK_HOOKNUM:
						base.Hook = hookNames[nad.Uint32()]
					case unix.NFTA_HOOK_PRIORITY:
						base.Priority = int(int32(nad.Uint32()))
					}
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		return nil, "", err
	}
	if hooked {
		c.Base = &base
	}
	return c, table, nil
}

func (n *Conn) readElements(table string, s *LiveSet) ([]LiveElement, error) {
	msgs, err := n.dump(unix.NFT_MSG_GETSETELEM, []netlink.Attribute{
		{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(table + "\x00")},
		{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(s.Name + "\x00")},
	})
	if err != nil {
		return nil, err
	}
	var out []LiveElement
	for _, m := range msgs {
		ad, err := attrs(m)
		if err != nil {
			return nil, err
		}
		for ad.Next() {
			if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
				continue
			}
			ad.Nested(func(list *netlink.AttributeDecoder) error {
				for list.Next() {
					var e LiveElement
					list.Nested(func(elem *netlink.AttributeDecoder) error {
						for elem.Next() {
							switch elem.Type() {
							case unix.NFTA_SET_ELEM_KEY:
								elem.Nested(func(key *netlink.AttributeDecoder) error {
									for key.Next() {
										if key.Type() == unix.NFTA_DATA_VALUE {
											b := key.Bytes()
											if len(b) == 2 {
												e.Port = binary.BigEndian.Uint16(b)
											} else if a, ok := netip.AddrFromSlice(b); ok {
												e.Key = a
											}
										}
									}
									return nil
								})
							case unix.NFTA_SET_ELEM_USERDATA:
								e.Comment, _ = userdata.GetString(elem.Bytes(), userdata.NFTNL_UDATA_SET_ELEM_COMMENT)
							}
						}
						return nil
					})
					out = append(out, e)
				}
				return nil
			})
		}
		if err := ad.Err(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Matches reports whether the live table is exactly the desired one: the same sets (with
// the same elements, except for sets whose elements are managed at run time), the same
// chains with the same hooks, and in each chain the same rules, all stamped by nftmesh,
// in the same order.
func (l *Live) Matches(t *Table) bool { return l.matches(t, t.renderBodies()) }

func (l *Live) matches(t *Table, rb rendered) bool {
	if l == nil || l.Name != t.Name || len(l.Sets) != len(t.Sets) || len(l.Chains) != len(t.Chains) {
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
		if !s.Runtime && !slices.Equal(ls.elementStrings(), s.elementStrings()) {
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
			want.Policy = c.Base.policy()
			if *lc.Base != want {
				return false
			}
		}
		for i, r := range c.Rules {
			lr := lc.Rules[i]
			if lr.Foreign || lr.Body != rb.body(ci, i) || lr.Comment != r.Comment {
				return false
			}
		}
	}
	return true
}

func (s *LiveSet) elementStrings() []string {
	set := &Set{Type: s.Type}
	for _, e := range s.Elements {
		if s.Type == SetTypeInetService {
			set.Ports = append(set.Ports, e.Port)
		} else {
			set.Addrs = append(set.Addrs, e.Key)
		}
	}
	return set.elementStrings()
}

// Render prints the live table in the layout of Table.Render. Rules come from their
// stamps; a rule nftmesh did not write shows as a comment line with its handle, so that
// a diff against the desired table points at it.
func (l *Live) Render() string {
	t := &Table{Name: l.Name}
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s {\n", Family, t.Name)
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
		set := &Set{Name: s.Name, Type: typ}
		for _, e := range s.Elements {
			if typ == SetTypeInetService {
				set.Ports = append(set.Ports, e.Port)
			} else if e.Key.IsValid() {
				set.Addrs = append(set.Addrs, e.Key)
			}
		}
		renderSet(&b, set)
	}
	for _, c := range l.Chains {
		sep()
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if c.Base != nil {
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %d; policy %s;\n", c.Base.Type, c.Base.Hook, c.Base.Priority, c.Base.policy())
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

// Apply makes nftmesh's table in the Conn's namespace exactly t, in one transaction: a pure
// add when it is absent, nothing at all when the live table matches, otherwise an
// add-delete-add replace of the whole table. Elements of Runtime sets are read first and
// written back in the same transaction, so a replace never drops them. Nothing outside
// the table is touched; if the kernel rejects the transaction, nothing changes.
func (n *Conn) Apply(t *Table, cache *Cache) (Result, error) {
	rb := t.renderBodies()
	if err := t.validate(rb); err != nil {
		return Result{}, fmt.Errorf("table inet %s: invalid: %w", t.Name, err)
	}
	var key cacheKey
	var hash string
	var gen uint32
	if cache != nil {
		// Without SO_NETNS_COOKIE (Linux < 5.14) there is no safe key: no cache.
		if cookie, err := n.raw.NetNSCookie(); err != nil {
			cache = nil
		} else {
			key = cacheKey{cookie, t.Name}
		}
	}
	if cache != nil {
		var err error
		if gen, err = n.Generation(); err != nil {
			return Result{}, fmt.Errorf("table inet %s: %w", t.Name, err)
		}
		hash = t.contentKey(rb)
		if cache.verified(key, gen, hash) {
			return Result{Action: Unchanged}, nil
		}
	}
	live, err := n.readLive(t.Name, true)
	if err != nil {
		return Result{}, fmt.Errorf("table inet %s: read: %w", t.Name, err)
	}
	if live.matches(t, rb) {
		if cache != nil {
			// Only a read that no commit raced may vouch for the generation.
			if after, err := n.Generation(); err == nil && after == gen {
				cache.store(key, gen, hash)
			}
		}
		return Result{Action: Unchanged}, nil
	}
	if cache != nil {
		cache.forget(key)
	}
	action := Created
	if live != nil {
		action = Replaced
	}
	writes, err := n.write(t, live, rb)
	if err != nil {
		return Result{}, fmt.Errorf("table inet %s: %s: kernel rejected the transaction, nothing changed: %w", t.Name, action, err)
	}
	return Result{Action: action, Writes: writes}, nil
}

// write queues the transaction on a google/nftables Conn and flushes it as one batch.
func (n *Conn) write(t *Table, live *Live, rb rendered) (int, error) {
	conn, err := n.txConn()
	if err != nil {
		return 0, err
	}
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
		elems := setElements(s)
		if s.Runtime && live != nil {
			elems = keptElements(live, s)
		}
		if err := conn.AddSet(ns, elems); err != nil {
			return 0, fmt.Errorf("set %s: %w", s.Name, err)
		}
		sets[s.Name] = ns
		writes++
		if len(elems) > 0 {
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
			exprs, err := ruleExprs(r, sets)
			if err != nil {
				return 0, fmt.Errorf("chain %s rule %d: %w", c.Name, i+1, err)
			}
			conn.AddRule(&nftables.Rule{Table: nt, Chain: chains[c.Name], Exprs: exprs, UserData: ruleUserData(r, rb.body(ci, i))})
			writes++
		}
	}
	if err := conn.Flush(); err != nil {
		return 0, err
	}
	return writes, nil
}

// keptElements returns the live elements of a runtime set, comments (owners) included.
func keptElements(live *Live, s *Set) []nftables.SetElement {
	var out []nftables.SetElement
	for _, ls := range live.Sets {
		if ls.Name != s.Name || ls.Type != s.Type {
			continue
		}
		for _, e := range ls.Elements {
			key := e.Key.AsSlice()
			if s.Type == SetTypeInetService {
				key = binary.BigEndian.AppendUint16(nil, e.Port)
			}
			out = append(out, nftables.SetElement{Key: key, Comment: e.Comment})
		}
	}
	return out
}

// Delete removes the table named name from the Conn's namespace. It reports whether
// there was one; an absent table is not an error.
func (n *Conn) Delete(name string) (bool, error) {
	live, err := n.readLive(name, false)
	if err != nil {
		return false, fmt.Errorf("table inet %s: read: %w", name, err)
	}
	if live == nil {
		return false, nil
	}
	conn, err := n.txConn()
	if err != nil {
		return false, err
	}
	conn.DelTable(nfTable(name))
	if err := conn.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil // deleted by someone else meanwhile
		}
		return false, fmt.Errorf("table inet %s: delete: %w", name, err)
	}
	return true, nil
}

// findElement reads the set and returns the element for addr, if any.
func (n *Conn) findElement(table, set string, addr netip.Addr) (*LiveElement, SetType, error) {
	live, err := n.readLive(table, false)
	if err != nil {
		return nil, "", err
	}
	if live == nil {
		return nil, "", fmt.Errorf("table inet %s does not exist", table)
	}
	var ls *LiveSet
	for _, s := range live.Sets {
		if s.Name == set {
			ls = s
		}
	}
	if ls == nil {
		return nil, "", fmt.Errorf("set %s does not exist in table inet %s", set, table)
	}
	if (ls.Type == SetTypeIPv4Addr) != addr.Is4() || ls.Type == SetTypeInetService {
		return nil, "", fmt.Errorf("set %s holds %s, not %s", set, ls.Type, addr)
	}
	elems, err := n.readElements(table, ls)
	if err != nil {
		return nil, "", err
	}
	for _, e := range elems {
		if e.Key == addr {
			return &e, ls.Type, nil
		}
	}
	return nil, ls.Type, nil
}

// AddElement makes addr an element of the set, with owner as its comment. It writes
// nothing when the element is there with the same owner, and replaces the element in one
// transaction when another owner has it (the address was reused). It reports whether it
// wrote.
func (n *Conn) AddElement(table, set string, addr netip.Addr, owner string) (bool, error) {
	cur, typ, err := n.findElement(table, set, addr)
	if err != nil {
		return false, err
	}
	if cur != nil && cur.Comment == owner {
		return false, nil
	}
	conn, err := n.txConn()
	if err != nil {
		return false, err
	}
	s := &nftables.Set{Table: nfTable(table), Name: set, KeyType: setTypes[typ]}
	if cur != nil {
		if err := conn.SetDeleteElements(s, []nftables.SetElement{{Key: addr.AsSlice()}}); err != nil {
			return false, err
		}
	}
	if err := conn.SetAddElements(s, []nftables.SetElement{{Key: addr.AsSlice(), Comment: owner}}); err != nil {
		return false, err
	}
	if err := conn.Flush(); err != nil {
		return false, fmt.Errorf("set %s: add %s: %w", set, addr, err)
	}
	return true, nil
}

// DeleteElement removes addr from the set if owner still owns it. It reports whether it
// wrote; an absent element, or one another owner has taken over, is left alone.
func (n *Conn) DeleteElement(table, set string, addr netip.Addr, owner string) (bool, error) {
	cur, typ, err := n.findElement(table, set, addr)
	if err != nil || cur == nil || cur.Comment != owner {
		return false, err
	}
	conn, err := n.txConn()
	if err != nil {
		return false, err
	}
	s := &nftables.Set{Table: nfTable(table), Name: set, KeyType: setTypes[typ]}
	if err := conn.SetDeleteElements(s, []nftables.SetElement{{Key: addr.AsSlice()}}); err != nil {
		return false, err
	}
	if err := conn.Flush(); err != nil {
		return false, fmt.Errorf("set %s: delete %s: %w", set, addr, err)
	}
	return true, nil
}
