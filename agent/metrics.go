package agent

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the agent's Prometheus series (README, "Node agent").
type metrics struct {
	enrolled prometheus.GaugeFunc
	latency  *prometheus.HistogramVec
	failures *prometheus.CounterVec
	cni      *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, enrolled, queued, proxies, annotationsPending func() float64) *metrics {
	m := &metrics{
		enrolled: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "nftmesh_agent_pods_enrolled", Help: "Pods of this node in the mesh (rules applied, handed to the proxy).",
		}, enrolled),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "nftmesh_agent_work_duration_seconds", Help: "Time of one enroll or remove attempt for a pod, by operation and result.",
			// Enrollment is about a millisecond of kernel work plus a ZDS round trip and an
			// API write; the tail is the API server.
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"op", "result"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nftmesh_agent_work_failures_total", Help: "Failed enroll or remove attempts, by operation and the step that failed (netns, intent, rules, proxy, probe set, annotation).",
		}, []string{"op", "step"}),
		cni: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nftmesh_agent_cni_requests_total", Help: "CNI plugin calls, by command and result (enrolled, skipped, error).",
		}, []string{"command", "result"}),
	}
	reg.MustRegister(m.enrolled, m.latency, m.failures, m.cni,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "nftmesh_agent_queue_depth", Help: "Pods with enroll or remove work waiting, running or backing off.",
		}, queued),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "nftmesh_agent_annotations_pending", Help: "Enrolled or removed pods whose redirection annotation is not written yet (retried with backoff).",
		}, annotationsPending),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "nftmesh_agent_proxies_connected", Help: "Node proxies connected over ZDS and past their snapshot.",
		}, proxies),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe records one attempt of op that started at start and ended with err.
func (m *metrics) observe(op string, start time.Time, err error) {
	result := "ok"
	if err != nil {
		result = "error"
		step := "other"
		if se := (*StepError)(nil); errors.As(err, &se) {
			step = se.Step
		}
		m.failures.WithLabelValues(op, step).Inc()
	}
	m.latency.WithLabelValues(op, result).Observe(time.Since(start).Seconds())
}
