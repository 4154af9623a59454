package dataplane

import (
	"errors"
	"fmt"
	"net"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/compiler"
)

// handleAt returns a rtnetlink handle whose sockets live in the namespace of fd.
// netlink.NewHandleAt switches the calling thread into the namespace and back; it runs
// here on a goroutine that locks its thread and never unlocks it, so the thread ends
// with the goroutine and can never go back to the pool in the wrong namespace.
func handleAt(fd int) (*netlink.Handle, error) {
	type result struct {
		h   *netlink.Handle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		h, err := netlink.NewHandleAt(netns.NsHandle(fd), unix.NETLINK_ROUTE)
		ch <- result{h, err}
	}()
	r := <-ch
	return r.h, r.err
}

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

func findRule(h *netlink.Handle, f routeFamily, r compiler.Routing) (bool, error) {
	rules, err := h.RuleList(f.nl)
	if err != nil {
		return false, fmt.Errorf("list %s rules: %w", f.name, err)
	}
	for _, x := range rules {
		if x.Mark == r.Mark && x.Mask != nil && *x.Mask == r.Mask && x.Table == r.Table && x.Priority == r.Priority {
			return true, nil
		}
	}
	return false, nil
}

func wantRoute(f routeFamily, r compiler.Routing, lo int) *netlink.Route {
	return &netlink.Route{Family: f.nl, LinkIndex: lo, Dst: f.anyDst, Table: r.Table, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
}

func findRoute(h *netlink.Handle, f routeFamily, r compiler.Routing, lo int) (bool, error) {
	routes, err := h.RouteListFiltered(f.nl, &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("list %s routes of table %d: %w", f.name, r.Table, err)
	}
	for _, x := range routes {
		isDefault := x.Dst == nil || (x.Dst.IP.IsUnspecified() && maskBits(x.Dst) == 0)
		if x.Type == unix.RTN_LOCAL && isDefault && x.LinkIndex == lo {
			return true, nil
		}
	}
	return false, nil
}

func maskBits(n *net.IPNet) int {
	ones, _ := n.Mask.Size()
	return ones
}

// ensureRouting makes the policy routing exactly r: the rule and route for each wanted
// family, none for an unwanted one. It returns an undo that removes what it added, for
// when the rest of the apply fails.
func ensureRouting(h *netlink.Handle, r compiler.Routing) (changed bool, undo func(), err error) {
	var undos []func()
	undo = func() {
		for i := len(undos) - 1; i >= 0; i-- {
			undos[i]()
		}
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return false, undo, fmt.Errorf("loopback: %w", err)
	}
	loIndex := lo.Attrs().Index
	for _, f := range routeFamilies(r) {
		if !f.wanted {
			removed, err := removeFamily(h, f, r, loIndex)
			changed = changed || removed
			if err != nil {
				return changed, undo, err
			}
			continue
		}
		ok, err := findRule(h, f, r)
		if err != nil {
			return changed, undo, err
		}
		if !ok {
			rule := wantRule(f, r)
			if err := h.RuleAdd(rule); err != nil {
				return changed, undo, fmt.Errorf("%s rule fwmark %#x/%#x lookup %d pref %d: %w", f.name, r.Mark, r.Mask, r.Table, r.Priority, err)
			}
			changed = true
			undos = append(undos, func() { h.RuleDel(rule) })
		}
		ok, err = findRoute(h, f, r, loIndex)
		if err != nil {
			return changed, undo, err
		}
		if !ok {
			route := wantRoute(f, r, loIndex)
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
func removeFamily(h *netlink.Handle, f routeFamily, r compiler.Routing, lo int) (bool, error) {
	removed := false
	ok, err := findRule(h, f, r)
	if err != nil {
		return false, err
	}
	if ok {
		if err := h.RuleDel(wantRule(f, r)); err != nil && !errors.Is(err, unix.ENOENT) {
			return false, fmt.Errorf("delete %s rule: %w", f.name, err)
		}
		removed = true
	}
	ok, err = findRoute(h, f, r, lo)
	if err != nil {
		return removed, err
	}
	if ok {
		if err := h.RouteDel(wantRoute(f, r, lo)); err != nil && !errors.Is(err, unix.ESRCH) {
			return removed, fmt.Errorf("delete %s route: %w", f.name, err)
		}
		removed = true
	}
	return removed, nil
}

// removeRouting deletes the rule and route of every family.
func removeRouting(h *netlink.Handle, r compiler.Routing) (bool, error) {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return false, fmt.Errorf("loopback: %w", err)
	}
	removed := false
	for _, f := range routeFamilies(r) {
		ok, err := removeFamily(h, f, r, lo.Attrs().Index)
		removed = removed || ok
		if err != nil {
			return removed, err
		}
	}
	return removed, nil
}
