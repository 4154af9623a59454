// Package netns is nftmesh's one handle on a network namespace. The dataplane writes rules
// through it, ZDS hands it from the agent to the proxy, and the proxy opens pod sockets
// in it; before this package each of them held a path, an int or an *os.File.
//
// An open NS keeps its namespace alive (the kernel frees a namespace only when nothing
// refers to it), so a handle is safe to use after the pod's processes exit; Close it
// when done.
package netns

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// NetNSDir is where `ip netns` (and most CNI runtimes) keep named namespaces.
const NetNSDir = "/run/netns"

// ErrGone reports a namespace file that no longer exists: the pod is gone.
var ErrGone = errors.New("network namespace does not exist")

// ErrNotNetNS reports a file that is not a network namespace.
var ErrNotNetNS = errors.New("not a network namespace")

// Key identifies a namespace whatever path or descriptor reached it, for as long as
// something holds it open (nsfs inode numbers are reused only after that).
type Key struct{ Dev, Ino uint64 }

func (k Key) String() string { return fmt.Sprintf("%d:%d", k.Dev, k.Ino) }

// NS is an open network namespace.
type NS struct {
	name string
	file *os.File
	key  Key
}

// Resolve turns a namespace name (as `ip netns` knows it) into its path; a value with a
// slash is already a path (/run/netns/x, /proc/PID/ns/net, /var/run/netns/cni-...).
func Resolve(nameOrPath string) string {
	if strings.Contains(nameOrPath, "/") {
		return nameOrPath
	}
	return filepath.Join(NetNSDir, nameOrPath)
}

// Open opens the namespace at path. A path that does not exist is ErrGone; a file that
// is not a network namespace is ErrNotNetNS.
func Open(path string) (*NS, error) {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("netns %s: %w: %w", path, ErrGone, err)
		}
		return nil, fmt.Errorf("netns %s: %w", path, err)
	}
	ns, err := FromFile(f)
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", path, err)
	}
	ns.name = path
	return ns, nil
}

// FromFile makes a handle of f, which it owns from then on (it is closed on error too):
// for descriptors that arrive over a socket (ZDS's SCM_RIGHTS). The file must be a network
// namespace.
func FromFile(f *os.File) (*NS, error) {
	key, err := check(int(f.Fd()))
	if err != nil {
		f.Close()
		return nil, err
	}
	return &NS{name: f.Name(), file: f, key: key}, nil
}

// FromFd makes a handle of a duplicate of fd; the caller keeps fd.
func FromFd(fd int, name string) (*NS, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("netns %s: dup fd %d: %w", name, fd, err)
	}
	ns, err := FromFile(os.NewFile(uintptr(dup), name))
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", name, err)
	}
	return ns, nil
}

// check is the one "is this a network namespace" test: the file lives on nsfs (or, on
// old kernels, procfs) and the kernel says its namespace type is network.
func check(fd int) (Key, error) {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return Key{}, err
	}
	if sfs.Type != unix.NSFS_MAGIC && sfs.Type != unix.PROC_SUPER_MAGIC {
		return Key{}, ErrNotNetNS
	}
	// NS_GET_NSTYPE (Linux 4.11) tells a network namespace from a mount or pid one, which
	// live on the same file system.
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil || typ != unix.CLONE_NEWNET {
		return Key{}, ErrNotNetNS
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Key{}, err
	}
	return Key{st.Dev, st.Ino}, nil
}

// Name is how the namespace was reached: its path, or the name given with its descriptor.
func (n *NS) Name() string { return n.name }

func (n *NS) String() string { return n.name }

// Key identifies the namespace.
func (n *NS) Key() Key { return n.key }

// Fd is the namespace's descriptor, valid until Close.
func (n *NS) Fd() int { return int(n.file.Fd()) }

// File is the open namespace file, for APIs that take one (sending it over a unix socket).
// It stays owned by the NS.
func (n *NS) File() *os.File { return n.file }

// Same reports whether two handles hold the same namespace.
func (n *NS) Same(o *NS) bool { return n != nil && o != nil && n.key == o.key }

// Dup returns a second handle on the same namespace, with a descriptor of its own.
func (n *NS) Dup() (*NS, error) { return FromFd(n.Fd(), n.name) }

// Close releases the namespace.
func (n *NS) Close() error { return n.file.Close() }
