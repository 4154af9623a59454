package dataplane

import (
	"errors"
	"flag"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
	"github.com/nftmesh/nftmesh/kernel"
	"github.com/nftmesh/nftmesh/ruleset"
)

var updateFake = flag.Bool("update", false, "rewrite testdata/fake_dump.golden")

// namedNS is a handle named name on the test's own namespace: the Fake tells namespaces
// apart by name and never enters them, so no root is needed.
func namedNS(t testing.TB, name string) *netns.NS {
	t.Helper()
	self, err := netns.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	ns, err := netns.FromFd(self.Fd(), name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

func hostDesired(t testing.TB, name string) ruleset.Desired {
	t.Helper()
	d, err := compiler.HostState(intent(t, name))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestFakeDump: the Fake's dump of a node with two pods is golden text (`just golden`
// rewrites it): routing, tables as Render prints them, the pod IPs with their owners.
func TestFakeDump(t *testing.T) {
	f := NewFake()
	node, a, b := namedNS(t, "node"), namedNS(t, "/run/netns/pod-a"), namedNS(t, "/run/netns/pod-b")
	mustApply(t, f, node, hostDesired(t, "default-dualstack"))
	mustApply(t, f, a, podDesired(t, "default-dualstack"))
	mustApply(t, f, b, podDesired(t, "redirect-ipv4"))
	for _, e := range []struct{ ip, uid string }{{"10.0.0.7", "uid-a"}, {"fd00::7", "uid-a"}, {"10.0.0.3", "uid-b"}} {
		if _, err := f.AddPodIP(node, netip.MustParseAddr(e.ip), e.uid); err != nil {
			t.Fatal(err)
		}
	}
	got := f.Dump()
	const golden = "testdata/fake_dump.golden"
	if *updateFake {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run `just golden` to create it)", err)
	}
	if d := textdiff.Unified(golden, "dump", string(want), got); d != "" {
		t.Errorf("the Fake's dump differs from the golden file (`just golden` if intended):\n%s", d)
	}
	if again := f.Dump(); again != got {
		t.Errorf("two dumps of the same state differ")
	}
}

func mustApply(t testing.TB, f Interface, ns *netns.NS, d ruleset.Desired) Result {
	t.Helper()
	res, err := f.Apply(ns, d)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestFakeContract walks the Fake through what the agent does and checks Manager's
// contract at each step.
func TestFakeContract(t *testing.T) {
	f := NewFake()
	node, pod := namedNS(t, "node"), namedNS(t, "pod")
	def, custom := podDesired(t, "default-dualstack"), podDesired(t, "custom-dualstack")

	if r := mustApply(t, f, pod, def); r.Action != kernel.Created || !r.RoutingChanged || r.Writes == 0 {
		t.Errorf("first apply: %+v, want created with routing", r)
	}
	ops := len(f.Ops())
	if r := mustApply(t, f, pod, def); r.Action != kernel.Unchanged || r.RoutingChanged || r.Writes != 0 {
		t.Errorf("same apply: %+v, want unchanged, nothing written", r)
	}
	if len(f.Ops()) != ops {
		t.Errorf("an unchanged apply was recorded as a change: %v", f.Ops()[ops:])
	}
	if r := mustApply(t, f, pod, custom); r.Action != kernel.Replaced || !r.RoutingChanged {
		t.Errorf("other intent: %+v, want replaced, routing changed (other marks)", r)
	}

	ip, ip2 := netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("::ffff:10.1.0.6")
	if _, err := f.AddPodIP(node, ip, "uid-1"); err == nil || !strings.Contains(err.Error(), "pod_ips_v4") {
		t.Errorf("pod IP before the node table: %v, want an error naming the set", err)
	}
	if _, err := f.AddPodIP(node, ip, ""); err == nil {
		t.Errorf("pod IP without UID accepted")
	}
	mustApply(t, f, node, hostDesired(t, "default-dualstack"))
	steps := []struct {
		add       bool
		ip        netip.Addr
		uid       string
		wantWrite bool
	}{
		{true, ip, "uid-1", true},
		{true, ip, "uid-1", false}, // a duplicate add is a no-op
		{true, ip, "uid-2", true},  // the IP went to a new pod: handed over
		{false, ip, "uid-1", false},
		{true, ip2, "uid-3", true}, // IPv4-mapped: stored as IPv4
	}
	for i, s := range steps {
		op := f.RemovePodIP
		if s.add {
			op = f.AddPodIP
		}
		wrote, err := op(node, s.ip, s.uid)
		if err != nil || wrote != s.wantWrite {
			t.Errorf("step %d (%+v): wrote %v, %v; want %v", i, s, wrote, err, s.wantWrite)
		}
	}
	// A replace of the node table keeps the pod IPs.
	if r := mustApply(t, f, node, hostDesired(t, "custom-dualstack")); r.Action != kernel.Replaced || r.RoutingChanged {
		t.Errorf("node replace: %+v", r)
	}
	dump := f.Dump()
	for _, want := range []string{"# element pod_ips_v4 10.1.0.5 owner uid-2\n", "# element pod_ips_v4 10.1.0.6 owner uid-3\n"} {
		if !strings.Contains(dump, want) {
			t.Errorf("dump after the node replace lacks %q:\n%s", want, dump)
		}
	}
	if wrote, err := f.RemovePodIP(node, ip, "uid-2"); !wrote || err != nil {
		t.Errorf("remove by the owner: %v, %v", wrote, err)
	}

	// A rejected operation changes nothing.
	reject := errors.New("rejected")
	f.Fail = func(op, ns string) error {
		if op == "apply" && ns == "pod" {
			return reject
		}
		return nil
	}
	before := f.Dump()
	if _, err := f.Apply(pod, def); !errors.Is(err, reject) || !strings.Contains(err.Error(), "netns pod") {
		t.Errorf("apply with Fail: %v, want the injected error with the namespace", err)
	}
	if f.Dump() != before {
		t.Errorf("a failed apply changed the state")
	}
	f.Fail = nil
	bad := podDesired(t, "default-dualstack")
	bad.Table.Chains[0].Rules = append(bad.Table.Chains[0].Rules, ruleset.Rule{Statements: []ruleset.Statement{ruleset.Redirect{Port: 0}}})
	if _, err := f.Apply(pod, bad); err == nil || f.Dump() != before {
		t.Errorf("an invalid table: %v, want an error and no change", err)
	}

	if removed, err := f.Remove(pod, custom); !removed || err != nil {
		t.Errorf("remove: %v, %v", removed, err)
	}
	if removed, err := f.Remove(pod, custom); removed || err != nil {
		t.Errorf("remove again: %v, %v; want nothing to remove", removed, err)
	}
	if strings.Contains(f.Dump(), "# netns pod\n") {
		t.Errorf("a removed pod is still in the dump:\n%s", f.Dump())
	}
	if got := f.Ops(); !slices.ContainsFunc(got, func(s string) bool { return strings.HasPrefix(s, "remove pod") }) {
		t.Errorf("ops %v lack the remove", got)
	}
}

// TestFakeMatchesManager runs one sequence of the agent's operations on a Manager in real
// namespaces and on a Fake, and wants the same answer from both at every step: the Fake
// may only be used where it tells no lies.
func TestFakeMatchesManager(t *testing.T) {
	nettest.Require(t, "nft")
	realPod, realNode := nettest.New(t), nettest.New(t)
	m := quietManager()
	defer m.Close()
	f := NewFake()
	fakePod, fakeNode := namedNS(t, "pod"), namedNS(t, "node")
	def, custom := podDesired(t, "default-dualstack"), podDesired(t, "custom-dualstack")
	host, host2 := hostDesired(t, "default-dualstack"), hostDesired(t, "custom-dualstack")
	ip := netip.MustParseAddr("10.1.0.5")

	type answer struct {
		Action  kernel.Action
		Routing bool
		Wrote   bool
		Failed  bool
	}
	type step struct {
		name string
		run  func(i Interface, pod, node *netns.NS) answer
	}
	var steps []step
	apply := func(name string, target func(pod, node *netns.NS) *netns.NS, d ruleset.Desired) {
		steps = append(steps, step{name, func(i Interface, pod, node *netns.NS) answer {
			r, err := i.Apply(target(pod, node), d)
			return answer{Action: r.Action, Routing: r.RoutingChanged, Failed: err != nil}
		}})
	}
	boolOp := func(name string, op func(i Interface, pod, node *netns.NS) (bool, error)) {
		steps = append(steps, step{name, func(i Interface, pod, node *netns.NS) answer {
			w, err := op(i, pod, node)
			return answer{Wrote: w, Failed: err != nil}
		}})
	}
	podNS := func(pod, _ *netns.NS) *netns.NS { return pod }
	nodeNS := func(_, node *netns.NS) *netns.NS { return node }
	apply("create pod", podNS, def)
	apply("same pod", podNS, def)
	apply("other intent", podNS, custom)
	boolOp("pod IP before the node table", func(i Interface, _, node *netns.NS) (bool, error) { return i.AddPodIP(node, ip, "uid-1") })
	apply("create node", nodeNS, host)
	boolOp("add pod IP", func(i Interface, _, node *netns.NS) (bool, error) { return i.AddPodIP(node, ip, "uid-1") })
	boolOp("add it again", func(i Interface, _, node *netns.NS) (bool, error) { return i.AddPodIP(node, ip, "uid-1") })
	boolOp("hand it over", func(i Interface, _, node *netns.NS) (bool, error) { return i.AddPodIP(node, ip, "uid-2") })
	boolOp("remove by the old owner", func(i Interface, _, node *netns.NS) (bool, error) { return i.RemovePodIP(node, ip, "uid-1") })
	apply("replace node", nodeNS, host2)
	boolOp("remove by the owner", func(i Interface, _, node *netns.NS) (bool, error) { return i.RemovePodIP(node, ip, "uid-2") })
	boolOp("remove pod", func(i Interface, pod, _ *netns.NS) (bool, error) { return i.Remove(pod, custom) })
	boolOp("remove pod again", func(i Interface, pod, _ *netns.NS) (bool, error) { return i.Remove(pod, custom) })
	apply("pod again", podNS, def)
	// The connection mark changes and changes back, with a remove by the old intent between:
	// the Manager owns all routing at its pref, so each change is a change.
	apply("other intent, again", podNS, custom)
	boolOp("remove with the first intent", func(i Interface, pod, _ *netns.NS) (bool, error) { return i.Remove(pod, def) })
	apply("first intent after the remove", podNS, def)
	apply("back to the other intent", podNS, custom)
	apply("IPv4 only", podNS, podDesired(t, "custom-ipv4"))
	apply("dual-stack again", podNS, custom)

	for _, s := range steps {
		want := s.run(m, realPod.Handle, realNode.Handle)
		if got := s.run(f, fakePod, fakeNode); got != want {
			t.Errorf("%s: Fake answered %+v, Manager %+v", s.name, got, want)
		}
	}
}

// What the Manager refuses, the Fake refuses: a closed handle, a state without a table.
func TestFakeRefuses(t *testing.T) {
	f := NewFake()
	pod := namedNS(t, "pod")
	d := podDesired(t, "default-dualstack")
	if _, err := f.Remove(pod, ruleset.Desired{Routing: d.Routing}); err == nil {
		t.Errorf("Remove without a table accepted")
	}
	if _, err := f.Apply(pod, ruleset.Desired{}); err == nil {
		t.Errorf("Apply without a table accepted")
	}
	pod.Close()
	if _, err := f.Apply(pod, d); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Apply on a closed handle: %v", err)
	}
}
