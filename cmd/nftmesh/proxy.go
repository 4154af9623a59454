package main

import (
	"context"
	"flag"
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
	fs := newFlagSet("proxy", "proxy (--ca-address HOST:PORT | --ca-cert ca.pem --ca-key ca-key.pem) (--kube | --kubeconfig FILE | --workloads workloads.yaml) [--intent intent.yaml] [flags]",
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
			"SIGTERM and SIGINT stop accepting and drain until --shutdown-deadline.\n\n"+
			"Workload certificates come from a CA service (--ca-address: istiod's IstioCertificateService,\n"+
			"or nftmesh ca serve), asked with the node's token (--ca-token-file) for each pod's identity,\n"+
			"with a key made here; fetched when a pod is added, renewed at half their lifetime, dropped\n"+
			"with the identity's last pod, and checked against --ca-root-file. Or, for tests and demos,\n"+
			"minted here with the CA's own key (--ca-cert, --ca-key).",
		"0 after a clean shutdown; 2 bad flags, an input that does not load, or a failure to start.", stdout)
	var o proxy.Options
	intentFile := fs.String("intent", "", "intent `FILE` (YAML, kind: Intent, one document, at most 16 MiB; - reads stdin) the pods'\nrules come from: its ports and proxy mark; without it, the built-in default intent")
	fs.StringVar(&o.ZDSSocket, "zds-socket", zds.DefaultSocketPath, "the agent's ZDS `PATH` (unix SOCK_SEQPACKET)")
	fs.StringVar(&o.CAAddress, "ca-address", "", "the CA service, `HOST:PORT` (an https:// prefix is allowed), to ask for workload certificates:\n"+
		"istiod's (istiod.istio-system.svc:15012) or nftmesh ca serve's. Instead of --ca-cert and --ca-key")
	fs.StringVar(&o.CATokenFile, "ca-token-file", defaultCATokenFile, "with --ca-address: the bearer token `FILE` sent to the CA (a projected service account token\n"+
		"with audience istio-ca), read again for every request")
	fs.StringVar(&o.CARootFile, "ca-root-file", defaultCARootFile, "with --ca-address: root certificates `FILE` (PEM) that the CA's TLS certificate must chain to;\n"+
		"they are also the mesh's trust anchors: every workload certificate must chain to them\n"+
		"(read again every minute)")
	fs.StringVar(&o.CAClusterID, "ca-cluster-id", identity.DefaultClusterID, "with --ca-address: the clusterid header: the `ID` of the cluster whose API server checks\n"+
		"the token (istiod's default)")
	fs.StringVar(&o.CACertFile, "ca-cert", "", "mesh root CA certificate `FILE` (PEM), to mint workload certificates here, for tests and demos\n"+
		"(the node then holds the CA's key); with --ca-key, instead of --ca-address")
	fs.StringVar(&o.CAKeyFile, "ca-key", "", "mesh root CA key `FILE` (PEM), with --ca-cert")
	fs.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust `DOMAIN`")
	fs.StringVar(&o.ClusterID, "cluster-id", "Kubernetes", "the workloads' cluster `ID`, for the metrics' source_cluster and destination_cluster (istiod's default)")
	fs.DurationVar(&o.CertTTL, "cert-ttl", 24*time.Hour, "lifetime `DURATION` of workload certificates (asked of the CA with --ca-address), at least "+fmtDuration(proxy.MinCertTTL)+":\nthey are renewed at half their lifetime, and peers whose clocks are ahead must still find them valid")
	fs.BoolVar(&o.InCluster, "kube", false, "read workloads, services and policies from the Kubernetes API with the in-cluster\nconfiguration (the pod's service account: list and watch pods, services, endpointslices\nand security.istio.io authorizationpolicies)")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "read workloads, services and policies from the Kubernetes API that kubeconfig `FILE` names")
	fs.StringVar(&o.WorkloadsFile, "workloads", "", "static workloads and services `FILE` (YAML, at most 16 MiB), instead of Kubernetes")
	fs.StringVar(&o.PoliciesFile, "policies", "", "AuthorizationPolicy `FILE` (YAML, several documents, at most 16 MiB), with --workloads;\nnone: allow all")
	fs.StringVar(&o.RootNamespace, "root-namespace", policy.DefaultRootNamespace, "the mesh root `NAMESPACE` (a Kubernetes namespace name): its policies without selector are global")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", ":15020", "Prometheus metrics listen `ADDR` (GET /metrics); equal to --ready-addr: one listener serves both")
	fs.StringVar(&o.ReadyAddr, "ready-addr", ":15021", "readiness listen `ADDR` (GET /healthz/ready: 200 after the agent's first snapshot, else 503)")
	logFormat := fs.String("log-format", "text", "log `FORMAT`: text or json")
	fs.DurationVar(&o.Config.ShutdownDeadline, "shutdown-deadline", 10*time.Second, "how long to drain connections on shutdown (positive)")
	workers := fs.Int("workers", 0, "`N` threads running proxy code at once (GOMAXPROCS); 0: a container CPU limit if there is one\n"+
		"(or $GOMAXPROCS), else a quarter of the CPUs the process may use, at least 1: "+fmt.Sprint(defaultWorkers())+" here.\n"+
		"Each extra worker costs thread wake-ups per packet: give the proxy what its node can spare,\n"+
		"as ztunnel's worker threads. At most "+fmt.Sprint(maxWorkers())+" here (4 × the CPUs the process may run on,\n"+
		"and never less than "+fmt.Sprint(minMaxWorkers)+")")
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
	local := o.CACertFile != "" || o.CAKeyFile != ""
	switch {
	case o.CAAddress != "" && local:
		return fail("--ca-address and --ca-cert/--ca-key are alternatives: give one (a CA service, or a CA key here for tests and demos)")
	case o.CAAddress == "" && !local:
		return fail("a CA is required: --ca-address HOST:PORT, or --ca-cert and --ca-key (see --help)")
	case local && (o.CACertFile == "" || o.CAKeyFile == ""):
		return fail("--ca-cert and --ca-key go together: give both")
	}
	var remoteOnly []string
	fs.Visit(func(f *flag.Flag) {
		if strings.HasPrefix(f.Name, "ca-") && f.Name != "ca-address" && f.Name != "ca-cert" && f.Name != "ca-key" {
			remoteOnly = append(remoteOnly, "--"+f.Name)
		}
	})
	if local && len(remoteOnly) > 0 {
		verb := "goes"
		if len(remoteOnly) > 1 {
			verb = "go"
		}
		return fail("%s %s with --ca-address, not with --ca-cert and --ca-key", strings.Join(remoteOnly, ", "), verb)
	}
	if o.CAAddress != "" {
		for _, f := range []struct{ flag, value, hint string }{
			{"--ca-token-file", o.CATokenFile, "the token file (default " + defaultCATokenFile + ")"},
			{"--ca-root-file", o.CARootFile, "the CA's root certificates file (default " + defaultCARootFile + ")"},
			{"--ca-cluster-id", o.CAClusterID, "the CA's cluster ID (istiod's default is " + identity.DefaultClusterID + ")"},
		} {
			if f.value == "" {
				return fail("%s: \"\" is empty; give %s", f.flag, f.hint)
			}
		}
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
	if *workers == 0 {
		*workers = defaultWorkers()
	}
	if *workers != runtime.GOMAXPROCS(0) { // else Go keeps following a changed CPU limit
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

// Where ztunnel finds its CA token and roots: the istio-token projected volume, and the
// istio-ca-root-cert ConfigMap (nftmesh's deployment mounts its CA's root there).
const (
	defaultCATokenFile = "/var/run/secrets/tokens/istio-token"
	defaultCARootFile  = "/var/run/secrets/istio/root-cert.pem"
)

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// defaultWorkers is --workers 0: a CPU limit (Go's default GOMAXPROCS follows a
// container's CPU quota) or $GOMAXPROCS when there is one, since someone chose it;
// otherwise a quarter of the CPUs, at least one, which is ztunnel's default
// (DEFAULT_WORKER_THREAD_CPU_FRACTION; ztunnel floors it at 2). A node proxy shares the
// node with its workloads, and on this project's 2-CPU benchmark machine one worker beat
// two on every node-proxy figure: a second thread is woken for work the first would have
// done, and waking a thread is a proxy's dearest operation on a virtual machine
// (BENCHMARKS.md, "Against a real peer").
func defaultWorkers() int {
	procs, cpus := runtime.GOMAXPROCS(0), runtime.NumCPU()
	if os.Getenv("GOMAXPROCS") != "" || procs < cpus {
		return procs
	}
	return max(1, (cpus+3)/4)
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
