package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// RoutingConn is an rtnetlink connection in one network namespace, for a pod's policy
// routing (ruleset.Routing): one blocking socket, because the check runs on every apply,
// changes or not. Not safe for concurrent use; after an error, close it.
//
// nftmesh owns every ip rule at r.Priority and every route in table r.Table, of both
// families: Ensure makes them exactly the wanted ones (deleting any other rule at that
// pref and any other route in that table), Remove deletes them all, and Show renders them
// so that drift can be diffed. Nothing else is read for writing or touched.
type RoutingConn struct {
	raw *socket
}

// ErrLoopbackDown is returned (wrapped) when the kernel refuses the local route because
// the namespace's lo is down (ENETDOWN): the namespace needs `ip link set lo up`.
var ErrLoopbackDown = errors.New("loopback is down")

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

// Attributes and flags golang.org/x/sys/unix does not name.
const (
	rtextFilterSkipStats = 1 << 3 // RTEXT_FILTER_SKIP_STATS, in IFLA_EXT_MASK
	fraL3MDEV            = 19
	fraDSCP              = 25
	rtaNHID              = 30
)

type routeFamily struct {
	nl     int // AF_INET, AF_INET6
	name   string
	ip     string // ip(8)'s flag: -4, -6
	wanted bool
}

func routeFamilies(r ruleset.Routing) []routeFamily {
	return []routeFamily{
		{unix.AF_INET, "IPv4", "-4", true},
		{unix.AF_INET6, "IPv6", "-6", r.IPv6},
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

// ruleText and routeText are the one rule and route r wants in each family, as Show
// renders them (and as `ip rule` and `ip route show table T` print them).
func ruleText(r ruleset.Routing) string {
	return fmt.Sprintf("%d: from all fwmark %#x/%#x lookup %s", r.Priority, r.Mark, r.Mask, tableName(r.Table))
}

const routeText = "local default dev lo"

// ownedRule reports whether a rule at nftmesh's priority is one nftmesh may have written:
// a fwmark rule looking up its table (with any mark: an older intent's). Anything else
// there belongs to someone else (the CNI sbr plugin, for one, adds rules without a
// priority, which can land on 32764) and is left alone.
func ownedRule(x ruleInfo, r ruleset.Routing) bool {
	return strings.HasPrefix(x.text, fmt.Sprintf("%d: from all fwmark ", r.Priority)) &&
		strings.HasSuffix(x.text, " lookup "+tableName(r.Table))
}

// ownedRoute reports whether a route in nftmesh's table is one its rule could be meant
// to reach: a route on lo, or one that drops (unreachable, blackhole, prohibit), the
// drift a hand edit leaves. A route through a real device is someone
// else's (sbr's default via the pod's gateway) and is left alone; if it stands where
// nftmesh's route must go, the apply fails and says so.
func ownedRoute(x routeInfo) bool {
	for _, drop := range []string{"unreachable", "blackhole", "prohibit"} {
		if strings.HasPrefix(x.text, drop) {
			return true
		}
	}
	return strings.HasSuffix(x.text, " dev lo") || strings.Contains(x.text, " dev lo ")
}

// RoutingText renders the policy routing r as Show renders a namespace's: what a
// namespace holding exactly r shows.
func RoutingText(r ruleset.Routing) string {
	var b strings.Builder
	for _, f := range routeFamilies(r) {
		if f.wanted {
			fmt.Fprintf(&b, "ip %s rule: %s\n", f.ip, ruleText(r))
			fmt.Fprintf(&b, "ip %s route table %d: %s\n", f.ip, r.Table, routeText)
		}
	}
	return b.String()
}

// ruleInfo and routeInfo are a rule at r.Priority and a route in r.Table as the kernel
// dumped them: the family, the canonical text, and the message itself, which deletes
// exactly this object (RTM_DEL*) or puts it back (RTM_NEW*).
type ruleInfo struct {
	family int
	text   string
	raw    []byte
}

type routeInfo struct {
	family int
	text   string
	raw    []byte
}

// list reads the rules at r.Priority and the routes in table r.Table, of every family,
// in two dumps on a plain blocking socket: this check runs on every apply, changes or
// not. names turns an interface index into its name; nil names only lo.
//
// With lo set, lo's state is read in the same exchange as the routes (a get, sent with
// the route dump in one sendmsg): Ensure needs it before it adds a route.
func (c *RoutingConn) list(r ruleset.Routing, names map[int]string, lo *query) ([]ruleInfo, []routeInfo, error) {
	hdr := make([]byte, 12) // fib_rule_hdr and rtmsg are both 12 bytes; family 0 = all
	ruleDump := &query{Type: unix.RTM_GETRULE, Flags: netlink.Dump, Data: hdr}
	// Only table r.Table: with strict checking on the socket (see openSocket) the kernel
	// filters the dump itself instead of sending every local and main route.
	rq := append(make([]byte, 0, 20), hdr...)
	rq[4] = tableByte(r.Table)
	rq = rtattrU32(rq, unix.RTA_TABLE, uint32(r.Table))
	routeDump := &query{Type: unix.RTM_GETROUTE, Flags: netlink.Dump, Data: rq}
	// One exchange for both dumps (and lo), see executeQueries.
	qs := []*query{ruleDump, routeDump}
	if lo != nil {
		qs = append(qs, lo)
	}
	if err := c.raw.executeQueries(qs...); err != nil {
		return nil, nil, fmt.Errorf("list rules and routes: %w", err)
	}
	if ruleDump.Err != nil {
		return nil, nil, fmt.Errorf("list rules: %w", ruleDump.Err)
	}
	var rules []ruleInfo
	for _, m := range ruleDump.Out {
		if len(m.Data) < 12 || rulePriority(m.Data) != r.Priority {
			continue
		}
		rules = append(rules, ruleInfo{family: int(m.Data[0]), text: renderRule(m.Data), raw: m.Data})
	}
	if routeDump.Err != nil {
		return nil, nil, fmt.Errorf("list routes: %w", routeDump.Err)
	}
	var routes []routeInfo
	for _, m := range routeDump.Out {
		if len(m.Data) < 12 || routeTable(m.Data) != r.Table {
			continue
		}
		routes = append(routes, routeInfo{family: int(m.Data[0]), text: renderRoute(m.Data, names), raw: m.Data})
	}
	return rules, routes, nil
}

func rulePriority(msg []byte) int {
	p := 0
	walkAttrs(msg[12:], func(typ uint16, v []byte) {
		if typ == unix.FRA_PRIORITY {
			p = int(u32(v))
		}
	})
	return p
}

func routeTable(msg []byte) int {
	t := int(msg[4])
	walkAttrs(msg[12:], func(typ uint16, v []byte) {
		if typ == unix.RTA_TABLE {
			t = int(u32(v))
		}
	})
	return t
}

func tableName(t int) string {
	switch t {
	case unix.RT_TABLE_MAIN:
		return "main"
	case unix.RT_TABLE_LOCAL:
		return "local"
	case unix.RT_TABLE_DEFAULT:
		return "default"
	}
	return fmt.Sprint(t)
}

func addrText(family int, v []byte) string {
	if a, ok := netip.AddrFromSlice(v); ok && (family != unix.AF_INET || a.Is4()) {
		return a.String()
	}
	return fmt.Sprintf("%x", v)
}

// prefixText prints an address and its prefix length as ip(8) does: without the length
// when it is the family's whole address (a host: /32, /128).
func prefixText(family int, v []byte, bits byte) string {
	if bits == 0 && len(v) == 0 {
		return "all"
	}
	if (family == unix.AF_INET && bits == 32) || (family == unix.AF_INET6 && bits == 128) {
		return addrText(family, v)
	}
	return fmt.Sprintf("%s/%d", addrText(family, v), bits)
}

// lengthOnly prints a prefix length without its address, as ip(8) does ("0/8").
func lengthOnly(bits byte) string { return fmt.Sprintf("0/%d", bits) }

func portRange(v []byte) string {
	if len(v) < 4 {
		return "?"
	}
	lo, hi := binary.NativeEndian.Uint16(v[0:2]), binary.NativeEndian.Uint16(v[2:4])
	if lo == hi {
		return fmt.Sprint(lo)
	}
	return fmt.Sprintf("%d-%d", lo, hi)
}

// renderRule prints a dumped rule the way `ip rule` does, with every selector and action
// the kernel reports that changes what the rule does (not its protocol).
func renderRule(msg []byte) string {
	family, dstLen, srcLen, tos, action := int(msg[0]), msg[1], msg[2], msg[3], msg[7]
	flags := binary.NativeEndian.Uint32(msg[8:12])
	table := int(msg[4])
	var pref, gotoTarget uint32
	var src, dst, iif, oif, mark, mask, other, tail string
	var hasMark, hasMask, l3mdev bool
	walkAttrs(msg[12:], func(typ uint16, v []byte) {
		switch typ {
		case unix.FRA_PRIORITY:
			pref = u32(v)
		case unix.FRA_SRC:
			src = prefixText(family, v, srcLen)
		case unix.FRA_DST:
			dst = prefixText(family, v, dstLen)
		case unix.FRA_IIFNAME:
			iif = strings.TrimRight(string(v), "\x00")
		case unix.FRA_OIFNAME:
			oif = strings.TrimRight(string(v), "\x00")
		case unix.FRA_FWMARK:
			mark, hasMark = fmt.Sprintf("%#x", u32(v)), true
		case unix.FRA_FWMASK:
			mask, hasMask = fmt.Sprintf("%#x", u32(v)), true
		case unix.FRA_TABLE:
			table = int(u32(v))
		case unix.FRA_GOTO:
			gotoTarget = u32(v)
		case unix.FRA_FLOW:
			tail += fmt.Sprintf(" realms %#x", u32(v))
		case unix.FRA_TUN_ID:
			if len(v) == 8 {
				other += fmt.Sprintf(" tun_id %d", binary.BigEndian.Uint64(v))
			}
		case unix.FRA_UID_RANGE:
			if len(v) >= 8 {
				other += fmt.Sprintf(" uidrange %d-%d", u32(v[0:4]), u32(v[4:8]))
			}
		case unix.FRA_IP_PROTO:
			if len(v) > 0 {
				other += fmt.Sprintf(" ipproto %d", v[0])
			}
		case unix.FRA_SPORT_RANGE:
			other += " sport " + portRange(v)
		case unix.FRA_DPORT_RANGE:
			other += " dport " + portRange(v)
		case fraDSCP:
			if len(v) > 0 {
				other += fmt.Sprintf(" dscp %d", v[0])
			}
		case fraL3MDEV:
			l3mdev = len(v) > 0 && v[0] != 0
		case unix.FRA_SUPPRESS_PREFIXLEN:
			if n := int32(u32(v)); n >= 0 {
				tail += fmt.Sprintf(" suppress_prefixlength %d", n)
			}
		case unix.FRA_SUPPRESS_IFGROUP:
			if n := int32(u32(v)); n != -1 {
				tail += fmt.Sprintf(" suppress_ifgroup %d", n)
			}
		}
	})
	var b strings.Builder
	fmt.Fprintf(&b, "%d:", pref)
	if flags&unix.FIB_RULE_INVERT != 0 {
		b.WriteString(" not")
	}
	switch {
	case src == "" && srcLen != 0:
		src = lengthOnly(srcLen)
	case src == "":
		src = "all"
	}
	b.WriteString(" from " + src)
	if dst == "" && dstLen != 0 {
		dst = lengthOnly(dstLen)
	}
	if dst != "" {
		b.WriteString(" to " + dst)
	}
	if tos != 0 {
		fmt.Fprintf(&b, " tos %#x", tos)
	}
	if hasMark || hasMask {
		b.WriteString(" fwmark " + mark)
		if mask != "" && mask != "0xffffffff" {
			b.WriteString("/" + mask)
		}
	}
	if iif != "" {
		b.WriteString(" iif " + iif)
	}
	if oif != "" {
		b.WriteString(" oif " + oif)
	}
	b.WriteString(other)
	switch {
	case l3mdev:
		b.WriteString(" lookup [l3mdev-table]")
	case action == unix.FR_ACT_TO_TBL:
		b.WriteString(" lookup " + tableName(table))
	case action == unix.FR_ACT_GOTO:
		fmt.Fprintf(&b, " goto %d", gotoTarget)
	case action == unix.FR_ACT_NOP:
		b.WriteString(" nop")
	case action == unix.FR_ACT_BLACKHOLE:
		b.WriteString(" blackhole")
	case action == unix.FR_ACT_UNREACHABLE:
		b.WriteString(" unreachable")
	case action == unix.FR_ACT_PROHIBIT:
		b.WriteString(" prohibit")
	default:
		fmt.Fprintf(&b, " action %d", action)
	}
	b.WriteString(tail)
	return b.String()
}

var routeTypes = map[byte]string{
	unix.RTN_LOCAL: "local", unix.RTN_BROADCAST: "broadcast", unix.RTN_ANYCAST: "anycast",
	unix.RTN_MULTICAST: "multicast", unix.RTN_BLACKHOLE: "blackhole", unix.RTN_UNREACHABLE: "unreachable",
	unix.RTN_PROHIBIT: "prohibit", unix.RTN_THROW: "throw", unix.RTN_NAT: "nat", unix.RTN_XRESOLVE: "xresolve",
}

func devName(names map[int]string, idx int) string {
	if idx == loopbackIndex {
		return "lo"
	}
	if n, ok := names[idx]; ok {
		return n
	}
	return fmt.Sprintf("if%d", idx)
}

// renderRoute prints a dumped route the way `ip route show table T` does, leaving out
// what does not change where a packet goes: protocol, scope, IPv6 preference, cache
// info, and the metric IPv6 gives a route added without one (1024).
func renderRoute(msg []byte, names map[int]string) string {
	family, dstLen, srcLen, tos, typ := int(msg[0]), msg[1], msg[2], msg[3], msg[7]
	var b strings.Builder
	if t, ok := routeTypes[typ]; ok {
		b.WriteString(t + " ")
	} else if typ != unix.RTN_UNICAST {
		fmt.Fprintf(&b, "type%d ", typ)
	}
	dst := "default"
	var from, nhid, via, dev, src, metric, metrics, realms, encap, nexthops string
	walkAttrs(msg[12:], func(a uint16, v []byte) {
		switch a {
		case unix.RTA_DST:
			dst = prefixText(family, v, dstLen)
		case unix.RTA_SRC:
			from = " from " + prefixText(family, v, srcLen)
		case rtaNHID:
			nhid = fmt.Sprintf(" nhid %d", u32(v))
		case unix.RTA_GATEWAY:
			via = " via " + addrText(family, v)
		case unix.RTA_VIA:
			if len(v) > 2 {
				via = " via " + addrText(int(binary.NativeEndian.Uint16(v[0:2])), v[2:])
			}
		case unix.RTA_OIF:
			dev = " dev " + devName(names, int(u32(v)))
		case unix.RTA_PREFSRC:
			src = " src " + addrText(family, v)
		case unix.RTA_PRIORITY:
			if m := u32(v); !(family == unix.AF_INET6 && m == 1024) && m != 0 {
				metric = fmt.Sprintf(" metric %d", m)
			}
		case unix.RTA_METRICS:
			walkAttrs(v, func(x uint16, mv []byte) {
				if x == unix.RTAX_MTU {
					metrics += fmt.Sprintf(" mtu %d", u32(mv))
				} else {
					metrics += fmt.Sprintf(" rtax%d %d", x, u32(mv))
				}
			})
		case unix.RTA_FLOW:
			realms = fmt.Sprintf(" realms %#x", u32(v))
		case unix.RTA_ENCAP:
			encap = " encap"
		case unix.RTA_MULTIPATH:
			for len(v) >= unix.SizeofRtNexthop {
				l := int(binary.NativeEndian.Uint16(v[0:2]))
				if l < unix.SizeofRtNexthop || l > len(v) {
					break
				}
				nexthops += " nexthop"
				walkAttrs(v[unix.SizeofRtNexthop:l], func(x uint16, nv []byte) {
					if x == unix.RTA_GATEWAY {
						nexthops += " via " + addrText(family, nv)
					}
				})
				nexthops += fmt.Sprintf(" dev %s weight %d", devName(names, int(int32(binary.NativeEndian.Uint32(v[4:8])))), int(v[3])+1)
				v = v[min((l+3)&^3, len(v)):]
			}
		}
	})
	if dstLen != 0 && dst == "default" {
		dst = lengthOnly(dstLen)
	}
	if srcLen != 0 && from == "" {
		from = " from " + lengthOnly(srcLen)
	}
	b.WriteString(dst)
	if tos != 0 {
		fmt.Fprintf(&b, " tos %#x", tos)
	}
	for _, x := range []string{from, nhid, via, dev, src, metric, metrics, realms, encap, nexthops} {
		b.WriteString(x)
	}
	return b.String()
}

// loQuery asks for lo's link, without its statistics (RTEXT_FILTER_SKIP_STATS: less for
// the kernel to gather, only the flags are read).
func loQuery() *query {
	q := make([]byte, unix.SizeofIfInfomsg, unix.SizeofIfInfomsg+8)
	binary.NativeEndian.PutUint32(q[4:8], loopbackIndex)
	return &query{Type: unix.RTM_GETLINK, Data: rtattrU32(q, unix.IFLA_EXT_MASK, rtextFilterSkipStats)}
}

// loopbackUp fails with ErrLoopbackDown unless lo is up, from lo's answer to loQuery.
func loopbackUp(lo *query) error {
	if lo.Err != nil {
		return fmt.Errorf("read lo: %w", lo.Err)
	}
	if len(lo.Out) == 0 || len(lo.Out[0].Data) < unix.SizeofIfInfomsg {
		return fmt.Errorf("read lo: no answer")
	}
	if binary.NativeEndian.Uint32(lo.Out[0].Data[8:12])&unix.IFF_UP == 0 {
		return ErrLoopbackDown
	}
	return nil
}

// linkNames reads every interface's name, for Show.
func (c *RoutingConn) linkNames() (map[int]string, error) {
	msgs, err := c.raw.execute(unix.RTM_GETLINK, netlink.Dump, make([]byte, unix.SizeofIfInfomsg))
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	names := map[int]string{}
	for _, m := range msgs {
		if len(m.Data) < unix.SizeofIfInfomsg {
			continue
		}
		idx := int(int32(binary.NativeEndian.Uint32(m.Data[4:8])))
		walkAttrs(m.Data[unix.SizeofIfInfomsg:], func(typ uint16, v []byte) {
			if typ == unix.IFLA_IFNAME {
				names[idx] = strings.TrimRight(string(v), "\x00")
			}
		})
	}
	return names, nil
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

// Show renders the policy routing nftmesh owns in the namespace, for r's priority and
// table: every rule at r.Priority and every route in table r.Table, IPv4 then IPv6, one
// line each, `ip -4 rule: <as ip rule prints it>` and `ip -4 route table T: <as ip route
// prints it>`. A namespace holding exactly r shows RoutingText(r).
func (c *RoutingConn) Show(r ruleset.Routing) (string, error) {
	names, err := c.linkNames()
	if err != nil {
		return "", err
	}
	rules, routes, err := c.list(r, names, nil)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, f := range routeFamilies(r) {
		for _, x := range rules { // only nftmesh's: the rest is not compared, nor touched
			if x.family == f.nl && ownedRule(x, r) {
				fmt.Fprintf(&b, "ip %s rule: %s\n", f.ip, x.text)
			}
		}
		for _, x := range routes {
			if x.family == f.nl && ownedRoute(x) {
				fmt.Fprintf(&b, "ip %s route table %d: %s\n", f.ip, r.Table, x.text)
			}
		}
	}
	return b.String(), nil
}

// op is one change in a routing write: the request, what it does (for errors), the
// errnos that mean "already so", and the request that reverts it.
type op struct {
	req    request
	what   string
	ignore []unix.Errno
	revert *request
}

func deleteRule(raw []byte) request { return request{Type: unix.RTM_DELRULE, Data: raw} }

// restoreRule puts a deleted rule back from its dump: the kernel's own description.
func restoreRule(raw []byte) *request {
	return &request{Type: unix.RTM_NEWRULE, Flags: unix.NLM_F_CREATE | unix.NLM_F_EXCL, Data: raw}
}

// routeKey builds, from a dumped route, a request that deletes exactly it (del) or puts
// it back (!del). A delete names what identifies the route (prefix, tos, table, type,
// metric, device, gateway, nexthop) and matches any protocol and scope; a put back also
// carries what the route holds (source, metrics, multipath, encap). Neither carries what
// the kernel reports but does not take (cache info, expiry) nor the header's flags.
func routeKey(raw []byte, del bool) []byte {
	b := append(make([]byte, 0, len(raw)), raw[:12]...)
	if del {
		b[5], b[6] = unix.RTPROT_UNSPEC, unix.RT_SCOPE_NOWHERE
	}
	binary.NativeEndian.PutUint32(b[8:12], 0)
	walkAttrs(raw[12:], func(typ uint16, v []byte) {
		switch typ {
		case unix.RTA_DST, unix.RTA_SRC, unix.RTA_OIF, unix.RTA_GATEWAY, unix.RTA_PRIORITY, unix.RTA_TABLE, unix.RTA_VIA, rtaNHID:
		case unix.RTA_PREFSRC, unix.RTA_METRICS, unix.RTA_MULTIPATH, unix.RTA_FLOW, unix.RTA_ENCAP_TYPE, unix.RTA_ENCAP, unix.RTA_PREF:
			if del {
				return
			}
		default:
			return
		}
		var h [4]byte
		binary.NativeEndian.PutUint16(h[0:2], uint16(4+len(v)))
		binary.NativeEndian.PutUint16(h[2:4], typ)
		b = append(append(b, h[:]...), v...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
	})
	return b
}

func deleteRoute(raw []byte) request {
	return request{Type: unix.RTM_DELROUTE, Data: routeKey(raw, true)}
}

func restoreRoute(raw []byte) *request {
	return &request{Type: unix.RTM_NEWROUTE, Flags: unix.NLM_F_CREATE | unix.NLM_F_EXCL, Data: routeKey(raw, false)}
}

var (
	gone    = []unix.Errno{unix.ENOENT, unix.ESRCH}
	present = []unix.Errno{unix.EEXIST}
)

// write sends the ops in one sendmsg; the kernel runs them in order. It returns the
// reverts of the ops that took effect, newest first, and the errors of the others.
func (c *RoutingConn) write(ops []op) (reverts []request, err error) {
	if len(ops) == 0 {
		return nil, nil
	}
	reqs := make([]request, len(ops))
	for i, o := range ops {
		reqs[i] = o.req
	}
	errs, err := c.raw.executeAll(reqs)
	if err != nil {
		return nil, err
	}
	var all []error
	for i, e := range errs {
		ignored := false
		for _, x := range ops[i].ignore {
			ignored = ignored || errors.Is(e, x)
		}
		switch {
		case e == nil:
			if ops[i].revert != nil {
				reverts = append([]request{*ops[i].revert}, reverts...)
			}
		case ignored:
		case errors.Is(e, unix.ENETDOWN) && ops[i].req.Type == unix.RTM_NEWROUTE:
			all = append(all, fmt.Errorf("%w: %s: %w", ErrLoopbackDown, ops[i].what, e))
		default:
			all = append(all, fmt.Errorf("%s: %w", ops[i].what, e))
		}
	}
	return reverts, errors.Join(all...)
}

// revert sends reverts, best effort: what is already so is fine.
func (c *RoutingConn) revert(reverts []request) {
	if len(reverts) == 0 {
		return
	}
	ops := make([]op, len(reverts))
	for i, q := range reverts {
		ops[i] = op{req: q, ignore: []unix.Errno{unix.ENOENT, unix.ESRCH, unix.EEXIST}}
	}
	c.write(ops)
}

// Ensure makes the policy routing nftmesh owns exactly r: for each wanted family the one
// rule (at r.Priority) and the one route (`local default dev lo` in table r.Table), and
// nothing else at that priority or in that table, of either family: an old rule with
// other marks, a route of another type or device, an unreachable default, extra routes,
// and everything IPv6 when r.IPv6 is off are deleted. It costs two dumps when all is
// right, and one write (deletes first, then adds) when not.
//
// It returns an undo, never nil, that puts the routing back as Ensure found it, for when
// the rest of the apply fails: it deletes what Ensure added and re-adds what it deleted
// (from the kernel's own dump of it), so the previous table keeps the routing it was
// applied with. On error Ensure has already undone itself and the undo does nothing.
func (c *RoutingConn) Ensure(r ruleset.Routing) (changed bool, undo func(), err error) {
	undo = func() {}
	lo := loQuery()
	dels, adds, err := c.plan(r, lo)
	if err != nil {
		return false, undo, err
	}
	if len(dels)+len(adds) == 0 {
		return false, undo, nil
	}
	// The kernel takes an IPv4 local route on a down lo (and refuses an IPv6 one with
	// ENETDOWN): either way the pod could not work, so look before writing anything.
	for _, o := range adds {
		if o.req.Type == unix.RTM_NEWROUTE {
			if err := loopbackUp(lo); err != nil {
				return false, undo, err
			}
			break
		}
	}
	// Deletes first: the wanted route cannot be added beside an unreachable default.
	reverts, err := c.write(append(dels, adds...))
	if err != nil {
		c.revert(reverts)
		return true, undo, err
	}
	if len(reverts) > 0 {
		undo = func() { c.revert(reverts) }
	}
	return true, undo, nil
}

// Holds reports, reading only (the two dumps), whether the policy routing nftmesh owns
// is exactly r: whether Ensure would write nothing.
func (c *RoutingConn) Holds(r ruleset.Routing) (bool, error) {
	dels, adds, err := c.plan(r, nil)
	return err == nil && len(dels)+len(adds) == 0, err
}

// plan reads the routing (and lo's state into lo, if given) and returns what Ensure must
// delete and add.
func (c *RoutingConn) plan(r ruleset.Routing, lo *query) (dels, adds []op, err error) {
	rules, routes, err := c.list(r, nil, lo)
	if err != nil {
		return nil, nil, err
	}
	for _, f := range routeFamilies(r) {
		kept := false
		for _, x := range rules {
			if x.family != f.nl || !ownedRule(x, r) {
				continue
			}
			if f.wanted && !kept && x.text == ruleText(r) {
				kept = true
				continue
			}
			dels = append(dels, op{deleteRule(x.raw), fmt.Sprintf("delete %s rule %q", f.name, x.text), gone, restoreRule(x.raw)})
		}
		if f.wanted && !kept {
			undo := ruleMsg(unix.RTM_DELRULE, f, r)
			adds = append(adds, op{ruleMsg(unix.RTM_NEWRULE, f, r), fmt.Sprintf("add %s rule %q", f.name, ruleText(r)), present, &undo})
		}
		kept = false
		for _, x := range routes {
			if x.family != f.nl || !ownedRoute(x) {
				continue
			}
			if f.wanted && !kept && x.text == routeText {
				kept = true
				continue
			}
			dels = append(dels, op{deleteRoute(x.raw), fmt.Sprintf("delete %s route %q table %d", f.name, x.text, r.Table), gone, restoreRoute(x.raw)})
		}
		if f.wanted && !kept {
			undo := routeMsg(unix.RTM_DELROUTE, f, r)
			adds = append(adds, op{routeMsg(unix.RTM_NEWROUTE, f, r), fmt.Sprintf("add %s route %q table %d", f.name, routeText, r.Table), present, &undo})
		}
	}
	return dels, adds, nil
}

// Remove deletes the policy routing nftmesh owns for r's priority and table: every rule
// at r.Priority and every route in table r.Table, of both families, whatever their marks
// (an older intent's included); absent ones are fine. It reports whether it deleted
// anything.
func (c *RoutingConn) Remove(r ruleset.Routing) (bool, error) {
	rules, routes, err := c.list(r, nil, nil)
	if err != nil {
		return false, err
	}
	var dels []op
	for _, x := range rules {
		if ownedRule(x, r) {
			dels = append(dels, op{req: deleteRule(x.raw), what: fmt.Sprintf("delete rule %q", x.text), ignore: gone})
		}
	}
	for _, x := range routes {
		if !ownedRoute(x) {
			continue
		}
		dels = append(dels, op{req: deleteRoute(x.raw), what: fmt.Sprintf("delete route %q table %d", x.text, r.Table), ignore: gone})
	}
	_, err = c.write(dels)
	return len(dels) > 0, err
}
