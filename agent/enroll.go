package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/ruleset"
	"github.com/nftmesh/nftmesh/zds"
)

// Pod is what enrolling a pod takes, whoever reported it.
type Pod struct {
	UID, Name, Namespace, ServiceAccount string
	IPs                                  []netip.Addr
	// Annotations are the pod's annotations; the per-pod rule knobs among them shape its
	// rules (docs/rules.md#per-pod-annotations).
	Annotations map[string]string
	// NetNS is the path of the pod's network namespace (the CNI plugin's CNI_NETNS, or
	// what the /proc scan found).
	NetNS string
}

func (p Pod) String() string { return p.Namespace + "/" + p.Name }

// Work is the newest wanted state of one pod: enrolled (with its facts) or not.
type Work struct {
	Enroll bool
	Pod    Pod
	Reason string // why, for logs
}

// Proxy is the agent's side of ZDS (zds.Server).
type Proxy interface {
	AddWorkload(ctx context.Context, uid string, info zds.WorkloadInfo, ns *netns.NS) error
	DelWorkload(ctx context.Context, uid string) error
}

// Annotator records enrollment on the pod object (ambient.istio.io/redirection).
type Annotator interface {
	SetRedirection(ctx context.Context, pod Pod, enabled bool) error
}

// Enroller does the work for one pod: enroll in the order rules, proxy, probe set,
// annotation; remove in the reverse order. It is the Queue's process function, so it runs
// once per pod at a time. Every step is idempotent: a repeated enroll writes nothing.
type Enroller struct {
	Dataplane dataplane.Interface
	Proxy     Proxy
	Annotator Annotator
	Host      *netns.NS       // the node's namespace: its probe sets
	Intent    compiler.Intent // the rules' intent; the pod's annotations go over its pod section
	Log       *slog.Logger
	// OpenNetNS opens a pod's namespace by path (netns.Open; tests replace it).
	OpenNetNS func(path string) (*netns.NS, error)

	mu       sync.Mutex
	enrolled map[string]*enrolledPod // by UID
}

// enrolledPod is what was done for a pod, to redo it for a new proxy and undo it later.
type enrolledPod struct {
	pod     Pod
	ns      *netns.NS // held open: the ZDS snapshot hands it to every new proxy
	desired ruleset.Desired
}

func (e *Enroller) log() *slog.Logger {
	if e.Log == nil {
		return slog.Default()
	}
	return e.Log
}

func (e *Enroller) open(path string) (*netns.NS, error) {
	if e.OpenNetNS != nil {
		return e.OpenNetNS(path)
	}
	return netns.Open(path)
}

// Process runs w for uid: the Queue calls it.
func (e *Enroller) Process(ctx context.Context, uid string, w Work) error {
	if w.Enroll {
		return e.enroll(ctx, uid, w.Pod)
	}
	return e.remove(ctx, uid, w.Pod)
}

func (e *Enroller) enroll(ctx context.Context, uid string, pod Pod) error {
	if pod.NetNS == "" {
		return fmt.Errorf("pod %s: enroll: network namespace not known yet", pod)
	}
	desired, err := compiler.PodState(e.Intent, pod.Annotations)
	if err != nil {
		return fmt.Errorf("pod %s: enroll: %w", pod, err)
	}
	e.mu.Lock()
	old := e.enrolled[uid]
	e.mu.Unlock()
	ns, err := e.open(pod.NetNS)
	if err != nil {
		return fmt.Errorf("pod %s: enroll: %w", pod, err)
	}
	if old != nil && !old.ns.Same(ns) {
		// The sandbox was recreated: the old namespace's rules go with it; the proxy is
		// handed the new one below and replaces the old instance itself.
		e.log().Info("pod in a new network namespace", "pod", pod.String(), "uid", uid, "old", old.ns.Name(), "new", ns.Name())
	}
	if _, err := e.Dataplane.Apply(ns, desired); err != nil {
		ns.Close()
		return fmt.Errorf("pod %s: enroll: rules: %w", pod, err)
	}
	info := zds.WorkloadInfo{Name: pod.Name, Namespace: pod.Namespace, ServiceAccount: pod.ServiceAccount}
	if err := e.Proxy.AddWorkload(ctx, uid, info, ns); err != nil {
		// The rules stay: the pod's traffic goes to a proxy port nobody serves, so the pod
		// is cut off rather than running outside the mesh (fail closed).
		ns.Close()
		return fmt.Errorf("pod %s: enroll: proxy: %w", pod, err)
	}
	for _, ip := range pod.IPs {
		if _, err := e.Dataplane.AddPodIP(e.Host, ip, uid); err != nil {
			ns.Close()
			return fmt.Errorf("pod %s: enroll: probe set: %w", pod, err)
		}
	}
	if old != nil {
		for _, ip := range old.pod.IPs {
			if !slices.Contains(pod.IPs, ip) {
				e.Dataplane.RemovePodIP(e.Host, ip, uid)
			}
		}
	}
	if e.Annotator != nil {
		if err := e.Annotator.SetRedirection(ctx, pod, true); err != nil {
			ns.Close()
			return fmt.Errorf("pod %s: enroll: annotation: %w", pod, err)
		}
	}
	e.mu.Lock()
	if e.enrolled == nil {
		e.enrolled = map[string]*enrolledPod{}
	}
	e.enrolled[uid] = &enrolledPod{pod: pod, ns: ns, desired: desired}
	e.mu.Unlock()
	if old != nil {
		old.ns.Close()
	} else {
		e.log().Info("pod enrolled", "pod", pod.String(), "uid", uid, "netns", ns.Name(), "ips", pod.IPs)
	}
	return nil
}

func (e *Enroller) remove(ctx context.Context, uid string, pod Pod) error {
	e.mu.Lock()
	old := e.enrolled[uid]
	e.mu.Unlock()
	if old == nil {
		// Not enrolled by this agent's lifetime: undo what a previous one may have done,
		// from what the caller knows.
		old = &enrolledPod{pod: pod}
		if pod.NetNS != "" {
			ns, err := e.open(pod.NetNS)
			switch {
			case err == nil:
				old.ns = ns
			case errors.Is(err, netns.ErrGone):
			default:
				return fmt.Errorf("pod %s: remove: %w", pod, err)
			}
		}
		d, err := compiler.PodState(e.Intent, pod.Annotations)
		if err != nil {
			d, _ = compiler.PodState(e.Intent, nil)
		}
		old.desired = d
	}
	if e.Annotator != nil {
		if err := e.Annotator.SetRedirection(ctx, old.pod, false); err != nil {
			return fmt.Errorf("pod %s: remove: annotation: %w", old.pod, err)
		}
	}
	for _, ip := range old.pod.IPs {
		if _, err := e.Dataplane.RemovePodIP(e.Host, ip, uid); err != nil {
			return fmt.Errorf("pod %s: remove: probe set: %w", old.pod, err)
		}
	}
	if err := e.Proxy.DelWorkload(ctx, uid); err != nil {
		return fmt.Errorf("pod %s: remove: proxy: %w", old.pod, err)
	}
	if old.ns != nil {
		if _, err := e.Dataplane.Remove(old.ns, old.desired); err != nil {
			return fmt.Errorf("pod %s: remove: rules: %w", old.pod, err)
		}
		old.ns.Close()
	}
	e.mu.Lock()
	delete(e.enrolled, uid)
	e.mu.Unlock()
	e.log().Info("pod removed", "pod", old.pod.String(), "uid", uid)
	return nil
}

// Snapshot lists every enrolled pod with its namespace, for a proxy that connects (ZDS).
func (e *Enroller) Snapshot() []zds.SnapshotEntry {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]zds.SnapshotEntry, 0, len(e.enrolled))
	for uid, p := range e.enrolled {
		out = append(out, zds.SnapshotEntry{UID: uid, NetNS: p.ns,
			Info: zds.WorkloadInfo{Name: p.pod.Name, Namespace: p.pod.Namespace, ServiceAccount: p.pod.ServiceAccount}})
	}
	slices.SortFunc(out, func(a, b zds.SnapshotEntry) int { return strings.Compare(a.UID, b.UID) })
	return out
}

// Enrolled reports whether uid is enrolled, for tests and metrics.
func (e *Enroller) Enrolled(uid string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.enrolled[uid] != nil
}
