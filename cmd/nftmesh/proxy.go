package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/zds"
)

func runProxy(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("proxy", "proxy --ca-cert ca.pem --ca-key ca-key.pem --workloads workloads.yaml [flags]",
		"Run the node proxy: take pods from the agent over ZDS, listen in each pod's network namespace\n"+
			"(15001 outbound, 15006 inbound, 15008 HBONE), tunnel mesh traffic over mutual-TLS HBONE with\n"+
			"SPIFFE identities, authorize inbound connections, serve metrics and readiness. SIGHUP reloads\n"+
			"the policies file (live connections the new policies deny are closed); SIGTERM and SIGINT stop\n"+
			"accepting and drain until --shutdown-deadline.",
		"0 after a clean shutdown; 2 bad flags or a failure to start.", stdout)
	zdsPath := fs.String("zds-socket", zds.DefaultSocketPath, "the agent's ZDS `PATH` (unix SOCK_SEQPACKET)")
	caCert := fs.String("ca-cert", "", "mesh root CA certificate `FILE` (PEM), for minting workload certificates (required)")
	caKey := fs.String("ca-key", "", "mesh root CA key `FILE` (PEM) (required)")
	trustDomain := fs.String("trust-domain", "cluster.local", "SPIFFE trust `DOMAIN`")
	clusterID := fs.String("cluster-id", "Kubernetes", "the workloads' cluster `ID`, for the metrics' source_cluster and destination_cluster (istiod's default)")
	certTTL := fs.Duration("cert-ttl", 24*time.Hour, "lifetime of minted workload certificates")
	workloads := fs.String("workloads", "", "static workloads and services `FILE` (YAML) (required)")
	policies := fs.String("policies", "", "AuthorizationPolicy `FILE` (YAML, several documents); none: allow all")
	rootNS := fs.String("root-namespace", policy.DefaultRootNamespace, "the mesh root `NAMESPACE`: its policies without selector are global")
	metricsAddr := fs.String("metrics-addr", ":15020", "Prometheus metrics listen `ADDR` (/metrics)")
	readyAddr := fs.String("ready-addr", ":15021", "readiness listen `ADDR` (/healthz/ready)")
	logFormat := fs.String("log-format", "text", "log `FORMAT`: text or json")
	deadline := fs.Duration("shutdown-deadline", 10*time.Second, "how long to drain connections on shutdown")
	workers := fs.Int("workers", 0, "`N` threads running proxy code at once (GOMAXPROCS); 0: the CPUs the process may use,\n"+
		"which follows a container CPU limit. Each extra worker costs thread wake-ups per packet: give\n"+
		"the proxy what its node can spare, as ztunnel's worker threads")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "nftmesh proxy: "+format+"\n", a...)
		return exitError
	}
	var handler slog.Handler
	switch *logFormat {
	case "text":
		handler = slog.NewTextHandler(stderr, nil)
	case "json":
		handler = slog.NewJSONHandler(stderr, nil)
	default:
		return fail("--log-format: %q is not text or json", *logFormat)
	}
	log := slog.New(handler)
	if *workers < 0 {
		return fail("--workers: %d is negative", *workers)
	}
	if *workers > 0 {
		runtime.GOMAXPROCS(*workers)
	}
	if *caCert == "" || *caKey == "" || *workloads == "" {
		return fail("--ca-cert, --ca-key and --workloads are required (see --help)")
	}
	certPEM, err := os.ReadFile(*caCert)
	if err != nil {
		return fail("%v", err)
	}
	keyPEM, err := os.ReadFile(*caKey)
	if err != nil {
		return fail("%v", err)
	}
	issuer, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{TrustDomain: *trustDomain, LeafTTL: *certTTL})
	if err != nil {
		return fail("%s: %v", *caCert, err)
	}
	wdata, err := os.ReadFile(*workloads)
	if err != nil {
		return fail("%v", err)
	}
	wfile, err := workload.Parse(wdata)
	if err == nil {
		_, err = workload.NewStatic(wfile)
	}
	if err != nil {
		return fail("%s: %v", *workloads, err)
	}
	store, _ := workload.NewStatic(wfile)
	popts := policy.Options{RootNamespace: *rootNS}
	pstore := policy.NewStore(popts)
	loadPolicies := func() error {
		if *policies == "" {
			return nil
		}
		data, err := os.ReadFile(*policies)
		if err != nil {
			return err
		}
		ps, err := policy.Parse(data, popts)
		if err != nil {
			return fmt.Errorf("%s: %w", *policies, err)
		}
		return pstore.Replace(ps)
	}
	if err := loadPolicies(); err != nil {
		return fail("%v", err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	p := proxy.New(proxy.Config{ShutdownDeadline: *deadline}, issuer, store, pstore, proxy.NewMetrics(reg, *clusterID), log)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	servers := map[string]http.Handler{
		*metricsAddr: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}),
		*readyAddr:   p.Handler(),
	}
	for addr, h := range servers {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fail("%v", err)
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(l)
		defer srv.Close()
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		for range hup {
			if err := loadPolicies(); err != nil {
				log.Error("policy reload failed; keeping the previous policies", "error", err)
				continue
			}
			log.Info("policies reloaded", "generation", pstore.Generation())
		}
	}()
	go p.Run(ctx)
	client := &zds.Client{Path: *zdsPath, Handler: p, Log: log}
	log.Info("proxy started", "zds", *zdsPath, "trust_domain", *trustDomain, "metrics", *metricsAddr, "ready", *readyAddr,
		"workers", runtime.GOMAXPROCS(0))
	if err := client.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return fail("%v", err)
	}
	log.Info("shutting down", "deadline", *deadline)
	sctx, cancel := context.WithTimeout(context.Background(), *deadline+time.Second)
	defer cancel()
	p.Shutdown(sctx)
	log.Info("stopped")
	return exitOK
}
