package identity

import (
	"context"
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
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// Issuer gives the proxy the certificates of the identities it acts for, and the roots
// that peers' certificates must chain to.
//
// Two implementations exist: CAIssuer signs leaves itself with a CA certificate and key
// (for tests and demos: the node then holds the mesh's signing key); RemoteIssuer sends a
// CSR for each identity to a CA service speaking istiod's IstioCertificateService
// (CreateCertificate) with the node's credentials and the impersonated identity, as
// ztunnel does, against istiod or nftmesh's own CA. The interface leaves room for a SPIFFE
// Workload API issuer, fetching X.509 SVIDs and trust bundles from a SPIRE agent's socket
// (FetchX509SVID / FetchX509Bundles); Roots then follows bundle updates.
//
// Implementations must be safe for concurrent use, cache certificates and renew them
// before they expire, so that calling Certificate on every handshake is cheap.
type Issuer interface {
	// Certificate returns a certificate for id with its chain (leaf first) and its
	// private key, Leaf set. The caller must not modify it.
	Certificate(ctx context.Context, id ID) (*tls.Certificate, error)
	// Roots returns the trust anchors of the mesh. The caller must not modify the pool.
	Roots() *x509.CertPool
	// TrustDomain returns the trust domain this issuer mints identities for.
	TrustDomain() string
}

// Holder is an Issuer that wants to know which identities are in use, so that it can
// fetch their certificates ahead of the first handshake and keep them renewed, and drop
// them when no pod uses them any more. The proxy calls Hold once for every pod it starts
// serving and Release once when it stops serving it; several pods may share an identity.
// RemoteIssuer is one; CAIssuer, which mints on demand, is not.
type Holder interface {
	Hold(ID)
	Release(ID)
}

var _ Issuer = (*CAIssuer)(nil)

// Defaults of CAOptions.
const (
	DefaultLeafTTL = 24 * time.Hour
	// clockSkew is how far in the past a new certificate's NotBefore is set, so that a
	// peer whose clock is a little behind accepts it.
	clockSkew = 5 * time.Minute
)

// CAOptions configure a CAIssuer; zero fields take the defaults.
type CAOptions struct {
	TrustDomain string           // default DefaultTrustDomain ("cluster.local")
	LeafTTL     time.Duration    // lifetime of a leaf certificate; default DefaultLeafTTL (24h)
	Clock       func() time.Time // default time.Now; for tests
}

// CAIssuer mints short-lived X.509 SVIDs with a CA certificate and key. It caches one
// certificate per identity and mints a new one once half of the current one's lifetime
// has passed; concurrent callers for the same identity share one mint.
type CAIssuer struct {
	ca    *x509.Certificate
	key   crypto.Signer
	chain [][]byte // the CA certificate and those above it, DER, as presented after the leaf
	roots *x509.CertPool
	td    string
	ttl   time.Duration
	now   func() time.Time

	mu       sync.Mutex
	cache    map[ID]*cacheEntry
	mints    atomic.Int64 // certificates minted, for tests
	mintHook func(ID)     // called as a mint starts, for tests
}

type cacheEntry struct {
	cert    *tls.Certificate
	renewAt time.Time
	minting *mintCall // non-nil while a mint for this identity runs
}

// mintCall is one mint that concurrent callers share; cert and err are set before done
// is closed and never change after.
type mintCall struct {
	done chan struct{}
	cert *tls.Certificate
	err  error
}

// NewCAIssuer returns an issuer signing with the CA in certPEM and keyPEM.
//
// certPEM holds the signing CA certificate first, optionally followed by the
// certificates above it up to the root; they are all sent after the leaf, and the last
// one is the trust anchor that Roots returns. keyPEM holds the signing CA's private key
// (PKCS#8, SEC 1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY"). The CA must be a CA
// allowed to sign certificates, valid now, and its key must match.
func NewCAIssuer(certPEM, keyPEM []byte, opts CAOptions) (*CAIssuer, error) {
	if opts.TrustDomain == "" {
		opts.TrustDomain = DefaultTrustDomain
	}
	if err := CheckTrustDomain(opts.TrustDomain); err != nil {
		return nil, err
	}
	if opts.LeafTTL == 0 {
		opts.LeafTTL = DefaultLeafTTL
	}
	if opts.LeafTTL < 0 {
		return nil, fmt.Errorf("identity: leaf TTL %v is negative", opts.LeafTTL)
	}
	if opts.Clock == nil {
		opts.Clock = time.Now
	}
	certs, err := ParseCertificates(certPEM)
	if err != nil {
		return nil, fmt.Errorf("identity: CA certificate: %w", err)
	}
	ca := certs[0]
	if !ca.BasicConstraintsValid || !ca.IsCA {
		return nil, fmt.Errorf("identity: CA certificate %q is not a CA (basic constraints)", ca.Subject)
	}
	if ca.KeyUsage != 0 && ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("identity: CA certificate %q may not sign certificates (key usage)", ca.Subject)
	}
	for i := 1; i < len(certs); i++ {
		if err := certs[i-1].CheckSignatureFrom(certs[i]); err != nil {
			return nil, fmt.Errorf("identity: CA certificate %q is not signed by the next one in the file, %q: %w", certs[i-1].Subject, certs[i].Subject, err)
		}
	}
	now := opts.Clock()
	for _, c := range certs {
		if now.Before(c.NotBefore) || now.After(c.NotAfter) {
			return nil, fmt.Errorf("identity: CA certificate %q is valid from %s to %s, not now (%s)",
				c.Subject, c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
	}
	key, err := ParsePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("identity: CA key: %w", err)
	}
	if !publicKeysEqual(key.Public(), ca.PublicKey) {
		return nil, fmt.Errorf("identity: CA key does not match CA certificate %q", ca.Subject)
	}
	roots := x509.NewCertPool()
	roots.AddCert(certs[len(certs)-1])
	chain := make([][]byte, len(certs))
	for i, c := range certs {
		chain[i] = c.Raw
	}
	return &CAIssuer{
		ca:    ca,
		key:   key,
		chain: chain,
		roots: roots,
		td:    opts.TrustDomain,
		ttl:   opts.LeafTTL,
		now:   opts.Clock,
		cache: map[ID]*cacheEntry{},
	}, nil
}

// TrustDomain returns the trust domain the issuer mints for.
func (c *CAIssuer) TrustDomain() string { return c.td }

// Roots returns the trust anchor: the last certificate of the CA file.
func (c *CAIssuer) Roots() *x509.CertPool { return c.roots }

// Certificate returns the cached certificate of id, minting one if there is none or the
// cached one is past half its lifetime. id must be valid and in the issuer's trust domain.
func (c *CAIssuer) Certificate(ctx context.Context, id ID) (*tls.Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	if id.TrustDomain != c.td {
		return nil, fmt.Errorf("identity: cannot issue a certificate for %s: not in trust domain %s", id, c.td)
	}
	for {
		c.mu.Lock()
		e := c.cache[id]
		if e == nil {
			e = &cacheEntry{}
			c.cache[id] = e
		}
		if e.cert != nil && c.now().Before(e.renewAt) {
			cert := e.cert
			c.mu.Unlock()
			return cert, nil
		}
		if call := e.minting; call != nil {
			c.mu.Unlock()
			select {
			case <-call.done:
			case <-ctx.Done():
				return nil, fmt.Errorf("identity: certificate for %s: %w", id, context.Cause(ctx))
			}
			if call.err != nil {
				return nil, call.err
			}
			if c.now().Before(call.cert.Leaf.NotAfter) {
				return call.cert, nil
			}
			continue // expired as soon as minted (the clock jumped): go round again
		}
		if err := ctx.Err(); err != nil {
			c.mu.Unlock()
			return nil, fmt.Errorf("identity: certificate for %s: %w", id, context.Cause(ctx))
		}
		call := &mintCall{done: make(chan struct{})}
		e.minting = call
		c.mu.Unlock()

		// The mint is not cut short by ctx: other callers may be waiting for it.
		cert, renewAt, err := c.mint(id)

		c.mu.Lock()
		e.minting = nil
		if err == nil {
			e.cert, e.renewAt = cert, renewAt
		}
		call.cert, call.err = cert, err
		close(call.done)
		c.mu.Unlock()
		return cert, err
	}
}

// mint signs a new leaf for id.
func (c *CAIssuer) mint(id ID) (*tls.Certificate, time.Time, error) {
	c.mints.Add(1)
	if c.mintHook != nil {
		c.mintHook(id)
	}
	now := c.now()
	notBefore := now.Add(-clockSkew)
	if notBefore.Before(c.ca.NotBefore) {
		notBefore = c.ca.NotBefore
	}
	notAfter := now.Add(c.ttl)
	if notAfter.After(c.ca.NotAfter) {
		notAfter = c.ca.NotAfter
	}
	if !now.Before(notAfter) {
		return nil, time.Time{}, fmt.Errorf("identity: cannot issue a certificate for %s: CA certificate %q expired at %s",
			id, c.ca.Subject, c.ca.NotAfter.UTC().Format(time.RFC3339))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("identity: key for %s: %w", id, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("identity: serial number for %s: %w", id, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// An empty subject, as Istio's SVIDs have: the identity is the URI SAN alone
		// (crypto/x509 then marks the SAN extension critical, as RFC 5280 requires).
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.ca, &key.PublicKey, c.key)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("identity: signing certificate for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("identity: parsing certificate for %s: %w", id, err)
	}
	chain := make([][]byte, 0, 1+len(c.chain))
	chain = append(chain, der)
	chain = append(chain, c.chain...)
	cert := &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}
	renewAt := now.Add(notAfter.Sub(now) / 2)
	return cert, renewAt, nil
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
}

// ParseCertificates returns every CERTIFICATE block of data (PEM), in order; there must
// be one.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return certs, nil
}

// ParsePrivateKey returns the first private key in data (PEM: PKCS#8, SEC 1 "EC PRIVATE
// KEY" or PKCS#1 "RSA PRIVATE KEY"; ECDSA, RSA or Ed25519).
func ParsePrivateKey(data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM private key block (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)")
		}
		var key any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", block.Type, err)
		}
		switch k := key.(type) {
		case *ecdsa.PrivateKey, *rsa.PrivateKey, ed25519.PrivateKey:
			return k.(crypto.Signer), nil
		default:
			return nil, fmt.Errorf("unsupported private key type %T", key)
		}
	}
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	x, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return false
	}
	return x.Equal(b)
}

// marshalPrivateKey returns key as a PKCS#8 PEM block.
func marshalPrivateKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func encodeCertificate(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
