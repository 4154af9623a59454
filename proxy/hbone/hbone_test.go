package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync/atomic"
	"testing"
	"time"
)

// Basic tunnel behaviour: a round trip, tunnels one after another, CONNECT status codes and
// timing, the Forwarded header. exchange, used by tests in every file, is here too.

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
