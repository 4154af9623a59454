package proxy

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

func TestMain(m *testing.M) { os.Exit(nettest.RunGuarded(m)) }

func sockNS(t *testing.T) (*nettest.Netns, *netns.NS) {
	t.Helper()
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	for _, cmd := range [][]string{
		{"ip", "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1"},
		{"ip", "link", "set", "dummy0", "up"},
		{"ip", "link", "set", "dummy1", "up"},
		{"ip", "addr", "add", "10.99.0.1/24", "dev", "dummy0"},
		{"ip", "addr", "add", "fd00:99::1/64", "dev", "dummy0", "nodad"},
	} {
		ns.MustRun(t, cmd[0], cmd[1:]...)
	}
	h, err := netns.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return ns, h
}

func TestListenDialOriginalDst(t *testing.T) {
	ns, h := sockNS(t)
	for _, fam := range []struct{ ip, nfFamily, listen string }{{"10.99.0.1", "ip", "0.0.0.0"}, {"fd00:99::1", "ip6", "::"}} {
		t.Run(fam.nfFamily, func(t *testing.T) {
			l, err := ListenIn(h, netip.AddrPortFrom(netip.MustParseAddr(fam.listen), 0), SockOpts{Mark: 0x539, Transparent: true, ReusePort: true})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			port := AddrPortOf(l.Addr()).Port()
			rules := "table " + fam.nfFamily + " t {\n chain out {\n type nat hook output priority -100; policy accept;\n tcp dport 9999 meta mark != 0x539 redirect to :" + itoa(port) + "\n }\n}\n"
			if _, err := ns.Run(rules, "nft", "-f", "-"); err != nil {
				t.Fatal(err)
			}
			defer ns.Run("", "nft", "delete", "table", fam.nfFamily, "t")

			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			dst := netip.AddrPortFrom(netip.MustParseAddr(fam.ip), 9999)
			// Unmarked: redirected to the listener.
			c, err := DialIn(ctx, h, netip.AddrPort{}, dst, SockOpts{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			a, err := l.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			got, err := OriginalDst(a)
			if err != nil || got != dst {
				t.Errorf("original destination %v %v, want %v", got, err, dst)
			}
			// Marked: not redirected, and nothing listens on 9999.
			_, err = DialIn(ctx, h, netip.AddrPort{}, dst, SockOpts{Mark: 0x539})
			if !errors.Is(err, unix.ECONNREFUSED) {
				t.Errorf("marked dial: %v, want connection refused", err)
			}
		})
	}
}

func TestTransparentBindAndTimeout(t *testing.T) {
	_, h := sockNS(t)
	l, err := ListenIn(h, netip.MustParseAddrPort("10.99.0.1:0"), SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	spoofed := netip.MustParseAddrPort("10.99.0.77:0")
	if _, err := DialIn(ctx, h, spoofed, AddrPortOf(l.Addr()), SockOpts{}); !errors.Is(err, unix.EADDRNOTAVAIL) {
		t.Errorf("binding a foreign address without IP_TRANSPARENT: %v, want EADDRNOTAVAIL", err)
	}
	// With it the bind works (the SYN goes out; nothing routes the answer back here).
	short, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	start := time.Now()
	_, err = DialIn(short, h, spoofed, AddrPortOf(l.Addr()), SockOpts{Transparent: true, FreeBind: true, Mark: 0x539})
	if errors.Is(err, unix.EADDRNOTAVAIL) || err == nil {
		t.Errorf("transparent dial: %v, want a timeout after a successful bind", err)
	}
	if time.Since(start) > time.Second {
		t.Errorf("dial ignored its deadline: %v", time.Since(start))
	}
}

func itoa(p uint16) string {
	return netip.AddrPortFrom(netip.IPv4Unspecified(), p).String()[len("0.0.0.0:"):]
}

// TestSpareSockets: a visit to the namespace makes spareBatch sockets, later takes use
// them; each is in the pod's namespace with its options; close closes the spares and
// refuses later takes.
func TestSpareSockets(t *testing.T) {
	_, h := sockNS(t)
	l, err := ListenIn(h, netip.MustParseAddrPort("10.99.0.1:0"), SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var s spareSockets
	marked := SockOpts{Mark: 0x539}
	stock := func(o SockOpts) int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.free[spareKey{false, o}])
	}
	for i := range spareBatch + 1 {
		fd, err := s.take(h, false, marked)
		if err != nil {
			t.Fatal(err)
		}
		if want := (2*spareBatch - 1 - i) % spareBatch; stock(marked) != want {
			t.Fatalf("take %d: %d spares, want %d", i, stock(marked), want)
		}
		if mark, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK); err != nil || mark != 0x539 {
			t.Errorf("take %d: SO_MARK %#x, %v", i, mark, err)
		}
		// 10.99.0.1 exists only in the pod's namespace.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := connectSocket(ctx, fd, false, netip.AddrPort{}, AddrPortOf(l.Addr()))
		cancel()
		if err != nil {
			t.Fatalf("take %d: %v", i, err)
		}
		c.Close()
		a, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		a.Close()
	}
	if stock(SockOpts{}) != 0 {
		t.Error("sockets with other options drawn from the same stock")
	}
	s.mu.Lock()
	spares := slices.Clone(s.free[spareKey{false, marked}])
	s.mu.Unlock()
	s.close()
	for _, fd := range spares {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
			t.Errorf("spare %d still open after close: %v", fd, err)
		}
	}
	if _, err := s.take(h, false, marked); !errors.Is(err, errStopped) {
		t.Errorf("take after close: %v, want errStopped", err)
	}
}

// TestSpareSocketsBounded: a burst of dials that all find the stock empty (each visiting
// the namespace) leaves at most spareBatch-1 spares behind.
func TestSpareSocketsBounded(t *testing.T) {
	_, h := sockNS(t)
	var s spareSockets
	defer s.close()
	const burst = 32
	fds := make(chan int, burst)
	var wg sync.WaitGroup
	for range burst {
		wg.Go(func() {
			fd, err := s.take(h, false, SockOpts{})
			if err != nil {
				t.Error(err)
				return
			}
			fds <- fd
		})
	}
	wg.Wait()
	close(fds)
	for fd := range fds {
		unix.Close(fd)
	}
	s.mu.Lock()
	n := len(s.free[spareKey{false, SockOpts{}}])
	s.mu.Unlock()
	if n > spareBatch-1 {
		t.Errorf("%d spares after a burst of %d dials, want at most %d", n, burst, spareBatch-1)
	}
}
