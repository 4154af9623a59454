package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy"
	"github.com/nftmesh/nftmesh/zds"
)

func runProxy(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("proxy", "proxy --ca-cert ca.pem --ca-key ca-key.pem --workloads workloads.yaml [--intent intent.yaml] [flags]",
		"Run the node proxy: take pods from the agent over ZDS, listen in each pod's network namespace\n"+
			"on the intent's ports (default 15001 outbound, 15006 inbound, 15008 HBONE) with its proxy mark\n"+
			"(default 0x539) on every socket, tunnel mesh traffic over mutual-TLS HBONE with SPIFFE\n"+
			"identities, authorize inbound connections, serve metrics and readiness. Give it the intent the\n"+
			"pods' rules were compiled from. SIGHUP reloads the policies file (live connections the new\n"+
			"policies deny are closed); SIGTERM and SIGINT stop accepting and drain until --shutdown-deadline.",
		"0 after a clean shutdown; 2 bad flags, an input that does not load, or a failure to start.", stdout)
	var o proxy.Options
	intentFile := fs.String("intent", "", "intent `FILE` (YAML, kind: Intent) the pods' rules come from: its ports and proxy mark;\nwithout it, the built-in default intent")
	fs.StringVar(&o.ZDSSocket, "zds-socket", zds.DefaultSocketPath, "the agent's ZDS `PATH` (unix SOCK_SEQPACKET)")
	fs.StringVar(&o.CACertFile, "ca-cert", "", "mesh root CA certificate `FILE` (PEM), for minting workload certificates (required)")
	fs.StringVar(&o.CAKeyFile, "ca-key", "", "mesh root CA key `FILE` (PEM) (required)")
	fs.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust `DOMAIN`")
	fs.StringVar(&o.ClusterID, "cluster-id", "Kubernetes", "the workloads' cluster `ID`, for the metrics' source_cluster and destination_cluster (istiod's default)")
	fs.DurationVar(&o.CertTTL, "cert-ttl", 24*time.Hour, "lifetime of minted workload certificates")
	fs.StringVar(&o.WorkloadsFile, "workloads", "", "static workloads and services `FILE` (YAML) (required)")
	fs.StringVar(&o.PoliciesFile, "policies", "", "AuthorizationPolicy `FILE` (YAML, several documents); none: allow all")
	fs.StringVar(&o.RootNamespace, "root-namespace", policy.DefaultRootNamespace, "the mesh root `NAMESPACE`: its policies without selector are global")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", ":15020", "Prometheus metrics listen `ADDR` (/metrics)")
	fs.StringVar(&o.ReadyAddr, "ready-addr", ":15021", "readiness listen `ADDR` (/healthz/ready)")
	logFormat := fs.String("log-format", "text", "log `FORMAT`: text or json")
	fs.DurationVar(&o.Config.ShutdownDeadline, "shutdown-deadline", 10*time.Second, "how long to drain connections on shutdown")
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
	o.Log = slog.New(handler)
	if *workers < 0 {
		return fail("--workers: %d is negative", *workers)
	}
	if o.CACertFile == "" || o.CAKeyFile == "" || o.WorkloadsFile == "" {
		return fail("--ca-cert, --ca-key and --workloads are required (see --help)")
	}
	if o.Config.ShutdownDeadline <= 0 {
		return fail("--shutdown-deadline: %s is not positive", o.Config.ShutdownDeadline)
	}
	intent := intentFlags{file: *intentFile}
	in, err := intent.loadIntent()
	if err != nil {
		return fail("--intent: %v", err)
	}
	if o.Config.Mesh, err = compiler.Resolve(in); err != nil {
		return fail("--intent: %s: %v", intent.source(), err)
	}
	if *workers > 0 {
		runtime.GOMAXPROCS(*workers)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	reload := make(chan struct{}, 1)
	o.ReloadPolicies = reload
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			select {
			case reload <- struct{}{}:
			default: // a reload is already pending
			}
		}
	}()
	if err := proxy.Run(ctx, o); err != nil {
		return fail("%v", err)
	}
	return exitOK
}
