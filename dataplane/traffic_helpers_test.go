package dataplane

// Helpers for traffic_test.go: real listeners and real connections in test namespaces,
// and a record of which listener accepted each connection, with which addresses.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/ruleset"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h), the
// IPv6 twin of SO_ORIGINAL_DST; golang.org/x/sys/unix does not define it.
const ip6tSOOriginalDst = 80

// landing is where a connection (or a datagram) ended up, as the socket that received
// it saw it.
type landing struct {
	NS       string // "pod" or "remote"
	Listener string // the listener's role: "outbound", "inbound", "app", ...
	Local    netip.AddrPort
	Remote   netip.AddrPort
	// OrigDst is what SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST) returns for an accepted TCP
	// connection: the destination the client asked for. It equals Local unless the
	// connection was NATed on the way. Zero for UDP, which has no such option.
	OrigDst netip.AddrPort
}

func (l landing) String() string {
	s := fmt.Sprintf("%s/%s local=%s remote=%s", l.NS, l.Listener, l.Local, l.Remote)
	if l.OrigDst.IsValid() {
		s += " origdst=" + l.OrigDst.String()
	}
	return s
}

// tag is what a listener answers first, so the client knows where it landed.
func (l landing) tag() string { return l.NS + "/" + l.Listener }

// at is the landing of a connection that was not NATed: the original destination is
// the accepting socket's local address.
func at(ns, listener string, local, remote netip.AddrPort) *landing {
	return &landing{NS: ns, Listener: listener, Local: local, Remote: remote, OrigDst: local}
}

// atRemote is a landing in the remote namespace. The remote has no rules, so its kernel
// tracks no connections and SO_ORIGINAL_DST has nothing to say there (ENOENT).
func atRemote(listener string, local, remote netip.AddrPort) *landing {
	return &landing{NS: "remote", Listener: listener, Local: local, Remote: remote}
}

// natFrom sets the original destination of a NATed (REDIRECTed) connection.
func (l *landing) natFrom(orig netip.AddrPort) *landing { l.OrigDst = orig; return l }

// datagram turns a landing into a UDP one (no original destination to read).
func (l *landing) datagram() *landing { l.OrigDst = netip.AddrPort{}; return l }

// matches compares exactly, except that a zero port in want's Remote accepts any port
// (SNAT may pick a new one).
func (l landing) matches(want landing) bool {
	if want.Remote.Port() == 0 {
		l.Remote = netip.AddrPortFrom(l.Remote.Addr(), 0)
	}
	return l == want
}

// sockOpts are the socket options a test socket gets before bind and connect.
type sockOpts struct {
	mark uint32 // SO_MARK; 0: none
	// transparent sets IP_TRANSPARENT and IP_FREEBIND (IPV6_TRANSPARENT and
	// IPV6_FREEBIND for IPv6): a listener may receive TPROXYed connections, a client may
	// bind to an address that is not local (a spoofed source).
	transparent bool
	local       netip.Addr // bind the client to this address
	port        uint16     // and this port (TCP: 0 lets the kernel choose; UDP: see tryUDP)
}

func (o sockOpts) control(network string, c syscall.RawConn) error {
	v6 := strings.HasSuffix(network, "6")
	var errs []error
	err := c.Control(func(fd uintptr) {
		if o.port != 0 && strings.HasPrefix(network, "udp") {
			// Pinned ports are reused on purpose (dns-udp-proxy-marked-reusing-port);
			// a bind racing the previous socket's teardown must not fail the case.
			errs = append(errs, wrap("SO_REUSEADDR", unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)))
		}
		if o.mark != 0 {
			errs = append(errs, wrap("SO_MARK", unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(o.mark))))
		}
		if o.transparent && !v6 {
			errs = append(errs, wrap("IP_TRANSPARENT", unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)))
			errs = append(errs, wrap("IP_FREEBIND", unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)))
		}
		if o.transparent && v6 {
			errs = append(errs, wrap("IPV6_TRANSPARENT", unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)))
			errs = append(errs, wrap("IPV6_FREEBIND", unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)))
		}
	})
	return errors.Join(append(errs, err)...)
}

func wrap(what string, err error) error {
	if err != nil {
		return fmt.Errorf("setsockopt %s: %w", what, err)
	}
	return nil
}

// originalDst reads SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6) from an
// accepted connection: the destination before any REDIRECT, from conntrack.
func originalDst(c *net.TCPConn, v6 bool) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var out netip.AddrPort
	var serr error
	err = raw.Control(func(fd uintptr) {
		if v6 {
			var sa unix.RawSockaddrInet6
			serr = getsockopt(fd, unix.SOL_IPV6, ip6tSOOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa))
			port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
			out = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port)
		} else {
			var sa unix.RawSockaddrInet4
			serr = getsockopt(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), unsafe.Sizeof(sa))
			port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
			out = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, err
	}
	return unmapped(out), nil
}

// getsockopt with a caller-sized buffer: the kernel insists on the exact sockaddr size.
func getsockopt(fd uintptr, level, opt int, p unsafe.Pointer, size uintptr) error {
	l := uint32(size)
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return e
	}
	return nil
}

func addrPort(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		return unmapped(a.AddrPort())
	case *net.UDPAddr:
		return unmapped(a.AddrPort())
	}
	return netip.AddrPort{}
}

func unmapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// hub runs listeners in test namespaces and records every connection or datagram they
// receive. Everything it opens is closed, and every goroutine it starts has ended, when
// the test ends.
type hub struct {
	// udpPort numbers UDP clients' source ports, outside the ephemeral range, so that no
	// two queries share a 5-tuple: UDP conntrack entries outlive their sockets, and a
	// query that met an old entry would get the old entry's NAT decision (for example
	// "not redirected", from before DNS capture was turned on).
	udpPort atomic.Uint32
	events  chan landing
	mu      sync.Mutex
	closed  bool
	closers []io.Closer
	wg      sync.WaitGroup
}

func newHub(t testing.TB) *hub {
	h := &hub{events: make(chan landing, 256)}
	h.udpPort.Store(20000)
	t.Cleanup(h.close)
	return h
}

func (h *hub) track(c io.Closer) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		c.Close()
		return
	}
	h.closers = append(h.closers, c)
}

func (h *hub) close() {
	h.mu.Lock()
	h.closed = true
	cs := h.closers
	h.closers = nil
	h.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
	h.wg.Wait()
}

// record reports a landing; it never blocks a server goroutine (the buffer is far larger
// than any test needs, and a lost event fails the test that waited for it).
func (h *hub) record(l landing) {
	select {
	case h.events <- l:
	default:
	}
}

// listenTCP starts a TCP listener in ns, named role, that records each connection it
// accepts, answers with its tag and a newline, then echoes. proxy gives it the proxy's
// socket options: IP_TRANSPARENT (TPROXY delivers only to transparent sockets) and the
// proxy mark.
func (h *hub) listenTCP(t testing.TB, ns *nettest.Netns, where, role, network string, addr netip.AddrPort, o sockOpts) {
	t.Helper()
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error { return o.control(network, c) }}
	var ln net.Listener
	err := ns.Do(func() (err error) {
		ln, err = lc.Listen(context.Background(), network, addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s %s in %s: %v", where, role, addr, ns.Name, err)
	}
	h.track(ln)
	v6 := strings.HasSuffix(network, "6")
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			h.track(c)
			h.wg.Add(1)
			go func() {
				defer h.wg.Done()
				defer c.Close()
				tc := c.(*net.TCPConn)
				l := landing{NS: where, Listener: role, Local: addrPort(c.LocalAddr()), Remote: addrPort(c.RemoteAddr())}
				l.OrigDst, _ = originalDst(tc, v6) // zero where nothing tracks connections
				h.record(l)
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.WriteString(c, l.tag()+"\n"); err != nil {
					return
				}
				io.Copy(c, c)
			}()
		}
	}()
}

// listenUDP starts a UDP socket in ns bound to addr that records each datagram and
// answers it with its tag.
func (h *hub) listenUDP(t testing.TB, ns *nettest.Netns, where, role, network string, addr netip.AddrPort, o sockOpts) {
	t.Helper()
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error { return o.control(network, c) }}
	var pc net.PacketConn
	err := ns.Do(func() (err error) {
		pc, err = lc.ListenPacket(context.Background(), network, addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s udp %s in %s: %v", where, role, addr, ns.Name, err)
	}
	h.track(pc)
	uc := pc.(*net.UDPConn)
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		buf := make([]byte, 512)
		for {
			_, from, err := uc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			l := landing{NS: where, Listener: role, Local: addr, Remote: unmapped(from)}
			h.record(l)
			uc.WriteToUDPAddrPort([]byte(l.tag()+"\n"), from)
		}
	}()
}

// attempt is one client connection (or one query datagram) and what came of it.
type attempt struct {
	Client netip.AddrPort // the client socket's own address
	Reply  string         // the tag of whoever answered
	Err    error
	Landed []landing // every landing recorded for this attempt
}

func (a attempt) String() string {
	var s strings.Builder
	if a.Err != nil {
		fmt.Fprintf(&s, "error: %v; ", a.Err)
	} else {
		fmt.Fprintf(&s, "client %s answered by %q; ", a.Client, a.Reply)
	}
	if len(a.Landed) == 0 {
		s.WriteString("landed nowhere")
	}
	for i, l := range a.Landed {
		if i > 0 {
			s.WriteString(", ")
		}
		s.WriteString("landed " + l.String())
	}
	return s.String()
}

// dialTCP connects from ns, with the socket options applied before bind and connect.
func dialTCP(ns *nettest.Netns, network string, to netip.AddrPort, o sockOpts, timeout time.Duration) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: timeout, Control: func(network, _ string, c syscall.RawConn) error { return o.control(network, c) }}
	if o.local.IsValid() || o.port != 0 {
		d.LocalAddr = &net.TCPAddr{IP: o.local.AsSlice(), Port: int(o.port)}
	}
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = d.Dial(network, to.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// tryTCP connects from ns to `to`, reads which listener answered, checks an echo round
// trip (bytes in both directions), and collects the landings.
func (h *hub) tryTCP(ns *nettest.Netns, network string, to netip.AddrPort, o sockOpts, timeout time.Duration) attempt {
	var a attempt
	c, err := dialTCP(ns, network, to, o, timeout)
	if err != nil {
		a.Err = err
	} else {
		a.Client = addrPort(c.LocalAddr())
		a.Reply, a.Err = echo(c, timeout)
		c.Close()
	}
	a.Landed = h.collect(a.Err == nil)
	return a
}

func echo(c net.Conn, timeout time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(timeout))
	r := bufio.NewReader(c)
	tag, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read the listener's tag: %w", err)
	}
	const ping = "ping over the same connection\n"
	if _, err := io.WriteString(c, ping); err != nil {
		return "", fmt.Errorf("write: %w", err)
	}
	back, err := r.ReadString('\n')
	if err != nil || back != ping {
		return "", fmt.Errorf("echo: got %q, %v", back, err)
	}
	return strings.TrimSuffix(tag, "\n"), nil
}

// nextUDPPort returns a source port no UDP client of this hub has used yet.
func (h *hub) nextUDPPort() uint16 { return uint16(h.udpPort.Add(1)) }

// tryUDP sends one datagram from a connected UDP socket in ns to `to` and waits for the
// answer. A connected socket only accepts datagrams from `to`: an answer proves that it
// came back (after any NAT was undone) as if from the original destination. The source
// port is o.port, or else one not used before (nextUDPPort).
func (h *hub) tryUDP(ns *nettest.Netns, network string, to netip.AddrPort, o sockOpts, timeout time.Duration) attempt {
	var a attempt
	if o.port == 0 {
		o.port = h.nextUDPPort()
	}
	d := net.Dialer{
		Control:   func(network, _ string, c syscall.RawConn) error { return o.control(network, c) },
		LocalAddr: &net.UDPAddr{IP: o.local.AsSlice(), Port: int(o.port)},
	}
	var c net.Conn
	a.Err = ns.Do(func() (err error) {
		c, err = d.Dial(network, to.String())
		return err
	})
	if a.Err == nil {
		a.Client = addrPort(c.LocalAddr())
		c.SetDeadline(time.Now().Add(timeout))
		buf := make([]byte, 512)
		var n int
		if _, a.Err = c.Write([]byte("query\n")); a.Err == nil {
			n, a.Err = c.Read(buf)
		}
		a.Reply = strings.TrimSuffix(string(buf[:n]), "\n")
		c.Close()
	}
	a.Landed = h.collect(a.Err == nil)
	return a
}

// collect returns the landings of the attempt that just ended. Listeners record before
// they answer, so after an answer the landing is already there; after a failure it
// waits a moment for a straggler (a landing without an answer is a failure too).
func (h *hub) collect(answered bool) []landing {
	var out []landing
	wait := 50 * time.Millisecond
	if answered {
		wait = 2 * time.Second
	}
	select {
	case l := <-h.events:
		out = append(out, l)
	case <-time.After(wait):
		return nil
	}
	for {
		select {
		case l := <-h.events:
			out = append(out, l)
		default:
			return out
		}
	}
}

// dropRules removes every rule of the chain whose comment starts with prefix. It fails
// the test when there is none: a tooth that removes nothing proves nothing.
func dropRules(t testing.TB, tab *ruleset.Table, chain, prefix string) {
	t.Helper()
	c := tab.Chain(chain)
	if c == nil {
		t.Fatalf("no chain %s", chain)
	}
	var kept []ruleset.Rule
	for _, r := range c.Rules {
		if !strings.HasPrefix(r.Comment, prefix) {
			kept = append(kept, r)
		}
	}
	if len(kept) == len(c.Rules) {
		t.Fatalf("chain %s has no rule %q...", chain, prefix)
	}
	c.Rules = kept
}

// dropMatches removes the matches that pred selects from every rule of the chain whose
// comment starts with prefix. It fails the test when it removed none.
func dropMatches(t testing.TB, tab *ruleset.Table, chain, prefix string, pred func(ruleset.Match) bool) {
	t.Helper()
	c := tab.Chain(chain)
	if c == nil {
		t.Fatalf("no chain %s", chain)
	}
	n := 0
	for i, r := range c.Rules {
		if !strings.HasPrefix(r.Comment, prefix) {
			continue
		}
		var kept []ruleset.Match
		for _, m := range r.Matches {
			if pred(m) {
				n++
			} else {
				kept = append(kept, m)
			}
		}
		c.Rules[i].Matches = kept
	}
	if n == 0 {
		t.Fatalf("chain %s: rules %q... have no such match", chain, prefix)
	}
}
