package kernel

import (
	"errors"
	"slices"
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

// owned is what `ip` shows of the routing nftmesh owns in the namespace: the rules at
// pref 32764 and the routes in table 100, both families.
func owned(t *testing.T, ns *nettest.Netns) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []string{"-4", "-6"} {
		for _, l := range strings.Split(ns.MustRun(t, "ip", fam, "rule", "show"), "\n") {
			if strings.HasPrefix(l, "32764:") {
				b.WriteString(fam + " rule " + l + "\n")
			}
		}
		out, _ := ns.Run("", "ip", fam, "route", "show", "table", "100")
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if l != "" {
				b.WriteString(fam + " route " + l + "\n")
			}
		}
	}
	return b.String()
}

// Routing drift at nftmesh's pref or in its table is shown by Show, repaired by Ensure
// (which undo puts back), and removed by Remove, whatever it is.
func TestRoutingDriftRepaired(t *testing.T) {
	nettest.Require(t)
	r := ruleset.Routing{Mark: 0x111, Mask: 0xfff, Table: 100, Priority: 32764, IPv6: true}
	v4 := r
	v4.IPv6 = false
	cases := []struct {
		name  string
		r     ruleset.Routing
		drift []string // ip commands, without "ip"
		shows string   // a line Show must print for the drift
	}{
		{"old mark beside the new", r, []string{"rule add fwmark 0x222/0xfff lookup 100 pref 32764"},
			"ip -4 rule: 32764: from all fwmark 0x222/0xfff lookup 100"},
		{"route replaced by a unicast one", r, []string{"route replace default dev lo table 100"},
			"ip -4 route table 100: default dev lo"},
		{"unreachable default", r, []string{"route del local default dev lo table 100", "route add unreachable default table 100"},
			"ip -4 route table 100: unreachable default"},
		{"IPv6 unreachable default", r, []string{"-6 route del local default dev lo table 100", "-6 route add unreachable default table 100"},
			"ip -6 route table 100: unreachable default dev lo"},
		{"extra route", r, []string{"route add 10.9.0.0/16 dev lo table 100", "-6 route add fd00:9::/64 dev lo table 100 metric 7"},
			"ip -6 route table 100: fd00:9::/64 dev lo metric 7"},
		{"IPv6 left while IPv6 is off", v4, []string{"-6 rule add fwmark 0x5 lookup 100 pref 32764", "-6 route add local default dev lo table 100"},
			"ip -6 rule: 32764: from all fwmark 0x5 lookup 100"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ns := nettest.New(t)
			c := openRouting(t, ns)
			if _, _, err := c.Ensure(tc.r); err != nil {
				t.Fatal(err)
			}
			clean := owned(t, ns)
			if got, err := c.Show(tc.r); err != nil || got != RoutingText(tc.r) {
				t.Errorf("Show after Ensure: %v\n%s\nwant\n%s", err, got, RoutingText(tc.r))
			}
			for _, l := range tc.drift {
				ns.MustRun(t, "ip", strings.Fields(l)...)
			}
			drifted := owned(t, ns)
			if drifted == clean {
				t.Fatalf("the drift changed nothing:\n%s", drifted)
			}
			if got, err := c.Show(tc.r); err != nil || !strings.Contains(got, tc.shows+"\n") {
				t.Errorf("Show after the drift: %v, want the line %q:\n%s", err, tc.shows, got)
			}
			changed, undo, err := c.Ensure(tc.r)
			if err != nil || !changed {
				t.Fatalf("Ensure over the drift: changed %v, %v", changed, err)
			}
			if got := owned(t, ns); got != clean {
				t.Errorf("Ensure did not repair the drift:\n%s\nwant\n%s", got, clean)
			}
			if changed, _, err := c.Ensure(tc.r); err != nil || changed {
				t.Errorf("Ensure after the repair: changed %v, %v; want nothing to do", changed, err)
			}
			undo()
			if got := owned(t, ns); got != drifted {
				t.Errorf("undo did not put the routing back as Ensure found it:\n%s\nwant\n%s", got, drifted)
			}
			if removed, err := c.Remove(tc.r); err != nil || !removed {
				t.Errorf("Remove: %v %v", removed, err)
			}
			if got := owned(t, ns); got != "" {
				t.Errorf("Remove left routing at nftmesh's pref or table:\n%s", got)
			}
		})
	}
}

// Rules at nftmesh's pref that are not fwmark lookups of its table, and routes in its
// table through a real device, are someone else's (the CNI sbr plugin adds rules without
// a pref, which can land on 32764, and a default via the pod's gateway in table 100): Ensure
// and Remove leave them alone, and Show does not compare them.
func TestRoutingLeavesOthersAlone(t *testing.T) {
	nettest.Require(t)
	r := ruleset.Routing{Mark: 0x111, Mask: 0xfff, Table: 100, Priority: 32764, IPv6: true}
	ns := nettest.New(t)
	c := openRouting(t, ns)
	for _, l := range []string{"link add nftm0 type veth peer name nftm1", "link set nftm0 up", "link set nftm1 up",
		"addr add 192.0.2.10/24 dev nftm0", "rule add from 192.0.2.10/32 lookup 100 pref 32764",
		"rule add iif lo lookup main pref 32764", "route add 198.51.100.0/24 dev nftm0 table 100"} {
		ns.MustRun(t, "ip", strings.Fields(l)...)
	}
	foreign := func() string {
		return ns.MustRun(t, "ip", "rule", "show") + ns.MustRun(t, "ip", "route", "show", "table", "100")
	}
	for _, what := range []func() error{
		func() error { _, _, err := c.Ensure(r); return err },
		func() error { _, err := c.Remove(r); return err },
	} {
		if err := what(); err != nil {
			t.Fatal(err)
		}
		got := foreign()
		for _, want := range []string{"from 192.0.2.10 lookup 100", "from all iif lo lookup main", "198.51.100.0/24 dev nftm0"} {
			if !strings.Contains(got, want) {
				t.Errorf("%q was deleted:\n%s", want, got)
			}
		}
	}
	c.Ensure(r)
	if got, err := c.Show(r); err != nil || got != RoutingText(r) {
		t.Errorf("Show compares someone else's routing: %v\n%s", err, got)
	}
}

// A namespace whose lo is down cannot hold the local route: Ensure says so and leaves
// nothing behind.
func TestRoutingLoopbackDown(t *testing.T) {
	nettest.Require(t)
	ns := nettest.New(t)
	ns.MustRun(t, "ip", "link", "set", "lo", "down")
	c := openRouting(t, ns)
	r := ruleset.Routing{Mark: 0x111, Mask: 0xfff, Table: 100, Priority: 32764, IPv6: true}
	for _, ipv6 := range []bool{true, false} { // the kernel refuses only the IPv6 route
		r.IPv6 = ipv6
		_, _, err := c.Ensure(r)
		if !errors.Is(err, ErrLoopbackDown) {
			t.Errorf("Ensure with lo down, IPv6 %v: %v, want ErrLoopbackDown", ipv6, err)
		}
		if got := owned(t, ns); got != "" {
			t.Errorf("a failed Ensure left routing:\n%s", got)
		}
	}
}

// Show prints each rule and route as ip(8) does: every line of Show is the start of a
// line of `ip rule show` or `ip route show table T` (which adds scope, metric and
// preference). A single host is an address alone, as ip prints it (it was shown with
// /32 or /128).
func TestRoutingShowAsIP(t *testing.T) {
	nettest.Require(t)
	r := ruleset.Routing{Mark: 0x111, Mask: 0xfff, Table: 100, Priority: 32764, IPv6: true}
	ns := nettest.New(t)
	c := openRouting(t, ns)
	if _, _, err := c.Ensure(r); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{
		"-4 route add local 10.1.2.3 dev lo table 100",
		"-4 route add local 10.4.0.0/16 dev lo table 100",
		"-4 route add blackhole 10.9.9.9 table 100",
		"-6 route add local 2001:db8::1 dev lo table 100",
		"-6 route add blackhole 2001:db8::9 table 100",
		"-6 route add 2001:db8:1::/64 from 2001:db8::5 dev lo table 100",
		"-6 route add 2001:db8:2::/64 from 2001:db8:5::/48 dev lo table 100",
	} {
		ns.MustRun(t, "ip", strings.Fields(l)...)
	}
	shown, err := c.Show(r)
	if err != nil {
		t.Fatal(err)
	}
	ip := map[string][]string{}
	for _, fam := range []string{"-4", "-6"} {
		out := ns.MustRun(t, "ip", fam, "rule", "show") + ns.MustRun(t, "ip", fam, "route", "show", "table", "100")
		for l := range strings.SplitSeq(out, "\n") {
			ip[fam] = append(ip[fam], strings.Join(strings.Fields(l), " ")+" ")
		}
	}
	n := 0
	for l := range strings.SplitSeq(strings.TrimSpace(shown), "\n") {
		fam, text, ok := strings.Cut(strings.TrimPrefix(l, "ip "), " ")
		if _, after, found := strings.Cut(text, ": "); ok && found {
			text = after
		}
		text = strings.Join(strings.Fields(text), " ") + " "
		if !slices.ContainsFunc(ip[fam], func(s string) bool { return strings.HasPrefix(s, text) }) {
			t.Errorf("Show's %q is not as ip %s prints it:\n%s", l, fam, strings.Join(ip[fam], "\n"))
		}
		n++
	}
	if n != 11 { // r's 2 rules and 2 routes, 7 more routes
		t.Errorf("Show printed %d lines, want 11:\n%s", n, shown)
	}
}

// The rule and route dumps go in one sendmsg (executeQueries). When the rule dump does
// not fit in the kernel's first pass (many rules), the route dump is refused with EBUSY
// and asked again alone: the routing is read whole all the same.
func TestRoutingDumpsTogetherWithLongRuleDump(t *testing.T) {
	nettest.Require(t)
	ns := nettest.New(t)
	c := openRouting(t, ns)
	r := ruleset.Routing{Mark: 0x111, Mask: 0xfff, Table: 100, Priority: 32764, IPv6: true}
	if changed, _, err := c.Ensure(r); err != nil || !changed {
		t.Fatalf("Ensure: %v %v", changed, err)
	}
	if c.raw.busyDumps != 0 {
		t.Errorf("%d dumps refused for a pod's few rules, want none (both dumps whole in one exchange)", c.raw.busyDumps)
	}
	// Someone else's rules, enough for a rule dump of several passes.
	var reqs []request
	for i := range 1000 {
		reqs = append(reqs, ruleMsg(0x20 /* RTM_NEWRULE */, routeFamily{nl: 2 /* AF_INET */}, ruleset.Routing{Mark: uint32(i + 1), Mask: 0xffff, Table: 200, Priority: 1000 + i}))
	}
	errs, err := c.raw.executeAll(reqs)
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	// A drifted route in nftmesh's table, which only the route dump shows.
	ns.MustRun(t, "ip", "-4", "route", "add", "unreachable", "10.9.9.0/24", "table", "100")
	changed, _, err := c.Ensure(r)
	if err != nil || !changed {
		t.Fatalf("Ensure over 1000 rules and a drifted route: %v %v, want a change", changed, err)
	}
	if c.raw.busyDumps == 0 {
		t.Log("the kernel made the 1000-rule dump in one pass: no route dump was refused")
	} else {
		t.Logf("%d route dumps refused (EBUSY) and asked again", c.raw.busyDumps)
	}
	if out, _ := ns.Run("", "ip", "-4", "route", "show", "table", "100"); strings.Contains(out, "unreachable") {
		t.Errorf("the drifted route was not seen:\n%s", out)
	}
	if holds, err := c.Holds(r); err != nil || !holds {
		t.Errorf("Holds after Ensure: %v %v", holds, err)
	}
	if n := strings.Count(ns.MustRun(t, "ip", "-4", "rule", "show"), "lookup 200"); n != 1000 {
		t.Errorf("%d of the other 1000 rules left", n)
	}
}
