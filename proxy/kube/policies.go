package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istiov1 "istio.io/client-go/pkg/informers/externalversions/security/v1"
	istiov1beta1 "istio.io/client-go/pkg/informers/externalversions/security/v1beta1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/tools/cache"

	"github.com/nftmesh/nftmesh/policy"
)

// The AuthorizationPolicy resource.
const (
	SecurityGroup  = "security.istio.io"
	PolicyResource = "authorizationpolicies"
)

// policyVersion is the version of security.istio.io to watch AuthorizationPolicies in:
// v1 when the API server serves it (Istio 1.22 and later), else v1beta1; "" when neither
// is served (the CRD is not installed, or not Established yet: the API server lists a
// CRD's versions in discovery only once it is). Both versions are views of the same
// stored objects, so one is watched, never both (each policy would come twice).
func policyVersion(d discovery.DiscoveryInterface) (string, error) {
	for _, v := range []string{"v1", "v1beta1"} {
		list, err := d.ServerResourcesForGroupVersion(SecurityGroup + "/" + v)
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("discovery of %s/%s: %w", SecurityGroup, v, err)
		}
		for _, r := range list.APIResources {
			if r.Name == PolicyResource {
				return v, nil
			}
		}
	}
	return "", nil
}

// policySync keeps a policy.Store equal to the API server's AuthorizationPolicies. The
// informer's handlers only note which objects changed; one goroutine reads each one's
// current state from the informer's cache, translates it and writes the store, many
// changes in one Put where it can (each write re-indexes the namespaces it touches, and
// bumps the generation on which the proxy re-checks live connections).
type policySync struct {
	store   *policy.Store
	opts    policy.Options
	version string
	inf     cache.SharedIndexInformer
	reg     cache.ResourceEventHandlerRegistration
	log     *slog.Logger

	mu      sync.Mutex
	pending map[string]struct{} // namespace/name keys changed since the last apply
	kick    chan struct{}

	applyMu sync.Mutex // one apply at a time: the worker's, or Start's first
}

func newPolicySync(client istioclient.Interface, version string, store *policy.Store, log *slog.Logger) (*policySync, error) {
	ps := &policySync{
		store: store, version: version, log: log,
		opts:    policy.Options{RootNamespace: store.Snapshot().RootNamespace()},
		pending: map[string]struct{}{}, kick: make(chan struct{}, 1),
	}
	switch version {
	case "v1":
		ps.inf = istiov1.NewAuthorizationPolicyInformer(client, metav1.NamespaceAll, 0, cache.Indexers{})
	case "v1beta1":
		ps.inf = istiov1beta1.NewAuthorizationPolicyInformer(client, metav1.NamespaceAll, 0, cache.Indexers{})
	default:
		return nil, fmt.Errorf("%s version %q", SecurityGroup, version)
	}
	if err := ps.inf.SetTransform(stripPolicy); err != nil {
		return nil, err
	}
	reg, err := ps.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    ps.changed,
		UpdateFunc: func(_, obj any) { ps.changed(obj) },
		DeleteFunc: ps.changed,
	})
	if err != nil {
		return nil, err
	}
	ps.reg = reg
	return ps, nil
}

func (ps *policySync) changed(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return
	}
	ps.mu.Lock()
	ps.pending[key] = struct{}{}
	ps.mu.Unlock()
	select {
	case ps.kick <- struct{}{}:
	default: // a kick is pending: the worker will see this key too
	}
}

// run starts the informer and applies changes until ctx ends.
func (ps *policySync) run(ctx context.Context) {
	go ps.inf.RunWithContext(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-ps.kick:
			ps.apply()
		}
	}
}

// apply writes the pending changes to the store.
func (ps *policySync) apply() {
	ps.applyMu.Lock()
	defer ps.applyMu.Unlock()
	ps.mu.Lock()
	keys := ps.pending
	ps.pending = map[string]struct{}{}
	ps.mu.Unlock()
	var puts []*policy.Policy
	for key := range keys {
		obj, exists, err := ps.inf.GetIndexer().GetByKey(key)
		if err != nil {
			ps.log.Error("kubernetes: AuthorizationPolicy cache", "policy", key, "error", err)
			continue
		}
		if !exists {
			ns, name, _ := cache.SplitMetaNamespaceKey(key)
			ps.store.Delete(ns, name)
			continue
		}
		if p := ps.translate(obj); p != nil {
			puts = append(puts, p)
		}
	}
	if len(puts) == 0 {
		return
	}
	if err := ps.store.Put(puts...); err != nil {
		// Put is all or nothing: put them one by one so that one bad policy keeps only
		// itself out (translate has checked them all, so this is not expected).
		for _, p := range puts {
			if err := ps.store.Put(p); err != nil {
				ps.log.Error("kubernetes: AuthorizationPolicy not enforced", "policy", p.Key(), "error", err)
			}
		}
	}
}

// translate turns a cached object into the policy the store enforces. One that Istio's
// validation would refuse (only possible without Istio's webhook and schema) is enforced
// as an ALLOW policy without rules, over the workloads it selects: they accept only what
// another ALLOW policy allows. Keeping its previous version instead could keep a rule its
// author meant to remove; dropping it could open what a DENY policy closed.
func (ps *policySync) translate(obj any) *policy.Policy {
	var (
		p    *policy.Policy
		err  error
		meta *metav1.ObjectMeta
		sel  map[string]string
		has  bool
	)
	switch ap := obj.(type) {
	case *securityv1.AuthorizationPolicy:
		p, err = policy.FromV1(ap, ps.opts)
		meta, sel, has = &ap.ObjectMeta, ap.Spec.GetSelector().GetMatchLabels(), ap.Spec.GetSelector() != nil
	case *securityv1beta1.AuthorizationPolicy:
		p, err = policy.FromV1beta1(ap, ps.opts)
		meta, sel, has = &ap.ObjectMeta, ap.Spec.GetSelector().GetMatchLabels(), ap.Spec.GetSelector() != nil
	default:
		ps.log.Error("kubernetes: unexpected object in the AuthorizationPolicy cache", "type", fmt.Sprintf("%T", obj))
		return nil
	}
	if err == nil {
		for _, w := range p.Warnings {
			ps.log.Warn("kubernetes: AuthorizationPolicy enforced in part", "policy", p.Key(), "warning", w.String())
		}
		return p
	}
	p = failClosed(meta, sel, has, ps.opts.RootNamespace, err)
	ps.log.Error("kubernetes: invalid AuthorizationPolicy: enforced as an ALLOW policy without rules (fail closed)",
		"policy", p.Key(), "error", err)
	return p
}

// failClosed is the stand-in for an invalid policy: ALLOW, no rules, its own selector.
func failClosed(meta *metav1.ObjectMeta, selector map[string]string, hasSelector bool, root string, err error) *policy.Policy {
	p := &policy.Policy{Name: meta.Name, Namespace: meta.Namespace, Action: policy.Allow}
	switch {
	case hasSelector:
		p.Scope = policy.ScopeWorkload
		p.Selector = map[string]string{}
		for k, v := range selector {
			p.Selector[k] = v
		}
	case meta.Namespace == root:
		p.Scope = policy.ScopeGlobal
	default:
		p.Scope = policy.ScopeNamespace
	}
	var fe *policy.FieldError
	msg := err.Error()
	if errors.As(err, &fe) {
		msg = fe.Field + ": " + fe.Detail
	}
	p.Warnings = []policy.Warning{{Policy: p.Key(), Rule: -1,
		Message: "invalid (" + msg + "): enforced as an ALLOW policy without rules, which denies what no other ALLOW policy allows"}}
	return p
}

// waitSynced waits until the informer's first list has reached the store.
func (ps *policySync) waitSynced(ctx context.Context) bool {
	if !cache.WaitForCacheSync(ctx.Done(), ps.reg.HasSynced) {
		return false
	}
	ps.apply()
	return true
}

// awaitCRD looks for the AuthorizationPolicy resource every interval until it is served,
// then starts watching it. Until then there can be no policy, and none is enforced.
func (s *Source) awaitCRD(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		v, err := policyVersion(s.client.Discovery())
		if err != nil {
			s.log.Warn("kubernetes: looking for the AuthorizationPolicy CRD", "error", err)
			continue
		}
		if v == "" {
			continue
		}
		if err := s.startPolicies(ctx, v); err != nil {
			s.log.Error("kubernetes: AuthorizationPolicies", "error", err)
			return
		}
		if ps := s.policySync(); ps != nil && ps.waitSynced(ctx) {
			s.log.Info("kubernetes: AuthorizationPolicy CRD found; policies synced", "version", SecurityGroup+"/"+v,
				"generation", s.opts.Policies.Generation())
		}
		return
	}
}
