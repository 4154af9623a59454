package kube

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	apiv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/workload"
)

// The tests share one control plane, and the source watches cluster-wide: each test uses
// its own namespace and its own pod IP range, so that what other tests made does not
// answer for its addresses.

var annotated = map[string]string{AnnotationRedirection: RedirectionEnabled}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// TestPods: a pod's IPs, labels, service account, node and UID; in the mesh when
// annotated; updates and deletes; host-network and finished pods are not workloads.
func TestPods(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := namespace(t, cp)
	s := startSource(t, cp.RESTConfig, Options{})

	mesh := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "httpbin", NodeName: "node1", ServiceAccountName: "httpbin",
		Labels: map[string]string{"app": "httpbin"}, Annotations: annotated, PodIPs: []string{"10.10.0.1", "fd00:10::1"}})
	plain := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "legacy", NodeName: "node2", PodIPs: []string{"10.10.0.2"}})
	host := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "hostnet", NodeName: "node1", HostNetwork: true,
		HostIP: "10.10.0.3", Annotations: annotated})

	eventually(t, "httpbin by IP", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.10.0.1"))
		return ok && w.InMesh, describe(w)
	})
	w, _ := s.WorkloadByIP(addr("fd00:10::1"))
	want := &workload.Workload{UID: string(mesh.UID), Name: "httpbin", Namespace: ns, ServiceAccount: "httpbin",
		IPs: []netip.Addr{addr("10.10.0.1"), addr("fd00:10::1")}, Labels: map[string]string{"app": "httpbin"}, Node: "node1", InMesh: true}
	if !equalWorkload(w, want) {
		t.Errorf("httpbin: %+v, want %+v", w, want)
	}
	if got, ok := s.WorkloadByIP(addr("::ffff:10.10.0.1")); !ok || got != w {
		t.Errorf("an IPv4-mapped address: %+v %v, want httpbin", got, ok)
	}
	if got, ok := s.WorkloadByUID(string(mesh.UID)); !ok || got != w {
		t.Errorf("httpbin by UID: %+v %v", got, ok)
	}
	eventually(t, "legacy", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.10.0.2"))
		return ok && !w.InMesh && w.ServiceAccount == "default" && w.UID == string(plain.UID), describe(w)
	})
	if w, ok := s.WorkloadByIP(addr("10.10.0.3")); ok {
		t.Errorf("a host-network pod is a workload by the node's IP: %+v", w)
	}
	if _, ok := s.WorkloadByUID(string(host.UID)); ok {
		t.Error("a host-network pod is a workload")
	}
	if tg, ok := s.Resolve(netip.MustParseAddrPort("10.10.0.1:8080")); !ok || tg.Workload != w || tg.Service != nil || tg.Addr.Port() != 8080 {
		t.Errorf("Resolve of a pod IP: %+v %v", tg, ok)
	}

	// The agent enrolls legacy: the annotation (through the status subresource, as the
	// agent writes it); then relabels httpbin.
	pods := cp.Client.CoreV1().Pods(ns)
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q}}}`, AnnotationRedirection, RedirectionEnabled)
	must[*corev1.Pod](t)(pods.Patch(ctx(t), "legacy", types.MergePatchType, patch, metav1.PatchOptions{}, "status"))
	eventually(t, "legacy enrolled", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.10.0.2"))
		return ok && w.InMesh, describe(w)
	})
	must[*corev1.Pod](t)(pods.Patch(ctx(t), "httpbin", types.MergePatchType, []byte(`{"metadata":{"labels":{"version":"v2"}}}`), metav1.PatchOptions{}))
	eventually(t, "httpbin relabelled", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.10.0.1"))
		return ok && w.Labels["version"] == "v2" && w.Labels["app"] == "httpbin", describe(w)
	})
	// Removing the annotation takes the pod out of the mesh.
	patch = fmt.Appendf(nil, `{"metadata":{"annotations":{%q:null}}}`, AnnotationRedirection)
	must[*corev1.Pod](t)(pods.Patch(ctx(t), "legacy", types.MergePatchType, patch, metav1.PatchOptions{}, "status"))
	eventually(t, "legacy unenrolled", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.10.0.2"))
		return ok && !w.InMesh, describe(w)
	})

	// A pod that finished leaves (its IP goes to new pods); so does a deleted one.
	must[*corev1.Pod](t)(pods.Patch(ctx(t), "legacy", types.MergePatchType, []byte(`{"status":{"phase":"Succeeded"}}`), metav1.PatchOptions{}, "status"))
	cp.DeletePod(t, ns, "httpbin")
	eventually(t, "finished and deleted pods gone", func() (bool, string) {
		a, ok1 := s.WorkloadByIP(addr("10.10.0.2"))
		b, ok2 := s.WorkloadByIP(addr("fd00:10::1"))
		_, ok3 := s.WorkloadByUID(string(mesh.UID))
		return !ok1 && !ok2 && !ok3, describe([]any{a, b})
	})

	// A pod made before it has an IP (the CNI ADD comes first) gets it later.
	pending := must[*corev1.Pod](t)(pods.Create(ctx(t), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "pending", Namespace: ns},
		Spec:       corev1.PodSpec{NodeName: "node1", Containers: []corev1.Container{{Name: "app", Image: "example"}}},
	}, metav1.CreateOptions{}))
	eventually(t, "pending pod by UID", func() (bool, string) {
		w, ok := s.WorkloadByUID(string(pending.UID))
		return ok && len(w.IPs) == 0, describe(w)
	})
	must[*corev1.Pod](t)(pods.Patch(ctx(t), "pending", types.MergePatchType,
		[]byte(`{"status":{"phase":"Running","podIP":"10.10.0.4","podIPs":[{"ip":"10.10.0.4"}]}}`), metav1.PatchOptions{}, "status"))
	eventually(t, "pending pod by IP", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.10.0.4"))
		return ok && w.UID == string(pending.UID), describe(w)
	})
}

// TestPodIPReused: while a deleted pod lingers (Terminating), a new pod with its IP owns
// the IP; when the new one goes, the old one has it back until it goes too.
func TestPodIPReused(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := namespace(t, cp)
	s := startSource(t, cp.RESTConfig, Options{})
	pods := cp.Client.CoreV1().Pods(ns)

	old := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "old", NodeName: "node1", PodIPs: []string{"10.11.0.1"}})
	eventually(t, "old", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.11.0.1"))
		return ok && w.Name == "old", describe(w)
	})
	// Without a kubelet a graceful delete never completes: the pod stays Terminating.
	if err := pods.Delete(ctx(t), "old", metav1.DeleteOptions{GracePeriodSeconds: new(int64(300))}); err != nil {
		t.Fatal(err)
	}
	newer := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "new", NodeName: "node1", PodIPs: []string{"10.11.0.1"}})
	eventually(t, "new pod owns the IP", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.11.0.1"))
		return ok && w.UID == string(newer.UID), describe(w)
	})
	// Updates of the terminating pod do not take the IP back.
	must[*corev1.Pod](t)(pods.Patch(ctx(t), "old", types.MergePatchType, []byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{}))
	eventually(t, "old relabelled", func() (bool, string) {
		w, ok := s.WorkloadByUID(string(old.UID))
		return ok && w.Labels["x"] == "y", describe(w)
	})
	if w, _ := s.WorkloadByIP(addr("10.11.0.1")); w == nil || w.UID != string(newer.UID) {
		t.Errorf("after the old pod changed, the IP is %+v's", w)
	}
	cp.DeletePod(t, ns, "new")
	eventually(t, "old pod has the IP back", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.11.0.1"))
		return ok && w.UID == string(old.UID), describe(w)
	})
	cp.DeletePod(t, ns, "old")
	eventually(t, "IP free", func() (bool, string) {
		w, ok := s.WorkloadByIP(addr("10.11.0.1"))
		return !ok, describe(w)
	})
}

// TestServices: a VIP and port to ready endpoints, a named target port resolved from each
// slice's ports (two slices numbering it differently), a numeric one from the Service,
// an endpoint outside the mesh (no pod has its IP), not-ready endpoints left out; then
// updates and deletes of slices and of the Service.
func TestServices(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := namespace(t, cp)
	s := startSource(t, cp.RESTConfig, Options{})

	a := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "web-a", NodeName: "node1", Annotations: annotated, PodIPs: []string{"10.12.0.1"}})
	b := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "web-b", NodeName: "node2", PodIPs: []string{"10.12.0.2"}})
	c := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "web-c", NodeName: "node2", Annotations: annotated, PodIPs: []string{"10.12.0.3"}})
	notReady := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "web-d", NodeName: "node1", Annotations: annotated, PodIPs: []string{"10.12.0.4"}})
	svc := makeService(t, cp, ns, "web", false, svcPort("http", 80, intstr.FromString("web")), svcPort("metrics", 9090, intstr.FromInt32(9091)))
	esl := cp.Client.DiscoveryV1().EndpointSlices(ns)
	// Pods a, b, d and an address outside the cluster number "web" 8080; pod c numbers it 8081.
	must[*discoveryv1.EndpointSlice](t)(esl.Create(ctx(t), sliceOf(ns, "web-1", "web", map[string]int32{"http": 8080, "metrics": 9091},
		ep{"10.12.0.1", true, a}, ep{"10.12.0.2", true, b}, ep{"10.12.0.4", false, notReady}, ep{"192.0.2.50", true, nil}), metav1.CreateOptions{}))
	must[*discoveryv1.EndpointSlice](t)(esl.Create(ctx(t), sliceOf(ns, "web-2", "web", map[string]int32{"http": 8081, "metrics": 9091},
		ep{"10.12.0.3", true, c}), metav1.CreateOptions{}))

	want := map[netip.AddrPort]bool{ // the target, and whether it is in the mesh
		netip.MustParseAddrPort("10.12.0.1:8080"): true, netip.MustParseAddrPort("10.12.0.2:8080"): false,
		netip.MustParseAddrPort("192.0.2.50:8080"): false, netip.MustParseAddrPort("10.12.0.3:8081"): true,
	}
	eventually(t, "web:80 resolves to its four ready endpoints", func() (bool, string) {
		got := resolveAll(s, vip(svc, 80), 40)
		return maps.Equal(got, want), describe(got)
	})
	tg, _ := s.Resolve(vip(svc, 80))
	if tg.Service == nil || tg.Service.Name != "web" || tg.Service.Namespace != ns || tg.Service.Host() != "web."+ns+".svc.cluster.local" ||
		!slices.Equal(tg.Service.VIPs, []netip.Addr{vip(svc, 0).Addr()}) {
		t.Errorf("Resolve's Service: %+v", tg.Service)
	}
	for range 8 { // the outside address: a stand-in, not in the mesh
		tg, _ := s.Resolve(vip(svc, 80))
		if tg.Addr.Addr() == addr("192.0.2.50") && (tg.Workload == nil || tg.Workload.InMesh || tg.Workload.IPs[0] != tg.Addr.Addr()) {
			t.Errorf("the outside endpoint's workload: %+v", tg.Workload)
		}
	}
	eventually(t, "web:9090 targets 9091", func() (bool, string) {
		got := resolveAll(s, vip(svc, 9090), 40)
		return len(got) == 4 && got[netip.MustParseAddrPort("10.12.0.3:9091")], describe(got)
	})
	if tg, ok := s.Resolve(vip(svc, 81)); ok || tg.Service != nil {
		t.Errorf("a port the service does not have: %+v %v", tg, ok)
	}
	for _, c := range []struct {
		pod  *corev1.Pod
		port uint16
		ok   bool
	}{{a, 8080, true}, {c, 8081, true}, {a, 9091, true}, {a, 8081, false}, {notReady, 8080, true}, {a, 80, false}} {
		if svc, ok := s.ServiceOf(string(c.pod.UID), c.port); ok != c.ok || ok && svc.Name != "web" {
			t.Errorf("ServiceOf(%s, %d) = %+v %v, want %v", c.pod.Name, c.port, svc, ok, c.ok)
		}
	}

	// a goes unready, d ready; the outside address leaves.
	sl := must[*discoveryv1.EndpointSlice](t)(esl.Get(ctx(t), "web-1", metav1.GetOptions{}))
	sl.Endpoints = sliceOf(ns, "web-1", "web", nil, ep{"10.12.0.1", false, a}, ep{"10.12.0.2", true, b}, ep{"10.12.0.4", true, notReady}).Endpoints
	must[*discoveryv1.EndpointSlice](t)(esl.Update(ctx(t), sl, metav1.UpdateOptions{}))
	want = map[netip.AddrPort]bool{netip.MustParseAddrPort("10.12.0.2:8080"): false, netip.MustParseAddrPort("10.12.0.4:8080"): true,
		netip.MustParseAddrPort("10.12.0.3:8081"): true}
	eventually(t, "after the slice update", func() (bool, string) {
		got := resolveAll(s, vip(svc, 80), 40)
		return maps.Equal(got, want), describe(got)
	})
	// The Service's target port by number instead of by name.
	cur := must[*corev1.Service](t)(cp.Client.CoreV1().Services(ns).Get(ctx(t), "web", metav1.GetOptions{}))
	cur.Spec.Ports[0].TargetPort = intstr.FromInt32(7000)
	must[*corev1.Service](t)(cp.Client.CoreV1().Services(ns).Update(ctx(t), cur, metav1.UpdateOptions{}))
	eventually(t, "numeric target port", func() (bool, string) {
		got := resolveAll(s, vip(svc, 80), 40)
		return len(got) == 3 && got[netip.MustParseAddrPort("10.12.0.3:7000")], describe(got)
	})
	// No ready endpoint left: the service, and false.
	if err := esl.Delete(ctx(t), "web-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := esl.Delete(ctx(t), "web-2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "no endpoints", func() (bool, string) {
		tg, ok := s.Resolve(vip(svc, 80))
		return !ok && tg.Service != nil && tg.Service.Name == "web", describe(tg)
	})
	if _, ok := s.ServiceOf(string(a.UID), 7000); ok {
		t.Error("ServiceOf still names web after its slices went")
	}
	if err := cp.Client.CoreV1().Services(ns).Delete(ctx(t), "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "service deleted", func() (bool, string) {
		tg, ok := s.Resolve(vip(svc, 80))
		return !ok && tg.Service == nil, describe(tg)
	})
}

// TestServiceBeforeItsSlices: slices may come before their Service (and a slice may
// change services); the view follows whichever comes last.
func TestServiceBeforeItsSlices(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := namespace(t, cp)
	s := startSource(t, cp.RESTConfig, Options{})
	p := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "db", NodeName: "node1", Annotations: annotated, PodIPs: []string{"10.13.0.1"}})
	esl := cp.Client.DiscoveryV1().EndpointSlices(ns)
	must[*discoveryv1.EndpointSlice](t)(esl.Create(ctx(t), sliceOf(ns, "db-1", "db", map[string]int32{"": 5432}, ep{"10.13.0.1", true, p}), metav1.CreateOptions{}))
	time.Sleep(100 * time.Millisecond) // let the slice arrive first
	svc := makeService(t, cp, ns, "db", false, svcPort("", 5432, intstr.IntOrString{}))
	eventually(t, "db:5432", func() (bool, string) {
		tg, ok := s.Resolve(vip(svc, 5432))
		return ok && tg.Addr == netip.MustParseAddrPort("10.13.0.1:5432") && tg.Workload.UID == string(p.UID) && tg.Workload.InMesh, describe(tg)
	})
	// The slice moves to another service.
	other := makeService(t, cp, ns, "db-ro", false, svcPort("", 5433, intstr.FromInt32(5432)))
	sl := must[*discoveryv1.EndpointSlice](t)(esl.Get(ctx(t), "db-1", metav1.GetOptions{}))
	sl.Labels[discoveryv1.LabelServiceName] = "db-ro"
	must[*discoveryv1.EndpointSlice](t)(esl.Update(ctx(t), sl, metav1.UpdateOptions{}))
	eventually(t, "slice moved", func() (bool, string) {
		_, ok1 := s.Resolve(vip(svc, 5432))
		tg, ok2 := s.Resolve(vip(other, 5433))
		return !ok1 && ok2 && tg.Addr == netip.MustParseAddrPort("10.13.0.1:5432"), describe(tg)
	})
	if got, ok := s.ServiceOf(string(p.UID), 5432); !ok || got.Name != "db-ro" {
		t.Errorf("ServiceOf: %+v %v, want db-ro", got, ok)
	}
}

// TestHeadless: a headless service has no VIP (connections go to pod IPs, which resolve
// to the pods), but still names the service of its endpoints' ports; two services over
// one pod name the first by namespace/name.
func TestHeadless(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := namespace(t, cp)
	s := startSource(t, cp.RESTConfig, Options{})
	p := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "kafka-0", NodeName: "node1", Annotations: annotated, PodIPs: []string{"10.14.0.1"}})
	headless := makeService(t, cp, ns, "kafka-headless", true, svcPort("broker", 9092, intstr.FromInt32(9092)))
	if headless.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Fatalf("clusterIP %q", headless.Spec.ClusterIP)
	}
	makeService(t, cp, ns, "kafka", false, svcPort("broker", 9092, intstr.FromInt32(9092)))
	esl := cp.Client.DiscoveryV1().EndpointSlices(ns)
	must[*discoveryv1.EndpointSlice](t)(esl.Create(ctx(t), sliceOf(ns, "kafka-headless-1", "kafka-headless", map[string]int32{"broker": 9092},
		ep{"10.14.0.1", true, p}), metav1.CreateOptions{}))
	eventually(t, "ServiceOf the headless service", func() (bool, string) {
		svc, ok := s.ServiceOf(string(p.UID), 9092)
		return ok && svc.Name == "kafka-headless" && len(svc.VIPs) == 0, describe(svc)
	})
	tg, ok := s.Resolve(netip.MustParseAddrPort("10.14.0.1:9092"))
	if !ok || tg.Workload.UID != string(p.UID) || tg.Service != nil {
		t.Errorf("Resolve of a headless endpoint: %+v %v", tg, ok)
	}
	// A second service selecting the pod, earlier in namespace/name order, is named.
	must[*discoveryv1.EndpointSlice](t)(esl.Create(ctx(t), sliceOf(ns, "kafka-1", "kafka", map[string]int32{"broker": 9092},
		ep{"10.14.0.1", true, p}), metav1.CreateOptions{}))
	eventually(t, "ServiceOf the first service", func() (bool, string) {
		svc, ok := s.ServiceOf(string(p.UID), 9092)
		return ok && svc.Name == "kafka", describe(svc)
	})
}

// TestDualStack: a VIP of one family resolves to endpoints of that family.
func TestDualStack(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := namespace(t, cp)
	s := startSource(t, cp.RESTConfig, Options{})
	p := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "ds", NodeName: "node1", Annotations: annotated,
		PodIPs: []string{"10.15.0.1", "fd00:15::1"}})
	svc := makeService(t, cp, ns, "ds", false, svcPort("", 80, intstr.FromInt32(8080)))
	esl := cp.Client.DiscoveryV1().EndpointSlices(ns)
	must[*discoveryv1.EndpointSlice](t)(esl.Create(ctx(t), sliceOf(ns, "ds-v6", "ds", map[string]int32{"": 8080}, ep{"fd00:15::1", true, p}), metav1.CreateOptions{}))
	// The API server here has an IPv4 service range only: the v4 VIP, with only an IPv6
	// slice, falls back to the other family.
	eventually(t, "v6 endpoint for a v4 VIP", func() (bool, string) {
		tg, ok := s.Resolve(vip(svc, 80))
		return ok && tg.Addr == netip.MustParseAddrPort("[fd00:15::1]:8080"), describe(tg)
	})
	must[*discoveryv1.EndpointSlice](t)(esl.Create(ctx(t), sliceOf(ns, "ds-v4", "ds", map[string]int32{"": 8080}, ep{"10.15.0.1", true, p}), metav1.CreateOptions{}))
	eventually(t, "v4 endpoint for a v4 VIP", func() (bool, string) {
		got := resolveAll(s, vip(svc, 80), 10)
		return len(got) == 1 && got[netip.MustParseAddrPort("10.15.0.1:8080")], describe(got)
	})
}

// resolveAll resolves dst n times and returns the targets seen, each with whether its
// workload is in the mesh.
func resolveAll(s *Source, dst netip.AddrPort, n int) map[netip.AddrPort]bool {
	got := map[netip.AddrPort]bool{}
	for range n {
		if tg, ok := s.Resolve(dst); ok {
			got[tg.Addr] = tg.Workload.InMesh
		}
	}
	return got
}

func equalWorkload(a, b *workload.Workload) bool {
	return a != nil && b != nil && a.UID == b.UID && a.Name == b.Name && a.Namespace == b.Namespace && a.ServiceAccount == b.ServiceAccount &&
		slices.Equal(a.IPs, b.IPs) && maps.Equal(a.Labels, b.Labels) && a.Node == b.Node && a.InMesh == b.InMesh
}

func allowFrom(ns, name string, selector map[string]string, principals ...string) *securityv1.AuthorizationPolicy {
	ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if selector != nil {
		ap.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: selector}
	}
	ap.Spec.Action = apiv1beta1.AuthorizationPolicy_ALLOW
	ap.Spec.Rules = []*apiv1beta1.Rule{{From: []*apiv1beta1.Rule_From{{Source: &apiv1beta1.Source{Principals: principals}}}}}
	return ap
}

// TestPolicies: AuthorizationPolicies written through the v1 and the v1beta1 API reach
// the policy store (bumping its generation, on which the proxy re-checks live
// connections), and updates and deletes change decisions; an invalid policy fails closed.
func TestPolicies(t *testing.T) {
	cp := kubetest.Shared(t)
	sharedCRD(t, cp)
	ns := namespace(t, cp)
	root := namespace(t, cp)
	ic := istio(t, cp.RESTConfig)
	v1 := ic.SecurityV1().AuthorizationPolicies(ns)
	// One policy exists before the source starts: Start returns with it in the store.
	must[*securityv1.AuthorizationPolicy](t)(v1.Create(ctx(t), allowFrom(ns, "httpbin", map[string]string{"app": "httpbin"},
		"cluster.local/ns/"+ns+"/sa/sleep"), metav1.CreateOptions{}))
	ps := policy.NewStore(policy.Options{RootNamespace: root})
	s := startSource(t, cp.RESTConfig, Options{Policies: ps})
	if s.PolicyVersion() != "v1" {
		t.Errorf("watching %q, want v1", s.PolicyVersion())
	}
	httpbin := map[string]string{"app": "httpbin"}
	sleep, notsleep := "spiffe://cluster.local/ns/"+ns+"/sa/sleep", "spiffe://cluster.local/ns/"+ns+"/sa/notsleep"
	if !decide(ps, sleep, ns, httpbin) || decide(ps, notsleep, ns, httpbin) || decide(ps, "", ns, httpbin) {
		t.Fatalf("after Start: sleep %v, notsleep %v, plaintext %v; want only sleep allowed (policies %v)",
			decide(ps, sleep, ns, httpbin), decide(ps, notsleep, ns, httpbin), decide(ps, "", ns, httpbin), ps.Snapshot().Policies())
	}
	if !decide(ps, notsleep, ns, map[string]string{"app": "other"}) {
		t.Error("a workload the policy does not select is denied")
	}
	changes, stop := ps.Subscribe()
	defer stop()

	// Update: notsleep too.
	cur := must[*securityv1.AuthorizationPolicy](t)(v1.Get(ctx(t), "httpbin", metav1.GetOptions{}))
	cur.Spec.Rules[0].From[0].Source.Principals = append(cur.Spec.Rules[0].From[0].Source.Principals, "cluster.local/ns/"+ns+"/sa/notsleep")
	must[*securityv1.AuthorizationPolicy](t)(v1.Update(ctx(t), cur, metav1.UpdateOptions{}))
	eventually(t, "notsleep allowed", func() (bool, string) { return decide(ps, notsleep, ns, httpbin), "denied" })
	select {
	case <-changes:
	case <-time.After(5 * time.Second):
		t.Error("no generation change was published")
	}

	// A DENY policy through v1beta1 (the same objects, the older version).
	deny := &securityv1beta1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "no-notsleep"}}
	deny.Spec.Action = apiv1beta1.AuthorizationPolicy_DENY
	deny.Spec.Rules = []*apiv1beta1.Rule{{From: []*apiv1beta1.Rule_From{{Source: &apiv1beta1.Source{Principals: []string{"cluster.local/ns/" + ns + "/sa/notsleep"}}}}}}
	must[*securityv1beta1.AuthorizationPolicy](t)(ic.SecurityV1beta1().AuthorizationPolicies(ns).Create(ctx(t), deny, metav1.CreateOptions{}))
	eventually(t, "notsleep denied by the v1beta1 DENY", func() (bool, string) { return !decide(ps, notsleep, ns, httpbin), "allowed" })
	if !decide(ps, sleep, ns, httpbin) {
		t.Error("sleep denied")
	}

	// Deletes.
	if err := v1.Delete(ctx(t), "no-notsleep", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "DENY deleted", func() (bool, string) { return decide(ps, notsleep, ns, httpbin), "denied" })
	if err := v1.Delete(ctx(t), "httpbin", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ALLOW deleted: everything allowed", func() (bool, string) { return decide(ps, "", ns, httpbin), "denied" })

	// A mesh-wide policy in the root namespace (no selector) applies everywhere.
	must[*securityv1.AuthorizationPolicy](t)(ic.SecurityV1().AuthorizationPolicies(root).Create(ctx(t),
		allowFrom(root, "mesh-wide", nil, "cluster.local/ns/"+ns+"/sa/sleep"), metav1.CreateOptions{}))
	eventually(t, "root namespace policy", func() (bool, string) {
		return !decide(ps, notsleep, ns, httpbin) && !decide(ps, notsleep, "elsewhere", nil) && decide(ps, sleep, "elsewhere", nil), "not applied"
	})
	if p := ps.Snapshot().Get(root, "mesh-wide"); p == nil || p.Scope != policy.ScopeGlobal {
		t.Errorf("mesh-wide: %+v", p)
	}
	if err := ic.SecurityV1().AuthorizationPolicies(root).Delete(ctx(t), "mesh-wide", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// An invalid policy (a CIDR that does not parse, which Istio's webhook would refuse)
	// fails closed for the workloads it selects.
	bad := allowFrom(ns, "bad", httpbin)
	bad.Spec.Rules = []*apiv1beta1.Rule{{From: []*apiv1beta1.Rule_From{{Source: &apiv1beta1.Source{IpBlocks: []string{"10.0.0.300"}}}}}}
	must[*securityv1.AuthorizationPolicy](t)(v1.Create(ctx(t), bad, metav1.CreateOptions{}))
	eventually(t, "invalid policy fails closed", func() (bool, string) {
		return !decide(ps, sleep, ns, httpbin) && decide(ps, sleep, ns, map[string]string{"app": "other"}), "open"
	})
	if p := ps.Snapshot().Get(ns, "bad"); p == nil || len(p.Warnings) == 0 || p.Action != policy.Allow || len(p.Rules) != 0 {
		t.Errorf("the invalid policy's stand-in: %+v", p)
	}

	// A policy with a number where Istio's types have a string would not decode, and stop
	// the informer from listing any: the shipped CRD's schema has the API server refuse it.
	dyn := must[*dynamic.DynamicClient](t)(dynamic.NewForConfig(cp.RESTConfig))
	wrong := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "wrong", "namespace": ns},
		"spec":     map[string]any{"rules": []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"ports": []any{int64(8080)}}}}}}},
	}}
	gvr := schema.GroupVersionResource{Group: SecurityGroup, Version: "v1", Resource: PolicyResource}
	if _, err := dyn.Resource(gvr).Namespace(ns).Create(ctx(t), wrong, metav1.CreateOptions{}); err == nil || !strings.Contains(err.Error(), "spec.rules[0].to[0].operation.ports[0]") {
		t.Errorf("a number for a port string: %v, want the API server to refuse it", err)
	}
	wrong.Object["spec"] = map[string]any{"action": "MAYBE"}
	if _, err := dyn.Resource(gvr).Namespace(ns).Create(ctx(t), wrong, metav1.CreateOptions{}); err == nil || !strings.Contains(err.Error(), "spec.action") {
		t.Errorf("an unknown action: %v, want the API server to refuse it", err)
	}
	// Fields Istio may add later are kept, and ignored by the decoder.
	wrong.Object["spec"] = map[string]any{"action": "DENY", "rules": []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{
		"principals": []any{"x"}, "futureField": int64(1)}}}}}, "futureTop": map[string]any{"a": "b"}}
	got, err := dyn.Resource(gvr).Namespace(ns).Create(ctx(t), wrong, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if v, _, _ := unstructured.NestedFieldNoCopy(got.Object, "spec", "futureTop", "a"); v != "b" {
		t.Errorf("an unknown field was pruned: %v", got.Object["spec"])
	}
	eventually(t, "the policy with unknown fields", func() (bool, string) {
		p := ps.Snapshot().Get(ns, "wrong")
		return p != nil && p.Action == policy.Deny, describe(p)
	})
}

// TestPolicyCRDLater: on a cluster that does not have the CRD yet the source starts
// (no policy can exist), finds the CRD when it comes, and watches the version the API
// server serves: here an older CRD that serves v1beta1 only.
func TestPolicyCRDLater(t *testing.T) {
	cp := kubetest.Start(t)
	ps := policy.NewStore(policy.Options{})
	s := startSource(t, cp.RESTConfig, Options{Policies: ps, CRDPollInterval: 50 * time.Millisecond})
	if s.PolicyVersion() != "" {
		t.Fatalf("watching %q without the CRD", s.PolicyVersion())
	}
	crd := crdManifest(t)
	versions := crd["spec"].(map[string]any)["versions"].([]any)
	old := versions[1].(map[string]any)
	if old["name"] != "v1beta1" {
		t.Fatalf("the CRD's second version is %v", old["name"])
	}
	old["storage"] = true
	crd["spec"].(map[string]any)["versions"] = []any{old}
	installCRD(t, cp.RESTConfig, crd, "v1beta1")
	ns := namespace(t, cp)
	deny := &securityv1beta1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "deny-all"}}
	deny.Spec.Action = apiv1beta1.AuthorizationPolicy_DENY
	deny.Spec.Rules = []*apiv1beta1.Rule{{}}
	must[*securityv1beta1.AuthorizationPolicy](t)(istio(t, cp.RESTConfig).SecurityV1beta1().AuthorizationPolicies(ns).Create(ctx(t), deny, metav1.CreateOptions{}))
	eventually(t, "the v1beta1 policy", func() (bool, string) {
		return s.PolicyVersion() == "v1beta1" && !decide(ps, "", ns, nil), "version " + s.PolicyVersion()
	})
}

// TestLeastPrivilege: the source starts as a service account allowed only to list and
// watch pods, services, endpointslices and authorizationpolicies (deploy/'s RBAC for the
// proxy needs no more), and reads nothing it was not allowed (no namespaces).
func TestLeastPrivilege(t *testing.T) {
	cp := kubetest.Shared(t)
	sharedCRD(t, cp)
	ns := namespace(t, cp)
	rbac := cp.Client.RbacV1()
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: ns + "-proxy"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods", "services"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"security.istio.io"}, Resources: []string{"authorizationpolicies"}, Verbs: []string{"list", "watch"}},
	}}
	must[*rbacv1.ClusterRole](t)(rbac.ClusterRoles().Create(ctx(t), role, metav1.CreateOptions{}))
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: ns + "-proxy"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: "proxy"}}}
	must[*rbacv1.ClusterRoleBinding](t)(rbac.ClusterRoleBindings().Create(ctx(t), binding, metav1.CreateOptions{}))
	cfg := rest.CopyConfig(cp.RESTConfig)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":proxy",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}}
	ps := policy.NewStore(policy.Options{})
	s := startSource(t, cfg, Options{Policies: ps, SyncTimeout: 20 * time.Second})
	if s.PolicyVersion() != "v1" {
		t.Errorf("watching %q", s.PolicyVersion())
	}
	cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "p", NodeName: "node1", PodIPs: []string{"10.16.0.1"}})
	eventually(t, "a pod seen", func() (bool, string) { _, ok := s.WorkloadByIP(addr("10.16.0.1")); return ok, "absent" })
}
