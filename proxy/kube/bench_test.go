package kube

// The Kubernetes source at scale (issue #13): 10,000 pods and 1,000 Services with their
// EndpointSlices, fed through a real kube-apiserver and etcd (internal/kubetest, a
// control plane of the benchmark's own), then
//
//   - the store's memory: the live heap after GC with the informers synced, minus the
//     same before the source was made (store-MiB, store-B/pod; heap-inuse-MiB is the
//     runtime's HeapInuse, which also counts free space in used spans);
//   - the time from an API write to the store's answer changing, one write at a time,
//     200 of each kind: a pod's redirection annotation (WorkloadByIP's InMesh), an
//     EndpointSlice's port (Resolve's target port), an AuthorizationPolicy created or
//     deleted (the policy decision). The store is polled every 100 µs.
//
//	go test -run '^$' -bench KubeSource -benchtime 1x -timeout 30m ./proxy/kube/
//
// Every party (the benchmark and its source, kube-apiserver, etcd) shares the machine.
// NFTMESH_HEAPPROF=FILE writes a heap profile of the synced source to FILE, every
// allocation sampled (slower), to see where the store's memory goes.

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/policy"
)

const (
	benchPods       = 10000
	benchServices   = 1000
	benchNamespaces = 10
	benchWrites     = 200
)

func BenchmarkKubeSource(b *testing.B) {
	if os.Getenv("NFTMESH_HEAPPROF") != "" {
		runtime.MemProfileRate = 1
	}
	cp := kubetest.Start(b)
	installCRD(b, cp.RESTConfig, crdManifest(b), "v1")
	cfg := rest.CopyConfig(cp.RESTConfig)
	cfg.QPS, cfg.Burst = 5000, 10000
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	client := kubernetes.NewForConfigOrDie(cfg)

	b.Logf("load average %s (1, 5, 15 min) at the start", loadavg())
	began := time.Now()
	nss := make([]string, benchNamespaces)
	for i := range nss {
		nss[i] = cp.Namespace(b, nil)
	}
	pods := make([]*corev1.Pod, benchPods)
	parallel(b, benchPods, func(i int) error {
		p, err := createPod(client, nss[i%benchNamespaces], i)
		pods[i] = p
		return err
	})
	b.Logf("%d pods (create and status) in %v", benchPods, time.Since(began).Round(time.Millisecond))
	mark := time.Now()
	parallel(b, benchServices, func(i int) error { return createService(client, nss[i%benchNamespaces], i) })
	b.Logf("%d services and slices in %v", benchServices, time.Since(mark).Round(time.Millisecond))
	ic := istio(b, cp.RESTConfig)
	for i := range 20 { // a few policies, as a cluster has
		ns := nss[i%benchNamespaces]
		ap := allowFrom(ns, fmt.Sprintf("base-%d", i), map[string]string{"app": fmt.Sprintf("svc%d", i)}, "cluster.local/ns/"+ns+"/sa/client")
		if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Create(context.Background(), ap, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}

	before := liveHeap()
	ps := policy.NewStore(policy.Options{})
	mark = time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := New(cp.RESTConfig, Options{Policies: ps, Log: testLog(b)})
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Start(ctx); err != nil {
		b.Fatal(err)
	}
	sync := time.Since(mark)
	after := liveHeap()
	if f := os.Getenv("NFTMESH_HEAPPROF"); f != "" {
		out, _ := os.Create(f)
		pprof.Lookup("heap").WriteTo(out, 0)
		out.Close()
	}
	if got := s.lenPods(); got != benchPods {
		b.Fatalf("the source has %d pods, want %d", got, benchPods)
	}
	storeBytes := float64(after.HeapAlloc) - float64(before.HeapAlloc)
	inuse := float64(after.HeapInuse) - float64(before.HeapInuse)
	b.Logf("synced in %v; live heap %+.1f MiB (%.0f B per pod), HeapInuse %+.1f MiB", sync.Round(time.Millisecond),
		storeBytes/(1<<20), storeBytes/benchPods, inuse/(1<<20))
	b.ReportMetric(storeBytes/(1<<20), "store-MiB")
	b.ReportMetric(storeBytes/benchPods, "store-B/pod")
	b.ReportMetric(inuse/(1<<20), "heap-inuse-MiB")
	b.ReportMetric(sync.Seconds(), "sync-s")

	// A pod's annotation, as the agent writes it (status subresource), flipped both ways.
	lat := make([]writeTimes, 0, benchWrites)
	for i := range benchWrites {
		p := pods[(i*7919)%benchPods]
		ip := netip.MustParseAddr(p.Status.PodIP)
		w, _ := s.WorkloadByIP(ip)
		value := "null"
		if !w.InMesh {
			value = strconv.Quote(RedirectionEnabled)
		}
		patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%s}}}`, AnnotationRedirection, value)
		lat = append(lat, timeWrite(b, func() error {
			_, err := client.CoreV1().Pods(p.Namespace).Patch(context.Background(), p.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
			return err
		}, func() bool { w2, ok := s.WorkloadByIP(ip); return ok && w2.InMesh != w.InMesh }))
	}
	report(b, "pod", lat)

	// A slice's port for the service port "http": 8080 and 8081 by turns.
	lat = lat[:0]
	for i := range benchWrites {
		svc := (i * 31) % benchServices
		ns := nss[svc%benchNamespaces]
		sl, err := client.DiscoveryV1().EndpointSlices(ns).Get(context.Background(), fmt.Sprintf("svc%d-1", svc), metav1.GetOptions{})
		if err != nil {
			b.Fatal(err)
		}
		port := int32(8081)
		if *sl.Ports[0].Port == 8081 {
			port = 8080
		}
		sl.Ports[0].Port = new(port)
		dst := netip.AddrPortFrom(netip.MustParseAddr(benchVIP(svc)), 80)
		lat = append(lat, timeWrite(b, func() error {
			_, err := client.DiscoveryV1().EndpointSlices(ns).Update(context.Background(), sl, metav1.UpdateOptions{})
			return err
		}, func() bool { tg, ok := s.Resolve(dst); return ok && tg.Addr.Port() == uint16(port) }))
	}
	report(b, "slice", lat)

	// An ALLOW policy for one service's pods, created (plaintext is then denied) and
	// deleted (allowed again).
	lat = lat[:0]
	for i := range benchWrites / 2 {
		svc := 100 + i
		ns := nss[svc%benchNamespaces]
		labels := map[string]string{"app": fmt.Sprintf("svc%d", svc)}
		aps := ic.SecurityV1().AuthorizationPolicies(ns)
		lat = append(lat, timeWrite(b, func() error {
			_, err := aps.Create(context.Background(), allowFrom(ns, "bench", labels, "cluster.local/ns/"+ns+"/sa/client"), metav1.CreateOptions{})
			return err
		}, func() bool { return !decide(ps, "", ns, labels) }))
		lat = append(lat, timeWrite(b, func() error {
			return aps.Delete(context.Background(), "bench", metav1.DeleteOptions{})
		}, func() bool { return decide(ps, "", ns, labels) }))
	}
	report(b, "policy", lat)
	b.Logf("load average %s at the end", loadavg())
}

func (x *index) lenPods() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.pods)
}

// liveHeap is the runtime's memory statistics after two collections.
func liveHeap() runtime.MemStats {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m
}

// writeTimes are one write's: from its start until the store's answer changed (total),
// and until the API server answered the write (acked), the part no watcher can shorten.
type writeTimes struct{ total, acked time.Duration }

// timeWrite makes one API write and times it until changed holds.
func timeWrite(b *testing.B, write func() error, changed func() bool) writeTimes {
	b.Helper()
	if changed() {
		b.Fatal("the change is there before the write")
	}
	start := time.Now()
	if err := write(); err != nil {
		b.Fatal(err)
	}
	acked := time.Since(start)
	for !changed() {
		if time.Since(start) > 30*time.Second {
			b.Fatal("no change 30s after the write")
		}
		time.Sleep(100 * time.Microsecond)
	}
	return writeTimes{time.Since(start), acked}
}

func report(b *testing.B, kind string, lat []writeTimes) {
	pct := func(d []time.Duration) (p50, p99, max time.Duration) {
		slices.Sort(d)
		return d[len(d)/2], d[min(len(d)-1, len(d)*99/100)], d[len(d)-1]
	}
	var total, acked, after []time.Duration
	for _, l := range lat {
		total, acked, after = append(total, l.total), append(acked, l.acked), append(after, l.total-l.acked)
	}
	t50, t99, tmax := pct(total)
	a50, a99, _ := pct(acked)
	w50, w99, _ := pct(after)
	b.Logf("%s: %d writes: write to decision p50 %v, p99 %v, max %v; the write's own round trip p50 %v, p99 %v; its answer to the decision p50 %v, p99 %v",
		kind, len(lat), t50, t99, tmax, a50, a99, w50, w99)
	b.ReportMetric(float64(t50.Microseconds())/1000, kind+"-p50-ms")
	b.ReportMetric(float64(t99.Microseconds())/1000, kind+"-p99-ms")
	b.ReportMetric(float64(w99.Microseconds())/1000, kind+"-after-ack-p99-ms")
}

func loadavg() string {
	data, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(data))[:3], " ")
}

// parallel runs f(0..n-1) on 32 goroutines and fails on the first error.
func parallel(b *testing.B, n int, f func(i int) error) {
	b.Helper()
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		first atomic.Pointer[error]
	)
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || first.Load() != nil {
					return
				}
				if err := f(i); err != nil {
					first.CompareAndSwap(nil, &err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := first.Load(); err != nil {
		b.Fatal(*err)
	}
}

func benchPodIP(i int) string { return fmt.Sprintf("10.%d.%d.%d", 64+i>>16, i>>8&0xff, i&0xff) }
func benchVIP(i int) string   { return fmt.Sprintf("10.96.%d.%d", 100+i>>8, i&0xff) }

// createPod makes pod i as a Deployment's pod looks (a container with ports, probes,
// resources, env; the apiserver adds managed fields), then writes its status.
func createPod(client kubernetes.Interface, ns string, i int) (*corev1.Pod, error) {
	svc := i % benchServices
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("svc%d-%d", svc, i), Namespace: ns,
			Labels: map[string]string{"app": fmt.Sprintf("svc%d", svc), "version": "v1", "pod-template-hash": "5d8f7c9b6"},
			Annotations: map[string]string{AnnotationRedirection: RedirectionEnabled,
				"kubectl.kubernetes.io/default-container": "app", "prometheus.io/scrape": "true"}},
		Spec: corev1.PodSpec{
			NodeName: fmt.Sprintf("node%d", i%100), ServiceAccountName: fmt.Sprintf("svc%d", svc),
			Containers: []corev1.Container{{
				Name: "app", Image: "registry.example.com/team/app:1.2.3",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "metrics", ContainerPort: 9090}},
				Env:   []corev1.EnvVar{{Name: "LOG_LEVEL", Value: "info"}, {Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
				Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
					Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")}},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromString("http")}}},
			}},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create pod %d: %w", i, err)
	}
	ip := benchPodIP(i)
	now := metav1.Now()
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: "192.168.0.1",
		StartTime: &now, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}},
		ContainerStatuses: []corev1.ContainerStatus{{Name: "app", Ready: true, Image: "registry.example.com/team/app:1.2.3",
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}}}}
	got, err := client.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("status of pod %d: %w", i, err)
	}
	return got, nil
}

// createService makes service i (VIP benchVIP(i), port 80 to the named port "http") and
// its slice of the pods i, i+1000, ...
func createService(client kubernetes.Interface, ns string, i int) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name := fmt.Sprintf("svc%d", i)
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{ClusterIP: benchVIP(i), Selector: map[string]string{"app": name},
			Ports: []corev1.ServicePort{svcPort("http", 80, intstr.FromString("http"))}}}
	if _, err := client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service %d: %w", i, err)
	}
	var eps []ep
	for p := i; p < benchPods; p += benchServices {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("svc%d-%d", i, p)}}
		eps = append(eps, ep{benchPodIP(p), true, pod})
	}
	sl := sliceOf(ns, name+"-1", name, map[string]int32{"http": 8080}, eps...)
	if _, err := client.DiscoveryV1().EndpointSlices(ns).Create(ctx, sl, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create slice %d: %w", i, err)
	}
	return nil
}
