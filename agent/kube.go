package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// Kube is the agent's Kubernetes side: shared informers for this node's pods (a field
// selector on spec.nodeName) and for namespaces, feeding the Controller; the PodSource the
// CNI path asks; the redirection annotation; and events on pods.
type Kube struct {
	client   kubernetes.Interface
	node     string
	log      *slog.Logger
	podsInf  cache.SharedIndexInformer
	nssInf   cache.SharedIndexInformer
	pods     listersv1.PodLister
	nss      listersv1.NamespaceLister
	factory  informers.SharedInformerFactory
	nsFact   informers.SharedInformerFactory
	recorder record.EventRecorder
	stopRec  func()

	mu      sync.Mutex
	written map[string]bool // pod UID -> the redirection value this agent last wrote
}

// podResync is how often the pod informer re-offers every pod of the node.
const podResync = 5 * time.Minute

// NewKube prepares informers for node's pods and all namespaces; Start runs them.
func NewKube(client kubernetes.Interface, node string, log *slog.Logger) *Kube {
	k := &Kube{client: client, node: node, log: log}
	// Every change arrives as an event and the work queue retries failures itself; the
	// resync re-offers every pod now and then (unchanged ones cost a comparison) so that
	// one a missed event or a lost namespace left out is picked up again. What the agent
	// does not use is dropped before it is cached.
	k.factory = informers.NewSharedInformerFactoryWithOptions(client, podResync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = "spec.nodeName=" + node }),
		informers.WithTransform(stripManagedFields))
	k.nsFact = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(stripManagedFields))
	k.podsInf = k.factory.Core().V1().Pods().Informer()
	k.pods = k.factory.Core().V1().Pods().Lister()
	k.nssInf = k.nsFact.Core().V1().Namespaces().Informer()
	k.nss = k.nsFact.Core().V1().Namespaces().Lister()
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	k.recorder = b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "nftmesh-agent", Host: node})
	k.stopRec = b.Shutdown
	return k
}

func stripManagedFields(obj any) (any, error) {
	if m, ok := obj.(metav1.ObjectMetaAccessor); ok {
		m.GetObjectMeta().SetManagedFields(nil)
	}
	return obj, nil
}

// Watch sends the informers' events to c. Call before Start.
func (k *Kube) Watch(c *Controller) error {
	if _, err := k.podsInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.PodChanged(obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { c.PodChanged(obj.(*corev1.Pod)) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok {
				k.mu.Lock()
				delete(k.written, string(p.UID))
				k.mu.Unlock()
				c.PodDeleted(p)
			}
		},
	}); err != nil {
		return err
	}
	_, err := k.nssInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { c.NamespaceChanged(k.PodsOf(obj.(*corev1.Namespace).Name)) },
		UpdateFunc: func(old, obj any) {
			o, n := old.(*corev1.Namespace), obj.(*corev1.Namespace)
			if o.Labels[LabelDataplaneMode] != n.Labels[LabelDataplaneMode] {
				c.NamespaceChanged(k.PodsOf(n.Name))
			}
		},
	})
	return err
}

// Start runs the informers and waits until their caches hold the API server's state.
func (k *Kube) Start(ctx context.Context) error {
	k.factory.Start(ctx.Done())
	k.nsFact.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), k.podsInf.HasSynced, k.nssInf.HasSynced) {
		return fmt.Errorf("kubernetes: informer caches did not sync: %w", context.Cause(ctx))
	}
	return nil
}

// Stop ends event recording (the informers end with Start's context).
func (k *Kube) Stop() { k.stopRec() }

// PodsOf lists this node's pods in a namespace, from the cache.
func (k *Kube) PodsOf(namespace string) []*corev1.Pod {
	pods, _ := k.pods.Pods(namespace).List(labelsEverything())
	return pods
}

// AllPods lists this node's pods, from the cache.
func (k *Kube) AllPods() []*corev1.Pod {
	pods, _ := k.pods.List(labelsEverything())
	return pods
}

// Pod is PodSource's: the cache, and the API server when the cache lags (a pod is
// created, then scheduled, then its sandbox made: the CNI ADD can beat the watch event).
func (k *Kube) Pod(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	if p, err := k.pods.Pods(namespace).Get(name); err == nil {
		return p, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	p, err := k.client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("kubernetes: %w", err)
	}
	return p, nil
}

// Namespace is PodSource's, from the cache.
func (k *Kube) Namespace(name string) *corev1.Namespace {
	ns, err := k.nss.Get(name)
	if err != nil {
		return nil
	}
	return ns
}

// SetRedirection is Annotator's: ambient.istio.io/redirection=enabled on the pod, or no
// such annotation, patched through the pods/status subresource as Istio does (it needs
// less privilege than patching the pod). A pod already gone needs nothing.
func (k *Kube) SetRedirection(ctx context.Context, pod Pod, enabled bool) error {
	var value any // JSON null removes the annotation in a merge patch
	if enabled {
		value = RedirectionEnabled
	}
	// The cache says what is there, unless it has not yet seen this agent's last write,
	// which was the other value (an enable, then a quick removal, then an enable again):
	// then the cache still shows the first enable, and skipping would leave the pod
	// without its annotation.
	k.mu.Lock()
	last, wrote := k.written[pod.UID]
	k.mu.Unlock()
	if cached, err := k.pods.Pods(pod.Namespace).Get(pod.Name); err == nil && string(cached.UID) == pod.UID && (!wrote || last == enabled) {
		if v, ok := cached.Annotations[AnnotationRedirection]; ok == enabled && (!enabled || v == RedirectionEnabled) {
			return nil
		}
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{
		"annotations": map[string]any{AnnotationRedirection: value},
		"uid":         pod.UID, // a precondition: never annotate a newer pod of the same name
	}})
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := k.client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	if err == nil {
		k.mu.Lock()
		if k.written == nil {
			k.written = map[string]bool{}
		}
		k.written[pod.UID] = enabled
		k.mu.Unlock()
	}
	// The uid precondition fails as 422 Invalid ("metadata.uid: field is immutable"): the
	// name belongs to a newer pod now, and ours is gone.
	replaced := apierrors.IsInvalid(err) || apierrors.IsConflict(err)
	switch {
	case err == nil:
		return nil
	case apierrors.IsNotFound(err) || (!enabled && replaced):
		return nil // nothing to take off a pod that is gone
	case replaced:
		return Permanent(fmt.Errorf("kubernetes: annotate %s: the pod was replaced by a newer one of that name: %w", pod, err))
	}
	return fmt.Errorf("kubernetes: annotate %s: %w", pod, err)
}

// Event records a warning on the pod, for `kubectl describe`.
func (k *Kube) Event(pod Pod, reason, message string) {
	ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID)}
	k.recorder.Event(ref, corev1.EventTypeWarning, reason, message)
}

func labelsEverything() labels.Selector { return labels.Everything() }
