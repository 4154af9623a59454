// Package identity gives the node proxy its mesh identities: SPIFFE IDs, the X.509 SVIDs
// that carry them, the issuers that mint those certificates, and the mutual TLS
// configurations of HBONE (TLS 1.3, ALPN h2, no SNI, client certificate required).
//
// A workload's identity is its Kubernetes service account:
// spiffe://<trust domain>/ns/<namespace>/sa/<service account>. The server side of an
// HBONE tunnel accepts any client whose chain verifies to the mesh roots and whose ID is
// in its trust domain (which namespaces or accounts may connect is authorization's
// business); the client side accepts only a server that proves one of the identities it
// expects for the destination.
package identity

import (
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// DefaultTrustDomain is the trust domain when none is configured, as in Istio.
const DefaultTrustDomain = "cluster.local"

const (
	scheme       = "spiffe://"
	maxIDLength  = 2048 // SPIFFE: URIs longer than this are invalid
	maxTDLength  = 255
	idFormatHint = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)

// ID is the SPIFFE ID of a service account: spiffe://TrustDomain/ns/Namespace/sa/ServiceAccount.
// It is comparable and can key a map.
type ID struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// ForServiceAccount returns the ID of service account sa in namespace ns of trust domain
// td. It does not check the parts; Validate does, and so does every issuer.
func ForServiceAccount(td, ns, sa string) ID {
	return ID{TrustDomain: td, Namespace: ns, ServiceAccount: sa}
}

// ParseID parses a SPIFFE ID of the form spiffe://<td>/ns/<ns>/sa/<sa>, strictly: the
// scheme in lower case, no user, port, query or fragment, no percent-encoding, exactly
// the two path pairs ns/<namespace> and sa/<service account>, and a valid trust domain.
// The error names the input.
func ParseID(s string) (ID, error) {
	id, err := parseID(s)
	if err != nil {
		return ID{}, fmt.Errorf("identity: invalid SPIFFE ID %q: %v (want %s)", s, err, idFormatHint)
	}
	return id, nil
}

func parseID(s string) (ID, error) {
	if len(s) > maxIDLength {
		return ID{}, fmt.Errorf("longer than %d bytes", maxIDLength)
	}
	rest, ok := strings.CutPrefix(s, scheme)
	if !ok {
		return ID{}, errors.New("scheme is not spiffe://")
	}
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		return ID{}, fmt.Errorf("has a query or fragment (%q)", rest[i:])
	}
	if strings.Contains(rest, "%") {
		return ID{}, errors.New("has percent-encoding")
	}
	td, path, _ := strings.Cut(rest, "/")
	switch {
	case strings.Contains(td, "@"):
		return ID{}, errors.New("has user info")
	case strings.Contains(td, ":"):
		return ID{}, errors.New("has a port")
	}
	if err := checkTrustDomain(td); err != nil {
		return ID{}, err
	}
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return ID{}, fmt.Errorf("path %q is not /ns/<namespace>/sa/<service-account>", "/"+path)
	}
	id := ID{TrustDomain: td, Namespace: parts[1], ServiceAccount: parts[3]}
	if err := id.check(); err != nil {
		return ID{}, err
	}
	return id, nil
}

// String returns the ID as a URI: spiffe://td/ns/x/sa/y.
func (id ID) String() string {
	return scheme + id.Principal()
}

// Principal returns the ID without its scheme, td/ns/x/sa/y: the form authorization
// policies compare principals in.
func (id ID) Principal() string {
	return id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// URL returns the ID as a URL, for the URI SAN of a certificate.
func (id ID) URL() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount}
}

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id == ID{} }

// Validate checks that the trust domain, the namespace and the service account are all
// well formed; the error names the ID.
func (id ID) Validate() error {
	if err := id.check(); err != nil {
		return fmt.Errorf("identity: invalid identity %s: %v", id, err)
	}
	return nil
}

func (id ID) check() error {
	if err := checkTrustDomain(id.TrustDomain); err != nil {
		return err
	}
	if err := checkSegment("namespace", id.Namespace); err != nil {
		return err
	}
	if err := checkSegment("service account", id.ServiceAccount); err != nil {
		return err
	}
	if n := len(id.String()); n > maxIDLength {
		return fmt.Errorf("longer than %d bytes", maxIDLength)
	}
	return nil
}

// CheckTrustDomain returns an error naming td unless it is a valid trust domain name: lower-case letters,
// digits, '.', '-' and '_' (SPIFFE's set), dot-separated labels that are not empty, at
// most 255 bytes.
func CheckTrustDomain(td string) error {
	if err := checkTrustDomain(td); err != nil {
		return fmt.Errorf("identity: invalid %v", err)
	}
	return nil
}

func checkTrustDomain(td string) error {
	if td == "" {
		return errors.New("trust domain is empty")
	}
	if len(td) > maxTDLength {
		return fmt.Errorf("trust domain %q is longer than %d bytes", td, maxTDLength)
	}
	for _, r := range td {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
			return fmt.Errorf("trust domain %q has %q; only lower-case letters, digits, '.', '-' and '_' are allowed", td, r)
		}
	}
	for label := range strings.SplitSeq(td, ".") {
		if label == "" {
			return fmt.Errorf("trust domain %q has an empty label", td)
		}
	}
	return nil
}

func checkSegment(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if s == "." || s == ".." {
		return fmt.Errorf("%s %q is a relative path segment", what, s)
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
			return fmt.Errorf("%s %q has %q; only letters, digits, '.', '-' and '_' are allowed", what, s, r)
		}
	}
	return nil
}

// FromCertificate returns the SPIFFE ID of an X.509 SVID: its one and only URI SAN,
// which must be a valid ID. It checks nothing else (not the chain, not the dates).
func FromCertificate(cert *x509.Certificate) (ID, error) {
	switch len(cert.URIs) {
	case 0:
		return ID{}, fmt.Errorf("identity: certificate %q has no URI SAN (no SPIFFE ID)", cert.Subject)
	case 1:
	default:
		return ID{}, fmt.Errorf("identity: certificate %q has %d URI SANs; an X.509 SVID has exactly one", cert.Subject, len(cert.URIs))
	}
	if raw, ok := rawURISANs(cert); ok && len(raw) == 1 {
		// As encoded: crypto/x509 normalises what it parses (SPIFFE:// becomes spiffe://,
		// an empty fragment is lost), which ParseID would reject.
		return ParseID(raw[0])
	}
	return ParseID(cert.URIs[0].String())
}

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// rawURISANs returns the certificate's URI SANs as encoded (RFC 5280 GeneralName [6]); ok
// is false when the certificate carries no (readable) SAN extension, as one built in
// memory rather than parsed.
func rawURISANs(cert *x509.Certificate) (uris []string, ok bool) {
	for _, ext := range cert.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		var seq asn1.RawValue
		if rest, err := asn1.Unmarshal(ext.Value, &seq); err != nil || len(rest) > 0 || !seq.IsCompound {
			return nil, false
		}
		for b := seq.Bytes; len(b) > 0; {
			var name asn1.RawValue
			var err error
			if b, err = asn1.Unmarshal(b, &name); err != nil {
				return nil, false
			}
			if name.Class == asn1.ClassContextSpecific && name.Tag == 6 {
				uris = append(uris, string(name.Bytes))
			}
		}
		return uris, true
	}
	return nil, false
}
