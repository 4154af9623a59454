// Package dataplane makes compiled rulesets real in network namespaces: the nftmesh table
// (through package ruleset, one transaction), the pod's policy routing, and the node's
// pod IP sets. A Manager serializes work per namespace and runs different namespaces in
// parallel through a bounded pool. Nothing here ever calls setns on a thread that goes
// back to the Go scheduler's pool.
package dataplane

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// NetNSDir is where `ip netns` keeps named namespaces.
const NetNSDir = "/run/netns"

// ResolveNetNS turns a namespace name (as `ip netns` knows it) into its path; a value
// with a slash is already a path (/run/netns/x, /proc/PID/ns/net).
func ResolveNetNS(nameOrPath string) string {
	if strings.Contains(nameOrPath, "/") {
		return nameOrPath
	}
	return filepath.Join(NetNSDir, nameOrPath)
}

// netNS is an open network namespace. The open file keeps the namespace alive while we
// work in it, and its fd is the handle every netlink socket is made from.
type netNS struct {
	path string
	file *os.File
	key  nsKey
}

// nsKey identifies a namespace whatever path reached it.
type nsKey struct{ dev, ino uint64 }

func openNetNS(path string) (*netNS, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", path, err)
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &fs); err != nil {
		f.Close()
		return nil, fmt.Errorf("netns %s: %w", path, err)
	}
	if fs.Type != unix.NSFS_MAGIC && fs.Type != unix.PROC_SUPER_MAGIC {
		f.Close()
		return nil, fmt.Errorf("netns %s: not a network namespace file", path)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("netns %s: %w", path, err)
	}
	return &netNS{path: path, file: f, key: nsKey{st.Dev, st.Ino}}, nil
}

func (n *netNS) fd() int { return int(n.file.Fd()) }

func (n *netNS) Close() error { return n.file.Close() }
