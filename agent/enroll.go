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
	// Sandbox is the runtime's container ID of the pod's sandbox (CNI_CONTAINERID), when
	// a CNI ADD reported the pod: a DEL for another sandbox is not for this one.
	Sandbox string
}

func (p Pod) String() string { return p.Namespace + "/" + p.Name }

// Work is the newest wanted state of one pod: enrolled (with its facts) or not.
type Work struct {
	Enroll bool
	Pod    Pod
	Reason string // why, for logs
	// SandboxGone: a removal because the runtime tears the sandbox down (CNI DEL). It
	// must not depend on the API server: the annotation is then best effort.
	SandboxGone bool
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

	// CheckNetNS vets a pod's namespace before rules go in (loopback up: the proxy's
	// routes go through it). nil: no check.
	CheckNetNS func(*netns.NS) error

	mu         sync.Mutex
	enrolled   map[string]*enrolledPod // by UID
	deferProxy bool                    // see DeferProxy
}

// enrolledPod is what was done for a pod, to redo it for a new proxy and undo it later.
type enrolledPod struct {
	pod      Pod
	ns       *netns.NS // held open: the ZDS snapshot hands it to every new proxy
	desired  ruleset.Desired
	removing bool // a removal has begun: left out of snapshots
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
	return e.remove(ctx, uid, w.Pod, w.SandboxGone)
}

// StepError is a failed enrollment step: Step names it ("netns", "rules", "proxy",
// "probe set", "annotation", "intent") for the failures metric and the pod's event.
type StepError struct {
	Pod  Pod
	Op   string // enroll or remove
	Step string
	Err  error
}

func (e *StepError) Error() string {
	return fmt.Sprintf("pod %s: %s: %s: %v", e.Pod, e.Op, e.Step, e.Err)
}
func (e *StepError) Unwrap() error { return e.Err }

// DeferProxy makes enrollments record pods for the ZDS snapshot instead of sending them
// to a proxy: the agent's start-up reconcile, before it serves ZDS. A proxy that
// reconnects to a new agent drops every pod its first snapshot does not name, so the
// snapshot must hold every running pod before the first proxy is accepted.
func (e *Enroller) DeferProxy() {
	e.mu.Lock()
	e.deferProxy = true
	e.mu.Unlock()
}

// HandOff ends DeferProxy: from now on enrollments go to the proxy. Every pod recorded
// before it is in the snapshot of each proxy accepted after it.
func (e *Enroller) HandOff() {
	e.mu.Lock()
	e.deferProxy = false
	e.mu.Unlock()
}

func (e *Enroller) enroll(ctx context.Context, uid string, pod Pod) error {
	fail := func(step string, err error) error { return &StepError{Pod: pod, Op: "enroll", Step: step, Err: err} }
	if pod.NetNS == "" {
		return fail("netns", errors.New("network namespace not known yet"))
	}
	desired, err := compiler.PodState(e.Intent, pod.Annotations)
	if err != nil {
		return fail("intent", err)
	}
	e.mu.Lock()
	prev := e.enrolled[uid]
	e.mu.Unlock()
	var ns *netns.NS
	if prev != nil && prev.pod.NetNS == pod.NetNS && !prev.removing {
		// The namespace this pod is enrolled in, held open: a path the /proc scan found
		// names a process, which may have exited (or its PID been reused) since.
		ns, err = prev.ns.Dup()
	} else {
		ns, err = e.open(pod.NetNS)
	}
	if errors.Is(err, netns.ErrGone) {
		return Permanent(fail("netns", err)) // the sandbox is gone: retrying cannot help
	}
	if err != nil {
		return fail("netns", err)
	}
	if e.CheckNetNS != nil {
		if err := e.CheckNetNS(ns); err != nil {
			ns.Close()
			return fail("netns", err)
		}
	}
	if _, err := e.Dataplane.Apply(ns, desired); err != nil {
		ns.Close()
		return fail("rules", err)
	}
	// Recorded before the proxy hears of it: a proxy that connects meanwhile finds the pod
	// in its snapshot, and one that connected before gets the Add (zds.Server.Serve).
	e.mu.Lock()
	if e.enrolled == nil {
		e.enrolled = map[string]*enrolledPod{}
	}
	old := e.enrolled[uid]
	if old != nil && pod.Sandbox == "" {
		pod.Sandbox = old.pod.Sandbox // an informer's view of the same sandbox
	}
	if old != nil && old.ns.Same(ns) {
		// The same namespace: keep the file a snapshot in flight may be sending.
		ns.Close()
		ns = old.ns
	}
	e.enrolled[uid] = &enrolledPod{pod: pod, ns: ns, desired: desired}
	deferred := e.deferProxy
	e.mu.Unlock()
	if old != nil && old.ns != ns {
		// The sandbox was recreated: the proxy is handed the new namespace below and
		// replaces the old instance itself.
		e.log().Info("pod in a new network namespace", "pod", pod.String(), "uid", uid, "old", old.ns.Name(), "new", ns.Name())
		old.ns.Close() // the snapshot skips a closed entry; the new one is recorded
	}
	if !deferred {
		info := zds.WorkloadInfo{Name: pod.Name, Namespace: pod.Namespace, ServiceAccount: pod.ServiceAccount}
		if err := e.Proxy.AddWorkload(ctx, uid, info, ns); err != nil {
			// The rules stay: the pod's traffic goes to a proxy port nobody serves, so the
			// pod is cut off rather than running outside the mesh (fail closed).
			return fail("proxy", err)
		}
	}
	for _, ip := range pod.IPs {
		if _, err := e.Dataplane.AddPodIP(e.Host, ip, uid); err != nil {
			return fail("probe set", err)
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
			return fail("annotation", err)
		}
	}
	if old == nil {
		e.log().Info("pod enrolled", "pod", pod.String(), "uid", uid, "netns", ns.Name(), "ips", pod.IPs, "deferred_to_snapshot", deferred)
	}
	return nil
}

func (e *Enroller) remove(ctx context.Context, uid string, pod Pod, sandboxGone bool) error {
	e.mu.Lock()
	old := e.enrolled[uid]
	if old != nil {
		// Out of the snapshot from now on: a proxy that connects before the Del below
		// must not be handed a pod that no Del will reach.
		old.removing = true
	}
	e.mu.Unlock()
	opened := false
	if old == nil {
		// Not enrolled by this agent's lifetime: undo what a previous one may have done,
		// from what the caller knows.
		old = &enrolledPod{pod: pod}
		if pod.NetNS != "" {
			ns, err := e.open(pod.NetNS)
			switch {
			case err == nil:
				old.ns, opened = ns, true
			case errors.Is(err, netns.ErrGone):
			default:
				return &StepError{Pod: pod, Op: "remove", Step: "netns", Err: err}
			}
		}
		d, err := compiler.PodState(e.Intent, pod.Annotations)
		if err != nil {
			d, _ = compiler.PodState(e.Intent, nil)
		}
		old.desired = d
	}
	closeOpened := func() {
		if opened {
			old.ns.Close()
		}
	}
	// The annotation goes first (it says what is done), but its failure does not keep the
	// pod's traffic captured: the rest is undone anyway, and the annotation retried.
	var annErr error
	if e.Annotator != nil {
		if err := e.Annotator.SetRedirection(ctx, old.pod, false); err != nil {
			annErr = &StepError{Pod: old.pod, Op: "remove", Step: "annotation", Err: err}
		}
	}
	for _, ip := range old.pod.IPs {
		if _, err := e.Dataplane.RemovePodIP(e.Host, ip, uid); err != nil {
			closeOpened()
			return &StepError{Pod: old.pod, Op: "remove", Step: "probe set", Err: err}
		}
	}
	if err := e.Proxy.DelWorkload(ctx, uid); err != nil {
		closeOpened()
		return &StepError{Pod: old.pod, Op: "remove", Step: "proxy", Err: err}
	}
	if old.ns != nil {
		if _, err := e.Dataplane.Remove(old.ns, old.desired); err != nil {
			closeOpened()
			return &StepError{Pod: old.pod, Op: "remove", Step: "rules", Err: err}
		}
	}
	e.mu.Lock()
	if cur := e.enrolled[uid]; cur != nil && cur.removing {
		delete(e.enrolled, uid)
	}
	e.mu.Unlock()
	if old.ns != nil {
		old.ns.Close()
	}
	if annErr != nil {
		if sandboxGone {
			// The runtime is tearing the sandbox down and must not wait for the API
			// server; the pod object goes with it, or its next ADD annotates it again.
			e.log().Warn("pod removed, but its annotation could not be taken off", "pod", old.pod.String(), "uid", uid, "error", annErr)
			return nil
		}
		return annErr
	}
	e.log().Info("pod removed", "pod", old.pod.String(), "uid", uid)
	return nil
}

// Snapshot lists every enrolled pod with its namespace, for a proxy that connects (ZDS).
func (e *Enroller) Snapshot() []zds.SnapshotEntry {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]zds.SnapshotEntry, 0, len(e.enrolled))
	for uid, p := range e.enrolled {
		if p.removing {
			continue
		}
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

// Holds reports whether uid is enrolled exactly as pod says (same namespace, IPs,
// identity and annotations): an informer update that changes nothing of that (a status
// change, our own annotation) needs no work.
func (e *Enroller) Holds(uid string, pod Pod) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.enrolled[uid]
	if p == nil {
		return false
	}
	a, b := p.pod, pod
	return a.NetNS == b.NetNS && a.Name == b.Name && a.Namespace == b.Namespace && a.ServiceAccount == b.ServiceAccount &&
		slices.Equal(a.IPs, b.IPs) && sameRuleAnnotations(a.Annotations, b.Annotations)
}

// sameRuleAnnotations compares the annotations that shape a pod's rules.
func sameRuleAnnotations(a, b map[string]string) bool {
	for _, k := range compiler.KnownAnnotations {
		if a[k] != b[k] {
			return false
		}
	}
	return true
}

// Count is the number of pods enrolled, for metrics.
func (e *Enroller) Count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.enrolled)
}

// Close lets go of the namespaces held for the snapshot; the pods keep their rules.
func (e *Enroller) Close() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for uid, p := range e.enrolled {
		if p.ns != nil {
			p.ns.Close()
		}
		delete(e.enrolled, uid)
	}
}

// IPs are the addresses uid was enrolled with (the runtime's, at CNI ADD), or nil.
func (e *Enroller) IPs(uid string) []netip.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	if p := e.enrolled[uid]; p != nil {
		return slices.Clone(p.pod.IPs)
	}
	return nil
}

// Sandbox is the sandbox (container ID) uid is enrolled in, "" if unknown.
func (e *Enroller) Sandbox(uid string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if p := e.enrolled[uid]; p != nil {
		return p.pod.Sandbox
	}
	return ""
}
