package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/rawio"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/hbone"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/zds"
)

// instance serves one pod: its listeners, its live connections.
type instance struct {
	p     *Proxy
	uid   string
	info  zds.WorkloadInfo
	netns *netns.NS
	id    identity.ID
	ips   []netip.Addr
	// learned are IPs the pod dialled from that the store did not give at its add
	// (guarded by p.mu): its pooled HBONE connections are forgotten by them too.
	learned []netip.Addr
	wl      *workload.Workload // nil when the store does not know the pod

	listeners []net.Listener
	hbone     *hbone.Server
	wg        sync.WaitGroup
	release   func() // undoes the issuer's Hold of id (identity.Holder), once; nil without

	nsMu     sync.RWMutex // held (read) while the namespace fd is in use
	nsClosed bool
	spares   spareSockets

	mu      sync.Mutex
	live    map[*liveConn]struct{} // inbound connections, for policy re-checks
	ctx     context.Context
	stopCtx context.CancelFunc
}

// liveConn is an inbound connection that policy re-checks may close. It is tracked before
// its policy decision, so a change that lands while the app connection is being made is
// not missed: a denied liveConn refuses the upstream that arrives later.
type liveConn struct {
	conn     policy.Connection
	peer     net.Conn // nil for HBONE: the tunnel ends when the upstream closes
	upstream net.Conn // guarded by instance.mu
	denied   bool     // guarded by instance.mu
}

// startInstance opens the pod's listeners in ns; serve serves them. The instance owns ns;
// on error it has closed it.
func (p *Proxy) startInstance(uid string, info zds.WorkloadInfo, ns *netns.NS) (*instance, error) {
	sa := info.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	inst := &instance{
		p: p, uid: uid, info: info, netns: ns,
		id:   identity.ForServiceAccount(p.issuer.TrustDomain(), info.Namespace, sa),
		live: map[*liveConn]struct{}{},
	}
	inst.ctx, inst.stopCtx = context.WithCancel(context.Background())
	if w, ok := p.workloads.WorkloadByUID(uid); ok {
		inst.wl = w
		inst.ips = slices.Clone(w.IPs)
	}
	families := []netip.Addr{netip.IPv4Unspecified()}
	// A source that learns pods from the API server may not know the pod's IPs yet (the
	// kubelet reports them after the CNI ADD that enrolled it): then IPv6 is listened on
	// where the intent has it and the namespace allows it.
	ipsUnknown := len(inst.ips) == 0
	if slices.ContainsFunc(inst.ips, func(a netip.Addr) bool { return a.Is6() && !a.Is4In6() }) || (ipsUnknown && p.cfg.Mesh.IPv6) {
		families = append(families, netip.IPv6Unspecified())
	}
	opts := SockOpts{Mark: p.cfg.mark(), Transparent: true, ReusePort: true}
	inst.hbone = &hbone.Server{
		TLS: identity.ServerTLSConfig(p.issuer, inst.id), Dial: inst.dialInbound, Log: p.log,
		OnHandshakeError: func(error) { p.metrics.handshakeFailed(info.Name, info.Namespace) },
		// TLS handshakes in flight: at most hbone.DefaultMaxHandshakes for this pod and
		// hbone.DefaultNodeHandshakes across the node's pods; the excess is closed unhandshaken.
		Handshakes: p.handshakes,
	}
	// An issuer that keeps the certificates of the identities in use fetches this one
	// now, ahead of the first handshake; stop releases it (every instance is stopped
	// once, whether it failed to start, was deleted, replaced or shut down).
	if h, ok := p.issuer.(identity.Holder); ok {
		h.Hold(inst.id)
		inst.release = sync.OnceFunc(func() { h.Release(inst.id) })
	}
	// Listen first, serve later (serve, once the instance is registered): a connection
	// served before would find no instance for its pod (an outbound dial from its
	// namespace looks the pod up by IP). Until then the kernel queues it.
	for _, any := range families {
		for _, port := range []uint16{p.cfg.Mesh.OutboundPort, p.cfg.Mesh.InboundPlaintextPort, p.cfg.Mesh.HBONEPort} {
			l, err := ListenIn(inst.netns, netip.AddrPortFrom(any, port), opts)
			if err != nil && ipsUnknown && any.Is6() {
				p.log.Debug("no IPv6 listener in the pod's namespace", "uid", uid, "error", err)
				break
			}
			if err != nil {
				// Nothing accepted yet: closing the listeners resets (or, beside another
				// proxy's, migrates) what they queued.
				inst.stop(context.Background(), 0)
				return nil, err
			}
			inst.listeners = append(inst.listeners, l)
		}
	}
	inst.wg.Add(len(inst.listeners)) // serve's accept loops; counted now, before anyone can stop it
	return inst, nil
}

// serve accepts on the instance's listeners. startInstance's caller must call it once,
// whether it keeps the instance or stops it.
func (i *instance) serve() {
	p := i.p
	for _, l := range i.listeners {
		port := AddrPortOf(l.Addr()).Port()
		go func() {
			defer i.wg.Done()
			switch port {
			case p.cfg.Mesh.OutboundPort:
				i.acceptLoop(l, i.serveOutbound)
			case p.cfg.Mesh.InboundPlaintextPort:
				i.acceptLoop(l, i.serveInbound)
			default:
				if err := i.hbone.Serve(l); err != nil && !errors.Is(err, hbone.ErrServerClosed) && !isClosed(err) {
					p.log.Warn("HBONE listener stopped", "uid", i.uid, "error", err)
				}
			}
		}()
	}
}

// steer makes the instance's listeners the ones that take their SO_REUSEPORT groups' new
// connections, and lets the groups migrate a closing listener's queue (reuseport.go): a
// proxy that starts beside another (an upgrade) takes over every pod it is handed, and
// the other's close drops nothing.
func (i *instance) steer() {
	for _, l := range i.listeners {
		if err := steer(l.(*net.TCPListener)); err != nil {
			if !isClosed(err) { // stopped meanwhile
				i.p.steerFailed(i.uid, l.Addr(), err)
			}
			return
		}
	}
}

func (i *instance) closeListeners() {
	for _, l := range i.listeners {
		l.Close()
	}
}

// stop stops accepting, lets live connections drain until the deadline, then closes them.
func (i *instance) stop(ctx context.Context, deadline time.Duration) {
	i.closeListeners()
	dctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	i.hbone.Shutdown(dctx)
	done := make(chan struct{})
	go func() { i.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-dctx.Done():
		i.stopCtx() // ends the plaintext connections still open
		<-done
	}
	i.stopCtx()
	i.nsMu.Lock()
	i.nsClosed = true
	i.spares.close()
	i.netns.Close()
	i.nsMu.Unlock()
	if i.release != nil { // after the drain: its connections are done with the certificate
		i.release()
	}
}

func (i *instance) acceptLoop(l net.Listener, serve func(*net.TCPConn)) {
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if isClosed(err) {
				return
			}
			// Out of descriptors and the like: wait and retry, as net/http and the HBONE
			// server do. Giving up would leave the pod's port captured and unserved.
			var t interface{ Temporary() bool }
			if errors.As(err, &t) && t.Temporary() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				i.p.log.Warn("accept failed; retrying", "uid", i.uid, "listener", l.Addr().String(), "error", err, "delay", backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-i.ctx.Done():
					return
				}
			}
			i.p.log.Error("accept failed; the listener is no longer served", "uid", i.uid, "listener", l.Addr().String(), "error", err)
			return
		}
		backoff = 0
		i.wg.Add(1)
		go func() {
			defer i.wg.Done()
			serve(c.(*net.TCPConn))
		}()
	}
}

// pipeUntilStopped pipes a and b, closing both if the instance stops first.
func (i *instance) pipeUntilStopped(a, b net.Conn) (int64, int64, error) {
	stop := context.AfterFunc(i.ctx, func() { a.Close(); b.Close() })
	defer stop()
	return pipe(a, b)
}

// ownPort reports whether dst's port is one the proxy listens on in the pod (the intent's
// outbound, inbound plaintext and HBONE ports, as ztunnel refuses): never a destination, since delivering there reaches a proxy
// listener again (a connection to <pod ip>:15006 would otherwise loop until the
// descriptors run out). The pod's apps keep every other port.
func (i *instance) ownPort(dst netip.AddrPort) bool {
	m := i.p.cfg.Mesh
	return slices.Contains([]uint16{m.OutboundPort, m.InboundPlaintextPort, m.HBONEPort}, dst.Port())
}

func (i *instance) refuseOwnPort(c *net.TCPConn, direction string, dst netip.AddrPort) {
	i.p.log.Warn(direction+": refused a connection to the proxy's own port", "uid", i.uid,
		"src", AddrPortOf(c.RemoteAddr()).String(), "dst", dst.String())
	c.SetLinger(0)
	c.Close()
}

// serveOutbound handles a connection the pod's rules redirected to 15001: to a mesh
// workload over HBONE, to anything else directly, from the pod's namespace.
func (i *instance) serveOutbound(c *net.TCPConn) {
	p := i.p
	dst, err := OriginalDst(c)
	if err != nil {
		p.log.Warn("outbound: no original destination", "uid", i.uid, "error", err)
		c.SetLinger(0)
		c.Close()
		return
	}
	if (dst.Addr().IsLoopback() || slices.Contains(i.addrs(), dst.Addr().Unmap())) && i.ownPort(dst) {
		i.refuseOwnPort(c, "outbound", dst)
		return
	}
	src := AddrPortOf(c.RemoteAddr())
	info := &connInfo{direction: "outbound", src: src, dst: dst, start: time.Now(),
		srcWorkload: i.info.Name, srcNamespace: i.info.Namespace, srcIdentity: i.id.String(), srcLabels: i.labels()}
	ctx, cancel := context.WithTimeout(i.ctx, p.cfg.DialTimeout)
	defer cancel()

	var up net.Conn
	target, ok := p.workloads.Resolve(dst)
	if ok && target.Workload.InMesh && len(target.Workload.IPs) > 0 {
		dstID := identity.ForServiceAccount(p.issuer.TrustDomain(), target.Workload.Namespace, orDefault(target.Workload.ServiceAccount))
		hboneAddr := netip.AddrPortFrom(target.Addr.Addr(), p.cfg.Mesh.HBONEPort)
		// As ztunnel logs a tunnel: dst.addr is where the proxy connects (the peer's HBONE
		// port), dst.hbone_addr the CONNECT authority (the app's ip:port). They were the
		// other way round, which broke log queries written for ztunnel.
		info.dst, info.hboneAddr, info.mtls = hboneAddr, target.Addr, true
		info.dstWorkload, info.dstNamespace, info.dstIdentity = target.Workload.Name, target.Workload.Namespace, dstID.String()
		info.dstLabels, info.dstService = target.Workload.Labels, target.Service
		hdr := http.Header{}
		hdr.Set("Forwarded", fmt.Sprintf("for=%q", src.String()))
		key := hbone.PoolKey{SrcID: i.id.String(), DstID: dstID.String(), Dst: hboneAddr, SrcIP: src.Addr()}
		up, err = p.pool.Connect(ctx, key, target.Addr, hdr)
	} else if !ok && target.Service != nil {
		// A service without a ready endpoint: refused, as ztunnel does (no upstream).
		info.dstService = target.Service
		err = fmt.Errorf("service %s/%s: no ready endpoint", target.Service.Namespace, target.Service.Name)
	} else {
		to := dst
		if ok {
			info.dstWorkload, info.dstNamespace = target.Workload.Name, target.Workload.Namespace
			info.dstLabels, info.dstService = target.Workload.Labels, target.Service
			// As ztunnel: straight to the endpoint picked (the one the telemetry names),
			// not to the VIP for something else to balance again.
			to, info.dst = target.Addr, target.Addr
		}
		up, err = i.dialIn(ctx, netip.AddrPort{}, to, SockOpts{Mark: p.cfg.mark()})
	}
	p.metrics.open(info)
	if err != nil {
		info.responseFlags = flagConnectFailure
		var se *hbone.StatusError
		if errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			info.responseFlags = flagDenied
		}
		c.SetLinger(0)
		c.Close()
		p.metrics.done(p.log, info, 0, 0, err)
		return
	}
	toDst, fromDst, err := i.pipeUntilStopped(c, up)
	p.metrics.done(p.log, info, toDst, fromDst, err)
}

// serveInbound handles plain TCP the pod's rules captured to 15006: authorize without a
// principal, then deliver to the app with the client's source address.
func (i *instance) serveInbound(c *net.TCPConn) {
	p := i.p
	local := AddrPortOf(c.LocalAddr())
	dst := local // TPROXY: the accepted socket's local address is the original destination
	if local.Port() == p.cfg.Mesh.InboundPlaintextPort {
		var err error
		if dst, err = OriginalDst(c); err != nil { // REDIRECT
			p.log.Warn("inbound: no original destination", "uid", i.uid, "error", err)
			c.SetLinger(0)
			c.Close()
			return
		}
	}
	if i.ownPort(dst) {
		i.refuseOwnPort(c, "inbound", dst)
		return
	}
	src := AddrPortOf(c.RemoteAddr())
	info := &connInfo{direction: "inbound", src: src, dst: dst, start: time.Now(),
		dstWorkload: i.info.Name, dstNamespace: i.info.Namespace, dstIdentity: i.id.String(), dstLabels: i.labels()}
	if w, ok := p.workloads.WorkloadByIP(src.Addr()); ok {
		info.srcWorkload, info.srcNamespace, info.srcLabels = w.Name, w.Namespace, w.Labels
	}
	info.dstService, _ = p.workloads.ServiceOf(i.uid, dst.Port())
	p.metrics.open(info)
	pc := policy.Connection{SrcIP: src.Addr(), DstIP: dst.Addr(), DstPort: dst.Port()}
	lc := i.track(pc, c)
	defer i.untrack(lc)
	if d := p.policies.Decide(pc, i.policyWorkload()); !d.Allow {
		info.responseFlags = flagDenied
		c.Close()
		p.metrics.done(p.log, info, 0, 0, fmt.Errorf("denied by policy: %s", d))
		return
	}
	ctx, cancel := context.WithTimeout(i.ctx, p.cfg.DialTimeout)
	up, err := i.deliver(ctx, src.Addr(), dst)
	cancel()
	if err == nil && !i.attach(lc, up) {
		err = errors.New("denied by a policy change while connecting")
		info.responseFlags = flagDenied
	}
	if err != nil {
		if info.responseFlags == "" {
			info.responseFlags = flagConnectFailure
		}
		c.SetLinger(0)
		c.Close()
		p.metrics.done(p.log, info, 0, 0, err)
		return
	}
	toDst, fromDst, err := i.pipeUntilStopped(c, up)
	if i.deniedLater(lc) {
		info.responseFlags, err = flagDenied, errDeniedLater
	}
	p.metrics.done(p.log, info, toDst, fromDst, err)
}

// deliver connects to the app in the pod with the client's IP as source: IP_TRANSPARENT
// and IP_FREEBIND to bind it, the proxy mark so the rules let it through and mark the
// connection, whose replies then come back to this socket through table 100.
func (i *instance) deliver(ctx context.Context, srcIP netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	return i.dialIn(ctx, netip.AddrPortFrom(srcIP, 0), dst, SockOpts{Mark: i.p.cfg.mark(), Transparent: true, FreeBind: true})
}

var errStopped = errors.New("workload stopped")

// dialIn connects from the pod's namespace. The namespace file stays open while its fd is
// in use (making sockets): stop waits, so the fd number can never meanwhile belong to
// another pod. The connect itself needs only the socket.
func (i *instance) dialIn(ctx context.Context, local, remote netip.AddrPort, o SockOpts) (*net.TCPConn, error) {
	v6 := isV6(remote)
	i.nsMu.RLock()
	if i.nsClosed {
		i.nsMu.RUnlock()
		return nil, errStopped
	}
	fd, err := i.spares.take(i.netns, v6, o)
	i.nsMu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", remote, err)
	}
	return connectSocket(ctx, fd, v6, local, remote)
}

// workload is the pod as the workload store has it now, or as it had it when the pod was
// added (nil if it never knew it): a Kubernetes source learns a pod's IPs and labels
// after the agent has handed the pod over, and they may change.
func (i *instance) workload() *workload.Workload {
	if w, ok := i.p.workloads.WorkloadByUID(i.uid); ok {
		return w
	}
	return i.wl
}

// knownIPs are every IP the pod was known by: at its add, learned since by an outbound
// dial, and the store's now. p.mu is held.
func (i *instance) knownIPs() []netip.Addr {
	out := append(slices.Clone(i.ips), i.learned...)
	for _, ip := range i.addrs() {
		if !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	return out
}

// addrs are the pod's IPs.
func (i *instance) addrs() []netip.Addr {
	if w := i.workload(); w != nil && len(w.IPs) > 0 {
		return w.IPs
	}
	return i.ips
}

// labels are the pod's labels from the workload store (none when it does not know the pod).
func (i *instance) labels() map[string]string {
	if w := i.workload(); w != nil {
		return w.Labels
	}
	return nil
}

func (i *instance) policyWorkload() policy.Workload {
	return policy.Workload{Namespace: i.info.Namespace, Labels: i.labels()}
}

// dialInbound is the HBONE server's Dialer: check the target, authorize the peer's
// identity, connect to the app.
func (i *instance) dialInbound(ctx context.Context, req hbone.Request) (net.Conn, int, error) {
	p := i.p
	if ips := i.addrs(); !slices.Contains(ips, req.Authority.Addr().Unmap()) {
		return nil, http.StatusBadRequest, fmt.Errorf("authority %s is not this pod (%v)", req.Authority, ips)
	}
	if slices.Contains(p.cfg.internalPorts(), req.Authority.Port()) {
		return nil, http.StatusServiceUnavailable, fmt.Errorf("port %d is the proxy's own", req.Authority.Port())
	}
	peer, err := identity.PeerID(req.PeerTLS)
	if err != nil {
		return nil, http.StatusUnauthorized, err
	}
	src := AddrPortOf(req.RemoteAddr)
	// As ztunnel logs an inbound tunnel: dst.addr is the pod's HBONE address the peer
	// connected to, dst.hbone_addr the CONNECT authority. Without it the destination's
	// log could not tell a tunnel from plaintext to the same port.
	info := &connInfo{direction: "inbound", src: src, start: time.Now(), mtls: true,
		dst: netip.AddrPortFrom(req.Authority.Addr(), p.cfg.Mesh.HBONEPort), hboneAddr: req.Authority,
		srcIdentity: peer.String(), srcNamespace: peer.Namespace,
		dstWorkload: i.info.Name, dstNamespace: i.info.Namespace, dstIdentity: i.id.String(), dstLabels: i.labels()}
	if w, ok := p.workloads.WorkloadByIP(src.Addr()); ok {
		info.srcWorkload, info.srcLabels = w.Name, w.Labels
	}
	info.dstService, _ = p.workloads.ServiceOf(i.uid, req.Authority.Port())
	// Counted open before the policy decides, as ztunnel does: a denied connection shows as
	// opened and closed with response_flags DENY.
	p.metrics.open(info)
	pc := policy.Connection{SrcPrincipal: peer.String(), SrcIP: src.Addr(), DstIP: req.Authority.Addr(), DstPort: req.Authority.Port()}
	lc := i.track(pc, nil)
	if d := p.policies.Decide(pc, i.policyWorkload()); !d.Allow {
		i.untrack(lc)
		info.responseFlags = flagDenied
		p.metrics.done(p.log, info, 0, 0, fmt.Errorf("denied by policy: %s", d))
		return nil, http.StatusUnauthorized, fmt.Errorf("denied by policy: %s", d)
	}
	up, err := i.deliver(ctx, src.Addr(), req.Authority)
	if err != nil {
		i.untrack(lc)
		info.responseFlags = flagConnectFailure
		p.metrics.done(p.log, info, 0, 0, err)
		return nil, http.StatusServiceUnavailable, err
	}
	if !i.attach(lc, up) {
		i.untrack(lc)
		info.responseFlags = flagDenied
		err := errors.New("denied by a policy change while connecting")
		p.metrics.done(p.log, info, 0, 0, err)
		return nil, http.StatusUnauthorized, err
	}
	raw, err := rawio.NewConn(up)
	if err != nil {
		i.untrack(lc)
		up.Close()
		info.responseFlags = flagConnectFailure
		p.metrics.done(p.log, info, 0, 0, err)
		return nil, http.StatusServiceUnavailable, err
	}
	return &trackedConn{c: raw, i: i, lc: lc, info: info}, http.StatusOK, nil
}

// trackedConn is an HBONE tunnel's upstream: it counts bytes and ends the tunnel's
// bookkeeping when closed. It wraps the TCP conn instead of embedding it: an embedded
// *net.TCPConn would let net.Buffers write around Write (writev), uncounted.
type trackedConn struct {
	c              *rawio.Conn // raw system calls: see rawio
	i              *instance
	lc             *liveConn
	info           *connInfo
	once           sync.Once
	toApp, fromApp atomic.Int64 // the connection's bytes towards and from its destination
}

func (t *trackedConn) Read(b []byte) (int, error) {
	n, err := t.c.Read(b)
	t.fromApp.Add(int64(n))
	return n, err
}

func (t *trackedConn) Write(b []byte) (int, error) {
	n, err := t.c.Write(b)
	t.toApp.Add(int64(n))
	return n, err
}

// TryWrite lets the HBONE server's read loop write to the app without waking the tunnel's
// goroutine.
func (t *trackedConn) TryWrite(b []byte) (int, error) {
	n, err := t.c.TryWrite(b)
	t.toApp.Add(int64(n))
	return n, err
}

func (t *trackedConn) CloseWrite() error                  { return t.c.CloseWrite() }
func (t *trackedConn) SetLinger(sec int) error            { return t.c.SetLinger(sec) }
func (t *trackedConn) LocalAddr() net.Addr                { return t.c.LocalAddr() }
func (t *trackedConn) RemoteAddr() net.Addr               { return t.c.RemoteAddr() }
func (t *trackedConn) SetDeadline(d time.Time) error      { return t.c.SetDeadline(d) }
func (t *trackedConn) SetReadDeadline(d time.Time) error  { return t.c.SetReadDeadline(d) }
func (t *trackedConn) SetWriteDeadline(d time.Time) error { return t.c.SetWriteDeadline(d) }

func (t *trackedConn) Close() error {
	err := t.c.Close()
	t.once.Do(func() {
		t.i.untrack(t.lc)
		var err error
		if t.i.deniedLater(t.lc) {
			t.info.responseFlags, err = flagDenied, errDeniedLater
		}
		t.i.p.metrics.done(t.i.p.log, t.info, t.toApp.Load(), t.fromApp.Load(), err)
	})
	return err
}

// track registers an inbound connection for policy re-checks, before its decision.
func (i *instance) track(pc policy.Connection, peer net.Conn) *liveConn {
	lc := &liveConn{conn: pc, peer: peer}
	i.mu.Lock()
	i.live[lc] = struct{}{}
	i.mu.Unlock()
	return lc
}

// attach gives a tracked connection its upstream; false (and up closed) if a re-check
// denied it meanwhile.
func (i *instance) attach(lc *liveConn, up net.Conn) bool {
	i.mu.Lock()
	denied := lc.denied
	if !denied {
		lc.upstream = up
	}
	i.mu.Unlock()
	if denied {
		up.Close()
	}
	return !denied
}

func (i *instance) untrack(lc *liveConn) {
	i.mu.Lock()
	delete(i.live, lc)
	i.mu.Unlock()
}

var errDeniedLater = errors.New("closed: denied by changed policy")

// deniedLater reports whether a re-check denied the connection after it opened.
func (i *instance) deniedLater(lc *liveConn) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	return lc.denied
}

// recheck closes (with a reset) the live connections the current policies deny, and
// marks those still connecting so that they give up.
func (i *instance) recheck() {
	w := i.policyWorkload()
	var closing []net.Conn
	i.mu.Lock()
	for lc := range i.live {
		if d := i.p.policies.Decide(lc.conn, w); !d.Allow && !lc.denied {
			lc.denied = true
			i.p.log.Info("closing connection denied by changed policy", "uid", i.uid, "connection", lc.conn.String())
			for _, c := range []net.Conn{lc.peer, lc.upstream} {
				if c != nil {
					closing = append(closing, c)
				}
			}
		}
	}
	i.mu.Unlock()
	// Every socket set to reset before any closes, the client's first: a close seen by
	// the copy goroutines would otherwise pass on as a clean FIN, and a cut-short stream
	// would look complete.
	for _, c := range closing {
		if r, ok := c.(resetter); ok {
			r.SetLinger(0)
		}
	}
	for _, c := range closing {
		c.Close()
	}
}

func orDefault(sa string) string {
	if sa == "" {
		return "default"
	}
	return sa
}
