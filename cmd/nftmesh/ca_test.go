package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nftmesh/nftmesh/ca"
	"github.com/nftmesh/nftmesh/internal/controlplane"
	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

func TestCAHelp(t *testing.T) {
	out, errOut, code := runCLI("ca", "--help")
	if code != exitOK || errOut != "" {
		t.Fatalf("ca --help: exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{"Usage: nftmesh ca <subcommand>", "init", "Exit codes: 0", "2 bad flags"} {
		if !strings.Contains(out, want) {
			t.Errorf("ca --help lacks %q:\n%s", want, out)
		}
	}
	out, errOut, code = runCLI("ca", "init", "--help")
	if code != exitOK || errOut != "" {
		t.Fatalf("ca init --help: exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{
		"Usage: nftmesh ca init", "--trust-domain DOMAIN", `(default "cluster.local")`, "--ttl DURATION",
		`(default "8760h0m0s")`, "--cert FILE", "--key FILE", "--force", "0600", "Exit codes: 0 written", "2 bad flags",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("ca init --help lacks %q:\n%s", want, out)
		}
	}
	if out, _, _ := runCLI("--help"); !strings.Contains(out, "  ca ") {
		t.Errorf("nftmesh --help does not list ca:\n%s", out)
	}
}

func TestCAInit(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	out, errOut, code := runCLI("ca", "init", "--trust-domain", "example.org", "--ttl", "48h", "--cert", certFile, "--key", keyFile)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{"wrote " + certFile, "wrote " + keyFile, "trust domain example.org", "0600"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if st, err := os.Stat(keyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, mode %v; want 0600", err, st.Mode().Perm())
	}
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatal("certificate file is not PEM")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !cert.IsCA || cert.Subject.CommonName != "nftmesh root CA example.org" {
		t.Errorf("IsCA %v, CN %q", cert.IsCA, cert.Subject.CommonName)
	}
	if life := time.Until(cert.NotAfter); life < 47*time.Hour || life > 48*time.Hour {
		t.Errorf("valid for %v more, want --ttl 48h", life)
	}
	// The files make an issuer whose certificates verify to the root.
	iss, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{TrustDomain: "example.org"})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := iss.Certificate(context.Background(), identity.ForServiceAccount("example.org", "default", "sleep"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Leaf.Verify(x509.VerifyOptions{Roots: iss.Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Error(err)
	}
}

func TestCAInitDefaults(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if _, errOut, code := runCLI("ca", "init", "--cert", certFile, "--key", keyFile); code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	certPEM, _ := os.ReadFile(certFile)
	keyPEM, _ := os.ReadFile(keyFile)
	if _, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != "spiffe://cluster.local" {
		t.Errorf("URIs %v, want spiffe://cluster.local", cert.URIs)
	}
	if life := time.Until(cert.NotAfter); life < 8759*time.Hour || life > 8760*time.Hour {
		t.Errorf("valid for %v more, want the default 8760h", life)
	}
}

func TestCAInitRefusesToOverwrite(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	for _, existing := range []string{certFile, keyFile} {
		os.Remove(certFile)
		os.Remove(keyFile)
		if err := os.WriteFile(existing, []byte("precious"), 0o644); err != nil {
			t.Fatal(err)
		}
		out, errOut, code := runCLI("ca", "init", "--cert", certFile, "--key", keyFile)
		if code != exitError {
			t.Errorf("%s exists: exit %d, want 2", existing, code)
		}
		if !strings.Contains(errOut, existing) || !strings.Contains(errOut, "--force") {
			t.Errorf("%s exists: stderr %q does not name it and --force", existing, errOut)
		}
		if out != "" {
			t.Errorf("stdout %q", out)
		}
		if b, _ := os.ReadFile(existing); string(b) != "precious" {
			t.Errorf("%s overwritten", existing)
		}
		// Nothing else written either.
		entries, _ := os.ReadDir(dir)
		if len(entries) != 1 {
			t.Errorf("%d files in the directory, want the existing one only", len(entries))
		}
	}
}

func TestCAInitForce(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	for _, f := range []string{certFile, keyFile} {
		if err := os.WriteFile(f, []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, errOut, code := runCLI("ca", "init", "--cert", certFile, "--key", keyFile, "--force"); code != exitOK {
		t.Fatalf("--force: exit %d: %s", code, errOut)
	}
	if st, err := os.Stat(keyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("key file overwritten over a 0644 one: %v, mode %v; want 0600", err, st.Mode().Perm())
	}
	certPEM, _ := os.ReadFile(certFile)
	keyPEM, _ := os.ReadFile(keyFile)
	if _, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{}); err != nil {
		t.Errorf("overwritten files: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Errorf("%d files in the directory, want 2 (temporary files left?)", len(entries))
	}
}

func TestCAInitBadUsage(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	for _, tc := range []struct {
		args []string
		why  string
	}{
		{[]string{"ca"}, "Usage: nftmesh ca"},
		{[]string{"ca", "bogus"}, `unknown subcommand "bogus"`},
		{[]string{"ca", "init"}, "--cert and --key are required"},
		{[]string{"ca", "init", "--cert", certFile}, "--cert and --key are required"},
		{[]string{"ca", "init", "--key", keyFile}, "--cert and --key are required"},
		{[]string{"ca", "init", "--cert", certFile, "--key", certFile}, "same file"},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--trust-domain", "Evil.Local"}, `"Evil.Local"`},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--trust-domain", ""}, "trust domain is empty"},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--ttl", "0s"}, "--ttl 0s is not positive"},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--ttl", "a year"}, `invalid value "a year" for flag -ttl`},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "extra"}, `unexpected argument "extra"`},
		{[]string{"ca", "init", "--cert", filepath.Join(dir, "no", "such", "dir", "ca.pem"), "--key", keyFile}, "no such file"},
	} {
		out, errOut, code := runCLI(tc.args...)
		if code != exitError {
			t.Errorf("%q: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(errOut, tc.why) {
			t.Errorf("%q: stderr %q lacks %q", tc.args, errOut, tc.why)
		}
		if out != "" {
			t.Errorf("%q: stdout %q", tc.args, out)
		}
	}
	// No failure left a file behind (the missing directory one had written the key first).
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("failures left %d files behind", len(entries))
	}
}

func TestCAServeHelp(t *testing.T) {
	out, errOut, code := runCLI("ca", "serve", "--help")
	if code != exitOK || errOut != "" {
		t.Fatalf("ca serve --help: exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{
		"Usage: nftmesh ca serve",
		"--ca-cert FILE", "--ca-key FILE", "(required)",
		"--listen ADDR", `(default ":15012")`,
		"--dns-name NAME", `(default "nftmesh-ca.nftmesh-system.svc")`,
		"--trust-domain DOMAIN", `(default "cluster.local")`,
		"--trusted-accounts NS/SA", "nftmesh-system/nftmesh-proxy",
		"--token-audience AUDIENCES", `(default "istio-ca")`,
		"--max-validity DURATION", `(default "24h0m0s")`,
		"--kubeconfig FILE", "in-cluster",
		"--metrics-addr ADDR", `(default ":15016")`, "/readyz",
		"--root-out FILE",
		"--root-configmap NS/NAME", "root-cert.pem",
		"--log-format FORMAT", `(default "text")`,
		"ImpersonatedIdentity", "TokenReview", "root last", "tokenreviews", "SIGTERM",
		"Exit codes: 0 after SIGTERM or SIGINT", "2 bad flags",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("ca serve --help lacks %q:\n%s", want, out)
		}
	}
	// Every flag is listed.
	n := strings.Count(out, "\n  --")
	if n != 13 {
		t.Errorf("ca serve --help lists %d flags, want 13:\n%s", n, out)
	}
	if out, _, _ := runCLI("ca", "--help"); !strings.Contains(out, "  serve ") {
		t.Errorf("ca --help does not list serve:\n%s", out)
	}
}

// writeCA writes a fresh root CA to dir and returns its files.
func writeCA(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	certPEM, keyPEM, err := identity.GenerateRoot("cluster.local", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestCAServeBadUsage(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := writeCA(t, dir)
	otherCert, _ := writeCA(t, t.TempDir())
	base := []string{"ca", "serve", "--ca-cert", certFile, "--ca-key", keyFile, "--trusted-accounts", "nftmesh-system/nftmesh-proxy",
		"--kubeconfig", filepath.Join(dir, "no-such-kubeconfig")}
	with := func(args ...string) []string { return append(slices.Clone(base), args...) }
	for _, tc := range []struct {
		args []string
		why  string
	}{
		{[]string{"ca", "serve"}, "--ca-cert and --ca-key are required"},
		{[]string{"ca", "serve", "--ca-cert", certFile, "--trusted-accounts", "a/b"}, "--ca-cert and --ca-key are required"},
		{[]string{"ca", "serve", "--ca-cert", certFile, "--ca-key", keyFile}, "--trusted-accounts is required"},
		{with("--trusted-accounts", "nftmesh-proxy"), `--trusted-accounts: "nftmesh-proxy" is not NS/SA`},
		{with("--trusted-accounts", "a/b/c"), `--trusted-accounts: "a/b/c" is not NS/SA`},
		{with("--trusted-accounts", "Bad_NS/proxy"), `--trusted-accounts: "Bad_NS/proxy": "Bad_NS" is not a namespace name`},
		{with("--trusted-accounts", "ns/"), `"" is not a ServiceAccount name`},
		{with("--trusted-accounts", "a/b,,c/d"), `--trusted-accounts: "a/b,,c/d" has an empty element`},
		{with("--trust-domain", "Evil.Local"), `--trust-domain: identity: invalid trust domain "Evil.Local"`},
		{with("--trust-domain", ""), `--trust-domain: "" is empty`},
		{with("--max-validity", "0s"), "--max-validity: 0s is not positive"},
		{with("--max-validity", "5m"), "--max-validity: 5m0s is shorter than 10m"},
		{with("--max-validity", "a day"), `invalid value "a day" for flag -max-validity`},
		{with("--listen", ""), `--listen: "" is empty`},
		{with("--listen", "15012"), `--listen: "15012"`},
		{with("--metrics-addr", "localhost"), `--metrics-addr: "localhost"`},
		{with("--dns-name", "Bad_Name"), `--dns-name: "Bad_Name" is not a DNS name`},
		{with("--dns-name", "a,,b"), `invalid value "a,,b" for flag -dns-name`},
		{with("--token-audience", ""), `--token-audience: "" has an empty audience`},
		{with("--log-format", "xml"), `--log-format: "xml"`},
		{with("--root-configmap", "nftmesh-ca-root"), `--root-configmap: "nftmesh-ca-root" is not NS/NAME`},
		{with("extra"), `unexpected argument "extra"`},
		{with("--ca-cert", filepath.Join(dir, "missing.pem")), "--ca-cert: open " + filepath.Join(dir, "missing.pem")},
		{with("--ca-key", filepath.Join(dir, "missing.pem")), "--ca-key: open " + filepath.Join(dir, "missing.pem")},
		{with("--ca-cert", otherCert), "--ca-cert " + otherCert + ", --ca-key " + keyFile + ": ca: CA key does not match"},
		{with("--ca-cert", keyFile), "no PEM CERTIFICATE block"},
		{base, "--kubeconfig: kubernetes: kubeconfig " + filepath.Join(dir, "no-such-kubeconfig")},
	} {
		out, errOut, code := runCLI(tc.args...)
		if code != exitError {
			t.Errorf("%q: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(errOut, tc.why) {
			t.Errorf("%q: stderr %q lacks %q", tc.args, errOut, tc.why)
		}
		if out != "" {
			t.Errorf("%q: stdout %q", tc.args, out)
		}
	}
}

func TestListFlag(t *testing.T) {
	l := &listFlag{vals: []string{"default.svc"}}
	if l.String() != "default.svc" {
		t.Errorf("default %q", l.String())
	}
	for _, s := range []string{"a.svc,b.svc", " c.svc "} {
		if err := l.Set(s); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(l.vals, []string{"a.svc", "b.svc", "c.svc"}) {
		t.Errorf("after a.svc,b.svc and c.svc: %q (the default must go)", l.vals)
	}
}

// TestCAServeKubernetes runs the service against a real API server (TokenReview, the pod
// cache) and asks it as a node proxy does, over TLS with the root it wrote.
func TestCAServeKubernetes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane")
	}
	if _, err := controlplane.Binaries(); err != nil {
		t.Skip(err)
	}
	cp := kubetest.Start(t)
	ns := cp.Namespace(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	for _, sa := range []string{"nftmesh-proxy", "sleep", "db"} {
		if _, err := cp.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	proxyPod := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "proxy-a", NodeName: "node-a", ServiceAccountName: "nftmesh-proxy"})
	cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "sleep-1", NodeName: "node-a", ServiceAccountName: "sleep"})
	cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "db-1", NodeName: "node-b", ServiceAccountName: "db"})
	tr, err := cp.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "nftmesh-proxy", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences:      []string{"istio-ca"},
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: proxyPod.Name, UID: proxyPod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	otherAudience, err := cp.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "nftmesh-proxy", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences:      []string{"something-else"},
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: proxyPod.Name, UID: proxyPod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	certFile, keyFile := writeCA(t, dir)
	certPEM, _ := os.ReadFile(certFile)
	keyPEM, _ := os.ReadFile(keyFile)
	signer, err := ca.NewSigner(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	rootOut := filepath.Join(dir, "out", "root-cert.pem")
	if err := os.Mkdir(filepath.Dir(rootOut), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := caServeConfig{signer: signer, listen: "127.0.0.1:0", dnsNames: []string{defaultCADNSName}, trustDomain: "cluster.local",
		trustedAccounts: []string{ns + "/nftmesh-proxy"}, audiences: []string{"istio-ca"}, maxValidity: time.Hour,
		kubeconfig: cp.Kubeconfig, metricsAddr: "127.0.0.1:0", rootOut: rootOut, rootConfigMap: ns + "/nftmesh-ca-root"}
	var logs syncWriter
	addrs := make(chan [2]string, 1)
	sctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- serveCA(sctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)), func(g, m string) { addrs <- [2]string{g, m} })
	}()
	var grpcAddr, metricsAddr string
	select {
	case a := <-addrs:
		grpcAddr, metricsAddr = a[0], a[1]
	case err := <-served:
		t.Fatalf("serveCA: %v", err)
	case <-ctx.Done():
		t.Fatal("serveCA did not listen")
	}
	defer func() {
		stop()
		if err := <-served; err != nil {
			t.Errorf("serveCA after its context ended: %v", err)
		}
	}()

	// The root written at start verifies the service.
	rootPEM, err := os.ReadFile(rootOut)
	if err != nil {
		t.Fatal(err)
	}
	if string(rootPEM) != string(certPEM) {
		t.Error("--root-out is not the root")
	}
	// And published where the proxies mount it from.
	cm, err := cp.Client.CoreV1().ConfigMaps(ns).Get(ctx, "nftmesh-ca-root", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("--root-configmap: %v", err)
	}
	if cm.Data["root-cert.pem"] != string(certPEM) {
		t.Errorf("--root-configmap holds %q, want the root", cm.Data["root-cert.pem"])
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM)
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: defaultCADNSName})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := pb.NewIstioCertificateServiceClient(conn)
	ask := func(token, id string) ([]string, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		if err != nil {
			t.Fatal(err)
		}
		md, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id})
		if err != nil {
			t.Fatal(err)
		}
		rctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		resp, err := client.CreateCertificate(rctx, &pb.IstioCertificateRequest{
			Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 86400, Metadata: md})
		if err != nil {
			return nil, err
		}
		return resp.CertChain, nil
	}

	sleepID := "spiffe://cluster.local/ns/" + ns + "/sa/sleep"
	chain, err := ask(tr.Status.Token, sleepID)
	if err != nil {
		t.Fatalf("impersonating %s, on the proxy's node: %v", sleepID, err)
	}
	if len(chain) != 2 || chain[1] != string(rootPEM) {
		t.Errorf("chain of %d elements; want the leaf and the root", len(chain))
	}
	block, _ := pem.Decode([]byte(chain[0]))
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != sleepID {
		t.Errorf("leaf URIs %v, want %s", leaf.URIs, sleepID)
	}
	if life := time.Until(leaf.NotAfter); life > time.Hour || life < 59*time.Minute {
		t.Errorf("leaf valid for %v; want --max-validity 1h (asked 24h)", life)
	}

	dbID := "spiffe://cluster.local/ns/" + ns + "/sa/db"
	_, err = ask(tr.Status.Token, dbID)
	if st := status.Convert(err); st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), "no-pod-on-node") || !strings.Contains(st.Message(), "node-a") {
		t.Errorf("impersonating %s, on another node: %v; want PermissionDenied, no-pod-on-node on node-a", dbID, err)
	}
	_, err = ask(otherAudience.Status.Token, sleepID)
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("a token for another audience: %v; want Unauthenticated", err)
	}
	_, err = ask("not-a-token", sleepID)
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("a bogus token: %v; want Unauthenticated", err)
	}

	get := func(path string) string {
		resp, err := http.Get("http://" + metricsAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %s", path, resp.Status)
		}
		return string(b)
	}
	get("/readyz")
	m := get("/metrics")
	for _, want := range []string{"nftmesh_ca_certificates_issued_total 1", `nftmesh_ca_refusals_total{reason="no-pod-on-node"} 1`,
		`nftmesh_ca_refusals_total{reason="unauthenticated"} 2`, "nftmesh_ca_sign_duration_seconds_count 1"} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if l := logs.String(); !strings.Contains(l, "certificate issued") || !strings.Contains(l, "certificate request refused") {
		t.Errorf("logs:\n%s", l)
	}
}

type syncWriter struct {
	mu sync.Mutex
	b  strings.Builder
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}
