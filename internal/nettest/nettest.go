// Package nettest gives tests throw-away network namespaces and the real nft binary.
//
// Every namespace is named uniquely (nftmesh-t<pid>-<n>) and deleted in t.Cleanup; the
// machine's own namespace is never touched. Tests that need root or a tool skip when
// run by hand without them, and fail under CI (CI=true), where skipping would hide them.
package nettest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nftmesh/nftmesh/internal/netns"
)

var counter atomic.Int64

// Netns is a named network namespace made for one test.
type Netns struct {
	Name string
	Path string
	// Handle is open for the test's life, for the APIs that take one (dataplane, zds).
	Handle *netns.NS
}

// Require skips the test (or fails it under CI) unless it runs as root with the named
// tools on PATH.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("CI") != "" {
			t.Fatalf(format, args...)
		}
		t.Skipf(format, args...)
	}
	if os.Geteuid() != 0 {
		missing("needs root to create network namespaces")
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			missing("needs %s on PATH (scripts/setup installs it): %v", tool, err)
		}
	}
}

// New creates a network namespace with lo up and deletes it when the test ends.
func New(t testing.TB) *Netns {
	t.Helper()
	Require(t)
	name := fmt.Sprintf("nftmesh-t%d-%d", os.Getpid(), counter.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	n := &Netns{Name: name, Path: "/run/netns/" + name}
	h, err := netns.Open(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	n.Handle = h
	t.Cleanup(func() { h.Close() }) // before the delete above: cleanups run last first
	n.MustRun(t, "ip", "link", "set", "lo", "up")
	return n
}

// Run runs a command inside the namespace, with stdin, and returns its stdout. The error
// carries stderr.
func (n *Netns) Run(stdin string, name string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s in netns %s: %w: %s", name, strings.Join(args, " "), n.Name, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// MustRun is Run without stdin that fails the test on error.
func (n *Netns) MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Run("", name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// NFTPrintBack checks text with `nft -c -f`, loads it with `nft -f` into the namespace,
// and returns what `nft -y list table inet <table>` prints, with counter values removed
// (the one thing Render leaves out on purpose).
func (n *Netns) NFTPrintBack(t testing.TB, text, table string) string {
	t.Helper()
	if _, err := n.Run(text, "nft", "-c", "-f", "-"); err != nil {
		t.Fatalf("nft -c rejects the ruleset: %v\n%s", err, text)
	}
	if _, err := n.Run(text, "nft", "-f", "-"); err != nil {
		t.Fatalf("nft -f rejects the ruleset: %v\n%s", err, text)
	}
	out, err := n.Run("", "nft", "-y", "list", "table", "inet", table)
	if err != nil {
		t.Fatal(err)
	}
	return counterValues.ReplaceAllString(out, "counter")
}

var counterValues = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// HostGuard snapshots the machine's own nftables ruleset and policy routing, and returns
// a check that they are unchanged. Tests only read them: a difference means a test wrote
// outside its own namespaces, which must never happen. Use it in TestMain.
func HostGuard() func() error {
	snapshot := func() string {
		var b strings.Builder
		for _, args := range [][]string{{"nft", "list", "ruleset"}, {"ip", "-4", "rule"}, {"ip", "-6", "rule"}} {
			out, _ := exec.Command(args[0], args[1:]...).CombinedOutput()
			b.Write(out)
		}
		return b.String()
	}
	if os.Geteuid() != 0 {
		return func() error { return nil }
	}
	before := snapshot()
	return func() error {
		if after := snapshot(); after != before {
			return fmt.Errorf("the machine's own network namespace changed during the tests:\n--- before\n%s\n--- after\n%s", before, after)
		}
		return nil
	}
}

// RunGuarded is a TestMain body: it runs the tests and fails the run if the machine's own
// namespace changed.
func RunGuarded(m *testing.M) int {
	check := HostGuard()
	code := m.Run()
	if err := check(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		return 1
	}
	return code
}
