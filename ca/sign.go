package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

// Back-dating and limits of Signer.
const (
	// Backdate is how far before now a certificate's NotBefore is set, as istiod does, so
	// that a peer whose clock is a little behind accepts it.
	Backdate = 2 * time.Minute
	// MinRSABits is the smallest RSA key Sign accepts in a CSR; MaxRSABits the largest
	// (bigger keys only cost the peers' CPU).
	MinRSABits = 2048
	MaxRSABits = 8192
	// MaxCSRBytes is the largest CSR Sign reads; ztunnel's are about 500 bytes.
	MaxCSRBytes = 32 << 10
)

// Signer issues workload certificates with a CA certificate and key: the signing CA
// (the root itself, or an intermediate under it) and the certificates above it. It is
// safe for concurrent use.
type Signer struct {
	ca                  *x509.Certificate   // the signing certificate
	key                 crypto.Signer       // its key
	certs               []*x509.Certificate // ca first, the root (trust anchor) last
	chainPEM            []string            // certs as PEM, one element each
	notBefore, notAfter time.Time           // the span every certificate of certs covers
	now                 func() time.Time
}

// NewSigner returns a Signer for the CA in certPEM and keyPEM.
//
// certPEM holds the signing CA certificate first, then any intermediates above it, and
// the root last: each must be signed by the next, and the last is the trust anchor that
// every response ends with. Blocks of other types are skipped. keyPEM holds the signing
// certificate's private key, as identity.NewCAIssuer takes it: PKCS#8 ("PRIVATE KEY"),
// SEC 1 ("EC PRIVATE KEY") or PKCS#1 ("RSA PRIVATE KEY"); ECDSA, RSA or Ed25519. The
// signing certificate must be a CA allowed to sign certificates, every certificate must be
// valid now, and the key must match.
func NewSigner(certPEM, keyPEM []byte) (*Signer, error) {
	return newSigner(certPEM, keyPEM, time.Now)
}

func newSigner(certPEM, keyPEM []byte, now func() time.Time) (*Signer, error) {
	certs, err := identity.ParseCertificates(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: CA certificate: %w", err)
	}
	ca := certs[0]
	if !ca.BasicConstraintsValid || !ca.IsCA {
		return nil, fmt.Errorf("ca: CA certificate %q is not a CA (basic constraints)", ca.Subject)
	}
	if ca.KeyUsage != 0 && ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("ca: CA certificate %q may not sign certificates (key usage)", ca.Subject)
	}
	for i := 1; i < len(certs); i++ {
		if err := certs[i-1].CheckSignatureFrom(certs[i]); err != nil {
			return nil, fmt.Errorf("ca: CA certificate %q is not signed by the next one in the file, %q: %w",
				certs[i-1].Subject, certs[i].Subject, err)
		}
	}
	t := now()
	s := &Signer{ca: ca, certs: certs, now: now, notBefore: ca.NotBefore, notAfter: ca.NotAfter}
	for _, c := range certs {
		if t.Before(c.NotBefore) || t.After(c.NotAfter) {
			return nil, fmt.Errorf("ca: CA certificate %q is valid from %s to %s, not now (%s)",
				c.Subject, rfc3339(c.NotBefore), rfc3339(c.NotAfter), rfc3339(t))
		}
		if c.NotBefore.After(s.notBefore) {
			s.notBefore = c.NotBefore
		}
		if c.NotAfter.Before(s.notAfter) {
			s.notAfter = c.NotAfter
		}
		s.chainPEM = append(s.chainPEM, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	if s.key, err = identity.ParsePrivateKey(keyPEM); err != nil {
		return nil, fmt.Errorf("ca: CA key: %w", err)
	}
	if pub, ok := s.key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(ca.PublicKey) {
		return nil, fmt.Errorf("ca: CA key does not match CA certificate %q", ca.Subject)
	}
	return s, nil
}

// RootPEM returns the trust anchor, the last certificate of the CA file, as PEM: what
// the proxies verify peers' certificates with.
func (s *Signer) RootPEM() []byte { return []byte(s.chainPEM[len(s.chainPEM)-1]) }

// Roots returns a new pool holding the trust anchor.
func (s *Signer) Roots() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(s.certs[len(s.certs)-1])
	return p
}

// NotAfter is when the CA expires: the earliest NotAfter of its certificates. No
// certificate it issues lives longer.
func (s *Signer) NotAfter() time.Time { return s.notAfter }

// Sign issues a certificate for id to the public key of csrPEM, valid for validity
// (which must be positive; the caller caps it), and returns the chain as PEM, one
// certificate per element: the leaf, then each certificate of the CA file, the root last.
//
// csrPEM must hold exactly one PEM "CERTIFICATE REQUEST" block whose self-signature
// verifies, with an ECDSA (P-256, P-384, P-521), RSA (2048 to 8192 bits) or Ed25519 key;
// a CSR it refuses is a Refusal with reason "bad-csr" naming the problem. As istiod
// does, only the CSR's key is used: its subject and SANs are ignored. The leaf has an
// empty subject and one URI SAN, id (critical), key usage digitalSignature (and
// keyEncipherment for an RSA key), extended key usage serverAuth and clientAuth, CA false
// and a random 128-bit serial. It is valid from Backdate ago (not before the CA) to
// validity from now, but not past the CA's expiry.
func (s *Signer) Sign(csrPEM string, id identity.ID, validity time.Duration) ([]string, error) {
	chain, _, err := s.sign(csrPEM, id, validity)
	return chain, err
}

// sign is Sign, returning the leaf too.
func (s *Signer) sign(csrPEM string, id identity.ID, validity time.Duration) ([]string, *x509.Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, nil, err
	}
	if validity <= 0 {
		return nil, nil, fmt.Errorf("ca: validity %v is not positive", validity)
	}
	csr, err := parseCSR(csrPEM)
	if err != nil {
		return nil, nil, Refuse(ReasonBadCSR, err)
	}
	usage := x509.KeyUsageDigitalSignature
	if _, ok := csr.PublicKey.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		// An empty subject: the identity is the URI SAN alone (crypto/x509 then marks the
		// SAN extension critical, as RFC 5280 requires and istiod does).
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := s.issue(tmpl, csr.PublicKey, validity)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: certificate for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: certificate for %s: %w", id, err)
	}
	chain := make([]string, 0, 1+len(s.chainPEM))
	chain = append(chain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	return append(chain, s.chainPEM...), leaf, nil
}

// issue fills in tmpl's serial and dates and signs it.
func (s *Signer) issue(tmpl *x509.Certificate, pub crypto.PublicKey, validity time.Duration) ([]byte, error) {
	now := s.now()
	tmpl.NotBefore = now.Add(-Backdate)
	if tmpl.NotBefore.Before(s.notBefore) {
		tmpl.NotBefore = s.notBefore
	}
	tmpl.NotAfter = now.Add(validity)
	if tmpl.NotAfter.After(s.notAfter) {
		tmpl.NotAfter = s.notAfter
	}
	if !now.Before(tmpl.NotAfter) {
		return nil, fmt.Errorf("the CA expired at %s", rfc3339(s.notAfter))
	}
	if now.Before(s.notBefore) {
		return nil, fmt.Errorf("the CA is not valid before %s", rfc3339(s.notBefore))
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	tmpl.SerialNumber = serial
	return x509.CreateCertificate(rand.Reader, tmpl, s.ca, pub, s.key)
}

// ServingCert returns a new TLS certificate for the service itself: a fresh ECDSA P-256
// key, the given DNS names (an element that is an IP address becomes an IP SAN), extended
// key usage serverAuth, signed by the CA and valid for ttl (not past the CA's expiry).
// The chain is the leaf and the CA file's certificates but the root, as a TLS server
// sends it. Server renews it itself at half its lifetime.
func (s *Signer) ServingCert(dnsNames []string, ttl time.Duration) (*tls.Certificate, error) {
	if len(dnsNames) == 0 {
		return nil, errors.New("ca: serving certificate: no DNS name")
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("ca: serving certificate: lifetime %v is not positive", ttl)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: serving certificate key: %w", err)
	}
	tmpl := &x509.Certificate{
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	tmpl.Subject.CommonName = dnsNames[0]
	for _, n := range dnsNames {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := s.issue(tmpl, &key.PublicKey, ttl)
	if err != nil {
		return nil, fmt.Errorf("ca: serving certificate for %s: %w", strings.Join(dnsNames, ", "), err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: serving certificate: %w", err)
	}
	chain := [][]byte{der}
	for _, c := range s.certs[:len(s.certs)-1] {
		chain = append(chain, c.Raw)
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

// parseCSR parses and checks a PEM certificate request; the error says what is wrong.
func parseCSR(csrPEM string) (*x509.CertificateRequest, error) {
	if len(csrPEM) > MaxCSRBytes {
		return nil, fmt.Errorf("CSR of %d bytes is larger than %d", len(csrPEM), MaxCSRBytes)
	}
	var blocks []*pem.Block
	for rest := []byte(csrPEM); ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		blocks = append(blocks, b)
	}
	switch {
	case len(blocks) == 0:
		return nil, errors.New("CSR is not PEM (no CERTIFICATE REQUEST block)")
	case len(blocks) > 1:
		return nil, fmt.Errorf("CSR has %d PEM blocks; want exactly one CERTIFICATE REQUEST", len(blocks))
	case blocks[0].Type != "CERTIFICATE REQUEST":
		return nil, fmt.Errorf("CSR PEM block is a %q; want CERTIFICATE REQUEST", blocks[0].Type)
	}
	csr, err := x509.ParseCertificateRequest(blocks[0].Bytes)
	if err != nil {
		return nil, fmt.Errorf("CSR does not parse: %v", err)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
		default:
			return nil, fmt.Errorf("CSR key is ECDSA on curve %s; want P-256, P-384 or P-521", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n < MinRSABits || n > MaxRSABits {
			return nil, fmt.Errorf("CSR key is RSA of %d bits; want %d to %d", n, MinRSABits, MaxRSABits)
		}
	case ed25519.PublicKey:
	default:
		return nil, fmt.Errorf("CSR key type %v (%T) is not supported; want ECDSA, RSA or Ed25519", csr.PublicKeyAlgorithm, csr.PublicKey)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("CSR signature does not verify: %v", err)
	}
	return csr, nil
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339) }
