package hbone

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// Flow control and backpressure: bulk transfers both ways, a stalled upstream that stalls
// only its own stream.

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
