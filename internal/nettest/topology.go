package nettest

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Do runs fn with the calling OS thread inside the namespace and returns fn's error.
//
// fn runs on a fresh goroutine that locks its OS thread, switches that thread into the
// namespace with setns and never unlocks it: when the goroutine ends, the Go runtime
// ends the thread instead of putting it back into the pool, so no other goroutine ever
// runs in the wrong namespace. Sockets fn creates belong to the namespace for life and
// can be used from any goroutine afterwards; so can files under /proc/sys/net that fn
// opens (they resolve against the opening thread's namespace).
func (n *Netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread, on purpose: this thread dies with the goroutine.
		f, err := os.Open(n.Path)
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Sysctl sets network sysctls inside the namespace, keys as `sysctl` writes them
// ("net.ipv4.ip_forward"). The machine's own settings are not touched.
func (n *Netns) Sysctl(t testing.TB, kv ...string) {
	t.Helper()
	if len(kv)%2 != 0 {
		t.Fatalf("Sysctl: odd number of arguments %q", kv)
	}
	err := n.Do(func() error {
		for i := 0; i < len(kv); i += 2 {
			if !strings.HasPrefix(kv[i], "net.") {
				return fmt.Errorf("sysctl %s: only net.* sysctls are per namespace", kv[i])
			}
			path := filepath.Join("/proc/sys", strings.ReplaceAll(kv[i], ".", "/"))
			if err := os.WriteFile(path, []byte(kv[i+1]), 0o644); err != nil {
				return fmt.Errorf("sysctl %s=%s: %w", kv[i], kv[i+1], err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("netns %s: %v", n.Name, err)
	}
}

// IP runs `ip -batch -` inside the namespace: one ip command per line, without the
// leading "ip".
func (n *Netns) IP(t testing.TB, lines ...string) {
	t.Helper()
	if _, err := n.Run(strings.Join(lines, "\n")+"\n", "ip", "-batch", "-"); err != nil {
		t.Fatal(err)
	}
}

// Family is one address family of a Topology: every address a test needs to reach.
type Family struct {
	Name     string // "ipv4" or "ipv6"
	TCP, UDP string // the Go network names: "tcp4", "udp4" or "tcp6", "udp6"
	Bits     int    // prefix length of the links

	Pod            netip.Addr // the pod's eth0
	NodePodSide    netip.Addr // the node's end of the pod link: the pod's gateway
	NodeRemoteSide netip.Addr // the node's end of the remote link: the remote's gateway
	Remote         netip.Addr // the remote's eth0
	Loopback       netip.Addr // 127.0.0.1 or ::1
}

// Topology is three namespaces in a line, the way a pod sits on a Kubernetes node:
//
//	pod (eth0) <-veth-> (vpod) node (vremote) <-veth-> (eth0) remote
//
// The node forwards between its two links (IPv4 and IPv6); the pod and the remote
// route everything through it. Addresses come from ranges only tests use (10.248.0.0/16,
// fd00:248::/32) and live only inside these namespaces, so topologies in parallel
// tests do not collide. IPv6 addresses skip duplicate address detection, and so do the
// links' link-local addresses (accept_dad=0), so every address works at once. Reverse
// path filtering is off, as on a Kubernetes node with a CNI that does not want it: the
// tests send from spoofed and policy-routed sources on purpose.
type Topology struct {
	Pod, Node, Remote *Netns
	IPv4, IPv6        Family
}

// Families returns IPv4 then IPv6.
func (tp *Topology) Families() []Family { return []Family{tp.IPv4, tp.IPv6} }

// NewTopology builds a Topology; everything is deleted when the test ends.
func NewTopology(t testing.TB) *Topology {
	t.Helper()
	tp := &Topology{
		Pod: New(t), Node: New(t), Remote: New(t),
		IPv4: Family{
			Name: "ipv4", TCP: "tcp4", UDP: "udp4", Bits: 24,
			Pod:            netip.MustParseAddr("10.248.1.2"),
			NodePodSide:    netip.MustParseAddr("10.248.1.1"),
			NodeRemoteSide: netip.MustParseAddr("10.248.2.1"),
			Remote:         netip.MustParseAddr("10.248.2.2"),
			Loopback:       netip.MustParseAddr("127.0.0.1"),
		},
		IPv6: Family{
			Name: "ipv6", TCP: "tcp6", UDP: "udp6", Bits: 64,
			Pod:            netip.MustParseAddr("fd00:248:1::2"),
			NodePodSide:    netip.MustParseAddr("fd00:248:1::1"),
			NodeRemoteSide: netip.MustParseAddr("fd00:248:2::1"),
			Remote:         netip.MustParseAddr("fd00:248:2::2"),
			Loopback:       netip.MustParseAddr("::1"),
		},
	}
	for _, ns := range []*Netns{tp.Pod, tp.Node, tp.Remote} {
		// Before any link exists, so that the links inherit the "default" values.
		ns.Sysctl(t,
			"net.ipv6.conf.all.disable_ipv6", "0",
			"net.ipv6.conf.default.disable_ipv6", "0",
			"net.ipv6.conf.all.accept_dad", "0",
			"net.ipv6.conf.default.accept_dad", "0",
			"net.ipv4.conf.all.rp_filter", "0",
			"net.ipv4.conf.default.rp_filter", "0",
		)
	}
	tp.Node.Sysctl(t, "net.ipv4.ip_forward", "1", "net.ipv6.conf.all.forwarding", "1")

	// Each veth is made inside one of its namespaces with the peer placed straight into
	// the other: nothing ever appears in the machine's own namespace.
	addr := func(a netip.Addr, bits int, dev string) string {
		s := fmt.Sprintf("addr add %s dev %s", netip.PrefixFrom(a, bits), dev)
		if a.Is6() {
			s += " nodad"
		}
		return s
	}
	//
	// Both ends of a veth get distinct interface indexes. The kernel's linkwatch treats a
	// carrier change as urgent (handled at once) only for a device whose index differs
	// from its peer's; in two fresh namespaces both ends would be index 2, and the
	// carrier change waits for linkwatch's next one-second round. Until then the node
	// has not joined its address's IPv6 solicited-node group, ignores the pod's
	// neighbor solicitations, and the first IPv6 connection stalls for a second.
	tp.Pod.IP(t, "link add eth0 index 10 type veth peer name vpod index 20 netns "+tp.Node.Name)
	tp.Node.IP(t, "link add vremote index 21 type veth peer name eth0 index 30 netns "+tp.Remote.Name)
	var pod, node, remote []string
	for _, f := range tp.Families() {
		pod = append(pod, addr(f.Pod, f.Bits, "eth0"))
		node = append(node, addr(f.NodePodSide, f.Bits, "vpod"), addr(f.NodeRemoteSide, f.Bits, "vremote"))
		remote = append(remote, addr(f.Remote, f.Bits, "eth0"))
	}
	pod = append(pod, "link set eth0 up")
	node = append(node, "link set vpod up", "link set vremote up")
	remote = append(remote, "link set eth0 up")
	for _, f := range tp.Families() {
		pod = append(pod, "route add default via "+f.NodePodSide.String())
		remote = append(remote, "route add default via "+f.NodeRemoteSide.String())
	}
	tp.Pod.IP(t, pod...)
	tp.Node.IP(t, node...)
	tp.Remote.IP(t, remote...)
	tp.Pod.WaitUp(t, "eth0")
	tp.Node.WaitUp(t, "vpod", "vremote")
	tp.Remote.WaitUp(t, "eth0")
	return tp
}

// WaitUp waits until the links are operationally up (linkwatch has seen the carrier).
func (n *Netns) WaitUp(t testing.TB, links ...string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		out, err := n.Run("", "ip", "-o", "link", "show", "up")
		if err != nil {
			t.Fatal(err)
		}
		missing := ""
		for _, l := range links {
			if !regexp.MustCompile(`: ` + regexp.QuoteMeta(l) + `[@:].*state UP`).MatchString(out) {
				missing = l
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("netns %s: link %s not up:\n%s", n.Name, missing, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
