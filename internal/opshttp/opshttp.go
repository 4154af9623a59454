// Package opshttp is the operations endpoint of nftmesh's long-running services (the
// agent, the CA service): Prometheus metrics, liveness and readiness.
package opshttp

import (
	"fmt"
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves GET /metrics (reg), /healthz (200 while the process serves) and /readyz
// (200 once ready is true; before, 503 with notReady, which says what it waits for).
func Handler(reg *prometheus.Registry, ready *atomic.Bool, notReady string) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, notReady, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}
