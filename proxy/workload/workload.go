// Package workload is the proxy's view of the mesh: workloads (pods) and services. Its
// first source is a static YAML file, kept for tests and demos; a Kubernetes source
// implements the same Store interface.
package workload

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"

	"sigs.k8s.io/yaml"
)

// Workload is one pod as the proxy needs to know it.
type Workload struct {
	UID            string            `json:"uid"`
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace"`
	ServiceAccount string            `json:"serviceAccount"`
	IPs            []netip.Addr      `json:"ips"`
	Labels         map[string]string `json:"labels,omitempty"`
	Node           string            `json:"node,omitempty"`
	// InMesh is true for a workload enrolled in the mesh: traffic to it goes over HBONE.
	InMesh bool `json:"inMesh"`
}

// Service maps virtual IPs and ports to workload endpoints.
type Service struct {
	Name      string         `json:"name"`
	Namespace string         `json:"namespace"`
	Hostname  string         `json:"hostname,omitempty"` // default <name>.<namespace>.svc.cluster.local
	VIPs      []netip.Addr   `json:"vips"`
	Ports     []ServicePort  `json:"ports"`
	Endpoints []EndpointInfo `json:"endpoints"`
}

// Host is the service's DNS name, as Istio's destination_service label names it.
func (s *Service) Host() string {
	if s.Hostname != "" {
		return s.Hostname
	}
	return s.Name + "." + s.Namespace + ".svc.cluster.local"
}

// ServicePort is a service port and the workload port it targets.
type ServicePort struct {
	Port       uint16 `json:"port"`
	TargetPort uint16 `json:"targetPort"`
}

// EndpointInfo names a workload behind a service, and whether it is ready.
type EndpointInfo struct {
	UID   string `json:"uid"`
	Ready bool   `json:"ready"`
}

// Store answers the proxy's questions about the mesh. Implementations are safe for
// concurrent use.
type Store interface {
	WorkloadByIP(ip netip.Addr) (*Workload, bool)
	WorkloadByUID(uid string) (*Workload, bool)
	// Resolve maps a destination to the workload and port to connect to: a service VIP
	// and port to a ready endpoint and its target port, a workload IP to itself.
	Resolve(dst netip.AddrPort) (Target, bool)
	// ServiceOf names the service a connection to workload uid's port belongs to, for the
	// destination's telemetry (which sees a pod IP, not a VIP): the first service, in the
	// store's order, with uid among its endpoints and a port targeting port. ztunnel
	// guesses the same way.
	ServiceOf(uid string, port uint16) (*Service, bool)
}

// Target is where a connection goes.
type Target struct {
	Workload *Workload
	Addr     netip.AddrPort // the workload IP and port to reach
	Service  *Service       // nil when dst was a workload IP
}

// File is the static YAML document: `workloads:` and `services:`.
type File struct {
	Workloads []Workload `json:"workloads"`
	Services  []Service  `json:"services"`
}

// Static is a Store built from a File. Replace swaps in a new snapshot atomically.
type Static struct {
	snap atomic.Pointer[snapshot]
	rr   atomic.Uint64 // round robin over ready endpoints
}

type snapshot struct {
	byIP     map[netip.Addr]*Workload
	byUID    map[string]*Workload
	byVIP    map[netip.AddrPort]svcPort
	svcByUID map[string][]*Service // the services with the workload among their endpoints, in file order
}

type svcPort struct {
	svc    *Service
	target uint16
}

// Parse decodes and checks a static workload file strictly.
func Parse(data []byte) (*File, error) {
	var f File
	if len(bytes.TrimSpace(data)) == 0 {
		return &f, nil
	}
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return nil, fmt.Errorf("workloads: %w", err)
	}
	return &f, nil
}

// NewStatic builds a store from f, checking it: unique UIDs and IPs, services whose
// endpoints exist.
func NewStatic(f *File) (*Static, error) {
	s := &Static{}
	if err := s.Replace(f); err != nil {
		return nil, err
	}
	return s, nil
}

// Replace swaps the store's content for f's, or changes nothing and returns an error.
func (s *Static) Replace(f *File) error {
	snap := &snapshot{byIP: map[netip.Addr]*Workload{}, byUID: map[string]*Workload{}, byVIP: map[netip.AddrPort]svcPort{},
		svcByUID: map[string][]*Service{}}
	for i := range f.Workloads {
		w := f.Workloads[i]
		field := fmt.Sprintf("workloads[%d]", i)
		if w.UID == "" || w.Name == "" || w.Namespace == "" {
			return fmt.Errorf("%s: uid, name and namespace are required", field)
		}
		if w.ServiceAccount == "" {
			w.ServiceAccount = "default"
		}
		if _, dup := snap.byUID[w.UID]; dup {
			return fmt.Errorf("%s: uid %q is used twice", field, w.UID)
		}
		snap.byUID[w.UID] = &w
		for _, ip := range w.IPs {
			ip = ip.Unmap()
			if other, dup := snap.byIP[ip]; dup {
				return fmt.Errorf("%s: IP %s is also %s/%s's", field, ip, other.Namespace, other.Name)
			}
			snap.byIP[ip] = &w
		}
	}
	for i := range f.Services {
		svc := f.Services[i]
		field := fmt.Sprintf("services[%d]", i)
		for _, ep := range svc.Endpoints {
			if _, ok := snap.byUID[ep.UID]; !ok {
				return fmt.Errorf("%s: endpoint uid %q is not a workload", field, ep.UID)
			}
			if list := snap.svcByUID[ep.UID]; len(list) == 0 || list[len(list)-1] != &svc {
				snap.svcByUID[ep.UID] = append(list, &svc)
			}
		}
		for _, vip := range svc.VIPs {
			for _, p := range svc.Ports {
				key := netip.AddrPortFrom(vip.Unmap(), p.Port)
				if _, dup := snap.byVIP[key]; dup {
					return fmt.Errorf("%s: %s is used twice", field, key)
				}
				target := p.TargetPort
				if target == 0 {
					target = p.Port
				}
				snap.byVIP[key] = svcPort{&svc, target}
			}
		}
	}
	s.snap.Store(snap)
	return nil
}

func (s *Static) WorkloadByIP(ip netip.Addr) (*Workload, bool) {
	w, ok := s.snap.Load().byIP[ip.Unmap()]
	return w, ok
}

func (s *Static) WorkloadByUID(uid string) (*Workload, bool) {
	w, ok := s.snap.Load().byUID[uid]
	return w, ok
}

func (s *Static) Resolve(dst netip.AddrPort) (Target, bool) {
	snap := s.snap.Load()
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if sp, ok := snap.byVIP[dst]; ok {
		var ready []*Workload
		for _, ep := range sp.svc.Endpoints {
			if w := snap.byUID[ep.UID]; ep.Ready && w != nil && len(w.IPs) > 0 {
				ready = append(ready, w)
			}
		}
		if len(ready) == 0 {
			return Target{Service: sp.svc}, false
		}
		w := ready[s.rr.Add(1)%uint64(len(ready))]
		return Target{Workload: w, Addr: netip.AddrPortFrom(sameFamily(w.IPs, dst.Addr()), sp.target), Service: sp.svc}, true
	}
	if w, ok := snap.byIP[dst.Addr()]; ok {
		return Target{Workload: w, Addr: dst}, true
	}
	return Target{}, false
}

func (s *Static) ServiceOf(uid string, port uint16) (*Service, bool) {
	for _, svc := range s.snap.Load().svcByUID[uid] {
		for _, p := range svc.Ports {
			if p.TargetPort == port || p.TargetPort == 0 && p.Port == port {
				return svc, true
			}
		}
	}
	return nil, false
}

// sameFamily picks the workload IP of the destination's family when it has one.
func sameFamily(ips []netip.Addr, like netip.Addr) netip.Addr {
	if i := slices.IndexFunc(ips, func(ip netip.Addr) bool { return ip.Is4() == like.Is4() }); i >= 0 {
		return ips[i]
	}
	return ips[0]
}
