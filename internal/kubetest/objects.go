package kubetest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// The helpers' own timeout. They do not use t.Context(), which is cancelled before
// t.Cleanup functions run, where DeletePod is often called.
const callTimeout = 30 * time.Second

func callContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), callTimeout)
}

var nsCounter atomic.Int64

// Namespace creates a namespace with the labels, named after the test and unique in the
// control plane, and returns its name. It is never deleted (it would stay Terminating).
func (cp *ControlPlane) Namespace(t testing.TB, labels map[string]string) string {
	t.Helper()
	name := fmt.Sprintf("%s-%d", dnsLabel(t.Name(), 40), nsCounter.Add(1))
	ctx, cancel := callContext()
	defer cancel()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("kubetest: create namespace %s: %v", name, err)
	}
	return name
}

// dnsLabel makes s (a test name) a lowercase DNS label of at most max characters.
func dnsLabel(s string, max int) string {
	b := []byte(strings.ToLower(s))
	for i, c := range b {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			b[i] = '-'
		}
	}
	if len(b) > max {
		b = b[:max]
	}
	if s = strings.Trim(string(b), "-"); s == "" {
		return "test"
	}
	return s
}

// PodSpec describes a Pod for RunningPod. Namespace, Name and NodeName are required.
type PodSpec struct {
	Namespace, Name    string
	NodeName           string
	Labels             map[string]string
	Annotations        map[string]string
	ServiceAccountName string
	// Containers defaults to one container "app" with image "example".
	Containers  []corev1.Container
	HostNetwork bool
	// PodIPs become status.podIPs, the first also status.podIP. A hostNetwork pod
	// without PodIPs gets HostIP, as a kubelet would give it.
	PodIPs []string
	HostIP string
}

// RunningPod creates the Pod, then writes the status a kubelet would once it runs (phase
// Running, Ready, the IPs, every container running) through the status subresource. It
// returns the Pod as stored.
func (cp *ControlPlane) RunningPod(t testing.TB, spec PodSpec) *corev1.Pod {
	t.Helper()
	if spec.Namespace == "" || spec.Name == "" || spec.NodeName == "" {
		t.Fatalf("kubetest: RunningPod needs Namespace, Name and NodeName: %+v", spec)
	}
	containers := spec.Containers
	if len(containers) == 0 {
		containers = []corev1.Container{{Name: "app", Image: "example"}}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:   spec.Namespace,
			Name:        spec.Name,
			Labels:      spec.Labels,
			Annotations: spec.Annotations,
		},
		Spec: corev1.PodSpec{
			NodeName:           spec.NodeName,
			ServiceAccountName: spec.ServiceAccountName,
			HostNetwork:        spec.HostNetwork,
			Containers:         containers,
		},
	}
	ctx, cancel := callContext()
	defer cancel()
	pods := cp.Client.CoreV1().Pods(spec.Namespace)
	if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("kubetest: create pod %s/%s: %v", spec.Namespace, spec.Name, err)
	}

	ips := spec.PodIPs
	if len(ips) == 0 && spec.HostNetwork && spec.HostIP != "" {
		ips = []string{spec.HostIP}
	}
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	status := corev1.PodStatus{Phase: corev1.PodRunning, StartTime: &now}
	for _, ip := range ips {
		status.PodIPs = append(status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(ips) > 0 {
		status.PodIP = ips[0]
	}
	if spec.HostIP != "" {
		status.HostIP = spec.HostIP
		status.HostIPs = []corev1.HostIP{{IP: spec.HostIP}}
	}
	for _, c := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		status.Conditions = append(status.Conditions, corev1.PodCondition{Type: c, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	for _, c := range containers {
		status.ContainerStatuses = append(status.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, Ready: true, Started: new(true),
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	patch, err := json.Marshal(map[string]any{"status": status})
	if err != nil {
		t.Fatal(err)
	}
	got, err := pods.Patch(ctx, spec.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	if err != nil {
		t.Fatalf("kubetest: set status of pod %s/%s: %v", spec.Namespace, spec.Name, err)
	}
	return got
}

// DeletePod deletes the Pod at once (grace period 0: no kubelet would confirm a graceful
// deletion, and it would stay Terminating).
func (cp *ControlPlane) DeletePod(t testing.TB, namespace, name string) {
	t.Helper()
	ctx, cancel := callContext()
	defer cancel()
	err := cp.Client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))})
	if err != nil {
		t.Fatalf("kubetest: delete pod %s/%s: %v", namespace, name, err)
	}
}
