package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/netns"
)

// Every socket the proxy opens for a pod lives in the pod's network namespace and carries
// the proxy mark, so the pod's rules never capture it. Sockets are made on a netns.Do
// worker (a visit of microseconds; dials from a pod take spares made eight at a time);
// binding, connecting and all I/O then happen on ordinary goroutines, through the
// runtime poller.

// SockOpts are the options of a proxy socket.
type SockOpts struct {
	Mark        uint32 // SO_MARK; 0 leaves it unset
	Transparent bool   // IP_TRANSPARENT / IPV6_TRANSPARENT: accept (TPROXY) or bind (spoofing) non-local addresses
	FreeBind    bool   // IP_FREEBIND: bind an address not (yet) on any interface
	ReusePort   bool   // SO_REUSEPORT: several listeners (an upgrade overlap) share the port
}

func (o SockOpts) apply(fd int, v6 bool) error {
	set := func(level, opt, val int, name string) error {
		if err := unix.SetsockoptInt(fd, level, opt, val); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	}
	if o.Mark != 0 {
		if err := set(unix.SOL_SOCKET, unix.SO_MARK, int(o.Mark), "SO_MARK"); err != nil {
			return err
		}
	}
	if o.ReusePort {
		if err := set(unix.SOL_SOCKET, unix.SO_REUSEPORT, 1, "SO_REUSEPORT"); err != nil {
			return err
		}
	}
	if o.Transparent {
		if v6 {
			if err := set(unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1, "IPV6_TRANSPARENT"); err != nil {
				return err
			}
		} else if err := set(unix.SOL_IP, unix.IP_TRANSPARENT, 1, "IP_TRANSPARENT"); err != nil {
			return err
		}
	}
	if o.FreeBind {
		if v6 {
			if err := set(unix.SOL_IPV6, unix.IPV6_FREEBIND, 1, "IPV6_FREEBIND"); err != nil {
				return err
			}
		} else if err := set(unix.SOL_IP, unix.IP_FREEBIND, 1, "IP_FREEBIND"); err != nil {
			return err
		}
	}
	return nil
}

// ListenIn opens a TCP listener in namespace ns.
func ListenIn(ns *netns.NS, addr netip.AddrPort, o SockOpts) (*net.TCPListener, error) {
	var l net.Listener
	err := ns.Do(func() error {
		lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
			var oerr error
			if err := c.Control(func(fd uintptr) { oerr = o.apply(int(fd), addr.Addr().Is6()) }); err != nil {
				return err
			}
			return oerr
		}}
		// Plain TCP, not Go's default MPTCP listener (since Go 1.24): the proxy ends the
		// client's TCP connection anyway, and SO_REUSEPORT steering (reuseport.go) takes
		// TCP sockets only; an MPTCP socket's group is its hidden subflow's.
		lc.SetMultipathTCP(false)
		network := "tcp4"
		if addr.Addr().Is6() {
			network = "tcp6"
		}
		var err error
		l, err = lc.Listen(context.Background(), network, addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return l.(*net.TCPListener), nil
}

// DialIn connects to remote from a socket in namespace ns, bound to local when
// local is valid (with Transparent, any address: the proxy speaks for the client).
func DialIn(ctx context.Context, ns *netns.NS, local, remote netip.AddrPort, o SockOpts) (*net.TCPConn, error) {
	v6 := isV6(remote)
	fds, err := socketsIn(ns, v6, o, 1)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", remote, err)
	}
	return connectSocket(ctx, fds[0], v6, local, remote)
}

func isV6(ap netip.AddrPort) bool { return ap.Addr().Is6() && !ap.Addr().Is4In6() }

// socketsIn makes up to n TCP sockets with options o in namespace ns, in one
// visit: fewer when it runs out of descriptors part way, an error when it makes none.
func socketsIn(ns *netns.NS, v6 bool, o SockOpts, n int) ([]int, error) {
	domain := unix.AF_INET
	if v6 {
		domain = unix.AF_INET6
	}
	fds := make([]int, 0, n)
	err := ns.Do(func() error {
		for range n {
			fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
			if err != nil {
				return err
			}
			if err := o.apply(fd, v6); err != nil {
				unix.Close(fd)
				return err
			}
			fds = append(fds, fd)
		}
		return nil
	})
	if len(fds) == 0 {
		return nil, err
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// connectSocket binds socket fd (made by socketsIn; connectSocket owns it) to local when
// local is valid and connects it to remote. A socket keeps the namespace it was made in,
// so this runs on any thread.
func connectSocket(ctx context.Context, fd int, v6 bool, local, remote netip.AddrPort) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), "proxy-upstream")
	defer f.Close() // net.FileConn dups it
	if local.IsValid() {
		if err := unix.Bind(fd, sockaddr(local, v6)); err != nil {
			return nil, fmt.Errorf("dial %s: bind %s: %w", remote, local, err)
		}
	}
	if err := connect(ctx, f, fd, sockaddr(remote, v6)); err != nil {
		return nil, fmt.Errorf("dial %s: %w", remote, err)
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", remote, err)
	}
	return c.(*net.TCPConn), nil
}

// spareSockets keeps sockets made ahead of need in one pod's namespace. Making sockets
// there takes a visit to a netns.Do thread: a hand-off to a locked thread and back,
// which costs more than the sockets. A visit makes spareBatch sockets, so seven dials in
// eight make none. At most spareBatch-1 wait per kind (a burst of dials that all find the
// stock empty must not leave hundreds behind). Spares hold the namespace alive: close
// them with the pod.
type spareSockets struct {
	mu     sync.Mutex
	free   map[spareKey][]int
	closed bool
}

type spareKey struct {
	v6   bool
	opts SockOpts
}

const spareBatch = 8

// take returns a spare socket for family v6 and options o, made in namespace ns now
// (with the next spares) if there is none. The caller owns it.
func (s *spareSockets) take(ns *netns.NS, v6 bool, o SockOpts) (int, error) {
	k := spareKey{v6, o}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return -1, errStopped
	}
	if fds := s.free[k]; len(fds) > 0 {
		fd := fds[len(fds)-1]
		s.free[k] = fds[:len(fds)-1]
		s.mu.Unlock()
		return fd, nil
	}
	s.mu.Unlock()
	fds, err := socketsIn(ns, v6, o, spareBatch)
	if err != nil {
		return -1, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		closeAll(fds)
		return -1, errStopped
	}
	if s.free == nil {
		s.free = map[spareKey][]int{}
	}
	keep := min(len(fds)-1, spareBatch-1-len(s.free[k]))
	s.free[k] = append(s.free[k], fds[1:1+keep]...)
	closeAll(fds[1+keep:])
	return fds[0], nil
}

// close closes the spares; later dials fail with errStopped.
func (s *spareSockets) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, fds := range s.free {
		closeAll(fds)
	}
	s.free = nil
}

// connect does a non-blocking connect and waits for it through the runtime poller,
// honouring ctx's deadline and cancellation.
func connect(ctx context.Context, f *os.File, fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINPROGRESS) {
		return err
	}
	if d, ok := ctx.Deadline(); ok {
		f.SetWriteDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var connErr error
	werr := rc.Write(func(uintptr) bool {
		// The poller can report writable early (a fresh socket polls as writable), so,
		// like the net package, trust only SO_ERROR or a peer address.
		errno, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		switch {
		case err != nil:
			connErr = err
		case errno != 0 && unix.Errno(errno) != unix.EINPROGRESS && unix.Errno(errno) != unix.EALREADY:
			connErr = unix.Errno(errno)
		default:
			if _, err := unix.Getpeername(fd); err != nil {
				return false // still connecting
			}
		}
		return true
	})
	if werr != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return werr
	}
	return connErr
}

func sockaddr(ap netip.AddrPort, v6 bool) unix.Sockaddr {
	if v6 {
		return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
}

// OriginalDst returns the destination a REDIRECTed connection was sent to
// (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST).
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local, _ := netip.ParseAddrPort(c.LocalAddr().String())
	var out netip.AddrPort
	var gerr error
	err = rc.Control(func(fd uintptr) {
		if local.Addr().Is4() || local.Addr().Is4In6() {
			// struct sockaddr_in: family(2) port(2, big-endian) addr(4)
			var raw [16]byte
			size := uint32(len(raw))
			gerr = getsockopt(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST, raw[:], &size)
			if gerr == nil {
				out = netip.AddrPortFrom(netip.AddrFrom4([4]byte(raw[4:8])), binary.BigEndian.Uint16(raw[2:4]))
			}
			return
		}
		var raw [28]byte // sockaddr_in6
		size := uint32(len(raw))
		gerr = getsockopt(int(fd), unix.SOL_IPV6, ip6tSOOriginalDst, raw[:], &size)
		if gerr == nil {
			out = netip.AddrPortFrom(netip.AddrFrom16([16]byte(raw[8:24])), binary.BigEndian.Uint16(raw[2:4]))
		}
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	if gerr != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", gerr)
	}
	return out, nil
}

// AddrPortOf converts a net.Addr from a TCP conn.
func AddrPortOf(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		ap := t.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
