package identity

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	mathrand "math/rand/v2"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/nftmesh/nftmesh/internal/input"
)

// Defaults of RemoteOptions.
const (
	DefaultClusterID = "Kubernetes" // istiod's cluster ID unless configured
	// DefaultRequestTimeout bounds one CreateCertificate call, connecting included.
	DefaultRequestTimeout = 20 * time.Second
)

// Retry backoff after a failed fetch: 500 ms, doubling up to 150 s, ±10% jitter (about
// ztunnel's: docs/ca.md, "Caching and renewal").
const (
	remoteBackoffMin = 500 * time.Millisecond
	remoteBackoffMax = 150 * time.Second
	rootsReloadEvery = time.Minute
)

// RemoteOptions configure a RemoteIssuer. Address and RootFile and TokenFile are
// required; zero fields otherwise take the defaults.
type RemoteOptions struct {
	// Address is the CA service, host:port (istiod's is istiod.istio-system.svc:15012);
	// an https:// prefix, as istiod's CA_ADDRESS has it, is allowed.
	Address string
	// RootFile holds the PEM root certificates that verify the CA's TLS certificate. They
	// are also the mesh's trust anchors (Roots): every certificate the CA returns must
	// chain to them. The file is read at start and again every minute.
	RootFile string
	// TokenFile holds the bearer token sent with each request (a projected service
	// account token with audience istio-ca); it is re-read on every request, since the
	// kubelet rotates it.
	TokenFile   string
	ClusterID   string        // the "clusterid" header; default DefaultClusterID
	TrustDomain string        // default DefaultTrustDomain
	Validity    time.Duration // the validity_duration asked for; default DefaultLeafTTL (the CA may shorten it)
	// ServerName is the name the CA's TLS certificate must carry; default Address's host.
	ServerName string
	Timeout    time.Duration    // one request's; default DefaultRequestTimeout
	Clock      func() time.Time // default time.Now; timers still run on real time
	Log        *slog.Logger     // default slog.Default()
	// OnFetch, if set, is called after every request for a certificate with its error
	// (nil on success): for metrics.
	OnFetch func(id ID, err error)
}

// RemoteIssuer gets certificates from a CA service speaking istiod's
// IstioCertificateService (istio.v1.auth.IstioCertificateService/CreateCertificate,
// gRPC over TLS), as ztunnel does in its shared (node proxy) mode: for each identity a
// fresh ECDSA P-256 key and CSR made here (the key never leaves the proxy), the node's
// token as credentials, the identity as ImpersonatedIdentity. It works against istiod and
// against nftmesh's own CA (docs/ca.md).
//
// It keeps one certificate per identity. The identities of the pods the proxy serves are
// held (Hold, Release): their certificate is fetched at once and renewed at half its
// lifetime, with retries on failure (backoff from 500 ms doubling to 150 s) while the old
// one, still valid, stays in use; it is dropped with its last holder. Certificate for an
// identity not held fetches on demand and caches the result; past half its lifetime it
// is served while a new one is fetched in the background.
//
// Every answer is checked before use: the leaf must carry exactly the identity asked
// for, our public key, and chain to the trust anchors of RootFile for both client and
// server authentication. ztunnel instead takes the answer's last element as the trust
// bundle and checks no chain; here the anchors come from RootFile alone, so a CA (or
// whoever answers in its name) cannot bring its own root into the mesh.
type RemoteIssuer struct {
	td         string
	clusterID  string
	tokenFile  string
	rootFile   string
	validity   time.Duration
	timeout    time.Duration
	now        func() time.Time
	log        *slog.Logger
	onFetch    func(ID, error)
	conn       *grpc.ClientConn
	client     pb.IstioCertificateServiceClient
	serverName string

	roots     atomic.Pointer[x509.CertPool]
	rootsPEM  []byte // the root file's content as last loaded; guarded by mu
	fetches   atomic.Int64
	fetchHook func(ID) // called as a fetch starts, for tests

	backoffMin, backoffMax time.Duration // for tests
	clampMargin            time.Duration // how long before its end an unextended certificate is renewed
	rootsEvery             time.Duration

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	entries map[ID]*remoteEntry
	closed  bool
}

// remoteEntry is one identity's certificate and its state; guarded by RemoteIssuer.mu.
type remoteEntry struct {
	cert     *tls.Certificate
	renewAt  time.Time     // half of cert's lifetime as it was when it arrived
	fetching *mintCall     // the request in flight, which callers share
	holds    int           // pods that use the identity
	stop     chan struct{} // closed when the last holder releases: ends the renewal loop
	backoff  time.Duration // the last wait after a failure; 0 after a success
	retryAt  time.Time     // no new attempt before, after a failure
	lastErr  error         // the last attempt's failure, answered until retryAt
}

var (
	_ Issuer = (*RemoteIssuer)(nil)
	_ Holder = (*RemoteIssuer)(nil)
)

// OptionError is NewRemoteIssuer's error about one of its options, named as the
// RemoteOptions field ("Address", "RootFile", "TokenFile", "TrustDomain", "Validity"), so
// that a command can name its flag.
type OptionError struct {
	Option string
	Err    error
}

func (e *OptionError) Error() string { return e.Err.Error() }
func (e *OptionError) Unwrap() error { return e.Err }

// NewRemoteIssuer returns an issuer asking the CA at opts.Address. It reads the root
// file and the token file once (an error names the file) but does not connect: the
// first request does.
func NewRemoteIssuer(opts RemoteOptions) (*RemoteIssuer, error) {
	if opts.TrustDomain == "" {
		opts.TrustDomain = DefaultTrustDomain
	}
	if err := CheckTrustDomain(opts.TrustDomain); err != nil {
		return nil, &OptionError{"TrustDomain", err}
	}
	if opts.ClusterID == "" {
		opts.ClusterID = DefaultClusterID
	}
	if opts.Validity == 0 {
		opts.Validity = DefaultLeafTTL
	}
	if opts.Validity < time.Second {
		return nil, &OptionError{"Validity", fmt.Errorf("identity: certificate validity %v is under a second", opts.Validity)}
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultRequestTimeout
	}
	if opts.Clock == nil {
		opts.Clock = time.Now
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	addr, host, err := caAddress(opts.Address)
	if err != nil {
		return nil, &OptionError{"Address", err}
	}
	if opts.ServerName == "" {
		opts.ServerName = host
	}
	if opts.RootFile == "" {
		return nil, &OptionError{"RootFile", errors.New("identity: no CA root file")}
	}
	if opts.TokenFile == "" {
		return nil, &OptionError{"TokenFile", errors.New("identity: no CA token file")}
	}
	r := &RemoteIssuer{
		td: opts.TrustDomain, clusterID: opts.ClusterID, tokenFile: opts.TokenFile, rootFile: opts.RootFile,
		validity: opts.Validity, timeout: opts.Timeout, now: opts.Clock, log: opts.Log, onFetch: opts.OnFetch,
		serverName: opts.ServerName, backoffMin: remoteBackoffMin, backoffMax: remoteBackoffMax, clampMargin: time.Minute,
		rootsEvery: rootsReloadEvery, entries: map[ID]*remoteEntry{},
	}
	if _, err := r.loadRoots(); err != nil {
		return nil, &OptionError{"RootFile", err}
	}
	if _, err := r.token(); err != nil {
		return nil, &OptionError{"TokenFile", err}
	}
	tlsConfig := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: opts.ServerName, // SNI (none for an IP address)
		// The CA's chain is verified below against the roots as they are now: the root
		// file may change under a running proxy (a root rotation).
		InsecureSkipVerify: true,
		VerifyConnection:   r.verifyCA,
	}
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig)),
		grpc.WithUserAgent("nftmesh-proxy"),
		grpc.WithConnectParams(grpc.ConnectParams{
			// While a request waits for the CA (WaitForReady), reconnect soon after it
			// comes back; the retries of failed requests have their own, longer backoff.
			Backoff:           backoff.Config{BaseDelay: 500 * time.Millisecond, Multiplier: 2, Jitter: 0.1, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 5 * time.Second, // ztunnel's connect timeout
		}),
	)
	if err != nil {
		return nil, &OptionError{"Address", fmt.Errorf("identity: CA address %s: %w", opts.Address, err)}
	}
	r.conn = conn
	r.client = pb.NewIstioCertificateServiceClient(conn)
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.wg.Add(1)
	go r.reloadRoots()
	return r, nil
}

// caAddress returns the gRPC target and the host of a CA address: host:port, or
// https://host:port.
func caAddress(a string) (target, host string, err error) {
	s := strings.TrimSuffix(strings.TrimPrefix(a, "https://"), "/")
	if strings.Contains(s, "://") {
		return "", "", fmt.Errorf("identity: CA address %q: the scheme must be https:// or none", a)
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil || host == "" || port == "" {
		return "", "", fmt.Errorf("identity: CA address %q is not host:port (such as istiod.istio-system.svc:15012)", a)
	}
	return s, host, nil
}

// TrustDomain returns the trust domain the issuer asks certificates for.
func (r *RemoteIssuer) TrustDomain() string { return r.td }

// Roots returns the certificates of the root file, as last read.
func (r *RemoteIssuer) Roots() *x509.CertPool { return r.roots.Load() }

// Fetches returns how many certificate requests the issuer has sent.
func (r *RemoteIssuer) Fetches() int64 { return r.fetches.Load() }

// Certificate returns id's certificate: the cached one while it is valid, else one
// fetched now (concurrent callers share one request). A certificate past half its
// lifetime is still returned while its successor is fetched (by the renewal loop for a
// held identity, in the background otherwise).
func (r *RemoteIssuer) Certificate(ctx context.Context, id ID) (*tls.Certificate, error) {
	if err := r.checkID(id); err != nil {
		return nil, err
	}
	for {
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			return nil, fmt.Errorf("identity: certificate for %s: issuer closed", id)
		}
		e := r.entries[id]
		now := r.now()
		if e == nil {
			r.sweepLocked(now)
			e = &remoteEntry{}
			r.entries[id] = e
		}
		if c := e.cert; c != nil && now.Before(c.Leaf.NotAfter) {
			// Not held: no loop renews it, so a caller past half its life starts the
			// renewal (unless the last attempt failed a moment ago).
			if e.holds == 0 && !now.Before(e.renewAt) && !now.Before(e.retryAt) {
				r.startFetchLocked(id, e)
			}
			r.mu.Unlock()
			return c, nil
		}
		if e.fetching == nil && e.lastErr != nil && now.Before(e.retryAt) {
			// The CA failed or refused a moment ago: every handshake of the pod must not
			// become a request (a TokenReview on the API server each); the backoff holds.
			err := e.lastErr
			retry := e.retryAt.Sub(now)
			r.mu.Unlock()
			return nil, fmt.Errorf("%w (next attempt in %v)", err, retry.Round(time.Millisecond))
		}
		call := r.startFetchLocked(id, e)
		r.mu.Unlock()
		select {
		case <-call.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("identity: certificate for %s: %w", id, context.Cause(ctx))
		}
		if call.err != nil {
			return nil, call.err
		}
		if r.now().Before(call.cert.Leaf.NotAfter) {
			return call.cert, nil
		}
		// Expired as soon as fetched (the clock jumped): go round again.
	}
}

// sweepLocked forgets identities no pod holds whose certificate has expired (or that
// never got one), with nothing in flight: asked for once (a pooled connection racing a
// pod's removal), they would otherwise stay for the proxy's lifetime. r.mu is held.
func (r *RemoteIssuer) sweepLocked(now time.Time) {
	for id, e := range r.entries {
		if e.holds == 0 && e.fetching == nil && (e.cert == nil || !now.Before(e.cert.Leaf.NotAfter)) && !now.Before(e.retryAt) {
			delete(r.entries, id)
		}
	}
}

func (r *RemoteIssuer) checkID(id ID) error {
	if err := id.Validate(); err != nil {
		return err
	}
	if id.TrustDomain != r.td {
		return fmt.Errorf("identity: cannot get a certificate for %s: not in trust domain %s", id, r.td)
	}
	return nil
}

// Hold marks id as used by one more pod. The first hold fetches its certificate at once
// (unless a valid one is cached) and keeps it renewed until the last Release.
func (r *RemoteIssuer) Hold(id ID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	e := r.entries[id]
	if e == nil {
		e = &remoteEntry{}
		r.entries[id] = e
	}
	e.holds++
	if e.holds > 1 {
		return
	}
	// A new pod's prefetch does not wait out the backoff of an earlier, unheld failure.
	e.backoff, e.retryAt, e.lastErr = 0, time.Time{}, nil
	if err := r.checkID(id); err != nil {
		// Counted, so that Release balances, but never fetched: no request could succeed.
		r.log.Error("certificate prefetch: invalid identity", "identity", id.String(), "error", err)
		return
	}
	e.stop = make(chan struct{})
	r.wg.Add(1)
	go r.renew(id, e, e.stop)
}

// Release undoes one Hold. With the last one the certificate is dropped, its renewal
// stops and a request in flight for it is discarded when it answers.
func (r *RemoteIssuer) Release(id ID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.entries[id]
	if e == nil || e.holds == 0 {
		if !r.closed {
			r.log.Error("certificate release without a hold", "identity", id.String())
		}
		return
	}
	e.holds--
	if e.holds > 0 {
		return
	}
	delete(r.entries, id)
	if e.stop != nil {
		close(e.stop)
	}
}

// Close stops every renewal and request and closes the connection to the CA.
// Certificate fails after it.
func (r *RemoteIssuer) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
	return r.conn.Close()
}

// startFetchLocked returns the request in flight for e, starting one if there is none;
// r.mu is held. The request runs in its own goroutine, bounded by the issuer's timeout
// rather than a caller's context: others may be waiting for it.
func (r *RemoteIssuer) startFetchLocked(id ID, e *remoteEntry) *mintCall {
	if e.fetching != nil {
		return e.fetching
	}
	call := &mintCall{done: make(chan struct{})}
	e.fetching = call
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		cert, err := r.fetch(id)
		clamped := false
		r.mu.Lock()
		e.fetching = nil
		now := r.now()
		if err == nil {
			if r.entries[id] == e { // else released meanwhile: discarded
				// Half of what is left now, not of NotAfter-NotBefore: istiod back-dates
				// NotBefore by 2 minutes, and the CA's clock is not ours.
				left := cert.Leaf.NotAfter.Sub(now)
				wait := left / 2
				if old := e.cert; old != nil && !cert.Leaf.NotAfter.After(old.Leaf.NotAfter) {
					// The CA did not extend it (it cuts certificates at its own expiry):
					// renewing at every half-life would only bunch requests up towards the
					// end. Ask again a minute before it ends, for a CA rotated meanwhile,
					// and within that minute not before it has ended.
					wait = max(wait, left-r.clampMargin)
					if left <= r.clampMargin {
						wait = left
					}
					clamped = true
				}
				e.cert, e.renewAt = cert, now.Add(wait)
				e.backoff, e.retryAt, e.lastErr = 0, time.Time{}, nil
			}
		} else {
			e.backoff = min(max(2*e.backoff, r.backoffMin), r.backoffMax)
			e.retryAt, e.lastErr = now.Add(jitter(e.backoff)), err
		}
		call.cert, call.err = cert, err
		close(call.done)
		held, valid := e.holds > 0, e.cert != nil && now.Before(e.cert.Leaf.NotAfter)
		retry := e.retryAt.Sub(now)
		r.mu.Unlock()
		if r.onFetch != nil {
			r.onFetch(id, err)
		}
		switch {
		case err == nil && clamped:
			r.log.Warn("the CA renewed a certificate without extending it: is the CA's own certificate about to expire?",
				"identity", id.String(), "not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
		case err == nil:
			r.log.Debug("certificate fetched", "identity", id.String(), "not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
		case r.ctx.Err() != nil: // closing
		case held:
			r.log.Warn("certificate request failed; retrying", "identity", id.String(), "error", err,
				"retry_in", retry.Round(time.Millisecond), "current_still_valid", valid)
		default:
			r.log.Warn("certificate request failed", "identity", id.String(), "error", err)
		}
	}()
	return call
}

// jitter spreads d by ±10%.
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.9 + 0.2*mathrand.Float64()))
}

// renew keeps a held identity's certificate fresh until stop closes or the issuer does:
// a request when there is no valid certificate or half its lifetime has passed, retried
// with backoff; a failed renewal leaves the current certificate in use.
func (r *RemoteIssuer) renew(id ID, e *remoteEntry, stop <-chan struct{}) {
	defer r.wg.Done()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			return
		}
		now := r.now()
		var call *mintCall
		var wait time.Duration
		switch {
		case e.fetching != nil:
			call = e.fetching
		case e.cert != nil && now.Before(e.renewAt) && now.Before(e.cert.Leaf.NotAfter):
			wait = e.renewAt.Sub(now)
		case now.Before(e.retryAt):
			wait = e.retryAt.Sub(now)
		default:
			if e.backoff > 0 {
				// The connection may be waiting out gRPC's own reconnect backoff: the
				// retry should try the CA now.
				r.conn.ResetConnectBackoff()
			}
			call = r.startFetchLocked(id, e)
		}
		r.mu.Unlock()
		if call != nil {
			select {
			case <-call.done:
			case <-stop:
				return
			case <-r.ctx.Done():
				return
			}
			continue
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-stop:
			return
		case <-r.ctx.Done():
			return
		}
	}
}

// fetch asks the CA for a certificate for id and checks the answer.
func (r *RemoteIssuer) fetch(id ID) (*tls.Certificate, error) {
	r.fetches.Add(1)
	if r.fetchHook != nil {
		r.fetchHook(id)
	}
	token, err := r.token()
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("identity: key for %s: %w", id, err)
	}
	// As ztunnel's: an empty subject, one URI SAN, SHA-256. The CA takes only the key.
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		SignatureAlgorithm: x509.ECDSAWithSHA256,
		URIs:               []*url.URL{id.URL()},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("identity: certificate request for %s: %w", id, err)
	}
	md, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id.String()})
	if err != nil {
		return nil, err
	}
	req := &pb.IstioCertificateRequest{
		Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr})),
		ValidityDuration: int64(r.validity / time.Second),
		Metadata:         md,
	}
	ctx, cancel := context.WithTimeout(r.ctx, r.timeout)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token, "clusterid", r.clusterID)
	// WaitForReady: a CA that is down or restarting is waited for, up to the timeout,
	// rather than failed at once while gRPC waits to reconnect.
	resp, err := r.client.CreateCertificate(ctx, req, grpc.WaitForReady(true))
	if err != nil {
		return nil, fmt.Errorf("identity: certificate for %s from the CA: %w", id, err)
	}
	return r.checkReply(id, key, resp.GetCertChain())
}

// token reads the token file: every request, since the kubelet rotates it.
func (r *RemoteIssuer) token() (string, error) {
	data, err := input.ReadFile(r.tokenFile)
	if err != nil {
		return "", fmt.Errorf("identity: CA token: %w", err)
	}
	tok := string(bytes.TrimSpace(data))
	if tok == "" {
		return "", fmt.Errorf("identity: CA token file %s is empty", r.tokenFile)
	}
	return tok, nil
}

// checkReply turns the CA's answer (PEM, leaf first, root bundle last) into a TLS
// certificate with key, after checking it: a leaf for exactly id, with our public key,
// valid now, not a CA, and chaining to our trust anchors (Roots) for both server and
// client authentication, through the answer's other certificates. The chain served is
// that verified chain without its anchor, which every peer has.
func (r *RemoteIssuer) checkReply(id ID, key *ecdsa.PrivateKey, chain []string) (*tls.Certificate, error) {
	if len(chain) == 0 {
		return nil, fmt.Errorf("identity: the CA returned no certificate for %s", id)
	}
	var certs []*x509.Certificate
	for i, elem := range chain {
		cs, err := ParseCertificates([]byte(elem))
		if err != nil {
			return nil, fmt.Errorf("identity: certificate for %s from the CA: element %d: %w", id, i, err)
		}
		certs = append(certs, cs...)
	}
	leaf := certs[0]
	if got, err := FromCertificate(leaf); err != nil || got != id {
		return nil, fmt.Errorf("identity: the CA returned a certificate for %s, asked for %s", describeURIs(leaf), id)
	}
	if !publicKeysEqual(&key.PublicKey, leaf.PublicKey) {
		return nil, fmt.Errorf("identity: the CA returned a certificate for %s with another public key than the request's", id)
	}
	if leaf.IsCA || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return nil, fmt.Errorf("identity: the CA returned a CA certificate for %s, not an X.509 SVID", id)
	}
	now := r.now()
	if !now.Before(leaf.NotAfter) {
		return nil, fmt.Errorf("identity: the CA returned a certificate for %s that expired at %s", id, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	var verified []*x509.Certificate
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		chains, err := leaf.Verify(x509.VerifyOptions{Roots: r.Roots(), Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}})
		if err != nil {
			return nil, fmt.Errorf("identity: the CA's certificate for %s does not verify to the roots of %s: %w", id, r.rootFile, err)
		}
		verified = chains[0]
	}
	ders := [][]byte{leaf.Raw}
	for _, c := range verified[1 : len(verified)-1] {
		ders = append(ders, c.Raw)
	}
	return &tls.Certificate{Certificate: ders, PrivateKey: key, Leaf: leaf}, nil
}

func describeURIs(c *x509.Certificate) string {
	switch len(c.URIs) {
	case 0:
		return "no URI SAN"
	case 1:
		return c.URIs[0].String()
	}
	s := make([]string, len(c.URIs))
	for i, u := range c.URIs {
		s[i] = u.String()
	}
	return strings.Join(s, " and ")
}

// loadRoots reads the root file and installs its certificates if they changed; changed
// reports whether they did.
func (r *RemoteIssuer) loadRoots() (changed bool, err error) {
	data, err := input.ReadFile(r.rootFile)
	if err != nil {
		return false, fmt.Errorf("identity: CA roots: %w", err)
	}
	r.mu.Lock()
	same := r.roots.Load() != nil && bytes.Equal(data, r.rootsPEM)
	r.mu.Unlock()
	if same {
		return false, nil
	}
	certs, err := ParseCertificates(data)
	if err != nil {
		return false, fmt.Errorf("identity: CA roots %s: %w", r.rootFile, err)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	r.mu.Lock()
	r.rootsPEM = data
	r.roots.Store(pool)
	r.mu.Unlock()
	return true, nil
}

// reloadRoots reads the root file again every rootsEvery until Close; a file that does
// not load keeps the roots there are.
func (r *RemoteIssuer) reloadRoots() {
	defer r.wg.Done()
	t := time.NewTicker(r.rootsEvery)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
		switch changed, err := r.loadRoots(); {
		case err != nil:
			r.log.Warn("CA root file does not load; keeping the current roots", "error", err)
		case changed:
			r.log.Info("CA roots reloaded", "file", r.rootFile)
		}
	}
}

// verifyCA verifies the CA's TLS certificate against the current roots and the server
// name.
func (r *RemoteIssuer) verifyCA(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("identity: the CA presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		Roots: r.Roots(), Intermediates: inter, DNSName: r.serverName, CurrentTime: r.now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("identity: the CA's TLS certificate (roots %s, name %s): %w", r.rootFile, r.serverName, err)
	}
	return nil
}
