package kubetest

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func TestMain(m *testing.M) {
	code := m.Run()
	var pids []int
	if shared.cp != nil {
		etcd, apiserver := shared.cp.PIDs()
		pids = []int{etcd, apiserver}
	}
	if err := StopShared(); err != nil {
		code = 1
	}
	for _, pid := range pids {
		if alive(pid) {
			fmt.Fprintf(os.Stderr, "kubetest: process %d of the shared control plane still runs after StopShared\n", pid)
			code = 1
		}
	}
	os.Exit(code)
}

func alive(pid int) bool {
	return !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

func TestStart(t *testing.T) {
	var cp *ControlPlane
	t.Run("use", func(t *testing.T) {
		cp = Start(t)
		defer func() {
			etcd, apiserver := cp.PIDs()
			t.Logf("etcd: pid %d, %s; kube-apiserver: pid %d, %s", etcd, rss(etcd), apiserver, rss(apiserver))
		}()
		ctx := t.Context()
		ns := cp.Namespace(t, map[string]string{"istio.io/dataplane-mode": "ambient"})
		got, err := cp.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if err != nil || got.Labels["istio.io/dataplane-mode"] != "ambient" {
			t.Fatalf("namespace %s: %v, labels %v", ns, err, got.Labels)
		}

		made := cp.RunningPod(t, PodSpec{
			Namespace: ns, Name: "web", NodeName: "node-a",
			Labels:             map[string]string{"app": "web"},
			Annotations:        map[string]string{"note": "x"},
			ServiceAccountName: "web-sa",
			PodIPs:             []string{"10.244.1.5", "fd00:10:244:1::5"},
			HostIP:             "192.168.1.10",
		})
		if made.Status.Phase != corev1.PodRunning {
			t.Errorf("RunningPod returned phase %q", made.Status.Phase)
		}

		// Read it back through the kubeconfig, which checks that file too.
		config, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		client, err := kubernetes.NewForConfig(config)
		if err != nil {
			t.Fatal(err)
		}
		pod, err := client.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var podIPs []string
		for _, ip := range pod.Status.PodIPs {
			podIPs = append(podIPs, ip.IP)
		}
		if pod.Spec.NodeName != "node-a" || pod.Status.Phase != corev1.PodRunning ||
			pod.Status.PodIP != "10.244.1.5" || strings.Join(podIPs, ",") != "10.244.1.5,fd00:10:244:1::5" ||
			pod.Status.HostIP != "192.168.1.10" || pod.Labels["app"] != "web" ||
			pod.Annotations["note"] != "x" || pod.Spec.ServiceAccountName != "web-sa" ||
			len(pod.Spec.Containers) != 1 || pod.Spec.Containers[0].Name != "app" {
			t.Errorf("pod read back: nodeName %q phase %q podIP %q podIPs %v hostIP %q labels %v annotations %v sa %q containers %v",
				pod.Spec.NodeName, pod.Status.Phase, pod.Status.PodIP, podIPs, pod.Status.HostIP,
				pod.Labels, pod.Annotations, pod.Spec.ServiceAccountName, pod.Spec.Containers)
		}
		ready := false
		for _, c := range pod.Status.Conditions {
			ready = ready || c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
		}
		if !ready {
			t.Errorf("pod not Ready: %v", pod.Status.Conditions)
		}

		host := cp.RunningPod(t, PodSpec{Namespace: ns, Name: "agent", NodeName: "node-a", HostNetwork: true, HostIP: "192.168.1.10"})
		if !host.Spec.HostNetwork || host.Status.PodIP != "192.168.1.10" {
			t.Errorf("hostNetwork pod: hostNetwork %v podIP %q", host.Spec.HostNetwork, host.Status.PodIP)
		}

		cp.DeletePod(t, ns, "web")
		if _, err := cp.Client.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("pod after DeletePod: %v, want NotFound", err)
		}
		// In a cleanup, after t.Context() is cancelled.
		t.Cleanup(func() { cp.DeletePod(t, ns, "agent") })
	})
	if cp == nil {
		return
	}
	etcd, apiserver := cp.PIDs()
	for _, pid := range []int{etcd, apiserver} {
		if alive(pid) {
			t.Errorf("pid %d still runs after cleanup", pid)
		}
	}
	if _, err := os.Stat(cp.DataDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("etcd data dir %s after cleanup: %v", cp.DataDir(), err)
	}
}

func TestShared(t *testing.T) {
	a := Shared(t)
	b := Shared(t)
	if a != b {
		t.Fatal("Shared returned two control planes")
	}
	ns1, ns2 := a.Namespace(t, nil), b.Namespace(t, nil)
	if ns1 == ns2 {
		t.Fatalf("Namespace returned %s twice", ns1)
	}
	pod := a.RunningPod(t, PodSpec{Namespace: ns1, Name: "p", NodeName: "n", PodIPs: []string{"10.0.0.9"}})
	if pod.Status.PodIP != "10.0.0.9" || pod.Status.HostIP != "" {
		t.Errorf("podIP %q hostIP %q", pod.Status.PodIP, pod.Status.HostIP)
	}
}

func rss(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return err.Error()
	}
	for line := range strings.Lines(string(data)) {
		if strings.HasPrefix(line, "VmRSS:") {
			return "RSS " + strings.Join(strings.Fields(line)[1:], " ")
		}
	}
	return "RSS unknown"
}
