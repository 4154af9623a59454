// Package proxy is nftmesh's node proxy: for every pod the agent hands over (ZDS), it
// listens inside the pod's network namespace on the outbound (15001), inbound plaintext
// (15006) and HBONE (15008) ports that the pod's rules capture to (the intent's ports:
// these are the defaults); tunnels mesh traffic
// over HBONE between pods; authorizes every inbound connection; and reports Istio's
// metrics and an access log line per connection.
package proxy

import (
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

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/hbone"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/zds"
)

// Config holds the proxy's numbers. The ports it listens on and the mark on its sockets
// come from the intent the pods' rules were compiled from (Mesh), never from a copy of
// their defaults: rules and listeners cannot disagree.
type Config struct {
	Mesh             compiler.Config // zero: the built-in default intent's
	DialTimeout      time.Duration
	ShutdownDeadline time.Duration
}

// defaultMesh is the built-in default intent, resolved.
func defaultMesh() compiler.Config {
	cfg, err := compiler.Resolve(compiler.DefaultIntent())
	if err != nil {
		panic("the default intent does not resolve: " + err.Error())
	}
	return cfg
}

func (c Config) withDefaults() Config {
	if c.Mesh.ProxyMark.Value == 0 { // Resolve never leaves a mark at 0: unset
		c.Mesh = defaultMesh()
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = 10 * time.Second
	}
	if c.ShutdownDeadline == 0 {
		c.ShutdownDeadline = 10 * time.Second
	}
	return c
}

// The proxy's own ports that are not in the intent: admin, metrics, readiness (ztunnel's).
const (
	adminPort     = 15000
	metricsPort   = 15020
	readinessPort = 15021
)

// internalPorts may never be a tunnel's target: they are the proxy's own.
func (c Config) internalPorts() []uint16 {
	m := c.Mesh
	return []uint16{m.OutboundPort, m.InboundPlaintextPort, m.HBONEPort, m.DNSPort, adminPort, metricsPort, readinessPort}
}

// mark is SO_MARK for every socket the proxy opens in a pod: the intent's proxy mark, which
// the pod's rules never capture.
func (c Config) mark() uint32 { return c.Mesh.ProxyMark.Value }

// Proxy is the node proxy. It implements zds.Handler.
type Proxy struct {
	cfg       Config
	log       *slog.Logger
	issuer    identity.Issuer
	workloads workload.Store
	policies  *policy.Store
	metrics   *Metrics
	pool      *hbone.Pool
	// handshakes bounds inbound TLS handshakes in flight across all of this proxy's pods.
	handshakes *hbone.Limiter

	draining    sync.WaitGroup  // removed pods' drains, which Shutdown waits for
	drainCtx    context.Context // their parent: Shutdown's deadline cuts them short
	drainCancel context.CancelFunc

	steerWarned atomic.Bool // steerFailed said it at Warn

	mu        sync.Mutex
	instances map[string]*instance     // by pod UID
	byIP      map[netip.Addr]*instance // pod IP -> instance, for outbound HBONE dials
	starting  map[string]netns.Key     // pods whose AddWorkload is still starting listeners, and their namespaces
	unserved  map[string]error         // pods of the first snapshot whose listeners failed: not ready while any
	closing   bool
	ready     bool
}

var _ zds.Handler = (*Proxy)(nil)

// New returns a proxy. metrics may be nil.
func New(cfg Config, issuer identity.Issuer, workloads workload.Store, policies *policy.Store, metrics *Metrics, log *slog.Logger) *Proxy {
	if log == nil {
		log = slog.Default()
	}
	p := &Proxy{
		cfg: cfg.withDefaults(), log: log, issuer: issuer, workloads: workloads, policies: policies, metrics: metrics,
		instances: map[string]*instance{}, byIP: map[netip.Addr]*instance{}, starting: map[string]netns.Key{},
		unserved: map[string]error{},
	}
	p.handshakes = hbone.NewLimiter(hbone.DefaultNodeHandshakes)
	p.pool = &hbone.Pool{Dial: p.dialHBONE, TLSConfig: p.hboneTLS, Log: log}
	p.drainCtx, p.drainCancel = context.WithCancel(context.Background())
	return p
}

// WatchPolicies re-checks live inbound connections whenever the policies change, until
// ctx ends.
func (p *Proxy) WatchPolicies(ctx context.Context) {
	changes, cancel := p.policies.Subscribe()
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return
		case <-changes:
			p.recheck()
		}
	}
}

// Ready reports whether the proxy serves every pod the agent has: it has taken the
// agent's first snapshot (each Add of which returned once the pod's listeners were up)
// and no pod of it is without listeners. It is what /healthz/ready answers, and what a
// rolling update waits for before it stops the old proxy: the old proxy then closes
// listeners that the new one's already stand beside.
func (p *Proxy) Ready() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ready && !p.closing && len(p.unserved) == 0
}

// MarkReady is for proxies that run without an agent (tests, demos).
func (p *Proxy) MarkReady() {
	p.mu.Lock()
	p.ready = true
	p.mu.Unlock()
}

// AddWorkload starts the pod's listeners in its namespace and returns once they are up.
func (p *Proxy) AddWorkload(ctx context.Context, uid string, info zds.WorkloadInfo, ns *netns.NS) error {
	// A pod whose identity cannot be named could never get a certificate: refuse it now,
	// naming the field, rather than capture its traffic and fail every handshake.
	if err := checkWorkloadInfo(p.issuer.TrustDomain(), info); err != nil {
		ns.Close()
		return fmt.Errorf("pod %s: %w", uid, err)
	}
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		ns.Close()
		return errors.New("proxy is shutting down")
	}
	old := p.instances[uid]
	if _, starting := p.starting[uid]; starting || old != nil && old.netns.Same(ns) {
		// The agent re-sent a pod we run (after a reconnect): keep the running one.
		p.mu.Unlock()
		ns.Close()
		return nil
	}
	if other, pod := p.netnsOwnerLocked(ns.Key(), uid); other != "" {
		// Two pods cannot share a network namespace: the listeners (SO_REUSEPORT) would
		// split the first pod's connections between two identities. The agent has it wrong
		// (or missed a Del): refuse, and keep serving the pod that has it.
		p.mu.Unlock()
		ns.Close()
		return fmt.Errorf("pod %s/%s (%s): network namespace %s is already pod %s's%s", info.Namespace, info.Name, uid, ns.Key(), other, pod)
	}
	if old != nil {
		// The same pod in another namespace: kubelet recreated its sandbox, and the rules
		// now capture in the new one. Serve that one; the old drains, as after a Del.
		p.removeLocked(uid, old)
	}
	p.starting[uid] = ns.Key() // a concurrent add of the same pod waits for nothing: see above
	p.mu.Unlock()
	if old != nil {
		p.log.Info("workload in a new network namespace: replacing it", "uid", uid, "pod", info.Namespace+"/"+info.Name)
		if h, ok := p.issuer.(identity.Holder); ok {
			// Held across the swap, so that a drain that ends before the new instance's
			// Hold does not drop (and refetch) the pod's certificate.
			h.Hold(old.id)
			defer h.Release(old.id)
		}
		p.drain(uid, old)
	}

	inst, err := p.startInstance(uid, info, ns)
	p.mu.Lock()
	_, stillWanted := p.starting[uid] // a Del or Shutdown may have come meanwhile
	stillWanted = stillWanted && !p.closing
	delete(p.starting, uid)
	switch {
	case err == nil && stillWanted:
		p.instances[uid] = inst
		for _, ip := range inst.ips {
			p.byIP[ip] = inst
		}
		delete(p.unserved, uid)
	case err != nil && stillWanted && !p.ready:
		// A pod of the first snapshot without listeners: not ready until a later Add
		// starts it or a Del removes it (see Ready).
		p.unserved[uid] = err
	}
	p.mu.Unlock()
	if err != nil { // startInstance closed ns
		return fmt.Errorf("pod %s/%s (%s): %w", info.Namespace, info.Name, uid, err)
	}
	// Registered first, so that whatever it accepts finds its pod.
	inst.serve()
	if !stillWanted {
		inst.stop(ctx, 0)
		return fmt.Errorf("pod %s/%s (%s): deleted while starting", info.Namespace, info.Name, uid)
	}
	// Only a snapshot's pod may have an older proxy's listeners beside ours (an upgrade);
	// one added later has none (zds.InSnapshot), and the next proxy's snapshot steers its
	// groups over. Loading the programs for every pod was 30% of the proxy's CPU per pod.
	if zds.InSnapshot(ctx) {
		inst.steer()
	}
	p.log.Info("workload added", "uid", uid, "pod", info.Namespace+"/"+info.Name, "ips", inst.ips, "identity", inst.id.String())
	return nil
}

// steerFailed logs that a pod's listeners could not take over their SO_REUSEPORT groups
// (reuseport.go): the proxy serves, but an upgrade's overlap may reset connections queued
// on the proxy that closes. Said once at Warn, then at Debug.
func (p *Proxy) steerFailed(uid string, addr net.Addr, err error) {
	level := slog.LevelDebug
	if p.steerWarned.CompareAndSwap(false, true) {
		level = slog.LevelWarn
	}
	p.log.Log(context.Background(), level, "SO_REUSEPORT steering unavailable: a proxy upgrade may reset connections queued on the old proxy",
		"uid", uid, "listener", addr.String(), "error", err)
}

// netnsOwnerLocked returns the UID of the pod other than uid that runs or is starting in
// the namespace key ("" if none), and " (namespace/name)" for a running one; p.mu is held.
func (p *Proxy) netnsOwnerLocked(key netns.Key, uid string) (owner, pod string) {
	for u, inst := range p.instances {
		if u != uid && inst.netns.Key() == key {
			return u, " (" + inst.info.Namespace + "/" + inst.info.Name + ")"
		}
	}
	for u, k := range p.starting {
		if u != uid && k == key {
			return u, " (still starting)"
		}
	}
	return "", ""
}

func checkWorkloadInfo(trustDomain string, info zds.WorkloadInfo) error {
	switch {
	case info.Name == "":
		return errors.New("workload_info.name is empty")
	case info.Namespace == "":
		return errors.New("workload_info.namespace is empty")
	}
	if err := identity.ForServiceAccount(trustDomain, info.Namespace, orDefault(info.ServiceAccount)).Validate(); err != nil {
		return fmt.Errorf("workload_info (namespace %q, service_account %q): %w", info.Namespace, info.ServiceAccount, err)
	}
	return nil
}

// KeepWorkload keeps a pod the agent could not hand over again.
func (p *Proxy) KeepWorkload(ctx context.Context, uid string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.instances[uid] == nil {
		return fmt.Errorf("keep %s: no such workload", uid)
	}
	return nil
}

// DelWorkload stops the pod's listeners at once and drains its connections in the
// background, up to the shutdown deadline: the agent's Ack waits for neither (it gives
// up after 5 s, and with it the proxy connection, as ztunnel's acks at once). An unknown
// pod is not an error: the agent sends deletes to every proxy.
func (p *Proxy) DelWorkload(ctx context.Context, uid string) error {
	p.mu.Lock()
	inst := p.instances[uid]
	delete(p.starting, uid) // an add still starting is dropped when it finishes
	delete(p.unserved, uid)
	if inst != nil {
		p.removeLocked(uid, inst)
	}
	p.mu.Unlock()
	if inst != nil {
		p.drain(uid, inst)
	}
	return nil
}

// removeLocked takes a pod's instance out of the maps; p.mu is held. drain must follow.
func (p *Proxy) removeLocked(uid string, inst *instance) {
	p.draining.Add(1) // under p.mu: a Shutdown that has the lock next waits for this drain
	delete(p.instances, uid)
	for _, ip := range inst.knownIPs() {
		if p.byIP[ip] == inst {
			delete(p.byIP, ip)
		}
	}
}

// drain closes a removed instance's listeners at once and drains its connections in the
// background, up to the shutdown deadline. Its pooled HBONE connections (dialled in its
// namespace) take no new tunnels.
func (p *Proxy) drain(uid string, inst *instance) {
	inst.closeListeners()
	p.mu.Lock()
	ips := inst.knownIPs()
	p.mu.Unlock()
	for _, ip := range ips {
		p.pool.ForgetSource(ip)
	}
	pod := inst.info.Namespace + "/" + inst.info.Name
	p.log.Info("workload removed; draining", "uid", uid, "pod", pod, "deadline", p.cfg.ShutdownDeadline)
	go func() {
		defer p.draining.Done()
		inst.stop(p.drainCtx, p.cfg.ShutdownDeadline)
		p.log.Info("workload drained", "uid", uid, "pod", pod)
	}()
}

// SnapshotDone drops the workloads the agent's snapshot did not name.
func (p *Proxy) SnapshotDone(ctx context.Context, named map[string]bool) error {
	p.mu.Lock()
	var gone []string
	for uid := range p.instances {
		if !named[uid] {
			gone = append(gone, uid)
		}
	}
	for uid := range p.unserved {
		if !named[uid] {
			delete(p.unserved, uid)
		}
	}
	p.ready = true
	unserved := len(p.unserved)
	p.mu.Unlock()
	if unserved > 0 {
		p.log.Warn("snapshot done, but not ready: pods without listeners", "pods", unserved)
	}
	for _, uid := range gone {
		p.DelWorkload(ctx, uid)
	}
	return nil
}

// Shutdown stops accepting everywhere and drains live connections until ctx's deadline.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closing = true
	insts := make([]*instance, 0, len(p.instances))
	for _, inst := range p.instances {
		insts = append(insts, inst)
	}
	p.instances, p.byIP = map[string]*instance{}, map[netip.Addr]*instance{}
	p.mu.Unlock()
	// Every listener closed at once, before any drain: during an upgrade the new proxy's
	// stand beside them, and the kernel migrates what these had queued (reuseport.go).
	for _, inst := range insts {
		inst.closeListeners()
	}
	var wg sync.WaitGroup
	for _, inst := range insts {
		wg.Add(1)
		go func() { defer wg.Done(); inst.stop(ctx, p.cfg.ShutdownDeadline) }()
	}
	wg.Wait()
	stop := context.AfterFunc(ctx, p.drainCancel) // removed pods still draining: ctx's deadline is theirs too
	p.draining.Wait()
	stop()
	return p.pool.Close()
}

// recheck closes live inbound connections that the current policies deny.
func (p *Proxy) recheck() {
	p.mu.Lock()
	insts := make([]*instance, 0, len(p.instances))
	for _, inst := range p.instances {
		insts = append(insts, inst)
	}
	p.mu.Unlock()
	for _, inst := range insts {
		inst.recheck()
	}
}

// dialHBONE opens a pooled HBONE connection from the source pod's namespace: the socket
// is made there, with the proxy mark, so the source IP is the pod's and no rule captures it.
func (p *Proxy) dialHBONE(ctx context.Context, key hbone.PoolKey) (net.Conn, error) {
	p.mu.Lock()
	src := p.byIP[key.SrcIP]
	p.mu.Unlock()
	if src == nil {
		// A pod whose IPs the store learned after it was added (see instance.workload):
		// found by UID, and known by this IP from now on.
		if w, ok := p.workloads.WorkloadByIP(key.SrcIP); ok {
			p.mu.Lock()
			if src = p.instances[w.UID]; src != nil {
				p.byIP[key.SrcIP] = src
				src.learned = append(src.learned, key.SrcIP)
			}
			p.mu.Unlock()
		}
	}
	if src == nil {
		return nil, fmt.Errorf("no workload with IP %s on this node", key.SrcIP)
	}
	return src.dialIn(ctx, netip.AddrPort{}, key.Dst, SockOpts{Mark: p.cfg.mark()})
}

// hboneTLS is the client TLS configuration of a pooled HBONE connection: the source's
// certificate, the destination's identity expected.
func (p *Proxy) hboneTLS(key hbone.PoolKey) (*tls.Config, error) {
	srcID, err := identity.ParseID(key.SrcID)
	if err != nil {
		return nil, err
	}
	dstID, err := identity.ParseID(key.DstID)
	if err != nil {
		return nil, err
	}
	return identity.ClientTLSConfig(p.issuer, srcID, []identity.ID{dstID}), nil
}

// Handler returns the readiness endpoint (/healthz/ready) alone: GET and HEAD; other
// methods get 405, other paths 404.
func (p *Proxy) Handler() http.Handler {
	mux := http.NewServeMux()
	p.handleReady(mux)
	return mux
}

// handleReady adds the readiness endpoint to mux. ("GET /x" also serves HEAD; the mux
// answers other methods on the path with 405 and an Allow header.)
func (p *Proxy) handleReady(mux *http.ServeMux) {
	mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		if !p.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
}

func isClosed(err error) bool {
	return errors.Is(err, net.ErrClosed)
}
