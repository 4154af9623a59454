package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/netns"
)

// Applies to one namespace are serialized across processes too: the agent, a CLI run by
// hand and a second agent (during an upgrade) must never interleave their routing and
// table writes, or a namespace could end up with one intent's table and another's
// routing. Each critical section (Apply's routing and table, Remove, a pod IP change)
// holds an flock(2) on a file named for the namespace's key, in the lock directory.
//
// - Apply takes it only to write. It first checks, reading only, whether the namespace
//   already holds the desired state, and returns without the lock if so: having
//   written nothing, it cannot leave a namespace mixed, and no-ops are most applies. When
//   something must change, it takes the lock and checks again under it before writing,
//   so a change made by another process between the look and the lock is seen.
// - A holder that dies releases the lock with its last descriptor: the kernel drops an
//   flock when the open file is closed, also on exit or crash. A holder that hangs is
//   waited for lockTimeout, then the caller gets an error naming the lock file.
// - Files are 0600 in a 0700 directory (root's, on tmpfs: empty after a reboot).
// - Growth is bounded: Remove deletes its namespace's file, holding the lock; whoever
//   waited on the deleted file sees, once it has the lock, that the path no longer
//   names its file and starts over on the new one, so deleting never lets two holders
//   in. A namespace that is never Removed (a pod deleted behind the agent's back) leaves
//   an empty file, but its name cannot grow without bound: nsfs inode numbers come from
//   the kernel's proc inode IDA, which hands out the lowest free number, so the files
//   are at most as many as the namespaces (and /proc entries) that ever existed at the
//   same time, and a reused number reuses its file.

// DefaultLockDir is where a Manager keeps its namespace lock files, unless the
// environment variable LockDirEnv names another directory (tests, non-root setups).
const DefaultLockDir = "/run/nftmesh/locks"

// LockDirEnv overrides DefaultLockDir for every Manager of the process.
const LockDirEnv = "NFTMESH_LOCK_DIR"

// lockTimeout bounds the wait for another process's critical section: a few netlink
// exchanges, each bounded by the sockets' 10 s receive timeout.
var lockTimeout = 30 * time.Second

func lockDirFromEnv() string {
	if d := os.Getenv(LockDirEnv); d != "" {
		return d
	}
	return DefaultLockDir
}

// nsLock is a held namespace lock.
type nsLock struct {
	fd   int
	path string
}

func lockPath(dir string, key netns.Key) string {
	return filepath.Join(dir, fmt.Sprintf("netns-%d-%d.lock", key.Dev, key.Ino))
}

// lockNS takes the cross-process lock of namespace ns, waiting for other holders.
func (m *Manager) lockNS(ns *netns.NS) (*nsLock, error) {
	path := lockPath(m.LockDir, ns.Key())
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
		if errors.Is(err, unix.ENOENT) { // the first lock since boot: make the directory
			if err := os.MkdirAll(m.LockDir, 0o700); err != nil {
				return nil, fmt.Errorf("netns %s: lock: %w", ns, err)
			}
			fd, err = unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
		}
		if err != nil {
			return nil, fmt.Errorf("netns %s: lock %s: %w", ns, path, err)
		}
		if err := flockWait(fd); err != nil {
			unix.Close(fd)
			if errors.Is(err, errLockTimeout) {
				return nil, fmt.Errorf("netns %s: another nftmesh process has held %s for more than %v", ns, path, lockTimeout)
			}
			return nil, fmt.Errorf("netns %s: lock %s: %w", ns, path, err)
		}
		// The file may have been deleted (by a Remove holding it) between our open and
		// our lock: then the lock guards nothing, and the path's new file is the lock.
		// Lock files are only ever unlinked, never renamed over, so a file that still has
		// a link is the one the path names (one fstat, not a second lookup of the path).
		var held unix.Stat_t
		if unix.Fstat(fd, &held) == nil && held.Nlink > 0 {
			return &nsLock{fd: fd, path: path}, nil
		}
		unix.Close(fd)
	}
}

var errLockTimeout = errors.New("lock timeout")

// flockWait takes an exclusive flock on fd, waiting at most lockTimeout. It polls with
// LOCK_NB (1 ms, doubling to 20 ms) rather than blocking: a blocking flock cannot be
// interrupted, so every wait that timed out would leave a thread parked behind a hung
// holder. The caller keeps fd either way.
func flockWait(fd int) error {
	deadline := time.Now().Add(lockTimeout)
	pause := time.Millisecond
	for {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return err // taken, or a real error
		}
		if time.Now().After(deadline) {
			return errLockTimeout
		}
		time.Sleep(pause)
		pause = min(2*pause, 20*time.Millisecond)
	}
}

// unlock releases the lock; with remove, it first deletes the file (the namespace holds
// nothing of ours any more), which is safe while holding it: see above.
func (l *nsLock) unlock(remove bool) {
	if remove {
		unix.Unlink(l.path)
	}
	unix.Close(l.fd)
}
