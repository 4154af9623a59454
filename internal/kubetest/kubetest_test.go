package kubetest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
		pids = []int{shared.cp.etcd.pid(), shared.cp.apiserver.pid()}
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
			for _, p := range []*process{cp.etcd, cp.apiserver} {
				t.Logf("%s: pid %d, %s", p.name, p.pid(), rss(p.pid()))
			}
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
	for _, p := range []*process{cp.etcd, cp.apiserver} {
		if alive(p.pid()) {
			t.Errorf("%s (pid %d) still runs after cleanup", p.name, p.pid())
		}
	}
	if _, err := os.Stat(cp.dataDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("etcd data dir %s after cleanup: %v", cp.dataDir, err)
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

// A process that dies while starting fails Start with the ends of both logs, and the
// other process is stopped.
func TestStartFailureShowsLogs(t *testing.T) {
	bin := t.TempDir()
	write := func(name, script string) {
		if err := os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write("etcd", "echo etcd-says-goodbye; exit 3\n")
	write("kube-apiserver", "echo apiserver-waits; exec sleep 60\n")
	_, err := start(bin, t.TempDir())
	if err == nil {
		t.Fatal("start succeeded")
	}
	for _, want := range []string{"etcd exited while starting", "exit status 3", "etcd-says-goodbye", "apiserver-waits"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	out, _ := exec.Command("pgrep", "-f", "-x", "sleep 60", "-P", fmt.Sprint(os.Getpid())).Output()
	if len(out) > 0 {
		t.Errorf("the fake kube-apiserver still runs: pid %s", out)
	}
}

func TestNotBuilt(t *testing.T) {
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "internal", "kubetest")); err != nil {
		t.Fatalf("repoRoot %s: %v", root, err)
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "controlplane"), "--cached")
	cmd.Env = append(os.Environ(), "NFTMESH_CONTROLPLANE_CACHE="+t.TempDir())
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), "run scripts/controlplane") {
		t.Errorf("scripts/controlplane --cached with an empty cache: %v: %s", err, out)
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
