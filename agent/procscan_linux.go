package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/nftmesh/nftmesh/internal/netns"
)

// ErrNetNSNotFound is a pod whose network namespace no process shows.
var ErrNetNSNotFound = errors.New("no process of the pod found in /proc")

// NetNSScanner finds the network namespace of pods that were running before the agent
// started (no CNI ADD will come for them): a process whose cgroup path names the pod's UID
// (kubelet's cgroupfs form "pod<uid>" or its systemd form "pod<uid with _>") and whose
// network namespace holds one of the pod's IPs. The IP check keeps a host-network
// container of a pod, or a reused PID, from being taken for it.
type NetNSScanner struct {
	ProcRoot string // "/proc"; tests point it at a tree of their own
}

// Find returns a path to the namespace of the pod with uid and ips.
func (s NetNSScanner) Find(uid string, ips []netip.Addr) (string, error) {
	root := s.ProcRoot
	if root == "" {
		root = "/proc"
	}
	if uid == "" || len(ips) == 0 {
		return "", fmt.Errorf("pod %s: %w: need a uid and an IP", uid, ErrNetNSNotFound)
	}
	marks := []string{"pod" + uid, "pod" + strings.ReplaceAll(uid, "-", "_")}
	entries, err := os.ReadDir(root)
	if err != nil {
		return "", err
	}
	tried := map[netns.Key]bool{}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cg, err := os.ReadFile(filepath.Join(root, e.Name(), "cgroup"))
		if err != nil || !containsAny(string(cg), marks) {
			continue
		}
		path := filepath.Join(root, e.Name(), "ns", "net")
		ns, err := netns.Open(path)
		if err != nil {
			continue // the process ended meanwhile
		}
		if tried[ns.Key()] {
			ns.Close()
			continue
		}
		tried[ns.Key()] = true
		holds, err := holdsAny(ns, ips)
		ns.Close()
		if err == nil && holds {
			return path, nil
		}
	}
	return "", fmt.Errorf("pod %s: %w", uid, ErrNetNSNotFound)
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// holdsAny reports whether an interface in ns has one of ips.
func holdsAny(ns *netns.NS, ips []netip.Addr) (bool, error) {
	var addrs []net.Addr
	err := ns.Do(func() (err error) {
		addrs, err = net.InterfaceAddrs()
		return err
	})
	if err != nil {
		return false, err
	}
	for _, a := range addrs {
		prefix, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		for _, ip := range ips {
			if prefix.Addr().Unmap() == ip.Unmap() {
				return true, nil
			}
		}
	}
	return false, nil
}
