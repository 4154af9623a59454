package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/zds"
)

// Options is everything `nftmesh proxy` runs with: where to find the agent, the CA, the
// workloads and the policies, and where to serve metrics and readiness.
type Options struct {
	Config        Config
	ZDSSocket     string // the agent's ZDS socket
	CACertFile    string // the mesh CA, for minting workload certificates (PEM)
	CAKeyFile     string
	TrustDomain   string
	CertTTL       time.Duration
	ClusterID     string // source_cluster and destination_cluster in the metrics
	WorkloadsFile string // static workloads and services (YAML)
	PoliciesFile  string // AuthorizationPolicies (YAML); "" allows all
	RootNamespace string
	MetricsAddr   string // Prometheus /metrics
	ReadyAddr     string // /healthz/ready
	// ReloadPolicies, when it receives, reads PoliciesFile again (SIGHUP); a file that
	// fails to load keeps the previous policies.
	ReloadPolicies <-chan struct{}
	Log            *slog.Logger
}

// Run starts the proxy with o and serves until ctx ends, then drains for
// Config.ShutdownDeadline. It fails before serving anything when an input does not load.
func Run(ctx context.Context, o Options) error {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	cfg := o.Config.withDefaults()
	issuer, err := loadIssuer(o)
	if err != nil {
		return err
	}
	store, err := loadWorkloads(o.WorkloadsFile)
	if err != nil {
		return err
	}
	popts := policy.Options{RootNamespace: o.RootNamespace}
	pstore := policy.NewStore(popts)
	loadPolicies := func() error {
		if o.PoliciesFile == "" {
			return nil
		}
		data, err := os.ReadFile(o.PoliciesFile)
		if err != nil {
			return err
		}
		ps, err := policy.Parse(data, popts)
		if err != nil {
			return fmt.Errorf("%s: %w", o.PoliciesFile, err)
		}
		return pstore.Replace(ps)
	}
	if err := loadPolicies(); err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	p := New(cfg, issuer, store, pstore, NewMetrics(reg, o.ClusterID), log)

	servers := map[string]http.Handler{
		o.MetricsAddr: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}),
		o.ReadyAddr:   p.Handler(),
	}
	for addr, h := range servers {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(l)
		defer srv.Close()
	}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-o.ReloadPolicies:
				if err := loadPolicies(); err != nil {
					log.Error("policy reload failed; keeping the previous policies", "error", err)
					continue
				}
				log.Info("policies reloaded", "generation", pstore.Generation())
			}
		}
	}()
	go p.WatchPolicies(ctx)
	client := &zds.Client{Path: o.ZDSSocket, Handler: p, Log: log}
	m := cfg.Mesh
	log.Info("proxy started", "zds", o.ZDSSocket, "trust_domain", issuer.TrustDomain(), "metrics", o.MetricsAddr, "ready", o.ReadyAddr,
		"workers", runtime.GOMAXPROCS(0), "outbound_port", m.OutboundPort, "inbound_port", m.InboundPlaintextPort,
		"hbone_port", m.HBONEPort, "mark", fmt.Sprintf("%#x", cfg.mark()))
	runErr := client.Run(ctx)
	if errors.Is(runErr, context.Canceled) {
		runErr = nil
	}
	log.Info("shutting down", "deadline", cfg.ShutdownDeadline)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownDeadline+time.Second)
	defer cancel()
	p.Shutdown(sctx)
	log.Info("stopped")
	return runErr
}

func loadIssuer(o Options) (*identity.CAIssuer, error) {
	if o.CACertFile == "" || o.CAKeyFile == "" {
		return nil, errors.New("a CA certificate and key are required")
	}
	certPEM, err := os.ReadFile(o.CACertFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(o.CAKeyFile)
	if err != nil {
		return nil, err
	}
	issuer, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{TrustDomain: o.TrustDomain, LeafTTL: o.CertTTL})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", o.CACertFile, err)
	}
	return issuer, nil
}

func loadWorkloads(path string) (workload.Store, error) {
	if path == "" {
		return nil, errors.New("a workloads file is required")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	f, err := workload.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	store, err := workload.NewStatic(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return store, nil
}
