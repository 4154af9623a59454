package hbone

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// Half-close and reset semantics (docs/hbone.md#connect): END_STREAM one way is FIN the other, RST_STREAM one
// way is TCP RST the other.

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

// TestResetAfterHalfClose: a client that half-closes, then resets, resets the upstream
// (docs/hbone.md#connect: RST_STREAM one way is a TCP RST the other) even when the upstream is quiet, and
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
