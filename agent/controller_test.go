package agent

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftmesh/nftmesh/agent/cniapi"
)

type fakeSource struct {
	mu   sync.Mutex
	pods map[string]*corev1.Pod
	nss  map[string]*corev1.Namespace
}

func (s *fakeSource) Pod(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pods[namespace+"/"+name]
	if p == nil {
		return nil, fmt.Errorf("pods %q not found", name)
	}
	return p.DeepCopy(), nil
}

func (s *fakeSource) Namespace(name string) *corev1.Namespace {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nss[name]
}

func (s *fakeSource) label(ns string, ambient bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	labels := map[string]string{}
	if ambient {
		labels[LabelDataplaneMode] = DataplaneModeAmbient
	}
	s.nss[ns] = &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: labels}}
}

func newController(t *testing.T) (*Controller, *rig, *fakeSource) {
	r := newRig(t)
	src := &fakeSource{pods: map[string]*corev1.Pod{}, nss: map[string]*corev1.Namespace{}}
	c := &Controller{Selector: Selector{ExcludeNamespaces: map[string]bool{"kube-system": true}}, Queue: r.q, Enroller: r.e, Source: src}
	return c, r, src
}

// apiPod is a pod as the API server holds it when its sandbox is made: no IP yet.
func apiPod(src *fakeSource, ns, name string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID("uid-" + name), Labels: map[string]string{}},
		Spec: corev1.PodSpec{ServiceAccountName: name, Containers: []corev1.Container{{Name: "app"}}}}
	src.mu.Lock()
	src.pods[ns+"/"+name] = p
	src.mu.Unlock()
	return p
}

func add(ns, name string) cniapi.Request {
	return cniapi.Request{Command: "ADD", PodNamespace: ns, PodName: name, PodUID: "uid-" + name, NetNS: "/run/netns/" + name,
		IPs: []netip.Addr{netip.MustParseAddr("10.1.2.3")}}
}

func TestCNIAdd(t *testing.T) {
	c, r, src := newController(t)
	src.label("mesh", true)
	src.label("plain", false)
	apiPod(src, "mesh", "sleep")
	apiPod(src, "plain", "other")

	resp, err := c.Add(context.Background(), add("mesh", "sleep"))
	if err != nil || !resp.Enrolled || !strings.Contains(resp.Reason, "namespace labelled") {
		t.Fatalf("ADD in a labelled namespace: %+v, %v", resp, err)
	}
	if !r.e.Enrolled("uid-sleep") || !strings.Contains(r.dp.Dump(), "10.1.2.3 owner uid-sleep") {
		t.Errorf("not enrolled when ADD returned:\n%s", r.dp.Dump())
	}
	resp, err = c.Add(context.Background(), add("plain", "other"))
	if err != nil || resp.Enrolled || !strings.Contains(resp.Reason, "not selected") {
		t.Errorf("ADD in an unlabelled namespace: %+v, %v", resp, err)
	}
	if r.e.Enrolled("uid-other") {
		t.Errorf("pod of an unlabelled namespace enrolled")
	}
	stale := add("mesh", "sleep")
	stale.PodUID = "uid-older"
	if _, err := c.Add(context.Background(), stale); err == nil || !strings.Contains(err.Error(), "uid") {
		t.Errorf("ADD with another pod's uid: %v", err)
	}
	if _, err := c.Add(context.Background(), add("mesh", "missing")); err == nil {
		t.Errorf("ADD for a pod the API server does not know succeeded")
	}
	// With the proxy down the ADD fails: the pod does not start outside the mesh.
	r.proxy.mu.Lock()
	r.proxy.down = true
	r.proxy.mu.Unlock()
	apiPod(src, "mesh", "httpbin")
	if _, err := c.Add(context.Background(), add("mesh", "httpbin")); err == nil || !strings.Contains(err.Error(), "no proxy") {
		t.Errorf("ADD with the proxy down: %v, want an error", err)
	}
}

// Labelling a namespace enrolls its running pods; unlabelling removes them; CNI DEL and
// a pod's deletion remove.
func TestLabelsEnrollAndRemove(t *testing.T) {
	c, r, src := newController(t)
	src.label("demo", false)
	p := apiPod(src, "demo", "sleep")
	if resp, err := c.Add(context.Background(), add("demo", "sleep")); err != nil || resp.Enrolled {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	running := p.DeepCopy()
	running.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: "10.1.2.3"}}}

	src.label("demo", true)
	c.NamespaceChanged([]*corev1.Pod{running})
	eventually(t, "enrolled after the namespace label", func() bool { return r.e.Enrolled("uid-sleep") })

	src.label("demo", false)
	c.NamespaceChanged([]*corev1.Pod{running})
	eventually(t, "removed after the label went", func() bool { return !r.e.Enrolled("uid-sleep") })

	optIn := running.DeepCopy()
	optIn.Labels[LabelDataplaneMode] = DataplaneModeAmbient
	c.PodChanged(optIn)
	eventually(t, "enrolled by its own label", func() bool { return r.e.Enrolled("uid-sleep") })
	c.PodDeleted(optIn)
	eventually(t, "removed on delete", func() bool { return !r.e.Enrolled("uid-sleep") })

	// The same pod again, through its sandbox's CNI ADD (a deleted pod's namespace is forgotten).
	src.mu.Lock()
	src.pods["demo/sleep"] = optIn
	src.mu.Unlock()
	if resp, err := c.Add(context.Background(), add("demo", "sleep")); err != nil || !resp.Enrolled {
		t.Fatalf("ADD of an opted-in pod: %+v %v", resp, err)
	}
	if err := c.Del(context.Background(), cniapi.Request{Command: "DEL", PodNamespace: "demo", PodName: "sleep", PodUID: "uid-sleep"}); err != nil {
		t.Fatal(err)
	}
	if r.e.Enrolled("uid-sleep") {
		t.Errorf("enrolled after CNI DEL returned")
	}
	if strings.Contains(r.dp.Dump(), "uid-sleep") {
		t.Errorf("CNI DEL left:\n%s", r.dp.Dump())
	}
}

// A CNI ADD and an informer event for the same pod at the same moment, 1,000 times: never
// an error.
func TestCNIAndInformerRace(t *testing.T) {
	c, r, src := newController(t)
	src.label("demo", true)
	for i := range 1000 {
		name := fmt.Sprintf("p%d", i)
		p := apiPod(src, "demo", name)
		running := p.DeepCopy()
		running.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: "10.1.2.3"}}}
		var wg sync.WaitGroup
		var err error
		wg.Go(func() { _, err = c.Add(context.Background(), add("demo", name)) })
		wg.Go(func() { c.PodChanged(running) })
		wg.Wait()
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
	}
	eventually(t, "all enrolled", func() bool { return len(r.e.Snapshot()) == 1000 })
}

func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("not %s within 5s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// At start-up, pods the mesh wants are enrolled through the scan, and pods a previous
// agent annotated that the mesh no longer wants are removed.
func TestReconcile(t *testing.T) {
	c, r, src := newController(t)
	src.label("mesh", true)
	src.label("plain", false)
	running := func(ns, name, ip string) *corev1.Pod {
		p := apiPod(src, ns, name)
		p.Status.Phase = corev1.PodRunning
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
		return p
	}
	want := running("mesh", "sleep", "10.1.2.3")
	lost := running("mesh", "nowhere", "10.1.2.4") // no process found: left for its next event
	stale := running("plain", "was", "10.1.2.5")
	stale.Annotations = map[string]string{AnnotationRedirection: RedirectionEnabled}
	untouched := running("plain", "never", "10.1.2.6")
	c.FindNetNS = func(p *corev1.Pod) (string, error) {
		if p.Name == "nowhere" {
			return "", ErrNetNSNotFound
		}
		return "/run/netns/" + p.Name, nil
	}
	results := c.Reconcile([]*corev1.Pod{want, lost, stale, untouched})
	if len(results) != 2 {
		t.Fatalf("%d submissions, want 2 (enroll sleep, remove was)", len(results))
	}
	for _, res := range results {
		if err := <-res; err != nil {
			t.Error(err)
		}
	}
	if !r.e.Enrolled("uid-sleep") || r.e.Enrolled("uid-nowhere") || r.e.Enrolled("uid-never") {
		t.Errorf("enrolled: sleep %v nowhere %v never %v", r.e.Enrolled("uid-sleep"), r.e.Enrolled("uid-nowhere"), r.e.Enrolled("uid-never"))
	}
	ev := strings.Join(r.proxy.Events(), "\n")
	if !strings.Contains(ev, "del uid-was") {
		t.Errorf("stale pod not removed from the proxy; events:\n%s", ev)
	}
}

// A CNI DEL stops a pod whose enroll keeps failing (its retries would outlive the sandbox).
func TestDelStopsFailingEnroll(t *testing.T) {
	c, r, src := newController(t)
	src.label("mesh", true)
	apiPod(src, "mesh", "sleep")
	r.proxy.mu.Lock()
	r.proxy.down = true
	r.proxy.mu.Unlock()
	if _, err := c.Add(context.Background(), add("mesh", "sleep")); err == nil {
		t.Fatal("ADD with the proxy down succeeded")
	}
	del := add("mesh", "sleep")
	del.Command = "DEL"
	if err := c.Del(context.Background(), del); err != nil {
		t.Fatal(err)
	}
	if r.e.Enrolled("uid-sleep") || c.Queue.Has("uid-sleep") {
		t.Errorf("after DEL: enrolled %v, queued %v", r.e.Enrolled("uid-sleep"), c.Queue.Has("uid-sleep"))
	}
}

// Events between the CNI ADD and the kubelet's status report show the pod without an IP
// (our own annotation's update among them): they must not remove the pod just enrolled.
func TestEventBeforeStatusKeepsPod(t *testing.T) {
	c, r, src := newController(t)
	src.label("mesh", true)
	pod := apiPod(src, "mesh", "sleep")
	if _, err := c.Add(context.Background(), add("mesh", "sleep")); err != nil {
		t.Fatal(err)
	}
	c.PodChanged(pod) // no status IPs yet
	deadline := time.Now().Add(2 * time.Second)
	for c.Queue.Has("uid-sleep") && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if !r.e.Enrolled("uid-sleep") {
		t.Fatal("an event without status IPs removed the pod the CNI ADD enrolled")
	}
	if !strings.Contains(r.dp.Dump(), "10.1.2.3 owner uid-sleep") {
		t.Errorf("the runtime's IP left the probe set:\n%s", r.dp.Dump())
	}
}
