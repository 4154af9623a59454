package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/rawio"
)

// tcpPair is a connected loopback pair: app is what a proxy accepted, client the pod's end.
func tcpPair(t *testing.T) (app, client *net.TCPConn) {
	t.Helper()
	l := listen(t, "tcp4")
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-accepted
	if a == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); c.Close() })
	return a.(*net.TCPConn), c.(*net.TCPConn)
}

// hashUpstream reads to EOF and reports the bytes' hash and count, or the read error.
type hashResult struct {
	n   int64
	sum []byte
	err error
}

func hashUpstream(t *testing.T, readSize int, pause time.Duration) (*upstream, chan hashResult) {
	res := make(chan hashResult, 1)
	u := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		h := sha256.New()
		buf := make([]byte, readSize)
		var n int64
		for i := 0; ; i++ {
			k, err := c.Read(buf)
			h.Write(buf[:k])
			n += int64(k)
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				res <- hashResult{n, h.Sum(nil), err}
				return
			}
			if pause > 0 && i%16 == 0 { // a slow app: its buffers fill, the server must queue
				time.Sleep(pause)
			}
		}
	})
	return u, res
}

// openTunnel opens one tunnel to up through a fresh env; it is closed when the test ends.
func openTunnel(t *testing.T, up *upstream, opts ...envOpt) net.Conn {
	t.Helper()
	e := newEnv(t, append([]envOpt{withEcho(up)}, opts...)...)
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 60*time.Second, c)
	t.Cleanup(func() { c.Close() })
	return c
}

// wantHash waits for the upstream's result and checks it read exactly data.
func wantHash(t *testing.T, res chan hashResult, data []byte) {
	t.Helper()
	select {
	case r := <-res:
		want := sha256.Sum256(data)
		if r.err != nil || r.n != int64(len(data)) || !bytes.Equal(r.sum, want[:]) {
			t.Fatalf("upstream read %d bytes (%v), not the %d sent, in order", r.n, r.err, len(data))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("upstream never saw EOF")
	}
}

// closeWithin closes c and fails the test if that takes longer than d (Close must not wait
// for a ReadFrom source that is idle).
func closeWithin(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	closed := make(chan struct{})
	go func() {
		c.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(d):
		t.Fatalf("Close still waiting after %v: it waits for the idle ReadFrom source", d)
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{1}).Read(b)
	return b
}

// TestReadFrom: the proxy's path into a tunnel. The transport reads the app's socket
// itself; every byte arrives in order, and the app's FIN ends the request body (END_STREAM,
// a FIN upstream).
func TestReadFrom(t *testing.T) {
	for _, tc := range []struct {
		name     string
		readSize int
		pause    time.Duration
		chunk    int
	}{
		{"fast upstream", 256 << 10, 0, 1 << 20},
		// A slow upstream takes part of some frames from the read loop and leaves the rest
		// to the tunnel's goroutine: the two must not reorder bytes.
		{"pausing upstream", 64 << 10, 20 * time.Millisecond, 4 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up, res := hashUpstream(t, tc.readSize, tc.pause)
			c := openTunnel(t, up)
			app, client := tcpPair(t)
			data := randomBytes(8 << 20)
			go func() {
				// In pieces, so that frames come small (the read loop writes those to the
				// upstream itself) as well as large.
				for p := data; len(p) > 0; {
					k := min(len(p), tc.chunk)
					client.Write(p[:k])
					p = p[k:]
				}
				client.CloseWrite()
			}()
			n, err := c.(io.ReaderFrom).ReadFrom(app)
			if err != nil || n != int64(len(data)) {
				t.Fatalf("ReadFrom: %d, %v; want %d, nil", n, err, len(data))
			}
			wantHash(t, res, data)
			// The request body has ended: CloseWrite is a no-op, Write an error.
			if err := c.(halfCloser).CloseWrite(); err != nil {
				t.Errorf("CloseWrite after ReadFrom: %v", err)
			}
			if _, err := c.Write([]byte("late")); err == nil {
				t.Error("Write after ReadFrom succeeded")
			}
		})
	}
}

type halfCloser interface{ CloseWrite() error }

// TestReadFromSourceReset: a reset of the app's connection resets the stream, and the
// upstream sees a reset, not a FIN.
func TestReadFromSourceReset(t *testing.T) {
	up, res := hashUpstream(t, 32<<10, 0)
	c := openTunnel(t, up)
	app, client := tcpPair(t)
	go func() {
		client.Write([]byte("partial"))
		time.Sleep(50 * time.Millisecond)
		client.SetLinger(0)
		client.Close()
	}()
	_, err := c.(io.ReaderFrom).ReadFrom(app)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("ReadFrom: %v, want the source's ECONNRESET", err)
	}
	select {
	case r := <-res:
		if !errors.Is(r.err, syscall.ECONNRESET) {
			t.Fatalf("upstream read ended with %v after %d bytes, want ECONNRESET", r.err, r.n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("upstream not reset")
	}
}

// TestReadFromTunnelReset: when the upstream resets, ReadFrom returns a reset at once,
// although the transport is still blocked reading the idle app socket; Close does not wait
// for that read, and closing the app socket ends it.
func TestReadFromTunnelReset(t *testing.T) {
	up := newUpstream(t, "tcp4", func(c *net.TCPConn) {
		io.ReadFull(c, make([]byte, 5))
		c.SetLinger(0)
		c.Close()
	})
	e := newEnv(t, withEcho(up))
	goBase := goroutines()
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	watchdog(t, 20*time.Second, c)
	app, client := tcpPair(t)
	client.Write([]byte("hello")) // then idle: the transport waits in app.Read
	done := make(chan error, 1)
	go func() {
		_, err := c.(io.ReaderFrom).ReadFrom(app)
		done <- err
	}()
	select {
	case err := <-done:
		if !IsReset(err) {
			t.Fatalf("ReadFrom: %v, want a reset", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ReadFrom still running after the upstream reset")
	}
	closeWithin(t, c, 2*time.Second)
	app.Close()
	eventually(t, 10*time.Second, "the tunnel's goroutines to end", func() bool {
		return goroutines() <= goBase+3 // the pooled connection's own, at most
	})
}

// TestWriteDuringReadFrom: one source at a time.
func TestWriteDuringReadFrom(t *testing.T) {
	c := openTunnel(t, newUpstream(t, "tcp4", echo))
	app, client := tcpPair(t)
	done := make(chan error, 1)
	go func() {
		_, err := c.(io.ReaderFrom).ReadFrom(app)
		done <- err
	}()
	client.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q, %v", buf, err)
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("Write during ReadFrom succeeded")
	}
	client.CloseWrite()
	if err := <-done; err != nil {
		t.Fatalf("ReadFrom: %v", err)
	}
	if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
		t.Fatalf("after the echo's FIN: %q, %v", b, err)
	}
}

// stingyConn takes at most half of what the read loop offers it, and nothing every third
// time: the rest waits for the tunnel's goroutine, and later frames must queue behind it.
type stingyConn struct {
	*net.TCPConn
	raw            *rawio.Conn
	calls, partial atomic.Int64
}

func (s *stingyConn) TryWrite(p []byte) (int, error) {
	if s.calls.Add(1)%3 == 0 {
		return 0, nil
	}
	n, err := s.raw.TryWrite(p[:len(p)/2])
	if n < len(p) {
		s.partial.Add(1)
	}
	return n, err
}

// TestDirectDeliveryKeepsOrder: small frames the read loop writes partly itself, the rest
// through the tunnel's goroutine, arrive whole and in order.
func TestDirectDeliveryKeepsOrder(t *testing.T) {
	up, res := hashUpstream(t, 32<<10, 0)
	var stingy atomic.Pointer[stingyConn]
	dial := func(ctx context.Context, req Request) (net.Conn, int, error) {
		c, status, err := dialTCP(ctx, req)
		if err != nil {
			return nil, status, err
		}
		raw, err := rawio.NewConn(c.(*net.TCPConn))
		if err != nil {
			c.Close()
			return nil, 503, err
		}
		s := &stingyConn{TCPConn: c.(*net.TCPConn), raw: raw}
		stingy.Store(s)
		return s, status, nil
	}
	c := openTunnel(t, up, withDial(dial))
	data := randomBytes(2 << 20)
	for p := data; len(p) > 0; {
		k := min(len(p), 1000)
		if _, err := c.Write(p[:k]); err != nil {
			t.Fatal(err)
		}
		p = p[k:]
	}
	c.(halfCloser).CloseWrite()
	wantHash(t, res, data)
	s := stingy.Load()
	if s.calls.Load() == 0 || s.partial.Load() == 0 {
		t.Fatalf("the read loop offered the upstream %d writes, %d partly taken: the direct path was not exercised",
			s.calls.Load(), s.partial.Load())
	}
	t.Logf("%d direct writes offered, %d partly taken", s.calls.Load(), s.partial.Load())
}

// TestCloseDuringReadFrom: Close while ReadFrom waits on an idle source (CloseWrite meanwhile
// changes nothing) returns at once and ends ReadFrom; it does not wait for the source.
func TestCloseDuringReadFrom(t *testing.T) {
	c := openTunnel(t, newUpstream(t, "tcp4", echo))
	app, _ := tcpPair(t)
	done := make(chan error, 1)
	go func() {
		_, err := c.(io.ReaderFrom).ReadFrom(app)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond) // ReadFrom has handed the source over
	c.(halfCloser).CloseWrite()
	closeWithin(t, c, 2*time.Second)
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("ReadFrom ended without an error when the tunnel was closed under it")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadFrom still running after Close")
	}
	app.Close()
}
