package ca

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

// The callers the fake authenticator knows, by token.
var (
	proxyCaller = Caller{Namespace: "nftmesh-system", ServiceAccount: "nftmesh-proxy", PodName: "nftmesh-proxy-x1", PodUID: "uid-1", NodeName: "node-a"}
	appCaller   = Caller{Namespace: "default", ServiceAccount: "sleep", PodName: "sleep-1"}
)

type fakeAuthn struct{ block chan struct{} }

func (f fakeAuthn) Authenticate(ctx context.Context, token string) (Caller, error) {
	switch token {
	case "proxy-token":
		return proxyCaller, nil
	case "app-token":
		return appCaller, nil
	case "api-down":
		return Caller{}, errors.New("kubernetes: token review: connection refused")
	case "slow":
		select {
		case <-ctx.Done():
			return Caller{}, ctx.Err()
		case <-f.block:
			return Caller{}, errors.New("unblocked")
		}
	}
	return Caller{}, Refuse("unauthenticated", errors.New("token review: the token has expired"))
}

// fakeAuthz allows a caller its own identity, and the proxy the identities in pods; it
// records what it was asked.
type fakeAuthz struct {
	mu    sync.Mutex
	pods  map[identity.ID]bool
	asked []string
}

func (f *fakeAuthz) askedSoFar() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.asked...)
}

func (f *fakeAuthz) Authorize(_ context.Context, caller Caller, id identity.ID) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked = append(f.asked, caller.Namespace+"/"+caller.ServiceAccount+" "+id.String())
	switch {
	case id.Namespace == caller.Namespace && id.ServiceAccount == caller.ServiceAccount:
		return nil
	case id.Namespace == "broken":
		return errors.New("pod cache not started")
	case caller != proxyCaller:
		return Refuse("untrusted-caller", fmt.Errorf("%s is not a trusted node proxy", caller.Namespace+"/"+caller.ServiceAccount))
	case !f.pods[id]:
		return Refuse("no-pod-on-node", fmt.Errorf("no pod of %s/%s on node %s", id.Namespace, id.ServiceAccount, caller.NodeName))
	}
	return nil
}

type testServer struct {
	signer *Signer
	reg    *prometheus.Registry
	authz  *fakeAuthz
	client pb.IstioCertificateServiceClient
	addr   string
	logs   *syncBuffer
	stop   func() error // cancels Serve and returns its error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServer serves a Server with the fakes on 127.0.0.1 and returns a client that
// connects over TLS, verifying the serving certificate with the CA's root and the name
// nftmesh-ca.test.
func startServer(t *testing.T, edit func(*Options)) *testServer {
	t.Helper()
	ts := &testServer{signer: rootSigner(t), reg: prometheus.NewRegistry(), logs: &syncBuffer{},
		authz: &fakeAuthz{pods: map[identity.ID]bool{testID: true}}}
	o := Options{
		Signer: ts.signer, Authenticator: fakeAuthn{}, Authorizer: ts.authz,
		DNSNames: []string{"nftmesh-ca.test"}, Registerer: ts.reg,
		Log: slog.New(slog.NewTextHandler(ts.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if edit != nil {
		edit(&o)
	}
	srv, err := NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	var once sync.Once
	var serveErr error
	ts.stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case serveErr = <-served:
			case <-time.After(30 * time.Second):
				serveErr = errors.New("Serve did not return 30 s after its context ended")
			}
		})
		return serveErr
	}
	t.Cleanup(func() {
		if err := ts.stop(); err != nil {
			t.Error(err)
		}
	})
	creds := credentials.NewTLS(&tls.Config{RootCAs: ts.signer.Roots(), ServerName: "nftmesh-ca.test", MinVersion: tls.VersionTLS13})
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ts.client = pb.NewIstioCertificateServiceClient(conn)
	ts.addr = ln.Addr().String()
	return ts
}

// request asks for a certificate with token (none if empty) and, unless nil, the
// metadata.
func (ts *testServer) request(t *testing.T, token string, md map[string]any, validity int64) (*x509.Certificate, []string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	req := &pb.IstioCertificateRequest{Csr: newCSR(t, ecKey(t), "spiffe://cluster.local/ns/evil/sa/evil"), ValidityDuration: validity}
	if md != nil {
		s, err := structpb.NewStruct(md)
		if err != nil {
			t.Fatal(err)
		}
		req.Metadata = s
	}
	resp, err := ts.client.CreateCertificate(ctx, req)
	if err != nil {
		return nil, nil, err
	}
	return parseChain(t, resp.CertChain)[0], resp.CertChain, nil
}

// counter returns the value of a counter of the registry with the given label (none if
// label is empty).
func (ts *testServer) counter(t *testing.T, name, label, value string) float64 {
	t.Helper()
	mfs, err := ts.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := label == ""
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					match = true
				}
			}
			if match {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func impersonate(id string) map[string]any { return map[string]any{ImpersonatedIdentity: id} }

func wantStatus(t *testing.T, what string, err error, code codes.Code, substrings ...string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: a certificate; want %v", what, code)
		return
	}
	st := status.Convert(err)
	if st.Code() != code {
		t.Errorf("%s: %v (%s); want %v", what, st.Code(), st.Message(), code)
	}
	for _, s := range substrings {
		if !strings.Contains(st.Message(), s) {
			t.Errorf("%s: message %q lacks %q", what, st.Message(), s)
		}
	}
}

func TestServerImpersonation(t *testing.T) {
	ts := startServer(t, nil)
	leaf, chain, err := ts.request(t, "proxy-token", impersonate(testID.String()), 0)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := identity.FromCertificate(leaf); err != nil || got != testID {
		t.Errorf("leaf identity %v (%v), want %v", got, err, testID)
	}
	if len(chain) != 2 || chain[1] != string(ts.signer.RootPEM()) {
		t.Errorf("chain of %d; want the leaf and the root last", len(chain))
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ts.signer.Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Error(err)
	}
	if got, want := ts.authz.askedSoFar(), []string{"nftmesh-system/nftmesh-proxy " + testID.String()}; len(got) != 1 || got[0] != want[0] {
		t.Errorf("authorizer asked %q, want %q", got, want)
	}
	if n := ts.counter(t, "nftmesh_ca_certificates_issued_total", "", ""); n != 1 {
		t.Errorf("issued_total %v, want 1", n)
	}
	if logs := ts.logs.String(); !strings.Contains(logs, "certificate issued") || !strings.Contains(logs, testID.String()) || !strings.Contains(logs, "not_after=") {
		t.Errorf("no issue logged:\n%s", logs)
	}
	if err := ts.stop(); err != nil {
		t.Errorf("Serve after its context ended: %v, want nil", err)
	}
}

func TestServerOwnIdentity(t *testing.T) {
	ts := startServer(t, nil)
	for _, md := range []map[string]any{nil, impersonate("")} {
		leaf, _, err := ts.request(t, "app-token", md, 0)
		if err != nil {
			t.Fatalf("metadata %v: %v", md, err)
		}
		want := identity.ForServiceAccount("cluster.local", "default", "sleep")
		if got, err := identity.FromCertificate(leaf); err != nil || got != want {
			t.Errorf("metadata %v: leaf identity %v (%v), want the caller's own %v", md, got, err, want)
		}
	}
}

func TestServerTrustDomain(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.TrustDomain = "example.org" })
	leaf, _, err := ts.request(t, "app-token", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if leaf.URIs[0].String() != "spiffe://example.org/ns/default/sa/sleep" {
		t.Errorf("own identity %v, want it in the server's trust domain", leaf.URIs)
	}
	_, _, err = ts.request(t, "proxy-token", impersonate(testID.String()), 0)
	wantStatus(t, "cluster.local ID on an example.org server", err, codes.InvalidArgument, testID.String(), "not in trust domain example.org")
}

func TestServerRefusals(t *testing.T) {
	ts := startServer(t, nil)
	other := identity.ForServiceAccount("cluster.local", "prod", "db")
	for _, tc := range []struct {
		name, token string
		md          map[string]any
		code        codes.Code
		reason      string
		substrings  []string
	}{
		{"no token", "", nil, codes.Unauthenticated, ReasonNoToken, []string{"no bearer token"}},
		{"refused token", "stolen", impersonate(testID.String()), codes.Unauthenticated, "unauthenticated", []string{"authentication failed", "token has expired"}},
		{"token review failed", "api-down", nil, codes.Unavailable, ReasonAuthenticatorError, []string{"cannot authenticate", "connection refused"}},
		{"untrusted caller", "app-token", impersonate(other.String()), codes.PermissionDenied, "untrusted-caller",
			[]string{"default/sleep", other.String(), "untrusted-caller", "not a trusted node proxy"}},
		{"no pod on the node", "proxy-token", impersonate(other.String()), codes.PermissionDenied, "no-pod-on-node",
			[]string{"nftmesh-system/nftmesh-proxy", "node-a", other.String(), "no pod of prod/db on node node-a"}},
		{"authorizer failed", "proxy-token", impersonate("spiffe://cluster.local/ns/broken/sa/x"), codes.Unavailable, ReasonAuthorizerError,
			[]string{"pod cache not started"}},
		{"foreign trust domain", "proxy-token", impersonate("spiffe://evil.org/ns/default/sa/sleep"), codes.InvalidArgument, ReasonOtherDomain,
			[]string{`"spiffe://evil.org/ns/default/sa/sleep"`, "trust domain cluster.local"}},
		{"malformed identity", "proxy-token", impersonate("spiffe://cluster.local/default/sleep"), codes.InvalidArgument, ReasonBadIdentity,
			[]string{`"spiffe://cluster.local/default/sleep"`, ImpersonatedIdentity}},
		{"not a SPIFFE ID", "proxy-token", impersonate("default/sleep"), codes.InvalidArgument, ReasonBadIdentity, []string{`"default/sleep"`}},
		{"identity not a string", "proxy-token", impersonate2(42), codes.InvalidArgument, ReasonBadIdentity, []string{"not a string"}},
		{"CertSigner", "proxy-token", map[string]any{"CertSigner": "other"}, codes.InvalidArgument, ReasonBadRequest, []string{"CertSigner"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := ts.counter(t, "nftmesh_ca_refusals_total", "reason", tc.reason)
			_, _, err := ts.request(t, tc.token, tc.md, 0)
			wantStatus(t, tc.name, err, tc.code, tc.substrings...)
			if n := ts.counter(t, "nftmesh_ca_refusals_total", "reason", tc.reason) - before; n != 1 {
				t.Errorf("refusals_total{reason=%q} grew by %v, want 1", tc.reason, n)
			}
			if logs := ts.logs.String(); !strings.Contains(logs, "reason="+tc.reason) {
				t.Errorf("refusal not logged with reason=%s:\n%s", tc.reason, logs)
			}
		})
	}
	if n := ts.counter(t, "nftmesh_ca_certificates_issued_total", "", ""); n != 0 {
		t.Errorf("issued_total %v after refusals only", n)
	}
	logs := ts.logs.String()
	for _, want := range []string{"level=WARN", `caller="nftmesh-system/nftmesh-proxy (pod nftmesh-proxy-x1) on node node-a"`, "identity=spiffe://cluster.local/ns/prod/sa/db"} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q:\n%s", want, logs)
		}
	}
}

func impersonate2(v any) map[string]any { return map[string]any{ImpersonatedIdentity: v} }

func TestServerBadAuthorizationHeader(t *testing.T) {
	ts := startServer(t, nil)
	for _, h := range []string{"Basic cHJveHk=", "Bearer", "Bearer ", "proxy-token", "Bearer a b"} {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", h)
		_, err := ts.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: newCSR(t, ecKey(t), "")})
		wantStatus(t, fmt.Sprintf("authorization %q", h), err, codes.Unauthenticated, "no bearer token")
	}
	// The scheme is case-insensitive (RFC 9110).
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "bearer app-token")
	if _, err := ts.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: newCSR(t, ecKey(t), "")}); err != nil {
		t.Errorf("bearer in lower case: %v", err)
	}
}

func TestServerBadCSR(t *testing.T) {
	ts := startServer(t, nil)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer app-token")
	_, err := ts.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: "not a CSR"})
	wantStatus(t, "bad CSR", err, codes.InvalidArgument, "not PEM", "spiffe://cluster.local/ns/default/sa/sleep")
	if n := ts.counter(t, "nftmesh_ca_refusals_total", "reason", ReasonBadCSR); n != 1 {
		t.Errorf("refusals_total{reason=bad-csr} %v, want 1", n)
	}
}

func TestServerValidity(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.MaxValidity = 2 * time.Hour })
	for _, tc := range []struct {
		seconds int64
		want    time.Duration
	}{
		{0, 2 * time.Hour},          // the default, 24h, capped
		{-5, 2 * time.Hour},         // likewise
		{1800, 30 * time.Minute},    // as asked
		{90 * 86400, 2 * time.Hour}, // capped, not refused
		{1<<63 - 1, 2 * time.Hour},  // no overflow
	} {
		start := time.Now()
		leaf, _, err := ts.request(t, "app-token", nil, tc.seconds)
		if err != nil {
			t.Fatalf("%d s: %v", tc.seconds, err)
		}
		if got := leaf.NotAfter.Sub(start); got < tc.want-2*time.Second || got > tc.want+2*time.Second {
			t.Errorf("%d s: valid for %v, want %v", tc.seconds, got, tc.want)
		}
		if got := start.Sub(leaf.NotBefore); got < Backdate-2*time.Second || got > Backdate+2*time.Second {
			t.Errorf("%d s: NotBefore %v before the request, want %v", tc.seconds, got, Backdate)
		}
	}
	// The default maximum and default validity: 24h.
	srv, err := NewServer(Options{Signer: ts.signer, Authenticator: fakeAuthn{}, Authorizer: ts.authz})
	if err != nil {
		t.Fatal(err)
	}
	for seconds, want := range map[int64]time.Duration{0: 24 * time.Hour, 3600: time.Hour, 86400: 24 * time.Hour, 86401: 24 * time.Hour, 90 * 86400: 24 * time.Hour} {
		if got := srv.Validity(seconds); got != want {
			t.Errorf("default options: Validity(%d) = %v, want %v", seconds, got, want)
		}
	}
}

func TestServerOversizeRequest(t *testing.T) {
	ts := startServer(t, nil)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer app-token")
	_, err := ts.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: strings.Repeat("A", MaxRequestBytes)})
	wantStatus(t, "oversize request", err, codes.ResourceExhausted)
	// gRPC answers before it reports the end of the call to the stats handler: wait.
	for deadline := time.Now().Add(5 * time.Second); ts.counter(t, "nftmesh_ca_refusals_total", "reason", ReasonTooLarge) == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if n := ts.counter(t, "nftmesh_ca_refusals_total", "reason", ReasonTooLarge); n != 1 {
		t.Errorf("refusals_total{reason=too-large} %v, want 1", n)
	}
	if logs := ts.logs.String(); !strings.Contains(logs, "reason="+ReasonTooLarge) {
		t.Errorf("oversize request not logged:\n%s", logs)
	}
	if len(ts.authz.askedSoFar()) != 0 {
		t.Error("the authorizer was asked about an oversize request")
	}
	// A request just under the limit reaches the handler (and is refused there).
	_, err = ts.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: strings.Repeat("A", MaxRequestBytes-100)})
	wantStatus(t, "large CSR", err, codes.InvalidArgument, "larger than")
}

func TestServerRequestTimeout(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	ts := startServer(t, func(o *Options) {
		o.Authenticator = fakeAuthn{block: block}
		o.RequestTimeout = 200 * time.Millisecond
	})
	start := time.Now()
	_, _, err := ts.request(t, "slow", nil, 0)
	wantStatus(t, "slow authentication", err, codes.DeadlineExceeded, "did not finish in 200ms")
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v", d)
	}
	if n := ts.counter(t, "nftmesh_ca_refusals_total", "reason", ReasonTimeout); n != 1 {
		t.Errorf("refusals_total{reason=timeout} %v, want 1", n)
	}
}

func TestServerTLS(t *testing.T) {
	ts := startServer(t, nil)
	call := func(creds credentials.TransportCredentials) error {
		conn, err := grpc.NewClient(ts.addr, grpc.WithTransportCredentials(creds))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer app-token"), 10*time.Second)
		defer cancel()
		_, err = pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: newCSR(t, ecKey(t), "")})
		return err
	}
	// TLS 1.2 is enough (ztunnel may be configured for it).
	if err := call(credentials.NewTLS(&tls.Config{RootCAs: ts.signer.Roots(), ServerName: "nftmesh-ca.test", MaxVersion: tls.VersionTLS12})); err != nil {
		t.Errorf("TLS 1.2: %v", err)
	}
	// Plaintext is not served.
	if err := call(insecure.NewCredentials()); status.Code(err) != codes.Unavailable {
		t.Errorf("plaintext: %v, want Unavailable", err)
	}
	// Nor TLS 1.1.
	if err := call(credentials.NewTLS(&tls.Config{RootCAs: ts.signer.Roots(), ServerName: "nftmesh-ca.test", MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11})); err == nil {
		t.Error("TLS 1.1 served")
	}
	// The serving certificate names nftmesh-ca.test only.
	if err := call(credentials.NewTLS(&tls.Config{RootCAs: ts.signer.Roots(), ServerName: "other.test"})); err == nil || !strings.Contains(err.Error(), "other.test") {
		t.Errorf("another name: %v", err)
	}
	// Nor does it verify with another root.
	if err := call(credentials.NewTLS(&tls.Config{RootCAs: rootSigner(t).Roots(), ServerName: "nftmesh-ca.test"})); err == nil {
		t.Error("verified with another root")
	}
}

func TestServerSignSeconds(t *testing.T) {
	ts := startServer(t, nil)
	if _, _, err := ts.request(t, "app-token", nil, 0); err != nil {
		t.Fatal(err)
	}
	mfs, _ := ts.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "nftmesh_ca_sign_duration_seconds" {
			if n := mf.GetMetric()[0].GetHistogram().GetSampleCount(); n != 1 {
				t.Errorf("sign_duration_seconds count %d, want 1", n)
			}
			return
		}
	}
	t.Error("no nftmesh_ca_sign_duration_seconds")
}

func TestServingCertRenewal(t *testing.T) {
	now := time.Now()
	s := rootSigner(t)
	s.now = func() time.Time { return now }
	c := &servingCert{signer: s, names: []string{"a.test"}, ttl: 2 * time.Hour, log: slog.New(slog.DiscardHandler)}
	first, err := c.get(nil)
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(59 * time.Minute)
	if again, _ := c.get(nil); again != first {
		t.Error("renewed before half its lifetime")
	}
	now = now.Add(2 * time.Minute)
	renewed, err := c.get(nil)
	if err != nil {
		t.Fatal(err)
	}
	if renewed == first || !renewed.Leaf.NotAfter.After(first.Leaf.NotAfter) {
		t.Error("not renewed past half its lifetime")
	}
}

func TestNewServerOptions(t *testing.T) {
	s := rootSigner(t)
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{Authenticator: fakeAuthn{}, Authorizer: &fakeAuthz{}}, "no Signer"},
		{Options{Signer: s, Authorizer: &fakeAuthz{}}, "no Authenticator"},
		{Options{Signer: s, Authenticator: fakeAuthn{}}, "no Authorizer"},
		{Options{Signer: s, Authenticator: fakeAuthn{}, Authorizer: &fakeAuthz{}, TrustDomain: "Bad"}, `"Bad"`},
		{Options{Signer: s, Authenticator: fakeAuthn{}, Authorizer: &fakeAuthz{}, MaxValidity: -time.Hour}, "negative"},
	} {
		if _, err := NewServer(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.o, err, tc.want)
		}
	}
	srv, err := NewServer(Options{Signer: s, Authenticator: fakeAuthn{}, Authorizer: &fakeAuthz{}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(context.Background(), ln); err == nil || !strings.Contains(err.Error(), "no DNS names") {
		t.Errorf("Serve without DNS names: %v", err)
	}
}
