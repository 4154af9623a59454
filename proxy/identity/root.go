package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net/url"
	"time"
)

// GenerateRoot returns a new self-signed root CA for trustDomain, valid for ttl, as PEM:
// an ECDSA P-256 key (PKCS#8) and a certificate with subject O=nftmesh,
// CN=nftmesh root CA <trustDomain>, the URI SAN spiffe://<trustDomain>, and key usage
// certSign and cRLSign. It is meant for demos and tests; a production mesh brings its own.
func GenerateRoot(trustDomain string, ttl time.Duration) (certPEM, keyPEM []byte, err error) {
	if err := CheckTrustDomain(trustDomain); err != nil {
		return nil, nil, err
	}
	if ttl <= 0 {
		return nil, nil, fmt.Errorf("identity: root CA lifetime %v is not positive", ttl)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: root CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, fmt.Errorf("identity: root CA serial number: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"nftmesh"}, CommonName: "nftmesh root CA " + trustDomain},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: trustDomain}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: signing root CA for %s: %w", trustDomain, err)
	}
	keyPEM, err = marshalPrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: encoding root CA key: %w", err)
	}
	return encodeCertificate(der), keyPEM, nil
}
