package ca

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

// Defaults and limits of Server.
const (
	// DefaultValidity is a certificate's lifetime when the request asks for none (istiod's
	// DEFAULT_WORKLOAD_CERT_TTL), but never more than MaxValidity.
	DefaultValidity = 24 * time.Hour
	// DefaultMaxValidity is Options.MaxValidity's default.
	DefaultMaxValidity = 24 * time.Hour
	// DefaultServingCertTTL is the lifetime of the service's own TLS certificate; it is
	// renewed at half of it.
	DefaultServingCertTTL = 24 * time.Hour
	// DefaultRequestTimeout bounds one request: authentication, authorization, signing.
	DefaultRequestTimeout = 10 * time.Second
	// MaxRequestBytes is the largest request message gRPC accepts (a request with a P-256
	// CSR is about 1 KiB); a larger one is refused with codes.ResourceExhausted.
	MaxRequestBytes = 64 << 10
	// maxHeaderBytes bounds the request's metadata (the token is about 1 KiB).
	maxHeaderBytes = 64 << 10

	// ImpersonatedIdentity is the metadata field naming the identity a node proxy asks
	// for on behalf of one of its pods (istio's security.ImpersonatedIdentity).
	ImpersonatedIdentity = "ImpersonatedIdentity"
	// certSigner is istiod's metadata field choosing another signer; not supported.
	certSigner = "CertSigner"
)

// Options configure a Server. Signer, Authenticator and Authorizer are required; zero
// fields of the rest take their defaults.
type Options struct {
	Signer        *Signer
	Authenticator Authenticator
	Authorizer    Authorizer
	// TrustDomain: every identity issued is in it; default identity.DefaultTrustDomain.
	TrustDomain string
	// MaxValidity caps a certificate's lifetime: a request asking for more gets
	// MaxValidity (istiod refuses it instead). Default DefaultMaxValidity.
	MaxValidity time.Duration
	// DNSNames are the names (or IP addresses) of the service's TLS certificate, which
	// the Signer's CA signs; required by Serve.
	DNSNames []string
	// ServingCertTTL is the serving certificate's lifetime; default DefaultServingCertTTL.
	ServingCertTTL time.Duration
	// RequestTimeout bounds each request; default DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Log gets a Warn for every refusal and an Info for every certificate; default none.
	Log *slog.Logger
	// Registerer gets the metrics (nftmesh_ca_*); nil: not registered.
	Registerer prometheus.Registerer
}

// Server is the certificate service: istio.v1.auth.IstioCertificateService.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer

	signer      *Signer
	authn       Authenticator
	authz       Authorizer
	td          string
	maxValidity time.Duration
	timeout     time.Duration
	log         *slog.Logger
	m           *metrics
	serving     *servingCert
}

// NewServer returns a Server; it checks the options.
func NewServer(o Options) (*Server, error) {
	switch {
	case o.Signer == nil:
		return nil, errors.New("ca: no Signer")
	case o.Authenticator == nil:
		return nil, errors.New("ca: no Authenticator")
	case o.Authorizer == nil:
		return nil, errors.New("ca: no Authorizer")
	case o.MaxValidity < 0:
		return nil, fmt.Errorf("ca: maximum validity %v is negative", o.MaxValidity)
	case o.ServingCertTTL < 0:
		return nil, fmt.Errorf("ca: serving certificate lifetime %v is negative", o.ServingCertTTL)
	case o.RequestTimeout < 0:
		return nil, fmt.Errorf("ca: request timeout %v is negative", o.RequestTimeout)
	}
	if o.TrustDomain == "" {
		o.TrustDomain = identity.DefaultTrustDomain
	}
	if err := identity.CheckTrustDomain(o.TrustDomain); err != nil {
		return nil, err
	}
	if o.MaxValidity == 0 {
		o.MaxValidity = DefaultMaxValidity
	}
	if o.ServingCertTTL == 0 {
		o.ServingCertTTL = DefaultServingCertTTL
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := &Server{
		signer: o.Signer, authn: o.Authenticator, authz: o.Authorizer, td: o.TrustDomain,
		maxValidity: o.MaxValidity, timeout: o.RequestTimeout, log: o.Log, m: newMetrics(o.Registerer),
	}
	if len(o.DNSNames) > 0 {
		s.serving = &servingCert{signer: o.Signer, names: o.DNSNames, ttl: o.ServingCertTTL, log: o.Log}
	}
	return s, nil
}

// Validity is the lifetime a request for seconds gets: DefaultValidity for none (<= 0),
// and never more than the maximum.
func (s *Server) Validity(seconds int64) time.Duration {
	if seconds <= 0 {
		return min(DefaultValidity, s.maxValidity)
	}
	if seconds >= int64(s.maxValidity/time.Second) {
		return s.maxValidity
	}
	return time.Duration(seconds) * time.Second
}

// CreateCertificate authenticates the caller by its bearer token, decides the identity
// (ImpersonatedIdentity, or else the caller's own), has the Authorizer allow it, and
// signs the CSR. The answer is the leaf, the CA's certificates, and the root last.
//
// Refusals: no token or a token the Authenticator refuses (a Refusal), codes.Unauthenticated;
// a malformed or foreign identity, a bad CSR, codes.InvalidArgument; the Authorizer's
// Refusal, codes.PermissionDenied (istiod answers Unauthenticated to the authorization
// ones; we say which and why). An Authenticator or Authorizer that fails without
// refusing (the API server unreachable) is the service's failure: codes.Unavailable. Past
// the deadline, codes.DeadlineExceeded; signing failures, codes.Internal. Each is logged
// and counted (nftmesh_ca_refusals_total{reason}).
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	r := &request{ctx: ctx}

	token, err := bearerToken(ctx)
	if err != nil {
		return nil, s.refuse(r, codes.Unauthenticated, ReasonNoToken, err)
	}
	caller, err := s.authn.Authenticate(ctx, token)
	if err != nil {
		if ctx.Err() != nil {
			return nil, s.refuse(r, codes.DeadlineExceeded, ReasonTimeout, fmt.Errorf("authentication did not finish in %v: %w", s.timeout, err))
		}
		var refusal *Refusal
		if !errors.As(err, &refusal) {
			return nil, s.refuse(r, codes.Unavailable, ReasonAuthenticatorError, fmt.Errorf("cannot authenticate the caller: %w", err))
		}
		return nil, s.refuse(r, codes.Unauthenticated, reasonOr(err, ReasonUnauthenticated), fmt.Errorf("authentication failed: %w", err))
	}
	r.caller = &caller
	id, code, reason, err := s.requestedID(caller, req.GetMetadata().GetFields())
	if err != nil {
		return nil, s.refuse(r, code, reason, err)
	}
	r.id = id
	if err := s.authz.Authorize(ctx, caller, id); err != nil {
		var refusal *Refusal
		switch {
		case errors.As(err, &refusal):
			if !strings.Contains(err.Error(), id.String()) { // ca/kube's refusals name both already
				err = fmt.Errorf("%s may not have a certificate for %s: %w", caller, id, err)
			}
			return nil, s.refuse(r, codes.PermissionDenied, reasonOr(err, ReasonUnauthorized), err)
		case ctx.Err() != nil:
			return nil, s.refuse(r, codes.DeadlineExceeded, ReasonTimeout,
				fmt.Errorf("authorization of %s for %s did not finish in %v: %w", caller, id, s.timeout, err))
		default:
			return nil, s.refuse(r, codes.Unavailable, ReasonAuthorizerError,
				fmt.Errorf("cannot decide whether %s may have a certificate for %s: %w", caller, id, err))
		}
	}
	validity := s.Validity(req.GetValidityDuration())
	start := time.Now()
	chain, leaf, err := s.signer.sign(req.GetCsr(), id, validity)
	s.m.signed(start)
	if err != nil {
		if RefusalReason(err) == ReasonBadCSR {
			return nil, s.refuse(r, codes.InvalidArgument, ReasonBadCSR, fmt.Errorf("certificate for %s: %w", id, err))
		}
		return nil, s.refuse(r, codes.Internal, ReasonSignError, err)
	}
	s.m.issued.Inc()
	s.log.Info("certificate issued", "identity", id.String(), "caller", caller.String(), "peer", r.peer(),
		"not_after", leaf.NotAfter.UTC().Format(time.RFC3339), "serial", leaf.SerialNumber.Text(16))
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// request is what is known of a request so far, for the log.
type request struct {
	ctx    context.Context
	caller *Caller
	id     identity.ID
}

func (r *request) peer() string {
	if p, ok := peer.FromContext(r.ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

// refuse logs and counts a refusal and returns its gRPC error.
func (s *Server) refuse(r *request, code codes.Code, reason string, err error) error {
	s.m.refused(reason)
	attrs := []any{"reason", reason, "code", code.String(), "peer", r.peer()}
	if r.caller != nil {
		attrs = append(attrs, "caller", r.caller.String())
	}
	if !r.id.IsZero() {
		attrs = append(attrs, "identity", r.id.String())
	}
	s.log.Warn("certificate request refused", append(attrs, "error", err.Error())...)
	return status.Error(code, err.Error())
}

// reasonOr is err's Refusal reason, or else def.
func reasonOr(err error, def string) string {
	if r := RefusalReason(err); r != "" {
		return r
	}
	return def
}

// bearerToken returns the token of the request's "authorization: Bearer <token>".
func bearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	switch len(vals) {
	case 0:
		return "", errors.New("no bearer token: the request has no authorization metadata (want \"authorization: Bearer <token>\")")
	case 1:
	default:
		return "", fmt.Errorf("no bearer token: the request has %d authorization values; want one", len(vals))
	}
	scheme, token, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", errors.New("no bearer token: the authorization metadata is not \"Bearer <token>\"")
	}
	if token = strings.TrimSpace(token); token == "" || strings.ContainsAny(token, " \t") {
		return "", errors.New("no bearer token: the authorization metadata's token is empty or has spaces")
	}
	return token, nil
}

// requestedID is the identity a request asks for: ImpersonatedIdentity, or else the
// caller's own; it must be in the service's trust domain.
func (s *Server) requestedID(caller Caller, fields map[string]*structpb.Value) (identity.ID, codes.Code, string, error) {
	if _, ok := fields[certSigner]; ok {
		return identity.ID{}, codes.InvalidArgument, ReasonBadRequest,
			fmt.Errorf("metadata %s is not supported: this service signs with one CA", certSigner)
	}
	v, ok := fields[ImpersonatedIdentity]
	if !ok || v.GetStringValue() == "" && isString(v) {
		id := identity.ForServiceAccount(s.td, caller.Namespace, caller.ServiceAccount)
		if err := id.Validate(); err != nil {
			return identity.ID{}, codes.InvalidArgument, ReasonBadIdentity, fmt.Errorf("the caller's own identity: %w", err)
		}
		return id, codes.OK, "", nil
	}
	if !isString(v) {
		return identity.ID{}, codes.InvalidArgument, ReasonBadIdentity,
			fmt.Errorf("metadata %s is not a string but %v", ImpersonatedIdentity, v.AsInterface())
	}
	id, err := identity.ParseID(v.GetStringValue())
	if err != nil {
		return identity.ID{}, codes.InvalidArgument, ReasonBadIdentity, fmt.Errorf("metadata %s: %w", ImpersonatedIdentity, err)
	}
	if id.TrustDomain != s.td {
		return identity.ID{}, codes.InvalidArgument, ReasonOtherDomain,
			fmt.Errorf("metadata %s %q is not in trust domain %s", ImpersonatedIdentity, v.GetStringValue(), s.td)
	}
	return id, codes.OK, "", nil
}

func isString(v *structpb.Value) bool {
	_, ok := v.GetKind().(*structpb.Value_StringValue)
	return ok
}

// Serve answers requests on ln, over TLS (1.2 or later, HTTP/2) with a serving
// certificate for Options.DNSNames that the CA signs, until ctx ends; then it stops
// gracefully (requests in flight get RequestTimeout to finish) and returns nil. It closes
// ln.
// maxStreamsPerConn bounds the requests in flight on one connection.
const maxStreamsPerConn = 64

func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.serving == nil {
		ln.Close()
		return errors.New("ca: no DNS names for the serving certificate")
	}
	// The first certificate now: a failure shows at start, not at the first handshake.
	if _, err := s.serving.get(nil); err != nil {
		ln.Close()
		return err
	}
	tlsConfig := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2"},
		GetCertificate: s.serving.get,
	}
	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsConfig)),
		grpc.MaxRecvMsgSize(MaxRequestBytes),
		// A proxy asks for one certificate per identity at a time; more in flight on one
		// connection is a client flooding the service (each request costs a TokenReview).
		grpc.MaxConcurrentStreams(maxStreamsPerConn),
		grpc.MaxHeaderListSize(maxHeaderBytes),
		grpc.ConnectionTimeout(s.timeout),
		// Clients may ping every 15 s, between calls too: a node proxy keeps its channel
		// open and idle between renewals, and gRPC's default (5 min) would close a channel
		// that pings more often.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 15 * time.Second, PermitWithoutStream: true}),
		grpc.StatsHandler(oversize{s}),
	)
	pb.RegisterIstioCertificateServiceServer(srv, s)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	select {
	case err := <-done:
		return fmt.Errorf("ca: serving: %w", err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(s.timeout + time.Second):
		srv.Stop()
		<-stopped
	}
	<-done
	return nil
}

// oversize counts and logs the requests gRPC refuses before the handler sees them: those
// larger than MaxRequestBytes (codes.ResourceExhausted, which the handler never returns).
type oversize struct{ s *Server }

func (oversize) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context   { return ctx }
func (oversize) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (oversize) HandleConn(context.Context, stats.ConnStats)                       {}

func (o oversize) HandleRPC(ctx context.Context, st stats.RPCStats) {
	if end, ok := st.(*stats.End); ok && end.Error != nil && status.Code(end.Error) == codes.ResourceExhausted {
		o.s.m.refused(ReasonTooLarge)
		o.s.log.Warn("certificate request refused", "reason", ReasonTooLarge, "code", codes.ResourceExhausted.String(),
			"peer", (&request{ctx: ctx}).peer(), "error", status.Convert(end.Error).Message())
	}
}

// servingCert is the service's TLS certificate, made again once half its lifetime has
// passed.
type servingCert struct {
	signer *Signer
	names  []string
	ttl    time.Duration
	log    *slog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	renewAt time.Time
}

func (c *servingCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.signer.now()
	if c.cert != nil && now.Before(c.renewAt) {
		return c.cert, nil
	}
	cert, err := c.signer.ServingCert(c.names, c.ttl)
	if err != nil {
		if c.cert != nil && now.Before(c.cert.Leaf.NotAfter) {
			c.log.Error("cannot renew the serving certificate; keeping the current one", "error", err,
				"not_after", c.cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
			c.renewAt = now.Add(time.Minute)
			return c.cert, nil
		}
		return nil, err
	}
	c.cert = cert
	c.renewAt = now.Add(cert.Leaf.NotAfter.Sub(now) / 2)
	c.log.Info("serving certificate made", "names", strings.Join(c.names, ","),
		"not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	return cert, nil
}
