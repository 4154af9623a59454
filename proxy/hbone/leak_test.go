package hbone

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// settle waits until the goroutine and descriptor counts are back at (or below) their
// baselines; goroutines of closed connections take a moment to notice. No GC here: socket
// finalizers would close leaked descriptors and hide the leak.
func settle(t *testing.T, what string, goBase, fdBase int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		g, fd := goroutines(), numFDs(t)
		if g <= goBase && fd <= fdBase {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d goroutines (baseline %d), %d fds (baseline %d)\n%s", what, g, goBase, fd, fdBase, stacks())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestNoLeaks opens and ends tunnels every way a tunnel ends (in order, client reset,
// upstream reset, refused) and checks that nothing per tunnel is left: goroutines and file
// descriptors return to the level of an idle pooled connection, and to the level before
// the server existed once everything is closed.
func TestNoLeaks(t *testing.T) {
	goStart, fdStart := goroutines(), numFDs(t)
	func() {
		resetter := newUpstream(t, "tcp4", func(c *net.TCPConn) {
			io.ReadFull(c, make([]byte, 1))
			c.SetLinger(0)
		})
		silent := newUpstream(t, "tcp4", func(c *net.TCPConn) { io.Copy(io.Discard, c) })
		e := newEnv(t)
		ctx := testCtx(t, 30*time.Second)

		// Warm up: one pooled connection, one server connection.
		c, err := e.connect(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := exchange(c, []byte("warm")); err != nil {
			t.Fatal(err)
		}
		c.Close()
		time.Sleep(50 * time.Millisecond)
		goBase, fdBase := goroutines(), numFDs(t)

		for batch := 0; batch < 3 && !t.Failed(); batch++ {
			runBatch(t, e, ctx, resetter.addr, silent.addr)
			// Beyond 100 tunnels in flight the pool rightly adds connections; each idle one
			// costs 3 goroutines (client read loop, server read loop and writer) and 2 fds.
			extra := e.pool.numConns(e.key) - 1
			settle(t, fmt.Sprintf("after batch %d of tunnels", batch), goBase+3*extra, fdBase+2*extra)
		}
		if t.Failed() {
			return
		}

		// And everything else goes away with the pool, the server and the upstreams.
		e.pool.Close()
		ctxS, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.srv.Shutdown(ctxS); err != nil {
			t.Fatal(err)
		}
		e.echo.close()
		resetter.close()
		silent.close()
	}()
	if !t.Failed() {
		settle(t, "after everything closed", goStart, fdStart)
	}
}

// runBatch runs 160 tunnels at once, 40 of each ending.
func runBatch(t *testing.T, e *env, ctx context.Context, resetter, silent netip.AddrPort) {
	const rounds = 40
	var wg sync.WaitGroup
	for i := 0; i < rounds; i++ {
		wg.Add(4)
		go func() { // in order, both ways
			defer wg.Done()
			c, err := e.connect(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			if err := exchange(c, bytes.Repeat([]byte("a"), 100<<10)); err != nil {
				t.Error(err)
			}
		}()
		go func() { // the client resets mid-stream
			defer wg.Done()
			c, err := e.connectTo(ctx, silent)
			if err != nil {
				t.Error(err)
				return
			}
			c.Write(make([]byte, 10<<10))
			c.Close()
		}()
		go func() { // the upstream resets
			defer wg.Done()
			c, err := e.connectTo(ctx, resetter)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.Write([]byte("x"))
			io.Copy(io.Discard, c)
		}()
		go func() { // refused: upstream connect fails
			defer wg.Done()
			if c, err := e.connectTo(ctx, closedAddr(t)); err == nil {
				c.Close()
				t.Error("connect to a closed port succeeded")
			}
		}()
	}
	wg.Wait()
}

var (
	closedOnce sync.Once
	closedAP   string
)

// closedAddr is a loopback port with nothing listening.
func closedAddr(t testing.TB) netip.AddrPort {
	closedOnce.Do(func() {
		l := listen(t, "tcp4")
		closedAP = l.Addr().String()
		l.Close()
	})
	return netip.MustParseAddrPort(closedAP)
}
