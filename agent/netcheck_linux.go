package agent

import (
	"fmt"
	"net"

	"github.com/nftmesh/nftmesh/internal/netns"
)

// LoopbackUp is Enroller.CheckNetNS's default: the pod's redirected traffic is routed
// through its loopback (the proxy listens there), so with lo down nothing would reach the
// proxy and every connection would hang. The runtime brings lo up before CNI ADD.
func LoopbackUp(ns *netns.NS) error {
	return ns.Do(func() error {
		// InterfaceByName opens its netlink socket on this thread, which Do has moved
		// into ns.
		lo, err := net.InterfaceByName("lo")
		if err != nil {
			return fmt.Errorf("%s: loopback: %w", ns, err)
		}
		if lo.Flags&net.FlagUp == 0 {
			return fmt.Errorf("%s: loopback interface lo is down (the pod's redirected traffic goes through it)", ns)
		}
		return nil
	})
}
