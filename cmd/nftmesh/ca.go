package main

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"

	"github.com/nftmesh/nftmesh/ca"
	cakube "github.com/nftmesh/nftmesh/ca/kube"
	"github.com/nftmesh/nftmesh/internal/opshttp"
	"github.com/nftmesh/nftmesh/proxy"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

const caUsage = `Usage: nftmesh ca <subcommand> [flags]

Manage the mesh certificate authority that signs workload identities (SPIFFE X.509
certificates, one per service account) for HBONE mutual TLS.

Subcommands:
  serve     run the CA service (istiod's IstioCertificateService, gRPC over TLS) that
            node proxies ask for their pods' certificates
  init      write a new self-signed root CA certificate and key, for demos and tests

Run 'nftmesh ca <subcommand> --help' for its flags.

Exit codes: 0 success (or --help); 2 bad flags, unknown subcommand, or failure.
`

func runCA(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, caUsage)
		return exitError
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, caUsage)
		return exitOK
	case "init":
		return runCAInit(args[1:], stdout, stderr)
	case "serve":
		return runCAServe(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "nftmesh ca: unknown subcommand %q (see --help)\n", args[0])
	return exitError
}

func runCAInit(args []string, stdout, stderr io.Writer) int {
	var (
		trustDomain, certFile, keyFile string
		ttl                            time.Duration
		force                          bool
	)
	fs := newFlagSet("ca init", "ca init [--trust-domain cluster.local] [--ttl 8760h] --cert ca.pem --key ca-key.pem [--force]",
		"Generate a new self-signed root CA for the mesh (ECDSA P-256, subject O=nftmesh,\n"+
			"CN=nftmesh root CA <trust domain>, URI SAN spiffe://<trust domain>) and write its\n"+
			"certificate (PEM, mode 0644) and private key (PKCS#8 PEM, mode 0600). The proxy signs\n"+
			"short-lived workload certificates with them. For demos and tests: a production mesh\n"+
			"brings its own CA. Existing files are left alone unless --force is given.",
		"0 written (or --help); 2 bad flags, a file exists without --force, or a write failure.", stdout)
	fs.StringVar(&trustDomain, "trust-domain", identity.DefaultTrustDomain, "the mesh's SPIFFE trust `DOMAIN`")
	fs.DurationVar(&ttl, "ttl", 365*24*time.Hour, "how long the root is valid (a Go `DURATION`: 8760h, 720h30m)")
	fs.StringVar(&certFile, "cert", "", "write the CA certificate to `FILE` (required)")
	fs.StringVar(&keyFile, "key", "", "write the CA private key to `FILE` (required)")
	fs.BoolVar(&force, "force", false, "overwrite existing files")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "nftmesh ca init: "+format+"\n", a...)
		return exitError
	}
	switch {
	case certFile == "" || keyFile == "":
		return fail("--cert and --key are required (see --help)")
	case filepath.Clean(certFile) == filepath.Clean(keyFile):
		return fail("--cert and --key are the same file, %s", certFile)
	case ttl <= 0:
		return fail("--ttl %v is not positive", ttl)
	}
	if !force {
		for _, f := range []string{certFile, keyFile} {
			if _, err := os.Lstat(f); err == nil {
				return fail("%s exists; not overwriting it without --force", f)
			} else if !errors.Is(err, os.ErrNotExist) {
				return fail("%v", err)
			}
		}
	}
	certPEM, keyPEM, err := identity.GenerateRoot(trustDomain, ttl)
	if err != nil {
		return fail("%v", err)
	}
	// The key first: a certificate without its key is of no use.
	if err := writeFileAtomic(keyFile, keyPEM, 0o600, force); err != nil {
		return fail("%v", err)
	}
	if err := writeFileAtomic(certFile, certPEM, 0o644, force); err != nil {
		if !force {
			os.Remove(keyFile) // written just now, by us
		}
		return fail("%v", err)
	}
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fail("%v", err)
	}
	sum := sha256.Sum256(cert.Raw)
	fmt.Fprintf(stdout, "wrote %s: root CA certificate %q, trust domain %s, valid until %s\n",
		certFile, cert.Subject.CommonName, trustDomain, cert.NotAfter.UTC().Format(time.RFC3339))
	fmt.Fprintf(stdout, "  SHA-256 fingerprint %s\n", colonHex(sum[:]))
	fmt.Fprintf(stdout, "wrote %s: its ECDSA P-256 private key (PKCS#8, mode 0600)\n", keyFile)
	return exitOK
}

// writeFileAtomic writes data to path with mode perm: through a temporary file renamed
// over path when overwrite is set (so that an existing file's mode does not carry over),
// else by creating path exclusively (so that a file appearing meanwhile is not clobbered).
func writeFileAtomic(path string, data []byte, perm os.FileMode, overwrite bool) error {
	if !overwrite {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
		if err != nil {
			if errors.Is(err, os.ErrExist) {
				return fmt.Errorf("%s exists; not overwriting it without --force", path)
			}
			return err
		}
		if _, err := f.Write(data); err != nil {
			f.Close()
			os.Remove(path)
			return err
		}
		if err := f.Close(); err != nil {
			os.Remove(path)
			return err
		}
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func colonHex(b []byte) string {
	var s strings.Builder
	for i, c := range b {
		if i > 0 {
			s.WriteByte(':')
		}
		fmt.Fprintf(&s, "%02X", c)
	}
	return s.String()
}

// Defaults of `ca serve`.
const (
	defaultCAListen      = ":15012" // istiod's
	defaultCADNSName     = "nftmesh-ca.nftmesh-system.svc"
	defaultCAMetricsAddr = ":15016" // not the agent's 15014 nor the proxy's 15020
)

// caServeConfig is `ca serve` after its flags are checked.
type caServeConfig struct {
	signer          *ca.Signer
	listen          string
	dnsNames        []string
	trustDomain     string
	trustedAccounts []string
	audiences       []string
	maxValidity     time.Duration
	kubeconfig      string
	metricsAddr     string
	rootOut         string
	rootConfigMap   string // namespace/name, or ""
}

func runCAServe(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("ca serve", "ca serve --ca-cert ca.pem --ca-key ca-key.pem --trusted-accounts NS/SA[,NS/SA...] [flags]",
		"Run the mesh CA service (a Deployment, never on every node: only it holds the signing key). It\n"+
			"answers istiod's IstioCertificateService (istio.v1.auth.IstioCertificateService/CreateCertificate,\n"+
			"gRPC over TLS 1.2 or later) as istiod does, so that nftmesh's proxy or ztunnel can ask it:\n"+
			"  - the caller is authenticated by its bearer token (\"authorization: Bearer <token>\"), with a\n"+
			"    Kubernetes TokenReview for --token-audience;\n"+
			"  - it gets a certificate for its own identity, spiffe://<trust domain>/ns/<ns>/sa/<sa>; or, as\n"+
			"    a node proxy in --trusted-accounts with a pod-bound token, for the identity in the request's\n"+
			"    ImpersonatedIdentity, if a pod that is not finished runs under that ServiceAccount on the\n"+
			"    caller's node (the node from its token, or else its pod);\n"+
			"  - the certificate has only that identity (URI SAN), whatever the CSR asks, and lives as long\n"+
			"    as asked (24h if not said) but at most --max-validity and never past the CA;\n"+
			"  - the answer is the leaf, the CA's certificates, and the root last: the proxies' trust bundle.\n"+
			"Every refusal is an error that says why (Unauthenticated, InvalidArgument, PermissionDenied),\n"+
			"logged and counted (nftmesh_ca_refusals_total{reason}).\n\n"+
			"The service's own TLS certificate, for the --dns-name names, is signed by the same CA at start\n"+
			"and made again at half its 24h lifetime; clients verify it with the root. --metrics-addr serves\n"+
			"GET /metrics, /healthz, and /readyz (200 once the pod cache has synced). The CA's ServiceAccount\n"+
			"needs create on tokenreviews and get, list and watch on pods in every namespace. The CA files\n"+
			"are read at start: restart the service to rotate them. SIGTERM and SIGINT stop it gracefully.",
		"0 after SIGTERM or SIGINT; 2 bad flags, a CA that does not load, or a failure to start or serve.", stdout)
	caCert := fs.String("ca-cert", "", "CA certificate `FILE` (PEM; from the CA Secret): the signing certificate first, then any\nintermediates, the root last (required)")
	caKey := fs.String("ca-key", "", "the signing certificate's private key `FILE` (PEM: PKCS#8, SEC 1 or PKCS#1) (required)")
	listen := fs.String("listen", defaultCAListen, "gRPC (TLS) listen `ADDR`")
	dnsNames := &listFlag{vals: []string{defaultCADNSName}}
	fs.Var(dnsNames, "dns-name", "`NAME` in the service's TLS certificate, the one clients dial (repeat the flag, or separate\nnames with commas; an IP address becomes an IP SAN)")
	trustDomain := fs.String("trust-domain", identity.DefaultTrustDomain, "the mesh's SPIFFE trust `DOMAIN`: every identity issued is in it")
	trusted := fs.String("trusted-accounts", "", "comma-separated node proxy ServiceAccounts, `NS/SA` (e.g. nftmesh-system/nftmesh-proxy), that\nmay ask for the identities of their node's pods, as istiod's CA_TRUSTED_NODE_ACCOUNTS (required)")
	audiences := fs.String("token-audience", "istio-ca", "comma-separated `AUDIENCES` a caller's token must be for (the TokenReview's)")
	maxValidity := fs.Duration("max-validity", ca.DefaultMaxValidity, "longest certificate lifetime (`DURATION`, at least "+fmtDuration(proxy.MinCertTTL)+"): a request asking more gets this")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig `FILE`; none: the in-cluster configuration (the pod's ServiceAccount)")
	metricsAddr := fs.String("metrics-addr", defaultCAMetricsAddr, "listen `ADDR` of /metrics, /healthz and /readyz; empty: none")
	rootOut := fs.String("root-out", "", "at start, write the root certificate (PEM, mode 0644) to `FILE`, replacing it")
	rootConfigMap := fs.String("root-configmap", "", "at start, publish the root certificate as key root-cert.pem of ConfigMap `NS/NAME` (the\nproxies mount it: their trust anchor, and what verifies this service); needs create, get and\nupdate on it")
	logFormat := fs.String("log-format", "text", "log `FORMAT`: text or json")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "nftmesh ca serve: "+format+"\n", a...)
		return exitError
	}
	log, err := newLogger(*logFormat, stderr)
	if err != nil {
		return fail("%v", err)
	}
	cfg := caServeConfig{listen: *listen, trustDomain: *trustDomain, maxValidity: *maxValidity,
		kubeconfig: *kubeconfig, metricsAddr: *metricsAddr, rootOut: *rootOut, rootConfigMap: *rootConfigMap}
	switch {
	case *caCert == "" || *caKey == "":
		return fail("--ca-cert and --ca-key are required (see --help)")
	case *trusted == "":
		return fail("--trusted-accounts is required: the node proxies' ServiceAccounts, NS/SA (e.g. nftmesh-system/nftmesh-proxy)")
	case cfg.rootConfigMap != "" && !validNamespacedName(cfg.rootConfigMap):
		return fail("--root-configmap: %q is not NS/NAME (e.g. nftmesh-system/nftmesh-ca-root)", cfg.rootConfigMap)
	case cfg.listen == "":
		return fail("--listen: \"\" is empty; give a listen address such as %s", defaultCAListen)
	case cfg.maxValidity <= 0:
		return fail("--max-validity: %s is not positive", cfg.maxValidity)
	case cfg.maxValidity < proxy.MinCertTTL:
		return fail("--max-validity: %s is shorter than %s (a proxy renews a certificate at half its lifetime)",
			cfg.maxValidity, fmtDuration(proxy.MinCertTTL))
	}
	if cfg.trustDomain == "" {
		return fail("--trust-domain: \"\" is empty; give the SPIFFE trust domain (Istio's is %s)", identity.DefaultTrustDomain)
	}
	if err := identity.CheckTrustDomain(cfg.trustDomain); err != nil {
		return fail("--trust-domain: %v", err)
	}
	if _, _, err := net.SplitHostPort(cfg.listen); err != nil {
		return fail("--listen: %q: %v", cfg.listen, err)
	}
	if cfg.metricsAddr != "" {
		if _, _, err := net.SplitHostPort(cfg.metricsAddr); err != nil {
			return fail("--metrics-addr: %q: %v", cfg.metricsAddr, err)
		}
	}
	for _, n := range dnsNames.vals {
		if net.ParseIP(n) != nil {
			continue
		}
		if errs := validation.IsDNS1123Subdomain(n); len(errs) > 0 {
			return fail("--dns-name: %q is not a DNS name: %s", n, strings.Join(errs, "; "))
		}
	}
	if len(dnsNames.vals) == 0 {
		return fail("--dns-name: none given; give the name clients dial (default %s)", defaultCADNSName)
	}
	cfg.dnsNames = dnsNames.vals
	for _, acct := range strings.Split(*trusted, ",") {
		acct = strings.TrimSpace(acct)
		ns, sa, ok := strings.Cut(acct, "/")
		switch {
		case acct == "":
			return fail("--trusted-accounts: %q has an empty element", *trusted)
		case !ok || strings.Contains(sa, "/"):
			return fail("--trusted-accounts: %q is not NS/SA (a namespace and a ServiceAccount name)", acct)
		case len(validation.IsDNS1123Label(ns)) > 0:
			return fail("--trusted-accounts: %q: %q is not a namespace name", acct, ns)
		case len(validation.IsDNS1123Subdomain(sa)) > 0:
			return fail("--trusted-accounts: %q: %q is not a ServiceAccount name", acct, sa)
		}
		cfg.trustedAccounts = append(cfg.trustedAccounts, ns+"/"+sa)
	}
	for _, a := range strings.Split(*audiences, ",") {
		if a = strings.TrimSpace(a); a == "" {
			return fail("--token-audience: %q has an empty audience", *audiences)
		}
		cfg.audiences = append(cfg.audiences, a)
	}
	certPEM, err := os.ReadFile(*caCert)
	if err != nil {
		return fail("--ca-cert: %v", err)
	}
	keyPEM, err := os.ReadFile(*caKey)
	if err != nil {
		return fail("--ca-key: %v", err)
	}
	if cfg.signer, err = ca.NewSigner(certPEM, keyPEM); err != nil {
		return fail("--ca-cert %s, --ca-key %s: %v", *caCert, *caKey, err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := serveCA(ctx, cfg, log, nil); err != nil {
		log.Error("CA service failed", "error", err)
		return fail("%v", err)
	}
	log.Info("stopped")
	return exitOK
}

// serveCA runs the CA service with cfg until ctx ends. listening, if not nil, is called
// with the gRPC and metrics addresses once both listen (for tests).
func serveCA(ctx context.Context, cfg caServeConfig, log *slog.Logger, listening func(grpcAddr, metricsAddr string)) error {
	restCfg, err := cakube.RESTConfig(cfg.kubeconfig)
	if err != nil {
		return fmt.Errorf("--kubeconfig: %w", err)
	}
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	authz, err := cakube.NewNodeAuthorizer(client, cfg.trustedAccounts, log)
	if err != nil {
		return fmt.Errorf("--trusted-accounts: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := ca.NewServer(ca.Options{
		Signer: cfg.signer, Authenticator: cakube.NewAuthenticator(client, cfg.audiences), Authorizer: authz,
		TrustDomain: cfg.trustDomain, MaxValidity: cfg.maxValidity, DNSNames: cfg.dnsNames, Log: log, Registerer: reg,
	})
	if err != nil {
		return err
	}

	// Listen first, so that a bad or taken address fails at once; requests wait in the
	// backlog until the pod cache has synced.
	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	defer ln.Close()
	var ready atomic.Bool
	metricsAddr := ""
	if cfg.metricsAddr != "" {
		mln, err := net.Listen("tcp", cfg.metricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		metricsAddr = mln.Addr().String()
		hs := &http.Server{Handler: opshttp.Handler(reg, &ready, "starting: syncing the pod cache"), ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(mln)
		defer hs.Close()
	}
	if cfg.rootOut != "" {
		if err := writeFileAtomic(cfg.rootOut, cfg.signer.RootPEM(), 0o644, true); err != nil {
			return fmt.Errorf("--root-out: %w", err)
		}
		log.Info("root certificate written", "file", cfg.rootOut)
	}
	if cfg.rootConfigMap != "" {
		ns, name, _ := strings.Cut(cfg.rootConfigMap, "/")
		wrote, err := cakube.PublishRoot(ctx, client, ns, name, cfg.signer.RootPEM())
		if err != nil {
			return fmt.Errorf("--root-configmap: %w", err)
		}
		log.Info("root certificate published", "configmap", cfg.rootConfigMap, "changed", wrote)
	}
	if listening != nil {
		listening(ln.Addr().String(), metricsAddr)
	}
	if err := authz.Start(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	log.Info("serving", "listen", ln.Addr().String(), "dns_names", strings.Join(cfg.dnsNames, ","),
		"trust_domain", cfg.trustDomain, "trusted_accounts", strings.Join(cfg.trustedAccounts, ","),
		"token_audiences", strings.Join(cfg.audiences, ","), "max_validity", cfg.maxValidity.String(),
		"ca_not_after", cfg.signer.NotAfter().UTC().Format(time.RFC3339))
	ready.Store(true)
	return srv.Serve(ctx, ln)
}

// listFlag is a repeatable, comma-separated list flag; the first Set replaces the default.
type listFlag struct {
	vals []string
	set  bool
}

func (l *listFlag) String() string {
	if l == nil {
		return ""
	}
	return strings.Join(l.vals, ",")
}

func (l *listFlag) Set(s string) error {
	if !l.set {
		l.vals, l.set = nil, true
	}
	for v := range strings.SplitSeq(s, ",") {
		if v = strings.TrimSpace(v); v == "" {
			return fmt.Errorf("%q has an empty name", s)
		}
		l.vals = append(l.vals, v)
	}
	return nil
}

// validNamespacedName reports whether s is NS/NAME with both parts DNS names.
func validNamespacedName(s string) bool {
	ns, name, ok := strings.Cut(s, "/")
	return ok && len(validation.IsDNS1123Label(ns)) == 0 && len(validation.IsDNS1123Subdomain(name)) == 0
}
