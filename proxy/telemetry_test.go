package proxy

import (
	"testing"

	"github.com/nftmesh/nftmesh/proxy/workload"
)

// TestCanonicalLabels: the canonical service and revision come from a workload's labels
// in istiod's order of precedence.
func TestCanonicalLabels(t *testing.T) {
	for _, tc := range []struct {
		name         string
		workload     string
		labels       map[string]string
		service, rev string
	}{
		{"unknown workload", "", map[string]string{"app": "x"}, "unknown", "unknown"},
		{"no labels", "web-7d4", nil, "web-7d4", "latest"},
		{"app and version", "web-7d4", map[string]string{"app": "web", "version": "v2"}, "web", "v2"},
		{"kubernetes labels first", "web-7d4", map[string]string{"app": "web", "app.kubernetes.io/name": "frontend",
			"version": "v2", "app.kubernetes.io/version": "2.1"}, "frontend", "2.1"},
		{"istio labels first", "web-7d4", map[string]string{"app": "web", "app.kubernetes.io/name": "frontend",
			"service.istio.io/canonical-name": "shop", "version": "v2", "service.istio.io/canonical-revision": "blue"}, "shop", "blue"},
	} {
		if s, r := canonical(tc.workload, tc.labels); s != tc.service || r != tc.rev {
			t.Errorf("%s: %q %q, want %q %q", tc.name, s, r, tc.service, tc.rev)
		}
	}
}

// TestMetricLabels: every label ztunnel puts on its TCP counters, filled from the
// connection's workloads and service.
func TestMetricLabels(t *testing.T) {
	c := &connInfo{direction: "outbound", mtls: true,
		srcWorkload: "web-7d4", srcNamespace: "shop", srcIdentity: "spiffe://cluster.local/ns/shop/sa/web",
		srcLabels:   map[string]string{"app": "web", "version": "v2"},
		dstWorkload: "db-0", dstNamespace: "data", dstIdentity: "spiffe://cluster.local/ns/data/sa/db",
		dstService: &workload.Service{Name: "db", Namespace: "data"}}
	want := map[string]string{
		"reporter": "source", "source_workload": "web-7d4", "source_canonical_service": "web",
		"source_canonical_revision": "v2", "source_workload_namespace": "shop",
		"source_principal": "spiffe://cluster.local/ns/shop/sa/web", "source_app": "web", "source_version": "v2",
		"source_cluster": "Kubernetes", "destination_service": "db.data.svc.cluster.local",
		"destination_service_namespace": "data", "destination_service_name": "db", "destination_workload": "db-0",
		"destination_canonical_service": "db-0", "destination_canonical_revision": "latest",
		"destination_workload_namespace": "data", "destination_principal": "spiffe://cluster.local/ns/data/sa/db",
		"destination_app": "db-0", "destination_version": "latest", "destination_cluster": "Kubernetes",
		"request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "mutual_tls",
	}
	got := c.labels("Kubernetes")
	if len(got) != len(metricLabels) {
		t.Errorf("%d labels, want the %d of metricLabels", len(got), len(metricLabels))
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	for _, k := range metricLabels {
		if _, ok := want[k]; !ok {
			t.Errorf("label %s not checked", k)
		}
	}
	// Plaintext: the principals stay (ztunnel's labels name the workloads' identities
	// whatever the security policy; only its access log hides them); an unknown workload
	// has no cluster.
	c.mtls, c.dstWorkload = false, ""
	got = c.labels("Kubernetes")
	for k, v := range map[string]string{"source_principal": "spiffe://cluster.local/ns/shop/sa/web", "connection_security_policy": "unknown",
		"destination_principal": "spiffe://cluster.local/ns/data/sa/db", "destination_cluster": "unknown",
		"destination_canonical_service": "unknown"} {
		if got[k] != v {
			t.Errorf("plaintext: %s = %q, want %q", k, got[k], v)
		}
	}
	// An empty label value is no value.
	if s, r := canonical("web-7d4", map[string]string{"app": "", "version": ""}); s != "unknown" || r != "unknown" {
		t.Errorf("empty app and version labels: %q %q, want unknown", s, r)
	}
}
