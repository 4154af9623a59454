package kube

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nftmesh/nftmesh/proxy/workload"
)

// AnnotationRedirection is set to RedirectionEnabled on a pod by the node agent once the
// pod's traffic is captured (agent.AnnotationRedirection; ztunnel follows the same
// annotation through istiod). Such a pod is in the mesh: traffic to it goes over HBONE.
const (
	AnnotationRedirection = "ambient.istio.io/redirection"
	RedirectionEnabled    = "enabled"
)

// index is what the informers report, in the shapes the proxy looks up per connection.
// The informers' handlers write under mu; readers take it shared, so a lookup costs a
// read lock and a map access or two, and never waits for the API server. Workloads,
// services and views are never modified once in the index: a change replaces them, so a
// reader may keep what it was given. A service's view is built before mu is taken (under
// svcMu, which orders the Service and EndpointSlice handlers), so that readers wait only
// for the few map writes that publish it, not for a big service's rebuild.
type index struct {
	mu sync.RWMutex
	// pods by UID: every pod the informer lists (not host-network, not finished).
	pods map[string]*workload.Workload
	// byIP gives each pod IP to one pod. Two pods claim one IP only in passing (an IP
	// reused while the old pod is still being deleted): the others wait in claims, and one
	// of them takes the IP when its owner lets it go.
	byIP   map[netip.Addr]*workload.Workload
	claims map[netip.Addr][]*workload.Workload
	// terminating holds the UIDs of pods being deleted, which yield a shared IP.
	terminating map[string]struct{}

	svcMu    sync.Mutex          // guards services, and each service's svc and slices
	services map[string]*service // by namespace/name
	// Under mu: a VIP and service port; an endpoint IP → the services it serves, by key.
	byVIP  map[netip.AddrPort]vipRef
	epByIP map[netip.Addr][]endpointOf
	rr     atomic.Uint64 // round robin over ready endpoints
}

func newIndex() *index {
	return &index{
		pods: map[string]*workload.Workload{}, byIP: map[netip.Addr]*workload.Workload{},
		claims: map[netip.Addr][]*workload.Workload{}, terminating: map[string]struct{}{},
		services: map[string]*service{}, byVIP: map[netip.AddrPort]vipRef{}, epByIP: map[netip.Addr][]endpointOf{},
	}
}

// service is one Service and its EndpointSlices, which may arrive in any order.
type service struct {
	key    string                                // namespace/name: ServiceOf's order
	svc    *corev1.Service                       // nil until the Service is seen, or once deleted
	slices map[string]*discoveryv1.EndpointSlice // by slice name
	view   *view                                 // what readers use (under index.mu); nil without svc
}

// view is a service as Resolve and ServiceOf use it, built from the Service and its
// slices whenever one of them changes.
type view struct {
	svc   *workload.Service
	ports []portView // one per TCP service port, in spec order
	// eps are the endpoint IPs with the target ports they serve, as put in epByIP (so
	// that the next view can take them out).
	eps []endpointPorts
}

type portView struct {
	port uint16
	// ready endpoints, deduplicated, by family: [0] IPv4, [1] IPv6. A connection to an
	// IPv4 VIP goes to an IPv4 endpoint when there is one.
	ready [2][]endpoint
}

// endpoint is one ready address of a service port, with its target port resolved.
type endpoint struct {
	addr netip.AddrPort
	ref  *corev1.ObjectReference // the slice's targetRef (a Pod), or nil
	// standIn is the Workload for an address that no pod in the index has (outside the
	// mesh, or not seen yet), made on first use and kept for the view's life, so that
	// Resolve allocates nothing.
	standIn atomic.Pointer[workload.Workload]
}

type endpointPorts struct {
	ip      netip.Addr
	ports   []uint16 // target ports, sorted
	anyPort bool     // a headless service without ports: every port
}

// endpointOf says that an IP is an endpoint of svc for ports (ServiceOf's question).
type endpointOf struct {
	svc     *service
	ports   []uint16
	anyPort bool
}

type vipRef struct {
	svc  *service
	port int // index into view.ports
}

// workloadOf turns a pod into the proxy's Workload. The strings and the labels map are
// the decoded pod's own; nothing else of it is kept.
func workloadOf(p *corev1.Pod) *workload.Workload {
	w := &workload.Workload{
		UID: string(p.UID), Name: p.Name, Namespace: p.Namespace,
		ServiceAccount: p.Spec.ServiceAccountName, Labels: p.Labels, Node: p.Spec.NodeName,
		InMesh: p.Annotations[AnnotationRedirection] == RedirectionEnabled,
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = p.Spec.DeprecatedServiceAccount
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = "default" // what admission fills in; the static source does the same
	}
	ips := p.Status.PodIPs
	if len(ips) == 0 && p.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	for _, ip := range ips {
		if a, err := netip.ParseAddr(ip.IP); err == nil && !slices.Contains(w.IPs, a.Unmap()) {
			w.IPs = append(w.IPs, a.Unmap())
		}
	}
	return w
}

// setPod records a pod added or changed. old is the previous version the informer had
// under the same namespace/name, if any: a different UID there means the pod was deleted
// and made again while the watch was away.
func (x *index) setPod(old, p *podEntry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	w := p.w
	if old != nil && old.w.UID != w.UID {
		x.removePod(old.w.UID)
	}
	if p.hostNetwork {
		// The node's IP, shared by every host-network pod: never a mesh workload. The
		// informer's field selector keeps them out; this is a second line.
		x.removePod(w.UID)
		return
	}
	if prev := x.pods[w.UID]; prev != nil {
		for _, ip := range prev.IPs {
			if !slices.Contains(w.IPs, ip) {
				x.release(ip, w.UID)
			}
		}
	}
	if p.terminating {
		x.terminating[w.UID] = struct{}{}
	} else {
		delete(x.terminating, w.UID)
	}
	x.pods[w.UID] = w
	for _, ip := range w.IPs {
		x.claim(ip, w)
	}
}

func (x *index) deletePod(p *podEntry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.removePod(p.w.UID)
}

func (x *index) removePod(uid string) {
	w := x.pods[uid]
	if w == nil {
		return
	}
	for _, ip := range w.IPs {
		x.release(ip, uid)
	}
	delete(x.pods, uid)
	delete(x.terminating, uid)
}

// claim gives ip to w, unless another pod holds it and is not being deleted while w is:
// the holder keeps it (a pod that merely updates must not take an IP back and forth).
func (x *index) claim(ip netip.Addr, w *workload.Workload) {
	cur, ok := x.byIP[ip]
	if !ok || cur.UID == w.UID {
		x.byIP[ip] = w
		return
	}
	waiting := slices.DeleteFunc(x.claims[ip], func(o *workload.Workload) bool { return o.UID == w.UID })
	if x.isTerminating(cur.UID) && !x.isTerminating(w.UID) {
		x.byIP[ip] = w
		waiting = append(waiting, cur)
	} else {
		waiting = append(waiting, w)
	}
	x.claims[ip] = waiting
}

// release takes uid's claim on ip away; if uid held it, a waiting pod takes it (one not
// being deleted first).
func (x *index) release(ip netip.Addr, uid string) {
	waiting := x.claims[ip]
	if cur, ok := x.byIP[ip]; ok && cur.UID == uid {
		if len(waiting) == 0 {
			delete(x.byIP, ip)
			return
		}
		i := slices.IndexFunc(waiting, func(o *workload.Workload) bool { return !x.isTerminating(o.UID) })
		if i < 0 {
			i = 0
		}
		x.byIP[ip] = waiting[i]
		waiting = slices.Delete(waiting, i, i+1)
	} else {
		waiting = slices.DeleteFunc(waiting, func(o *workload.Workload) bool { return o.UID == uid })
	}
	if len(waiting) == 0 {
		delete(x.claims, ip)
	} else {
		x.claims[ip] = waiting
	}
}

func (x *index) isTerminating(uid string) bool {
	_, ok := x.terminating[uid]
	return ok
}

func serviceKey(namespace, name string) string { return namespace + "/" + name }

// serviceFor returns the entry for namespace/name, making it.
func (x *index) serviceFor(namespace, name string) *service {
	key := serviceKey(namespace, name)
	s := x.services[key]
	if s == nil {
		s = &service{key: key, slices: map[string]*discoveryv1.EndpointSlice{}}
		x.services[key] = s
	}
	return s
}

func (x *index) setService(svc *corev1.Service) {
	x.svcMu.Lock()
	defer x.svcMu.Unlock()
	s := x.serviceFor(svc.Namespace, svc.Name)
	s.svc = svc
	x.rebuild(s)
}

func (x *index) deleteService(svc *corev1.Service) {
	x.svcMu.Lock()
	defer x.svcMu.Unlock()
	s := x.services[serviceKey(svc.Namespace, svc.Name)]
	if s == nil {
		return
	}
	s.svc = nil
	x.rebuild(s)
}

// sliceService is the Service a slice belongs to: its kubernetes.io/service-name label.
// A slice without it belongs to no Service (someone else's) and is left out.
func sliceService(sl *discoveryv1.EndpointSlice) string {
	return sl.Labels[discoveryv1.LabelServiceName]
}

func (x *index) setSlice(old, sl *discoveryv1.EndpointSlice) {
	x.svcMu.Lock()
	defer x.svcMu.Unlock()
	if old != nil && sliceService(old) != "" && sliceService(old) != sliceService(sl) {
		x.removeSlice(old)
	}
	name := sliceService(sl)
	if name == "" {
		return
	}
	s := x.serviceFor(sl.Namespace, name)
	s.slices[sl.Name] = sl
	x.rebuild(s)
}

func (x *index) deleteSlice(sl *discoveryv1.EndpointSlice) {
	x.svcMu.Lock()
	defer x.svcMu.Unlock()
	x.removeSlice(sl)
}

func (x *index) removeSlice(sl *discoveryv1.EndpointSlice) {
	s := x.services[serviceKey(sl.Namespace, sliceService(sl))]
	if s == nil {
		return
	}
	if _, ok := s.slices[sl.Name]; !ok {
		return
	}
	delete(s.slices, sl.Name)
	x.rebuild(s)
}

// rebuild replaces s's view with one made from its Service and slices now, and moves
// the VIP and endpoint entries over. Called with svcMu held.
func (x *index) rebuild(s *service) {
	var next *view
	if s.svc != nil {
		next = buildView(s.svc, s.slices)
	}
	if next == nil && s.svc == nil && len(s.slices) == 0 {
		delete(x.services, s.key)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	old := s.view
	if old != nil {
		for _, ep := range old.eps {
			refs := slices.DeleteFunc(x.epByIP[ep.ip], func(r endpointOf) bool { return r.svc == s })
			if len(refs) == 0 {
				delete(x.epByIP, ep.ip)
			} else {
				x.epByIP[ep.ip] = refs
			}
		}
		for _, vip := range old.svc.VIPs {
			for _, p := range old.ports {
				key := netip.AddrPortFrom(vip, p.port)
				if r, ok := x.byVIP[key]; ok && r.svc == s {
					delete(x.byVIP, key)
				}
			}
		}
	}
	s.view = next
	if next == nil {
		return
	}
	for _, vip := range next.svc.VIPs {
		for i, p := range next.ports {
			// A VIP belongs to one Service; should two claim it (one deleted and its VIP
			// reused before the delete arrived), the later write wins.
			x.byVIP[netip.AddrPortFrom(vip, p.port)] = vipRef{s, i}
		}
	}
	for _, ep := range next.eps {
		refs := x.epByIP[ep.ip]
		i, _ := slices.BinarySearchFunc(refs, s.key, func(r endpointOf, key string) int { return strings.Compare(r.svc.key, key) })
		x.epByIP[ep.ip] = slices.Insert(refs, i, endpointOf{svc: s, ports: ep.ports, anyPort: ep.anyPort})
	}
}

// buildView makes the view of a Service from its slices. Only TCP ports count (the proxy
// carries TCP). Headless services (clusterIP None) have no VIP: connections go to the pod
// IPs, and the view only serves ServiceOf. ExternalName services have no endpoints.
func buildView(svc *corev1.Service, bySlice map[string]*discoveryv1.EndpointSlice) *view {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	meta := &workload.Service{Name: svc.Name, Namespace: svc.Namespace}
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		ips := svc.Spec.ClusterIPs
		if len(ips) == 0 && svc.Spec.ClusterIP != "" {
			ips = []string{svc.Spec.ClusterIP}
		}
		for _, s := range ips {
			if a, err := netip.ParseAddr(s); err == nil && !slices.Contains(meta.VIPs, a.Unmap()) {
				meta.VIPs = append(meta.VIPs, a.Unmap())
			}
		}
	}
	var sports []corev1.ServicePort
	for _, p := range svc.Spec.Ports {
		if (p.Protocol == corev1.ProtocolTCP || p.Protocol == "") && p.Port > 0 && p.Port <= 65535 {
			sports = append(sports, p)
		}
	}
	anyPort := len(svc.Spec.Ports) == 0 && svc.Spec.ClusterIP == corev1.ClusterIPNone
	v := &view{svc: meta, ports: make([]portView, len(sports))}
	for i, sp := range sports {
		v.ports[i].port = uint16(sp.Port)
		meta.Ports = append(meta.Ports, workload.ServicePort{Port: uint16(sp.Port), TargetPort: numericTarget(sp)})
	}

	// Slices in name order, so that the endpoint order (and the round robin) does not
	// depend on map order.
	names := make([]string, 0, len(bySlice))
	for n := range bySlice {
		names = append(names, n)
	}
	slices.Sort(names)
	seen := make([]map[netip.Addr]struct{}, len(sports)) // per port: ready addresses taken
	for i := range seen {
		seen[i] = map[netip.Addr]struct{}{}
	}
	epPorts := map[netip.Addr][]uint16{}
	var epOrder []netip.Addr
	seenUID := map[string]struct{}{}
	targets := make([]uint16, len(sports))
	for _, n := range names {
		sl := bySlice[n]
		var fam int
		switch sl.AddressType {
		case discoveryv1.AddressTypeIPv4:
			fam = 0
		case discoveryv1.AddressTypeIPv6:
			fam = 1
		default:
			continue // FQDN: nothing the proxy can dial by address
		}
		for i, sp := range sports {
			targets[i] = targetPort(sp, sl)
			if sp.TargetPort.Type == intstr.String && meta.Ports[i].TargetPort == 0 {
				meta.Ports[i].TargetPort = targets[i] // the first resolution, for information
			}
		}
		for e := range sl.Endpoints {
			ep := &sl.Endpoints[e]
			// The API's rule: a missing ready condition means ready.
			ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			if r := ep.TargetRef; r != nil && r.Kind == "Pod" && r.UID != "" {
				if _, dup := seenUID[string(r.UID)]; !dup {
					seenUID[string(r.UID)] = struct{}{}
					meta.Endpoints = append(meta.Endpoints, workload.EndpointInfo{UID: string(r.UID), Ready: ready})
				}
			}
			for _, s := range ep.Addresses {
				a, err := netip.ParseAddr(s)
				if err != nil {
					continue
				}
				a = a.Unmap()
				if _, ok := epPorts[a]; !ok {
					epOrder = append(epOrder, a)
					epPorts[a] = nil
				}
				for i, t := range targets {
					if t == 0 {
						continue // a named port this slice does not resolve
					}
					if !slices.Contains(epPorts[a], t) {
						epPorts[a] = append(epPorts[a], t)
					}
					if _, dup := seen[i][a]; ready && !dup {
						seen[i][a] = struct{}{}
						v.ports[i].ready[fam] = append(v.ports[i].ready[fam], endpoint{addr: netip.AddrPortFrom(a, t), ref: ep.TargetRef})
					}
				}
			}
		}
	}
	v.eps = make([]endpointPorts, 0, len(epOrder))
	for _, a := range epOrder {
		ports := epPorts[a]
		slices.Sort(ports)
		if len(ports) == 0 && !anyPort {
			continue
		}
		v.eps = append(v.eps, endpointPorts{ip: a, ports: ports, anyPort: anyPort})
	}
	return v
}

// numericTarget is a service port's target port when the Service names it by number (or
// not at all: then it is the port itself); 0 when it is named.
func numericTarget(sp corev1.ServicePort) uint16 {
	switch {
	case sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal > 0 && sp.TargetPort.IntVal <= 65535:
		return uint16(sp.TargetPort.IntVal)
	case sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal == 0, sp.TargetPort.Type == intstr.String && sp.TargetPort.StrVal == "":
		return uint16(sp.Port)
	}
	return 0
}

// targetPort is the port a service port reaches on the endpoints of slice sl. A named
// target port is resolved per pod (pods may number a name differently), which the
// EndpointSlice controller has done: it groups pods by the numbers and lists, under the
// service port's name, the number for that slice's pods. 0: the slice does not resolve it.
func targetPort(sp corev1.ServicePort, sl *discoveryv1.EndpointSlice) uint16 {
	if n := numericTarget(sp); n != 0 || sp.TargetPort.Type == intstr.Int {
		return n
	}
	for _, p := range sl.Ports {
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		if name == sp.Name && proto == corev1.ProtocolTCP && p.Port != nil && *p.Port > 0 && *p.Port <= 65535 {
			return uint16(*p.Port)
		}
	}
	return 0
}

// The workload.Store methods: safe for concurrent use; they allocate nothing.

func (x *index) WorkloadByIP(ip netip.Addr) (*workload.Workload, bool) {
	x.mu.RLock()
	w, ok := x.byIP[ip.Unmap()]
	x.mu.RUnlock()
	return w, ok
}

func (x *index) WorkloadByUID(uid string) (*workload.Workload, bool) {
	x.mu.RLock()
	w, ok := x.pods[uid]
	x.mu.RUnlock()
	return w, ok
}

// Resolve maps a service VIP and port to a ready endpoint (round robin, the VIP's address
// family first) and its target port, and a pod IP to its pod. An endpoint that is no pod
// in the index (outside the mesh) comes back as a Workload with InMesh false, named after
// the slice's targetRef when it has one: the proxy passes such connections through as
// plain TCP. A service without a ready endpoint returns its Service and false.
func (x *index) Resolve(dst netip.AddrPort) (workload.Target, bool) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	x.mu.RLock()
	defer x.mu.RUnlock()
	if r, ok := x.byVIP[dst]; ok && r.svc.view != nil {
		v := r.svc.view
		p := &v.ports[r.port]
		fam := 0
		if dst.Addr().Is6() {
			fam = 1
		}
		eps := p.ready[fam]
		if len(eps) == 0 {
			eps = p.ready[1-fam]
		}
		if len(eps) == 0 {
			return workload.Target{Service: v.svc}, false
		}
		e := &eps[x.rr.Add(1)%uint64(len(eps))]
		w := x.byIP[e.addr.Addr()]
		if w == nil {
			w = e.standInWorkload()
		}
		return workload.Target{Workload: w, Addr: e.addr, Service: v.svc}, true
	}
	if w, ok := x.byIP[dst.Addr()]; ok {
		return workload.Target{Workload: w, Addr: dst}, true
	}
	return workload.Target{}, false
}

func (e *endpoint) standInWorkload() *workload.Workload {
	if w := e.standIn.Load(); w != nil {
		return w
	}
	w := &workload.Workload{IPs: []netip.Addr{e.addr.Addr()}}
	if r := e.ref; r != nil && r.Kind == "Pod" {
		w.UID, w.Name, w.Namespace = string(r.UID), r.Name, r.Namespace
	}
	e.standIn.CompareAndSwap(nil, w)
	return e.standIn.Load()
}

// ServiceOf names the service, first by namespace/name, that has one of pod uid's IPs
// among its endpoints (ready or not) with a port targeting port: for the destination's
// telemetry, which sees a pod IP and not a VIP. ztunnel guesses the same way.
func (x *index) ServiceOf(uid string, port uint16) (*workload.Service, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	w := x.pods[uid]
	if w == nil {
		return nil, false
	}
	var best *service
	for _, ip := range w.IPs {
		for _, r := range x.epByIP[ip] {
			if best != nil && cmp.Compare(r.svc.key, best.key) >= 0 {
				break // refs are sorted by key: nothing better after this one
			}
			if r.svc.view != nil && (r.anyPort || slices.Contains(r.ports, port)) {
				best = r.svc
				break
			}
		}
	}
	if best == nil {
		return nil, false
	}
	return best.view.svc, true
}

var _ workload.Store = (*index)(nil)
