package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
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
