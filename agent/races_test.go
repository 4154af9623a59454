package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/ruleset"
)

// hookSource blocks the first Namespace call after arm until release is closed.
type hookSource struct {
	*fakeSource
	armed   atomic.Bool
	reached chan struct{}
	release chan struct{}
}

func (h *hookSource) Namespace(name string) *corev1.Namespace {
	if h.armed.CompareAndSwap(true, false) {
		close(h.reached)
		<-h.release
	}
	return h.fakeSource.Namespace(name)
}

// An informer event without status IPs racing the CNI ADD must not remove the pod the
// ADD reports enrolled (found by review: it did, fail-open).
func TestInformerEventRacingAddKeepsPod(t *testing.T) {
	c, r, src := newController(t)
	h := &hookSource{fakeSource: src, reached: make(chan struct{}), release: make(chan struct{})}
	c.Source = h
	src.label("mesh", true)
	pod := apiPod(src, "mesh", "sleep") // as the API has it at ADD time: no IP
	h.armed.Store(true)
	var wg sync.WaitGroup
	wg.Go(func() { c.PodChanged(pod.DeepCopy()) }) // reads Enroller.IPs (nil), then blocks in Namespace
	<-h.reached
	go func() {
		for !r.e.Enrolled("uid-sleep") {
			time.Sleep(100 * time.Microsecond)
		}
		close(h.release) // the enroll has recorded the pod: PodChanged goes on
	}()
	resp, err := c.Add(context.Background(), add("mesh", "sleep"))
	wg.Wait()
	if err != nil || !resp.Enrolled {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	time.Sleep(200 * time.Millisecond)
	t.Logf("after ADD success: enrolled=%v proxy events=%v rules-have-uid=%v",
		r.e.Enrolled("uid-sleep"), r.proxy.Events(), strings.Contains(r.dp.Dump(), "uid-sleep"))
	if !r.e.Enrolled("uid-sleep") {
		t.Errorf("FAIL-OPEN: the pod the ADD enrolled was removed by a racing informer event")
	}
}

// A pod deleted while its enroll fails stops being retried.
func TestDeletedPodStopsRetries(t *testing.T) {
	c, r, src := newController(t)
	var attempts atomic.Int64
	inner := r.e.OpenNetNS
	r.e.OpenNetNS = func(p string) (*netns.NS, error) { attempts.Add(1); return inner(p) }
	src.label("mesh", false)
	pod := apiPod(src, "mesh", "sleep")
	req := add("mesh", "sleep")
	req.NetNS = "/run/netns/gone-sleep"
	if _, err := c.Add(context.Background(), req); err != nil { // not for the mesh: path remembered
		t.Fatal(err)
	}
	del := req
	del.Command = "DEL"
	if err := c.Del(context.Background(), del); err != nil { // not enrolled: early return, path kept
		t.Fatal(err)
	}
	src.label("mesh", true)
	running := pod.DeepCopy()
	running.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: "10.1.2.3"}}}
	c.PodChanged(running) // namespace labelled (terminating pod still Running)
	time.Sleep(50 * time.Millisecond)
	c.PodDeleted(running)
	n0 := attempts.Load()
	time.Sleep(300 * time.Millisecond)
	if n := attempts.Load() - n0; c.Queue.Has("uid-sleep") || n > 0 {
		t.Logf("attempts in 300ms after delete: %d", n)
		t.Errorf("retries of a deleted pod never stop")
	}
}

// slowRemove blocks Dataplane.Remove until released.
type slowRemove struct {
	dataplane.Interface
	in, out chan struct{}
}

func (s *slowRemove) Remove(ns *netns.NS, d ruleset.Desired) (bool, error) {
	close(s.in)
	<-s.out
	return s.Interface.Remove(ns, d)
}

// A proxy that connects during a removal does not get the pod in its snapshot (no Del
// would ever reach it there).
func TestSnapshotSkipsPodBeingRemoved(t *testing.T) {
	r := newRig(t)
	p := testPod("sleep")
	if err := <-r.q.Submit(p.UID, Work{Enroll: true, Pod: p}); err != nil {
		t.Fatal(err)
	}
	s := &slowRemove{Interface: r.dp, in: make(chan struct{}), out: make(chan struct{})}
	r.e.Dataplane = s
	done := r.q.Submit(p.UID, Work{Pod: p})
	<-s.in
	snap := r.e.Snapshot()
	openAtSnapshot := len(snap) > 0 && snap[0].NetNS != nil && snap[0].NetNS.Fd() >= 0
	t.Logf("proxy events: %v; netns open at snapshot: %v", r.proxy.Events(), openAtSnapshot)
	t.Logf("snapshot during removal (after del sent): %d entries; uid=%v", len(snap), func() string {
		if len(snap) > 0 {
			return snap[0].UID
		}
		return ""
	}())
	close(s.out)
	<-done
	if openAtSnapshot {
		t.Errorf("a proxy connecting now gets an Add for a pod whose Del was already sent to all proxies")
	}
}

// Re-enrolling a pod in the same namespace keeps the file a snapshot in flight holds.
func TestReenrollKeepsSnapshotNamespace(t *testing.T) {
	r := newRig(t)
	p := testPod("sleep")
	if err := <-r.q.Submit(p.UID, Work{Enroll: true, Pod: p}); err != nil {
		t.Fatal(err)
	}
	snap := r.e.Snapshot()
	p2 := p
	p2.Annotations = map[string]string{"x": "y"}
	if err := <-r.q.Submit(p.UID, Work{Enroll: true, Pod: p2}); err != nil {
		t.Fatal(err)
	}
	if _, err := snap[0].NetNS.File().SyscallConn(); err != nil {
		t.Logf("snapshot entry's netns: %v", err)
	}
	if snap[0].NetNS.Fd() == -1 {
		t.Errorf("a snapshot taken before the re-enroll holds a closed netns: the zds server skips the pod, the new proxy drops it")
	}
}

// A repeated (late) DEL of a pod's previous sandbox leaves its current sandbox enrolled.
func TestLateDelOfOldSandboxIgnored(t *testing.T) {
	c, r, src := newController(t)
	src.label("mesh", true)
	apiPod(src, "mesh", "sleep")
	old := add("mesh", "sleep")
	old.NetNS, old.ContainerID = "/run/netns/sandbox1", "c1"
	if _, err := c.Add(context.Background(), old); err != nil {
		t.Fatal(err)
	}
	del1 := old
	del1.Command = "DEL"
	if err := c.Del(context.Background(), del1); err != nil { // sandbox 1 torn down
		t.Fatal(err)
	}
	cur := add("mesh", "sleep")
	cur.NetNS, cur.ContainerID = "/run/netns/sandbox2", "c2"
	if _, err := c.Add(context.Background(), cur); err != nil { // sandbox 2 up, enrolled
		t.Fatal(err)
	}
	if err := c.Del(context.Background(), del1); err != nil { // DEL of sandbox 1 again (spec: DEL may repeat)
		t.Fatal(err)
	}
	t.Logf("after a repeated DEL of sandbox c1: sandbox c2 enrolled=%v, rules=%v, proxy events=%v",
		r.e.Enrolled("uid-sleep"), strings.Contains(r.dp.Dump(), "uid-sleep"), r.proxy.Events())
	if !r.e.Enrolled("uid-sleep") {
		t.Errorf("FAIL-OPEN: the running sandbox lost its rules and proxy because of another attachment's DEL")
	}
}

type failingAnnotator struct{}

func (failingAnnotator) SetRedirection(ctx context.Context, pod Pod, enabled bool) error {
	return context.DeadlineExceeded
}

// A remove whose annotation step fails still undoes the rest and leaks no namespace.
func TestFailedRemoveLeaksNothing(t *testing.T) {
	r := newRig(t)
	r.e.Annotator = failingAnnotator{}
	fds := func() int { e, _ := os.ReadDir("/proc/self/fd"); return len(e) }
	before := fds()
	p := testPod("stale")
	for range 50 {
		r.e.Process(context.Background(), p.UID, Work{Pod: p})
	}
	t.Logf("fds before %d, after 50 failed removes %d", before, fds())
	if fds()-before >= 50 {
		t.Errorf("each failed remove leaks a netns fd")
	}
}

// A pod found by the start-up scan is known by /proc/<pid>/ns/net; once that process
// ends, a re-enroll still works, from the namespace held open.
func TestReenrollAfterScannedProcessExits(t *testing.T) {
	c, r, src := newController(t)
	r.e.OpenNetNS = nil // the real netns.Open
	src.label("mesh", true)
	child := exec.Command("sleep", "100")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	pod := apiPod(src, "mesh", "sleep")
	pod.UID = "5f0c2a9e-1b7d-4c3e-9a8b-0d1e2f3a4b5c" // the scan knows UIDs as Kubernetes makes them
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: "127.0.0.1"}}}
	d := filepath.Join(root, "4242")
	os.MkdirAll(filepath.Join(d, "ns"), 0o755)
	os.WriteFile(filepath.Join(d, "cgroup"), []byte("0::/kubepods/pod"+string(pod.UID)+"/x\n"), 0o644)
	os.Symlink(fmt.Sprintf("/proc/%d/ns/net", child.Process.Pid), filepath.Join(d, "ns", "net"))
	scanner := &NetNSScanner{ProcRoot: root}
	c.FindNetNS = func(p *corev1.Pod) (string, error) { return scanner.Find(string(p.UID), podIPs(p)) }
	for _, res := range c.Reconcile([]*corev1.Pod{pod}) {
		if err := <-res; err != nil {
			t.Fatal(err)
		}
	}
	child.Process.Kill()
	child.Wait()
	changed := pod.DeepCopy()
	changed.Annotations = map[string]string{"unrelated": "x"}
	changed.Spec.ServiceAccountName = "other" // anything Holds compares
	c.PodChanged(changed)
	w := Work{Enroll: true, Pod: PodFrom(changed, nil, c.netnsOf(changed))}
	if err := r.e.Process(context.Background(), string(pod.UID), w); err != nil {
		t.Errorf("re-enroll after the scanned process ended: %v", err)
	}
}

// A namespace that is gone is a permanent failure: no retries.
func TestGoneNamespaceIsPermanent(t *testing.T) {
	r := newRig(t)
	p := testPod("gone-pod")
	p.NetNS = "/run/netns/gone-pod"
	err := <-r.q.Submit(p.UID, Work{Enroll: true, Pod: p})
	if !IsPermanent(err) || !errors.Is(err, netns.ErrGone) {
		t.Fatalf("enroll in a gone namespace: %v, want a permanent ErrGone", err)
	}
	if r.q.Has(p.UID) {
		t.Error("the queue still retries a gone namespace")
	}
}
