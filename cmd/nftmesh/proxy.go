package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/zds"
)

func runProxy(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("proxy", "proxy --ca-cert ca.pem --ca-key ca-key.pem (--kube | --kubeconfig FILE | --workloads workloads.yaml) [--intent intent.yaml] [flags]",
		"Run the node proxy: take pods from the agent over ZDS, listen in each pod's network namespace\n"+
			"on the intent's ports (default 15001 outbound, 15006 inbound, 15008 HBONE) with its proxy mark\n"+
			"(default 0x539) on every socket, tunnel mesh traffic over mutual-TLS HBONE with SPIFFE\n"+
			"identities, authorize inbound connections, serve metrics and readiness. Give it the intent the\n"+
			"pods' rules were compiled from.\n\n"+
			"Workloads, services and policies come from one source: the Kubernetes API (--kube in a pod,\n"+
			"--kubeconfig outside one: pods, Services, EndpointSlices and AuthorizationPolicies, watched;\n"+
			"it serves once it has read them all, and a policy applied later takes effect on new and live\n"+
			"connections), or static files for tests and demos without a cluster (--workloads, --policies;\n"+
			"SIGHUP reloads the policies file). Live connections that changed policies deny are closed.\n"+
			"SIGTERM and SIGINT stop accepting and drain until --shutdown-deadline.",
		"0 after a clean shutdown; 2 bad flags, an input that does not load, or a failure to start.", stdout)
	var o proxy.Options
	intentFile := fs.String("intent", "", "intent `FILE` (YAML, kind: Intent, one document, at most 16 MiB; - reads stdin) the pods'\nrules come from: its ports and proxy mark; without it, the built-in default intent")
	fs.StringVar(&o.ZDSSocket, "zds-socket", zds.DefaultSocketPath, "the agent's ZDS `PATH` (unix SOCK_SEQPACKET)")
	fs.StringVar(&o.CACertFile, "ca-cert", "", "mesh root CA certificate `FILE` (PEM), for minting workload certificates (required)")
	fs.StringVar(&o.CAKeyFile, "ca-key", "", "mesh root CA key `FILE` (PEM) (required)")
	fs.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust `DOMAIN`")
	fs.StringVar(&o.ClusterID, "cluster-id", "Kubernetes", "the workloads' cluster `ID`, for the metrics' source_cluster and destination_cluster (istiod's default)")
	fs.DurationVar(&o.CertTTL, "cert-ttl", 24*time.Hour, "lifetime `DURATION` of minted workload certificates, at least "+fmtDuration(proxy.MinCertTTL)+": they are renewed\nat half their lifetime, and peers whose clocks are ahead must still find them valid")
	fs.BoolVar(&o.InCluster, "kube", false, "read workloads, services and policies from the Kubernetes API with the in-cluster\nconfiguration (the pod's service account: list and watch pods, services, endpointslices\nand security.istio.io authorizationpolicies)")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "read workloads, services and policies from the Kubernetes API that kubeconfig `FILE` names")
	fs.StringVar(&o.WorkloadsFile, "workloads", "", "static workloads and services `FILE` (YAML, at most 16 MiB), instead of Kubernetes")
	fs.StringVar(&o.PoliciesFile, "policies", "", "AuthorizationPolicy `FILE` (YAML, several documents, at most 16 MiB), with --workloads;\nnone: allow all")
	fs.StringVar(&o.RootNamespace, "root-namespace", policy.DefaultRootNamespace, "the mesh root `NAMESPACE` (a Kubernetes namespace name): its policies without selector are global")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", ":15020", "Prometheus metrics listen `ADDR` (GET /metrics); equal to --ready-addr: one listener serves both")
	fs.StringVar(&o.ReadyAddr, "ready-addr", ":15021", "readiness listen `ADDR` (GET /healthz/ready: 200 after the agent's first snapshot, else 503)")
	logFormat := fs.String("log-format", "text", "log `FORMAT`: text or json")
	fs.DurationVar(&o.Config.ShutdownDeadline, "shutdown-deadline", 10*time.Second, "how long to drain connections on shutdown (positive)")
	workers := fs.Int("workers", 0, "`N` threads running proxy code at once (GOMAXPROCS); 0: the CPUs the process may use,\n"+
		"which follows a container CPU limit. Each extra worker costs thread wake-ups per packet: give\n"+
		"the proxy what its node can spare, as ztunnel's worker threads. At most "+fmt.Sprint(maxWorkers())+" here\n"+
		"(4 × the CPUs the process may run on, and never less than "+fmt.Sprint(minMaxWorkers)+")")
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
	if limit := maxWorkers(); *workers > limit {
		return fail("--workers: %d is more than %d, the limit here (4 × the %d CPUs this process may run on, and never less than %d)",
			*workers, limit, runtime.NumCPU(), minMaxWorkers)
	}
	if o.CACertFile == "" || o.CAKeyFile == "" {
		return fail("--ca-cert and --ca-key are required (see --help)")
	}
	switch sources := btoi(o.InCluster) + btoi(o.Kubeconfig != "") + btoi(o.WorkloadsFile != ""); {
	case sources == 0:
		return fail("one of --kube, --kubeconfig FILE and --workloads FILE is required (see --help)")
	case sources > 1:
		return fail("--kube, --kubeconfig and --workloads are alternatives: give one")
	case o.PoliciesFile != "" && o.WorkloadsFile == "":
		return fail("--policies goes with --workloads: with --kube or --kubeconfig, policies are the cluster's AuthorizationPolicy objects")
	}
	if o.Config.ShutdownDeadline <= 0 {
		return fail("--shutdown-deadline: %s is not positive", o.Config.ShutdownDeadline)
	}
	switch {
	case o.CertTTL <= 0:
		return fail("--cert-ttl: %s is not positive", o.CertTTL)
	case o.CertTTL < proxy.MinCertTTL:
		return fail("--cert-ttl: %s is shorter than the minimum %s (a certificate is served until half its lifetime)",
			o.CertTTL, fmtDuration(proxy.MinCertTTL))
	}
	// An explicitly empty value is a mistake, not a request for the default (which the
	// flag has already): Run would take "" as the default and start without a word.
	if o.ZDSSocket == "" {
		return fail("--zds-socket: \"\" is empty; give the agent's ZDS socket path (the default is %s)", zds.DefaultSocketPath)
	}
	if o.TrustDomain == "" {
		return fail("--trust-domain: \"\" is empty; give the SPIFFE trust domain (Istio's is %s)", identity.DefaultTrustDomain)
	}
	// An empty listen address would listen on a random port nobody scrapes or probes.
	if o.MetricsAddr == "" {
		return fail("--metrics-addr: \"\" is empty; give a listen address such as :15020")
	}
	if o.ReadyAddr == "" {
		return fail("--ready-addr: \"\" is empty; give a listen address such as :15021")
	}
	if o.ClusterID == "" {
		return fail("--cluster-id: \"\" is empty; give the workloads' cluster ID (istiod's default is Kubernetes)")
	}
	if err := identity.CheckTrustDomain(o.TrustDomain); err != nil {
		return fail("--trust-domain: %v", err)
	}
	if o.RootNamespace == "" {
		return fail("--root-namespace: empty; give the mesh root namespace (Istio's is %s)", policy.DefaultRootNamespace)
	}
	if len(validation.IsDNS1123Label(o.RootNamespace)) > 0 {
		return fail("--root-namespace: %q is not a namespace name (a DNS label: at most 63 lowercase "+
			"letters, digits and '-', starting and ending with a letter or digit)", o.RootNamespace)
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

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// minMaxWorkers is the least --workers limit, whatever the CPUs: room to oversubscribe a
// small machine on purpose (tests, benchmarks), far below what hurts (each worker is a
// thread and a scheduler slot; 100,000 took 2.2 GB and never started).
const minMaxWorkers = 64

// maxWorkers is the most --workers takes: 4 × the CPUs the process may run on (its
// affinity mask), and at least minMaxWorkers. More workers than CPUs cannot run at once
// and only add wake-ups; four times leaves room to ride a bursty CPU quota.
func maxWorkers() int { return max(4*runtime.NumCPU(), minMaxWorkers) }

// fmtDuration prints whole minutes and hours without the zero units (10m, not 10m0s).
func fmtDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
