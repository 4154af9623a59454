package hbone

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestClientTeardownWaitsForBatchBeforeWriteReturns: a bulk Write whose first frame is in a
// batch held in the socket write, waiting for window for the rest, when the connection is
// torn down: Write must not return (nor ReadFrom give its buffers back) while that batch
// still reads its bytes. The marker queued after wstop used to signal at once.
func TestClientTeardownWaitsForBatchBeforeWriteReturns(t *testing.T) {
	var g *gatedConn
	x := newXNetPeer(t, &http2.Server{MaxUploadBufferPerStream: 65535}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-r.Context().Done() // reads nothing: no window comes back
	})
	x.pool.Dial = func(ctx context.Context, key PoolKey) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", key.Dst.String())
		if err != nil {
			return nil, err
		}
		g = &gatedConn{Conn: c, gate: make(chan struct{}), gated: make(chan struct{})}
		return g, nil
	}
	a, err := x.pool.Connect(testCtx(t, 10*time.Second), x.key, netip.MustParseAddrPort("10.0.0.9:8080"), nil)
	if err != nil {
		t.Fatal(err)
	}
	cc := a.(*clientConn).pc.cc
	p := make([]byte, 256<<10) // bulk: the lazy writer writes it
	g.armed.Store(true)
	wdone := make(chan error, 1)
	go func() { _, err := a.Write(p); wdone <- err }()
	<-g.gated // the first 64 KiB are held in the socket write; Write waits for window
	time.Sleep(50 * time.Millisecond)
	g.Conn.SetReadDeadline(time.Unix(1, 0)) // the read loop fails: teardown
	eventually(t, 5*time.Second, "teardown", func() bool { return cc.State().Closed })
	select {
	case err := <-wdone:
		close(g.gate)
		t.Fatalf("Write returned (%v) while its frame was still held in the socket write: p is still referenced", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(g.gate)
	<-wdone
}

// TestClientDroppedDataReturnsConnWindow: DATA charged to the connection's send window and
// then dropped from the queue unsent (its stream closed) never reaches the server, which
// never returns that window: the client gives it back itself, or the connection's window
// shrinks for good and every other tunnel on it stalls.
func TestClientDroppedDataReturnsConnWindow(t *testing.T) {
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
	bdone := make(chan error, 1)
	go func() { _, err := b.Write([]byte("bbbb")); bdone <- err }() // its batch is held
	<-g.gated
	go a.Write(make([]byte, 4<<20)) // queued behind b's batch: the whole connection window
	eventually(t, 5*time.Second, "a's frames queued", func() bool {
		cc.mu.Lock()
		defer cc.mu.Unlock()
		return cc.sendWindow <= 0
	})
	a.Close() // reset: a's queued DATA is dropped, never sent
	close(g.gate)
	if err := <-bdone; err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := b.Write([]byte("x")); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		cc.mu.Lock()
		w := cc.sendWindow
		cc.mu.Unlock()
		t.Fatalf("b.Write stalls: connection send window %d, the dropped DATA's credit lost", w)
	}
}
