// Package istiobaseline does what istio-cni does to a pod's namespace, for the benchmarks
// that measure nftmesh against it (dataplane's BenchmarkBaselineIptablesRestore, e2e's
// agent benchmarks). Only tests import it.
package istiobaseline

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// Routing adds a pod's policy routing as istio-cni does, with rtnetlink (the library
// istio-cni uses) from the calling thread's namespace: per family, `ip rule add fwmark
// 0x111/0xfff pref 32764 lookup 100` and `ip route add local default dev lo table 100`.
func Routing(r *ruleset.Routing) error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	families := []int{netlink.FAMILY_V4}
	if r.IPv6 {
		families = append(families, netlink.FAMILY_V6)
	}
	for _, fam := range families {
		rule := netlink.NewRule()
		rule.Family, rule.Mark, rule.Table, rule.Priority = fam, r.Mark, r.Table, r.Priority
		mask := r.Mask
		rule.Mask = &mask
		if err := h.RuleAdd(rule); err != nil {
			return fmt.Errorf("rule add: %w", err)
		}
		dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if fam == netlink.FAMILY_V6 {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		route := &netlink.Route{Family: fam, LinkIndex: lo.Attrs().Index, Dst: dst, Table: r.Table, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
		if err := h.RouteAdd(route); err != nil {
			return fmt.Errorf("route add: %w", err)
		}
	}
	return nil
}
