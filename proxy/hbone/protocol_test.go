package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// HTTP/2 on the wire, seen through a hand-driven client (rawH2) or server: SETTINGS and
// windows, PING keepalive, protocol errors and how they are answered.

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

// TestServerSettings: the server's SETTINGS and connection window are those of docs/hbone.md#http2-settings-and-pooling.
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

// TestClientSettings: the pool's HTTP/2 client announces the windows and frame size of docs/hbone.md.
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
