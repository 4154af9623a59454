package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/nftmesh/nftmesh/ca"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// SyncTimeout bounds Start's wait for the pod cache, unless ctx ends first.
const SyncTimeout = 2 * time.Minute

// apiTimeout bounds each fallback call to the API server.
const apiTimeout = 5 * time.Second

// byNodeAccount is the pod index: "<node>/<namespace>/<service account>" of each pod
// that counts for a certificate (bound to a node, not finished).
const byNodeAccount = "nodeAccount"

// notFinished is the field selector of the informer and of the fallback list: a pod that
// has finished runs nothing that needs a certificate.
var notFinished = fields.AndSelectors(
	fields.OneTermNotEqualSelector("status.phase", string(corev1.PodFailed)),
	fields.OneTermNotEqualSelector("status.phase", string(corev1.PodSucceeded)),
)

// NodeAuthorizer is ca.Authorizer for node proxies: a caller may have a certificate for
// its own identity, and a trusted node proxy for the identity of any pod on its node, as
// istiod's node authorizer decides (security/pkg/server/ca/node_auth.go, docs/ca.md).
//
// It keeps a cache of every unfinished pod in the cluster (an informer, stripped to the
// name, UID, node, ServiceAccount and phase), indexed by node and ServiceAccount, so that
// a decision is a map lookup. The cache is eventually consistent: a proxy asks for a
// pod's certificate as soon as the node agent reports the pod, which can be before the
// informer hears of it. A miss is therefore asked of the API server once, a cheap,
// narrow request; only a miss that the API server confirms is refused.
type NodeAuthorizer struct {
	client      kubernetes.Interface
	trusted     map[string]bool // "ns/sa"
	trustedList string          // as given, for messages
	log         *slog.Logger
	pods        cache.SharedIndexInformer
	lastErr     atomic.Pointer[error] // the informer's last list or watch failure
}

var _ ca.Authorizer = (*NodeAuthorizer)(nil)

// NewNodeAuthorizer prepares the authorizer; trustedAccounts are the node proxies'
// ServiceAccounts ("<namespace>/<name>", as istiod's CA_TRUSTED_NODE_ACCOUNTS), the only
// callers that may ask for another identity than their own. None means no caller may.
// client should come from RESTConfig (protobuf: every pod of the cluster is listed).
// Start runs it.
func NewNodeAuthorizer(client kubernetes.Interface, trustedAccounts []string, log *slog.Logger) (*NodeAuthorizer, error) {
	if log == nil {
		log = slog.Default()
	}
	a := &NodeAuthorizer{client: client, trusted: map[string]bool{}, log: log}
	var names []string
	for _, acct := range trustedAccounts {
		ns, sa, ok := strings.Cut(strings.TrimSpace(acct), "/")
		if !ok || ns == "" || sa == "" || strings.Contains(sa, "/") {
			return nil, fmt.Errorf("trusted account %q: want <namespace>/<service account>", acct)
		}
		if !a.trusted[ns+"/"+sa] {
			a.trusted[ns+"/"+sa] = true
			names = append(names, ns+"/"+sa)
		}
	}
	a.trustedList = strings.Join(names, ", ")
	if a.trustedList == "" {
		a.trustedList = "none"
	}
	// No resync: every change comes as an event, and nothing is retried.
	a.pods = coreinformers.NewFilteredPodInformer(client, metav1.NamespaceAll, 0,
		cache.Indexers{byNodeAccount: nodeAccountIndex},
		func(o *metav1.ListOptions) { o.FieldSelector = notFinished.String() })
	if err := a.pods.SetTransform(stripPod); err != nil {
		return nil, err
	}
	if err := a.pods.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		a.lastErr.Store(&err)
		cache.DefaultWatchErrorHandler(ctx, r, err)
	}); err != nil {
		return nil, err
	}
	return a, nil
}

// Start runs the pod informer until ctx ends and waits until its cache holds every pod,
// for at most SyncTimeout or until ctx ends. Pass the server's lifetime context: the cache
// stops with it.
func (a *NodeAuthorizer) Start(ctx context.Context) error {
	go a.pods.RunWithContext(ctx)
	wctx, cancel := context.WithTimeout(ctx, SyncTimeout)
	defer cancel()
	began := time.Now()
	if !cache.WaitForCacheSync(wctx.Done(), a.pods.HasSynced) {
		if ctx.Err() != nil {
			return fmt.Errorf("kubernetes: stopped before the pod cache synced: %w", context.Cause(ctx))
		}
		why := "no answer"
		if err := a.lastErr.Load(); err != nil {
			why = (*err).Error()
		}
		return fmt.Errorf("kubernetes: pods not listed after %v (may the CA's ServiceAccount list and watch pods?): %s", SyncTimeout, why)
	}
	a.log.Info("ca: pod cache synced", "pods", len(a.pods.GetStore().ListKeys()),
		"took", time.Since(began).Round(time.Millisecond), "trustedAccounts", a.trustedList)
	return nil
}

// Authorize decides whether caller may have a certificate for id:
//   - its own identity (namespace and ServiceAccount; the trust domain is the server's
//     business): yes, with no further check, as istiod;
//   - another: only a trusted account (NewNodeAuthorizer's list), with a pod-bound token
//     whose pod still exists (same UID, same ServiceAccount, not finished), and only for
//     an identity with a pod on that pod's node. The node is the token's (the pod's node
//     when the token was minted) or else the pod's; the two must agree. istiod reads only
//     the pod's.
//
// A refusal is a ca.Refusal naming the caller, the identity and why; other errors (the
// cache not started, the API server unreachable) are the CA's own failures.
func (a *NodeAuthorizer) Authorize(ctx context.Context, caller ca.Caller, id identity.ID) error {
	if caller.Namespace == "" || caller.ServiceAccount == "" {
		return ca.Refuse("unauthenticated", fmt.Errorf("a caller with no ServiceAccount asks for %v", id))
	}
	if id.Namespace == caller.Namespace && id.ServiceAccount == caller.ServiceAccount {
		return nil // its own identity: no impersonation
	}
	if !a.pods.HasSynced() {
		return errors.New("kubernetes: the pod cache has not synced (NodeAuthorizer.Start)")
	}
	account := caller.Namespace + "/" + caller.ServiceAccount
	if !a.trusted[account] {
		return ca.Refuse("untrusted-caller", fmt.Errorf("%v asks for %v, another identity, but its ServiceAccount %s is not in --trusted-accounts (%s)",
			caller, id, account, a.trustedList))
	}
	if caller.PodName == "" || caller.PodUID == "" {
		return ca.Refuse("unbound-token", fmt.Errorf("%v asks for %v, another identity, with a token bound to no pod (use a projected serviceAccountToken volume)",
			caller, id))
	}

	pod, err := a.callerPod(ctx, caller)
	if err != nil {
		return err
	}
	why := ""
	switch {
	case pod == nil:
		why = "is gone"
	case string(pod.UID) != caller.PodUID:
		why = fmt.Sprintf("has UID %s now, the token's is %s (the pod was replaced)", pod.UID, caller.PodUID)
	case pod.Spec.ServiceAccountName != caller.ServiceAccount:
		why = fmt.Sprintf("runs as ServiceAccount %s, not the token's", pod.Spec.ServiceAccountName)
	case finished(pod):
		why = fmt.Sprintf("has finished (phase %s)", pod.Status.Phase)
	}
	if why != "" {
		return ca.Refuse("caller-pod-gone", fmt.Errorf("%v asks for %v, but its pod %s/%s %s",
			caller, id, caller.Namespace, caller.PodName, why))
	}

	node := caller.NodeName
	switch podNode := pod.Spec.NodeName; {
	case node != "" && podNode != "" && node != podNode:
		return ca.Refuse("caller-node-mismatch", fmt.Errorf("%v asks for %v, but its token was minted for node %s and its pod %s/%s is on node %s",
			caller, id, node, caller.Namespace, caller.PodName, podNode))
	case node == "":
		node = podNode
	}
	if node == "" {
		return ca.Refuse("caller-node-unknown", fmt.Errorf("%v asks for %v, but neither its token nor its pod %s/%s names a node",
			caller, id, caller.Namespace, caller.PodName))
	}

	on, err := a.podOnNode(ctx, node, id)
	if err != nil {
		return err
	}
	if !on {
		return ca.Refuse("no-pod-on-node", fmt.Errorf("%v asks for %v, but no running pod of ServiceAccount %s/%s is on node %s",
			caller, id, id.Namespace, id.ServiceAccount, node))
	}
	return nil
}

// callerPod is the caller's pod from the cache, or else (a miss, or an older pod of that
// name) from the API server; nil if there is none.
func (a *NodeAuthorizer) callerPod(ctx context.Context, caller ca.Caller) (*corev1.Pod, error) {
	obj, ok, _ := a.pods.GetIndexer().GetByKey(caller.Namespace + "/" + caller.PodName)
	if ok {
		if p := obj.(*corev1.Pod); string(p.UID) == caller.PodUID {
			return p, nil
		}
	}
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	p, err := a.client.CoreV1().Pods(caller.Namespace).Get(ctx, caller.PodName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("kubernetes: get the pod %s/%s of caller %v: %w", caller.Namespace, caller.PodName, caller, err)
	}
	if string(p.UID) == caller.PodUID {
		a.log.Debug("ca: the caller's pod was not in the cache yet; the API server has it", "caller", caller.String())
	}
	return p, nil
}

// podOnNode reports whether some pod of id's ServiceAccount is on node and not finished:
// from the index, or else from one list of the API server's.
func (a *NodeAuthorizer) podOnNode(ctx context.Context, node string, id identity.ID) (bool, error) {
	if keys, _ := a.pods.GetIndexer().IndexKeys(byNodeAccount, nodeAccountKey(node, id.Namespace, id.ServiceAccount)); len(keys) > 0 {
		return true, nil
	}
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	// The API server serves this from its watch cache (indexed by spec.nodeName), scoped to
	// one namespace: a handful of pods at most.
	list, err := a.client.CoreV1().Pods(id.Namespace).List(ctx, metav1.ListOptions{
		FieldSelector: fields.AndSelectors(
			fields.OneTermEqualSelector("spec.nodeName", node),
			fields.OneTermEqualSelector("spec.serviceAccountName", id.ServiceAccount),
			notFinished,
		).String(),
	})
	if err != nil {
		return false, fmt.Errorf("kubernetes: list the pods of ServiceAccount %s/%s on node %s: %w", id.Namespace, id.ServiceAccount, node, err)
	}
	for i := range list.Items {
		if p := &list.Items[i]; p.Spec.NodeName == node && p.Spec.ServiceAccountName == id.ServiceAccount && !finished(p) {
			a.log.Debug("ca: a pod was not in the cache yet; the API server has it",
				"pod", p.Namespace+"/"+p.Name, "node", node)
			return true, nil
		}
	}
	return false, nil
}

// finished reports a pod that will run nothing more. istiod counts Succeeded pods (its
// informer drops only Failed ones); a finished pod needs no certificate. A terminating
// pod (deletionTimestamp set) still counts, as in istiod: it is draining connections.
func finished(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded
}

func nodeAccountKey(node, ns, sa string) string { return node + "/" + ns + "/" + sa }

// nodeAccountIndex indexes a pod by node and ServiceAccount; a pod with neither, or
// finished, is not indexed.
func nodeAccountIndex(obj any) ([]string, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok || p.Spec.NodeName == "" || p.Spec.ServiceAccountName == "" || finished(p) {
		return nil, nil
	}
	return []string{nodeAccountKey(p.Spec.NodeName, p.Namespace, p.Spec.ServiceAccountName)}, nil
}

// stripPod keeps what the authorizer reads, so that the cache of every pod of the cluster
// stays small.
func stripPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a tombstone
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: p.Name, Namespace: p.Namespace, UID: p.UID,
			ResourceVersion: p.ResourceVersion, DeletionTimestamp: p.DeletionTimestamp,
		},
		Spec:   corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName},
		Status: corev1.PodStatus{Phase: p.Status.Phase},
	}, nil
}
