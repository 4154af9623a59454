package identity

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// fakeCA is an IstioCertificateService over TLS on 127.0.0.1, signing with a test root
// (as istiod does: the SAN is the impersonated identity, NotBefore back-dated, the answer
// leaf then root). It records what it was sent.
type fakeCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	t       *testing.T
	root    testCA
	rootKey crypto.Signer
	serving tls.Certificate
	addr    string

	mu       sync.Mutex
	srv      *grpc.Server
	requests []caRequest
	// What to get wrong, for the tests of the client's checks.
	san      string           // the leaf's URI SAN instead of the impersonated identity
	signer   *testCA          // sign with another root, and send that root
	newKey   bool             // certify another key than the CSR's
	inter    *tls.Certificate // sign with this intermediate (of root), sent between leaf and root
	gate     chan struct{}
	refuse   bool      // answer PermissionDenied
	notAfter time.Time // if set, every leaf ends then (a CA cutting at its own expiry)
}

type caRequest struct {
	at           time.Time
	auth         []string
	clusterID    []string
	impersonated string
	validity     int64
	csr          *x509.CertificateRequest
}

func newFakeCA(t *testing.T) *fakeCA {
	t.Helper()
	root := newTestCA(t, "cluster.local", time.Hour)
	key, err := ParsePrivateKey(root.keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	serving := root.sign(t, &x509.Certificate{
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:    []string{"ca.test"},
	})
	ca := &fakeCA{t: t, root: root, rootKey: key, serving: *serving}
	ca.start()
	t.Cleanup(ca.stop)
	return ca
}

// start serves, on the same address as before if there was one.
func (ca *fakeCA) start() {
	addr := ca.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var l net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if l, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		ca.t.Fatal(err)
	}
	ca.addr = l.Addr().String()
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{ca.serving}})))
	pb.RegisterIstioCertificateServiceServer(srv, ca)
	ca.mu.Lock()
	ca.srv = srv
	ca.mu.Unlock()
	go srv.Serve(l)
}

func (ca *fakeCA) stop() {
	ca.mu.Lock()
	srv := ca.srv
	ca.srv = nil
	ca.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

func (ca *fakeCA) rootFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(path, ca.root.certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func (ca *fakeCA) seen() []caRequest {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	return append([]caRequest(nil), ca.requests...)
}

func (ca *fakeCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	rec := caRequest{at: time.Now(), auth: md.Get("authorization"), clusterID: md.Get("clusterid"), validity: req.GetValidityDuration()}
	if f := req.GetMetadata().GetFields()["ImpersonatedIdentity"]; f != nil {
		rec.impersonated = f.GetStringValue()
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, status.Error(codes.InvalidArgument, "no PEM CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		return nil, status.Errorf(codes.InvalidArgument, "bad CSR: %v", err)
	}
	rec.csr = csr
	ca.mu.Lock()
	ca.requests = append(ca.requests, rec)
	gate, san, signer, newKey, inter, refuse, notAfter := ca.gate, ca.san, ca.signer, ca.newKey, ca.inter, ca.refuse, ca.notAfter
	ca.mu.Unlock()
	if gate != nil {
		<-gate
	}
	if refuse {
		return nil, status.Error(codes.PermissionDenied, "no-pod-on-node: test refusal")
	}
	if san == "" {
		san = rec.impersonated
	}
	u, err := url.Parse(san)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	issuer, issuerKey := ca.root, ca.rootKey
	var middle []string
	if inter != nil {
		issuer = testCA{cert: inter.Leaf, certPEM: ca.root.certPEM}
		issuerKey = inter.PrivateKey.(crypto.Signer)
		middle = []string{string(encodeCertificate(inter.Certificate[0]))}
	}
	if signer != nil {
		issuer = *signer
		if issuerKey, err = ParsePrivateKey(signer.keyPEM); err != nil {
			return nil, err
		}
	}
	pub := csr.PublicKey
	if newKey {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		pub = &k.PublicKey
	}
	serial, _ := randomSerial()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    now.Add(-2 * time.Minute), // as istiod
		// Rounded up to a second, which is all the encoding keeps.
		NotAfter:              now.Add(time.Duration(rec.validity) * time.Second).Truncate(time.Second).Add(time.Second),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{u},
	}
	if !notAfter.IsZero() {
		tmpl.NotAfter = notAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer.cert, pub, issuerKey)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	chain := append(append([]string{string(encodeCertificate(der))}, middle...), string(issuer.certPEM))
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

type remoteFixture struct {
	ca        *fakeCA
	tokenFile string
	opts      RemoteOptions
}

func newRemoteFixture(t *testing.T) *remoteFixture {
	t.Helper()
	ca := newFakeCA(t)
	token := filepath.Join(t.TempDir(), "istio-token")
	if err := os.WriteFile(token, []byte("token-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return &remoteFixture{ca: ca, tokenFile: token, opts: RemoteOptions{
		Address: ca.addr, RootFile: ca.rootFile(t), TokenFile: token,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}}
}

func (f *remoteFixture) issuer(t *testing.T) *RemoteIssuer {
	t.Helper()
	r, err := NewRemoteIssuer(f.opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}

var (
	idA = ForServiceAccount("cluster.local", "demo", "a")
	idB = ForServiceAccount("cluster.local", "demo", "b")
)

// TestRemoteRequest: what the CA is sent (ztunnel's request: docs/ca.md) and that its
// answer is what the issuer hands out.
func TestRemoteRequest(t *testing.T) {
	f := newRemoteFixture(t)
	f.opts.Address = "https://" + f.ca.addr // istiod's CA_ADDRESS form
	f.opts.ClusterID = "cluster-7"
	f.opts.Validity = time.Hour
	r := f.issuer(t)
	cert, err := r.Certificate(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	reqs := f.ca.seen()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	req := reqs[0]
	if fmt.Sprint(req.auth) != "[Bearer token-1]" {
		t.Errorf("authorization %q, want [Bearer token-1]", req.auth)
	}
	if fmt.Sprint(req.clusterID) != "[cluster-7]" {
		t.Errorf("clusterid %q, want [cluster-7]", req.clusterID)
	}
	if req.impersonated != idA.String() {
		t.Errorf("ImpersonatedIdentity %q, want %s", req.impersonated, idA)
	}
	if req.validity != 3600 {
		t.Errorf("validity_duration %d, want 3600", req.validity)
	}
	csr := req.csr
	if k, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("CSR key %T, want ECDSA P-256", csr.PublicKey)
	}
	if csr.SignatureAlgorithm != x509.ECDSAWithSHA256 {
		t.Errorf("CSR signature %v, want ECDSA-SHA256", csr.SignatureAlgorithm)
	}
	if len(csr.URIs) != 1 || csr.URIs[0].String() != idA.String() || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 {
		t.Errorf("CSR SANs %v %v %v %v, want the one URI %s", csr.URIs, csr.DNSNames, csr.IPAddresses, csr.EmailAddresses, idA)
	}
	if len(csr.Subject.Names) != 0 {
		t.Errorf("CSR subject %q, want empty", csr.Subject)
	}
	// The answer is what is used: its leaf, with the key the CSR named.
	if !publicKeysEqual(cert.Leaf.PublicKey, csr.PublicKey) || !publicKeysEqual(cert.PrivateKey.(crypto.Signer).Public(), csr.PublicKey) {
		t.Error("the certificate's key is not the CSR's")
	}
	if got, _ := FromCertificate(cert.Leaf); got != idA {
		t.Errorf("certificate for %v, want %s", got, idA)
	}
	if len(cert.Certificate) != 1 || string(cert.Certificate[0]) != string(cert.Leaf.Raw) {
		t.Errorf("chain of %d, want the leaf alone (the root is every peer's)", len(cert.Certificate))
	}
	if !r.Roots().Equal(f.ca.pool()) {
		t.Error("Roots is not the root file's")
	}
	// Cached: no second request.
	if again, err := r.Certificate(context.Background(), idA); err != nil || again != cert {
		t.Errorf("second Certificate: %v, a new certificate %v", err, again != cert)
	}
	// The token file is read again for each request (the kubelet rotates it).
	if err := os.WriteFile(f.tokenFile, []byte("token-2"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Certificate(context.Background(), idB); err != nil {
		t.Fatal(err)
	}
	if reqs := f.ca.seen(); len(reqs) != 2 || fmt.Sprint(reqs[1].auth) != "[Bearer token-2]" {
		t.Errorf("after the token changed: %d requests, last authorization %q; want Bearer token-2", len(reqs), reqs[len(reqs)-1].auth)
	}
	if n := r.Fetches(); n != 2 {
		t.Errorf("Fetches() = %d, want 2", n)
	}
	// An empty token is an error naming the file, and nothing is sent.
	os.WriteFile(f.tokenFile, nil, 0o600)
	idC := ForServiceAccount("cluster.local", "demo", "c")
	if _, err := r.Certificate(context.Background(), idC); err == nil || !strings.Contains(err.Error(), f.tokenFile+" is empty") {
		t.Errorf("empty token file: %v, want an error naming it", err)
	}
	if n := len(f.ca.seen()); n != 2 {
		t.Errorf("%d requests after the empty token, want 2", n)
	}
	// Another trust domain is refused here.
	if _, err := r.Certificate(context.Background(), ForServiceAccount("other.td", "demo", "a")); err == nil || !strings.Contains(err.Error(), "not in trust domain cluster.local") {
		t.Errorf("foreign trust domain: %v", err)
	}
}

func (ca *fakeCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.root.cert)
	return p
}

// TestRemoteRejectsBadAnswers: a leaf for another identity, chaining to another root or
// certifying another key is refused, and the error says why.
func TestRemoteRejectsBadAnswers(t *testing.T) {
	other := newTestCA(t, "cluster.local", time.Hour)
	for _, c := range []struct {
		name  string
		setup func(*fakeCA)
		want  string
	}{
		{"another identity", func(ca *fakeCA) { ca.san = idB.String() },
			"the CA returned a certificate for " + idB.String() + ", asked for " + idA.String()},
		{"another root", func(ca *fakeCA) { ca.signer = &other }, "does not verify to the roots of"},
		{"another key", func(ca *fakeCA) { ca.newKey = true }, "another public key"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newRemoteFixture(t)
			c.setup(f.ca)
			r := f.issuer(t)
			cert, err := r.Certificate(context.Background(), idA)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Certificate: %v (a certificate: %v); want an error with %q", err, cert != nil, c.want)
			}
		})
	}
}

// TestRemoteVerifiesCA: a CA whose TLS certificate does not chain to the root file is not
// asked.
func TestRemoteVerifiesCA(t *testing.T) {
	f := newRemoteFixture(t)
	other := newTestCA(t, "cluster.local", time.Hour)
	f.opts.RootFile = filepath.Join(t.TempDir(), "other-root.pem")
	os.WriteFile(f.opts.RootFile, other.certPEM, 0o644)
	f.opts.Timeout = time.Second
	r := f.issuer(t)
	_, err := r.Certificate(context.Background(), idA)
	if err == nil || !strings.Contains(err.Error(), "the CA's TLS certificate") {
		t.Errorf("Certificate from a CA with an unknown root: %v", err)
	}
	if n := len(f.ca.seen()); n != 0 {
		t.Errorf("the CA got %d requests", n)
	}
}

// TestRemoteOptions: bad options fail at start, naming what is wrong.
func TestRemoteOptions(t *testing.T) {
	f := newRemoteFixture(t)
	empty := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(empty, nil, 0o600)
	absent := filepath.Join(t.TempDir(), "absent")
	for _, c := range []struct {
		edit func(*RemoteOptions)
		want string
	}{
		{func(o *RemoteOptions) { o.Address = "http://" + f.ca.addr }, "the scheme must be https:// or none"},
		{func(o *RemoteOptions) { o.Address = "127.0.0.1" }, "is not host:port"},
		{func(o *RemoteOptions) { o.Address = "" }, "is not host:port"},
		{func(o *RemoteOptions) { o.TokenFile = empty }, empty + " is empty"},
		{func(o *RemoteOptions) { o.TokenFile = absent }, "open " + absent},
		{func(o *RemoteOptions) { o.RootFile = absent }, "open " + absent},
		{func(o *RemoteOptions) { o.RootFile = empty }, "CA roots " + empty + ": no PEM CERTIFICATE"},
		{func(o *RemoteOptions) { o.TrustDomain = "A" }, "invalid trust domain"},
		{func(o *RemoteOptions) { o.Validity = time.Millisecond }, "under a second"},
	} {
		o := f.opts
		c.edit(&o)
		if r, err := NewRemoteIssuer(o); err == nil || !strings.Contains(err.Error(), c.want) {
			if err == nil {
				r.Close()
			}
			t.Errorf("%+v: %v, want an error with %q", o, err, c.want)
		}
	}
	for _, a := range []string{"https://" + f.ca.addr + "/", f.ca.addr, "localhost:15012"} {
		o := f.opts
		o.Address = a
		r, err := NewRemoteIssuer(o)
		if err != nil {
			t.Errorf("address %q: %v", a, err)
			continue
		}
		if a == "localhost:15012" && r.serverName != "localhost" {
			t.Errorf("server name %q, want the address's host", r.serverName)
		}
		r.Close()
	}
}

// TestRemoteConcurrentShareFetch: callers that ask for one identity at once share one
// request.
func TestRemoteConcurrentShareFetch(t *testing.T) {
	f := newRemoteFixture(t)
	gate := make(chan struct{})
	f.ca.gate = gate
	r := f.issuer(t)
	const n = 20
	certs := make(chan *tls.Certificate, n)
	errs := make(chan error, n)
	for range n {
		go func() {
			c, err := r.Certificate(context.Background(), idA)
			certs <- c
			errs <- err
		}()
	}
	waitFor(t, "the CA to get the request", 5*time.Second, func() bool { return len(f.ca.seen()) > 0 })
	time.Sleep(100 * time.Millisecond) // the other callers arrive meanwhile
	close(gate)
	var first *tls.Certificate
	for range n {
		c := <-certs
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		if first == nil {
			first = c
		} else if c != first {
			t.Error("callers got different certificates")
		}
	}
	if got, fetched := len(f.ca.seen()), r.Fetches(); got != 1 || fetched != 1 {
		t.Errorf("%d requests reached the CA, %d fetches; want 1", got, fetched)
	}
}

// TestRemoteHoldPrefetches: Hold fetches at once, and Certificate then takes that one;
// holds are counted, and the last Release drops the certificate.
func TestRemoteHoldPrefetches(t *testing.T) {
	f := newRemoteFixture(t)
	r := f.issuer(t)
	r.Hold(idA)
	r.Hold(idA) // a second pod of the identity: no second request
	waitFor(t, "the prefetch", 5*time.Second, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.entries[idA] != nil && r.entries[idA].cert != nil
	})
	if _, err := r.Certificate(context.Background(), idA); err != nil {
		t.Fatal(err)
	}
	if n := r.Fetches(); n != 1 {
		t.Errorf("%d fetches after Hold and Certificate, want 1", n)
	}
	r.Release(idA) // one pod left: kept
	if _, err := r.Certificate(context.Background(), idA); err != nil || r.Fetches() != 1 {
		t.Errorf("after one of two releases: %v, %d fetches; want the cached certificate", err, r.Fetches())
	}
	r.Release(idA) // the last: dropped
	if _, err := r.Certificate(context.Background(), idA); err != nil || r.Fetches() != 2 {
		t.Errorf("after the last release: %v, %d fetches; want a new request", err, r.Fetches())
	}
}

// TestRemoteRenewsAtHalfLife: a held identity's certificate is replaced once half its
// lifetime has passed, not before, and before it expires; until then the old one is
// served.
func TestRemoteRenewsAtHalfLife(t *testing.T) {
	t.Parallel()
	f := newRemoteFixture(t)
	f.opts.Validity = 3 * time.Second
	r := f.issuer(t)
	r.Hold(idA)
	first, err := r.Certificate(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	got := time.Now()
	half := got.Add(first.Leaf.NotAfter.Sub(got) / 2)
	waitFor(t, "a renewal", 10*time.Second, func() bool { return len(f.ca.seen()) >= 2 })
	reqs := f.ca.seen()
	if at := reqs[1].at; at.Before(half.Add(-100*time.Millisecond)) || !at.Before(first.Leaf.NotAfter) {
		t.Errorf("renewed %v after the first certificate arrived; half its lifetime was %v, expiry %v",
			at.Sub(got), half.Sub(got), first.Leaf.NotAfter.Sub(got))
	}
	waitFor(t, "the renewed certificate", 5*time.Second, func() bool {
		c, err := r.Certificate(context.Background(), idA)
		return err == nil && c != first
	})
	if !time.Now().Before(first.Leaf.NotAfter) {
		t.Error("the renewed certificate came after the first expired")
	}
	if r.Fetches() != int64(len(f.ca.seen())) {
		t.Errorf("%d fetches, %d requests", r.Fetches(), len(f.ca.seen()))
	}
}

// TestRemoteRenewalOutlivesCADown: while the CA is down past half the certificate's
// lifetime, renewals fail and are retried, the old certificate is still served, and once
// the CA is back (on the same address) the renewal succeeds before the old one expires.
func TestRemoteRenewalOutlivesCADown(t *testing.T) {
	t.Parallel()
	f := newRemoteFixture(t)
	f.opts.Validity = 6 * time.Second
	f.opts.Timeout = time.Second // each attempt: the retries' backoff then runs
	var failures, successes int
	var mu sync.Mutex
	f.opts.OnFetch = func(id ID, err error) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			failures++
		} else {
			successes++
		}
	}
	r := f.issuer(t)
	r.Hold(idA)
	first, err := r.Certificate(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	got := time.Now()
	half := got.Add(first.Leaf.NotAfter.Sub(got) / 2)
	f.ca.stop()
	time.Sleep(time.Until(half.Add(700 * time.Millisecond)))
	if r.Fetches() < 2 {
		t.Errorf("no renewal attempt %v past half the lifetime", time.Since(half))
	}
	c, err := r.Certificate(context.Background(), idA)
	if err != nil || c != first {
		t.Fatalf("with the CA down: %v; want the first certificate, still valid", err)
	}
	f.ca.start()
	waitFor(t, "the renewal", time.Until(first.Leaf.NotAfter), func() bool {
		c, err := r.Certificate(context.Background(), idA)
		return err == nil && c != first
	})
	// OnFetch runs just after the new certificate is published: wait for it too.
	waitFor(t, "the renewal's OnFetch", 2*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return successes >= 2
	})
	mu.Lock()
	defer mu.Unlock()
	if failures == 0 || successes != 2 {
		t.Errorf("%d failed and %d good fetches; want some failed, then 2 good", failures, successes)
	}
}

// TestRemoteReleaseStopsRenewal: once its last holder releases an identity, its
// certificate is no longer renewed.
func TestRemoteReleaseStopsRenewal(t *testing.T) {
	t.Parallel()
	f := newRemoteFixture(t)
	f.opts.Validity = time.Second // 1-2 s: renewed every 0.5-1 s
	r := f.issuer(t)
	r.Hold(idA)
	waitFor(t, "two renewals", 10*time.Second, func() bool { return r.Fetches() >= 3 })
	r.Release(idA)
	time.Sleep(100 * time.Millisecond)
	n := r.Fetches()
	time.Sleep(2500 * time.Millisecond)
	if m := r.Fetches(); m != n {
		t.Errorf("%d fetches after the release, then %d", n, m)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.entries[idA]; e != nil {
		t.Errorf("the released identity is still cached: %+v", e)
	}
}

// TestRemoteCloseStops: Close ends renewals and later calls fail.
func TestRemoteCloseStops(t *testing.T) {
	f := newRemoteFixture(t)
	r := f.issuer(t)
	r.Hold(idA)
	waitFor(t, "the prefetch", 5*time.Second, func() bool { return len(f.ca.seen()) == 1 })
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Certificate(context.Background(), idA); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Certificate after Close: %v", err)
	}
	r.Release(idA) // after Close: no effect, no panic
}

// TestRemoteRootsReload: a changed root file replaces Roots; one that no longer loads
// keeps them.
func TestRemoteRootsReload(t *testing.T) {
	f := newRemoteFixture(t)
	r := f.issuer(t)
	before := r.Roots()
	other := newTestCA(t, "cluster.local", time.Hour)
	os.WriteFile(f.opts.RootFile, append(append([]byte{}, f.ca.root.certPEM...), other.certPEM...), 0o644)
	if changed, err := r.loadRoots(); err != nil || !changed {
		t.Fatalf("reload: %v, %v", changed, err)
	}
	want := f.ca.pool()
	want.AddCert(other.cert)
	if !r.Roots().Equal(want) || r.Roots().Equal(before) {
		t.Error("Roots did not follow the file")
	}
	os.WriteFile(f.opts.RootFile, []byte("garbage"), 0o644)
	if _, err := r.loadRoots(); err == nil {
		t.Error("a root file without certificates loaded")
	}
	if !r.Roots().Equal(want) {
		t.Error("a bad root file replaced the roots")
	}
	if changed, err := r.loadRoots(); changed || err == nil {
		t.Errorf("unchanged bad file: %v, %v", changed, err)
	}
}

// TestRemoteHandshake: certificates from the CA service make an HBONE handshake, with the
// CA signing through an intermediate (as istiod with a plugged-in CA answers: leaf,
// intermediate, root): the intermediate is served, the root is not.
func TestRemoteHandshake(t *testing.T) {
	f := newRemoteFixture(t)
	f.ca.inter = f.ca.root.sign(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "intermediate"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageCertSign,
	})
	r := f.issuer(t)
	cert, err := r.Certificate(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.Certificate) != 2 || !bytes.Equal(cert.Certificate[1], f.ca.inter.Certificate[0]) {
		t.Errorf("chain of %d, want leaf and intermediate", len(cert.Certificate))
	}
	res := handshake(t, ClientTLSConfig(r, idB, []ID{idA}), ServerTLSConfig(r, idA))
	if res.clientErr != nil || res.serverErr != nil {
		t.Fatalf("handshake: client %v, server %v", res.clientErr, res.serverErr)
	}
	if got, _ := PeerID(res.server); got != idB {
		t.Errorf("the server saw %v, want %s", got, idB)
	}
	if got, _ := PeerID(res.client); got != idA {
		t.Errorf("the client saw %v, want %s", got, idA)
	}
}

// TestRemoteUnheld: an identity nobody holds is fetched on demand and not renewed in the
// background; a caller past half its lifetime gets the cached certificate at once and
// starts the fetch of the next.
func TestRemoteUnheld(t *testing.T) {
	t.Parallel()
	f := newRemoteFixture(t)
	f.opts.Validity = 2 * time.Second
	r := f.issuer(t)
	first, err := r.Certificate(context.Background(), idA)
	if err != nil {
		t.Fatal(err)
	}
	got := time.Now()
	time.Sleep(time.Until(got.Add(first.Leaf.NotAfter.Sub(got)/2 + 100*time.Millisecond)))
	if n := r.Fetches(); n != 1 {
		t.Errorf("%d fetches past half the lifetime without a call, want 1 (no renewal loop)", n)
	}
	if c, err := r.Certificate(context.Background(), idA); err != nil || c != first {
		t.Errorf("past half its lifetime: %v, the cached certificate %v; want it at once", err, c == first)
	}
	waitFor(t, "the fetch in the background", 5*time.Second, func() bool {
		c, err := r.Certificate(context.Background(), idA)
		return err == nil && c != first
	})
	if n := r.Fetches(); n != 2 {
		t.Errorf("%d fetches, want 2", n)
	}
}

// A CA that refuses is asked again only after the backoff, however many handshakes of
// the pod want the certificate meanwhile; the refusal is what they get.
func TestRemoteRefusalBacksOff(t *testing.T) {
	t.Parallel()
	f := newRemoteFixture(t)
	f.ca.mu.Lock()
	f.ca.refuse = true
	f.ca.mu.Unlock()
	r := f.issuer(t)
	r.Hold(idA)
	deadline := time.Now().Add(time.Second)
	calls := 0
	for time.Now().Before(deadline) {
		_, err := r.Certificate(context.Background(), idA)
		if err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
			t.Fatalf("call %d: %v, want the CA's refusal", calls, err)
		}
		calls++
	}
	// 500 ms doubling: the hold's fetch and at most a few retries in a second.
	if n := r.Fetches(); n > 4 {
		t.Errorf("%d requests to the CA for %d calls in a second, want at most 4 (the backoff)", n, calls)
	}
	if calls < 100 {
		t.Errorf("only %d calls in a second: the refusal should be answered at once", calls)
	}
}

// A CA that cannot extend a certificate (it cuts them at its own expiry) is not asked at
// every half of an ever shorter life: the renewal waits until shortly before the end.
func TestRemoteUnextendedRenewal(t *testing.T) {
	t.Parallel()
	f := newRemoteFixture(t)
	end := time.Now().Add(8 * time.Second).Truncate(time.Second)
	f.ca.mu.Lock()
	f.ca.notAfter = end
	f.ca.mu.Unlock()
	r := f.issuer(t)
	r.clampMargin = 2 * time.Second
	r.Hold(idA)
	if _, err := r.Certificate(context.Background(), idA); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(end.Add(-500 * time.Millisecond)))
	// Halving: about 4 s, 6 s, 7 s, 7.5 s ... (5+ requests); with the margin: 4 s, 6 s.
	if n := r.Fetches(); n > 3 {
		t.Errorf("%d requests before the unextendable certificate ended, want at most 3", n)
	}
}

// An identity no pod holds, asked for once, is forgotten once its certificate has expired
// (when another identity is first asked for); a held one stays.
func TestRemoteForgetsUnheld(t *testing.T) {
	t.Parallel()
	f := newRemoteFixture(t)
	f.opts.Validity = time.Second
	r := f.issuer(t)
	r.Hold(idB)
	if _, err := r.Certificate(context.Background(), idA); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Certificate(context.Background(), idB); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond) // idA's certificate (up to 2 s, rounded up) has expired
	other := ForServiceAccount(idA.TrustDomain, "other", "sa")
	if _, err := r.Certificate(context.Background(), other); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	_, hasA := r.entries[idA]
	_, hasB := r.entries[idB]
	r.mu.Unlock()
	if hasA {
		t.Error("an unheld identity with an expired certificate is still kept")
	}
	if !hasB {
		t.Error("a held identity was forgotten")
	}
}
