package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nftmesh/nftmesh/internal/netns"
)

// ErrNetNSNotFound is a pod whose network namespace no process shows.
var ErrNetNSNotFound = errors.New("no process of the pod found in /proc")

// NetNSScanner finds the network namespace of pods that were running before the agent
// started (no CNI ADD will come for them): a process whose cgroup path names the pod's UID
// (kubelet's cgroupfs form "pod<uid>" or its systemd form "pod<uid with _>") and whose
// network namespace holds one of the pod's IPs. The IP check keeps a host-network
// container of a pod, or a reused PID, from being taken for it.
//
// Reading every process's cgroup is the cost (about 0.1 s for 2,500 processes), and the
// start-up reconcile asks for every pod at once: one reading of /proc serves all the
// questions asked within MaxAge of it.
type NetNSScanner struct {
	ProcRoot string        // "/proc"; tests point it at a tree of their own
	MaxAge   time.Duration // how long one reading of /proc answers; 0: DefaultScanMaxAge

	mu    sync.Mutex
	taken time.Time
	index map[string][]string // pod UID (as in the cgroup path) -> ns/net paths, in PID order
}

// DefaultScanMaxAge is how long a reading of /proc is reused.
const DefaultScanMaxAge = 2 * time.Second

// podMark finds "pod<uid>" in a cgroup path: 36 characters of hex digits and '-' or '_'.
var podMark = regexp.MustCompile(`pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})`)

func (s *NetNSScanner) root() string {
	if s.ProcRoot == "" {
		return "/proc"
	}
	return s.ProcRoot
}

// scan reads every process's cgroup once: pod UID -> its processes' ns/net paths.
func (s *NetNSScanner) scan() (map[string][]string, error) {
	entries, err := os.ReadDir(s.root())
	if err != nil {
		return nil, err
	}
	index := map[string][]string{}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cg, err := os.ReadFile(filepath.Join(s.root(), e.Name(), "cgroup"))
		if err != nil {
			continue
		}
		seen := map[string]bool{}
		for _, m := range podMark.FindAllStringSubmatch(string(cg), -1) {
			uid := strings.ReplaceAll(m[1], "_", "-")
			if !seen[uid] {
				seen[uid] = true
				index[uid] = append(index[uid], filepath.Join(s.root(), e.Name(), "ns", "net"))
			}
		}
	}
	return index, nil
}

// candidates are the ns/net paths of uid's processes, from a reading of /proc no older
// than MaxAge.
func (s *NetNSScanner) candidates(uid string) ([]string, error) {
	maxAge := s.MaxAge
	if maxAge <= 0 {
		maxAge = DefaultScanMaxAge
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.index == nil || time.Since(s.taken) > maxAge {
		index, err := s.scan()
		if err != nil {
			return nil, err
		}
		s.index, s.taken = index, time.Now()
	}
	return s.index[uid], nil
}

// Find returns a path to the namespace of the pod with uid and ips.
func (s *NetNSScanner) Find(uid string, ips []netip.Addr) (string, error) {
	if uid == "" || len(ips) == 0 {
		return "", fmt.Errorf("pod %s: %w: need a uid and an IP", uid, ErrNetNSNotFound)
	}
	paths, err := s.candidates(strings.ToLower(uid))
	if err != nil {
		return "", err
	}
	tried := map[netns.Key]bool{}
	for _, path := range paths {
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
