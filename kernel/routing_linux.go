package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// RoutingConn is an rtnetlink connection in one network namespace, for a pod's policy
// routing (ruleset.Routing): one blocking socket, because the check runs on every apply,
// changes or not. Not safe for concurrent use; after an error, close it.
type RoutingConn struct {
	raw *socket
}

// NewRoutingConn connects to rtnetlink in the network namespace of the calling thread,
// like NewConn.
func NewRoutingConn() (*RoutingConn, error) {
	raw, err := openSocket(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	return &RoutingConn{raw: raw}, nil
}

// Close closes the socket.
func (c *RoutingConn) Close() error { return c.raw.Close() }

// loopbackIndex is lo's interface index, the same in every network namespace.
const loopbackIndex = 1

type routeFamily struct {
	nl     int // AF_INET, AF_INET6
	name   string
	wanted bool
}

func routeFamilies(r ruleset.Routing) []routeFamily {
	return []routeFamily{
		{unix.AF_INET, "IPv4", true},
		{unix.AF_INET6, "IPv6", r.IPv6},
	}
}

func rtattrU32(b []byte, typ uint16, v uint32) []byte {
	var a [8]byte
	binary.NativeEndian.PutUint16(a[0:2], 8)
	binary.NativeEndian.PutUint16(a[2:4], typ)
	binary.NativeEndian.PutUint32(a[4:8], v)
	return append(b, a[:]...)
}

func tableByte(t int) byte {
	if t < 256 {
		return byte(t)
	}
	return unix.RT_TABLE_UNSPEC // the table is in the attribute
}

// ruleMsg is `ip rule add fwmark Mark/Mask lookup Table pref Priority` (typ RTM_NEWRULE)
// or its delete (RTM_DELRULE).
func ruleMsg(typ uint16, f routeFamily, r ruleset.Routing) request {
	hdr := make([]byte, 12) // struct fib_rule_hdr
	hdr[0] = byte(f.nl)
	hdr[4] = tableByte(r.Table)
	hdr[7] = unix.FR_ACT_TO_TBL
	b := rtattrU32(hdr, unix.FRA_PRIORITY, uint32(r.Priority))
	b = rtattrU32(b, unix.FRA_FWMARK, r.Mark)
	b = rtattrU32(b, unix.FRA_FWMASK, r.Mask)
	b = rtattrU32(b, unix.FRA_TABLE, uint32(r.Table))
	return request{Type: typ, Flags: createFlags(typ), Data: b}
}

// routeMsg is `ip route add local default dev lo table Table` (RTM_NEWROUTE) or its
// delete (RTM_DELROUTE).
func routeMsg(typ uint16, f routeFamily, r ruleset.Routing) request {
	hdr := make([]byte, 12) // struct rtmsg; dst_len 0: default
	hdr[0] = byte(f.nl)
	hdr[4] = tableByte(r.Table)
	hdr[5] = unix.RTPROT_BOOT
	hdr[6] = unix.RT_SCOPE_HOST
	hdr[7] = unix.RTN_LOCAL
	b := rtattrU32(hdr, unix.RTA_TABLE, uint32(r.Table))
	b = rtattrU32(b, unix.RTA_OIF, loopbackIndex)
	return request{Type: typ, Flags: createFlags(typ), Data: b}
}

func createFlags(typ uint16) uint16 {
	if typ == unix.RTM_NEWRULE || typ == unix.RTM_NEWROUTE {
		return unix.NLM_F_CREATE | unix.NLM_F_EXCL
	}
	return 0
}

// write sends the requests in one sendmsg; ignore lists errnos that mean "already so".
func (c *RoutingConn) write(reqs []request, what []string, ignore ...unix.Errno) error {
	if len(reqs) == 0 {
		return nil
	}
	errs, err := c.raw.executeAll(reqs)
	if err != nil {
		return err
	}
	var all []error
	for i, e := range errs {
		if e != nil && !slices.ContainsFunc(ignore, func(x unix.Errno) bool { return errors.Is(e, x) }) {
			all = append(all, fmt.Errorf("%s: %w", what[i], e))
		}
	}
	return errors.Join(all...)
}

// ruleInfo and routeInfo are the parts of the kernel's rules and routes the check needs.
type ruleInfo struct {
	family          int
	mark, mask      uint32
	hasMark         bool
	table, priority int
}

type routeInfo struct {
	family, table, oif int
	typ, dstLen        uint8
}

func hasRule(rules []ruleInfo, f routeFamily, r ruleset.Routing) bool {
	for _, x := range rules {
		if x.family == f.nl && x.hasMark && x.mark == r.Mark && x.mask == r.Mask && x.table == r.Table && x.priority == r.Priority {
			return true
		}
	}
	return false
}

func hasRoute(routes []routeInfo, f routeFamily, r ruleset.Routing) bool {
	for _, x := range routes {
		if x.family == f.nl && x.table == r.Table && x.typ == unix.RTN_LOCAL && x.dstLen == 0 && x.oif == loopbackIndex {
			return true
		}
	}
	return false
}

// list reads every family's rules and routes in two dumps, on a plain blocking
// socket: this check runs on every apply, changes or not.
func (c *RoutingConn) list(r ruleset.Routing) ([]ruleInfo, []routeInfo, error) {
	hdr := make([]byte, 12) // fib_rule_hdr and rtmsg are both 12 bytes; family 0 = all
	msgs, err := c.raw.execute(unix.RTM_GETRULE, netlink.Dump, hdr)
	if err != nil {
		return nil, nil, fmt.Errorf("list rules: %w", err)
	}
	var rules []ruleInfo
	for _, m := range msgs {
		if len(m.Data) < 12 {
			continue
		}
		ri := ruleInfo{family: int(m.Data[0]), table: int(m.Data[4])}
		walkAttrs(m.Data[12:], func(typ uint16, v []byte) {
			switch typ {
			case unix.FRA_PRIORITY:
				ri.priority = int(u32(v))
			case unix.FRA_FWMARK:
				ri.mark, ri.hasMark = u32(v), true
			case unix.FRA_FWMASK:
				ri.mask = u32(v)
			case unix.FRA_TABLE:
				ri.table = int(u32(v))
			}
		})
		rules = append(rules, ri)
	}
	// Only table r.Table: with strict checking on the socket (see openSocket) the kernel
	// filters the dump itself instead of sending every local and main route.
	rq := append(make([]byte, 0, 20), hdr...)
	rq[4] = tableByte(r.Table)
	rq = rtattrU32(rq, unix.RTA_TABLE, uint32(r.Table))
	msgs, err = c.raw.execute(unix.RTM_GETROUTE, netlink.Dump, rq)
	if err != nil {
		return nil, nil, fmt.Errorf("list routes: %w", err)
	}
	var routes []routeInfo
	for _, m := range msgs {
		if len(m.Data) < 12 {
			continue
		}
		ri := routeInfo{family: int(m.Data[0]), dstLen: m.Data[1], table: int(m.Data[4]), typ: m.Data[7]}
		walkAttrs(m.Data[12:], func(typ uint16, v []byte) {
			switch typ {
			case unix.RTA_TABLE:
				ri.table = int(u32(v))
			case unix.RTA_OIF:
				ri.oif = int(u32(v))
			}
		})
		routes = append(routes, ri)
	}
	return rules, routes, nil
}

func u32(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return binary.NativeEndian.Uint32(b)
}

// walkAttrs calls fn for each rtnetlink attribute in b.
func walkAttrs(b []byte, fn func(typ uint16, value []byte)) {
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		if l < 4 || l > len(b) {
			return
		}
		fn(binary.NativeEndian.Uint16(b[2:4])&^unix.NLA_F_NESTED, b[4:l])
		b = b[min((l+3)&^3, len(b)):]
	}
}

// Ensure makes the namespace's policy routing exactly r: the rule and route for each
// wanted family, none for an unwanted one, in one read (two dumps) and at most one
// write. It returns an undo, never nil, that removes what it added, for when the rest of
// the apply fails.
func (c *RoutingConn) Ensure(r ruleset.Routing) (changed bool, undo func(), err error) {
	undo = func() {}
	rules, routes, err := c.list(r)
	if err != nil {
		return false, undo, err
	}
	var add, del, undoReqs []request
	var addWhat, delWhat []string
	for _, f := range routeFamilies(r) {
		rule := fmt.Sprintf("%s rule fwmark %#x/%#x lookup %d pref %d", f.name, r.Mark, r.Mask, r.Table, r.Priority)
		route := fmt.Sprintf("%s route local default dev lo table %d", f.name, r.Table)
		switch {
		case f.wanted && !hasRule(rules, f, r):
			add, addWhat = append(add, ruleMsg(unix.RTM_NEWRULE, f, r)), append(addWhat, "add "+rule)
			undoReqs = append(undoReqs, ruleMsg(unix.RTM_DELRULE, f, r))
		case !f.wanted && hasRule(rules, f, r):
			del, delWhat = append(del, ruleMsg(unix.RTM_DELRULE, f, r)), append(delWhat, "delete "+rule)
		}
		switch {
		case f.wanted && !hasRoute(routes, f, r):
			add, addWhat = append(add, routeMsg(unix.RTM_NEWROUTE, f, r)), append(addWhat, "add "+route)
			undoReqs = append(undoReqs, routeMsg(unix.RTM_DELROUTE, f, r))
		case !f.wanted && hasRoute(routes, f, r):
			del, delWhat = append(del, routeMsg(unix.RTM_DELROUTE, f, r)), append(delWhat, "delete "+route)
		}
	}
	if err := c.write(del, delWhat, unix.ENOENT, unix.ESRCH); err != nil {
		return true, undo, err
	}
	// EEXIST: someone added it since we looked; it is there, as wanted.
	if err := c.write(add, addWhat, unix.EEXIST); err != nil {
		c.write(undoReqs, make([]string, len(undoReqs)), unix.ENOENT, unix.ESRCH)
		return true, undo, err
	}
	if len(undoReqs) > 0 {
		undo = func() { c.write(undoReqs, make([]string, len(undoReqs)), unix.ENOENT, unix.ESRCH) }
	}
	return len(add)+len(del) > 0, undo, nil
}

// Remove deletes the policy routing r, the rule and route of every family; absent ones
// are fine. It reports whether it deleted anything.
func (c *RoutingConn) Remove(r ruleset.Routing) (bool, error) {
	rules, routes, err := c.list(r)
	if err != nil {
		return false, err
	}
	var del []request
	var what []string
	for _, f := range routeFamilies(r) {
		if hasRule(rules, f, r) {
			del, what = append(del, ruleMsg(unix.RTM_DELRULE, f, r)), append(what, "delete "+f.name+" rule")
		}
		if hasRoute(routes, f, r) {
			del, what = append(del, routeMsg(unix.RTM_DELROUTE, f, r)), append(what, "delete "+f.name+" route")
		}
	}
	return len(del) > 0, c.write(del, what, unix.ENOENT, unix.ESRCH)
}
