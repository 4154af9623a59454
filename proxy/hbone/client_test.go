package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/nftmesh/nftmesh/internal/rawio"
)

// The client against an HTTP/2 server not written here: x/net's http2.Server with a CONNECT
// handler.

type xnetPeer struct {
	l        net.Listener
	hs       *http.Server
	h2       *http2.Server
	accepted atomic.Int64
	pool     *Pool
	key      PoolKey
}

func newXNetPeer(t *testing.T, h2 *http2.Server, handler http.HandlerFunc) *xnetPeer {
	t.Helper()
	pki := sharedPKI(t)
	x := &xnetPeer{l: tls.NewListener(listen(t, "tcp4"), pki.serverTLS(t)), h2: h2}
	x.hs = &http.Server{Handler: handler}
	if err := http2.ConfigureServer(x.hs, h2); err != nil { // Shutdown then sends GOAWAY
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := x.l.Accept()
			if err != nil {
				return
			}
			x.accepted.Add(1)
			wg.Go(func() {
				defer c.Close()
				if err := c.(*tls.Conn).Handshake(); err != nil {
					return
				}
				h2.ServeConn(c, &http2.ServeConnOpts{BaseConfig: x.hs, Handler: handler})
			})
		}
	})
	clTLS := pki.clientTLS(t)
	x.pool = &Pool{Log: testLogger(t),
		TLSConfig: func(PoolKey) (*tls.Config, error) { return clTLS, nil },
		Dial: func(ctx context.Context, key PoolKey) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", key.Dst.String())
		}}
	x.key = PoolKey{SrcID: clientID, DstID: serverID, Dst: addrPort(x.l.Addr()), SrcIP: netip.MustParseAddr("127.0.0.1")}
	t.Cleanup(func() {
		x.pool.Close()
		x.l.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		x.hs.Shutdown(ctx)
		wg.Wait()
	})
	return x
}

func (x *xnetPeer) connect(t *testing.T) net.Conn {
	t.Helper()
	h := http.Header{}
	h.Set("Forwarded", `for="10.0.0.7:41234"`)
	h.Set("Baggage", "k8s.namespace.name=default")
	c, err := x.pool.Connect(testCtx(t, 10*time.Second), x.key, netip.MustParseAddrPort("10.0.0.9:8080"), h)
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 30*time.Second, c)
	t.Cleanup(func() { c.Close() })
	return c
}

// flushWriter flushes each write: a tunnel's response streams.
type flushWriter struct{ w http.ResponseWriter }

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	f.w.(http.Flusher).Flush()
	return n, err
}

// echoHandler answers a CONNECT with 200, echoes the request body, then sends "bye" after
// the request's end and ends the response.
func echoHandler(t *testing.T) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect || r.Host != "10.0.0.9:8080" ||
			r.Header.Get("Forwarded") != `for="10.0.0.7:41234"` || r.Header.Get("Baggage") != "k8s.namespace.name=default" {
			t.Errorf("request %s %s %v", r.Method, r.Host, r.Header)
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		buf := make([]byte, 32<<10)
		if _, err := io.CopyBuffer(flushWriter{w}, r.Body, buf); err != nil {
			return
		}
		flushWriter{w}.Write([]byte("bye"))
	}
}

// TestClientXNetServer: CONNECT, headers, 8 MiB both ways through windows of 64 KiB (the
// server's), half-close and the end of the response.
func TestClientXNetServer(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{
		MaxUploadBufferPerStream:     65535,
		MaxUploadBufferPerConnection: 65535,
	}, echoHandler(t))
	c := x.connect(t)
	data := randomBytes(8 << 20)
	sent := make(chan error, 1)
	go func() {
		for p := data; len(p) > 0; {
			k := min(len(p), 100<<10)
			if _, err := c.Write(p[:k]); err != nil {
				sent <- err
				return
			}
			p = p[k:]
		}
		sent <- c.(halfCloser).CloseWrite()
	}()
	var got bytes.Buffer
	n, err := c.(io.WriterTo).WriteTo(&got)
	if err != nil || n != int64(len(data))+3 {
		t.Fatalf("WriteTo: %d, %v; want %d, nil", n, err, len(data)+3)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got.Bytes()[:len(data)]) != sha256.Sum256(data) || string(got.Bytes()[len(data):]) != "bye" {
		t.Fatal("echo differs from what was sent")
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Error("Write after CloseWrite succeeded")
	}
	c.Close()
	// Both directions ended in order: the stream closed without a reset, the slot is free.
	eventually(t, 5*time.Second, "the slot to be released", func() bool {
		x.pool.mu.Lock()
		defer x.pool.mu.Unlock()
		for _, pc := range x.pool.conns[x.key] {
			if pc.streams != 0 || len(pc.cc.streams) != 0 {
				return false
			}
		}
		return true
	})
}

// TestClientXNetReadFrom: the request through ReadFrom from a socket, the response through
// Read; a bulk stream, and END_STREAM at the source's end.
func TestClientXNetReadFrom(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{MaxUploadBufferPerStream: 65535}, echoHandler(t))
	c := x.connect(t)
	app, client := tcpPair(t)
	data := randomBytes(4 << 20)
	go func() {
		client.Write(data)
		client.CloseWrite()
	}()
	rf := make(chan error, 1)
	go func() {
		n, err := c.(io.ReaderFrom).ReadFrom(app)
		if err == nil && n != int64(len(data)) {
			err = errors.New("short ReadFrom")
		}
		rf <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, append(data, "bye"...)) {
		t.Fatalf("read %d bytes (%v), want the %d sent and bye", len(got), err, len(data))
	}
	if err := <-rf; err != nil {
		t.Fatalf("ReadFrom: %v", err)
	}
}

// TestClientXNetStatusAndReset: a refusal is a StatusError; a handler that aborts resets the
// tunnel; our Close of an unfinished tunnel resets the server's stream.
func TestClientXNetStatusAndReset(t *testing.T) {
	bodyErr := make(chan error, 1)
	x := newXNetPeer(t, &http2.Server{}, func(w http.ResponseWriter, r *http.Request) {
		switch r.Header.Get("Baggage") {
		case "refuse":
			w.WriteHeader(http.StatusForbidden)
		case "abort":
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			io.ReadFull(r.Body, make([]byte, 4))
			panic(http.ErrAbortHandler) // RST_STREAM
		default:
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			_, err := io.Copy(io.Discard, r.Body)
			bodyErr <- err
		}
	})
	ctx := testCtx(t, 10*time.Second)
	to := netip.MustParseAddrPort("10.0.0.9:8080")
	_, err := x.pool.Connect(ctx, x.key, to, http.Header{"Baggage": {"refuse"}})
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusForbidden {
		t.Fatalf("refused CONNECT: %v, want StatusError 403", err)
	}
	c, err := x.pool.Connect(ctx, x.key, to, http.Header{"Baggage": {"abort"}})
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 10*time.Second, c)
	c.Write([]byte("boom"))
	if _, err := io.Copy(io.Discard, c); !IsReset(err) {
		t.Fatalf("read of an aborted tunnel: %v, want a reset", err)
	}
	c.Close()
	c, err = x.pool.Connect(ctx, x.key, to, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("some"))
	c.Close()
	select {
	case err := <-bodyErr:
		if err == nil {
			t.Fatal("the handler read the request to its end: Close did not reset the stream")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the handler never saw the reset")
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read after Close: %v, want net.ErrClosed", err)
	}
	if n := x.accepted.Load(); n != 1 {
		t.Errorf("%d connections, want 1", n)
	}
}

// TestClientXNetGoAway: after the server's GOAWAY the open tunnel finishes on its
// connection, and new ones go to a new connection.
func TestClientXNetGoAway(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{}, echoHandler(t))
	c := x.connect(t)
	if err := echoOnly(c, []byte("before")); err != nil {
		t.Fatal(err)
	}
	go x.hs.Shutdown(context.Background()) // GOAWAY on every connection, then waits
	cc := c.(*clientConn).pc.cc
	eventually(t, 5*time.Second, "GOAWAY to arrive", func() bool { return cc.State().Closing })
	if err := echoOnly(c, []byte("after the GOAWAY")); err != nil {
		t.Fatalf("open tunnel after GOAWAY: %v", err)
	}
	d := x.connect(t)
	if d.(*clientConn).pc.cc == cc {
		t.Fatal("a new tunnel went to the connection that is going away")
	}
	if x.accepted.Load() != 2 {
		t.Errorf("%d connections, want 2", x.accepted.Load())
	}
	c.(halfCloser).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "bye" {
		t.Fatalf("end of the tunnel after GOAWAY: %q, %v", b, err)
	}
	c.Close()
	eventually(t, 5*time.Second, "the connection that went away to close", func() bool { return cc.State().Closed })
}

// TestClientXNetMaxStreams: the server's MAX_CONCURRENT_STREAMS (2) is learnt before the
// first CONNECT: five tunnels take three connections, none refused.
func TestClientXNetMaxStreams(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{MaxConcurrentStreams: 2}, echoHandler(t))
	var conns []net.Conn
	for range 5 {
		c := x.connect(t)
		if err := echoOnly(c, []byte("hi")); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	if n := x.accepted.Load(); n != 3 {
		t.Errorf("%d connections for 5 tunnels at 2 streams each, want 3", n)
	}
	for _, c := range conns {
		c.Close()
	}
}

// goid is the calling goroutine's id.
func goid() string {
	var buf [64]byte
	s := string(buf[:runtime.Stack(buf[:], false)])
	s = strings.TrimPrefix(s, "goroutine ")
	return s[:strings.IndexByte(s, ' ')]
}

// recordingConn is a destination that records who writes to it.
type recordingConn struct {
	*rawio.Conn
	mu        sync.Mutex
	tryFrom   map[string]bool // goroutines that called TryWrite
	readLoop  int             // TryWrite calls made from the client's read loop
	tried     atomic.Int64    // bytes taken by TryWrite
	blocking  atomic.Int64    // Write calls
	writeFrom string
}

func (r *recordingConn) TryWrite(p []byte) (int, error) {
	buf := make([]byte, 8<<10)
	stack := string(buf[:runtime.Stack(buf, false)])
	r.mu.Lock()
	r.tryFrom[goid()] = true
	if strings.Contains(stack, "(*h2Client).readFrames") {
		r.readLoop++
	}
	r.mu.Unlock()
	n, err := r.Conn.TryWrite(p)
	r.tried.Add(int64(n))
	return n, err
}

func (r *recordingConn) Write(p []byte) (int, error) {
	r.blocking.Add(1)
	return r.Conn.Write(p)
}

// TestSmallResponseWrittenByReadLoop: the response DATA of a 1 KiB exchange are written to
// WriteTo's destination by the connection's read loop, not handed to WriteTo's goroutine.
func TestSmallResponseWrittenByReadLoop(t *testing.T) {
	e := newEnv(t)
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	app, proxySide := tcpPair(t)
	raw, err := rawio.NewConn(proxySide)
	if err != nil {
		t.Fatal(err)
	}
	dst := &recordingConn{Conn: raw, tryFrom: map[string]bool{}}
	wt := make(chan string, 1)
	copied := make(chan int64, 1)
	go func() {
		wt <- goid()
		n, _ := c.(io.WriterTo).WriteTo(dst)
		copied <- n
	}()
	writeToID := <-wt
	time.Sleep(20 * time.Millisecond) // WriteTo has registered its destination
	msg := bytes.Repeat([]byte("x"), 1024)
	got := make([]byte, 1024)
	const rounds = 50
	for range rounds {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(app, got); err != nil {
			t.Fatal(err)
		}
	}
	c.(halfCloser).CloseWrite() // the echo's FIN ends WriteTo
	select {
	case n := <-copied:
		if n != rounds*1024 {
			t.Errorf("WriteTo returned %d bytes, want %d (the read loop's writes count)", n, rounds*1024)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WriteTo did not return at the response's end")
	}
	dst.mu.Lock()
	defer dst.mu.Unlock()
	if dst.tried.Load() != rounds*1024 || dst.blocking.Load() != 0 {
		t.Errorf("read loop wrote %d of %d bytes; WriteTo's goroutine made %d writes", dst.tried.Load(), rounds*1024, dst.blocking.Load())
	}
	if dst.tryFrom[writeToID] || len(dst.tryFrom) != 1 || dst.readLoop == 0 {
		t.Errorf("TryWrite called from goroutines %v (%d times in the read loop); WriteTo runs in %s", dst.tryFrom, dst.readLoop, writeToID)
	}
}

// echoOnly writes payload and reads its echo, the tunnel left open.
func echoOnly(c net.Conn, payload []byte) error {
	if _, err := c.Write(payload); err != nil {
		return err
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, payload) {
		return errors.New("echo differs")
	}
	return nil
}

// TestClientKeepsResponseAfterRSTNoError: RFC 9113 §8.1, a server may end a complete
// response with RST_STREAM(NO_ERROR) to stop the request, and the client must not discard
// the response. x/net's server does exactly this when the handler returns before the request
// body ended: the reader gets the whole response, then io.EOF, not a reset.
func TestClientKeepsResponseAfterRSTNoError(t *testing.T) {
	resp := randomBytes(256 << 10)
	x := newXNetPeer(t, &http2.Server{}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.Write(resp)
		// Returns without reading the body: END_STREAM, then RST_STREAM(NO_ERROR).
	})
	c := x.connect(t)
	st := c.(*clientConn).st
	eventually(t, 5*time.Second, "the RST_STREAM", func() bool {
		st.cc.mu.Lock()
		defer st.cc.mu.Unlock()
		return st.sendErr != nil
	})
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, resp) {
		t.Fatalf("read %d of %d bytes, err %v", len(got), len(resp), err)
	}
	// The request side is over, but not as a reset: the proxy must not reset the client.
	_, err = c.Write([]byte("more"))
	if err == nil || IsReset(err) {
		t.Fatalf("Write after the server stopped the request: %v, want an error other than a reset", err)
	}
}

// TestClientRSTNoErrorEndsReadFrom: the same stop interrupts ReadFrom's source (the proxy's
// client socket), and ReadFrom returns without an error, so that the proxy's pipe ends the
// tunnel in order instead of resetting the client.
func TestClientRSTNoErrorEndsReadFrom(t *testing.T) {
	resp := randomBytes(64 << 10)
	x := newXNetPeer(t, &http2.Server{}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.Write(resp)
	})
	c := x.connect(t)
	app, proxySide := tcpPair(t)
	_ = app // open, sending nothing: ReadFrom blocks reading proxySide until interrupted
	type result struct {
		n   int64
		err error
	}
	rf := make(chan result, 1)
	go func() {
		n, err := c.(io.ReaderFrom).ReadFrom(proxySide)
		rf <- result{n, err}
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, resp) {
		t.Fatalf("read %d of %d bytes, err %v", len(got), len(resp), err)
	}
	select {
	case r := <-rf:
		if r.err != nil {
			t.Fatalf("ReadFrom returned %d, %v; want no error", r.n, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadFrom still reads its source after the server stopped the request")
	}
}

// oneMiBThenDrain answers with 1 MiB, then reads the request until it ends or is reset.
func oneMiBThenDrain(w http.ResponseWriter, r *http.Request) {
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
	w.Write(randomBytes(1 << 20))
	w.(http.Flusher).Flush()
	io.Copy(io.Discard, r.Body)
}

// TestClientCloseReturnsUnreadWindow: Read takes all that was received and returns part of
// it; the rest, never read before Close, must go back to the connection window. Otherwise
// each such tunnel keeps its leftover of the pooled connection's 16 MiB, and once it is gone
// later tunnels on the connection receive nothing.
func TestClientCloseReturnsUnreadWindow(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{}, oneMiBThenDrain)
	for range 20 { // 20 MiB left unread: more than the connection window
		c := x.connect(t)
		time.Sleep(50 * time.Millisecond) // the whole MiB is received
		if _, err := c.Read(make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	c := x.connect(t)
	done := make(chan error, 1)
	go func() { _, err := io.ReadFull(c, make([]byte, 1<<20)); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		cc := c.(*clientConn).pc.cc
		cc.mu.Lock()
		defer cc.mu.Unlock()
		t.Fatalf("a new tunnel on the pooled connection receives nothing: connection window %d, unsent %d", cc.recvAvail, cc.recvUnsent)
	}
}

// TestClientWriteToReturnsReadLeftover: WriteTo first writes what a Read left; those bytes
// must go back to the windows like any others.
func TestClientWriteToReturnsReadLeftover(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{}, oneMiBThenDrain)
	c := x.connect(t)
	time.Sleep(50 * time.Millisecond) // the whole MiB is received
	if _, err := c.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	var buf lockedBuffer
	go c.(io.WriterTo).WriteTo(&buf)
	eventually(t, 5*time.Second, "the MiB to be written", func() bool { return buf.Len() == 1<<20-1 })
	cc, st := c.(*clientConn).pc.cc, c.(*clientConn).st
	eventually(t, 5*time.Second, "the windows to be whole", func() bool {
		cc.mu.Lock()
		defer cc.mu.Unlock()
		return cc.recvAvail+cc.recvUnsent == connWindow && st.recvAvail+st.recvUnsent == streamWindow
	})
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Len()
}

// gatedConn holds the first write after arm until gate is closed. Its Close waits for the
// gate too, as if the held write had completed in the kernel when the socket closed.
type gatedConn struct {
	net.Conn
	armed atomic.Bool
	gate  chan struct{}
	gated chan struct{} // closed when a write is held
}

func (g *gatedConn) Write(p []byte) (int, error) {
	if g.armed.CompareAndSwap(true, false) {
		close(g.gated)
		<-g.gate
	}
	return g.Conn.Write(p)
}

func (g *gatedConn) Close() error {
	select {
	case <-g.gated:
		<-g.gate
		time.Sleep(20 * time.Millisecond)
	default:
	}
	return g.Conn.Close()
}

// gatedPeer is an x/net peer whose pool dials gatedConns (the last one in *g).
func gatedPeer(t *testing.T, g **gatedConn) *xnetPeer {
	x := newXNetPeer(t, &http2.Server{}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		io.Copy(io.Discard, r.Body)
	})
	x.pool.Dial = func(ctx context.Context, key PoolKey) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", key.Dst.String())
		if err != nil {
			return nil, err
		}
		*g = &gatedConn{Conn: c, gate: make(chan struct{}), gated: make(chan struct{})}
		return *g, nil
	}
	return x
}

// TestClientTeardownFailsQueuedFrames: a frame queued while another goroutine's batch is
// being written, when the connection is torn down before that batch returns, is neither
// written nor left waiting: its Write returns (the client has no writer goroutine that
// would fail it, as the server's writeLoop does).
func TestClientTeardownFailsQueuedFrames(t *testing.T) {
	var g *gatedConn
	x := gatedPeer(t, &g)
	ctx := testCtx(t, 10*time.Second)
	to := netip.MustParseAddrPort("10.0.0.9:8080")
	a, err := x.pool.Connect(ctx, x.key, to, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := x.pool.Connect(ctx, x.key, to, nil)
	if err != nil {
		t.Fatal(err)
	}
	cc := a.(*clientConn).pc.cc
	g.armed.Store(true)
	go a.Write([]byte("aaaa")) // its batch is held in the socket write
	<-g.gated
	bdone := make(chan error, 1)
	go func() { _, err := b.Write([]byte("bbbb")); bdone <- err }() // queued behind it
	time.Sleep(50 * time.Millisecond)
	g.Conn.SetReadDeadline(time.Unix(1, 0)) // the read loop fails: teardown
	eventually(t, 5*time.Second, "teardown", func() bool { return cc.State().Closed })
	close(g.gate) // the held batch completes
	select {
	case err := <-bdone:
		if !IsReset(err) {
			t.Errorf("b.Write: %v, want a reset", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("b.Write hangs: its frame was left in the queue at teardown")
	}
}

// TestClientTeardownRacingWrites: bulk Writes racing the connection's end (its socket closed
// under it, as the PING health check or Pool.Close do) all return.
func TestClientTeardownRacingWrites(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		io.Copy(io.Discard, r.Body)
	})
	ctx := testCtx(t, 60*time.Second)
	to := netip.MustParseAddrPort("10.0.0.9:8080")
	p := make([]byte, 128<<10)
	hung := 0
	for i := range 100 {
		c, err := x.pool.Connect(ctx, x.key, to, nil)
		if err != nil {
			t.Fatalf("after %d hung of %d: %v", hung, i, err)
		}
		cc := c.(*clientConn).pc.cc
		done := make(chan struct{})
		go func() { c.Write(p); close(done) }()
		if i%2 == 0 {
			time.Sleep(time.Duration(i%7) * time.Microsecond)
		}
		cc.sock.Close()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			hung++
		}
		c.Close()
	}
	if hung > 0 {
		t.Fatalf("%d of 100 Writes never returned", hung)
	}
}

// TestClientStreamIDsExhausted: stream IDs are 31 bits. Once they run out the connection
// takes no new tunnel (a HEADERS with a bad ID would end it, and every tunnel on it): the
// next goes to a new connection and the old one's tunnels go on.
func TestClientStreamIDsExhausted(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{}, echoHandler(t))
	a := x.connect(t)
	cc := a.(*clientConn).pc.cc
	cc.mu.Lock()
	cc.nextID = math.MaxInt32 // the last client stream ID
	cc.mu.Unlock()
	b := x.connect(t)
	if b.(*clientConn).pc.cc != cc || b.(*clientConn).st.id != math.MaxInt32 {
		t.Fatal("the last stream ID was not used")
	}
	d := x.connect(t)
	if d.(*clientConn).pc.cc == cc {
		t.Fatal("a tunnel went to the connection without stream IDs")
	}
	for _, c := range []net.Conn{a, b, d} {
		if err := echoOnly(c, []byte("still here")); err != nil {
			t.Fatal(err)
		}
	}
	if st := cc.State(); st.Closed || !st.Closing {
		t.Fatalf("old connection %+v, want closing, not closed", st)
	}
	a.Close()
	b.Close()
	eventually(t, 5*time.Second, "the old connection to close with its last tunnel", func() bool { return cc.State().Closed })
}

// TestClientTruncatedResponseHeaders: a response header list beyond our limit reaches us
// without the fields past it; the CONNECT fails (stream reset, as x/net's client does)
// rather than going on with part of the headers, and the connection lives on.
func TestClientTruncatedResponseHeaders(t *testing.T) {
	var big atomic.Bool
	x := newXNetPeer(t, &http2.Server{}, func(w http.ResponseWriter, r *http.Request) {
		if big.Load() {
			// Two fields, each within the HPACK string limit, together beyond the list's.
			w.Header().Set("X-A", strings.Repeat("a", 40<<10))
			w.Header().Set("X-B", strings.Repeat("b", 40<<10))
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		io.Copy(io.Discard, r.Body)
	})
	a := x.connect(t)
	big.Store(true)
	_, err := x.pool.Connect(testCtx(t, 5*time.Second), x.key, netip.MustParseAddrPort("10.0.0.9:8080"), nil)
	if code, ok := streamErrCode(err); !ok || code != http2.ErrCodeProtocol {
		t.Fatalf("CONNECT with truncated response headers: %v, want a PROTOCOL_ERROR reset", err)
	}
	if _, err := a.Write([]byte("x")); err != nil || a.(*clientConn).pc.cc.State().Closed {
		t.Fatalf("the connection died with the stream: %v", err)
	}
}

// TestClientGoAwayIdleConnectionLeaves: a pooled connection without tunnels that gets a
// GOAWAY is closed and leaves the pool at once, not at the next Connect for its key.
func TestClientGoAwayIdleConnectionLeaves(t *testing.T) {
	x := newXNetPeer(t, &http2.Server{}, echoHandler(t))
	c := x.connect(t)
	cc := c.(*clientConn).pc.cc
	c.Close()
	if n := x.pool.numConns(x.key); n != 1 {
		t.Fatalf("%d pooled connections, want 1", n)
	}
	go x.hs.Shutdown(context.Background()) // GOAWAY; x/net closes an idle connection 1 s later
	start := time.Now()
	eventually(t, 5*time.Second, "the connection to leave the pool", func() bool { return x.pool.numConns(x.key) == 0 })
	eventually(t, 5*time.Second, "the connection to close", func() bool { return cc.State().Closed })
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("closed after %v: by the server, not on its GOAWAY", d)
	}
}

// TestDropStreamFrames: a reset stream's queued HEADERS and DATA go; a dropped frame that
// signals a writer becomes a marker in its place (it must not signal before the frames
// ahead of it are written), and other frames stay.
func TestDropStreamFrames(t *testing.T) {
	var w frameWriter
	done := make(chan error, 1)
	w.enqueueOrdLocked(wframe{kind: fkData, id: 1, data: []byte("a")})
	w.enqueueOrdLocked(wframe{kind: fkHeaders, id: 3, data: []byte("h")})
	w.enqueueOrdLocked(wframe{kind: fkData, id: 3, data: []byte("b")})
	w.enqueueOrdLocked(wframe{kind: fkData, id: 3, data: []byte("c"), done: done})
	w.enqueueOrdLocked(wframe{kind: fkRST, id: 3})
	w.enqueueOrdLocked(wframe{kind: fkData, id: 5, data: []byte("d")})
	if w.nCtrl != 2 {
		t.Fatalf("nCtrl %d, want 2", w.nCtrl)
	}
	errGone := errors.New("gone")
	if headers, data := w.dropStreamLocked(3, errGone); !headers || data != 2 {
		t.Errorf("dropped: HEADERS %v, %d DATA bytes; want true, 2 (b and c: their send window goes back)", headers, data)
	}
	var kinds []frameKind
	for _, f := range w.ord {
		kinds = append(kinds, f.kind)
	}
	want := []frameKind{fkData, fkMarker, fkRST, fkData}
	if !slices.Equal(kinds, want) || w.ord[1].done != done || w.ord[1].err != errGone || w.nCtrl != 1 {
		t.Fatalf("queue %v (nCtrl %d), want %v with the marker signalling %v", kinds, w.nCtrl, want, errGone)
	}
	if headers, data := w.dropStreamLocked(1, errGone); headers || data != 1 {
		t.Errorf("stream 1 dropped: HEADERS %v, %d DATA bytes; want false (none was queued), 1", headers, data)
	}
}

// TestClientCancelBeforeHeadersWritten: a CONNECT given up while its HEADERS still waits in
// the queue (behind another tunnel's batch) leaves nothing on the wire: no HEADERS, and no
// RST_STREAM, which on a stream the server never saw is a connection error there.
func TestClientCancelBeforeHeadersWritten(t *testing.T) {
	var g *gatedConn
	x := gatedPeer(t, &g)
	to := netip.MustParseAddrPort("10.0.0.9:8080")
	a, err := x.pool.Connect(testCtx(t, 10*time.Second), x.key, to, nil)
	if err != nil {
		t.Fatal(err)
	}
	cc := a.(*clientConn).pc.cc
	g.armed.Store(true)
	adone := make(chan error, 1)
	go func() { _, err := a.Write([]byte("aaaa")); adone <- err }() // its batch is held
	<-g.gated
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := x.pool.Connect(ctx, x.key, to, nil); err == nil {
		t.Fatal("CONNECT succeeded behind a held batch")
	}
	close(g.gate)
	if err := <-adone; err != nil {
		t.Fatal(err)
	}
	b := x.connect(t)
	if b.(*clientConn).pc.cc != cc {
		t.Fatal("the next tunnel went to another connection")
	}
	if _, err := a.Write([]byte("x")); err != nil || cc.State().Closing {
		t.Fatalf("the connection failed after the cancelled CONNECT: %v, %+v", err, cc.State())
	}
}
