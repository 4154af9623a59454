package rawio

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// pair returns a raw Conn and the plain TCPConn at its other end, on loopback.
func pair(t *testing.T) (*Conn, *net.TCPConn) {
	t.Helper()
	l, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, _ := l.AcceptTCP()
		accepted <- c
	}()
	d, err := net.DialTCP("tcp4", nil, l.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	peer := <-accepted
	if peer == nil {
		t.Fatal("accept failed")
	}
	c, err := NewConn(d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); peer.Close() })
	return c, peer
}

func pattern(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{7, 9}).Read(b)
	return b
}

// TestBulkBothWays: more than the socket buffers hold, both ways, so that reads and
// writes meet EAGAIN and wait in the poller; every byte arrives in order.
func TestBulkBothWays(t *testing.T) {
	c, peer := pair(t)
	c.SetWriteBuffer(16 << 10)
	data := pattern(4 << 20)

	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(peer)
		got <- b
	}()
	if n, err := c.Write(data); err != nil || n != len(data) {
		t.Fatalf("Write: %d, %v", n, err)
	}
	c.CloseWrite()
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatalf("peer read %d bytes, not what was written", len(b))
	}

	go func() {
		peer.Write(data)
		peer.CloseWrite()
	}()
	h := sha256.New()
	buf := make([]byte, 1500) // small reads: many of them
	var n int
	for {
		k, err := c.Read(buf)
		h.Write(buf[:k])
		n += k
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("Read after %d bytes: %v", n, err)
		}
	}
	if want := sha256.Sum256(data); n != len(data) || !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatalf("read %d bytes, not what the peer wrote", n)
	}
}

func TestReadErrors(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		c, _ := pair(t)
		c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		_, err := c.Read(make([]byte, 10))
		var ne net.Error
		if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("Read: %v, want a timeout", err)
		}
	})
	t.Run("close while reading", func(t *testing.T) {
		c, _ := pair(t)
		done := make(chan error, 1)
		go func() {
			_, err := c.Read(make([]byte, 10))
			done <- err
		}()
		time.Sleep(20 * time.Millisecond)
		c.Close()
		select {
		case err := <-done:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Read: %v, want net.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not end a blocked Read")
		}
	})
	t.Run("reset", func(t *testing.T) {
		c, peer := pair(t)
		peer.SetLinger(0)
		peer.Close()
		_, err := c.Read(make([]byte, 10))
		var op *net.OpError
		if !errors.Is(err, syscall.ECONNRESET) || !errors.As(err, &op) || op.Op != "read" {
			t.Fatalf("Read: %v, want a read OpError with ECONNRESET", err)
		}
		// Writing to a reset connection fails too.
		if _, err := c.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("Write: %v, want EPIPE or ECONNRESET", err)
		}
	})
}

// TestTryWriteDoesNotWait: on a full socket TryWrite returns what fit, at once.
func TestTryWriteDoesNotWait(t *testing.T) {
	c, peer := pair(t)
	c.SetWriteBuffer(8 << 10)
	peer.SetReadBuffer(8 << 10)
	data := pattern(512 << 10)
	start := time.Now()
	n, err := c.TryWrite(data)
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 || n >= len(data) {
		t.Fatalf("TryWrite wrote %d of %d bytes into small buffers", n, len(data))
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("TryWrite took %v", d)
	}
	// Full now: nothing more fits, still no wait, no error.
	if k, err := c.TryWrite(data[n:]); err != nil || n+k >= len(data) {
		t.Fatalf("second TryWrite: %d, %v", k, err)
	} else {
		n += k
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(peer)
		got <- b
	}()
	if _, err := c.Write(data[n:]); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if !bytes.Equal(<-got, data) {
		t.Fatal("the peer did not read what TryWrite and Write wrote, in order")
	}
}

// TestCopyThroughConn: io.Copy into and out of a Conn goes through its Read and Write,
// not the TCPConn's splice paths, and moves every byte.
func TestCopyThroughConn(t *testing.T) {
	c, peer := pair(t)
	data := pattern(4 << 20)
	go func() {
		peer.Write(data)
		peer.CloseWrite()
	}()
	var out bytes.Buffer
	if n, err := io.Copy(&out, c); err != nil || n != int64(len(data)) || !bytes.Equal(out.Bytes(), data) {
		t.Fatalf("io.Copy out of Conn: %d, %v", n, err)
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(peer)
		got <- b
	}()
	if n, err := io.Copy(c, bytes.NewReader(data)); err != nil || n != int64(len(data)) {
		t.Fatalf("io.Copy into Conn: %d, %v", n, err)
	}
	c.CloseWrite()
	if !bytes.Equal(<-got, data) {
		t.Fatal("peer read differs")
	}
}

// TestNoAllocations: a Conn's Read, Write and TryWrite allocate nothing (the proxy calls
// them per packet; garbage there is GC work in the latency tail).
func TestNoAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's annotations allocate")
	}
	c, peer := pair(t)
	msg, buf := []byte("0123456789"), make([]byte, 64)
	for name, fn := range map[string]func() (int, error){
		"Write":    func() (int, error) { return c.Write(msg) },
		"TryWrite": func() (int, error) { return c.TryWrite(msg) },
	} {
		allocs := testing.AllocsPerRun(100, func() {
			if n, err := fn(); n != len(msg) || err != nil {
				t.Fatalf("%s: %d, %v", name, n, err)
			}
			if _, err := io.ReadFull(peer, buf[:len(msg)]); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per call, want 0", name, allocs)
		}
	}
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := peer.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf[:len(msg)]); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("Read: %v allocations per call, want 0", allocs)
	}
}
