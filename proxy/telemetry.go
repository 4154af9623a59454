package proxy

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nftmesh/nftmesh/proxy/workload"
)

// Metrics are Istio's standard TCP metrics (docs/telemetry.md#metrics), so dashboards made
// for ztunnel work unchanged.
type Metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
	handshakeFailures              *prometheus.CounterVec
	cluster                        string // the cluster ID of the workloads the proxy knows
}

// metricLabels are ztunnel's labels on its TCP counters (locality aside), in its order.
var metricLabels = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision",
	"destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
	"destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// NewMetrics registers the counters with reg. clusterID is the workloads' cluster, as the
// source_cluster and destination_cluster labels name it ("Kubernetes" is istiod's default).
func NewMetrics(reg prometheus.Registerer, clusterID string) *Metrics {
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		if len(labels) == 0 {
			labels = metricLabels
		}
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
		reg.MustRegister(c)
		return c
	}
	return &Metrics{
		cluster:  orUnknown(clusterID),
		opened:   counter("istio_tcp_connections_opened_total", "TCP connections opened through the proxy."),
		closed:   counter("istio_tcp_connections_closed_total", "TCP connections closed through the proxy."),
		sent:     counter("istio_tcp_sent_bytes_total", "Bytes sent in response: destination to source (as Istio and ztunnel count them)."),
		received: counter("istio_tcp_received_bytes_total", "Bytes received in request: source to destination."),
		handshakeFailures: counter("nftmesh_hbone_handshake_failures_total",
			"Inbound HBONE connections whose TLS handshake failed: no, untrusted or foreign-domain client certificate, TLS version, ALPN, timeout, or the client left.",
			"destination_workload", "destination_workload_namespace"),
	}
}

// handleMetrics serves reg's metrics on mux at /metrics, for GET and HEAD only: other
// methods get 405, other paths 404 (promhttp alone answers every path and method).
func handleMetrics(mux *http.ServeMux, reg *prometheus.Registry) {
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
}

// handshakeFailed counts an inbound HBONE connection to workload name/namespace whose TLS
// handshake failed (no connection opens, so the Istio counters do not see it).
func (m *Metrics) handshakeFailed(name, namespace string) {
	if m != nil {
		m.handshakeFailures.WithLabelValues(orUnknown(name), orUnknown(namespace)).Inc()
	}
}

// connInfo describes one proxied connection, for metrics and the access log.
type connInfo struct {
	direction     string         // "outbound" or "inbound"
	src, dst      netip.AddrPort // dst: for a tunnel, the HBONE address (ip:15008)
	hboneAddr     netip.AddrPort // the tunnel's CONNECT authority (app ip:port); none without a tunnel
	srcWorkload   string
	srcNamespace  string
	srcIdentity   string
	dstWorkload   string
	dstNamespace  string
	dstIdentity   string
	srcLabels     map[string]string // the source workload's labels, when known
	dstLabels     map[string]string
	dstService    *workload.Service // the service dialled, when the destination was one
	mtls          bool
	responseFlags string // ztunnel's: "-" on success; "DENY" (policy), "CONNECT" (no upstream connection)
	start         time.Time
}

// Response flags, as ztunnel sets them.
const (
	flagDenied         = "DENY"
	flagConnectFailure = "CONNECT"
)

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func (c *connInfo) labels(cluster string) prometheus.Labels {
	reporter := "source"
	if c.direction == "inbound" {
		reporter = "destination"
	}
	security := "unknown" // ztunnel's value for plaintext, either reporter
	if c.mtls {
		security = "mutual_tls"
	}
	flags := c.responseFlags
	if flags == "" {
		flags = "-"
	}
	srcService, srcRevision := canonical(c.srcWorkload, c.srcLabels)
	dstService, dstRevision := canonical(c.dstWorkload, c.dstLabels)
	svcHost, svcName, svcNamespace := "", "", ""
	if c.dstService != nil {
		svcHost, svcName, svcNamespace = c.dstService.Host(), c.dstService.Name, c.dstService.Namespace
	}
	return prometheus.Labels{
		"reporter":                       reporter,
		"source_workload":                orUnknown(c.srcWorkload),
		"source_canonical_service":       srcService,
		"source_canonical_revision":      srcRevision,
		"source_workload_namespace":      orUnknown(c.srcNamespace),
		"source_principal":               orUnknown(c.srcIdentity),
		"source_app":                     srcService,
		"source_version":                 srcRevision,
		"source_cluster":                 clusterOf(c.srcWorkload, cluster),
		"destination_service":            orUnknown(svcHost),
		"destination_service_namespace":  orUnknown(svcNamespace),
		"destination_service_name":       orUnknown(svcName),
		"destination_workload":           orUnknown(c.dstWorkload),
		"destination_canonical_service":  dstService,
		"destination_canonical_revision": dstRevision,
		"destination_workload_namespace": orUnknown(c.dstNamespace),
		"destination_principal":          orUnknown(c.dstIdentity),
		"destination_app":                dstService,
		"destination_version":            dstRevision,
		"destination_cluster":            clusterOf(c.dstWorkload, cluster),
		"request_protocol":               "tcp",
		"response_flags":                 flags,
		"connection_security_policy":     security,
	}
}

// canonical is Istio's canonical service and revision of a workload, from its labels as
// istiod derives them (ztunnel also reports them as app and version); unknown for an
// unknown workload.
func canonical(workload string, labels map[string]string) (service, revision string) {
	if workload == "" {
		return "unknown", "unknown"
	}
	return orUnknown(firstLabel(labels, workload, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app")),
		orUnknown(firstLabel(labels, "latest", "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"))
}

// clusterOf is a known workload's cluster: the one cluster the proxy knows.
func clusterOf(workload, cluster string) string {
	if workload == "" {
		return "unknown"
	}
	return cluster
}

func firstLabel(labels map[string]string, otherwise string, keys ...string) string {
	for _, k := range keys {
		if v, ok := labels[k]; ok {
			return v
		}
	}
	return otherwise
}

func (m *Metrics) open(c *connInfo) {
	if m != nil {
		m.opened.With(c.labels(m.cluster)).Inc()
	}
}

// done counts the connection closed with its bytes and writes its access log line. toDst
// is what the source sent towards the destination, fromDst what came back. Istio's
// counters (and ztunnel's) name them as the destination of a request sees them, for either
// reporter: received_bytes counts toDst, sent_bytes fromDst. The access log speaks for the
// reporting workload, as ztunnel's does: outbound, bytes_sent is toDst; inbound, it is
// fromDst (what the app sent back).
func (m *Metrics) done(log *slog.Logger, c *connInfo, toDst, fromDst int64, err error) {
	if m != nil {
		l := c.labels(m.cluster)
		m.closed.With(l).Inc()
		m.sent.With(l).Add(float64(fromDst))
		m.received.With(l).Add(float64(toDst))
	}
	sent, received := toDst, fromDst
	if c.direction == "inbound" {
		sent, received = fromDst, toDst
	}
	service := "unknown"
	if c.dstService != nil {
		service = c.dstService.Host()
	}
	srcID, dstID := "unknown", "unknown" // as ztunnel: identities are logged for mTLS only
	if c.mtls {
		srcID, dstID = orUnknown(c.srcIdentity), orUnknown(c.dstIdentity)
	}
	// The fields and formats of ztunnel's line ("connection complete"), so that queries
	// written for it work: duration in whole milliseconds, "12ms".
	attrs := []any{
		"src.addr", c.src.String(), "src.workload", orUnknown(c.srcWorkload), "src.namespace", orUnknown(c.srcNamespace),
		"src.identity", srcID, "dst.addr", c.dst.String(), "dst.hbone_addr", addrOrNone(c.hboneAddr),
		"dst.service", service, "dst.workload", orUnknown(c.dstWorkload), "dst.namespace", orUnknown(c.dstNamespace),
		"dst.identity", dstID, "direction", c.direction, "bytes_sent", sent, "bytes_recv", received,
		"duration", fmt.Sprintf("%dms", time.Since(c.start).Milliseconds()),
	}
	if err != nil { // at Error, as ztunnel's
		log.Error("connection complete", append(attrs, "error", err.Error())...)
		return
	}
	log.Info("connection complete", attrs...)
}

func addrOrNone(a netip.AddrPort) string {
	if !a.IsValid() {
		return "none"
	}
	return a.String()
}
