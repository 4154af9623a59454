package ca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/nftmesh/nftmesh/ca"
	cakube "github.com/nftmesh/nftmesh/ca/kube"
	"github.com/nftmesh/nftmesh/internal/controlplane"
	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// BenchmarkCASign: certificates per second the CA signs, from the floor of any X.509
// signing to the whole path as deployed.
//
//   - floor-ecdsa-sign: SHA-256 of a leaf's TBSCertificate and one ECDSA P-256 signature
//     with the CA's key: what no X.509 signer can go under.
//   - sign: Signer.Sign of a CSR (PEM decode, parse, the CSR's self-signature verified,
//     x509.CreateCertificate, which verifies its own signature too, the leaf parsed back,
//     PEM).
//   - client-csr: what each request costs the proxy before it sends it (RemoteIssuer.fetch):
//     a fresh ECDSA P-256 key and a CSR for it.
//   - grpc: a grpc client (istio.io/api's IstioCertificateServiceClient) over TLS 1.3 on
//     loopback, one HTTP/2 connection, to Server.Serve with an Authenticator and Authorizer
//     that answer at once: the service's own cost (the client runs in the same process:
//     its CPU counts too). serial: one request at a time (ns/op is the latency);
//     parallel: 8 requests in flight per CPU.
//   - grpc-kube: the same with ca/kube's Authenticator (a TokenReview) and NodeAuthorizer
//     (a pod informer) against a real kube-apiserver and etcd on the same machine, the
//     client configured as serveCA's (cakube.RESTConfig: protobuf, at most 100 requests a
//     second, burst 200), a trusted proxy's pod-bound token asking for the identity of a
//     pod on its node: the whole path as deployed for one node proxy. The Authenticator
//     remembers a token's review for 10 s, so nearly every request is decided from the
//     caches.
//   - grpc-kube-review: the same with a new token for every request (a TokenReview each,
//     as when many nodes' proxies ask at once), the client's rate limit off: what a review
//     costs and how many the API server answers.
//   - grpc-kube-review-qps100/parallel: a new token each, the client as deployed, its
//     burst spent before timing: the sustained rate of new tokens.
//
// The kube legs are skipped when the control plane is not built (scripts/setup). Each
// request asks for the same identity with the same CSR (the service keeps no state per
// request). certs/s is b.N over the elapsed time; self-cpu-us/cert is this process's CPU
// (client and service) per certificate, apiserver-cpu-us/cert kube-apiserver's.
func BenchmarkCASign(b *testing.B) {
	signer, keyPEM := benchSigner(b)
	caKey := parseKey(b, keyPEM)
	app := identity.ForServiceAccount(identity.DefaultTrustDomain, "default", "app")
	csrPEM := clientCSR(b, app)
	chain, err := signer.Sign(csrPEM, app, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	leaf := parseLeaf(b, chain[0])

	b.Run("floor-ecdsa-sign", func(b *testing.B) {
		tbs := leaf.RawTBSCertificate
		for range b.N {
			digest := sha256.Sum256(tbs)
			if _, err := caKey.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
		}
		reportCerts(b)
		b.ReportMetric(float64(len(tbs)), "tbs-bytes")
	})
	b.Run("sign", func(b *testing.B) {
		for range b.N {
			if _, err := signer.Sign(csrPEM, app, 24*time.Hour); err != nil {
				b.Fatal(err)
			}
		}
		reportCerts(b)
	})
	b.Run("client-csr", func(b *testing.B) {
		for range b.N {
			clientCSR(b, app)
		}
		reportCerts(b)
	})

	b.Run("grpc", func(b *testing.B) {
		benchGRPC(b, signer, csrPEM, 8, true, func(*testing.B) grpcEnv {
			return grpcEnv{authn: instantAuthn{}, authz: instantAuthz{}, token: func() string { return "proxy-token" }, id: app}
		})
	})

	var kube *kubeEnv // started once, for the kube legs
	kubeEnvFor := func(review, deployed bool) func(*testing.B) grpcEnv {
		return func(b *testing.B) grpcEnv {
			if kube == nil {
				kube = startKube(b)
			}
			e := grpcEnv{authn: kube.authnUnlimited, authz: kube.authz, id: kube.id, apiserver: kube.apiserver,
				token: func() string { return kube.token }}
			if review {
				e.token = kube.freshToken
			}
			if deployed {
				e.authn = kube.authnDeployed
			}
			if review && deployed {
				kube.drainBurst(b)
			}
			return e
		}
	}
	b.Run("grpc-kube", func(b *testing.B) { benchGRPC(b, signer, csrPEM, 8, true, kubeEnvFor(false, true)) })
	b.Run("grpc-kube-review", func(b *testing.B) { benchGRPC(b, signer, csrPEM, 8, true, kubeEnvFor(true, false)) })
	b.Run("grpc-kube-review-qps100", func(b *testing.B) { benchGRPC(b, signer, csrPEM, 8, false, kubeEnvFor(true, true)) })
	if kube != nil {
		if kube.next.Load() > int64(len(kube.fresh)) {
			b.Errorf("%d fresh tokens used, only %d minted: some were reviewed twice", kube.next.Load(), len(kube.fresh))
		}
		if err := kube.stop(); err != nil {
			b.Error(err)
		}
	}
}

// grpcEnv is what a Server is run with and what its client asks.
type grpcEnv struct {
	authn ca.Authenticator
	authz ca.Authorizer
	token func() string // the token of the next request
	id    identity.ID
	// apiserver is kube-apiserver's process ID, if there is one: its CPU time is reported.
	apiserver int
}

// benchGRPC runs the serial and parallel legs against a Server with the Authenticator
// and Authorizer env gives, asking for the identity env names with its token.
func benchGRPC(b *testing.B, signer *ca.Signer, csrPEM string, parallelism int, serial bool, env func(*testing.B) grpcEnv) {
	if serial {
		b.Run("serial", func(b *testing.B) {
			call, pid := startServer(b, signer, csrPEM, env)
			cpu := startCPU(pid)
			b.ResetTimer()
			for range b.N {
				if err := call(); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			reportCerts(b)
			cpu.report(b)
		})
	}
	b.Run("parallel", func(b *testing.B) {
		call, pid := startServer(b, signer, csrPEM, env)
		b.SetParallelism(parallelism)
		cpu := startCPU(pid)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := call(); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.StopTimer()
		reportCerts(b)
		cpu.report(b)
	})
}

// startServer serves a Server on 127.0.0.1 until b ends and returns a function that asks
// it for a certificate over TLS (one connection), after one request to warm it up, and
// kube-apiserver's process ID, if any.
func startServer(b *testing.B, signer *ca.Signer, csrPEM string, env func(*testing.B) grpcEnv) (call func() error, apiserver int) {
	b.Helper()
	e := env(b)
	id := e.id
	srv, err := ca.NewServer(ca.Options{
		Signer: signer, Authenticator: e.authn, Authorizer: e.authz,
		DNSNames: []string{"nftmesh-ca.test"}, Registerer: prometheus.NewRegistry(),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	b.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			b.Error(err)
		}
	})
	creds := credentials.NewTLS(&tls.Config{RootCAs: signer.Roots(), ServerName: "nftmesh-ca.test", MinVersion: tls.VersionTLS13})
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(creds))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	md, err := structpb.NewStruct(map[string]any{ca.ImpersonatedIdentity: id.String()})
	if err != nil {
		b.Fatal(err)
	}
	req := &pb.IstioCertificateRequest{Csr: csrPEM, ValidityDuration: 86400, Metadata: md}
	rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Minute)
	b.Cleanup(rcancel)
	client := pb.NewIstioCertificateServiceClient(conn)
	call = func() error {
		ctx := metadata.AppendToOutgoingContext(rctx, "authorization", "Bearer "+e.token(), "clusterid", "Kubernetes")
		_, err := client.CreateCertificate(ctx, req)
		return err
	}
	wctx := metadata.AppendToOutgoingContext(rctx, "authorization", "Bearer "+e.token(), "clusterid", "Kubernetes")
	resp, err := client.CreateCertificate(wctx, req)
	if err != nil {
		b.Fatal(err)
	}
	if got, err := identity.FromCertificate(parseLeaf(b, resp.CertChain[0])); err != nil || got != id {
		b.Fatalf("certificate for %v (%v), want %v", got, err, id)
	}
	return call, e.apiserver
}

// cpuMeter measures the CPU time of this process (the client and the service) and of
// kube-apiserver, if pid is not 0, from startCPU to report.
type cpuMeter struct {
	pid             int
	self, apiserver time.Duration
}

func startCPU(pid int) *cpuMeter {
	return &cpuMeter{pid: pid, self: selfCPU(), apiserver: processCPU(pid)}
}

// report reports each CPU time per certificate, in µs.
func (m *cpuMeter) report(b *testing.B) {
	b.ReportMetric(float64((selfCPU()-m.self).Microseconds())/float64(b.N), "self-cpu-us/cert")
	if m.pid != 0 {
		b.ReportMetric(float64((processCPU(m.pid)-m.apiserver).Microseconds())/float64(b.N), "apiserver-cpu-us/cert")
	}
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// processCPU is pid's user and system time (/proc/<pid>/stat, clock ticks of 10 ms);
// 0 for pid 0 or if it cannot be read.
func processCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The fields after the command, which is in parentheses: state is field 3,
	// utime field 14, stime field 15.
	_, rest, ok := strings.Cut(string(data), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

func reportCerts(b *testing.B) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}

// instantAuthn and instantAuthz answer at once: a trusted node proxy, allowed.
type instantAuthn struct{}

func (instantAuthn) Authenticate(context.Context, string) (ca.Caller, error) {
	return ca.Caller{Namespace: "nftmesh-system", ServiceAccount: "nftmesh-proxy",
		PodName: "nftmesh-proxy-x1", PodUID: "uid-1", NodeName: "node-a"}, nil
}

type instantAuthz struct{}

func (instantAuthz) Authorize(context.Context, ca.Caller, identity.ID) error { return nil }

// kubeEnv is a control plane with a trusted proxy's pod and an app's pod on node-a, the
// proxy's pod-bound token, and the real Authenticator and a started NodeAuthorizer.
// kubeEnv is a control plane with a trusted proxy's pod and an app's pod on node-a, the
// proxy's pod-bound token and a pool of fresh ones (each reviewed once), the real
// Authenticators and a started NodeAuthorizer. authnDeployed's client is configured as
// serveCA's (cakube.RESTConfig: at most 100 requests a second, burst 200);
// authnUnlimited's has no client-side limit.
type kubeEnv struct {
	token          string
	fresh          []string
	next           atomic.Int64
	id             identity.ID
	authnDeployed  ca.Authenticator
	authnUnlimited ca.Authenticator
	authz          *cakube.NodeAuthorizer
	apiserver      int // its process ID
	stop           func() error
}

// freshTokens is how many tokens startKube mints: more than the review legs use in one
// run of BenchmarkCASign at 1 s each.
const freshTokens = 6000

// freshToken returns a token no request has used (wrapping round if the pool runs out,
// which BenchmarkCASign reports).
func (k *kubeEnv) freshToken() string {
	return k.fresh[int(k.next.Add(1)-1)%len(k.fresh)]
}

// drainBurst spends the deployed client's burst (200 requests) on reviews of fresh
// tokens, so that what follows runs at its sustained rate.
func (k *kubeEnv) drainBurst(b *testing.B) {
	b.Helper()
	const burst, workers = 200, 16
	errs := make(chan error, workers)
	for range workers {
		go func() {
			var err error
			for range burst / workers {
				if _, err = k.authnDeployed.Authenticate(context.Background(), k.freshToken()); err != nil {
					break
				}
			}
			errs <- err
		}()
	}
	for range workers {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
}

func startKube(b *testing.B) *kubeEnv {
	b.Helper()
	bin, err := controlplane.Binaries()
	if err != nil {
		b.Skip(err)
	}
	dir, err := os.MkdirTemp("", "nftmesh-ca-bench-")
	if err != nil {
		b.Fatal(err)
	}
	began := time.Now()
	inner, err := controlplane.Start(bin, dir)
	if err != nil {
		os.RemoveAll(dir)
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	env := &kubeEnv{stop: func() error {
		cancel()
		err := inner.Stop()
		os.RemoveAll(dir)
		return err
	}}
	ok := false
	defer func() {
		if !ok {
			if err := env.stop(); err != nil {
				b.Error(err)
			}
		}
	}()
	b.Logf("control plane ready in %v", time.Since(began).Round(time.Millisecond))
	_, env.apiserver = inner.PIDs()
	cp := &kubetest.ControlPlane{ControlPlane: inner}
	ns := cp.Namespace(b, nil)
	for _, sa := range []string{"nftmesh-proxy", "app"} {
		if _, err := cp.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	proxy := cp.RunningPod(b, kubetest.PodSpec{Namespace: ns, Name: "nftmesh-proxy-a", NodeName: "node-a", ServiceAccountName: "nftmesh-proxy"})
	cp.RunningPod(b, kubetest.PodSpec{Namespace: ns, Name: "app-1", NodeName: "node-a", ServiceAccountName: "app"})
	mint := func() (string, error) {
		tr, err := cp.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "nftmesh-proxy", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
			Audiences:      []string{cakube.DefaultAudience},
			BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: proxy.Name, UID: proxy.UID},
		}}, metav1.CreateOptions{})
		if err != nil {
			return "", err
		}
		return tr.Status.Token, nil
	}
	if env.token, err = mint(); err != nil {
		b.Fatal(err)
	}
	began = time.Now()
	env.fresh = make([]string, freshTokens)
	const workers = 16
	errs := make(chan error, workers)
	for w := range workers {
		go func() {
			var err error
			for i := w; i < len(env.fresh) && err == nil; i += workers {
				env.fresh[i], err = mint()
			}
			errs <- err
		}()
	}
	for range workers {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("%d tokens minted in %v", len(env.fresh), time.Since(began).Round(time.Millisecond))
	env.id = identity.ForServiceAccount(identity.DefaultTrustDomain, ns, "app")

	// As serveCA builds them.
	restCfg, err := cakube.RESTConfig(inner.Kubeconfig)
	if err != nil {
		b.Fatal(err)
	}
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		b.Fatal(err)
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if env.authz, err = cakube.NewNodeAuthorizer(client, []string{ns + "/nftmesh-proxy"}, quiet); err != nil {
		b.Fatal(err)
	}
	if err := env.authz.Start(ctx); err != nil {
		b.Fatal(err)
	}
	env.authnDeployed = cakube.NewAuthenticator(client, nil)
	unlimitedCfg := rest.CopyConfig(restCfg)
	unlimitedCfg.QPS = -1 // no client-side rate limiter
	unlimited, err := kubernetes.NewForConfig(unlimitedCfg)
	if err != nil {
		b.Fatal(err)
	}
	env.authnUnlimited = cakube.NewAuthenticator(unlimited, nil)
	// Until the informer has both pods: a decision is then two cache lookups.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		caller, err := env.authnUnlimited.Authenticate(ctx, env.token)
		if err == nil {
			err = env.authz.Authorize(ctx, caller, env.id)
		}
		if err == nil && caller.NodeName == "node-a" {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the proxy's token is not allowed the app's identity: caller %v, %v", caller, err)
		}
	}
	// kube-apiserver goes on with its start-up work for a while after it is ready; wait
	// until it idles (under 50 ms of CPU in a second), for at most 60 s.
	settled := time.Now()
	var idle []string
	for time.Since(settled) < 60*time.Second {
		before := processCPU(env.apiserver)
		time.Sleep(time.Second)
		used := processCPU(env.apiserver) - before
		idle = append(idle, used.String())
		if used < 50*time.Millisecond {
			break
		}
	}
	b.Logf("kube-apiserver's CPU per second after the set-up: %v", idle)
	ok = true
	return env
}

// benchSigner is a Signer for a fresh root, as `nftmesh ca init` makes one; keyPEM is
// its key.
func benchSigner(b *testing.B) (*ca.Signer, []byte) {
	b.Helper()
	certPEM, keyPEM, err := identity.GenerateRoot(identity.DefaultTrustDomain, 365*24*time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	s, err := ca.NewSigner(certPEM, keyPEM)
	if err != nil {
		b.Fatal(err)
	}
	return s, keyPEM
}

func parseKey(b *testing.B, keyPEM []byte) crypto.Signer {
	b.Helper()
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		b.Fatal("no PEM key")
	}
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		return k.(crypto.Signer)
	}
	k, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		b.Fatal(err)
	}
	return k
}

// clientCSR is what RemoteIssuer.fetch sends: a fresh P-256 key and a CSR with an empty
// subject and id as its URI SAN, PEM.
func clientCSR(b *testing.B, id identity.ID) string {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		SignatureAlgorithm: x509.ECDSAWithSHA256,
		URIs:               []*url.URL{id.URL()},
	}, key)
	if err != nil {
		b.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func parseLeaf(b *testing.B, p string) *x509.Certificate {
	b.Helper()
	block, _ := pem.Decode([]byte(p))
	if block == nil {
		b.Fatal(errors.New("no PEM certificate"))
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		b.Fatal(err)
	}
	return c
}
