package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
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

// rapidReset sends n HEADERS+RST_STREAM pairs from stream id first on, each pair in one
// write, as the attack does, and returns the GOAWAY code (false: none before the deadline).
func rapidReset(t *testing.T, r *rawH2, authority string, first uint32, n int) (http2.ErrCode, bool) {
	t.Helper()
	bw := bufio.NewWriter(r.tc)
	fr := http2.NewFramer(bw, nil)
	var hb bytes.Buffer
	enc := hpackEncoder(&hb)
	enc(":method", "CONNECT")
	enc(":authority", authority)
	block := hb.Bytes()
	id := first
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
// app, and a client that keeps doing it gets GOAWAY ENHANCE_YOUR_CALM and, having no tunnel
// left, loses its connection.
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
	code, ok := rapidReset(t, r, app.addr.String(), 1, 2000)
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
// connected is closed; such resets are no attack (TestCancelledDialsKeepConnection has many).
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

// unansweredUpstream is a port that never completes a TCP handshake, as a pod that does not
// answer SYNs: a listener with a backlog of 0 whose one queued connection is never accepted,
// so the kernel drops every further SYN and a connect waits until it is cancelled.
func unansweredUpstream(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(sa.(*syscall.SockaddrInet4).Port))
	var d net.Dialer
	fill, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fill.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if c, err := d.DialContext(ctx, "tcp", addr.String()); err == nil {
		c.Close()
		t.Fatal("a connect to the full listener completed")
	}
	return addr
}

// TestCancelledDialsKeepConnection: a client whose CONNECTs to a pod that never answers time
// out while the server dials (the x/net client resets each one) is no attacker: the resets
// cost no more than the dials already running. Its connection gets no GOAWAY, and a tunnel
// on it carries data throughout.
func TestCancelledDialsKeepConnection(t *testing.T) {
	silent := unansweredUpstream(t)
	var started atomic.Int64
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		if req.Authority == silent {
			started.Add(1)
		}
		return dialTCP(ctx, req)
	}))
	live, err := e.connect(testCtx(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	buf := make([]byte, 64)
	ping := func(i int) error {
		msg := fmt.Appendf(nil, "ping %d", i)
		live.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := live.Write(msg); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if _, err := io.ReadFull(live, buf[:len(msg)]); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if !bytes.Equal(buf[:len(msg)], msg) {
			return fmt.Errorf("echo %q, want %q", buf[:len(msg)], msg)
		}
		return nil
	}

	// 512 cancellations, 32 every 100 ms: well past the early-reset burst (200) and rate
	// (100/s). (More at a time, and x/net's client, which counts a reset stream until the
	// server acknowledges a PING sent with it, would leave the pool no slot: it would dial
	// a second connection.)
	const workers, rounds = 32, 16
	var succeeded atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range rounds {
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				c, err := e.connectTo(ctx, silent)
				cancel()
				if err == nil {
					c.Close()
					succeeded.Add(1)
				}
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	pings := 0
	for waiting := true; waiting; pings++ {
		if err := ping(pings); err != nil {
			t.Errorf("live tunnel, ping %d: %v", pings, err)
			<-done
			break
		}
		select {
		case <-done:
			waiting = false
		case <-time.After(5 * time.Millisecond):
		}
	}
	t.Logf("%d dials to the silent pod started, %d pings on the live tunnel", started.Load(), pings)
	if n := succeeded.Load(); n != 0 {
		t.Fatalf("%d CONNECTs to a pod that never answers succeeded", n)
	}
	if n := started.Load(); n < workers*rounds/2 {
		t.Errorf("only %d of %d cancelled CONNECTs had their dial started: the test did not exercise in-flight dials", n, workers*rounds)
	}
	if st := live.(*clientConn).pc.cc.State(); st.Closing || st.Closed {
		t.Error("the client's connection got GOAWAY or was closed")
	}
	if n := e.srv.numGoingAway(); n != 0 {
		t.Errorf("the server sent GOAWAY on %d connections", n)
	}
	if n := e.ln.accepted.Load(); n != 1 {
		t.Errorf("%d HBONE connections, want 1: the cancellations cost the client its connection", n)
	}
	if err := exchange(live, []byte("after the cancellations")); err != nil {
		t.Errorf("live tunnel after the cancellations: %v", err)
	}
}

// numGoingAway is how many of the server's connections sent GOAWAY.
func (s *Server) numGoingAway() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for sc := range s.conns {
		sc.mu.Lock()
		if sc.goingAway {
			n++
		}
		sc.mu.Unlock()
	}
	return n
}

// rawConnect opens a CONNECT stream on a raw client.
func rawConnect(t *testing.T, r *rawH2, id uint32, authority string) {
	t.Helper()
	var hb bytes.Buffer
	enc := hpackEncoder(&hb)
	enc(":method", "CONNECT")
	enc(":authority", authority)
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
}

// rawNext reads frames until one of stream id other than WINDOW_UPDATE; others are skipped,
// and a GOAWAY fails the test.
func rawNext(t *testing.T, r *rawH2, id uint32) http2.Frame {
	t.Helper()
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading stream %d: %v", id, err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			t.Fatalf("GOAWAY %v while waiting on stream %d", g.ErrCode, id)
		}
		if _, ok := f.(*http2.WindowUpdateFrame); ok || f.Header().StreamID != id {
			continue
		}
		return f
	}
}

// rawStatuses reads the response status of each of ids, in whatever order they come.
func rawStatuses(t *testing.T, r *rawH2, ids ...uint32) map[uint32]string {
	t.Helper()
	want := map[uint32]bool{}
	for _, id := range ids {
		want[id] = true
	}
	got := map[uint32]string{}
	for len(got) < len(want) {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading responses (have %v): %v", got, err)
		}
		id := f.Header().StreamID
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v while waiting for responses (have %v)", f.ErrCode, got)
		case *http2.MetaHeadersFrame:
			if want[id] {
				got[id] = f.PseudoValue("status")
			}
		case *http2.RSTStreamFrame:
			if want[id] {
				t.Fatalf("stream %d reset: %v", id, f.ErrCode)
			}
		}
	}
	return got
}

// TestDialsInFlightBounded: at most MAX_CONCURRENT_STREAMS Dialers run per connection, even
// when the client resets CONNECTs whose Dialer ignores the cancellation: further CONNECTs
// wait their turn (no GOAWAY, no refusal) and are answered once dials return.
func TestDialsInFlightBounded(t *testing.T) {
	const streams = 4
	var calls, inFlight, peak atomic.Int64
	release := make(chan struct{})
	dial := func(ctx context.Context, req Request) (net.Conn, int, error) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		if calls.Add(1) <= streams {
			<-release // a slow Dialer that does not watch ctx
			return nil, 503, errors.New("released")
		}
		return dialTCP(ctx, req)
	}
	e := newEnv(t, withDial(dial), withServer(func(s *Server) { s.MaxConcurrentStreams = streams }))
	r := dialRaw(t, e)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	echoAddr := e.echo.addr.String()
	for i := range streams {
		rawConnect(t, r, uint32(2*i+1), echoAddr)
	}
	eventually(t, 5*time.Second, "the first dials to start", func() bool { return calls.Load() == streams })
	for i := range streams {
		if err := r.fr.WriteRSTStream(uint32(2*i+1), http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
	}
	for i := range streams {
		rawConnect(t, r, uint32(2*(streams+i)+1), echoAddr)
	}
	time.Sleep(200 * time.Millisecond) // a dial started beyond the bound would be counted by now
	if n := calls.Load(); n != streams {
		t.Errorf("%d Dialer calls while %d ignore their reset, want %d: dials in flight are not bounded", n, streams, streams)
	}
	close(release)
	var ids []uint32
	for i := range streams {
		ids = append(ids, uint32(2*(streams+i)+1))
	}
	for id, st := range rawStatuses(t, r, ids...) {
		if st != "200" {
			t.Errorf("stream %d: status %s, want 200", id, st)
		}
	}
	if p := peak.Load(); p > streams {
		t.Errorf("%d Dialers ran at once, want at most %d", p, streams)
	}
	if e.srv.numConns() != 1 {
		t.Errorf("%d connections, want the client's still up", e.srv.numConns())
	}
}

// TestRapidResetDrainsLiveTunnels: the attacker's GOAWAY ENHANCE_YOUR_CALM takes no new
// streams, but a tunnel already open on the connection keeps working until it ends; then the
// connection closes.
func TestRapidResetDrainsLiveTunnels(t *testing.T) {
	e := newEnv(t)
	r := dialRaw(t, e)
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	echoAddr := e.echo.addr.String()
	rawConnect(t, r, 1, echoAddr)
	if st := rawStatuses(t, r, 1)[1]; st != "200" {
		t.Fatalf("live tunnel: status %s, want 200", st)
	}
	code, ok := rapidReset(t, r, echoAddr, 3, 2000)
	if !ok || code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v %v, want ENHANCE_YOUR_CALM", code, ok)
	}
	r.tc.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte("still here")
	if err := r.fr.WriteData(1, false, msg); err != nil {
		t.Fatalf("writing to the live tunnel after the GOAWAY: %v", err)
	}
	var got []byte
	for len(got) < len(msg) {
		switch f := rawNext(t, r, 1).(type) {
		case *http2.DataFrame:
			got = append(got, f.Data()...)
		case *http2.RSTStreamFrame:
			t.Fatalf("live tunnel reset after the GOAWAY: %v", f.ErrCode)
		}
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("live tunnel echoed %q, want %q", got, msg)
	}
	if err := r.fr.WriteData(1, true, nil); err != nil {
		t.Fatal(err)
	}
	for ended := false; !ended; {
		switch f := rawNext(t, r, 1).(type) {
		case *http2.DataFrame:
			ended = f.StreamEnded()
		case *http2.RSTStreamFrame:
			t.Fatalf("live tunnel reset instead of ending: %v", f.ErrCode)
		}
	}
	// Its last tunnel ended: the connection goes.
	for {
		if _, err := r.fr.ReadFrame(); err != nil {
			break
		}
	}
	eventually(t, 5*time.Second, "the connection to be dropped", func() bool { return e.srv.numConns() == 0 })
}

// smallBuffer shrinks a socket's kernel buffer opt (SO_RCVBUF or SO_SNDBUF) to about the
// least the kernel allows, and stops its autotuning: a peer that stops reading fills the
// server's send buffer and its own receive buffer with a few kilobytes, where loopback's
// would take megabytes. Set before the connect, the receive window's scale stays small too.
func smallBuffer(c syscall.RawConn, opt int) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, opt, 4096)
	}); err != nil {
		return err
	}
	return serr
}

// withSmallSendBuffers shrinks the server's send buffer (smallBuffer) on every connection it
// accepts.
func withSmallSendBuffers(t *testing.T) envOpt {
	return withAccepted(func(c net.Conn) {
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err == nil {
			err = smallBuffer(rc, syscall.SO_SNDBUF)
		}
		if err != nil {
			t.Errorf("shrinking the server's send buffer: %v", err)
		}
	})
}

// dialRawSmallWindow is dialRaw over a socket with a small receive buffer (smallBuffer).
func dialRawSmallWindow(t *testing.T, e *env) *rawH2 {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error { return smallBuffer(c, syscall.SO_RCVBUF) }}
	nc, err := d.Dial("tcp", e.hbone.String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(nc, e.clTLS)
	t.Cleanup(func() { tc.Close() })
	tc.SetDeadline(time.Now().Add(20 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(tc, tc)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	return &rawH2{tc: tc, fr: fr}
}

// queuedFrames is the most frames waiting for a writer on any of the server's connections.
func (s *Server) queuedFrames() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for sc := range s.conns {
		sc.mu.Lock()
		n = max(n, len(sc.ctrl)+len(sc.ord))
		sc.mu.Unlock()
	}
	return n
}

// floodFrames writes n frames made by next (the i-th of them), 256 to a write, and returns
// how many it wrote before the connection failed (the server closed it).
func floodFrames(r *rawH2, n int, next func(fr *http2.Framer, i int) error) int {
	bw := bufio.NewWriter(r.tc)
	fr := http2.NewFramer(bw, nil)
	written := 0
	for i := range n {
		if next(fr, i) != nil {
			break
		}
		if i%256 == 255 || i == n-1 {
			if bw.Flush() != nil {
				break
			}
			written = i + 1
		}
	}
	return written
}

// TestQueuedFramesFlood: a client that stops reading while making the server answer frame
// after frame (a RST_STREAM REFUSED_STREAM per HEADERS beyond MAX_CONCURRENT_STREAMS or
// after a GOAWAY, an ACK per PING) gets its connection closed once maxQueuedCtrl answers
// wait to be written, all kinds counted together: the server's queue stays bounded, and the
// connection does not wait for the write timeout.
func TestQueuedFramesFlood(t *testing.T) {
	const flood = 50000
	var hb bytes.Buffer
	enc := hpackEncoder(&hb)
	enc(":method", "CONNECT")
	enc(":authority", "127.0.0.1:9")
	block := hb.Bytes()
	headers := func(fr *http2.Framer, i int) error { // stream ids from 10001 on, past the rapid reset's
		return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(10001 + 2*i), BlockFragment: block, EndHeaders: true})
	}
	ping := func(fr *http2.Framer, i int) error { return fr.WritePing(false, [8]byte{byte(i >> 8), byte(i)}) }
	cases := []struct {
		name    string
		streams int // MAX_CONCURRENT_STREAMS
		setup   func(t *testing.T, e *env, r *rawH2)
		next    func(fr *http2.Framer, i int) error
	}{
		{"beyond the stream limit", 1, nil, headers},
		{"after GOAWAY", 100, func(t *testing.T, e *env, r *rawH2) {
			if code, ok := rapidReset(t, r, e.echo.addr.String(), 3, 2000); !ok || code != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("GOAWAY %v %v, want ENHANCE_YOUR_CALM", code, ok)
			}
		}, headers},
		{"PINGs", 1, nil, ping},
		{"PINGs, SETTINGS and refusals", 1, nil, func(fr *http2.Framer, i int) error {
			switch i % 4 {
			case 0:
				return ping(fr, i)
			case 1:
				return fr.WriteSettings()
			}
			return headers(fr, i)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// Small socket buffers between the server's writes and the client: 50,000 answers
			// are then far more than the kernel holds (an attacker would just send more).
			e := newEnv(t, withSmallSendBuffers(t), withServer(func(s *Server) { s.MaxConcurrentStreams = uint32(tc.streams) }))
			r := dialRawSmallWindow(t, e)
			// A live tunnel holds the one stream (and keeps a connection that went away open).
			rawConnect(t, r, 1, e.echo.addr.String())
			if st := rawStatuses(t, r, 1)[1]; st != "200" {
				t.Fatalf("status %s, want 200", st)
			}
			if tc.setup != nil {
				tc.setup(t, e, r)
			}
			// From here on the client never reads.
			start := time.Now()
			sent := make(chan int, 1)
			go func() { sent <- floodFrames(r, flood, tc.next) }()
			// The server reads the flood after the client has written it to its socket: watch
			// until the connection is gone (or well past the time it takes to read it).
			peak, closed := 0, false
			for deadline := start.Add(5 * time.Second); !closed && time.Now().Before(deadline); {
				peak = max(peak, e.srv.queuedFrames())
				closed = e.srv.numConns() == 0
				time.Sleep(time.Millisecond)
			}
			r.tc.Close() // unblocks the flood's writes, if the server still reads
			n := <-sent
			t.Logf("%d of %d frames sent; at most %d frames waited for the writer; closed %v after %v",
				n, flood, peak, closed, time.Since(start))
			if limit := maxQueuedCtrl + 16; peak > limit {
				t.Errorf("%d frames waited to be written, want at most %d", peak, limit)
			}
			if !closed {
				t.Errorf("the server kept the connection of a client that does not read")
			}
		})
	}
}

// TestRefusalsReadByClient: a client that goes beyond MAX_CONCURRENT_STREAMS again and again
// but reads the refusals is no flood: 20,000 REFUSED_STREAM in all (twice maxQueuedCtrl),
// never many waiting at once, leave its connection and its tunnel up.
func TestRefusalsReadByClient(t *testing.T) {
	const rounds, perRound = 20, 1000
	e := newEnv(t, withServer(func(s *Server) { s.MaxConcurrentStreams = 1 }))
	r := dialRaw(t, e)
	r.tc.SetDeadline(time.Now().Add(60 * time.Second))
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	echoAddr := e.echo.addr.String()
	rawConnect(t, r, 1, echoAddr)
	if st := rawStatuses(t, r, 1)[1]; st != "200" {
		t.Fatalf("status %s, want 200", st)
	}
	var hb bytes.Buffer
	enc := hpackEncoder(&hb)
	enc(":method", "CONNECT")
	enc(":authority", echoAddr)
	block := hb.Bytes()
	id := uint32(3)
	for round := range rounds {
		first := id
		n := floodFrames(r, perRound, func(fr *http2.Framer, i int) error {
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: first + uint32(2*i), BlockFragment: block, EndHeaders: true})
		})
		if n != perRound {
			t.Fatalf("round %d: the server closed the connection after %d HEADERS", round, n)
		}
		id += 2 * perRound
		for refused := 0; refused < perRound; {
			f, err := r.fr.ReadFrame()
			if err != nil {
				t.Fatalf("round %d, after %d refusals: %v", round, refused, err)
			}
			switch f := f.(type) {
			case *http2.GoAwayFrame:
				t.Fatalf("round %d: GOAWAY %v", round, f.ErrCode)
			case *http2.RSTStreamFrame:
				if f.StreamID == 1 {
					t.Fatalf("the live tunnel was reset: %v", f.ErrCode)
				}
				if f.ErrCode != http2.ErrCodeRefusedStream {
					t.Fatalf("stream %d reset with %v, want REFUSED_STREAM", f.StreamID, f.ErrCode)
				}
				refused++
			}
		}
	}
	msg := []byte("still here")
	if err := r.fr.WriteData(1, false, msg); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for len(got) < len(msg) {
		if d, ok := rawNext(t, r, 1).(*http2.DataFrame); ok {
			got = append(got, d.Data()...)
		}
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("live tunnel echoed %q, want %q", got, msg)
	}
	if n := e.srv.numConns(); n != 1 {
		t.Errorf("%d connections, want the client's still up", n)
	}
}
