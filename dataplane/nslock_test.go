package dataplane

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/kernel"
)

// holdLock takes the namespace lock file at path on a descriptor of its own, as another
// process would (flock conflicts between open files, not processes), and returns its
// release.
func holdLock(t *testing.T, path string) (release func()) {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	released := false
	release = func() {
		if !released {
			released = true
			unix.Close(fd)
		}
	}
	t.Cleanup(release)
	return release
}

// shortLockTimeout makes a wait behind a holder fail in d rather than 30 s, for the test.
func shortLockTimeout(t *testing.T, d time.Duration) {
	saved := lockTimeout
	lockTimeout = d
	t.Cleanup(func() { lockTimeout = saved })
}

// A no-op apply only reads: it returns while another process holds the namespace's lock
// (issue #11 review: every apply took the lock, and the no-op got slower), also when
// someone committed since (the table is read again, still without the lock). An apply
// that changes something waits for the holder.
func TestNoopApplyTakesNoLock(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	defer m.Close()
	m.LockDir = filepath.Join(t.TempDir(), "locks")
	d := podDesired(t, "default-dualstack")
	if res, err := m.Apply(ns.Handle, d); err != nil || res.Action != kernel.Created {
		t.Fatalf("%+v %v", res, err)
	}
	release := holdLock(t, lockPath(m.LockDir, ns.Handle.Key()))
	shortLockTimeout(t, 3*time.Second)

	noop := func(when string) {
		t.Helper()
		t0 := time.Now()
		res, err := m.Apply(ns.Handle, d)
		if took := time.Since(t0); err != nil || res.Action != kernel.Unchanged || res.Writes != 0 || res.RoutingChanged || took > time.Second {
			t.Errorf("no-op apply %s while the lock is held: %+v %v after %v, want unchanged at once", when, res, err, took)
		}
	}
	noop("after the apply that wrote")
	noop("again (from the generation cache)")
	ns.MustRun(t, "nft", "add", "table", "inet", "other") // moves the generation
	noop("after another table's commit")

	done := make(chan error, 1)
	other := podDesired(t, "redirect-dualstack")
	go func() { _, err := m.Apply(ns.Handle, other); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("a changing apply did not wait for the lock holder: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if nftTable(t, ns) != d.Table.Render() {
		t.Error("the table changed while another process held the lock")
	}
	release()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("apply still waiting after the lock was released")
	}
	if nftTable(t, ns) != other.Table.Render() {
		t.Error("the apply that waited did not apply")
	}
}

// What another process writes between an apply's lock-free look and its lock is seen:
// the apply reads again under the lock. Here the holder adds a pod IP to the node table
// while a replace waits; a replace working from its earlier read would drop it.
func TestApplyRechecksUnderLock(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	defer m.Close()
	m.LockDir = filepath.Join(t.TempDir(), "locks")
	host, err := compiler.HostState(intent(t, "default-dualstack"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Apply(ns.Handle, host); err != nil {
		t.Fatal(err)
	}
	if _, err := m.AddPodIP(ns.Handle, netip.MustParseAddr("10.244.0.1"), "pod-a"); err != nil {
		t.Fatal(err)
	}
	// Drift, so that the next apply's look (a full read: the content is known to this
	// Manager) finds a replace to do.
	ns.MustRun(t, "nft", "add", "chain", "inet", "nftmesh", "drift")
	release := holdLock(t, lockPath(m.LockDir, ns.Handle.Key()))
	shortLockTimeout(t, 10*time.Second)
	type outcome struct {
		res Result
		err error
	}
	done := make(chan outcome, 1)
	go func() { res, err := m.Apply(ns.Handle, host); done <- outcome{res, err} }()
	time.Sleep(300 * time.Millisecond) // the apply has looked and waits for the lock
	select {
	case o := <-done:
		t.Fatalf("the apply did not wait for the lock holder: %+v %v", o.res, o.err)
	default:
	}
	// The holder (another process's AddPodIP) writes meanwhile.
	ns.MustRun(t, "nft", "add", "element", "inet", "nftmesh", compiler.SetPodIPsV4, `{ 10.244.0.2 comment "pod-b" }`)
	release()
	var o outcome
	select {
	case o = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("apply still waiting after the lock was released")
	}
	if o.err != nil || o.res.Action != kernel.Replaced {
		t.Fatalf("%+v %v, want replaced", o.res, o.err)
	}
	out := ns.MustRun(t, "nft", "list", "set", "inet", "nftmesh", compiler.SetPodIPsV4)
	for _, want := range []string{`10.244.0.1 comment "pod-a"`, `10.244.0.2 comment "pod-b"`} {
		if !strings.Contains(out, want) {
			t.Errorf("after the replace the set lacks %s:\n%s", want, out)
		}
	}
	if strings.Contains(nftTable(t, ns), "chain drift") {
		t.Error("the drift was not repaired")
	}
}

// TestLockRetriesAfterUnlink: a lock won on a file that a remover unlinked meanwhile guards
// nothing (the next locker creates a new file at the path): lockNS must notice and lock the
// file the path names now.
func TestLockRetriesAfterUnlink(t *testing.T) {
	nettest.Require(t)
	ns := nettest.New(t)
	m := quietManager()
	defer m.Close()
	m.LockDir = filepath.Join(t.TempDir(), "locks")
	if err := os.MkdirAll(m.LockDir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := lockPath(m.LockDir, ns.Handle.Key())
	release := holdLock(t, path)
	got := make(chan *nsLock, 1)
	go func() {
		l, err := m.lockNS(ns.Handle)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	time.Sleep(100 * time.Millisecond) // lockNS has opened the file and waits for its flock
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	release()
	l := <-got
	if l == nil {
		return
	}
	defer l.unlock(true)
	var held, named unix.Stat_t
	if err := unix.Fstat(l.fd, &held); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(path, &named); err != nil {
		t.Fatalf("the lock holds no file at %s: %v", path, err)
	}
	if held.Ino != named.Ino || held.Nlink == 0 {
		t.Errorf("locked inode %d (links %d), but %s is inode %d: the lock guards a deleted file", held.Ino, held.Nlink, path, named.Ino)
	}
}
