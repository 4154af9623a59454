// Package agent is nftmesh's node agent: it decides which pods of its node are in the mesh,
// as Istio's istio-cni node agent does, and enrolls them (rules in the pod's namespace,
// the pod handed to the node proxy over ZDS, its IPs in the node's probe sets, an
// annotation on the pod), through one keyed work queue fed by the CNI plugin and by
// Kubernetes informers. docs/enrollment.md has the facts it follows.
package agent

import (
	corev1 "k8s.io/api/core/v1"
)

// The labels and annotations enrollment reads and writes (docs/enrollment.md).
const (
	LabelDataplaneMode      = "istio.io/dataplane-mode"
	DataplaneModeAmbient    = "ambient"
	DataplaneModeNone       = "none"
	AnnotationSidecarStatus = "sidecar.istio.io/status"
	SidecarContainer        = "istio-proxy"
	AnnotationRedirection   = "ambient.istio.io/redirection"
	RedirectionEnabled      = "enabled"
	// LabelComponent marks nftmesh's own pods (deploy/ sets it): never enrolled.
	LabelComponent = "nftmesh.dev/component"
)

// Selector decides which pods are enrolled.
type Selector struct {
	// ExcludeNamespaces are never enrolled (kube-system and nftmesh's own, by default).
	ExcludeNamespaces map[string]bool
}

// Decision is whether a pod is enrolled, and why: Reason names the rule that decided, for
// logs and events.
type Decision struct {
	Enroll bool
	Reason string
	// NoIPYet: the pod is for the mesh but has no IP yet. Not a reason to remove an
	// enrolled pod: between the CNI ADD and the kubelet's status report the API shows none.
	NoIPYet bool
}

// Decide applies Istio's enablement rules to a pod and its namespace (nil when unknown):
// exclusions first (host network, a sidecar, nftmesh's own pods, excluded namespaces,
// pods that finished), then the pod's own label, then its namespace's. A pod without an IP
// is not enrolled yet: nothing could reach it.
func (s Selector) Decide(pod *corev1.Pod, ns *corev1.Namespace) Decision {
	switch {
	case pod.Spec.HostNetwork:
		return Decision{Reason: "host network"}
	case hasSidecar(pod):
		return Decision{Reason: "has an Istio sidecar"}
	case pod.Labels[LabelComponent] != "":
		return Decision{Reason: "nftmesh's own pod"}
	case s.ExcludeNamespaces[pod.Namespace]:
		return Decision{Reason: "namespace " + pod.Namespace + " is excluded"}
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return Decision{Reason: "pod " + string(pod.Status.Phase)}
	}
	switch pod.Labels[LabelDataplaneMode] {
	case DataplaneModeNone:
		return Decision{Reason: "pod opted out (" + LabelDataplaneMode + "=none)"}
	case DataplaneModeAmbient:
		return withIP(pod, "pod labelled "+LabelDataplaneMode+"=ambient")
	}
	if ns != nil && ns.Labels[LabelDataplaneMode] == DataplaneModeAmbient {
		return withIP(pod, "namespace labelled "+LabelDataplaneMode+"=ambient")
	}
	return Decision{Reason: "not selected: neither the pod nor its namespace is labelled " + LabelDataplaneMode + "=ambient"}
}

func withIP(pod *corev1.Pod, reason string) Decision {
	if pod.Status.PodIP == "" && len(pod.Status.PodIPs) == 0 {
		return Decision{Reason: "no IP yet (" + reason + ")", NoIPYet: true}
	}
	return Decision{Enroll: true, Reason: reason}
}

func hasSidecar(pod *corev1.Pod) bool {
	if _, ok := pod.Annotations[AnnotationSidecarStatus]; ok {
		return true
	}
	for _, c := range pod.Spec.Containers {
		if c.Name == SidecarContainer {
			return true
		}
	}
	for _, c := range pod.Spec.InitContainers { // native sidecars
		if c.Name == SidecarContainer {
			return true
		}
	}
	return false
}
