package dataplane

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
	"github.com/nftmesh/nftmesh/kernel"
)

// ownedRouting is what `ip` shows of the routing nftmesh owns: rules at pref 32764 and
// routes in table 100, both families.
func ownedRouting(t *testing.T, ns *nettest.Netns) string {
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

// Routing drift is shown by Diff (alone, it still makes a diff), repaired by Apply, and
// an older intent's routing is replaced, not kept beside the new one; Remove leaves
// nothing at nftmesh's pref or in its table, whatever marks wrote it.
func TestRoutingDrift(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	defer m.Close()
	d := podDesired(t, "default-dualstack")
	if _, err := m.Apply(ns.Handle, d); err != nil {
		t.Fatal(err)
	}
	clean := ownedRouting(t, ns)
	if out, err := Diff(ns.Handle, d); err != nil || out != "" {
		t.Fatalf("diff right after apply: %v\n%s", err, out)
	}

	for _, drift := range [][]string{
		{"route replace default dev lo table 100"},
		{"route del local default dev lo table 100", "route add unreachable default table 100"},
		{"-6 route add fd00:9::/64 dev lo table 100"},
		{"rule add fwmark 0x222/0xfff lookup 100 pref 32764"},
	} {
		for _, l := range drift {
			ns.MustRun(t, "ip", strings.Fields(l)...)
		}
		out, err := Diff(ns.Handle, d)
		if err != nil || out == "" {
			t.Errorf("%q: diff shows nothing: %v", drift, err)
		}
		if strings.Contains(out, "table inet") || !strings.Contains(out, "+ip -4 route table 100: local default dev lo") && !strings.Contains(out, "-ip ") {
			t.Errorf("%q: diff shows the wrong thing:\n%s", drift, out)
		}
		t.Logf("%q:\n%s", drift, out)
		res, err := m.Apply(ns.Handle, d)
		if err != nil || !res.RoutingChanged || res.Action != kernel.Unchanged {
			t.Errorf("%q: apply: %+v %v, want the routing repaired, the table unchanged", drift, res, err)
		}
		if got := ownedRouting(t, ns); got != clean {
			t.Errorf("%q: routing not repaired:\n%s", drift, textdiff.Unified("want", "got", clean, got))
		}
		if out, err := Diff(ns.Handle, d); err != nil || out != "" {
			t.Errorf("%q: diff after the repair: %v\n%s", drift, err, out)
		}
	}

	// Another connection mark: the old rule goes, it does not stay beside the new one.
	custom := podDesired(t, "custom-dualstack")
	if *custom.Routing == *d.Routing {
		t.Fatal("custom-dualstack has the default routing: pick another fixture")
	}
	if res, err := m.Apply(ns.Handle, custom); err != nil || !res.RoutingChanged {
		t.Fatalf("apply custom: %+v %v", res, err)
	}
	rules := ns.MustRun(t, "ip", "rule", "show")
	if n := strings.Count(rules, "32764:"); n != 1 || !strings.Contains(rules, fmt.Sprintf("fwmark %#x/%#x", custom.Routing.Mark, custom.Routing.Mask)) {
		t.Errorf("after a mark change, %d rules at 32764, want the new one only:\n%s", n, rules)
	}
	// A delete with the old intent still removes everything nftmesh owns.
	if removed, err := m.Remove(ns.Handle, d); err != nil || !removed {
		t.Fatalf("remove: %v %v", removed, err)
	}
	if got := ownedRouting(t, ns); got != "" {
		t.Errorf("remove left routing:\n%s", got)
	}
}

// A table the kernel rejects after the routing was repaired puts the routing back as
// it was: the previous table keeps the routing it was applied with.
func TestRejectedApplyRestoresRouting(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	defer m.Close()
	if _, err := m.Apply(ns.Handle, podDesired(t, "custom-dualstack")); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "ip", "-6", "route", "add", "unreachable", "fd00:9::/64", "table", "100")
	before, table := ownedRouting(t, ns), nftTable(t, ns)
	bad := podDesired(t, "default-dualstack") // other marks: the routing changes
	bad.Table.Chains[0].Rules = append(bad.Table.Chains[0].Rules, bad.Table.Chains[0].Rules[0])
	bad.Table.Chains = append(bad.Table.Chains, bad.Table.Chains[0]) // a duplicate chain: rejected (EEXIST)
	if _, err := m.Apply(ns.Handle, bad); err == nil {
		t.Fatal("the kernel accepted a table with a duplicate chain")
	}
	if got := ownedRouting(t, ns); got != before {
		t.Errorf("routing after a rejected apply:\n%s", textdiff.Unified("before", "after", before, got))
	}
	if nftTable(t, ns) != table {
		t.Error("table changed by a rejected apply")
	}
}

// A namespace whose lo is down: a clear error naming it, and nothing applied.
func TestApplyLoopbackDown(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	ns.MustRun(t, "ip", "link", "set", "lo", "down")
	m := quietManager()
	defer m.Close()
	_, err := m.Apply(ns.Handle, podDesired(t, "default-dualstack"))
	if err == nil || !strings.Contains(err.Error(), "loopback is down in "+ns.Path) || strings.Contains(err.Error(), "network is down") {
		t.Errorf("apply with lo down: %v, want \"loopback is down in %s\"", err, ns.Path)
	}
	if got := ownedRouting(t, ns); got != "" {
		t.Errorf("routing left by a failed apply:\n%s", got)
	}
	if got := nftTable(t, ns); got != "" {
		t.Errorf("table left by a failed apply:\n%s", got)
	}
}

// applyChild is one process of TestConcurrentAppliesAcrossProcesses, a CLI run again and
// again: it compiles its intent, then for each line on stdin applies it with a new
// Manager (as `nftmesh apply` does) and answers a line, "ok" or the error.
func applyChild(spec string) int {
	path, name, _ := strings.Cut(spec, "|")
	data, err := os.ReadFile(filepath.Join("../fixtures/intents", name+".yaml"))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	in, err := compiler.Parse(data)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	d, err := compiler.PodState(in, nil)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		m := quietManager()
		_, err := applyPath(m, path, d)
		m.Close()
		if err != nil {
			fmt.Println(strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			fmt.Println("ok")
		}
	}
	return 0
}

// Concurrent applies from different processes (CLIs, agents) with different intents
// leave one intent whole: table and routing from the same one. Each round, every
// process applies once, all at the same moment; then the namespace must hold one
// intent's table with the same intent's routing (IPv6 rule and route if and only if
// the table is the dual-stack one).
func TestConcurrentAppliesAcrossProcesses(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	names := []string{"default-dualstack", "default-ipv4"}
	tables := map[string]string{}
	for _, n := range names {
		tables[n] = podDesired(t, n).Table.Render()
	}
	rounds, procs := 20, 16
	if testing.Short() {
		rounds = 8
	}
	type child struct {
		cmd  *exec.Cmd
		in   io.WriteCloser
		out  *bufio.Scanner
		name string
	}
	var children []child
	for i := 0; i < procs; i++ {
		c := child{cmd: exec.Command(os.Args[0], "-test.run=^$"), name: names[i%2]}
		c.cmd.Env = append(os.Environ(), "NFTMESH_TEST_APPLY_CHILD="+ns.Path+"|"+c.name)
		c.cmd.Stderr = os.Stderr
		var err error
		if c.in, err = c.cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		stdout, err := c.cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		c.out = bufio.NewScanner(stdout)
		if err := c.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		children = append(children, c)
	}
	defer func() {
		for _, c := range children {
			c.in.Close()
			c.cmd.Wait()
		}
	}()
	mixed := 0
	for round := 0; round < rounds; round++ {
		for _, c := range children {
			io.WriteString(c.in, "go\n")
		}
		for _, c := range children {
			if !c.out.Scan() {
				t.Fatalf("round %d: a %s process ended", round, c.name)
			}
			if got := c.out.Text(); got != "ok" {
				t.Errorf("round %d: %s: %s", round, c.name, got)
			}
		}
		table, routing := nftTable(t, ns), ownedRouting(t, ns)
		winner := ""
		for _, n := range names {
			if table == tables[n] {
				winner = n
			}
		}
		v6 := strings.Contains(routing, "-6 rule") || strings.Contains(routing, "-6 route")
		switch {
		case winner == "":
			t.Fatalf("round %d: the table is no intent's:\n%s", round, table)
		case v6 != (winner == "default-dualstack"):
			mixed++
			t.Errorf("round %d: table from %s, routing from the other intent:\n%s", round, winner, routing)
		}
	}
	t.Logf("%d rounds of %d processes, %d mixed", rounds, procs, mixed)
}

// The lock file: 0600 in a 0700 directory; another holder makes Apply wait; a holder
// that dies releases it; Remove of a pod deletes it.
func TestNamespaceLock(t *testing.T) {
	nettest.Require(t, "nft", "flock")
	ns := nettest.New(t)
	m := quietManager()
	defer m.Close()
	m.LockDir = filepath.Join(t.TempDir(), "locks")
	d := podDesired(t, "default-ipv4")
	if _, err := m.Apply(ns.Handle, d); err != nil {
		t.Fatal(err)
	}
	path := lockPath(m.LockDir, ns.Handle.Key())
	for p, want := range map[string]os.FileMode{m.LockDir: 0o700 | os.ModeDir, path: 0o600} {
		if st, err := os.Stat(p); err != nil || st.Mode() != want {
			t.Errorf("%s: %v %v, want mode %v", p, st.Mode(), err, want)
		}
	}

	// Another process holds the lock: Apply waits until it is killed (its lock dies
	// with it), then goes on.
	// One process holds it (flock(1) locks the shell's descriptor, which sleep inherits
	// by exec): killing it is the holder dying.
	holder := exec.Command("sh", "-c", `exec 9<>"$0" && flock 9 && exec sleep 60`, path)
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		fd, err := unix.Open(path, unix.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		unix.Close(fd)
		if errors.Is(err, unix.EWOULDBLOCK) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("flock(1) never took the lock")
		}
		time.Sleep(10 * time.Millisecond)
	}
	done := make(chan error, 1)
	other := podDesired(t, "redirect-ipv4")
	go func() { _, err := m.Apply(ns.Handle, other); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("apply did not wait for the lock holder: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if nftTable(t, ns) != d.Table.Render() {
		t.Error("the table changed while another process held the lock")
	}
	holder.Process.Signal(syscall.SIGKILL)
	holder.Wait()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("apply still waiting after the lock holder died")
	}
	if nftTable(t, ns) != other.Table.Render() {
		t.Error("the apply that waited did not apply")
	}

	// A holder that hangs: the wait ends with an error naming the lock file, nothing done.
	fd, err := unix.Open(path, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	saved := lockTimeout
	lockTimeout = 200 * time.Millisecond
	_, err = m.Apply(ns.Handle, d)
	// Waits that time out leave nothing behind: no thread parked on the holder.
	threads := func() int { e, _ := os.ReadDir("/proc/self/task"); return len(e) }
	before := threads()
	lockTimeout = 5 * time.Millisecond
	for range 50 {
		m.Apply(ns.Handle, d)
	}
	if after := threads(); after > before+5 {
		t.Errorf("threads %d -> %d after 50 timed-out lock waits", before, after)
	}
	lockTimeout = saved
	unix.Close(fd)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "held") {
		t.Errorf("apply behind a hung holder: %v, want a timeout naming %s", err, path)
	}
	if nftTable(t, ns) != other.Table.Render() {
		t.Error("the apply that timed out changed the table")
	}

	if _, err := m.Remove(ns.Handle, other); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file after the pod's remove: %v, want it deleted", err)
	}
}
