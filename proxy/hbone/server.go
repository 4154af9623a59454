package hbone

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Request is one CONNECT the server has accepted for dialing.
type Request struct {
	Authority  netip.AddrPort      // :authority, the target pod ip:port
	Forwarded  string              // the forwarded header as sent (see ParseForwardedFor)
	PeerTLS    tls.ConnectionState // the HBONE connection's TLS state: the peer's certificate chain
	RemoteAddr net.Addr            // the HBONE connection's TCP peer
	Header     http.Header         // the request's regular header fields
}

// Dialer decides and connects one tunnel. It returns the upstream connection, or a status
// (400, 401, 503) and an error for the log. ctx is cancelled when the client resets the
// stream or the connection dies. A returned connection that has CloseWrite() error and
// SetLinger(int) error (as *net.TCPConn has) gets half-close and reset propagation; wrappers
// should forward both. The server closes it exactly once, when the tunnel ends.
type Dialer func(ctx context.Context, req Request) (net.Conn, int, error)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("hbone: server closed")

// ErrHandshakeLimit is what OnHandshakeError hears of a connection closed unhandshaken
// because the server's or the node's limit on TLS handshakes was reached.
var ErrHandshakeLimit = errors.New("hbone: too many TLS handshakes in flight")

// Defaults of the handshake limits (Server.MaxHandshakes, NewLimiter for the node's).
const (
	DefaultMaxHandshakes    = 128  // per server (pod)
	DefaultNodeHandshakes   = 1024 // shared by a node's servers
	defaultHandshakeTimeout = 5 * time.Second
	// handshakeWait is how long an accepted connection may wait for a handshake slot: a
	// burst of real clients (whose handshakes take milliseconds) gets through; a flood's
	// excess is closed.
	handshakeWait = time.Second
)

// Limiter bounds TLS handshakes in flight, for one Server (Server.MaxHandshakes) or shared
// by several (Server.Handshakes: a node's pods). A connection takes a slot before its
// handshake starts and gives it back when the handshake ends. When every slot is taken, as
// many connections again may wait for one, for a short while (handshakeWait); any more, and
// those whose wait runs out, are closed at once. So n slots hold at most 2n sockets.
type Limiter struct {
	slots   chan struct{}
	waiting atomic.Int64
}

// NewLimiter returns a limiter of n handshakes in flight (n <= 0: DefaultNodeHandshakes).
func NewLimiter(n int) *Limiter {
	if n <= 0 {
		n = DefaultNodeHandshakes
	}
	return &Limiter{slots: make(chan struct{}, n)}
}

// InUse is the number of handshakes holding a slot.
func (l *Limiter) InUse() int { return len(l.slots) }

// acquire takes a slot, waiting until deadline (the zero time: not at all) or stop; false
// when none came.
func (l *Limiter) acquire(deadline time.Time, stop <-chan struct{}) bool {
	select {
	case l.slots <- struct{}{}:
		return true
	default:
	}
	if deadline.IsZero() {
		return false
	}
	if l.waiting.Add(1) > int64(cap(l.slots)) {
		l.waiting.Add(-1)
		return false
	}
	defer l.waiting.Add(-1)
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case l.slots <- struct{}{}:
		return true
	case <-t.C:
	case <-stop:
	}
	return false
}

func (l *Limiter) release() { <-l.slots }

// Server accepts HBONE connections: TLS first, then HTTP/2 CONNECT streams.
type Server struct {
	TLS  *tls.Config // must require a client certificate; TLS 1.3 and ALPN h2 are enforced
	Dial Dialer
	Log  *slog.Logger // nil: slog.Default()

	MaxConcurrentStreams uint32        // per connection; 0: 100
	ReadIdleTimeout      time.Duration // PING after this long without a frame; 0: 10 s
	PingTimeout          time.Duration // close when the PING is not answered in time; 0: 20 s
	HandshakeTimeout     time.Duration // TLS handshake plus HTTP/2 preface; 0: 5 s

	// TLS handshakes in flight are bounded: MaxHandshakes on this server (0:
	// DefaultMaxHandshakes), and Handshakes, when set, across every server sharing it (a
	// node's). See Limiter for what happens at the limit.
	MaxHandshakes int
	Handshakes    *Limiter

	// OnHandshakeError, when set, hears of every connection whose TLS handshake fails
	// (no, untrusted or foreign client certificate, TLS version, ALPN, timeout, a client
	// that leaves before its hello), except those a shutdown cuts: a counter's hook, since
	// the log says it at Debug only (anyone can make them).
	OnHandshakeError func(err error)

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	raw       map[net.Conn]struct{} // accepted, waiting for or in the TLS handshake
	closed    bool
	done      chan struct{} // closed with closed: ends waits for a handshake slot
	own       *Limiter      // MaxHandshakes
	handlers  atomic.Int64  // running tunnels, across connections
}

func (s *Server) logger() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

func (s *Server) maxStreams() uint32 {
	if s.MaxConcurrentStreams > 0 {
		return s.MaxConcurrentStreams
	}
	return defaultMaxStreams
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// tlsConfig checks the caller's configuration and pins what docs/hbone.md#tls requires.
func (s *Server) tlsConfig() (*tls.Config, error) {
	if s.TLS == nil {
		return nil, errors.New("hbone: Server.TLS is nil")
	}
	if s.Dial == nil {
		return nil, errors.New("hbone: Server.Dial is nil")
	}
	if s.TLS.GetConfigForClient == nil && s.TLS.ClientAuth != tls.RequireAnyClientCert &&
		s.TLS.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, fmt.Errorf("hbone: Server.TLS.ClientAuth is %v: HBONE requires a client certificate", s.TLS.ClientAuth)
	}
	c := s.TLS.Clone()
	if c.MinVersion < tls.VersionTLS13 {
		c.MinVersion = tls.VersionTLS13
	}
	c.NextProtos = []string{"h2"}
	c.DynamicRecordSizingDisabled = true // a tunnel wants few, full records
	return c, nil
}

// Serve accepts connections on l until l fails or the server shuts down. Each connection
// completes its TLS handshake before HTTP/2 starts.
func (s *Server) Serve(l net.Listener) error {
	conf, err := s.tlsConfig()
	if err != nil {
		return err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	if s.listeners == nil {
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[*serverConn]struct{})
		s.raw = make(map[net.Conn]struct{})
		s.done = make(chan struct{})
		s.own = NewLimiter(cmp.Or(s.MaxHandshakes, DefaultMaxHandshakes))
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			// Out of descriptors and the like: wait and retry, as net/http does.
			if isTemporary(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Warn("hbone: accept failed; retrying", "err", err, "delay", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("hbone: accept: %w", err)
		}
		backoff = 0
		if !s.track(c) {
			c.Close()
			return ErrServerClosed
		}
		go s.handshake(c, conf)
	}
}

// isTemporary reports the accept errors worth a retry (EMFILE, ENFILE, ECONNABORTED...).
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.raw[c] = struct{}{}
	return true
}

// admit takes the handshake slots a connection needs: the node's first, so that the node's
// limit bounds every socket waiting for either; false when the connection must be closed.
func (s *Server) admit() (release func(), ok bool) {
	deadline := time.Now().Add(handshakeWait)
	node := s.Handshakes
	if node != nil && !node.acquire(deadline, s.done) {
		return nil, false
	}
	if !s.own.acquire(deadline, s.done) {
		if node != nil {
			node.release()
		}
		return nil, false
	}
	return func() {
		s.own.release()
		if node != nil {
			node.release()
		}
	}, true
}

func (s *Server) handshake(c net.Conn, conf *tls.Config) {
	release, ok := s.admit()
	if !ok {
		s.mu.Lock()
		delete(s.raw, c)
		closed := s.closed
		s.mu.Unlock()
		c.Close()
		if !closed && s.OnHandshakeError != nil {
			s.OnHandshakeError(ErrHandshakeLimit)
		}
		return
	}
	log := s.logger().With("peer", c.RemoteAddr().String())
	cc := newBufConn(c)
	tc := tls.Server(cc, conf)
	timeout := orDefault(s.HandshakeTimeout, defaultHandshakeTimeout)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	// docs/hbone.md#go-http2-library-pitfalls: the handshake is finished before HTTP/2 looks at the connection.
	err := tc.HandshakeContext(ctx)
	cancel()
	release()
	if err == nil {
		err = checkServerState(tc.ConnectionState())
	}
	s.mu.Lock()
	delete(s.raw, c)
	closed := s.closed
	var sc *serverConn
	if err == nil && !closed {
		sc = newServerConn(s, tc, cc, log)
		s.conns[sc] = struct{}{}
	}
	s.mu.Unlock()
	if sc == nil {
		if err != nil && !closed { // a shutdown's own closing is no failure
			log.Debug("hbone: TLS handshake failed", "err", err)
			if s.OnHandshakeError != nil {
				s.OnHandshakeError(err)
			}
		}
		tc.Close()
		return
	}
	sc.serve(timeout)
	s.mu.Lock()
	delete(s.conns, sc)
	s.mu.Unlock()
}

// checkServerState enforces docs/hbone.md#tls whatever the configuration let through (GetConfigForClient
// may hand out another config).
func checkServerState(st tls.ConnectionState) error {
	switch {
	case st.Version != tls.VersionTLS13:
		return fmt.Errorf("hbone: TLS version %s, want TLS 1.3", tls.VersionName(st.Version))
	case st.NegotiatedProtocol != "h2":
		return fmt.Errorf("hbone: ALPN %q, want h2", st.NegotiatedProtocol)
	case len(st.PeerCertificates) == 0:
		return errors.New("hbone: no client certificate")
	}
	return nil
}

// Shutdown stops accepting, tells every connection to go away (GOAWAY: no new streams), lets
// open tunnels run until they end or ctx is done, then closes what is left. It returns
// ctx.Err() when tunnels had to be cut.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closeLocked()
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.raw {
		c.Close()
	}
	conns := make([]*serverConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	for _, sc := range conns {
		sc.shutdown()
	}

	// Poll, as net/http does: connections and tunnels end on their own schedule.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if s.idle() {
			return nil
		}
		select {
		case <-ctx.Done():
			s.closeAll()
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// Close closes the listeners and every connection at once; tunnels are reset.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closeLocked()
	for l := range s.listeners {
		l.Close()
	}
	s.mu.Unlock()
	s.closeAll()
	return nil
}

func (s *Server) closeLocked() {
	if !s.closed && s.done != nil {
		close(s.done)
	}
	s.closed = true
}

func (s *Server) closeAll() {
	s.mu.Lock()
	for c := range s.raw {
		c.Close()
	}
	conns := make([]*serverConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	for _, sc := range conns {
		// The raw socket: the TLS close would first try to send close_notify, behind a
		// write stuck on a peer that stopped reading (5 s per connection, one after another).
		sc.raw.Close() // the read loop fails and tears the connection down
	}
}

func (s *Server) idle() bool {
	s.mu.Lock()
	n := len(s.conns) + len(s.raw)
	s.mu.Unlock()
	return n == 0 && s.handlers.Load() == 0
}
