package hbone

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The Pool's connections: tunnels sharing one, stream limits, idle, dead and stale
// connections, ForgetSource.

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
