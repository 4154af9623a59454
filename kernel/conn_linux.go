package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/ruleset"
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

// Conn is a connection to nftables in one network namespace: one blocking netlink socket,
// for reads and for transactions (encoded by encode_linux.go). Not safe for concurrent
// use; after an error, close it.
type Conn struct {
	raw *socket
	// afterWrite, when set (tests only), runs between a replace's commit and the read-back
	// of the elements it carried.
	afterWrite func()
}

// NewConn connects to nftables in the network namespace of the calling thread: call it on
// a thread that is inside the target namespace; the socket stays there and the Conn can
// then be used from any thread.
func NewConn() (*Conn, error) {
	raw, err := openSocket(unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, err
	}
	return &Conn{raw: raw}, nil
}

// Dial connects to nftables in namespace ns without moving the calling thread (the
// socket is made on one of ns's visiting threads). Code that also needs rtnetlink should
// make both in one ns.Do with NewConn and NewRoutingConn.
func Dial(ns *netns.NS) (*Conn, error) {
	var c *Conn
	err := ns.Do(func() (err error) {
		c, err = NewConn()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", ns, err)
	}
	return c, nil
}

// Close closes the socket.
func (n *Conn) Close() error { return n.raw.Close() }

// NetNSCookie identifies the Conn's namespace for as long as the system runs.
func (n *Conn) NetNSCookie() (uint64, error) { return n.raw.netNSCookie() }

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
	return n.raw.execute(uint16(unix.NFNL_SUBSYS_NFTABLES<<8|msgType), netlink.Dump, data)
}

// Generation returns the namespace's nftables ruleset generation: it changes with every
// committed transaction, by anyone.
func (n *Conn) Generation() (uint32, error) {
	q := genQuery()
	if err := n.raw.executeQueries(q); err != nil {
		return 0, err
	}
	return generation(q)
}

func genQuery() *query {
	return &query{Type: uint16(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN), Data: nfgenmsg(unix.NFPROTO_UNSPEC)}
}

// generation reads the answer to genQuery.
func generation(q *query) (uint32, error) {
	if q.Err != nil {
		return 0, q.Err
	}
	for _, m := range q.Out {
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

// tableQuery gets the table named name: a get, cheaper than a dump of every table, and
// all there is to read in a namespace that never had one (every fresh enroll).
func tableQuery(name string) *query {
	data := append(nfgenmsg(unix.NFPROTO_INET), mustAttrs([]netlink.Attribute{{Type: unix.NFTA_TABLE_NAME, Data: []byte(name + "\x00")}})...)
	return &query{Type: uint16(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETTABLE), Data: data}
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

var hookNames = map[uint32]ruleset.Hook{
	unix.NF_INET_PRE_ROUTING:  ruleset.HookPrerouting,
	unix.NF_INET_LOCAL_IN:     ruleset.HookInput,
	unix.NF_INET_FORWARD:      ruleset.HookForward,
	unix.NF_INET_LOCAL_OUT:    ruleset.HookOutput,
	unix.NF_INET_POST_ROUTING: ruleset.HookPostrouting,
}

var setTypeByMagic = map[uint32]ruleset.SetType{7: ruleset.SetTypeIPv4Addr, 8: ruleset.SetTypeIPv6Addr, 13: ruleset.SetTypeInetService}

// ReadLive returns the table named name, or nil when the namespace has none: its flags,
// sets, chains and rules, and the other objects it holds (nftmesh writes none). Set
// elements are read only when withElements is set.
func (n *Conn) ReadLive(name string, withElements bool) (*Live, error) {
	return n.readLive(name, withElements, true, nil)
}

// Object types of NFT_MSG_GETOBJ (NFTA_OBJ_TYPE), as nft names them.
var objectKinds = map[uint32]string{
	1: "counter", 2: "quota", 3: "ct helper", 4: "limit", 5: "connlimit", 6: "tunnel",
	7: "ct timeout", 8: "secmark", 9: "ct expectation", 10: "synproxy",
}

// Flowtable attributes (linux/netfilter/nf_tables.h).
const (
	nftaFlowtableTable = 1
	nftaFlowtableName  = 2
)

// readLive reads the table; withObjects also reads its stateful objects and flowtables
// (Apply and ReadLive need them to tell drift; Delete and the element edits do not).
// table, when given, is a tableQuery(name) already answered.
func (n *Conn) readLive(name string, withElements, withObjects bool, table *query) (*Live, error) {
	tableAttr := func(typ uint16) []netlink.Attribute {
		return []netlink.Attribute{{Type: typ, Data: []byte(name + "\x00")}}
	}
	if table == nil {
		table = tableQuery(name)
		if err := n.raw.executeQueries(table); err != nil {
			return nil, fmt.Errorf("get table: %w", err)
		}
	}
	if errors.Is(table.Err, unix.ENOENT) {
		return nil, nil
	}
	if table.Err != nil {
		return nil, fmt.Errorf("get table: %w", table.Err)
	}
	var live *Live
	for _, m := range table.Out {
		ad, err := attrs(m)
		if err != nil {
			return nil, err
		}
		var tname string
		var flags uint32
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_TABLE_NAME:
				tname = ad.String()
			case unix.NFTA_TABLE_FLAGS:
				flags = ad.Uint32()
			}
		}
		if tname == name {
			live = &Live{Name: name, Flags: flags}
		}
	}
	if live == nil {
		return nil, nil
	}

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
	if withObjects {
		if live.Objects, err = n.readObjects(name); err != nil {
			return nil, err
		}
	}
	return live, nil
}

// readObjects lists the table's stateful objects (counters, quotas, ... of any type) and
// flowtables: nftmesh writes none, so each is drift.
func (n *Conn) readObjects(table string) ([]LiveObject, error) {
	var out []LiveObject
	objs, err := n.dump(unix.NFT_MSG_GETOBJ, []netlink.Attribute{{Type: unix.NFTA_OBJ_TABLE, Data: []byte(table + "\x00")}})
	if err != nil {
		return nil, fmt.Errorf("list objects: %w", err)
	}
	for _, m := range objs {
		ad, err := attrs(m)
		if err != nil {
			return nil, err
		}
		var t string
		var o LiveObject
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_OBJ_TABLE:
				t = ad.String()
			case unix.NFTA_OBJ_NAME:
				o.Name = ad.String()
			case unix.NFTA_OBJ_TYPE:
				typ := ad.Uint32()
				if o.Kind = objectKinds[typ]; o.Kind == "" {
					o.Kind = fmt.Sprintf("object of type %d", typ)
				}
			}
		}
		if t == table {
			out = append(out, o)
		}
	}
	fts, err := n.dump(unix.NFT_MSG_GETFLOWTABLE, []netlink.Attribute{{Type: nftaFlowtableTable, Data: []byte(table + "\x00")}})
	if err != nil {
		return nil, fmt.Errorf("list flowtables: %w", err)
	}
	for _, m := range fts {
		ad, err := attrs(m)
		if err != nil {
			return nil, err
		}
		var t string
		o := LiveObject{Kind: "flowtable"}
		for ad.Next() {
			switch ad.Type() {
			case nftaFlowtableTable:
				t = ad.String()
			case nftaFlowtableName:
				o.Name = ad.String()
			}
		}
		if t == table {
			out = append(out, o)
		}
	}
	return out, nil
}

func decodeChain(m netlink.Message) (*LiveChain, string, error) {
	ad, err := attrs(m)
	if err != nil {
		return nil, "", err
	}
	c := &LiveChain{}
	var table string
	var base ruleset.BaseChain
	hooked := false
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_CHAIN_TABLE:
			table = ad.String()
		case unix.NFTA_CHAIN_NAME:
			c.Name = ad.String()
		case unix.NFTA_CHAIN_TYPE:
			base.Type = ruleset.ChainType(ad.String())
		case unix.NFTA_CHAIN_POLICY:
			base.Policy = ruleset.PolicyAccept
			if ad.Uint32() == 0 { // NF_DROP
				base.Policy = ruleset.PolicyDrop
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
	return decodeElements(msgs)
}

func decodeElements(msgs []netlink.Message) ([]LiveElement, error) {
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

// Apply makes nftmesh's table in the Conn's namespace exactly t, in one transaction: a pure
// add when it is absent, nothing at all when the live table matches, otherwise an
// add-delete-add replace of the whole table. Elements of Runtime sets are read first and
// written back in the same transaction, so a replace never drops them. Nothing outside
// the table is touched; if the kernel rejects the transaction, nothing changes.
func (n *Conn) Apply(t *ruleset.Table, cache *Cache) (Result, error) {
	c, err := n.prepare(t, cache)
	if err != nil {
		return Result{}, err
	}
	if err := n.look(c, false, false); err != nil {
		return Result{}, err
	}
	return n.change(c)
}

// Check is what a read-only look at a namespace's table found, for an applier that
// writes only under a lock (package dataplane): it checks without the lock, so that a
// no-op takes none, and only when the table does not hold takes the lock and calls
// ApplyChecked, which checks again there. Use a Check once, on the Conn that made it.
type Check struct {
	t     *ruleset.Table
	rb    [][]string // t.RuleBodies(): rendered once per apply
	cache *Cache     // nil: none given, or no namespace cookie
	key   cacheKey
	hash  string
	gen   uint32 // the generation read before live (cache != nil)
	genOK bool   // gen was read
	live  *Live  // the table as read at gen, when read
	read  bool
	holds bool
}

// Holds reports whether the namespace held exactly the table when checked.
func (c *Check) Holds() bool { return c.holds }

// Check looks, reading only, at whether the Conn's namespace holds exactly t. It answers
// from cache when the generation has not moved since t was verified there, and reads
// the table when t is what was last verified or written there (someone committed
// since: a no-op is still likely). Otherwise (t is new there, or changed, or there is
// no cache) it reads nothing and does not hold: ApplyChecked reads under the lock.
func (n *Conn) Check(t *ruleset.Table, cache *Cache) (*Check, error) {
	c, err := n.prepare(t, cache)
	if err != nil {
		return nil, err
	}
	if err := n.look(c, true, false); err != nil {
		return nil, err
	}
	return c, nil
}

// ApplyChecked is Apply of the table c was made for. Call it holding the lock that the
// namespace's writers hold: when no commit happened since c's look (the generation is
// the same), it acts on what c found; otherwise it looks again, so a change made
// between the check and the lock is seen.
func (n *Conn) ApplyChecked(c *Check) (Result, error) {
	current := false
	if c.cache != nil && (c.holds || c.read) {
		gen, err := n.Generation()
		if err != nil {
			return Result{}, fmt.Errorf("table inet %s: %w", c.t.Name, err)
		}
		current = gen == c.gen
	}
	if !current {
		// When c found only that the cache could not vouch (it read no table: t is new
		// here, or changed), the generation it read then serves as the one before this
		// read: the read decides, and vouches for c.gen only if no commit came between.
		genRead := c.cache != nil && !c.holds && !c.read && c.genOK
		if err := n.look(c, false, genRead); err != nil {
			return Result{}, err
		}
	}
	return n.change(c)
}

// prepare renders and validates t, and keys it in cache.
func (n *Conn) prepare(t *ruleset.Table, cache *Cache) (*Check, error) {
	rb := t.RuleBodies()
	if err := t.ValidateBodies(rb); err != nil {
		return nil, fmt.Errorf("table inet %s: invalid: %w", t.Name, err)
	}
	c := &Check{t: t, rb: rb}
	if cache != nil {
		// Without SO_NETNS_COOKIE (Linux < 5.14) there is no safe key: no cache.
		if cookie, err := n.raw.netNSCookie(); err == nil {
			c.cache, c.key, c.hash = cache, cacheKey{cookie, t.Name}, contentKey(t, rb)
		}
	}
	return c, nil
}

// look finds out whether the namespace holds c.t: from the cache if it can, else by
// reading the table. With lazy it reads only when Check's doc says so. With genRead,
// c.gen is a generation read earlier and not vouched for by the cache: look reads the
// table without asking for the generation again.
func (n *Conn) look(c *Check, lazy, genRead bool) error {
	c.live, c.read, c.holds = nil, false, false
	var table *query
	if c.cache != nil && !genRead {
		c.genOK = false
		if lazy && !c.cache.has(c.key) {
			// Nothing was ever verified or written here by this cache (a fresh enroll):
			// no generation can vouch, and lazy reads nothing: ApplyChecked reads both.
			return nil
		}
		gen := genQuery()
		qs := []*query{gen}
		if !lazy {
			// The table is read unless the cache vouches: ask for both at once.
			table = tableQuery(c.t.Name)
			qs = append(qs, table)
		}
		if err := n.raw.executeQueries(qs...); err != nil {
			return fmt.Errorf("table inet %s: %w", c.t.Name, err)
		}
		var err error
		if c.gen, err = generation(gen); err != nil {
			return fmt.Errorf("table inet %s: %w", c.t.Name, err)
		}
		c.genOK = true
		if c.cache.verified(c.key, c.gen, c.hash) {
			c.holds = true
			return nil
		}
	}
	if lazy && (c.cache == nil || !c.cache.known(c.key, c.hash)) {
		return nil
	}
	live, err := n.readLive(c.t.Name, true, true, table)
	if err != nil {
		return fmt.Errorf("table inet %s: read: %w", c.t.Name, err)
	}
	c.live, c.read, c.holds = live, true, live.matches(c.t, c.rb)
	if c.holds && c.cache != nil {
		// Only a read that no commit raced may vouch for the generation.
		if after, err := n.Generation(); err == nil && after == c.gen {
			c.cache.store(c.key, c.gen, c.hash)
		}
	}
	return nil
}

// change writes c.t over the table c found, unless it holds.
func (n *Conn) change(c *Check) (Result, error) {
	t := c.t
	if c.holds {
		return Result{Action: Unchanged}, nil
	}
	if c.cache != nil {
		c.cache.forget(c.key)
	}
	action := Created
	if c.live != nil {
		action = Replaced
	}
	carried := carriedElements(t, c.live)
	writes, err := n.write(t, c.live, c.rb)
	if err != nil {
		return Result{}, fmt.Errorf("table inet %s: %s: kernel rejected the transaction, nothing changed: %w", t.Name, action, err)
	}
	res := Result{Action: action, Writes: writes}
	if n.afterWrite != nil {
		n.afterWrite()
	}
	if err := n.verifyCarried(t.Name, carried); err != nil {
		return res, fmt.Errorf("table inet %s: %s, but %w", t.Name, action, err)
	}
	if c.cache != nil {
		c.cache.wrote(c.key, c.hash)
	}
	return res, nil
}

// carriedElements returns, by set, the runtime elements a replace of live by t carries
// over.
func carriedElements(t *ruleset.Table, live *Live) map[string][]LiveElement {
	if live == nil {
		return nil
	}
	out := map[string][]LiveElement{}
	for _, s := range t.Sets {
		if !s.Runtime {
			continue
		}
		for _, ls := range live.Sets {
			if ls.Name == s.Name && ls.Type == s.Type && len(ls.Elements) > 0 {
				out[s.Name] = ls.Elements
			}
		}
	}
	return out
}

// verifyCarried reads back the sets a replace carried elements over to, and fails unless
// every element is there with its comment: a replace never reports success with fewer
// elements than it carried. It reads whatever else was committed meanwhile: nftmesh's
// own writers of these elements (dataplane's AddPodIP and RemovePodIP) hold the
// namespace's lock, as its replace does, so none of them removed one in between; and a
// commit to another table, which moves the generation too, says nothing about ours.
func (n *Conn) verifyCarried(table string, carried map[string][]LiveElement) error {
	for set, want := range carried {
		got, err := n.readElements(table, &LiveSet{Name: set})
		if err != nil {
			return fmt.Errorf("verifying set %s: %w", set, err)
		}
		have := make(map[LiveElement]bool, len(got))
		for _, e := range got {
			have[e] = true
		}
		missing := 0
		for _, e := range want {
			if !have[e] {
				missing++
			}
		}
		if missing > 0 {
			return fmt.Errorf("set %s holds %d of the %d elements carried over (%d missing)", set, len(want)-missing, len(want), missing)
		}
	}
	return nil
}

// write encodes the transaction that makes the namespace, which holds live (nil: no
// table), hold exactly t, sends it as one batch, and returns its number of messages.
func (n *Conn) write(t *ruleset.Table, live *Live, rb [][]string) (int, error) {
	b, err := encodeApply(t, live, rb)
	if err != nil {
		return 0, err
	}
	defer b.release()
	if err := n.raw.sendBatch(b); err != nil {
		return 0, err
	}
	return b.writes(), nil
}

// Delete removes the table named name from the Conn's namespace. It reports whether
// there was one; an absent table is not an error.
func (n *Conn) Delete(name string) (bool, error) {
	live, err := n.readLive(name, false, false, nil)
	if err != nil {
		return false, fmt.Errorf("table inet %s: read: %w", name, err)
	}
	if live == nil {
		return false, nil
	}
	if err := n.raw.sendOnce(encodeDelete(name)); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil // deleted by someone else meanwhile
		}
		return false, fmt.Errorf("table inet %s: delete: %w", name, err)
	}
	return true, nil
}

// findElement looks addr up in the set: one request for the set's type, one for the
// element (the kernel's single-element get), whatever the size of the table or the set.
// Reading the whole table per pod made a node's n-th enrollment cost O(n).
func (n *Conn) findElement(table, set string, addr netip.Addr) (*LiveElement, ruleset.SetType, error) {
	typ, err := n.setType(table, set)
	if err != nil {
		return nil, "", err
	}
	if (typ == ruleset.SetTypeIPv4Addr) != addr.Is4() || typ == ruleset.SetTypeInetService {
		return nil, "", fmt.Errorf("set %s holds %s, not %s", set, typ, addr)
	}
	key, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.NFTA_DATA_VALUE, Data: addr.AsSlice()}})
	if err != nil {
		return nil, "", err
	}
	elem, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_KEY, Data: key}})
	if err != nil {
		return nil, "", err
	}
	list, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: elem}})
	if err != nil {
		return nil, "", err
	}
	body, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(table + "\x00")},
		{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(set + "\x00")},
		{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS, Data: list},
	})
	if err != nil {
		return nil, "", err
	}
	msgs, err := n.raw.execute(uint16(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETSETELEM), 0, append(nfgenmsg(unix.NFPROTO_INET), body...))
	if errors.Is(err, unix.ENOENT) {
		return nil, typ, nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("set %s: get %s: %w", set, addr, err)
	}
	elems, err := decodeElements(msgs)
	if err != nil {
		return nil, "", err
	}
	for _, e := range elems {
		if e.Key == addr {
			return &e, typ, nil
		}
	}
	return nil, typ, nil
}

// setType reads one set's key type (a single-set get, not a dump of the table).
func (n *Conn) setType(table, set string) (ruleset.SetType, error) {
	msgs, err := n.raw.execute(uint16(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETSET), 0, append(nfgenmsg(unix.NFPROTO_INET),
		mustAttrs([]netlink.Attribute{
			{Type: unix.NFTA_SET_TABLE, Data: []byte(table + "\x00")},
			{Type: unix.NFTA_SET_NAME, Data: []byte(set + "\x00")},
		})...))
	if errors.Is(err, unix.ENOENT) {
		return "", fmt.Errorf("set %s does not exist in table inet %s", set, table)
	}
	if err != nil {
		return "", fmt.Errorf("set %s: %w", set, err)
	}
	for _, m := range msgs {
		ad, err := attrs(m)
		if err != nil {
			return "", err
		}
		for ad.Next() {
			if ad.Type() == unix.NFTA_SET_KEY_TYPE {
				return setTypeByMagic[ad.Uint32()], nil
			}
		}
	}
	return "", fmt.Errorf("set %s: no key type in the kernel's answer", set)
}

func mustAttrs(a []netlink.Attribute) []byte {
	b, err := netlink.MarshalAttributes(a)
	if err != nil {
		panic(err) // only fixed, well-formed attributes are passed
	}
	return b
}

// AddElement makes addr an element of the set, with owner as its comment. It writes
// nothing when the element is there with the same owner, and replaces the element in one
// transaction when another owner has it (the address was reused). It reports whether it
// wrote.
func (n *Conn) AddElement(table, set string, addr netip.Addr, owner string) (bool, error) {
	cur, _, err := n.findElement(table, set, addr)
	if err != nil {
		return false, err
	}
	if cur != nil && cur.Comment == owner {
		return false, nil
	}
	if err := n.raw.sendOnce(encodeElementChange(table, set, addr, owner, cur != nil, true)); err != nil {
		return false, fmt.Errorf("set %s: add %s: %w", set, addr, err)
	}
	return true, nil
}

// DeleteElement removes addr from the set if owner still owns it. It reports whether it
// wrote; an absent element, or one another owner has taken over, is left alone.
func (n *Conn) DeleteElement(table, set string, addr netip.Addr, owner string) (bool, error) {
	cur, _, err := n.findElement(table, set, addr)
	if err != nil || cur == nil || cur.Comment != owner {
		return false, err
	}
	if err := n.raw.sendOnce(encodeElementChange(table, set, addr, "", true, false)); err != nil {
		return false, fmt.Errorf("set %s: delete %s: %w", set, addr, err)
	}
	return true, nil
}
