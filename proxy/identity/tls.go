package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// ALPN is the application protocol HBONE negotiates.
const ALPN = "h2"

// ServerTLSConfig returns the TLS configuration of an HBONE server acting as local:
// TLS 1.3 only, ALPN h2 (required), local's certificate from issuer on every handshake
// (so renewals apply), and a client certificate required, whose chain must verify to
// issuer.Roots() for client authentication and whose SPIFFE ID must be in local's trust
// domain. Which namespaces or service accounts may connect is left to authorization:
// read the client's ID with PeerID.
func ServerTLSConfig(issuer Issuer, local ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return issuer.Certificate(hello.Context(), local)
		},
		// The chain is verified below, against the issuer's roots at the time of the
		// handshake; crypto/tls only insists that there is one.
		ClientAuth: tls.RequireAnyClientCert,
		// VerifyConnection, not VerifyPeerCertificate: it also runs on resumed sessions.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := checkALPN(cs); err != nil {
				return err
			}
			id, err := verifyPeer(issuer.Roots(), cs.PeerCertificates, x509.ExtKeyUsageClientAuth, "client")
			if err != nil {
				return err
			}
			if id.TrustDomain != local.TrustDomain {
				return fmt.Errorf("identity: client %s is not in trust domain %s", id, local.TrustDomain)
			}
			return nil
		},
	}
}

// ClientTLSConfig returns the TLS configuration of an HBONE client acting as local
// towards a server that must prove one of the expected identities: TLS 1.3 only, ALPN h2
// (required), local's certificate from issuer when the server asks for it, no SNI and no
// host name check (HBONE dials a pod IP); instead the server's chain must verify to
// issuer.Roots() for server authentication and its SPIFFE ID must be one of expected.
// With no expected identity every server is refused.
func ClientTLSConfig(issuer Issuer, local ID, expected []ID) *tls.Config {
	expected = slices.Clone(expected)
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return issuer.Certificate(cri.Context(), local)
		},
		// crypto/tls's own verification checks a host name, which HBONE has not; the
		// chain and the identity are verified below instead.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := checkALPN(cs); err != nil {
				return err
			}
			id, err := verifyPeer(issuer.Roots(), cs.PeerCertificates, x509.ExtKeyUsageServerAuth, "server")
			if err != nil {
				return err
			}
			if !slices.Contains(expected, id) {
				return fmt.Errorf("identity: server %s is not the expected %s", id, describeIDs(expected))
			}
			return nil
		},
	}
}

func checkALPN(cs tls.ConnectionState) error {
	if cs.NegotiatedProtocol != ALPN {
		return fmt.Errorf("identity: ALPN %q negotiated; HBONE requires %q", cs.NegotiatedProtocol, ALPN)
	}
	return nil
}

func describeIDs(ids []ID) string {
	switch len(ids) {
	case 0:
		return "identity (none is expected)"
	case 1:
		return ids[0].String()
	}
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = id.String()
	}
	return "one of " + strings.Join(s, ", ")
}

// verifyPeer verifies a peer's chain (leaf first) to roots for usage, now, and returns
// the leaf's SPIFFE ID. The leaf must be an X.509 SVID: one URI SAN, not a CA.
func verifyPeer(roots *x509.CertPool, certs []*x509.Certificate, usage x509.ExtKeyUsage, peer string) (ID, error) {
	if len(certs) == 0 {
		return ID{}, fmt.Errorf("identity: the %s presented no certificate", peer)
	}
	leaf := certs[0]
	id, err := FromCertificate(leaf)
	if err != nil {
		return ID{}, fmt.Errorf("identity: %s certificate: %w", peer, err)
	}
	if leaf.IsCA || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return ID{}, fmt.Errorf("identity: %s certificate for %s is a CA certificate, not an X.509 SVID", peer, id)
	}
	if roots == nil {
		return ID{}, fmt.Errorf("identity: %s certificate for %s: no trust roots", peer, id)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   time.Now(),
		KeyUsages:     []x509.ExtKeyUsage{usage},
	}); err != nil {
		return ID{}, fmt.Errorf("identity: %s certificate for %s does not verify: %w", peer, id, err)
	}
	return id, nil
}

// PeerID returns the SPIFFE ID of the peer of a finished handshake made with
// ServerTLSConfig or ClientTLSConfig, which verified the peer's chain; PeerID itself
// only reads the leaf's URI SAN.
func PeerID(state tls.ConnectionState) (ID, error) {
	if !state.HandshakeComplete {
		return ID{}, errors.New("identity: TLS handshake not complete")
	}
	if len(state.PeerCertificates) == 0 {
		return ID{}, errors.New("identity: peer presented no certificate")
	}
	return FromCertificate(state.PeerCertificates[0])
}
