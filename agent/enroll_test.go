package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/zds"
)

// These tests run the enrollment logic on the dataplane Fake, a recording proxy and a
// recording annotator: no root, no kernel, milliseconds.

type fakeProxy struct {
	mu     sync.Mutex
	events []string
	down   bool
}

func (p *fakeProxy) AddWorkload(ctx context.Context, uid string, info zds.WorkloadInfo, ns *netns.NS) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return zds.ErrNoProxy
	}
	p.events = append(p.events, fmt.Sprintf("add %s %s/%s netns=%s", uid, info.Namespace, info.Name, ns.Name()))
	return nil
}

func (p *fakeProxy) DelWorkload(ctx context.Context, uid string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events = append(p.events, "del "+uid)
	return nil
}

func (p *fakeProxy) Events() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.events)
}

type fakeAnnotator struct {
	mu  sync.Mutex
	set map[string]bool
}

func (a *fakeAnnotator) SetRedirection(ctx context.Context, pod Pod, enabled bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.set == nil {
		a.set = map[string]bool{}
	}
	if enabled {
		a.set[pod.String()] = true
	} else {
		delete(a.set, pod.String())
	}
	return nil
}

func (a *fakeAnnotator) has(pod string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.set[pod]
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

type rig struct {
	e     *Enroller
	dp    *dataplane.Fake
	proxy *fakeProxy
	ann   *fakeAnnotator
	q     *Queue[Work]
	host  *netns.NS
}

// selfNS names the test's own namespace path: the Fake tells namespaces apart by name.
func selfNS(t testing.TB) func(path string) (*netns.NS, error) {
	self, err := netns.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { self.Close() })
	return func(path string) (*netns.NS, error) {
		if strings.Contains(path, "gone") {
			return nil, fmt.Errorf("netns %s: %w", path, netns.ErrGone)
		}
		return netns.FromFd(self.Fd(), path)
	}
}

func newRig(t *testing.T) *rig {
	open := selfNS(t)
	host, _ := open("node")
	t.Cleanup(func() { host.Close() })
	r := &rig{dp: dataplane.NewFake(), proxy: &fakeProxy{}, ann: &fakeAnnotator{}, host: host}
	d, err := compiler.HostState(compiler.DefaultIntent())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.dp.Apply(host, d); err != nil {
		t.Fatal(err)
	}
	r.e = &Enroller{Dataplane: r.dp, Proxy: r.proxy, Annotator: r.ann, Host: host, Intent: compiler.DefaultIntent(), OpenNetNS: open, Log: quiet}
	r.q = NewQueue(8, time.Millisecond, 20*time.Millisecond, r.e.Process)
	runQueue(t, r.q)
	return r
}

func testPod(name string) Pod {
	return Pod{UID: "uid-" + name, Name: name, Namespace: "demo", ServiceAccount: name,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("fd00::9")}, NetNS: "/run/netns/" + name}
}

func TestEnrollAndRemove(t *testing.T) {
	r := newRig(t)
	p := testPod("sleep")
	if err := wait(t, r.q.Submit(p.UID, Work{Enroll: true, Pod: p})); err != nil {
		t.Fatal(err)
	}
	dump := r.dp.Dump()
	for _, want := range []string{"# netns /run/netns/sleep\n", "# element pod_ips_v4 10.0.0.9 owner uid-sleep", "# element pod_ips_v6 fd00::9 owner uid-sleep"} {
		if !strings.Contains(dump, want) {
			t.Errorf("after enroll the dataplane lacks %q:\n%s", want, dump)
		}
	}
	if got := r.proxy.Events(); !slices.Equal(got, []string{"add uid-sleep demo/sleep netns=/run/netns/sleep"}) {
		t.Errorf("proxy events %v", got)
	}
	if !r.ann.has("demo/sleep") || !r.e.Enrolled(p.UID) {
		t.Errorf("annotated %v, enrolled %v", r.ann.has("demo/sleep"), r.e.Enrolled(p.UID))
	}
	if snap := r.e.Snapshot(); len(snap) != 1 || snap[0].UID != p.UID || snap[0].NetNS == nil {
		t.Errorf("snapshot %+v", snap)
	}

	// A duplicate enroll (the CNI ADD and the informer both report the pod) writes nothing.
	ops := len(r.dp.Ops())
	if err := wait(t, r.q.Submit(p.UID, Work{Enroll: true, Pod: p})); err != nil {
		t.Fatalf("duplicate enroll: %v", err)
	}
	if got := r.dp.Ops(); len(got) != ops {
		t.Errorf("a duplicate enroll wrote: %v", got[ops:])
	}

	if err := wait(t, r.q.Submit(p.UID, Work{Pod: p})); err != nil {
		t.Fatal(err)
	}
	dump = r.dp.Dump()
	if strings.Contains(dump, "sleep") || strings.Contains(dump, "10.0.0.9") {
		t.Errorf("after remove the dataplane still holds the pod:\n%s", dump)
	}
	if got := r.proxy.Events(); got[len(got)-1] != "del uid-sleep" {
		t.Errorf("proxy events %v, want a del last", got)
	}
	if r.ann.has("demo/sleep") || r.e.Enrolled(p.UID) || len(r.e.Snapshot()) != 0 {
		t.Errorf("pod still recorded after remove")
	}
}

// With no proxy the enrollment fails (the CNI ADD fails: fail closed), and the retries
// enroll the pod once a proxy is back.
func TestEnrollWithoutProxy(t *testing.T) {
	r := newRig(t)
	r.proxy.mu.Lock()
	r.proxy.down = true
	r.proxy.mu.Unlock()
	p := testPod("httpbin")
	if err := wait(t, r.q.Submit(p.UID, Work{Enroll: true, Pod: p})); !errors.Is(err, zds.ErrNoProxy) {
		t.Fatalf("enroll without proxy: %v, want ErrNoProxy", err)
	}
	if r.ann.has("demo/httpbin") {
		t.Errorf("annotated though the proxy never took the pod")
	}
	r.proxy.mu.Lock()
	r.proxy.down = false
	r.proxy.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for !r.e.Enrolled(p.UID) {
		if time.Now().After(deadline) {
			t.Fatal("not enrolled by the retries after the proxy came back")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Removing a pod this agent never enrolled (after a restart) undoes what the namespace
// and the node hold; a namespace already gone is skipped.
func TestRemoveAfterRestart(t *testing.T) {
	r := newRig(t)
	p := testPod("notsleep")
	if err := wait(t, r.q.Submit(p.UID, Work{Enroll: true, Pod: p})); err != nil {
		t.Fatal(err)
	}
	// A new agent: same dataplane and proxy, no memory.
	r.e = &Enroller{Dataplane: r.dp, Proxy: r.proxy, Annotator: r.ann, Host: r.host, Intent: compiler.DefaultIntent(), OpenNetNS: r.e.OpenNetNS, Log: quiet}
	q := NewQueue(2, time.Millisecond, time.Millisecond, r.e.Process)
	runQueue(t, q)
	if err := wait(t, q.Submit(p.UID, Work{Pod: p})); err != nil {
		t.Fatal(err)
	}
	if dump := r.dp.Dump(); strings.Contains(dump, "notsleep") || strings.Contains(dump, "10.0.0.9") {
		t.Errorf("remove after restart left:\n%s", dump)
	}
	gone := testPod("gone")
	if err := wait(t, q.Submit(gone.UID, Work{Pod: gone})); err != nil {
		t.Errorf("remove with the namespace gone: %v", err)
	}
}

// A CNI ADD and an informer event for the same pod at the same moment, many times: never
// an error, and the pod ends enrolled exactly once in the proxy's eyes per distinct state.
func TestConcurrentReporters(t *testing.T) {
	r := newRig(t)
	for i := range 200 {
		p := testPod(fmt.Sprintf("p%d", i))
		a := r.q.Submit(p.UID, Work{Enroll: true, Pod: p, Reason: "cni add"})
		b := r.q.Submit(p.UID, Work{Enroll: true, Pod: p, Reason: "informer"})
		if err := wait(t, a); err != nil {
			t.Fatalf("cni add %d: %v", i, err)
		}
		if err := wait(t, b); err != nil {
			t.Fatalf("informer %d: %v", i, err)
		}
	}
	if n := len(r.e.Snapshot()); n != 200 {
		t.Errorf("%d pods enrolled, want 200", n)
	}
}

// Until HandOff, enrollments are recorded for the ZDS snapshot and not sent: a proxy
// reconnecting to a restarted agent must find every running pod in its first snapshot.
func TestDeferProxyUntilHandOff(t *testing.T) {
	r := newRig(t)
	r.e.DeferProxy()
	early := testPod("early")
	if err := <-r.q.Submit(early.UID, Work{Enroll: true, Pod: early}); err != nil {
		t.Fatal(err)
	}
	if ev := r.proxy.Events(); len(ev) != 0 {
		t.Errorf("proxy got %q while deferred, want nothing", ev)
	}
	snap := r.e.Snapshot()
	if len(snap) != 1 || snap[0].UID != early.UID || snap[0].NetNS == nil {
		t.Fatalf("snapshot %+v, want the deferred pod with its namespace", snap)
	}
	if !r.ann.has(early.String()) {
		t.Error("deferred pod not annotated")
	}
	r.e.HandOff()
	late := testPod("late")
	late.IPs = []netip.Addr{netip.MustParseAddr("10.0.0.10")}
	if err := <-r.q.Submit(late.UID, Work{Enroll: true, Pod: late}); err != nil {
		t.Fatal(err)
	}
	if ev := r.proxy.Events(); len(ev) != 1 || !strings.HasPrefix(ev[0], "add uid-late") {
		t.Errorf("proxy events %q after HandOff, want the late pod's add", ev)
	}
}

// A failed proxy Add leaves the pod recorded (its rules stay: fail closed), so the next
// proxy's snapshot serves it, and Holds reports it unchanged only for the same facts.
func TestRecordedBeforeProxyAdd(t *testing.T) {
	r := newRig(t)
	r.proxy.down = true
	p := testPod("sleep")
	if err := <-r.q.Submit(p.UID, Work{Enroll: true, Pod: p}); err == nil {
		t.Fatal("enroll with the proxy down succeeded")
	}
	if snap := r.e.Snapshot(); len(snap) != 1 {
		t.Fatalf("snapshot %d entries, want the pod whose rules are in", len(snap))
	}
	if !r.e.Holds(p.UID, p) {
		t.Error("Holds(same pod) = false")
	}
	q := p
	q.Annotations = map[string]string{"ambient.istio.io/bypass-inbound-capture": "true"}
	if r.e.Holds(p.UID, q) {
		t.Error("Holds ignores a rule annotation change")
	}
	q = p
	q.Annotations = map[string]string{"unrelated": "x"}
	if !r.e.Holds(p.UID, q) {
		t.Error("Holds sees an annotation that shapes no rule")
	}
	r.q.Submit(p.UID, Work{Pod: p}) // stop the retries
}
