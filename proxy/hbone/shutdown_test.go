package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// Shutdown and close: draining, the shutdown deadline, connections still in their handshake,
// peers that stopped reading.

func TestShutdownDrains(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t, 10*time.Second)
	c, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 10*time.Second, c)
	if _, err := c.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	shut := make(chan error, 1)
	go func() { shut <- e.srv.Shutdown(ctx) }()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a tunnel open", err)
	default:
	}
	// The open tunnel still works; new ones cannot be made.
	if err := exchange(c, []byte("draining")); err != nil {
		t.Fatal(err)
	}
	if _, err := e.connect(testCtx(t, 2*time.Second)); err == nil {
		t.Error("Connect succeeded during shutdown")
	}
	c.Close()
	select {
	case err := <-shut:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return after the last tunnel closed")
	}
}

func TestShutdownDeadlineResetsTunnels(t *testing.T) {
	got := make(chan error, 1)
	up := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		_, err := io.Copy(io.Discard, c)
		got <- err
	})
	e := newEnv(t, withEcho(up))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 10*time.Second, c)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v, want deadline exceeded", err)
	}
	if _, err := io.ReadAll(c); !IsReset(err) {
		t.Errorf("client read: %v, want reset", err)
	}
	select {
	case err := <-got:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("upstream: %v, want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("upstream not reset")
	}
}

// TestShutdownIsNoHandshakeFailure: a connection still in its handshake when the server
// shuts down is not reported to OnHandshakeError (it would count refusals that never were).
func TestShutdownIsNoHandshakeFailure(t *testing.T) {
	var refused atomic.Int64
	e := newEnv(t, withServer(func(s *Server) { s.OnHandshakeError = func(error) { refused.Add(1) } }))
	c, err := net.Dial("tcp", e.hbone.String()) // no ClientHello: waits in the handshake
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	inHandshake := func() int {
		e.srv.mu.Lock()
		defer e.srv.mu.Unlock()
		return len(e.srv.raw)
	}
	for deadline := time.Now().Add(5 * time.Second); inHandshake() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server never took the connection")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.Copy(io.Discard, c) // the server closed it
	time.Sleep(50 * time.Millisecond)
	if n := refused.Load(); n != 0 {
		t.Errorf("OnHandshakeError ran %d times for a shutdown", n)
	}
}

// TestShutdownStuckPeers: peers that stopped reading, with the server's writes to them
// stuck on full sockets, do not hold Shutdown past its deadline (closing the TLS layer
// would first try to send close_notify behind each stuck write, 5 s apiece).
func TestShutdownStuckPeers(t *testing.T) {
	// A dribble, not a flood: each small batch leaves the server in its final flush (not
	// inside a TLS write, where a TLS close would not wait), and that is where it sticks.
	flood := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		buf := make([]byte, 2<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
			time.Sleep(50 * time.Microsecond)
		}
	})
	e := newEnv(t, withEcho(flood))
	const peers = 2
	for range peers {
		r := dialRaw(t, e)
		r.tc.SetDeadline(time.Time{})
		// Windows wide open, a CONNECT to the flood, and then never a read.
		if err := r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30}); err != nil {
			t.Fatal(err)
		}
		if err := r.fr.WriteWindowUpdate(0, 1<<30); err != nil {
			t.Fatal(err)
		}
		var hb bytes.Buffer
		enc := hpackEncoder(&hb)
		enc(":method", "CONNECT")
		enc(":authority", flood.addr.String())
		if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(1500 * time.Millisecond) // the server's writes fill the sockets and block
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	e.srv.Shutdown(ctx)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Shutdown with %d stuck peers took %v, past its 200 ms deadline", peers, d)
	}
}

// TestCloseNotBlockedByStuckPeer: closing a tunnel whose request is done does not wait
// behind another tunnel's write stuck on a peer that stopped reading (x/net's stream
// goroutine needs the connection's write lock to send its RST; that took until the ping
// timeout, 30 s).
func TestCloseNotBlockedByStuckPeer(t *testing.T) {
	pki := sharedPKI(t)
	l := tls.NewListener(listen(t, "tcp4"), pki.serverTLS(t))
	defer l.Close()
	bothOpen, done := make(chan struct{}), make(chan struct{})
	var closeDone sync.Once
	release := func() { closeDone.Do(func() { close(done) }) } // the peer closes: the stuck write ends
	defer release()
	go func() { // a peer that answers two CONNECTs, then never reads again
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := io.ReadFull(c, make([]byte, len(http2.ClientPreface))); err != nil {
			return
		}
		fr := http2.NewFramer(c, c)
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
		fr.WriteWindowUpdate(0, 1<<30)
		opened := 0
		for opened < 2 {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
			case *http2.PingFrame: // the pool's, after dialling
				if !f.IsAck() {
					fr.WritePing(true, f.Data)
				}
			case *http2.HeadersFrame:
				var hb bytes.Buffer
				hpackEncoder(&hb)(":status", "200")
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hb.Bytes(), EndHeaders: true})
				opened++
			}
		}
		close(bothOpen)
		<-done
	}()
	e := newEnv(t)
	key := PoolKey{SrcID: clientID, DstID: serverID, Dst: addrPort(l.Addr()), SrcIP: netip.MustParseAddr("127.0.0.1")}
	ctx := testCtx(t, 10*time.Second)
	a, err := e.pool.Connect(ctx, key, e.echo.addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.pool.Connect(ctx, key, e.echo.addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	<-bothOpen
	// a's request is done (its source ended); b writes until the peer's socket is full.
	if _, err := a.(io.ReaderFrom).ReadFrom(strings.NewReader("a")); err != nil {
		t.Fatal(err)
	}
	go b.Write(make([]byte, 64<<20))
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	closed := make(chan struct{})
	go func() { a.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Errorf("Close still blocked after 5 s behind another tunnel's stuck write")
	}
	t.Logf("Close took %v", time.Since(start))
	release()
	b.Close()
	<-closed
}
