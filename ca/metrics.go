package ca

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The refusal reasons the server itself gives (the label reason of
// nftmesh_ca_refusals_total); an Authorizer's Refusal brings its own.
const (
	ReasonNoToken            = "no-token"            // no "authorization: Bearer <token>"
	ReasonUnauthenticated    = "unauthenticated"     // the Authenticator refused the token (unless its Refusal names another reason)
	ReasonAuthenticatorError = "authenticator-error" // the Authenticator failed without refusing (codes.Unavailable)
	ReasonBadIdentity        = "bad-identity"        // ImpersonatedIdentity is not a string or not a SPIFFE ID of a service account
	ReasonOtherDomain        = "other-trust-domain"  // the identity asked for is in another trust domain
	ReasonBadRequest         = "bad-request"         // metadata the service does not honour (CertSigner)
	ReasonUnauthorized       = "unauthorized"        // an Authorizer's Refusal without a reason
	ReasonAuthorizerError    = "authorizer-error"    // the Authorizer failed without refusing (codes.Unavailable)
	ReasonBadCSR             = "bad-csr"             // the CSR does not parse, verify, or has a refused key
	ReasonTimeout            = "timeout"             // the request ran past its deadline
	ReasonSignError          = "sign-error"          // signing failed (codes.Internal): the CA expired, say
	ReasonTooLarge           = "too-large"           // the request is larger than MaxRequestBytes (refused by gRPC)
)

// metrics are the service's Prometheus metrics.
type metrics struct {
	issued   prometheus.Counter
	refusals *prometheus.CounterVec
	sign     prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nftmesh_ca_certificates_issued_total",
			Help: "Workload certificates the CA service issued.",
		}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nftmesh_ca_refusals_total",
			Help: "Certificate requests the CA service refused or failed, by reason.",
		}, []string{"reason"}),
		sign: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "nftmesh_ca_sign_duration_seconds",
			Help:    "Time to check a CSR and sign its certificate.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
	}
	// The server's own reasons show as 0 from the start, so that rate() sees the first one.
	for _, r := range []string{ReasonNoToken, ReasonUnauthenticated, ReasonAuthenticatorError, ReasonBadIdentity, ReasonOtherDomain,
		ReasonBadRequest, ReasonUnauthorized, ReasonAuthorizerError, ReasonBadCSR, ReasonTimeout, ReasonSignError, ReasonTooLarge} {
		m.refusals.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.issued, m.refusals, m.sign)
	}
	return m
}

func (m *metrics) refused(reason string) { m.refusals.WithLabelValues(reason).Inc() }

func (m *metrics) signed(start time.Time) { m.sign.Observe(time.Since(start).Seconds()) }
