package netns

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

// TestDoHereRetriesHome: one transient failure to open /proc/thread-self/ns/net (EMFILE
// at the descriptor limit) must not make every later DoHere fail for the life of the
// process (every dataplane Apply and Remove). Run in a child process so that home() has
// not been called yet.
func TestDoHereRetriesHome(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for setns")
	}
	if os.Getenv("NFTMESH_TEST_DOHERE_CHILD") == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestDoHereRetriesHome$", "-test.v")
		cmd.Env = append(os.Environ(), "NFTMESH_TEST_DOHERE_CHILD=1")
		out, err := cmd.CombinedOutput()
		t.Logf("child:\n%s", out)
		if err != nil {
			t.Fatalf("child failed: %v", err)
		}
		return
	}
	self, err := Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lowest, err := syscall.Dup(0) // the lowest free descriptor number
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(lowest)
	tight := old
	tight.Cur = uint64(lowest) // no room for one more descriptor
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &tight); err != nil {
		t.Fatal(err)
	}
	err = self.DoHere(func() error { return nil })
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	t.Logf("DoHere at the descriptor limit: %v", err)
	if err == nil || !strings.Contains(err.Error(), "open own namespace") {
		t.Skipf("could not make home() fail: %v", err)
	}
	// The limit is back: descriptors are available again.
	if f, err := os.Open("/proc/thread-self/ns/net"); err != nil {
		t.Fatalf("open after restoring the limit: %v", err)
	} else {
		f.Close()
	}
	if err := self.DoHere(func() error { return nil }); err != nil {
		t.Errorf("DoHere once descriptors are available again: %v (the transient EMFILE was kept for good)", err)
	}
}
