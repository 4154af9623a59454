package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

func TestRoundTrip(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6"} {
		t.Run(network, func(t *testing.T) {
			var got atomic.Pointer[Request]
			e := newEnv(t, withNetwork(network), withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
				got.Store(&req)
				return dialTCP(ctx, req)
			}))
			c, err := e.connect(testCtx(t, 10*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			watchdog(t, 10*time.Second, c)
			defer c.Close()
			if _, err := c.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 5)
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
				t.Fatalf("echo: %q, %v", buf, err)
			}
			if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if n, err := c.Read(buf); n != 0 || err != io.EOF {
				t.Fatalf("after CloseWrite: %d, %v; want EOF", n, err)
			}

			req := got.Load()
			if req.Authority != e.echo.addr {
				t.Errorf("Authority %v, want %v", req.Authority, e.echo.addr)
			}
			if ap, ok := ParseForwardedFor(req.Forwarded); !ok || ap != netip.MustParseAddrPort("10.0.0.7:41234") {
				t.Errorf("Forwarded %q -> %v %v", req.Forwarded, ap, ok)
			}
			if req.Header.Get("Baggage") == "" || req.Header.Get("Traceparent") == "" {
				t.Errorf("headers %v: want baggage and traceparent", req.Header)
			}
			if len(req.Header) != 3 {
				t.Errorf("headers %v: want forwarded, baggage and traceparent only", req.Header)
			}
			if len(req.PeerTLS.PeerCertificates) == 0 || req.PeerTLS.PeerCertificates[0].URIs[0].String() != clientID {
				t.Errorf("peer certificate: want %s", clientID)
			}
			if req.PeerTLS.Version != tls.VersionTLS13 || req.PeerTLS.NegotiatedProtocol != "h2" {
				t.Errorf("TLS %x ALPN %q", req.PeerTLS.Version, req.PeerTLS.NegotiatedProtocol)
			}
			if req.RemoteAddr == nil {
				t.Error("no RemoteAddr")
			}
		})
	}
}

// TestTunnelsInTurn: tunnels opened one after another on the pooled connection each carry
// several exchanges: nothing of an ended stream (its END_STREAM, say) leaks into the next.
func TestTunnelsInTurn(t *testing.T) {
	e := newEnv(t)
	for i := range 3 {
		c, err := e.connect(testCtx(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		watchdog(t, 10*time.Second, c)
		for j := range 3 {
			msg := fmt.Sprintf("tunnel %d message %d", i, j)
			if _, err := c.Write([]byte(msg)); err != nil {
				t.Fatalf("%s: %v", msg, err)
			}
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
				t.Fatalf("%s: echo %q, %v", msg, buf, err)
			}
		}
		c.(interface{ CloseWrite() error }).CloseWrite()
		if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
			t.Fatalf("tunnel %d after CloseWrite: %q, %v; want EOF", i, rest, err)
		}
		c.Close()
	}
	if n := e.ln.accepted.Load(); n != 1 {
		t.Errorf("server accepted %d connections, want 1 (pooled)", n)
	}
}

// TestLargeTransfer pushes 64 MiB each way at once through one tunnel and compares hashes:
// flow control, window updates and frame splitting all have to be right.
func TestLargeTransfer(t *testing.T) {
	const size = 64 << 20
	e := newEnv(t)
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 60*time.Second, c)
	defer c.Close()

	sent := sha256.New()
	werr := make(chan error, 1)
	go func() {
		r := rand.New(rand.NewPCG(1, 2))
		buf := make([]byte, 1<<20)
		for n := 0; n < size; n += len(buf) {
			for i := 0; i < len(buf); i += 8 {
				v := r.Uint64()
				for j := 0; j < 8; j++ {
					buf[i+j] = byte(v >> (8 * j))
				}
			}
			sent.Write(buf)
			if _, err := c.Write(buf); err != nil {
				werr <- err
				return
			}
		}
		werr <- c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	recv := sha256.New()
	n, err := io.Copy(recv, c)
	if err != nil {
		t.Fatalf("read after %d bytes: %v", n, err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if n != size {
		t.Fatalf("read %d bytes, want %d", n, size)
	}
	if !bytes.Equal(sent.Sum(nil), recv.Sum(nil)) {
		t.Fatal("echoed bytes differ from sent bytes")
	}
}

func exchange(c net.Conn, payload []byte) error {
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("write: %w", werr)
	}
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo: got %d bytes, want %d", len(got), len(payload))
	}
	return nil
}

func TestConcurrentTunnelsShareOneConnection(t *testing.T) {
	const tunnels = 50
	e := newEnv(t)
	ctx := testCtx(t, 30*time.Second)
	var wg sync.WaitGroup
	errs := make(chan error, tunnels)
	conns := make(chan net.Conn, tunnels)
	start := make(chan struct{})
	for i := 0; i < tunnels; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			c, err := e.connect(ctx)
			if err != nil {
				errs <- err
				return
			}
			conns <- c
			payload := bytes.Repeat([]byte{byte(i)}, 64<<10+i)
			errs <- exchange(c, payload)
		}()
	}
	close(start) // all at once: they must wait for one dial, not start fifty
	wg.Wait()
	close(errs)
	close(conns)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := e.pool.numConns(e.key); n != 1 {
		t.Errorf("pool holds %d connections, want 1", n)
	}
	if n := e.ln.accepted.Load(); n != 1 {
		t.Errorf("server accepted %d connections, want 1", n)
	}
	for c := range conns {
		c.Close()
	}
}

func TestPoolOpensAnotherConnectionWhenFull(t *testing.T) {
	e := newEnv(t, withMaxStreams(2))
	ctx := testCtx(t, 10*time.Second)
	var open []net.Conn
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := 0; i < 5; i++ {
		c, err := e.connect(ctx)
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
	}
	if n := e.pool.numConns(e.key); n != 3 {
		t.Errorf("5 tunnels at 2 per connection: pool holds %d connections, want 3", n)
	}
	if n := e.ln.accepted.Load(); n != 3 {
		t.Errorf("server accepted %d connections, want 3", n)
	}
	for _, c := range open {
		if err := exchange(c, []byte("ping")); err != nil {
			t.Error(err)
		}
	}
	// A freed slot is reused, not a new connection.
	open[0].Close()
	c, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	open[0] = c
	if n := e.ln.accepted.Load(); n != 3 {
		t.Errorf("after a slot was freed: server accepted %d connections, want 3", n)
	}
}

// TestServerStreamLimit: the server advertises fewer streams than the pool would use; the
// pool follows the server's SETTINGS rather than getting refusals.
func TestServerStreamLimit(t *testing.T) {
	e := newEnv(t, withServer(func(s *Server) { s.MaxConcurrentStreams = 2 }))
	ctx := testCtx(t, 10*time.Second)
	first, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	// Let the client see the server's SETTINGS.
	if _, err := first.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(first, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	var open []net.Conn
	for i := 0; i < 3; i++ {
		c, err := e.connect(ctx)
		if err != nil {
			t.Fatalf("tunnel %d: %v", i+2, err)
		}
		open = append(open, c)
	}
	for _, c := range open {
		if err := exchange(c, []byte("hi")); err != nil {
			t.Error(err)
		}
		c.Close()
	}
	if n := e.ln.accepted.Load(); n != 2 {
		t.Errorf("server accepted %d connections, want 2", n)
	}
}

// TestBurstBeyondServerLimit: a burst on a fresh connection, before the server's SETTINGS
// arrive, goes beyond the server's limit; refused streams are retried, all tunnels open.
func TestBurstBeyondServerLimit(t *testing.T) {
	e := newEnv(t, withServer(func(s *Server) { s.MaxConcurrentStreams = 2 }))
	ctx := testCtx(t, 10*time.Second)
	const n = 6
	conns := make(chan net.Conn, n)
	errs := make(chan error, n)
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		go func() {
			<-start
			c, err := e.connect(ctx)
			if err != nil {
				errs <- err
				return
			}
			conns <- c
		}()
	}
	close(start)
	var open []net.Conn
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		select {
		case c := <-conns:
			open = append(open, c)
		case err := <-errs:
			t.Errorf("tunnel failed: %v", err)
		}
	}
	for _, c := range open {
		if err := exchange(c, []byte("burst")); err != nil {
			t.Error(err)
		}
	}
}

func TestIdleConnectionReleased(t *testing.T) {
	e := newEnv(t, withIdle(200*time.Millisecond))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := exchange(c, []byte("x")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if n := e.pool.numConns(e.key); n != 1 {
		t.Errorf("with a tunnel open: %d connections, want 1 (busy connections are not idle)", n)
	}
	c.Close()
	eventually(t, 5*time.Second, "the idle connection to be closed", func() bool {
		return e.pool.numConns(e.key) == 0 && e.srv.numConns() == 0
	})
	// The pool dials again when needed.
	c, err = e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := exchange(c, []byte("again")); err != nil {
		t.Fatal(err)
	}
	if n := e.ln.accepted.Load(); n != 2 {
		t.Errorf("server accepted %d connections, want 2", n)
	}
}

func TestDeadConnectionDropped(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t, 10*time.Second)
	c, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := exchange(c, []byte("x")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Kill the server's side of the pooled connection.
	e.srv.mu.Lock()
	for sc := range e.srv.conns {
		sc.raw.Close()
	}
	e.srv.mu.Unlock()
	eventually(t, 5*time.Second, "server connection gone", func() bool { return e.srv.numConns() == 0 })
	c, err = e.connect(ctx)
	if err != nil {
		t.Fatalf("after the pooled connection died: %v", err)
	}
	defer c.Close()
	if err := exchange(c, []byte("y")); err != nil {
		t.Fatal(err)
	}
	if n := e.pool.numConns(e.key); n != 1 {
		t.Errorf("pool holds %d connections, want 1", n)
	}
}

// breakableConn fails writes once broken while reads go on blocking: a connection that died
// in a way the client's read loop has not noticed yet.
type breakableConn struct {
	net.Conn
	broken *atomic.Bool
}

func (c breakableConn) Write(p []byte) (int, error) {
	if c.broken.Load() {
		return 0, syscall.EPIPE
	}
	return c.Conn.Write(p)
}

// TestStaleConnectionRetried: a CONNECT that fails on a pooled connection which looked
// usable is retried once on a new one.
func TestStaleConnectionRetried(t *testing.T) {
	e := newEnv(t)
	var breakers []*atomic.Bool
	var mu sync.Mutex
	e.pool.Dial = func(ctx context.Context, key PoolKey) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", key.Dst.String())
		if err != nil {
			return nil, err
		}
		b := new(atomic.Bool)
		mu.Lock()
		breakers = append(breakers, b)
		mu.Unlock()
		return breakableConn{c, b}, nil
	}
	ctx := testCtx(t, 10*time.Second)
	c, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := exchange(c, []byte("first")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	mu.Lock()
	breakers[0].Store(true)
	mu.Unlock()
	c, err = e.connect(ctx)
	if err != nil {
		t.Fatalf("CONNECT on a stale pooled connection was not retried: %v", err)
	}
	defer c.Close()
	if err := exchange(c, []byte("second")); err != nil {
		t.Fatal(err)
	}
	if n := e.ln.accepted.Load(); n != 2 {
		t.Errorf("server accepted %d connections, want 2", n)
	}
}

func TestStatusCodes(t *testing.T) {
	closedPort := func() netip.AddrPort {
		l := listen(t, "tcp4")
		a := addrPort(l.Addr())
		l.Close()
		return a
	}()
	deny := netip.MustParseAddrPort("127.0.0.1:401")
	unknown := netip.MustParseAddrPort("127.0.0.1:503")
	dials := atomic.Int64{}
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		dials.Add(1)
		switch req.Authority {
		case deny:
			return nil, http.StatusUnauthorized, errors.New("policy: denied")
		case unknown:
			return nil, http.StatusServiceUnavailable, errors.New("no such port")
		}
		return dialTCP(ctx, req)
	}))
	ctx := testCtx(t, 10*time.Second)

	for _, tc := range []struct {
		name string
		dst  netip.AddrPort
		want int
	}{
		{"policy deny", deny, 401},
		{"unknown port", unknown, 503},
		{"upstream refuses", closedPort, 503},
	} {
		_, err := e.connectTo(ctx, tc.dst)
		var se *StatusError
		if !errors.As(err, &se) || se.Code != tc.want {
			t.Errorf("%s: err %v, want status %d", tc.name, err, tc.want)
		}
	}

	// Requests the Pool cannot send, over a bare HTTP/2 client.
	cc := e.rawClient(t)
	before := dials.Load()
	for _, tc := range []struct {
		name, method, authority string
	}{
		{"not an address", "CONNECT", "example.com:80"},
		{"no port", "CONNECT", "127.0.0.1"},
		{"port 0", "CONNECT", "127.0.0.1:0"},
		{"zone", "CONNECT", "[fe80::1%25lo]:80"},
		{"GET", "GET", e.echo.addr.String()},
		{"POST", "POST", e.echo.addr.String()},
	} {
		req := &http.Request{Method: tc.method, Host: tc.authority, Header: http.Header{},
			URL: &url.URL{Scheme: "https", Host: tc.authority, Path: "/"}}
		if tc.method == "CONNECT" {
			req.URL = &url.URL{Host: tc.authority}
		}
		resp, err := cc.RoundTrip(req.WithContext(ctx))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("%s: status %d, want 400", tc.name, resp.StatusCode)
		}
	}
	if n := dials.Load() - before; n != 0 {
		t.Errorf("the Dialer ran %d times for bad requests", n)
	}
	// The connection survives refusals.
	c, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := exchange(c, []byte("still fine")); err != nil {
		t.Fatal(err)
	}
}

// TestOKOnlyAfterUpstreamConnect: the 200 waits for the Dialer.
func TestOKOnlyAfterUpstreamConnect(t *testing.T) {
	release := make(chan struct{})
	var dialed atomic.Bool
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		select {
		case <-release:
		case <-ctx.Done():
			return nil, 503, ctx.Err()
		}
		c, status, err := dialTCP(ctx, req)
		dialed.Store(true)
		return c, status, err
	}))
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := e.connect(testCtx(t, 10*time.Second))
		done <- result{c, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("Connect returned before the upstream was connected: %v", r.err)
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.c.Close()
	if !dialed.Load() {
		t.Fatal("200 seen before the Dialer returned")
	}
	if err := exchange(r.c, []byte("after")); err != nil {
		t.Fatal(err)
	}
}

// TestConnectContext: the caller's context bounds the CONNECT; giving up resets the stream
// and the Dialer's context is cancelled.
func TestConnectContext(t *testing.T) {
	cancelled := make(chan struct{})
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		<-ctx.Done()
		close(cancelled)
		return nil, 503, ctx.Err()
	}))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := e.connect(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want deadline exceeded", err)
	}
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the Dialer's context was not cancelled by the client's reset")
	}
}

// TestHalfCloseClientToUpstream: END_STREAM from the client is a FIN upstream; the upstream
// still writes back after it.
func TestHalfCloseClientToUpstream(t *testing.T) {
	got := make(chan string, 1)
	up := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		b, err := io.ReadAll(c) // to EOF
		if err != nil {
			got <- "error: " + err.Error()
			return
		}
		got <- string(b)
		time.Sleep(50 * time.Millisecond)
		c.Write([]byte("reply after your FIN"))
		c.CloseWrite()
	})
	e := newEnv(t, withEcho(up))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 10*time.Second, c)
	defer c.Close()
	c.Write([]byte("request"))
	c.(interface{ CloseWrite() error }).CloseWrite()
	select {
	case s := <-got:
		if s != "request" {
			t.Fatalf("upstream read %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream never saw EOF")
	}
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "reply after your FIN" {
		t.Fatalf("client read %q, %v", b, err)
	}
}

// TestHalfCloseUpstreamToClient: a FIN from the upstream ends the response; the client reads
// EOF and still writes, and the upstream gets it.
func TestHalfCloseUpstreamToClient(t *testing.T) {
	got := make(chan string, 1)
	up := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		c.Write([]byte("banner"))
		c.CloseWrite()
		b, err := io.ReadAll(c)
		if err != nil {
			got <- "error: " + err.Error()
			return
		}
		got <- string(b)
	})
	e := newEnv(t, withEcho(up))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 10*time.Second, c)
	defer c.Close()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "banner" {
		t.Fatalf("client read %q, %v", b, err)
	}
	time.Sleep(50 * time.Millisecond) // the server's side of the stream is half-closed by now
	for i := 0; i < 3; i++ {
		if _, err := c.Write([]byte("late data ")); err != nil {
			t.Fatalf("write after EOF: %v", err)
		}
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	select {
	case s := <-got:
		if s != "late data late data late data " {
			t.Fatalf("upstream read %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream never got the late data")
	}
}

// TestResetClientToUpstream: closing the tunnel without half-closing resets the stream, and
// the upstream sees a TCP RST.
func TestResetClientToUpstream(t *testing.T) {
	got := make(chan error, 1)
	up := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		c.Write([]byte("x"))
		_, err := io.Copy(io.Discard, c)
		got <- err
	})
	e := newEnv(t, withEcho(up))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("some"))
	c.Close()
	select {
	case err := <-got:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("upstream read ended with %v, want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream not reset")
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after Close: %v, want net.ErrClosed", err)
	}
}

// TestResetUpstreamToClient: a TCP RST from the upstream resets the stream with
// CONNECT_ERROR.
func TestResetUpstreamToClient(t *testing.T) {
	up := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		buf := make([]byte, 4)
		io.ReadFull(c, buf)
		c.SetLinger(0)
		c.Close()
	})
	e := newEnv(t, withEcho(up))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 10*time.Second, c)
	defer c.Close()
	c.Write([]byte("boom"))
	_, err = io.Copy(io.Discard, c) // through the tunnel's WriteTo
	if !IsReset(err) {
		t.Fatalf("read: %v, want a reset", err)
	}
	if code, ok := streamErrCode(err); !ok || code != http2.ErrCodeConnect {
		t.Errorf("read: %v, want RST_STREAM CONNECT_ERROR", err)
	}
	// Writing fails too, as on a reset socket.
	eventually(t, 5*time.Second, "writes to fail", func() bool {
		_, err := c.Write([]byte("more"))
		return IsReset(err)
	})
}

// TestSlowUpstreamDoesNotBlockOthers: a tunnel whose upstream never reads fills its own
// stream window and stops there; other tunnels on the same connection keep flowing.
func TestSlowUpstreamDoesNotBlockOthers(t *testing.T) {
	stuck := netip.AddrPort{}
	hold := make(chan struct{})
	stuckUp := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		c.SetReadBuffer(64 << 10)
		<-hold
	})
	stuck = stuckUp.addr
	e := newEnv(t)
	ctx := testCtx(t, 20*time.Second)
	slow, err := e.connectTo(ctx, stuck)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	var written atomic.Int64
	go func() {
		buf := make([]byte, 256<<10)
		for {
			n, err := slow.Write(buf)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	// Wait until the stuck tunnel stops taking data: its window (4 MiB) plus socket buffers.
	var last int64 = -1
	eventually(t, 10*time.Second, "the stuck tunnel to stall", func() bool {
		time.Sleep(100 * time.Millisecond)
		n := written.Load()
		stalled := n == last && n > 0
		last = n
		return stalled
	})
	if n := written.Load(); n > 64<<20 {
		t.Errorf("%d bytes accepted for an upstream that does not read: flow control is not working", n)
	}
	for i := 0; i < 3; i++ {
		c, err := e.connect(ctx)
		if err != nil {
			t.Fatal(err)
		}
		watchdog(t, 10*time.Second, c)
		if err := exchange(c, bytes.Repeat([]byte("z"), 8<<20)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if n := e.ln.accepted.Load(); n != 1 {
		t.Errorf("server accepted %d connections, want 1", n)
	}
	close(hold)
}

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

func TestTLSRequiresClientCertificate(t *testing.T) {
	pki := sharedPKI(t)
	noCert := pki.clientTLS(t)
	noCert.Certificates = nil
	var dials, refused atomic.Int64
	e := newEnv(t, withClientTLS(noCert), withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		dials.Add(1)
		return dialTCP(ctx, req)
	}), withServer(func(s *Server) { s.OnHandshakeError = func(error) { refused.Add(1) } }))
	if _, err := e.connect(testCtx(t, 10*time.Second)); err == nil {
		t.Fatal("Connect succeeded without a client certificate")
	}
	// In TLS 1.3 the client's handshake completes before the server checks the client's
	// certificate; the refusal arrives as an alert on the first read (a write may instead
	// meet the closed socket).
	c, err := tls.Dial("tcp", e.hbone.String(), noCert)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "certificate required") {
		t.Errorf("read: %v, want the server's certificate_required alert", err)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("the Dialer ran %d times", n)
	}
	if e.srv.numConns() != 0 {
		t.Error("server kept an HTTP/2 connection without a client certificate")
	}
	// Both the pool's attempt and tls.Dial's, each heard once (the hook runs just after
	// the alert goes out, so it may lag the client's read).
	for deadline := time.Now().Add(5 * time.Second); refused.Load() < 2 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if n := refused.Load(); n != 2 {
		t.Errorf("OnHandshakeError ran %d times, want 2", n)
	}
}

func TestTLSWrongTrustDomainRejected(t *testing.T) {
	other := newTestPKI(t)
	conf := sharedPKI(t).clientTLS(t)
	cert, _, _ := other.leaf(t, "spiffe://other.domain/ns/default/sa/sleep")
	conf.Certificates = []tls.Certificate{cert}
	e := newEnv(t, withClientTLS(conf))
	if _, err := e.connect(testCtx(t, 10*time.Second)); err == nil {
		t.Fatal("Connect succeeded with a certificate from another CA")
	}
}

// TestTLS12Rejected: the server refuses a TLS 1.2 client (the pool never offers one).
func TestTLS12Rejected(t *testing.T) {
	conf := sharedPKI(t).clientTLS(t)
	conf.MinVersion = tls.VersionTLS12
	conf.MaxVersion = tls.VersionTLS12
	e := newEnv(t)
	tc, err := tls.Dial("tcp", e.hbone.String(), conf)
	if err == nil {
		tc.Close()
		t.Fatal("TLS 1.2 handshake succeeded")
	}
	if !strings.Contains(err.Error(), "protocol version") {
		t.Errorf("err %v, want a protocol version alert", err)
	}
}

// TestPoolPinsTLS13: whatever versions and protocols the caller's configuration lists, the
// pool offers TLS 1.3 and h2 only.
func TestPoolPinsTLS13(t *testing.T) {
	conf := sharedPKI(t).clientTLS(t)
	conf.MinVersion = tls.VersionTLS12
	conf.MaxVersion = tls.VersionTLS12
	conf.NextProtos = []string{"http/1.1"}
	e := newEnv(t, withClientTLS(conf))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := exchange(c, []byte("pinned")); err != nil {
		t.Fatal(err)
	}
}

func TestServeRejectsConfigWithoutClientAuth(t *testing.T) {
	conf := sharedPKI(t).serverTLS(t)
	conf.ClientAuth = tls.NoClientCert
	s := &Server{TLS: conf, Dial: dialTCP}
	l := listen(t, "tcp4")
	defer l.Close()
	if err := s.Serve(l); err == nil || !strings.Contains(err.Error(), "client certificate") {
		t.Fatalf("Serve: %v, want a configuration error", err)
	}
}

// rawH2 speaks HTTP/2 by hand to the server, to see exactly what it sends.
type rawH2 struct {
	tc *tls.Conn
	fr *http2.Framer
}

func dialRaw(t *testing.T, e *env) *rawH2 {
	t.Helper()
	tc, err := tls.Dial("tcp", e.hbone.String(), e.clTLS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(tc, tc)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return &rawH2{tc: tc, fr: fr}
}

// TestServerSettings: the server's SETTINGS and connection window are those of §5.
func TestServerSettings(t *testing.T) {
	e := newEnv(t)
	r := dialRaw(t, e)
	settings := map[http2.SettingID]uint32{}
	var connIncr uint32
	for settings[http2.SettingMaxConcurrentStreams] == 0 || connIncr == 0 {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				f.ForeachSetting(func(s http2.Setting) error { settings[s.ID] = s.Val; return nil })
			}
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				connIncr = f.Increment
			}
		}
	}
	want := map[http2.SettingID]uint32{
		http2.SettingMaxConcurrentStreams: 100,
		http2.SettingInitialWindowSize:    4 << 20,
		http2.SettingMaxFrameSize:         1 << 20,
	}
	for id, v := range want {
		if settings[id] != v {
			t.Errorf("%v = %d, want %d", id, settings[id], v)
		}
	}
	if connIncr+65535 != 16<<20 {
		t.Errorf("connection window %d, want 16 MiB", connIncr+65535)
	}
}

// TestClientSettings: the pool's HTTP/2 client announces §5's windows and frame size.
func TestClientSettings(t *testing.T) {
	pki := sharedPKI(t)
	conf := pki.serverTLS(t)
	l := tls.NewListener(listen(t, "tcp4"), conf)
	defer l.Close()
	type result struct {
		settings map[http2.SettingID]uint32
		connIncr uint32
		err      error
	}
	res := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			res <- result{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, len(http2.ClientPreface))); err != nil {
			res <- result{err: err}
			return
		}
		fr := http2.NewFramer(c, c)
		r := result{settings: map[http2.SettingID]uint32{}}
		for r.connIncr == 0 {
			f, err := fr.ReadFrame()
			if err != nil {
				r.err = err
				break
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				f.ForeachSetting(func(s http2.Setting) error { r.settings[s.ID] = s.Val; return nil })
			case *http2.WindowUpdateFrame:
				r.connIncr = f.Increment
			}
		}
		res <- r
	}()
	clTLS := pki.clientTLS(t)
	p := &Pool{Log: testLogger(t),
		TLSConfig: func(PoolKey) (*tls.Config, error) { return clTLS, nil },
		Dial: func(ctx context.Context, key PoolKey) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", key.Dst.String())
		}}
	defer p.Close()
	key := PoolKey{Dst: addrPort(l.Addr())}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	go p.Connect(ctx, key, netip.MustParseAddrPort("127.0.0.1:80"), nil)
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	if v := r.settings[http2.SettingInitialWindowSize]; v != 4<<20 {
		t.Errorf("INITIAL_WINDOW_SIZE %d, want 4 MiB", v)
	}
	if v := r.settings[http2.SettingMaxFrameSize]; v != 1<<20 {
		t.Errorf("MAX_FRAME_SIZE %d, want 1 MiB", v)
	}
	if r.connIncr+65535 != 16<<20 {
		t.Errorf("connection window %d, want 16 MiB", r.connIncr+65535)
	}
}

// TestPingTimeout: a peer that stops answering PINGs is dropped.
func TestPingTimeout(t *testing.T) {
	e := newEnv(t, withServer(func(s *Server) {
		s.ReadIdleTimeout = 100 * time.Millisecond
		s.PingTimeout = 200 * time.Millisecond
	}))
	r := dialRaw(t, e)
	start := time.Now()
	pinged := false
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			break // closed by the server
		}
		if p, ok := f.(*http2.PingFrame); ok && !p.IsAck() {
			pinged = true
		}
	}
	if !pinged {
		t.Error("no PING before the close")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("closed after %v", d)
	}
	eventually(t, 5*time.Second, "server to drop the connection", func() bool { return e.srv.numConns() == 0 })
}

// TestPingKeepsIdleConnection: PINGs answered, an idle connection stays up.
func TestPingKeepsIdleConnection(t *testing.T) {
	e := newEnv(t, withServer(func(s *Server) {
		s.ReadIdleTimeout = 50 * time.Millisecond
		s.PingTimeout = 100 * time.Millisecond
	}))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(500 * time.Millisecond) // several ping rounds, all answered by x/net
	if err := exchange(c, []byte("alive")); err != nil {
		t.Fatal(err)
	}
}

// TestProtocolErrors: ways to break HTTP/2, each answered as RFC 9113 says, while the
// server keeps serving others.
func TestProtocolErrors(t *testing.T) {
	blackhole := netip.MustParseAddrPort("127.0.0.1:9") // its Dialer never returns: nobody reads
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		if req.Authority == blackhole {
			<-ctx.Done()
			return nil, 503, ctx.Err()
		}
		return dialTCP(ctx, req)
	}))
	headers := func(r *rawH2, id uint32, authority string) {
		var hb bytes.Buffer
		enc := hpackEncoder(&hb)
		enc(":method", "CONNECT")
		enc(":authority", authority)
		if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	send := func(r *rawH2, id uint32, n int) {
		chunk := make([]byte, 1<<20)
		for n > 0 {
			k := min(n, len(chunk))
			if err := r.fr.WriteData(id, false, chunk[:k]); err != nil {
				return // the server may have closed already
			}
			n -= k
		}
	}

	t.Run("even stream id", func(t *testing.T) {
		r := dialRaw(t, e)
		headers(r, 2, e.echo.addr.String())
		if code, ok := readUntilGoAway(r); !ok || code != http2.ErrCodeProtocol {
			t.Errorf("GOAWAY %v %v, want PROTOCOL_ERROR", code, ok)
		}
	})
	t.Run("stream window overflow", func(t *testing.T) {
		r := dialRaw(t, e)
		headers(r, 1, blackhole.String())
		send(r, 1, 4<<20+1)
		for {
			f, err := r.fr.ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			if rst, ok := f.(*http2.RSTStreamFrame); ok {
				if rst.StreamID != 1 || rst.ErrCode != http2.ErrCodeFlowControl {
					t.Errorf("RST_STREAM %d %v, want 1 FLOW_CONTROL_ERROR", rst.StreamID, rst.ErrCode)
				}
				break
			}
		}
	})
	t.Run("connection window overflow", func(t *testing.T) {
		r := dialRaw(t, e)
		for id := uint32(1); id <= 9; id += 2 { // 5 streams x 4 MiB > 16 MiB
			headers(r, id, blackhole.String())
		}
		go func() {
			for id := uint32(1); id <= 9; id += 2 {
				send(r, id, 4<<20)
			}
		}()
		if code, ok := readUntilGoAway(r); !ok || code != http2.ErrCodeFlowControl {
			t.Errorf("GOAWAY %v %v, want FLOW_CONTROL_ERROR", code, ok)
		}
	})
	t.Run("others still served", func(t *testing.T) {
		c, err := e.connect(testCtx(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := exchange(c, []byte("ok")); err != nil {
			t.Fatal(err)
		}
	})
}

func readUntilGoAway(r *rawH2) (http2.ErrCode, bool) {
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			return 0, false
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			return g.ErrCode, true
		}
	}
}

func TestParseForwardedFor(t *testing.T) {
	for in, want := range map[string]string{
		`for="10.1.2.3:4567"`:                       "10.1.2.3:4567",
		`for="[2001:db8::1]:80"`:                    "[2001:db8::1]:80",
		`For=192.0.2.60;proto=http;by=203.0.113.43`: "192.0.2.60:0",
		`by=1.2.3.4; for="[::1]"`:                   "[::1]:0",
		`for=unknown`:                               "",
		``:                                          "",
	} {
		ap, ok := ParseForwardedFor(in)
		got := ""
		if ok {
			got = ap.String()
		}
		if got != want {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
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

// TestResetAfterHalfClose: a client that half-closes, then resets, resets the upstream
// (§5: RST_STREAM one way is a TCP RST the other) even when the upstream is quiet, and
// the tunnel ends. Nothing else would: the request side is done, and the response side
// waits on the upstream.
func TestResetAfterHalfClose(t *testing.T) {
	sawEOF, speak := make(chan struct{}), make(chan struct{})
	wrote := make(chan error, 1)
	up := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		close(sawEOF)
		// Quiet (a write would wake the tunnel) until the test has seen it end; then a
		// write meets the reset.
		select {
		case <-speak:
		case <-time.After(5 * time.Second):
		}
		_, err := c.Write([]byte("x"))
		if err == nil {
			time.Sleep(100 * time.Millisecond) // the RST may answer the write
			_, err = c.Write([]byte("x"))
		}
		wrote <- err
	})
	e := newEnv(t, withEcho(up))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	select {
	case <-sawEOF:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream never saw the request's end")
	}
	c.Close() // the response is not read to its end: a reset
	for deadline := time.Now().Add(3 * time.Second); e.srv.handlers.Load() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			close(speak)
			t.Fatalf("%d tunnels still running 3 s after the client's reset", e.srv.handlers.Load())
		}
	}
	close(speak)
	if err := <-wrote; !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Errorf("upstream write after the client's reset: %v, want a reset", err)
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

// TestForgetSource: after ForgetSource, a tunnel for that source IP gets a new connection;
// the forgotten one serves its open tunnel to the end and then closes.
func TestForgetSource(t *testing.T) {
	e := newEnv(t)
	ctx := testCtx(t, 10*time.Second)
	old, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	e.pool.ForgetSource(e.key.SrcIP)
	fresh, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	if n := e.ln.accepted.Load(); n != 2 {
		t.Errorf("server accepted %d connections, want 2 (the forgotten one is not reused)", n)
	}
	// The old tunnel still works, and its connection goes with it.
	if _, err := old.Write([]byte("still")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(old, buf); err != nil || string(buf) != "still" {
		t.Fatalf("the forgotten connection's open tunnel: %q, %v", buf, err)
	}
	old.Close()
	for deadline := time.Now().Add(3 * time.Second); e.srv.numConns() != 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("server has %d connections after the forgotten one's last tunnel closed, want 1", e.srv.numConns())
		}
	}
}
