package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

var testID = identity.ForServiceAccount("cluster.local", "default", "sleep")

// testCA is a CA certificate and key made for a test.
type testCA struct {
	cert    *x509.Certificate
	key     crypto.Signer
	certPEM []byte
	keyPEM  []byte
}

// newTestCA makes a CA valid from notBefore to notAfter, signed by parent (nil:
// self-signed).
func newTestCA(t testing.TB, cn string, notBefore, notAfter time.Time, parent *testCA) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	signCert, signKey := tmpl, crypto.Signer(key)
	if parent != nil {
		signCert, signKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signCert, &key.PublicKey, signKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8})}
}

// rootSigner is a Signer for a fresh self-signed root from identity.GenerateRoot.
func rootSigner(t testing.TB) *Signer {
	t.Helper()
	certPEM, keyPEM, err := identity.GenerateRoot("cluster.local", 365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewSigner(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newCSR returns a PEM CSR for key asking for the given URI SAN, a DNS SAN and a CN
// (all of which the CA must ignore).
func newCSR(t testing.TB, key crypto.Signer, uri string) string {
	t.Helper()
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: "evil", Organization: []string{"evil corp"}}, DNSNames: []string{"evil.example"}}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func ecKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// parseChain parses each element of chain, which must be exactly one CERTIFICATE block.
func parseChain(t testing.TB, chain []string) []*x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for i, p := range chain {
		b, rest := pem.Decode([]byte(p))
		if b == nil || b.Type != "CERTIFICATE" || strings.TrimSpace(string(rest)) != "" {
			t.Fatalf("chain element %d is not exactly one PEM certificate: %q", i, p)
		}
		if !strings.HasSuffix(p, "\n") {
			t.Errorf("chain element %d does not end in a newline", i)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	return certs
}

var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

func TestSignSANIsRequestedID(t *testing.T) {
	s := rootSigner(t)
	key := ecKey(t)
	chain, err := s.Sign(newCSR(t, key, "spiffe://cluster.local/ns/kube-system/sa/admin"), testID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 {
		t.Fatalf("chain has %d elements, want leaf and root", len(chain))
	}
	certs := parseChain(t, chain)
	leaf := certs[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != testID.String() {
		t.Errorf("URI SANs %v, want exactly %s", leaf.URIs, testID)
	}
	if got, err := identity.FromCertificate(leaf); err != nil || got != testID {
		t.Errorf("FromCertificate: %v, %v; want %v", got, err, testID)
	}
	if len(leaf.DNSNames) != 0 || len(leaf.EmailAddresses) != 0 || len(leaf.IPAddresses) != 0 {
		t.Errorf("other SANs copied from the CSR: %v %v %v", leaf.DNSNames, leaf.EmailAddresses, leaf.IPAddresses)
	}
	if len(leaf.Subject.Names) != 0 {
		t.Errorf("subject %q copied from the CSR; want empty", leaf.Subject)
	}
	for _, e := range leaf.Extensions {
		if e.Id.Equal(oidSAN) && !e.Critical {
			t.Error("SAN extension not critical with an empty subject")
		}
	}
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(&key.PublicKey) {
		t.Error("leaf key is not the CSR's")
	}
	if leaf.IsCA || !leaf.BasicConstraintsValid {
		t.Errorf("IsCA %v, basic constraints %v; want a non-CA", leaf.IsCA, leaf.BasicConstraintsValid)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("key usage %b, want digitalSignature alone for an ECDSA key", leaf.KeyUsage)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Errorf("extended key usage %v, want serverAuth and clientAuth", leaf.ExtKeyUsage)
	}
	if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 128 {
		t.Errorf("serial %v is not a positive 128-bit number", leaf.SerialNumber)
	}
	chain2, err := s.Sign(newCSR(t, key, ""), testID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if parseChain(t, chain2)[0].SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Error("two certificates with the same serial")
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.Roots(), KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("leaf does not verify to the root for %v: %v", usage, err)
		}
	}
	if chain[1] != string(s.RootPEM()) {
		t.Error("the last element is not the root")
	}
}

func TestSignKeyTypes(t *testing.T) {
	s := rootSigner(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := s.Sign(newCSR(t, rsaKey, ""), testID, time.Hour)
	if err != nil {
		t.Fatalf("RSA 2048: %v", err)
	}
	if ku := parseChain(t, chain)[0].KeyUsage; ku != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
		t.Errorf("RSA key usage %b, want digitalSignature and keyEncipherment", ku)
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if _, err := s.Sign(newCSR(t, p384, ""), testID, time.Hour); err != nil {
		t.Errorf("P-384: %v", err)
	}
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	chain, err = s.Sign(newCSR(t, edKey, ""), testID, time.Hour)
	if err != nil {
		t.Fatalf("Ed25519: %v", err)
	}
	if ku := parseChain(t, chain)[0].KeyUsage; ku != x509.KeyUsageDigitalSignature {
		t.Errorf("Ed25519 key usage %b, want digitalSignature", ku)
	}
}

func TestSignRefusesBadCSR(t *testing.T) {
	s := rootSigner(t)
	good := newCSR(t, ecKey(t), "")
	block, _ := pem.Decode([]byte(good))

	// The signature is the DER's last bytes: flip one.
	tampered := slices.Clone(block.Bytes)
	tampered[len(tampered)-1] ^= 1
	// Or keep the signature and change the subject: a CSR made for another key.
	other := newCSR(t, ecKey(t), "")
	csr1, _ := x509.ParseCertificateRequest(block.Bytes)
	ob, _ := pem.Decode([]byte(other))
	csr2, _ := x509.ParseCertificateRequest(ob.Bytes)
	// csr1's signed content with csr2's signature.
	swapped := swapSignature(t, csr1, csr2)

	rsaSmall, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	encode := func(typ string, der []byte) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
	}

	for _, tc := range []struct{ name, csr, want string }{
		{"empty", "", "not PEM"},
		{"not PEM", "hello", "not PEM"},
		{"tampered signature", encode("CERTIFICATE REQUEST", tampered), "signature does not verify"},
		{"another CSR's signature", encode("CERTIFICATE REQUEST", swapped), "signature does not verify"},
		{"two blocks", good + good, "2 PEM blocks"},
		{"a certificate", string(s.RootPEM()), `"CERTIFICATE"; want CERTIFICATE REQUEST`},
		{"garbage DER", encode("CERTIFICATE REQUEST", []byte("garbage")), "does not parse"},
		{"RSA 1024", newCSR(t, rsaSmall, ""), "RSA of 1024 bits"},
		{"P-224", newCSR(t, p224, ""), "curve P-224"},
		{"huge", strings.Repeat("A", MaxCSRBytes+1), "larger than"},
	} {
		chain, err := s.Sign(tc.csr, testID, time.Hour)
		if err == nil {
			t.Errorf("%s: signed: %d certificates", tc.name, len(chain))
			continue
		}
		if RefusalReason(err) != ReasonBadCSR {
			t.Errorf("%s: %v is not a %s refusal", tc.name, err, ReasonBadCSR)
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %q lacks %q", tc.name, err, tc.want)
		}
	}
}

// swapSignature returns a's CSR with b's signature.
func swapSignature(t testing.TB, a, b *x509.CertificateRequest) []byte {
	t.Helper()
	var outer struct {
		Raw       asn1.RawContent
		Info      asn1.RawValue
		Algorithm pkix.AlgorithmIdentifier
		Signature asn1.BitString
	}
	if _, err := asn1.Unmarshal(a.Raw, &outer); err != nil {
		t.Fatal(err)
	}
	der, err := asn1.Marshal(struct {
		Info      asn1.RawValue
		Algorithm pkix.AlgorithmIdentifier
		Signature asn1.BitString
	}{asn1.RawValue{FullBytes: a.RawTBSCertificateRequest}, outer.Algorithm, asn1.BitString{Bytes: b.Signature, BitLength: 8 * len(b.Signature)}})
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestSignValidity(t *testing.T) {
	now := time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	ca := newTestCA(t, "root", now.Add(-time.Hour), now.Add(48*time.Hour), nil)
	s, err := newSigner(ca.certPEM, ca.keyPEM, clock)
	if err != nil {
		t.Fatal(err)
	}
	csr := newCSR(t, ecKey(t), "")
	leafOf := func(validity time.Duration) *x509.Certificate {
		t.Helper()
		chain, err := s.Sign(csr, testID, validity)
		if err != nil {
			t.Fatal(err)
		}
		return parseChain(t, chain)[0]
	}
	leaf := leafOf(6 * time.Hour)
	if want := now.Add(-Backdate); !leaf.NotBefore.Equal(want) {
		t.Errorf("NotBefore %v, want %v (now - %v)", leaf.NotBefore, want, Backdate)
	}
	if want := now.Add(6 * time.Hour); !leaf.NotAfter.Equal(want) {
		t.Errorf("NotAfter %v, want %v", leaf.NotAfter, want)
	}
	// Past the CA's end: clamped to it.
	if leaf := leafOf(72 * time.Hour); !leaf.NotAfter.Equal(ca.cert.NotAfter) {
		t.Errorf("72h: NotAfter %v, want the CA's %v", leaf.NotAfter, ca.cert.NotAfter)
	}
	if _, err := s.Sign(csr, testID, 0); err == nil {
		t.Error("validity 0 signed")
	}

	// A CA that began a minute ago: NotBefore is not before it.
	young := newTestCA(t, "young", now.Add(-time.Minute), now.Add(48*time.Hour), nil)
	if s, err = newSigner(young.certPEM, young.keyPEM, clock); err != nil {
		t.Fatal(err)
	}
	if leaf := leafOf(time.Hour); !leaf.NotBefore.Equal(young.cert.NotBefore) {
		t.Errorf("young CA: NotBefore %v, want the CA's %v", leaf.NotBefore, young.cert.NotBefore)
	}

	// An intermediate that outlives its root: the root's end caps the leaf.
	root := newTestCA(t, "root", now.Add(-time.Hour), now.Add(10*time.Hour), nil)
	inter := newTestCA(t, "intermediate", now.Add(-time.Hour), now.Add(40*time.Hour), root)
	if s, err = newSigner(append(inter.certPEM, root.certPEM...), inter.keyPEM, clock); err != nil {
		t.Fatal(err)
	}
	if leaf := leafOf(24 * time.Hour); !leaf.NotAfter.Equal(root.cert.NotAfter) {
		t.Errorf("intermediate outliving its root: NotAfter %v, want the root's %v", leaf.NotAfter, root.cert.NotAfter)
	}

	// Once the CA has expired: an error, not a certificate.
	now = now.Add(11 * time.Hour)
	if _, err := s.Sign(csr, testID, time.Hour); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired CA: %v", err)
	} else if RefusalReason(err) != "" {
		t.Errorf("expired CA is a refusal of the request (%v); want the CA's failure", err)
	}
}

func TestSignIntermediate(t *testing.T) {
	now := time.Now()
	root := newTestCA(t, "root", now.Add(-time.Hour), now.Add(100*time.Hour), nil)
	inter := newTestCA(t, "intermediate", now.Add(-time.Hour), now.Add(50*time.Hour), root)
	s, err := NewSigner(append(slices.Clone(inter.certPEM), root.certPEM...), inter.keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := s.Sign(newCSR(t, ecKey(t), ""), testID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 {
		t.Fatalf("chain has %d elements, want leaf, intermediate, root", len(chain))
	}
	certs := parseChain(t, chain)
	if !certs[1].Equal(inter.cert) || !certs[2].Equal(root.cert) {
		t.Errorf("chain is %q, %q, %q; want leaf, intermediate, root", certs[0].Subject, certs[1].Subject, certs[2].Subject)
	}
	if err := certs[0].CheckSignatureFrom(inter.cert); err != nil {
		t.Errorf("leaf not signed by the intermediate: %v", err)
	}
	// As a peer verifies it: the root (the last element) as the anchor, the rest as
	// intermediates.
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(certs[len(certs)-1])
	for _, c := range certs[1 : len(certs)-1] {
		inters.AddCert(c)
	}
	paths, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatal(err)
	}
	if len(paths[0]) != 3 || !paths[0][2].Equal(root.cert) {
		t.Errorf("verified path %v does not end at the root", paths[0])
	}
	// Without the intermediate, the leaf does not verify: the chain carries it.
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots}); err == nil {
		t.Error("leaf verifies to the root without the intermediate")
	}
	if string(s.RootPEM()) != string(root.certPEM) {
		t.Error("RootPEM is not the root")
	}
}

func TestNewSignerRejects(t *testing.T) {
	now := time.Now()
	root := newTestCA(t, "root", now.Add(-time.Hour), now.Add(100*time.Hour), nil)
	other := newTestCA(t, "other", now.Add(-time.Hour), now.Add(100*time.Hour), nil)
	inter := newTestCA(t, "intermediate", now.Add(-time.Hour), now.Add(50*time.Hour), root)
	expired := newTestCA(t, "expired", now.Add(-2*time.Hour), now.Add(-time.Hour), nil)
	future := newTestCA(t, "future", now.Add(time.Hour), now.Add(2*time.Hour), nil)

	leafKey := ecKey(t)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "leaf"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), BasicConstraintsValid: true}, root.cert, &leafKey.PublicKey, root.key)
	if err != nil {
		t.Fatal(err)
	}
	leafPKCS8, _ := x509.MarshalPKCS8PrivateKey(leafKey)

	cat := func(bs ...[]byte) []byte { return slices.Concat(bs...) }
	for _, tc := range []struct {
		name      string
		cert, key []byte
		want      string
	}{
		{"no certificate", nil, root.keyPEM, "no PEM CERTIFICATE block"},
		{"no key", root.certPEM, nil, "no PEM private key"},
		{"key of another CA", root.certPEM, other.keyPEM, "does not match"},
		{"not a CA", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: leafPKCS8}), "not a CA"},
		{"root first", cat(root.certPEM, inter.certPEM), root.keyPEM, "not signed by the next one"},
		{"wrong root", cat(inter.certPEM, other.certPEM), inter.keyPEM, "not signed by the next one"},
		{"expired", expired.certPEM, expired.keyPEM, "not now"},
		{"not yet valid", future.certPEM, future.keyPEM, "not now"},
	} {
		if _, err := NewSigner(tc.cert, tc.key); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	// The key formats identity.NewCAIssuer takes: SEC 1 and PKCS#1 too.
	ecDER, _ := x509.MarshalECPrivateKey(root.key.(*ecdsa.PrivateKey))
	if _, err := NewSigner(root.certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecDER})); err != nil {
		t.Errorf("SEC 1 key: %v", err)
	}
}

func TestServingCert(t *testing.T) {
	now := time.Now()
	root := newTestCA(t, "root", now.Add(-time.Hour), now.Add(100*time.Hour), nil)
	inter := newTestCA(t, "intermediate", now.Add(-time.Hour), now.Add(50*time.Hour), root)
	s, err := NewSigner(append(slices.Clone(inter.certPEM), root.certPEM...), inter.keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := s.ServingCert([]string{"nftmesh-ca.nftmesh-system.svc", "127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.Certificate) != 2 {
		t.Fatalf("%d certificates sent; want the leaf and the intermediate (not the root)", len(cert.Certificate))
	}
	leaf := cert.Leaf
	if !slices.Equal(leaf.DNSNames, []string{"nftmesh-ca.nftmesh-system.svc"}) || len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) {
		t.Errorf("SANs %v %v", leaf.DNSNames, leaf.IPAddresses)
	}
	if len(leaf.URIs) != 0 {
		t.Errorf("serving certificate has a URI SAN %v: it would pass for a workload identity", leaf.URIs)
	}
	inters := x509.NewCertPool()
	inters.AddCert(inter.cert)
	for _, name := range []string{"nftmesh-ca.nftmesh-system.svc", "127.0.0.1"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: s.Roots(), Intermediates: inters}); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.Roots(), Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("serving certificate verifies for client auth")
	}
	if d := leaf.NotAfter.Sub(now); d < 59*time.Minute || d > 61*time.Minute {
		t.Errorf("valid for %v, want 1h", d)
	}
	if _, err := s.ServingCert(nil, time.Hour); err == nil {
		t.Error("no names: no error")
	}
}
