package proxy

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

// queued dials n connections to addr from inside ns. Each completes its handshake in the
// kernel: it waits in a listener's accept queue.
func queued(t *testing.T, ns *nettest.Netns, addr netip.AddrPort, n int) []net.Conn {
	t.Helper()
	var cs []net.Conn
	for range n {
		var c net.Conn
		if err := ns.Do(func() (err error) { c, err = net.DialTimeout("tcp4", addr.String(), time.Second); return }); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		cs = append(cs, c)
	}
	return cs
}

// acceptGreet accepts until no connection waits (for wait), greeting each; it returns
// how many it took.
func acceptGreet(t *testing.T, l *net.TCPListener, wait time.Duration) int {
	t.Helper()
	n := 0
	for {
		l.SetDeadline(time.Now().Add(wait))
		c, err := l.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return n
			}
			t.Fatal(err)
		}
		c.Write([]byte("hi"))
		c.Close()
		n++
	}
}

// queueLen is the number of connections waiting in l's accept queue (TCP_INFO of a
// listener: tcpi_unacked).
func queueLen(t *testing.T, l *net.TCPListener) int {
	t.Helper()
	rc, err := l.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		t.Fatal(err)
	}
	if ierr != nil {
		t.Fatal(ierr)
	}
	return int(info.Unacked)
}

// greeted counts the clients that read the greeting, and those reset.
func greeted(t *testing.T, cs []net.Conn) (ok, reset int) {
	t.Helper()
	for _, c := range cs {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		b, err := io.ReadAll(c)
		switch {
		case err == nil && string(b) == "hi":
			ok++
		case errors.Is(err, syscall.ECONNRESET):
			reset++
		default:
			t.Errorf("client %s: read %q, %v", c.LocalAddr(), b, err)
		}
	}
	return ok, reset
}

// TestReuseportUpgrade is the kernel behaviour an upgrade relies on, with two listeners of
// one SO_REUSEPORT group standing for the old and the new proxy's. Without steering, the
// old one's close resets what it had queued: the drop the e2e upgrade test saw. With it
// (steer), the newest listener takes every new connection, and the old one's close
// migrates its queue to the new one.
func TestReuseportUpgrade(t *testing.T) {
	const n = 20
	opts := SockOpts{Mark: 0x539, Transparent: true, ReusePort: true}
	listen := func(t *testing.T, h *netns.NS, port uint16) *net.TCPListener {
		t.Helper()
		l, err := ListenIn(h, netip.AddrPortFrom(netip.IPv4Unspecified(), port), opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	t.Run("plain", func(t *testing.T) {
		ns, h := sockNS(t)
		old := listen(t, h, 0)
		addr := netip.AddrPortFrom(netip.MustParseAddr("10.99.0.1"), AddrPortOf(old.Addr()).Port())
		cs := queued(t, ns, addr, n) // all on old: it is alone
		listen(t, h, addr.Port())
		old.Close()
		if ok, reset := greeted(t, cs); reset != n {
			t.Errorf("closing a listener without steering: %d of %d queued connections reset, %d greeted; want all reset (has the kernel changed?)", reset, n, ok)
		}
	})
	t.Run("steered", func(t *testing.T) {
		ns, h := sockNS(t)
		old := listen(t, h, 0)
		if err := steer(old); err != nil {
			t.Fatal(err)
		}
		addr := netip.AddrPortFrom(netip.MustParseAddr("10.99.0.1"), AddrPortOf(old.Addr()).Port())
		before := queued(t, ns, addr, n) // on old: the group steers to it
		upgraded := listen(t, h, addr.Port())
		if err := steer(upgraded); err != nil {
			t.Fatal(err)
		}
		after := queued(t, ns, addr, n) // on the new listener, all of them
		if o, u := queueLen(t, old), queueLen(t, upgraded); o != n || u != n {
			t.Fatalf("accept queues: old listener %d, new %d; want %d each (the new one steered to after the first %d)", o, u, n, n)
		}
		old.Close() // its queue moves to the new listener
		if got := acceptGreet(t, upgraded, 200*time.Millisecond); got != 2*n {
			t.Errorf("the new listener accepted %d connections, want %d (%d migrated from the closed one)", got, 2*n, n)
		}
		for name, cs := range map[string][]net.Conn{"queued on the old listener": before, "made after the new one": after} {
			if ok, reset := greeted(t, cs); ok != n {
				t.Errorf("%s: %d of %d greeted, %d reset", name, ok, n, reset)
			}
		}
	})
}
