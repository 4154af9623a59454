package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	corev1 "k8s.io/api/core/v1"

	"github.com/nftmesh/nftmesh/agent/cniapi"
)

// PodSource answers the CNI path's question "what is this pod?": the informer cache, and
// the API server when the cache has not seen the pod yet.
type PodSource interface {
	Pod(ctx context.Context, namespace, name string) (*corev1.Pod, error)
	Namespace(name string) *corev1.Namespace // nil when unknown
}

// Controller turns what the CNI plugin and the informers report into work for the Queue:
// it decides (Selector), remembers where each pod's network namespace is, and submits
// enroll or remove. Both entry points go through the same Queue, so a CNI ADD and an
// informer event for one pod never race.
type Controller struct {
	Selector Selector
	Queue    *Queue[Work]
	Enroller *Enroller
	Source   PodSource
	// FindNetNS locates a running pod's namespace when no CNI ADD told us (pods that ran
	// before the agent started): the /proc scan. nil: unknown until the CNI reports it.
	FindNetNS func(pod *corev1.Pod) (string, error)
	Log       *slog.Logger

	mu    sync.Mutex
	netns map[string]string // pod UID -> namespace path, from CNI ADD or the scan
}

func (c *Controller) log() *slog.Logger {
	if c.Log == nil {
		return slog.Default()
	}
	return c.Log
}

// PodFrom collects what enrollment needs from a pod object; ips override its status
// (at CNI ADD time the API server does not know the IPs yet).
func PodFrom(p *corev1.Pod, ips []netip.Addr, netnsPath string) Pod {
	if len(ips) == 0 {
		ips = podIPs(p)
	}
	return Pod{UID: string(p.UID), Name: p.Name, Namespace: p.Namespace, ServiceAccount: p.Spec.ServiceAccountName,
		IPs: ips, Annotations: p.Annotations, NetNS: netnsPath}
}

func podIPs(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil && !seen[a.Unmap()] {
			seen[a.Unmap()] = true
			out = append(out, a.Unmap())
		}
	}
	for _, ip := range p.Status.PodIPs {
		add(ip.IP)
	}
	add(p.Status.PodIP)
	return out
}

// withPodIPs is a copy of pod with ips added to its status.
func withPodIPs(pod *corev1.Pod, ips []netip.Addr) *corev1.Pod {
	out := pod.DeepCopy()
	for _, ip := range ips {
		out.Status.PodIPs = append(out.Status.PodIPs, corev1.PodIP{IP: ip.String()})
	}
	return out
}

func (c *Controller) rememberNetNS(uid, path string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.netns == nil {
		c.netns = map[string]string{}
	}
	c.netns[uid] = path
}

func (c *Controller) netnsOf(pod *corev1.Pod) string {
	c.mu.Lock()
	path := c.netns[string(pod.UID)]
	c.mu.Unlock()
	if path != "" || c.FindNetNS == nil || podIPs(pod) == nil {
		return path
	}
	path, err := c.FindNetNS(pod)
	if err != nil {
		c.log().Debug("pod network namespace not found", "pod", pod.Namespace+"/"+pod.Name, "error", err)
		return ""
	}
	c.rememberNetNS(string(pod.UID), path)
	return path
}

// Add is the CNI plugin's ADD (cniapi.Handler): decide with the pod's labels and the IPs
// the primary CNI gave it, and, when it is for the mesh, enroll it before answering. An
// error fails the ADD: the pod does not start unredirected.
func (c *Controller) Add(ctx context.Context, r cniapi.Request) (cniapi.Response, error) {
	pod, err := c.Source.Pod(ctx, r.PodNamespace, r.PodName)
	if err != nil {
		return cniapi.Response{}, fmt.Errorf("pod %s/%s: %w", r.PodNamespace, r.PodName, err)
	}
	if r.PodUID != "" && string(pod.UID) != r.PodUID {
		return cniapi.Response{}, fmt.Errorf("pod %s/%s: the API server has uid %s, the runtime %s (a recreated pod?)", r.PodNamespace, r.PodName, pod.UID, r.PodUID)
	}
	// Remembered whatever the decision: a label added later enrolls the running pod.
	c.rememberNetNS(string(pod.UID), r.NetNS)
	d := c.Selector.Decide(withPodIPs(pod, r.IPs), c.Source.Namespace(pod.Namespace))
	if !d.Enroll {
		return cniapi.Response{Reason: d.Reason}, nil
	}
	w := Work{Enroll: true, Pod: PodFrom(pod, r.IPs, r.NetNS), Reason: "cni add: " + d.Reason}
	w.Pod.Sandbox = r.ContainerID
	select {
	case err := <-c.Queue.Submit(string(pod.UID), w):
		if err != nil {
			return cniapi.Response{Reason: d.Reason}, err
		}
		return cniapi.Response{Enrolled: true, Reason: d.Reason}, nil
	case <-ctx.Done():
		return cniapi.Response{Reason: d.Reason}, fmt.Errorf("pod %s/%s: enroll: %w", r.PodNamespace, r.PodName, ctx.Err())
	}
}

// Del is the CNI plugin's DEL: the sandbox goes away, so the pod's enrollment does too.
func (c *Controller) Del(ctx context.Context, r cniapi.Request) error {
	uid := r.PodUID
	if uid == "" {
		pod, err := c.Source.Pod(ctx, r.PodNamespace, r.PodName)
		if err != nil {
			return nil // unknown pod: nothing we enrolled under a name we cannot find
		}
		uid = string(pod.UID)
	}
	// A DEL may come late, or again, for a sandbox the pod no longer runs in (the runtime
	// retries teardown; the kubelet recreated the sandbox): it must not undo the current one.
	if cur := c.Enroller.Sandbox(uid); r.ContainerID != "" && cur != "" && cur != r.ContainerID {
		c.log().Info("cni del of an older sandbox ignored", "pod", r.PodNamespace+"/"+r.PodName, "uid", uid,
			"sandbox", r.ContainerID, "current", cur)
		return nil
	}
	c.mu.Lock()
	delete(c.netns, uid)
	c.mu.Unlock()
	// Also when only a failing enroll is pending: its retries must stop with the sandbox.
	if !c.Enroller.Enrolled(uid) && !c.Queue.Has(uid) {
		return nil
	}
	w := Work{Pod: Pod{UID: uid, Name: r.PodName, Namespace: r.PodNamespace, NetNS: r.NetNS}, Reason: "cni del", SandboxGone: true}
	select {
	case err := <-c.Queue.Submit(uid, w):
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// PodChanged is an informer's add or update: enroll or remove the pod as its labels, its
// namespace's and its phase now say. It does not wait.
func (c *Controller) PodChanged(pod *corev1.Pod) {
	uid := string(pod.UID)
	// Between the CNI ADD and the kubelet's status report the API has no IP for the pod;
	// the runtime's IPs stand in, or every event of that window (our own annotation's
	// among them) would remove the pod just enrolled.
	ips := podIPs(pod)
	if len(ips) == 0 {
		if ips = c.Enroller.IPs(uid); len(ips) > 0 {
			pod = withPodIPs(pod, ips)
		}
	}
	d := c.Selector.Decide(pod, c.Source.Namespace(pod.Namespace))
	if d.NoIPYet {
		return // its CNI ADD enrolls it (or has: see above); never a reason to remove
	}
	if !d.Enroll {
		if c.Enroller.Enrolled(uid) || c.Queue.Has(uid) {
			c.log().Info("pod leaves the mesh", "pod", pod.Namespace+"/"+pod.Name, "uid", uid, "reason", d.Reason)
			c.Queue.Submit(uid, Work{Pod: PodFrom(pod, nil, c.netnsOf(pod)), Reason: d.Reason})
		}
		return
	}
	path := c.netnsOf(pod)
	if path == "" {
		return // not started yet: its CNI ADD will enroll it
	}
	w := Work{Enroll: true, Pod: PodFrom(pod, nil, path), Reason: d.Reason}
	if c.Enroller.Holds(uid, w.Pod) && !c.Queue.Has(uid) {
		return // nothing that enrollment uses changed
	}
	c.Queue.Submit(uid, w)
}

// PodDeleted is an informer's delete.
func (c *Controller) PodDeleted(pod *corev1.Pod) {
	uid := string(pod.UID)
	c.mu.Lock()
	path := c.netns[uid]
	delete(c.netns, uid)
	c.mu.Unlock()
	if c.Enroller.Enrolled(uid) || c.Queue.Has(uid) {
		c.Queue.Submit(uid, Work{Pod: PodFrom(pod, nil, path), Reason: "pod deleted"})
	}
}

// NamespaceChanged is an informer's namespace add or update: its label may have enrolled
// or removed every pod of it on this node (pods).
func (c *Controller) NamespaceChanged(pods []*corev1.Pod) {
	for _, p := range pods {
		c.PodChanged(p)
	}
}

// Reconcile submits the wanted state of pods that were running before the agent started
// (the informers' first list): enroll those the mesh wants, found through FindNetNS, and
// remove those a previous agent annotated that the mesh no longer wants. It returns the
// results to wait for; unchanged pods write nothing.
func (c *Controller) Reconcile(pods []*corev1.Pod) []<-chan error {
	var out []<-chan error
	for _, pod := range pods {
		uid := string(pod.UID)
		d := c.Selector.Decide(pod, c.Source.Namespace(pod.Namespace))
		switch {
		case d.Enroll:
			path := c.netnsOf(pod)
			if path == "" {
				c.log().Warn("running pod for the mesh, but its network namespace was not found; its next CNI ADD or change enrolls it",
					"pod", pod.Namespace+"/"+pod.Name, "uid", uid)
				continue
			}
			out = append(out, c.Queue.Submit(uid, Work{Enroll: true, Pod: PodFrom(pod, nil, path), Reason: "start-up: " + d.Reason}))
		case pod.Annotations[AnnotationRedirection] == RedirectionEnabled:
			out = append(out, c.Queue.Submit(uid, Work{Pod: PodFrom(pod, nil, c.netnsOf(pod)), Reason: "start-up: " + d.Reason}))
		}
	}
	return out
}
