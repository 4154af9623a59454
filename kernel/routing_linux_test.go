package kernel

import (
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/ruleset"
)

func openRouting(t *testing.T, ns *nettest.Netns) *RoutingConn {
	t.Helper()
	var c *RoutingConn
	if err := ns.Handle.Do(func() error {
		var err error
		c, err = NewRoutingConn()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// policyRouting counts the namespace's rules and routes of the Routing these tests use,
// IPv4 and IPv6 together.
func policyRouting(t *testing.T, ns *nettest.Netns) (rules, routes int) {
	t.Helper()
	for _, fam := range []string{"-4", "-6"} {
		rules += strings.Count(ns.MustRun(t, "ip", fam, "rule", "show"), "32764:\tfrom all fwmark 0x111/0xfff lookup 100")
		out, _ := ns.Run("", "ip", fam, "route", "show", "table", "100")
		routes += strings.Count(out, "local default dev lo")
	}
	return rules, routes
}

func TestRoutingEnsureUndoRemove(t *testing.T) {
	nettest.Require(t)
	ns := nettest.New(t)
	c := openRouting(t, ns)
	r := ruleset.Routing{Mark: 0x111, Mask: 0xfff, Table: 100, Priority: 32764, IPv6: true}
	expect := func(when string, rules, routes int) {
		t.Helper()
		if gotRules, gotRoutes := policyRouting(t, ns); gotRules != rules || gotRoutes != routes {
			t.Errorf("%s: %d rules and %d routes, want %d and %d", when, gotRules, gotRoutes, rules, routes)
		}
	}

	changed, undo, err := c.Ensure(r)
	if err != nil || !changed {
		t.Fatalf("first Ensure: %v %v, want a change", changed, err)
	}
	expect("after Ensure", 2, 2)
	if changed, _, err := c.Ensure(r); err != nil || changed {
		t.Errorf("second Ensure: %v %v, want no change", changed, err)
	}
	undo()
	expect("after undo", 0, 0)

	if _, _, err := c.Ensure(r); err != nil {
		t.Fatal(err)
	}
	r.IPv6 = false
	if changed, _, err := c.Ensure(r); err != nil || !changed {
		t.Errorf("Ensure without IPv6: %v %v, want a change", changed, err)
	}
	expect("IPv6 off", 1, 1)
	if removed, err := c.Remove(r); err != nil || !removed {
		t.Errorf("Remove: %v %v", removed, err)
	}
	expect("after Remove", 0, 0)
	if removed, err := c.Remove(r); err != nil || removed {
		t.Errorf("second Remove: %v %v, want nothing to remove", removed, err)
	}
}
