package netns

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// These tests need no root: they use the test's own namespace under several names.

func TestOpen(t *testing.T) {
	self, err := Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	thread, err := Open("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer thread.Close()
	if !self.Same(thread) || self.Key() != thread.Key() {
		t.Errorf("two paths to one namespace: keys %v and %v", self.Key(), thread.Key())
	}
	if self.Name() != "/proc/self/ns/net" || self.Fd() < 0 {
		t.Errorf("name %q fd %d", self.Name(), self.Fd())
	}
	dup, err := self.Dup()
	if err != nil {
		t.Fatal(err)
	}
	if !dup.Same(self) || dup.Fd() == self.Fd() {
		t.Errorf("Dup: same %v, fds %d and %d: want the same namespace on its own descriptor", dup.Same(self), dup.Fd(), self.Fd())
	}
	dup.Close()
	if _, err := unix.FcntlInt(uintptr(self.Fd()), unix.F_GETFD, 0); err != nil {
		t.Errorf("closing the duplicate closed the original: %v", err)
	}
	named, err := FromFd(self.Fd(), "pod-a")
	if err != nil {
		t.Fatal(err)
	}
	defer named.Close()
	if named.Name() != "pod-a" || !named.Same(self) {
		t.Errorf("FromFd: name %q, same %v", named.Name(), named.Same(self))
	}
}

func TestOpenErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "gone")
	if _, err := Open(missing); !errors.Is(err, ErrGone) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing file: %v, want ErrGone naming the path", err)
	}
	plain := filepath.Join(t.TempDir(), "plain")
	os.WriteFile(plain, nil, 0o644)
	// A mount namespace lives on nsfs too: only the namespace type tells it apart.
	for _, path := range []string{plain, "/proc/self/ns/mnt", "/proc/self/ns/pid", "/proc/self/status"} {
		if _, err := Open(path); !errors.Is(err, ErrNotNetNS) || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: %v, want ErrNotNetNS naming the path", path, err)
		}
	}
	f, _ := os.Open(plain)
	if _, err := FromFile(f); !errors.Is(err, ErrNotNetNS) {
		t.Errorf("FromFile(plain file): %v", err)
	}
	if _, err := f.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("FromFile did not close the file it refused")
	}
}

func TestResolve(t *testing.T) {
	for in, want := range map[string]string{"pod1": "/run/netns/pod1", "/proc/1/ns/net": "/proc/1/ns/net", "./x": "./x"} {
		if got := Resolve(in); got != want {
			t.Errorf("Resolve(%q) = %q, want %q", in, got, want)
		}
	}
}
