package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// PoolKey says which HBONE connections may carry a tunnel (docs/hbone.md#http2-settings-and-pooling): same source
// identity, same expected destination identity, same destination ip:15008, same source ip.
type PoolKey struct {
	SrcID, DstID string
	Dst          netip.AddrPort // the destination's HBONE address, ip:15008
	SrcIP        netip.Addr
}

// ErrPoolClosed is returned by Connect after Close.
var ErrPoolClosed = errors.New("hbone: pool closed")

// Pool opens HBONE tunnels over pooled HTTP/2 connections.
type Pool struct {
	// Dial opens the TCP connection of key (from the right namespace, with the right mark).
	Dial func(ctx context.Context, key PoolKey) (net.Conn, error)
	// TLSConfig is the client configuration for key: the certificate of key.SrcID, the
	// server checked against key.DstID. The pool enforces TLS 1.3 and ALPN h2.
	TLSConfig func(key PoolKey) (*tls.Config, error)

	MaxStreams  int           // tunnels in flight per connection before another is opened; 0: 100
	IdleTimeout time.Duration // a connection without tunnels is closed after this; 0: 5 min
	Log         *slog.Logger  // nil: slog.Default()

	// ReadIdleTimeout and PingTimeout tune the PING health check; 0: 10 s and 20 s.
	ReadIdleTimeout, PingTimeout time.Duration

	initOnce sync.Once
	mu       sync.Mutex
	conns    map[PoolKey][]*poolConn
	limits   map[PoolKey]int // the server's MAX_CONCURRENT_STREAMS, once seen, if below MaxStreams
	closed   bool
	dials    sync.WaitGroup
}

// poolConn is one HTTP/2 connection, or a dial in progress. Fields after ready are guarded
// by Pool.mu, except cc, tc and err, which are written once before ready is closed.
type poolConn struct {
	key   PoolKey
	ready chan struct{}
	cc    *h2Client
	tc    *tls.Conn
	err   error

	streams    int // tunnels reserved or in flight, counted here (cc counts streams open on the wire)
	waiters    int // Connect calls waiting for the dial
	cancelDial context.CancelFunc
	idle       *time.Timer
	removed    bool
}

func (p *Pool) logger() *slog.Logger {
	if p.Log != nil {
		return p.Log
	}
	return slog.Default()
}

func (p *Pool) maxStreams() int {
	if p.MaxStreams > 0 {
		return p.MaxStreams
	}
	return defaultMaxStreams
}

func (p *Pool) init() {
	p.initOnce.Do(func() {
		p.conns = make(map[PoolKey][]*poolConn)
		p.limits = make(map[PoolKey]int)
	})
}

// Connect opens one tunnel to authority (pod ip:port) through the destination of key. It
// returns once the server answered 200, which it sends only after its upstream connect
// succeeded; any other status is a *StatusError. hdr carries forwarded, baggage and
// traceparent. ctx bounds the dial and the CONNECT, not the tunnel.
func (p *Pool) Connect(ctx context.Context, key PoolKey, authority netip.AddrPort, hdr http.Header) (net.Conn, error) {
	if !authority.IsValid() || authority.Port() == 0 {
		return nil, fmt.Errorf("hbone: bad authority %v", authority)
	}
	p.init()
	h := hdr.Clone()
	if h == nil {
		h = make(http.Header)
	}
	var lastErr error
	for attempt := 0; attempt < 4; attempt++ {
		pc, fresh, err := p.acquire(ctx, key)
		if err != nil {
			return nil, err
		}
		c, err := p.roundTrip(ctx, pc, authority, h)
		if err == nil {
			return c, nil
		}
		lastErr = err
		var se *StatusError
		code, isStreamErr := streamErrCode(err)
		refused := isStreamErr && code == http2.ErrCodeRefusedStream
		if refused {
			// Beyond the server's stream limit: remember it for this key.
			p.learnLimit(pc)
		}
		p.release(pc)
		// REFUSED_STREAM was not processed (RFC 9113 §8.7): retry. A pooled connection may
		// have died or gone away since it was last used: one retry. Any other error of a
		// fresh connection is the answer.
		if errors.As(err, &se) || ctx.Err() != nil || !refused && (fresh || attempt > 0) {
			break
		}
		p.logger().Debug("hbone: retrying CONNECT", "dst", key.Dst.String(), "err", err)
	}
	return nil, lastErr
}

// errConnFull: the connection a caller waited for turned out full once its SETTINGS came
// (the server allows fewer streams than MaxStreams); look again.
var errConnFull = errors.New("hbone: connection full")

// acquire reserves a stream slot on a usable connection for key, dialing one if needed.
// fresh reports whether this call started the dial.
func (p *Pool) acquire(ctx context.Context, key PoolKey) (pc *poolConn, fresh bool, err error) {
	for range 8 {
		pc, fresh, err = p.acquireOnce(ctx, key)
		if !errors.Is(err, errConnFull) {
			return pc, fresh, err
		}
	}
	return nil, false, fmt.Errorf("hbone: no connection to %v with a free stream: %w", key.Dst, err)
}

// learnLimit records the server's stream limit for c's key when it is below MaxStreams, so
// that no more callers wait for a new connection than it will take.
func (p *Pool) learnLimit(c *poolConn) {
	m := int(c.cc.State().MaxConcurrentStreams)
	if m == 0 || m >= p.maxStreams() {
		return
	}
	p.mu.Lock()
	if !c.removed {
		p.limits[c.key] = m
	}
	p.mu.Unlock()
}

func (p *Pool) acquireOnce(ctx context.Context, key PoolKey) (pc *poolConn, fresh bool, err error) {
	p.mu.Lock()
	limit := p.maxStreams()
	if l := p.limits[key]; l > 0 {
		limit = l
	}
	if p.closed {
		p.mu.Unlock()
		return nil, false, ErrPoolClosed
	}
	list := p.conns[key]
	for i := 0; i < len(list); i++ {
		c := list[i]
		select {
		case <-c.ready:
		default:
			// Dialing: join it while it has room.
			if c.streams < limit {
				c.streams++
				c.waiters++
				p.mu.Unlock()
				return p.awaitDial(ctx, c, false)
			}
			continue
		}
		if c.err != nil {
			continue // failed dial; its dialer removes it
		}
		if c.streams >= limit {
			continue
		}
		// reserve checks the connection's own count of streams open on the wire and claims
		// a slot in one step.
		if !c.cc.reserve() {
			if st := c.cc.State(); st.Closed || st.Closing {
				if c.streams == 0 {
					p.removeLocked(c)
					i--
					list = p.conns[key]
					go c.cc.Close()
				}
			}
			continue
		}
		c.streams++
		if c.idle != nil {
			c.idle.Stop()
			c.idle = nil
		}
		p.mu.Unlock()
		return c, false, nil
	}
	// Nothing usable: dial another.
	dctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c := &poolConn{key: key, ready: make(chan struct{}), streams: 1, waiters: 1, cancelDial: cancel}
	p.conns[key] = append(p.conns[key], c)
	p.dials.Add(1)
	p.mu.Unlock()
	go p.dial(dctx, c)
	return p.awaitDial(ctx, c, true)
}

// awaitDial waits for c's dial; a caller that gives up frees its slot, and the dial is
// cancelled when nobody waits for it any more.
func (p *Pool) awaitDial(ctx context.Context, c *poolConn, fresh bool) (*poolConn, bool, error) {
	select {
	case <-c.ready:
	case <-ctx.Done():
		p.mu.Lock()
		c.waiters--
		select {
		case <-c.ready:
			// Finished meanwhile: the slot goes back like any other.
			p.releaseLocked(c)
		default:
			c.streams--
			if c.waiters == 0 {
				c.cancelDial()
			}
		}
		p.mu.Unlock()
		return nil, fresh, fmt.Errorf("hbone: waiting for connection to %v: %w", c.key.Dst, ctx.Err())
	}
	p.mu.Lock()
	c.waiters--
	if c.err != nil {
		c.streams--
		p.mu.Unlock()
		return nil, fresh, c.err
	}
	ok := c.cc.reserve()
	if !ok {
		p.releaseLocked(c)
		st := c.cc.State()
		if m := int(st.MaxConcurrentStreams); m > 0 && m < p.maxStreams() && !c.removed {
			p.limits[c.key] = m
		}
		p.mu.Unlock()
		if st.Closed || st.Closing {
			return nil, fresh, fmt.Errorf("hbone: new connection to %v unusable", c.key.Dst)
		}
		return nil, fresh, errConnFull
	}
	p.mu.Unlock()
	return c, fresh, nil
}

func (p *Pool) dial(ctx context.Context, c *poolConn) {
	defer p.dials.Done()
	defer c.cancelDial()
	tc, bc, err := p.dialTLS(ctx, c.key)
	var cc *h2Client
	if err == nil {
		cc = newH2Client(tc, bc, orDefault(p.ReadIdleTimeout, defaultReadIdle), orDefault(p.PingTimeout, defaultPingTimeout), p.logger(),
			func() { p.retire(c) })
		// Wait for the server's SETTINGS: until then its stream limit is unknown, and
		// reservations made on a guess would be refused later. This also turns a rejected
		// client certificate into a dial error.
		if werr := cc.waitSettings(ctx); werr != nil {
			cc.Close()
			cc, err = nil, fmt.Errorf("waiting for the server's SETTINGS: %w", werr)
		}
	}
	if err != nil {
		err = fmt.Errorf("hbone: connecting to %v (%s): %w", c.key.Dst, c.key.DstID, err)
		p.logger().Debug("hbone: dial failed", "dst", c.key.Dst.String(), "err", err)
	}
	p.mu.Lock()
	closed := p.closed
	if err == nil && closed {
		err = ErrPoolClosed
	}
	c.cc, c.tc, c.err = cc, tc, err
	if err != nil {
		p.removeLocked(c)
	} else if c.streams == 0 {
		p.idleLocked(c) // every waiter gave up, yet the dial made it
	}
	close(c.ready)
	p.mu.Unlock()
	if closed && cc != nil {
		cc.Close()
	}
}

// retire takes c out of the pool when its connection takes no more streams (GOAWAY, or its
// end) and no tunnel uses it: otherwise it would linger, listed, until a Connect for its key
// came by. With tunnels, the last one's release retires it (idleLocked).
func (p *Pool) retire(c *poolConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-c.ready:
	default:
		return // still dialing: the dial's end looks at the connection's state
	}
	if c.streams == 0 && !c.removed && c.cc != nil {
		p.removeLocked(c)
		go c.cc.Close()
	}
}

// dialTLS opens and handshakes one connection for key: tc over a buffered, corked socket.
func (p *Pool) dialTLS(ctx context.Context, key PoolKey) (tc *tls.Conn, bc *bufConn, err error) {
	if p.Dial == nil || p.TLSConfig == nil {
		return nil, nil, errors.New("Pool.Dial or Pool.TLSConfig is nil")
	}
	conf, err := p.TLSConfig(key)
	if err != nil {
		return nil, nil, err
	}
	conf = conf.Clone()
	conf.MinVersion, conf.MaxVersion = tls.VersionTLS13, tls.VersionTLS13
	conf.NextProtos = []string{"h2"}
	// Small first records help a browser render early; a tunnel wants few, full ones.
	conf.DynamicRecordSizingDisabled = true
	raw, err := p.Dial(ctx, key)
	if err != nil {
		return nil, nil, err
	}
	bc = newBufConn(raw)
	tc = tls.Client(bc, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("TLS handshake: %w", err)
	}
	if proto := tc.ConnectionState().NegotiatedProtocol; proto != "h2" {
		raw.Close()
		return nil, nil, fmt.Errorf("ALPN %q, want h2", proto)
	}
	return tc, bc, nil
}

// roundTrip sends the CONNECT on pc and waits for the response headers.
func (p *Pool) roundTrip(ctx context.Context, pc *poolConn, authority netip.AddrPort, h http.Header) (net.Conn, error) {
	a := authority.String()
	st, err := pc.cc.roundTrip(ctx, a, h)
	if err != nil {
		var se *StatusError
		if errors.As(err, &se) {
			return nil, err
		}
		return nil, fmt.Errorf("hbone: CONNECT %s via %v: %w", a, pc.key.Dst, err)
	}
	return newClientConn(p, pc, st, net.TCPAddrFromAddrPort(authority)), nil
}

// release frees a stream slot.
func (p *Pool) release(c *poolConn) {
	p.mu.Lock()
	p.releaseLocked(c)
	p.mu.Unlock()
}

// releaseLocked frees a stream slot; a connection left without tunnels starts its idle
// timer, or is closed at once when it cannot take more.
func (p *Pool) releaseLocked(c *poolConn) {
	c.streams--
	if c.streams == 0 && c.cc != nil {
		p.idleLocked(c)
	}
}

func (p *Pool) idleLocked(c *poolConn) {
	// Closing covers GOAWAY received; a connection merely full (resets awaiting their PING
	// acknowledgement) is kept.
	if st := c.cc.State(); p.closed || c.removed || st.Closed || st.Closing {
		p.removeLocked(c)
		go c.cc.Close()
		return
	}
	idle := p.IdleTimeout
	if idle <= 0 {
		idle = defaultIdleTimeout
	}
	if c.idle != nil {
		c.idle.Stop()
	}
	c.idle = time.AfterFunc(idle, func() {
		p.mu.Lock()
		if c.streams > 0 || c.removed {
			p.mu.Unlock()
			return
		}
		p.removeLocked(c)
		p.mu.Unlock()
		p.logger().Debug("hbone: closing idle connection", "dst", c.key.Dst.String())
		c.cc.Close()
	})
}

func (p *Pool) removeLocked(c *poolConn) {
	if c.removed {
		return
	}
	c.removed = true
	if c.idle != nil {
		c.idle.Stop()
		c.idle = nil
	}
	list := p.conns[c.key]
	for i, x := range list {
		if x == c {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(p.conns, c.key)
		delete(p.limits, c.key) // learnt again if it still applies
	} else {
		p.conns[c.key] = list
	}
}

// Close closes every pooled connection; tunnels on them are reset. Connect fails afterwards.
func (p *Pool) Close() error {
	p.init()
	p.mu.Lock()
	p.closed = true
	var ccs []*h2Client
	for _, list := range p.conns {
		for _, c := range list {
			select {
			case <-c.ready:
				if c.cc != nil {
					ccs = append(ccs, c.cc)
				}
			default:
				c.cancelDial()
			}
			if c.idle != nil {
				c.idle.Stop()
				c.idle = nil
			}
			c.removed = true
		}
	}
	clear(p.conns)
	clear(p.limits)
	p.mu.Unlock()
	for _, cc := range ccs {
		cc.Close()
	}
	p.dials.Wait()
	return nil
}

// ForgetSource stops handing out the connections dialled for source IP ip: a pod removed,
// or its sandbox recreated, and those connections live in a namespace that is going away
// (the same pod in a new namespace must not tunnel through them). Their open tunnels
// finish; each connection closes with its last.
func (p *Pool) ForgetSource(ip netip.Addr) {
	ip = ip.Unmap()
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, list := range p.conns {
		if key.SrcIP.Unmap() != ip {
			continue
		}
		for _, c := range slices.Clone(list) {
			p.removeLocked(c)
			if c.streams == 0 && c.cc != nil {
				go c.cc.Close()
			}
		}
	}
}

// numConns is the number of pooled connections (dialing included), for tests.
func (p *Pool) numConns(key PoolKey) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns[key])
}
