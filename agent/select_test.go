package agent

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func pod(mutate ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "demo", UID: "uid-app", Labels: map[string]string{}, Annotations: map[string]string{}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app"}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.5", PodIPs: []corev1.PodIP{{IP: "10.0.0.5"}}},
	}
	for _, m := range mutate {
		m(p)
	}
	return p
}

func namespace(labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo", Labels: labels}}
}

func TestDecide(t *testing.T) {
	s := Selector{ExcludeNamespaces: map[string]bool{"kube-system": true, "nftmesh-system": true}}
	ambientNS := namespace(map[string]string{LabelDataplaneMode: DataplaneModeAmbient})
	plainNS := namespace(nil)
	label := func(k, v string) func(*corev1.Pod) { return func(p *corev1.Pod) { p.Labels[k] = v } }
	cases := []struct {
		name   string
		pod    *corev1.Pod
		ns     *corev1.Namespace
		enroll bool
		reason string
	}{
		{"namespace labelled", pod(), ambientNS, true, "namespace labelled"},
		{"pod labelled, namespace not", pod(label(LabelDataplaneMode, "ambient")), plainNS, true, "pod labelled"},
		{"pod labelled, namespace unknown", pod(label(LabelDataplaneMode, "ambient")), nil, true, "pod labelled"},
		{"neither", pod(), plainNS, false, "not selected"},
		{"namespace unknown", pod(), nil, false, "not selected"},
		{"pod opts out", pod(label(LabelDataplaneMode, "none")), ambientNS, false, "opted out"},
		{"other value on the pod follows the namespace", pod(label(LabelDataplaneMode, "sidecar")), ambientNS, true, "namespace labelled"},
		{"host network", pod(func(p *corev1.Pod) { p.Spec.HostNetwork = true }, label(LabelDataplaneMode, "ambient")), ambientNS, false, "host network"},
		{"sidecar container", pod(func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy"})
		}), ambientNS, false, "sidecar"},
		{"native sidecar", pod(func(p *corev1.Pod) { p.Spec.InitContainers = []corev1.Container{{Name: "istio-proxy"}} }), ambientNS, false, "sidecar"},
		{"sidecar annotation", pod(func(p *corev1.Pod) { p.Annotations[AnnotationSidecarStatus] = "{}" }), ambientNS, false, "sidecar"},
		{"own pod", pod(label(LabelComponent, "proxy"), label(LabelDataplaneMode, "ambient")), ambientNS, false, "own pod"},
		{"excluded namespace", pod(func(p *corev1.Pod) { p.Namespace = "kube-system" }, label(LabelDataplaneMode, "ambient")), ambientNS, false, "excluded"},
		{"succeeded", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }), ambientNS, false, "Succeeded"},
		{"failed", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }), ambientNS, false, "Failed"},
		{"pending with an IP", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending }), ambientNS, true, "namespace labelled"},
		{"no IP yet", pod(func(p *corev1.Pod) { p.Status.PodIP, p.Status.PodIPs = "", nil }), ambientNS, false, "no IP yet"},
	}
	for _, c := range cases {
		d := s.Decide(c.pod, c.ns)
		if d.Enroll != c.enroll || !strings.Contains(d.Reason, c.reason) {
			t.Errorf("%s: %+v, want enroll=%v with a reason containing %q", c.name, d, c.enroll, c.reason)
		}
	}
}
