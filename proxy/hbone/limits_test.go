package hbone

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// Limits against unauthenticated and HTTP/2-level abuse (issue #11 items 8 and 9).

// TestHandshakeFlood: thousands of TCP connections that never send a ClientHello hold a
// bounded number of the server's descriptors and little heap, and a real client is still
// served once the flood's handshakes time out.
func TestHandshakeFlood(t *testing.T) {
	const (
		flood    = 2000
		perPod   = 64
		node     = 256
		hsTimout = time.Second
	)
	shared := NewLimiter(node)
	e := newEnv(t, withServer(func(s *Server) {
		s.HandshakeTimeout = hsTimout
		s.MaxHandshakes = perPod
		s.Handshakes = shared
	}))

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	fdsBefore := numFDs(t)

	conns := make([]net.Conn, 0, flood)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	var d net.Dialer
	for range flood {
		c, err := d.Dial("tcp", e.hbone.String())
		if err != nil {
			t.Fatalf("flood dial %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	// Let the server accept what the kernel queued.
	eventually(t, 5*time.Second, "the server to accept the flood", func() bool { return e.ln.accepted.Load() >= flood })
	time.Sleep(100 * time.Millisecond)

	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	serverFDs := numFDs(t) - fdsBefore - flood // the flood's own sockets are the client's
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("flood of %d: server holds %d descriptors, heap grew %d KiB", flood, serverFDs, heap>>10)
	// At most a slot and a waiting place per admitted connection (2 x the pod's limit),
	// and a few descriptors of slack.
	if serverFDs > 2*perPod+16 {
		t.Errorf("server holds %d descriptors for %d idle connections, want at most %d", serverFDs, flood, 2*perPod+16)
	}
	// Buffers before the handshake cost 64 KiB per admitted connection (about 5 MiB here;
	// 125 MiB before the caps); the client's own sockets are ~1 KiB each.
	if heap > 3<<20 {
		t.Errorf("heap grew %d KiB for %d idle connections, want at most 3 MiB", heap>>10, flood)
	}

	// A real client gets through while the flood's sockets stay open (they keep their
	// slots until the handshake timeout), retrying refusals as a pool would.
	start := time.Now()
	deadline := start.Add(hsTimout + 4*time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := e.connect(ctx)
		cancel()
		if err == nil {
			err = exchange(c, []byte("through the flood"))
			c.Close()
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no CONNECT through the flood after %v: %v", time.Since(start), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("CONNECT through the flood after %v", time.Since(start))
}

// TestLimiterShared: the node-wide limiter bounds handshakes across servers, and slots
// come back.
func TestLimiterShared(t *testing.T) {
	l := NewLimiter(2)
	stop := make(chan struct{})
	if !l.acquire(time.Time{}, stop) || !l.acquire(time.Time{}, stop) {
		t.Fatal("free slots refused")
	}
	start := time.Now()
	if l.acquire(time.Now().Add(50*time.Millisecond), stop) {
		t.Fatal("third slot granted")
	}
	if d := time.Since(start); d < 40*time.Millisecond {
		t.Errorf("gave up after %v, want the wait", d)
	}
	go func() { time.Sleep(20 * time.Millisecond); l.release() }()
	if !l.acquire(time.Now().Add(2*time.Second), stop) {
		t.Fatal("a released slot was not handed to the waiter")
	}
	if l.InUse() != 2 {
		t.Errorf("InUse %d, want 2", l.InUse())
	}
	close(stop)
	if l.acquire(time.Now().Add(time.Second), stop) {
		t.Fatal("granted after stop")
	}
}

// rapidReset sends n HEADERS+RST_STREAM pairs, each pair in one write, as the attack does,
// and returns the GOAWAY code (false: none before the deadline).
func rapidReset(t *testing.T, r *rawH2, authority string, n int) (http2.ErrCode, bool) {
	t.Helper()
	bw := bufio.NewWriter(r.tc)
	fr := http2.NewFramer(bw, nil)
	var hb bytes.Buffer
	enc := hpackEncoder(&hb)
	enc(":method", "CONNECT")
	enc(":authority", authority)
	block := hb.Bytes()
	id := uint32(1)
	for range n {
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		if err := fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
		if err := bw.Flush(); err != nil {
			break // closed by the server: the GOAWAY is in the receive buffer
		}
		id += 2
	}
	r.tc.SetReadDeadline(time.Now().Add(3 * time.Second))
	return readUntilGoAway(r)
}

// TestRapidReset: CVE-2023-44487. Streams reset as soon as they are opened never reach the
// app, and a client that keeps doing it gets GOAWAY ENHANCE_YOUR_CALM.
func TestRapidReset(t *testing.T) {
	var appConns, dials atomic.Int64
	app := newUpstream(t, "tcp4", func(c *net.TCPConn) { appConns.Add(1); echo(c) })
	// Counted at the Dialer: a dial that starts and is cancelled at once would reach no app
	// (net.Dialer fails on a cancelled context) but must not start either.
	counting := func(ctx context.Context, req Request) (net.Conn, int, error) {
		dials.Add(1)
		return dialTCP(ctx, req)
	}
	e := newEnv(t, withEcho(app), withDial(counting))
	r := dialRaw(t, e)
	code, ok := rapidReset(t, r, app.addr.String(), 2000)
	if !ok || code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("GOAWAY %v %v, want ENHANCE_YOUR_CALM", code, ok)
	}
	time.Sleep(100 * time.Millisecond) // a dial that slipped through would land by now
	if n := appConns.Load(); n != 0 {
		t.Errorf("the app got %d connections from streams reset at once, want 0", n)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("%d dials started for streams reset at once, want 0", n)
	}
	eventually(t, 5*time.Second, "the connection to be dropped", func() bool { return e.srv.numConns() == 0 })

	// Others are still served.
	c, err := e.connect(testCtx(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := exchange(c, []byte("after the attack")); err != nil {
		t.Fatal(err)
	}
}

// TestRapidResetDialInFlight: a reset while the Dialer runs cancels it, and whatever it
// connected is closed; a handful of those is no attack.
func TestRapidResetDialInFlight(t *testing.T) {
	dialing := make(chan struct{}, 1)
	var returned atomic.Int64
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		dialing <- struct{}{}
		<-ctx.Done()
		returned.Add(1)
		return nil, 503, ctx.Err()
	}))
	r := dialRaw(t, e)
	var hb bytes.Buffer
	enc := hpackEncoder(&hb)
	enc(":method", "CONNECT")
	enc(":authority", e.echo.addr.String())
	for i := range 5 {
		id := uint32(2*i + 1)
		if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-dialing:
		case <-time.After(5 * time.Second):
			t.Fatal("the Dialer was not called")
		}
		if err := r.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "the dial to be cancelled", func() bool { return returned.Load() == int64(i+1) })
	}
	if e.srv.numConns() != 1 {
		t.Errorf("%d connections, want the client's still up", e.srv.numConns())
	}
}

// TestOccasionalResets: a client whose tunnels sometimes give up while connecting (the
// source app reset) keeps its pooled connection and every other tunnel works.
func TestOccasionalResets(t *testing.T) {
	slow := netip.MustParseAddrPort("127.0.0.1:9")
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		if req.Authority == slow {
			<-ctx.Done()
			return nil, 503, ctx.Err()
		}
		return dialTCP(ctx, req)
	}))
	for i := range 200 {
		if i%4 == 3 {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
			_, err := e.connectTo(ctx, slow)
			cancel()
			if err == nil {
				t.Fatal("CONNECT to the slow target succeeded")
			}
			continue
		}
		c, err := e.connect(testCtx(t, 5*time.Second))
		if err != nil {
			t.Fatalf("tunnel %d: %v", i, err)
		}
		err = exchange(c, []byte("ok"))
		c.Close()
		if err != nil {
			t.Fatalf("tunnel %d: %v", i, err)
		}
	}
	if n := e.ln.accepted.Load(); n != 1 {
		t.Errorf("%d HBONE connections, want 1: the resets cost the client its connection", n)
	}
}

var _ = errors.Is
