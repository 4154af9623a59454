package dataplane

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	mdnl "github.com/mdlayher/netlink"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/nlraw"
)

// loopbackIndex is lo's interface index, the same in every network namespace.
const loopbackIndex = 1

type routeFamily struct {
	nl     int
	name   string
	anyDst *net.IPNet
	wanted bool
}

func routeFamilies(r compiler.Routing) []routeFamily {
	return []routeFamily{
		{netlink.FAMILY_V4, "IPv4", &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, true},
		{netlink.FAMILY_V6, "IPv6", &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, r.IPv6},
	}
}

func wantRule(f routeFamily, r compiler.Routing) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = f.nl
	rule.Mark = r.Mark
	mask := r.Mask
	rule.Mask = &mask
	rule.Table = r.Table
	rule.Priority = r.Priority
	return rule
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

func hasRule(rules []ruleInfo, f routeFamily, r compiler.Routing) bool {
	for _, x := range rules {
		if x.family == f.nl && x.hasMark && x.mark == r.Mark && x.mask == r.Mask && x.table == r.Table && x.priority == r.Priority {
			return true
		}
	}
	return false
}

func wantRoute(f routeFamily, r compiler.Routing) *netlink.Route {
	return &netlink.Route{Family: f.nl, LinkIndex: loopbackIndex, Dst: f.anyDst, Table: r.Table, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
}

func hasRoute(routes []routeInfo, f routeFamily, r compiler.Routing) bool {
	for _, x := range routes {
		if x.family == f.nl && x.table == r.Table && x.typ == unix.RTN_LOCAL && x.dstLen == 0 && x.oif == loopbackIndex {
			return true
		}
	}
	return false
}

// listRouting reads every family's rules and routes in two dumps, on a plain blocking
// socket: this check runs on every apply, changes or not.
func listRouting(c *nlraw.Conn) ([]ruleInfo, []routeInfo, error) {
	hdr := make([]byte, 12) // fib_rule_hdr and rtmsg are both 12 bytes; family 0 = all
	msgs, err := c.Execute(unix.RTM_GETRULE, mdnl.Dump, hdr)
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
	msgs, err = c.Execute(unix.RTM_GETROUTE, mdnl.Dump, hdr)
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

// ensureRouting makes the policy routing exactly r: the rule and route for each wanted
// family, none for an unwanted one. It returns an undo that removes what it added, for
// when the rest of the apply fails.
// Writes go through a vishvananda/netlink handle from write, which is called only when
// something must change; it returns the same handle every time, and the caller closes it.
func ensureRouting(c *nlraw.Conn, write func() (*netlink.Handle, error), r compiler.Routing) (changed bool, undo func(), err error) {
	var undos []func()
	undo = func() {
		for i := len(undos) - 1; i >= 0; i-- {
			undos[i]()
		}
	}
	rules, routes, err := listRouting(c)
	if err != nil {
		return false, undo, err
	}
	handle := write
	for _, f := range routeFamilies(r) {
		if !f.wanted {
			removed, err := removeFamily(handle, rules, routes, f, r)
			changed = changed || removed
			if err != nil {
				return changed, undo, err
			}
			continue
		}
		if !hasRule(rules, f, r) {
			h, err := handle()
			if err != nil {
				return changed, undo, err
			}
			rule := wantRule(f, r)
			if err := h.RuleAdd(rule); err != nil {
				return changed, undo, fmt.Errorf("%s rule fwmark %#x/%#x lookup %d pref %d: %w", f.name, r.Mark, r.Mask, r.Table, r.Priority, err)
			}
			changed = true
			undos = append(undos, func() { h.RuleDel(rule) })
		}
		if !hasRoute(routes, f, r) {
			h, err := handle()
			if err != nil {
				return changed, undo, err
			}
			route := wantRoute(f, r)
			if err := h.RouteAdd(route); err != nil {
				return changed, undo, fmt.Errorf("%s route local default dev lo table %d: %w", f.name, r.Table, err)
			}
			changed = true
			undos = append(undos, func() { h.RouteDel(route) })
		}
	}
	return changed, undo, nil
}

// removeFamily deletes one family's rule and route; absent ones are fine.
func removeFamily(handle func() (*netlink.Handle, error), rules []ruleInfo, routes []routeInfo, f routeFamily, r compiler.Routing) (bool, error) {
	removed := false
	if !hasRule(rules, f, r) && !hasRoute(routes, f, r) {
		return false, nil
	}
	h, err := handle()
	if err != nil {
		return false, err
	}
	if hasRule(rules, f, r) {
		if err := h.RuleDel(wantRule(f, r)); err != nil && !errors.Is(err, unix.ENOENT) {
			return false, fmt.Errorf("delete %s rule: %w", f.name, err)
		}
		removed = true
	}
	if hasRoute(routes, f, r) {
		if err := h.RouteDel(wantRoute(f, r)); err != nil && !errors.Is(err, unix.ESRCH) {
			return removed, fmt.Errorf("delete %s route: %w", f.name, err)
		}
		removed = true
	}
	return removed, nil
}

// removeRouting deletes the rule and route of every family.
func removeRouting(c *nlraw.Conn, write func() (*netlink.Handle, error), r compiler.Routing) (bool, error) {
	rules, routes, err := listRouting(c)
	if err != nil {
		return false, err
	}
	handle := write
	removed := false
	for _, f := range routeFamilies(r) {
		ok, err := removeFamily(handle, rules, routes, f, r)
		removed = removed || ok
		if err != nil {
			return removed, err
		}
	}
	return removed, nil
}
