package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/nftmesh/nftmesh/internal/input"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/identity"
	kubesrc "github.com/nftmesh/nftmesh/proxy/kube"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/zds"
)

// MinCertTTL is the shortest workload certificate lifetime the proxy takes. A certificate
// is served until half its lifetime has passed (the issuer renews it then), so a peer
// verifying it may see as little as half the TTL left; and its NotBefore is set 5 minutes
// back for peers whose clocks are behind. A TTL of 10 minutes gives peers whose clocks are
// ahead the same 5 minutes. Shorter TTLs serve certificates that such peers, or any peer
// after a slow handshake, find expired.
const MinCertTTL = 10 * time.Minute

// Options is everything `nftmesh proxy` runs with: where to find the agent, the CA, the
// workloads and the policies (a file or the Kubernetes API), and where to serve metrics
// and readiness.
type Options struct {
	Config     Config
	ZDSSocket  string // the agent's ZDS socket; "": zds.DefaultSocketPath
	CACertFile string // the mesh CA, for minting workload certificates here (PEM): tests and demos
	CAKeyFile  string
	// CAAddress is a CA service (istiod's IstioCertificateService, or nftmesh's own) to
	// ask for workload certificates instead: exactly one of it and CACertFile/CAKeyFile.
	CAAddress     string
	CATokenFile   string        // with CAAddress: the bearer token sent, re-read for each request
	CARootFile    string        // with CAAddress: the roots of the CA's TLS certificate and of the mesh (PEM)
	CAClusterID   string        // with CAAddress: the clusterid header; "": identity.DefaultClusterID
	TrustDomain   string        // "": identity.DefaultTrustDomain
	CertTTL       time.Duration // 0: the issuer's default (24h); else at least MinCertTTL
	ClusterID     string        // source_cluster and destination_cluster in the metrics
	WorkloadsFile string        // static workloads and services (YAML); or, from the Kubernetes API,
	Kubeconfig    string        // through this kubeconfig file or
	InCluster     bool          // the in-cluster configuration: exactly one of the three
	PoliciesFile  string        // AuthorizationPolicies (YAML), with WorkloadsFile; "" allows all
	RootNamespace string
	MetricsAddr   string // Prometheus /metrics (GET, HEAD)
	ReadyAddr     string // /healthz/ready (GET, HEAD); equal to MetricsAddr: one listener serves both
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
	if o.CertTTL != 0 && o.CertTTL < MinCertTTL {
		return fmt.Errorf("certificate TTL %v is shorter than %v (see MinCertTTL)", o.CertTTL, MinCertTTL)
	}
	if o.TrustDomain != "" {
		if err := identity.CheckTrustDomain(o.TrustDomain); err != nil {
			return fmt.Errorf("--trust-domain: %w", err)
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	fetches := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nftmesh_proxy_certificate_fetches_total",
		Help: "Workload certificate requests to the CA service (--ca-address), by result: success, or failure (the CA unreachable or refusing, or its answer rejected).",
	}, []string{"result"})
	reg.MustRegister(fetches)
	onFetch := func(_ identity.ID, err error) {
		result := "success"
		if err != nil {
			result = "failure"
		}
		fetches.WithLabelValues(result).Inc()
	}
	issuer, err := loadIssuer(o, log, onFetch)
	if err != nil {
		return err
	}
	if c, ok := issuer.(io.Closer); ok {
		defer c.Close() // last: after the proxy's shutdown, which releases every pod's identity
	}
	popts := policy.Options{RootNamespace: o.RootNamespace}
	pstore := policy.NewStore(popts)
	store, err := openWorkloads(ctx, o, pstore, log)
	if err != nil {
		return err
	}
	loadPolicies := func() error {
		if o.PoliciesFile == "" {
			return nil
		}
		data, err := input.ReadFile(o.PoliciesFile)
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
		return fmt.Errorf("--policies: %w", err)
	}

	p := New(cfg, issuer, store, pstore, NewMetrics(reg, o.ClusterID), log)

	// Metrics and readiness on their own listeners, or on one when both addresses are the
	// same string: the paths differ, and one port to expose is a fair wish. (Two strings
	// for one socket address, such as :15020 and 0.0.0.0:15020, fail the second listen.)
	metricsMux := http.NewServeMux()
	handleMetrics(metricsMux, reg)
	readyMux := metricsMux
	if o.ReadyAddr != o.MetricsAddr {
		readyMux = http.NewServeMux()
	}
	p.handleReady(readyMux)
	servers := []struct {
		flag, addr string
		h          http.Handler
	}{{"--metrics-addr", o.MetricsAddr, metricsMux}, {"--ready-addr", o.ReadyAddr, readyMux}}
	if o.ReadyAddr == o.MetricsAddr {
		servers = servers[:1]
	}
	for _, s := range servers {
		l, err := net.Listen("tcp", s.addr)
		if err != nil {
			return fmt.Errorf("%s %s: %w", s.flag, s.addr, err)
		}
		srv := &http.Server{Handler: s.h, ReadHeaderTimeout: 5 * time.Second}
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
	if client.Path == "" {
		client.Path = zds.DefaultSocketPath
	}
	m := cfg.Mesh
	log.Info("proxy started", "zds", client.Path, "trust_domain", issuer.TrustDomain(), "metrics", o.MetricsAddr, "ready", o.ReadyAddr,
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

// loadIssuer builds the issuer o names: a client of the CA service at CAAddress, or a CA
// signing here with CACertFile and CAKeyFile. An error names the flag at fault.
func loadIssuer(o Options, log *slog.Logger, onFetch func(identity.ID, error)) (identity.Issuer, error) {
	local := o.CACertFile != "" || o.CAKeyFile != ""
	switch {
	case o.CAAddress != "" && local:
		return nil, errors.New("--ca-address and --ca-cert/--ca-key are alternatives: give one")
	case o.CAAddress != "":
		return loadRemoteIssuer(o, log, onFetch)
	case !local:
		return nil, errors.New("a CA is required: --ca-address, or --ca-cert and --ca-key")
	case o.CACertFile == "" || o.CAKeyFile == "":
		return nil, errors.New("--ca-cert and --ca-key go together: give both")
	}
	return loadCAIssuer(o)
}

// loadRemoteIssuer makes the CA service's client; it reads the root and token files
// now, but connects with the first request.
func loadRemoteIssuer(o Options, log *slog.Logger, onFetch func(identity.ID, error)) (identity.Issuer, error) {
	r, err := identity.NewRemoteIssuer(identity.RemoteOptions{
		Address: o.CAAddress, RootFile: o.CARootFile, TokenFile: o.CATokenFile, ClusterID: o.CAClusterID,
		TrustDomain: o.TrustDomain, Validity: o.CertTTL, Log: log, OnFetch: onFetch,
	})
	if err != nil {
		var oe *identity.OptionError
		if errors.As(err, &oe) {
			flag := map[string]string{"Address": "--ca-address", "RootFile": "--ca-root-file", "TokenFile": "--ca-token-file",
				"TrustDomain": "--trust-domain", "Validity": "--cert-ttl"}[oe.Option]
			if flag != "" {
				return nil, fmt.Errorf("%s: %w", flag, err)
			}
		}
		return nil, fmt.Errorf("--ca-address %s: %w", o.CAAddress, err)
	}
	return r, nil
}

// loadCAIssuer reads the CA files. A file that does not read is named with its flag; what
// NewCAIssuer refuses (a file that does not parse, which its message says, or a key that
// does not match the certificate) is named with both flags and files.
func loadCAIssuer(o Options) (*identity.CAIssuer, error) {
	certPEM, err := input.ReadFile(o.CACertFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-cert: %w", err)
	}
	keyPEM, err := input.ReadFile(o.CAKeyFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-key: %w", err)
	}
	issuer, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{TrustDomain: o.TrustDomain, LeafTTL: o.CertTTL})
	if err != nil {
		return nil, fmt.Errorf("--ca-cert %s, --ca-key %s: %w", o.CACertFile, o.CAKeyFile, err)
	}
	return issuer, nil
}

// openWorkloads opens the one source of workloads o names. The Kubernetes source returns
// once it holds the API server's pods, services and policies, so that the proxy never
// serves on a partial view (which would allow what a policy not yet read denies).
func openWorkloads(ctx context.Context, o Options, pstore *policy.Store, log *slog.Logger) (workload.Store, error) {
	kube := o.Kubeconfig != "" || o.InCluster
	switch {
	case o.Kubeconfig != "" && o.InCluster:
		return nil, errors.New("--kubeconfig and --kube: give one (--kube is the in-cluster configuration)")
	case kube && o.WorkloadsFile != "":
		return nil, errors.New("--workloads and --kube/--kubeconfig: give one source of workloads")
	case kube && o.PoliciesFile != "":
		return nil, errors.New("--policies and --kube/--kubeconfig: with Kubernetes, policies are the cluster's AuthorizationPolicy objects")
	case !kube && o.WorkloadsFile == "":
		return nil, errors.New("no source of workloads: give --workloads FILE, --kubeconfig FILE or --kube")
	case !kube:
		store, err := loadWorkloads(o.WorkloadsFile)
		if err != nil {
			return nil, fmt.Errorf("--workloads: %w", err)
		}
		return store, nil
	}
	flag := "--kube"
	if o.Kubeconfig != "" {
		flag = "--kubeconfig " + o.Kubeconfig
	}
	cfg, err := kubesrc.RESTConfig(o.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	kubesrc.RouteKlog(log)
	src, err := kubesrc.New(cfg, kubesrc.Options{Policies: pstore, Log: log})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	if err := src.Start(ctx); err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	return src, nil
}

func loadWorkloads(path string) (workload.Store, error) {
	if path == "" {
		return nil, errors.New("a workloads file is required")
	}
	data, err := input.ReadFile(path)
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
