package kube

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/policy"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if err := kubetest.StopShared(); err != nil {
		code = 1
	}
	os.Exit(code)
}

// testLog is where a test's source logs: the test's log when -v, else nowhere.
func testLog(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// crdManifest is the AuthorizationPolicy CRD the project ships.
func crdManifest(t testing.TB) map[string]any {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(file), "..", "..", "deploy", "crds", "authorizationpolicies.yaml")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var obj map[string]any
	if err := yaml.Unmarshal(data, &obj); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return obj
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// installCRD creates (or updates) the CRD in obj, waits until it is Established and the
// API server lists version in discovery, as the source looks for it there.
func installCRD(t testing.TB, cfg *rest.Config, obj map[string]any, version string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: obj}
	crds := dyn.Resource(crdGVR)
	if _, err := crds.Create(ctx, u, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		cur, err := crds.Get(ctx, u.GetName(), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		u.SetResourceVersion(cur.GetResourceVersion())
		if _, err := crds.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("update CRD: %v", err)
		}
	} else if err != nil {
		t.Fatalf("create CRD: %v", err)
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for {
		cur, err := crds.Get(ctx, u.GetName(), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		conds, _, _ := unstructured.NestedSlice(cur.Object, "status", "conditions")
		established := false
		for _, c := range conds {
			if m, ok := c.(map[string]any); ok && m["type"] == "Established" && m["status"] == "True" {
				established = true
			}
		}
		if v, err := policyVersion(disc); established && err == nil && v == version {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("CRD %s not Established and served as %s: %v", u.GetName(), version, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// namespace makes a namespace for t and empties it when t ends (namespaces are never
// deleted: without a namespace controller they would stay Terminating). Tests watch the
// whole cluster and use fixed pod IPs: what one leaves behind (a pod holding an IP, a
// slice naming it) would answer for the same addresses in the next run (-count).
func namespace(t testing.TB, cp *kubetest.ControlPlane) string {
	t.Helper()
	ns := cp.Namespace(t, nil)
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		all := metav1.ListOptions{}
		now := metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))}
		if err := cp.Client.CoreV1().Pods(ns).DeleteCollection(c, now, all); err != nil {
			t.Errorf("delete the pods of %s: %v", ns, err)
		}
		if err := cp.Client.DiscoveryV1().EndpointSlices(ns).DeleteCollection(c, now, all); err != nil {
			t.Errorf("delete the slices of %s: %v", ns, err)
		}
		svcs, err := cp.Client.CoreV1().Services(ns).List(c, all)
		if err != nil {
			t.Errorf("list the services of %s: %v", ns, err)
			return
		}
		for _, svc := range svcs.Items {
			if err := cp.Client.CoreV1().Services(ns).Delete(c, svc.Name, now); err != nil && !apierrors.IsNotFound(err) {
				t.Errorf("delete service %s/%s: %v", ns, svc.Name, err)
			}
		}
	})
	return ns
}

// sharedCRD installs the shipped CRD on the shared control plane, once.
func sharedCRD(t testing.TB, cp *kubetest.ControlPlane) {
	t.Helper()
	installCRD(t, cp.RESTConfig, crdManifest(t), "v1")
}

// startSource runs a source against cfg until the test ends.
func startSource(t testing.TB, cfg *rest.Config, o Options) *Source {
	t.Helper()
	if o.Log == nil {
		o.Log = testLog(t)
	}
	s, err := New(cfg, o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}

func istio(t testing.TB, cfg *rest.Config) istioclient.Interface {
	t.Helper()
	c, err := istioclient.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// eventually polls cond until it holds or 10 s pass; then it fails with what() said last.
func eventually(t testing.TB, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok, got := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %s after 10s", what, got)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func must[T any](t testing.TB) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// makeService creates a ClusterIP Service (headless when headless) with the ports, and
// returns it with the VIP the API server gave it.
func makeService(t testing.TB, cp *kubetest.ControlPlane, ns, name string, headless bool, ports ...corev1.ServicePort) *corev1.Service {
	t.Helper()
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: corev1.ServiceSpec{Ports: ports}}
	if headless {
		svc.Spec.ClusterIP = corev1.ClusterIPNone
	}
	return must[*corev1.Service](t)(cp.Client.CoreV1().Services(ns).Create(ctx(t), svc, metav1.CreateOptions{}))
}

func svcPort(name string, port int32, target intstr.IntOrString) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, TargetPort: target, Protocol: corev1.ProtocolTCP}
}

// ep is an endpoint of a slice: an address, ready or not, and the pod behind it (nil:
// none).
type ep struct {
	ip    string
	ready bool
	pod   *corev1.Pod
}

func sliceOf(ns, name, service string, ports map[string]int32, eps ...ep) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	if strings.Contains(eps[0].ip, ":") {
		sl.AddressType = discoveryv1.AddressTypeIPv6
	}
	for n, p := range ports {
		sl.Ports = append(sl.Ports, discoveryv1.EndpointPort{Name: new(n), Port: new(p), Protocol: new(corev1.ProtocolTCP)})
	}
	for _, e := range eps {
		de := discoveryv1.Endpoint{Addresses: []string{e.ip}, Conditions: discoveryv1.EndpointConditions{Ready: new(e.ready)}}
		if e.pod != nil {
			de.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: e.pod.Namespace, Name: e.pod.Name, UID: e.pod.UID}
		}
		sl.Endpoints = append(sl.Endpoints, de)
	}
	return sl
}

func vip(svc *corev1.Service, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), port)
}

// decide asks the policy store about a connection from principal (none: plaintext) to
// a workload with labels in namespace.
func decide(ps *policy.Store, principal, namespace string, labels map[string]string) bool {
	return ps.Decide(policy.Connection{SrcPrincipal: principal, SrcIP: netip.MustParseAddr("10.0.0.1"),
		DstIP: netip.MustParseAddr("10.0.0.2"), DstPort: 8080}, policy.Workload{Namespace: namespace, Labels: labels}).Allow
}

func describe(v any) string { return fmt.Sprintf("%+v", v) }
