package kube

import (
	"fmt"
	"net/netip"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The index alone, fed objects as the informers would (stripped), without an API server.

func podObj(ns, name, uid string, ips ...string) *podEntry {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid), Annotations: annotated}}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	e, _ := stripPod(p)
	return e.(*podEntry)
}

func svcObj(ns, name, clusterIP string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{ClusterIP: clusterIP, ClusterIPs: []string{clusterIP}, Ports: ports}}
}

// TestIndexIPClaims: three pods claim one IP; the one not being deleted holds it, the
// others wait, and a release hands it on.
func TestIndexIPClaims(t *testing.T) {
	x := newIndex()
	a, b, c := podObj("ns", "a", "uid-a", "10.0.0.1"), podObj("ns", "b", "uid-b", "10.0.0.1"), podObj("ns", "c", "uid-c", "10.0.0.1")
	owner := func() string {
		w, ok := x.WorkloadByIP(addr("10.0.0.1"))
		if !ok {
			return ""
		}
		return w.Name
	}
	x.setPod(nil, a)
	x.setPod(nil, b) // a holds: neither is being deleted
	if owner() != "a" {
		t.Fatalf("owner %q, want a (the holder keeps it)", owner())
	}
	a2 := *a
	a2.terminating = true
	x.setPod(a, &a2)
	if owner() != "a" {
		t.Fatalf("owner %q: a being deleted keeps the IP until someone else claims it", owner())
	}
	x.setPod(b, b) // b's next update takes it from the terminating a
	if owner() != "b" {
		t.Fatalf("owner %q, want b", owner())
	}
	x.setPod(nil, c)
	x.deletePod(b)
	if owner() != "c" {
		t.Fatalf("owner %q, want c (not being deleted) over a", owner())
	}
	x.deletePod(c)
	if owner() != "a" {
		t.Fatalf("owner %q, want a", owner())
	}
	x.deletePod(&a2)
	if owner() != "" || len(x.claims) != 0 || len(x.byIP) != 0 || len(x.pods) != 0 || len(x.terminating) != 0 {
		t.Fatalf("left over: owner %q, claims %v, byIP %v, pods %v, terminating %v", owner(), x.claims, x.byIP, x.pods, x.terminating)
	}
	// A pod whose IP changes releases the old one.
	x.setPod(nil, podObj("ns", "d", "uid-d", "10.0.0.2"))
	x.setPod(nil, podObj("ns", "d", "uid-d", "10.0.0.3"))
	if _, ok := x.WorkloadByIP(addr("10.0.0.2")); ok || len(x.byIP) != 1 {
		t.Errorf("old IP still held: %v", x.byIP)
	}
	// A pod made again under the same name (new UID) while the watch was away.
	x.setPod(podObj("ns", "d", "uid-d", "10.0.0.3"), podObj("ns", "d", "uid-e", "10.0.0.4"))
	if _, ok := x.WorkloadByUID("uid-d"); ok || len(x.byIP) != 1 {
		t.Errorf("the old UID is still there: %v", x.pods)
	}
}

// TestIndexEmptiesOut: deleting every object leaves nothing behind.
func TestIndexEmptiesOut(t *testing.T) {
	x := newIndex()
	svc := svcObj("ns", "s", "10.96.0.1", corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("http")})
	sl := sliceOf("ns", "s-1", "s", map[string]int32{"http": 8080}, ep{"10.0.0.1", true, nil}, ep{"10.0.0.2", false, nil})
	x.setSlice(nil, sl)
	x.setService(svc)
	x.setPod(nil, podObj("ns", "p", "uid-p", "10.0.0.1"))
	if tg, ok := x.Resolve(netip.MustParseAddrPort("10.96.0.1:80")); !ok || tg.Addr != netip.MustParseAddrPort("10.0.0.1:8080") {
		t.Fatalf("Resolve: %+v %v", tg, ok)
	}
	if s, ok := x.ServiceOf("uid-p", 8080); !ok || s.Name != "s" || s.Ports[0].TargetPort != 8080 {
		t.Fatalf("ServiceOf: %+v %v", s, ok)
	}
	x.deleteService(svc)
	x.deleteSlice(sl)
	x.deletePod(podObj("ns", "p", "uid-p"))
	if len(x.services) != 0 || len(x.byVIP) != 0 || len(x.epByIP) != 0 || len(x.pods) != 0 || len(x.byIP) != 0 {
		t.Errorf("left over: services %v, byVIP %v, epByIP %v, pods %v, byIP %v", x.services, x.byVIP, x.epByIP, x.pods, x.byIP)
	}
}

// TestIndexOddServices: ExternalName services and non-TCP ports have no view or entry;
// FQDN slices and unparsable addresses are skipped; a headless service without ports
// names the service of every port.
func TestIndexOddServices(t *testing.T) {
	x := newIndex()
	ext := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "ext"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"}}
	x.setService(ext)
	udp := svcObj("ns", "dns", "10.96.0.10", corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
		corev1.ServicePort{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP})
	x.setService(udp)
	x.setSlice(nil, sliceOf("ns", "dns-1", "dns", map[string]int32{"dns-tcp": 53}, ep{"10.0.1.1", true, nil}, ep{"not-an-ip", true, nil}))
	fqdn := sliceOf("ns", "dns-2", "dns", map[string]int32{"dns-tcp": 53}, ep{"dns.example.com", true, nil})
	fqdn.AddressType = discoveryv1.AddressTypeFQDN
	x.setSlice(nil, fqdn)
	if len(x.byVIP) != 1 {
		t.Errorf("byVIP %v, want only the TCP port", x.byVIP)
	}
	if got := resolveIndex(x, netip.MustParseAddrPort("10.96.0.10:53"), 10); len(got) != 1 || !got[netip.MustParseAddrPort("10.0.1.1:53")] {
		t.Errorf("dns resolves to %v", got)
	}
	headless := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "all"}, Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone}}
	x.setService(headless)
	x.setSlice(nil, sliceOf("ns", "all-1", "all", nil, ep{"10.0.1.2", true, nil}))
	x.setPod(nil, podObj("ns", "p", "uid-p", "10.0.1.2"))
	for _, port := range []uint16{1, 80, 65535} {
		if s, ok := x.ServiceOf("uid-p", port); !ok || s.Name != "all" {
			t.Errorf("ServiceOf(%d) on a headless service without ports: %+v %v", port, s, ok)
		}
	}
}

func resolveIndex(x *index, dst netip.AddrPort, n int) map[netip.AddrPort]bool {
	got := map[netip.AddrPort]bool{}
	for range n {
		if tg, ok := x.Resolve(dst); ok {
			got[tg.Addr] = true
		}
	}
	return got
}

// bigIndex is an index of pods pods and services services, each service with
// pods/services endpoints (all pods are endpoints of one service).
func bigIndex(pods, services int) *index {
	x := newIndex()
	per := pods / services
	for i := range pods {
		x.setPod(nil, podObj(fmt.Sprintf("ns%d", i%50), fmt.Sprintf("p%d", i), fmt.Sprintf("uid-%d", i), podIP(i)))
	}
	for s := range services {
		ns := fmt.Sprintf("ns%d", s%50)
		name := fmt.Sprintf("s%d", s)
		x.setService(svcObj(ns, name, svcIP(s), corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}))
		var eps []ep
		for i := s * per; i < (s+1)*per; i++ {
			eps = append(eps, ep{podIP(i), true, nil})
		}
		x.setSlice(nil, sliceOf(ns, name+"-1", name, map[string]int32{"http": 8080}, eps...))
	}
	return x
}

func podIP(i int) string { return fmt.Sprintf("10.%d.%d.%d", 100+i>>16, i>>8&0xff, i&0xff) }
func svcIP(i int) string { return fmt.Sprintf("10.96.%d.%d", i>>8, i&0xff) }

// TestLookupsDoNotAllocate: the per-connection lookups allocate nothing, stand-ins for
// outside endpoints included (after their first use).
func TestLookupsDoNotAllocate(t *testing.T) {
	x := bigIndex(1000, 100)
	x.setService(svcObj("ns", "outside", "10.96.200.1", corev1.ServicePort{Port: 443}))
	x.setSlice(nil, sliceOf("ns", "outside-1", "outside", map[string]int32{"": 443}, ep{"192.0.2.1", true, nil}))
	vipDst, podDst, outDst := netip.MustParseAddrPort(svcIP(7)+":80"), netip.MustParseAddrPort(podIP(123)+":8080"), netip.MustParseAddrPort("10.96.200.1:443")
	if tg, ok := x.Resolve(outDst); !ok || tg.Workload.InMesh {
		t.Fatalf("outside: %+v %v", tg, ok)
	}
	allocs := testing.AllocsPerRun(1000, func() {
		x.Resolve(vipDst)
		x.Resolve(podDst)
		x.Resolve(outDst)
		x.WorkloadByIP(podDst.Addr())
		x.WorkloadByUID("uid-77")
		x.ServiceOf("uid-77", 8080)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per round of lookups", allocs)
	}
}

// BenchmarkLookups: the per-connection cost of the store, 10,000 pods and 1,000 services.
func BenchmarkLookups(b *testing.B) {
	x := bigIndex(10000, 1000)
	vipDst, podDst := netip.MustParseAddrPort(svcIP(7)+":80"), netip.MustParseAddrPort(podIP(1234)+":8080")
	b.Run("Resolve-VIP", func(b *testing.B) {
		for b.Loop() {
			x.Resolve(vipDst)
		}
	})
	b.Run("Resolve-pod", func(b *testing.B) {
		for b.Loop() {
			x.Resolve(podDst)
		}
	})
	b.Run("WorkloadByIP", func(b *testing.B) {
		for b.Loop() {
			x.WorkloadByIP(podDst.Addr())
		}
	})
	b.Run("ServiceOf", func(b *testing.B) {
		for b.Loop() {
			x.ServiceOf("uid-1234", 8080)
		}
	})
	b.Run("Resolve-VIP-parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				x.Resolve(vipDst)
			}
		})
	})
}

// TestTransforms: the informers cache only what the index reads, and a second pass (client-go
// may apply a transform to an object it already transformed) changes nothing.
func TestTransforms(t *testing.T) {
	now := metav1.Now()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p", UID: "uid-p", Labels: map[string]string{"app": "a"},
			Annotations:   map[string]string{AnnotationRedirection: RedirectionEnabled, "big": string(make([]byte, 4096))},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}, DeletionTimestamp: &now},
		Spec: corev1.PodSpec{ServiceAccountName: "sa", NodeName: "n1", Containers: []corev1.Container{{Name: "app", Image: "x"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}, {IP: "fd00::1"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
	e1, _ := stripPod(pod)
	e2, _ := stripPod(e1)
	pe, ok := e2.(*podEntry)
	if !ok || e1 != e2 {
		t.Fatalf("stripPod twice: %T %p %p", e2, e1, e2)
	}
	if w := pe.w; w.UID != "uid-p" || w.Name != "p" || w.Namespace != "ns" || w.ServiceAccount != "sa" || w.Node != "n1" ||
		!w.InMesh || len(w.IPs) != 2 || w.IPs[1] != addr("fd00::1") || w.Labels["app"] != "a" || !pe.terminating || pe.hostNetwork {
		t.Errorf("podEntry %+v, workload %+v", pe, w)
	}
	if m := pe.GetObjectMeta(); m.GetNamespace() != "ns" || m.GetName() != "p" {
		t.Errorf("key %s/%s", m.GetNamespace(), m.GetName())
	}

	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "s", Annotations: map[string]string{"x": "y"}, ManagedFields: []metav1.ManagedFieldsEntry{{}}},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1"}, Selector: map[string]string{"app": "a"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web"), NodePort: 30080, AppProtocol: new("http")}}},
	}
	o1, _ := stripService(svc)
	o2, _ := stripService(o1)
	s1, s2 := o1.(*corev1.Service), o2.(*corev1.Service)
	want := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "s"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web")}}}}
	if !equality(s1, want) || !equality(s2, want) {
		t.Errorf("stripService: %+v, then %+v", s1, s2)
	}

	sl := sliceOf("ns", "s-1", "s", map[string]int32{"http": 8080}, ep{"10.0.0.1", true, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p", UID: "uid-p"}}})
	sl.Labels["endpointslice.kubernetes.io/managed-by"] = "endpointslice-controller.k8s.io"
	sl.Endpoints[0].NodeName = new("n1")
	sl.Endpoints[0].Zone = new("z1")
	sl.Endpoints[0].Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "z1"}}}
	sl.Endpoints[0].TargetRef.ResourceVersion = "12"
	sl.ManagedFields = []metav1.ManagedFieldsEntry{{}}
	o1, _ = stripSlice(sl)
	o2, _ = stripSlice(o1)
	l1, l2 := o1.(*discoveryv1.EndpointSlice), o2.(*discoveryv1.EndpointSlice)
	wantSl := sliceOf("ns", "s-1", "s", map[string]int32{"http": 8080}, ep{"10.0.0.1", true, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p", UID: "uid-p"}}})
	if !equality(l1, wantSl) || !equality(l2, wantSl) {
		t.Errorf("stripSlice: %+v, then %+v", l1, l2)
	}
}

func equality(a, b any) bool { return reflect.DeepEqual(a, b) }
