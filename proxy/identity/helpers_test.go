package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net/url"
	"sync"
	"testing"
	"time"
)

// fakeClock is a settable clock, safe for concurrent use.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Now()} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type testCA struct {
	certPEM, keyPEM []byte
	cert            *x509.Certificate
}

func newTestCA(t *testing.T, td string, ttl time.Duration) testCA {
	t.Helper()
	certPEM, keyPEM, err := GenerateRoot(td, ttl)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := ParseCertificates(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	return testCA{certPEM, keyPEM, certs[0]}
}

func (ca testCA) issuer(t *testing.T, opts CAOptions) *CAIssuer {
	t.Helper()
	iss, err := NewCAIssuer(ca.certPEM, ca.keyPEM, opts)
	if err != nil {
		t.Fatal(err)
	}
	return iss
}

// sign signs tmpl (a fresh P-256 key, a serial) with the CA and returns it as a TLS
// certificate with the chain leaf, CA.
func (ca testCA) sign(t *testing.T, tmpl *x509.Certificate) *tls.Certificate {
	t.Helper()
	caKey, err := ParsePrivateKey(ca.keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if tmpl.SerialNumber == nil {
		if tmpl.SerialNumber, err = randomSerial(); err != nil {
			t.Fatal(err)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key, Leaf: leaf}
}

// leafTemplate is what CAIssuer would mint for id, valid from notBefore to notAfter.
func leafTemplate(id ID, notBefore, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
}

// staticIssuer hands out one certificate whatever the identity asked for.
type staticIssuer struct {
	cert  *tls.Certificate
	roots *x509.CertPool
	td    string
}

func (s staticIssuer) Certificate(context.Context, ID) (*tls.Certificate, error) { return s.cert, nil }
func (s staticIssuer) Roots() *x509.CertPool                                     { return s.roots }
func (s staticIssuer) TrustDomain() string                                       { return s.td }

// otherRoots is an issuer with the roots of another.
type otherRoots struct {
	Issuer
	roots *x509.CertPool
}

func (o otherRoots) Roots() *x509.CertPool { return o.roots }
