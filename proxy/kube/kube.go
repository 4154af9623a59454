// Package kube is the node proxy's Kubernetes source: pods, Services and EndpointSlices
// from the API server into a workload.Store, and Istio AuthorizationPolicies into a
// policy.Store, both kept current by client-go informers. It is the one package on the
// proxy's side that talks to the API server.
//
// What it watches, cluster-wide (a node's proxy dials any pod of the mesh):
//   - Pods, except host-network ones (the node's IP, never a mesh workload) and finished
//     ones (Succeeded, Failed: their IPs go to new pods). A pod is in the mesh when the
//     node agent has annotated it ambient.istio.io/redirection=enabled.
//   - Services and discovery.k8s.io/v1 EndpointSlices: a VIP and TCP port to the ready
//     endpoints and their target ports (a named target port is resolved per slice, as the
//     EndpointSlice controller wrote it). Headless services have no VIP but still name
//     the service of a pod's port. An endpoint IP that is no pod's is outside the mesh.
//   - security.istio.io AuthorizationPolicies, v1 or (on clusters that serve only it)
//     v1beta1: the same objects either way. Until the CRD is served there are none; the
//     source looks for it again every CRDPollInterval.
//
// Namespaces are not watched: the policy package needs a policy's namespace (its
// metadata) and a workload's (its pod's), and the root namespace is configuration
// (Istio's comes from the mesh config, not from a Namespace object).
//
// Memory stays flat as the cluster grows: each informer strips its objects to the fields
// the proxy reads before they are cached (managed fields, most of the spec and status,
// other annotations go; a pod is cached as the Workload the index serves), and the index
// shares their strings and label maps.
package kube

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/workload"
)

// Defaults of Options.
const (
	DefaultSyncTimeout     = 2 * time.Minute
	DefaultCRDPollInterval = 10 * time.Second
)

// Options configure a Source.
type Options struct {
	// Policies receives the cluster's AuthorizationPolicies, translated with its root
	// namespace. nil: policies are not watched.
	Policies *policy.Store
	// SyncTimeout bounds Start's wait for the first full state; default
	// DefaultSyncTimeout. An informer that cannot list (no permission, an object that
	// does not decode) shows in the error.
	SyncTimeout time.Duration
	// CRDPollInterval is how often to look for the AuthorizationPolicy CRD while it is
	// not served; default DefaultCRDPollInterval.
	CRDPollInterval time.Duration
	Log             *slog.Logger
}

// Source is the Kubernetes workload.Store. Its lookups are safe for concurrent use and
// cost a read lock and a map access; informer events update it in place.
type Source struct {
	*index
	client kubernetes.Interface
	istio  istioclient.Interface
	opts   Options
	log    *slog.Logger

	pods, services, slices cache.SharedIndexInformer
	regs                   []namedSync

	mu  sync.Mutex
	pol *policySync // nil until the AuthorizationPolicy resource is found
}

type namedSync struct {
	name   string
	synced func() bool
}

var _ workload.Store = (*Source)(nil)

// RESTConfig loads a kubeconfig file, or the in-cluster configuration (the pod's service
// account) when path is "".
func RESTConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kubernetes: in-cluster configuration (outside a pod, give a kubeconfig): %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: kubeconfig %s: %w", path, err)
	}
	return c, nil
}

// RouteKlog sends client-go's own log lines (klog: a failed watch, a slow list) to log,
// so that they come out in the proxy's format. It changes process-wide state.
func RouteKlog(log *slog.Logger) { klog.SetSlogLogger(log) }

// New prepares the informers; Start runs them.
func New(cfg *rest.Config, o Options) (*Source, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.SyncTimeout <= 0 {
		o.SyncTimeout = DefaultSyncTimeout
	}
	if o.CRDPollInterval <= 0 {
		o.CRDPollInterval = DefaultCRDPollInterval
	}
	cfg = rest.CopyConfig(cfg)
	if cfg.UserAgent == "" {
		cfg.UserAgent = "nftmesh-proxy"
	}
	// Informers make a handful of requests (a list and a watch each, again after a
	// watch expires): client-go's default 5 QPS only slows the start.
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = 50, 100
	}
	// Istio's types decode from JSON only; Kubernetes' own are cheaper in protobuf, which
	// matters when 10,000 pods are listed at once.
	coreCfg := rest.CopyConfig(cfg)
	coreCfg.ContentType = "application/vnd.kubernetes.protobuf"
	coreCfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	client, err := kubernetes.NewForConfig(coreCfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	ic, err := istioclient.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	return newSource(client, ic, o)
}

func newSource(client kubernetes.Interface, ic istioclient.Interface, o Options) (*Source, error) {
	s := &Source{index: newIndex(), client: client, istio: ic, opts: o, log: o.Log}
	// No resync: every change comes as an event; there is nothing to retry. No indexers:
	// the namespace index would cost memory per object and nothing looks it up.
	s.pods = coreinformers.NewFilteredPodInformer(client, metav1.NamespaceAll, 0, cache.Indexers{},
		func(lo *metav1.ListOptions) {
			lo.FieldSelector = "spec.hostNetwork=false,status.phase!=Succeeded,status.phase!=Failed"
		})
	s.services = coreinformers.NewServiceInformer(client, metav1.NamespaceAll, 0, cache.Indexers{})
	s.slices = discoveryinformers.NewEndpointSliceInformer(client, metav1.NamespaceAll, 0, cache.Indexers{})
	for _, t := range []struct {
		name string
		inf  cache.SharedIndexInformer
		fn   cache.TransformFunc
		h    cache.ResourceEventHandler
	}{
		{"pods", s.pods, stripPod, cache.ResourceEventHandlerFuncs{
			AddFunc: func(obj any) {
				if p, ok := obj.(*podEntry); ok {
					s.setPod(nil, p)
				}
			},
			UpdateFunc: func(old, obj any) {
				o, _ := old.(*podEntry)
				if p, ok := obj.(*podEntry); ok {
					s.setPod(o, p)
				}
			},
			DeleteFunc: func(obj any) {
				if p, ok := tombstone(obj).(*podEntry); ok {
					s.deletePod(p)
				}
			},
		}},
		{"services", s.services, stripService, cache.ResourceEventHandlerFuncs{
			AddFunc: func(obj any) {
				if svc, ok := obj.(*corev1.Service); ok {
					s.setService(svc)
				}
			},
			UpdateFunc: func(_, obj any) {
				if svc, ok := obj.(*corev1.Service); ok {
					s.setService(svc)
				}
			},
			DeleteFunc: func(obj any) {
				if svc, ok := tombstone(obj).(*corev1.Service); ok {
					s.deleteService(svc)
				}
			},
		}},
		{"endpointslices", s.slices, stripSlice, cache.ResourceEventHandlerFuncs{
			AddFunc: func(obj any) {
				if sl, ok := obj.(*discoveryv1.EndpointSlice); ok {
					s.setSlice(nil, sl)
				}
			},
			UpdateFunc: func(old, obj any) {
				o, _ := old.(*discoveryv1.EndpointSlice)
				if sl, ok := obj.(*discoveryv1.EndpointSlice); ok {
					s.setSlice(o, sl)
				}
			},
			DeleteFunc: func(obj any) {
				if sl, ok := tombstone(obj).(*discoveryv1.EndpointSlice); ok {
					s.deleteSlice(sl)
				}
			},
		}},
	} {
		if err := t.inf.SetTransform(t.fn); err != nil {
			return nil, fmt.Errorf("kubernetes: %s informer: %w", t.name, err)
		}
		reg, err := t.inf.AddEventHandler(t.h)
		if err != nil {
			return nil, fmt.Errorf("kubernetes: %s informer: %w", t.name, err)
		}
		s.regs = append(s.regs, namedSync{t.name, reg.HasSynced})
	}
	return s, nil
}

// tombstone unwraps the last known state of an object deleted while the watch was away.
func tombstone(obj any) any {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		return t.Obj
	}
	return obj
}

// Start runs the informers until ctx ends and returns once the index holds the API
// server's state: every pod, service and slice, and the AuthorizationPolicies in the
// policy store (a proxy that served before would allow what a policy denies). Without
// the AuthorizationPolicy CRD it does not wait for it: there is no policy to enforce,
// and one found later is watched from then on.
func (s *Source) Start(ctx context.Context) error {
	for _, inf := range []cache.SharedIndexInformer{s.pods, s.services, s.slices} {
		go inf.RunWithContext(ctx)
	}
	wait := slices.Clone(s.regs)
	if s.opts.Policies != nil {
		v, err := policyVersion(s.client.Discovery())
		if err != nil {
			return fmt.Errorf("kubernetes: %w", err)
		}
		if v == "" {
			s.log.Warn("kubernetes: the AuthorizationPolicy CRD (" + PolicyResource + "." + SecurityGroup +
				") is not installed: no policy is enforced until it is")
			go s.awaitCRD(ctx, s.opts.CRDPollInterval)
		} else {
			if err := s.startPolicies(ctx, v); err != nil {
				return err
			}
			wait = append(wait, namedSync{PolicyResource + "." + SecurityGroup + "/" + v, s.policySync().reg.HasSynced})
		}
	}
	sctx, cancel := context.WithTimeout(ctx, s.opts.SyncTimeout)
	defer cancel()
	began := time.Now()
	synced := make([]cache.InformerSynced, len(wait))
	for i, w := range wait {
		synced[i] = w.synced
	}
	if !cache.WaitForCacheSync(sctx.Done(), synced...) {
		var pending []string
		for _, w := range wait {
			if !w.synced() {
				pending = append(pending, w.name)
			}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("kubernetes: stopped before the informers synced: %w", ctx.Err())
		}
		return fmt.Errorf("kubernetes: not synced after %v: %s (client-go's log says why)",
			s.opts.SyncTimeout, strings.Join(pending, ", "))
	}
	if ps := s.policySync(); ps != nil {
		ps.apply() // the first list, in one write, before the proxy serves
	}
	s.index.mu.RLock()
	pods := len(s.index.pods)
	s.index.mu.RUnlock()
	s.index.svcMu.Lock()
	services := len(s.index.services)
	s.index.svcMu.Unlock()
	s.log.Info("kubernetes: synced", "pods", pods, "services", services, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

func (s *Source) startPolicies(ctx context.Context, version string) error {
	ps, err := newPolicySync(s.istio, version, s.opts.Policies, s.log)
	if err != nil {
		return fmt.Errorf("kubernetes: AuthorizationPolicy informer: %w", err)
	}
	s.mu.Lock()
	s.pol = ps
	s.mu.Unlock()
	go ps.run(ctx)
	return nil
}

func (s *Source) policySync() *policySync {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pol
}

// PolicyVersion is the security.istio.io version AuthorizationPolicies are watched in
// ("v1" or "v1beta1"), or "" while the CRD is not served.
func (s *Source) PolicyVersion() string {
	if ps := s.policySync(); ps != nil {
		return ps.version
	}
	return ""
}

// The transforms keep what the index reads and nothing else. Each builds a new object
// from the fields it keeps, so that applying it twice (client-go may, on a relist) gives
// the same result.

// podEntry is what the pod informer caches of a pod: the Workload the index serves, and
// the two facts about the pod it reads besides. A stripped *corev1.Pod would cost 1.2 KB
// of empty fields per pod (the struct alone), more than everything the proxy keeps;
// client-go needs no more of a cached object than its namespace and name (its key).
type podEntry struct {
	w           *workload.Workload
	hostNetwork bool
	terminating bool // being deleted: it yields a shared IP
}

// GetObjectMeta is what client-go keys the entry by (meta.Accessor).
func (p *podEntry) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: p.w.Namespace, Name: p.w.Name}
}

func stripPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a *podEntry already
	}
	return &podEntry{w: workloadOf(p), hostNetwork: p.Spec.HostNetwork, terminating: p.DeletionTimestamp != nil}, nil
}

func stripService(obj any) (any, error) {
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return obj, nil
	}
	out := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: svc.Name, Namespace: svc.Namespace, UID: svc.UID, ResourceVersion: svc.ResourceVersion},
		Spec:       corev1.ServiceSpec{Type: svc.Spec.Type, ClusterIP: svc.Spec.ClusterIP, ClusterIPs: svc.Spec.ClusterIPs},
	}
	if len(svc.Spec.Ports) > 0 {
		out.Spec.Ports = make([]corev1.ServicePort, len(svc.Spec.Ports))
		for i, p := range svc.Spec.Ports {
			out.Spec.Ports[i] = corev1.ServicePort{Name: p.Name, Protocol: p.Protocol, Port: p.Port, TargetPort: p.TargetPort}
		}
	}
	return out, nil
}

func stripSlice(obj any) (any, error) {
	sl, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return obj, nil
	}
	out := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: sl.Name, Namespace: sl.Namespace, UID: sl.UID, ResourceVersion: sl.ResourceVersion},
		AddressType: sl.AddressType,
	}
	if svc, ok := sl.Labels[discoveryv1.LabelServiceName]; ok {
		out.Labels = map[string]string{discoveryv1.LabelServiceName: svc}
	}
	if len(sl.Endpoints) > 0 {
		out.Endpoints = make([]discoveryv1.Endpoint, len(sl.Endpoints))
		for i := range sl.Endpoints {
			e := &sl.Endpoints[i]
			out.Endpoints[i] = discoveryv1.Endpoint{Addresses: e.Addresses, Conditions: discoveryv1.EndpointConditions{Ready: e.Conditions.Ready}}
			if r := e.TargetRef; r != nil {
				out.Endpoints[i].TargetRef = &corev1.ObjectReference{Kind: r.Kind, Namespace: r.Namespace, Name: r.Name, UID: r.UID}
			}
		}
	}
	if len(sl.Ports) > 0 {
		out.Ports = make([]discoveryv1.EndpointPort, len(sl.Ports))
		for i, p := range sl.Ports {
			out.Ports[i] = discoveryv1.EndpointPort{Name: p.Name, Protocol: p.Protocol, Port: p.Port}
		}
	}
	return out, nil
}

// stripPolicy drops what translation does not read: managed fields, annotations (kubectl
// keeps a whole copy of the object in one), labels, owners, status.
func stripPolicy(obj any) (any, error) {
	switch ap := obj.(type) {
	case *securityv1.AuthorizationPolicy:
		ap.Status.Reset()
	case *securityv1beta1.AuthorizationPolicy:
		ap.Status.Reset()
	}
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
		m.SetAnnotations(nil)
		m.SetLabels(nil)
		m.SetOwnerReferences(nil)
	}
	return obj, nil
}
