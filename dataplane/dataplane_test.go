package dataplane

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
	"github.com/nftmesh/nftmesh/kernel"
	"github.com/nftmesh/nftmesh/ruleset"
)

func TestMain(m *testing.M) {
	// Re-executed by TestConcurrentAppliesAcrossProcesses: one CLI-like apply.
	if spec := os.Getenv("NFTMESH_TEST_APPLY_CHILD"); spec != "" {
		os.Exit(applyChild(spec))
	}
	// Lock files go to a directory of this run (children inherit it), not /run/nftmesh.
	if os.Getenv(LockDirEnv) == "" {
		dir, err := os.MkdirTemp("", "nftmesh-locks")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Setenv(LockDirEnv, filepath.Join(dir, "locks"))
		code := nettest.RunGuarded(m)
		os.RemoveAll(dir)
		os.Exit(code)
	}
	// Re-executed as an unprivileged user by TestPermissionDenied.
	if path := os.Getenv("NFTMESH_TEST_APPLY_UNPRIVILEGED"); path != "" {
		d, err := compiler.PodState(compiler.DefaultIntent(), nil)
		if err == nil {
			_, err = applyPath(quietManager(), path, d)
		}
		fmt.Print(err)
		os.Exit(0)
	}
	os.Exit(nettest.RunGuarded(m))
}

// applyPath is what the CLI and the agent do with a namespace path: open it, apply.
func applyPath(m *Manager, path string, d ruleset.Desired) (Result, error) {
	ns, err := netns.Open(path)
	if err != nil {
		return Result{}, err
	}
	defer ns.Close()
	return m.Apply(ns, d)
}

func quietManager() *Manager { return NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), 0) }

func intent(t testing.TB, name string) compiler.Intent {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("../fixtures/intents", name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	in, err := compiler.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func podDesired(t testing.TB, name string) ruleset.Desired {
	t.Helper()
	d, err := compiler.PodState(intent(t, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func nftTable(t *testing.T, ns *nettest.Netns) string {
	t.Helper()
	out, err := ns.Run("", "nft", "-y", "list", "table", "inet", "nftmesh")
	if err != nil {
		return ""
	}
	return out
}

// foreign puts a table nftmesh does not own into the namespace, and returns a function
// that fails the test unless it is byte-for-byte unchanged.
func foreign(t *testing.T, ns *nettest.Netns) func(when string) {
	t.Helper()
	const rules = `table inet cni {
	set pods {
		type ipv4_addr
		elements = { 10.1.1.1 }
	}
	chain forward {
		type filter hook forward priority 0; policy accept;
		ip saddr @pods counter accept comment "cni"
	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		oifname "eth9" masquerade
	}
}
table ip legacy {
	chain output {
		type filter hook output priority 0; policy accept;
		meta mark 0x539 counter
	}
}
`
	if _, err := ns.Run(rules, "nft", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	snapshot := func() string {
		a := ns.MustRun(t, "nft", "-a", "list", "table", "inet", "cni")
		b := ns.MustRun(t, "nft", "-a", "list", "table", "ip", "legacy")
		return a + b
	}
	before := snapshot()
	return func(when string) {
		t.Helper()
		if after := snapshot(); after != before {
			t.Errorf("%s: a foreign table changed:\n%s", when, textdiff.Unified("before", "after", before, after))
		}
	}
}

func routing(t *testing.T, ns *nettest.Netns) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []string{"-4", "-6"} {
		b.WriteString(ns.MustRun(t, "ip", fam, "rule", "show"))
		out, _ := ns.Run("", "ip", fam, "route", "show", "table", "100")
		b.WriteString(out)
	}
	return b.String()
}

func TestApplyEveryFixture(t *testing.T) {
	nettest.Require(t, "nft")
	intents, _ := filepath.Glob("../fixtures/intents/*.yaml")
	m := quietManager()
	for _, f := range intents {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(name, func(t *testing.T) {
			ns := nettest.New(t)
			d := podDesired(t, name)
			res, err := m.Apply(ns.Handle, d)
			if err != nil {
				t.Fatal(err)
			}
			if res.Action != kernel.Created || !res.RoutingChanged {
				t.Errorf("first apply: %+v", res)
			}
			golden, err := os.ReadFile(filepath.Join("../fixtures/golden", name+".pod.nft"))
			if err != nil {
				t.Fatal(err)
			}
			if got := nftTable(t, ns); got != string(golden) {
				t.Errorf("live table differs from the golden file:\n%s", textdiff.Unified("golden", "nft list", string(golden), got))
			}
			r := routing(t, ns)
			mark := fmt.Sprintf("fwmark %#x/%#x lookup 100", d.Routing.Mark, d.Routing.Mask)
			if n := strings.Count(r, "32764:\tfrom all "+mark); n != map[bool]int{false: 1, true: 2}[d.Routing.IPv6] {
				t.Errorf("want the rule %q once per family, got:\n%s", mark, r)
			}
			if n := strings.Count(r, "local default dev lo"); n != map[bool]int{false: 1, true: 2}[d.Routing.IPv6] {
				t.Errorf("want the local default route once per family, got:\n%s", r)
			}
		})
	}
}

func TestNoOpReapplyWritesNothing(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	d := podDesired(t, "custom-dualstack")
	if _, err := m.Apply(ns.Handle, d); err != nil {
		t.Fatal(err)
	}
	conn, err := kernel.Dial(ns.Handle)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	gen, err := conn.Generation()
	if err != nil {
		t.Fatal(err)
	}
	routes := routing(t, ns)
	for i := 0; i < 3; i++ {
		res, err := m.Apply(ns.Handle, podDesired(t, "custom-dualstack"))
		if err != nil {
			t.Fatal(err)
		}
		if res.Action != kernel.Unchanged || res.Writes != 0 || res.RoutingChanged {
			t.Errorf("reapply %d: %+v, want unchanged, 0 writes", i, res)
		}
	}
	if gen2, _ := conn.Generation(); gen2 != gen {
		t.Errorf("no-op reapply committed nftables transactions: generation %d -> %d", gen, gen2)
	}
	if r := routing(t, ns); r != routes {
		t.Errorf("no-op reapply changed routing:\n%s", textdiff.Unified("before", "after", routes, r))
	}
}

func TestForeignTablesUntouched(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	check := foreign(t, ns)
	m := quietManager()
	steps := []struct {
		name string
		do   func() error
	}{
		{"create", func() error { _, err := m.Apply(ns.Handle, podDesired(t, "default-dualstack")); return err }},
		{"no-op", func() error { _, err := m.Apply(ns.Handle, podDesired(t, "default-dualstack")); return err }},
		{"replace", func() error { _, err := m.Apply(ns.Handle, podDesired(t, "redirect-ipv4")); return err }},
		{"replace dns", func() error { _, err := m.Apply(ns.Handle, podDesired(t, "custom-dualstack")); return err }},
		{"remove", func() error {
			_, err := m.Remove(ns.Handle, podDesired(t, "custom-dualstack"))
			return err
		}},
		{"remove again", func() error {
			_, err := m.Remove(ns.Handle, podDesired(t, "custom-dualstack"))
			return err
		}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		check(s.name)
	}
}

func TestRemove(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	before := routing(t, ns)
	d := podDesired(t, "default-dualstack")
	if _, err := m.Apply(ns.Handle, d); err != nil {
		t.Fatal(err)
	}
	removed, err := m.Remove(ns.Handle, d)
	if err != nil || !removed {
		t.Fatalf("remove: %v %v", removed, err)
	}
	if got := nftTable(t, ns); got != "" {
		t.Errorf("table left:\n%s", got)
	}
	if after := routing(t, ns); after != before {
		t.Errorf("routing left:\n%s", textdiff.Unified("before apply", "after remove", before, after))
	}
	if removed, err := m.Remove(ns.Handle, d); err != nil || removed {
		t.Errorf("second remove: %v %v, want a no-op", removed, err)
	}
}

// Turning IPv6 off removes the IPv6 routing and rules.
func TestIPv6Off(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	if _, err := m.Apply(ns.Handle, podDesired(t, "default-dualstack")); err != nil {
		t.Fatal(err)
	}
	res, err := m.Apply(ns.Handle, podDesired(t, "default-ipv4"))
	if err != nil || res.Action != kernel.Replaced || !res.RoutingChanged {
		t.Fatalf("%+v %v", res, err)
	}
	if r6 := ns.MustRun(t, "ip", "-6", "rule", "show"); strings.Contains(r6, "lookup 100") {
		t.Errorf("IPv6 rule left:\n%s", r6)
	}
	if strings.Contains(nftTable(t, ns), "ip6") {
		t.Error("IPv6 rules left in the table")
	}
}

// Many goroutines applying to one namespace never fail, and the newest submission wins.
func TestConcurrentAppliesSameNetns(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	names := []string{"default-ipv4", "redirect-dualstack", "custom-ipv4", "dns-pod-enabled-dualstack"}
	desired := map[string]ruleset.Desired{}
	for _, n := range names {
		desired[n] = podDesired(t, n)
	}
	type outcome struct {
		name string
		res  Result
		err  error
	}
	const goroutines = 40
	results := make(chan outcome, goroutines)
	var wg sync.WaitGroup
	for i := 0; i < goroutines; i++ {
		wg.Add(1)
		go func(name string) {
			defer wg.Done()
			res, err := m.Apply(ns.Handle, desired[name])
			results <- outcome{name, res, err}
		}(names[i%len(names)])
	}
	wg.Wait()
	close(results)
	var newest outcome
	applied := 0
	for o := range results {
		if o.err != nil {
			t.Errorf("%s: %v", o.name, o.err)
		}
		if o.res.Seq > newest.res.Seq {
			newest = o
		}
		if !o.res.Superseded {
			applied++
		}
	}
	if newest.res.Superseded {
		t.Errorf("the newest submission (seq %d) was superseded", newest.res.Seq)
	}
	if got, want := nftTable(t, ns), desired[newest.name].Table.Render(); got != want {
		t.Errorf("live table is not the newest intent %s:\n%s", newest.name, textdiff.Unified("newest", "live", want, got))
	}
	t.Logf("%d submissions, %d applied, newest %s", goroutines, applied, newest.name)
}

func TestApplyAllParallel(t *testing.T) {
	nettest.Require(t, "nft")
	m := NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), 8)
	var jobs []Job
	var nss []*nettest.Netns
	for i := 0; i < 24; i++ {
		ns := nettest.New(t)
		nss = append(nss, ns)
		name := []string{"default-dualstack", "redirect-ipv4", "custom-dualstack"}[i%3]
		jobs = append(jobs, Job{NS: ns.Handle, Desired: podDesired(t, name)})
	}
	for i, r := range m.ApplyAll(jobs) {
		if r.Err != nil || r.Result.Action != kernel.Created {
			t.Errorf("job %d: %+v %v", i, r.Result, r.Err)
		}
		if got := nftTable(t, nss[i]); got != jobs[i].Desired.Table.Render() {
			t.Errorf("job %d: live table differs", i)
		}
	}
}

func TestErrors(t *testing.T) {
	nettest.Require(t, "nft")
	m := quietManager()
	d := podDesired(t, "default-ipv4")

	t.Run("netns missing", func(t *testing.T) {
		path := "/run/netns/nftmesh-does-not-exist"
		_, err := applyPath(m, path, d)
		if !errors.Is(err, netns.ErrGone) || !strings.Contains(err.Error(), path) {
			t.Errorf("got %v, want netns.ErrGone naming %s", err, path)
		}
	})
	t.Run("not a netns", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "file")
		os.WriteFile(path, nil, 0o644)
		_, err := applyPath(m, path, d)
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "not a network namespace") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("kernel rejection leaves the netns as it was", func(t *testing.T) {
		ns := nettest.New(t)
		check := foreign(t, ns)
		if _, err := m.Apply(ns.Handle, d); err != nil {
			t.Fatal(err)
		}
		before, routesBefore := nftTable(t, ns), routing(t, ns)
		// Valid to the model, rejected by the kernel: a redirect reached from a filter chain.
		bad := podDesired(t, "default-dualstack")
		bad.Table.Chains = append(bad.Table.Chains, &ruleset.Chain{Name: "sub", Rules: []ruleset.Rule{
			{Statements: []ruleset.Statement{ruleset.Redirect{Port: 1}}}}})
		c := bad.Table.Chain(compiler.ChainManglePrerouting)
		c.Rules = append(c.Rules, ruleset.Rule{Statements: []ruleset.Statement{ruleset.Verdict{Kind: ruleset.Jump, Chain: "sub"}}})
		_, err := m.Apply(ns.Handle, bad)
		if err == nil || !strings.Contains(err.Error(), ns.Path) || !strings.Contains(err.Error(), "table inet nftmesh") {
			t.Fatalf("got %v, want an error naming the netns and the table", err)
		}
		if after := nftTable(t, ns); after != before {
			t.Errorf("table changed by a rejected apply:\n%s", textdiff.Unified("before", "after", before, after))
		}
		if after := routing(t, ns); after != routesBefore {
			t.Errorf("routing changed by a rejected apply (the IPv6 rule must be rolled back):\n%s", textdiff.Unified("before", "after", routesBefore, after))
		}
		check("rejected apply")
	})
	t.Run("permission denied", func(t *testing.T) {
		ns := nettest.New(t)
		// The test binary sits in a private build directory: copy it where nobody can run it.
		dir, err := os.MkdirTemp("", "nftmesh-unpriv")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		os.Chmod(dir, 0o755)
		self, _ := os.ReadFile(os.Args[0])
		bin := filepath.Join(dir, "dataplane.test")
		if err := os.WriteFile(bin, self, 0o755); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "-test.run=^$")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "NFTMESH_TEST_APPLY_UNPRIVILEGED="+ns.Path)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		msg := string(out)
		if !strings.Contains(msg, ns.Path) || !(strings.Contains(msg, "permission denied") || strings.Contains(msg, "operation not permitted")) {
			t.Errorf("unprivileged apply: %q, want a permission error naming the netns", msg)
		}
		if got := nftTable(t, ns); got != "" {
			t.Errorf("unprivileged apply left a table:\n%s", got)
		}
	})
	t.Run("netns deleted mid-apply", func(t *testing.T) {
		// Deleting a namespace's name while applies run must give each apply a clean
		// result: done (the open fd kept the namespace alive) or netns.ErrGone.
		for i := 0; i < 5; i++ {
			name := fmt.Sprintf("nftmesh-t%d-gone%d", os.Getpid(), i)
			if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
				t.Fatalf("%v %s", err, out)
			}
			path := "/run/netns/" + name
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for j := 0; j < 8; j++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, err := applyPath(m, path, d)
					errs <- err
				}()
			}
			exec.Command("ip", "netns", "del", name).Run()
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil && !errors.Is(err, netns.ErrGone) && !strings.Contains(err.Error(), path) {
					t.Errorf("apply during delete: %v", err)
				}
			}
		}
	})
}

func TestHostPodIPs(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	check := foreign(t, ns)
	m := quietManager()
	host, err := compiler.HostState(intent(t, "default-dualstack"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Apply(ns.Handle, host); err != nil {
		t.Fatal(err)
	}
	ip4, ip6 := netip.MustParseAddr("10.244.0.7"), netip.MustParseAddr("fd00:10:244::7")
	elements := func() string {
		s, err := Show(ns.Handle, compiler.TableName)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, l := range strings.Split(s, "\n") {
			if strings.Contains(l, "elements") {
				out = append(out, strings.TrimSpace(l))
			}
		}
		return strings.Join(out, "; ")
	}
	steps := []struct {
		op      string
		ip      netip.Addr
		uid     string
		changed bool
		want    string
	}{
		{"add", ip4, "pod-a", true, "elements = { 10.244.0.7 }"},
		{"add", ip4, "pod-a", false, "elements = { 10.244.0.7 }"},
		{"add", ip6, "pod-a", true, "elements = { 10.244.0.7 }; elements = { fd00:10:244::7 }"},
		{"remove", ip4, "pod-b", false, "elements = { 10.244.0.7 }; elements = { fd00:10:244::7 }"}, // not the owner
		{"add", ip4, "pod-c", true, "elements = { 10.244.0.7 }; elements = { fd00:10:244::7 }"},     // IP reused
		{"remove", ip4, "pod-a", false, "elements = { 10.244.0.7 }; elements = { fd00:10:244::7 }"}, // old owner's late remove
		{"remove", ip4, "pod-c", true, "elements = { fd00:10:244::7 }"},
		{"remove", ip4, "pod-c", false, "elements = { fd00:10:244::7 }"},
	}
	for i, s := range steps {
		var changed bool
		var err error
		if s.op == "add" {
			changed, err = m.AddPodIP(ns.Handle, s.ip, s.uid)
		} else {
			changed, err = m.RemovePodIP(ns.Handle, s.ip, s.uid)
		}
		if err != nil {
			t.Fatalf("step %d %s %s %s: %v", i, s.op, s.ip, s.uid, err)
		}
		if changed != s.changed {
			t.Errorf("step %d %s %s %s: changed=%v, want %v", i, s.op, s.ip, s.uid, changed, s.changed)
		}
		if got := elements(); got != s.want {
			t.Errorf("step %d %s %s %s: %q, want %q", i, s.op, s.ip, s.uid, got, s.want)
		}
	}
	// The owner is kept as the element's comment, where nft shows it too.
	if out := ns.MustRun(t, "nft", "list", "set", "inet", "nftmesh", "pod_ips_v6"); !strings.Contains(out, `comment "pod-a"`) {
		t.Errorf("owner not recorded:\n%s", out)
	}
	// Reapplying the host ruleset (even with a change) keeps the elements.
	changed, err := compiler.HostState(intent(t, "custom-dualstack"))
	if err != nil {
		t.Fatal(err)
	}
	if res, err := m.Apply(ns.Handle, changed); err != nil || res.Action != kernel.Replaced {
		t.Fatalf("%+v %v", res, err)
	}
	if got := elements(); got != "elements = { fd00:10:244::7 }" {
		t.Errorf("elements after host replace: %q", got)
	}
	if _, err := m.AddPodIP(ns.Handle, netip.Addr{}, "x"); err == nil {
		t.Error("invalid IP accepted")
	}
	if _, err := m.AddPodIP(ns.Handle, ip4, ""); err == nil {
		t.Error("empty UID accepted")
	}
	check("pod IP changes")
}

// Among many elements, each lookup finds its own: re-adding with the owner writes
// nothing, another owner takes it over, a removal by a non-owner leaves it.
func TestHostPodIPsMany(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	host, err := compiler.HostState(intent(t, "default-dualstack"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Apply(ns.Handle, host); err != nil {
		t.Fatal(err)
	}
	const n = 300
	ip := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}) }
	uid := func(i int) string { return fmt.Sprintf("pod-%d", i) }
	for i := range n {
		if changed, err := m.AddPodIP(ns.Handle, ip(i), uid(i)); err != nil || !changed {
			t.Fatalf("add %d: changed=%v err=%v", i, changed, err)
		}
	}
	for i := range n {
		if changed, err := m.AddPodIP(ns.Handle, ip(i), uid(i)); err != nil || changed {
			t.Fatalf("re-add %d: changed=%v err=%v", i, changed, err)
		}
		if changed, err := m.RemovePodIP(ns.Handle, ip(i), uid(i+1)); err != nil || changed {
			t.Fatalf("remove %d by a non-owner: changed=%v err=%v", i, changed, err)
		}
	}
	if changed, err := m.AddPodIP(ns.Handle, ip(7), "new-owner"); err != nil || !changed {
		t.Fatalf("take-over: changed=%v err=%v", changed, err)
	}
	if out := ns.MustRun(t, "nft", "list", "set", "inet", "nftmesh", "pod_ips_v4"); !strings.Contains(out, `10.244.0.7 comment "new-owner"`) ||
		strings.Count(out, "comment") != n {
		t.Errorf("set after take-over:\n%s", out)
	}
	// An address of the other family than the set's is refused, naming the set.
	if _, err := m.podIP(ns.Handle, netip.MustParseAddr("fd00::1"), "x", func(c *kernel.Conn, table, _ string, a netip.Addr, o string) (bool, error) {
		return c.AddElement(table, compiler.SetPodIPsV4, a, o)
	}, "add"); err == nil || !strings.Contains(err.Error(), "pod_ips_v4") {
		t.Errorf("IPv6 into the IPv4 set: %v", err)
	}
}

// Sockets are kept per namespace between applies, and released by Remove and Close.
func TestSocketCache(t *testing.T) {
	nettest.Require(t, "nft")
	m := quietManager()
	a, b := nettest.New(t), nettest.New(t)
	d := podDesired(t, "default-dualstack")
	for _, ns := range []*nettest.Netns{a, b, a} {
		if _, err := m.Apply(ns.Handle, d); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(m.socks); n != 2 {
		t.Fatalf("%d namespaces cached, want 2", n)
	}
	var first *nsSockets
	for _, s := range m.socks {
		first = s
	}
	if _, err := m.Apply(a.Handle, d); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Apply(b.Handle, d); err != nil {
		t.Fatal(err)
	}
	reused := false
	for _, s := range m.socks {
		reused = reused || s == first
	}
	if !reused {
		t.Error("sockets were made again for a cached namespace")
	}
	if _, err := m.Remove(a.Handle, d); err != nil {
		t.Fatal(err)
	}
	if n := len(m.socks); n != 1 {
		t.Errorf("%d namespaces cached after a remove, want 1", n)
	}
	m.Close()
	if n := len(m.socks); n != 0 {
		t.Errorf("%d namespaces cached after Close", n)
	}
	// A manager still works after Close: it makes sockets again.
	if res, err := m.Apply(b.Handle, d); err != nil || res.Action != kernel.Unchanged {
		t.Errorf("apply after Close: %+v %v", res, err)
	}
	m.Close()
}
