package agent

import (
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
)

// A pod namespace whose loopback is down is refused with an error that says so (its
// redirected traffic could reach nothing); a namespace with lo up passes.
func TestLoopbackUp(t *testing.T) {
	ns := nettest.New(t)
	if err := LoopbackUp(ns.Handle); err != nil {
		t.Fatalf("lo up: %v", err)
	}
	ns.MustRun(t, "ip", "link", "set", "lo", "down")
	err := LoopbackUp(ns.Handle)
	if err == nil || !strings.Contains(err.Error(), "loopback interface lo is down") || !strings.Contains(err.Error(), ns.Path) {
		t.Fatalf("lo down: %v, want an error naming the namespace and the down loopback", err)
	}
}
