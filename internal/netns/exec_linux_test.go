package netns_test

import (
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

func TestMain(m *testing.M) { os.Exit(nettest.RunGuarded(m)) }

func nsIno(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// Work runs in the target namespace, and the workers come back: calls for the machine's
// own namespace, made after many visits elsewhere, still see it.
func TestDoRunsInNamespaceAndComesBack(t *testing.T) {
	ns := nettest.New(t)
	self, err := netns.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	target, home := nsIno(t, ns.Path), nsIno(t, "/proc/self/ns/net")
	if target == home {
		t.Fatal("test namespace is the machine's")
	}
	for i := 0; i < 50; i++ {
		var inside, back uint64
		if err := ns.Handle.Do(func() error { inside = nsIno(t, "/proc/thread-self/ns/net"); return nil }); err != nil {
			t.Fatal(err)
		}
		if err := self.Do(func() error { back = nsIno(t, "/proc/thread-self/ns/net"); return nil }); err != nil {
			t.Fatal(err)
		}
		if inside != target || back != home {
			t.Fatalf("visit %d: inside %d (want %d), home visit %d (want %d)", i, inside, target, back, home)
		}
	}
	if got := nsIno(t, "/proc/thread-self/ns/net"); got != home {
		t.Errorf("the test's own thread moved to namespace %d", got)
	}
}

func TestDoErrors(t *testing.T) {
	self, err := netns.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if err := self.Do(func() error { panic("boom") }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("panic not turned into an error: %v", err)
	}
	if err := self.Do(func() error { return nil }); err != nil {
		t.Errorf("workers gone after a panic: %v", err)
	}
	self.Close()
	if err := self.Do(func() error { return nil }); err == nil {
		t.Errorf("Do on a closed handle ran")
	}
}

// A Close racing a Do must neither run fn in another namespace nor trip the race
// detector: Do holds the descriptor until fn has run.
func TestDoRacesClose(t *testing.T) {
	for range 200 {
		ns, err := netns.Open("/proc/self/ns/net")
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- ns.Do(func() error { return nil }) }()
		ns.Close()
		if err := <-done; err != nil && !strings.Contains(err.Error(), "closed") {
			t.Fatalf("Do racing Close: %v", err)
		}
	}
}

// DoHere, like Do, runs in the namespace and comes back (the caller's thread, and later
// visits to the machine's namespace, see the machine's), turns a panic into an error, and
// fails on a closed handle.
func TestDoHere(t *testing.T) {
	ns := nettest.New(t)
	self, err := netns.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	target, home := nsIno(t, ns.Path), nsIno(t, "/proc/self/ns/net")
	for i := 0; i < 50; i++ {
		var inside, back uint64
		if err := ns.Handle.DoHere(func() error { inside = nsIno(t, "/proc/thread-self/ns/net"); return nil }); err != nil {
			t.Fatal(err)
		}
		if err := self.DoHere(func() error { back = nsIno(t, "/proc/thread-self/ns/net"); return nil }); err != nil {
			t.Fatal(err)
		}
		if inside != target || back != home {
			t.Fatalf("visit %d: inside %d (want %d), home visit %d (want %d)", i, inside, target, back, home)
		}
	}
	if got := nsIno(t, "/proc/thread-self/ns/net"); got != home {
		t.Errorf("the test's own thread moved to namespace %d", got)
	}
	if err := ns.Handle.DoHere(func() error { panic("boom") }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("panic not turned into an error: %v", err)
	}
	if got := nsIno(t, "/proc/thread-self/ns/net"); got != home {
		t.Errorf("after a panic in the namespace, the test's thread is in namespace %d", got)
	}
	closed, err := netns.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	if err := closed.DoHere(func() error { return nil }); err == nil {
		t.Error("DoHere on a closed handle ran")
	}
}
