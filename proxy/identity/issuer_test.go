package identity

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var (
	sleepID   = ForServiceAccount("cluster.local", "default", "sleep")
	httpbinID = ForServiceAccount("cluster.local", "default", "httpbin")
)

func TestMintAndVerify(t *testing.T) {
	ca := newTestCA(t, "cluster.local", 24*365*time.Hour)
	clock := newFakeClock()
	iss := ca.issuer(t, CAOptions{Clock: clock.Now})
	if iss.TrustDomain() != "cluster.local" {
		t.Errorf("default trust domain %q", iss.TrustDomain())
	}
	cert, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		t.Fatal("Leaf not set")
	}
	if !bytes.Equal(leaf.Raw, cert.Certificate[0]) {
		t.Error("Leaf is not Certificate[0]")
	}
	if len(cert.Certificate) != 2 || !bytes.Equal(cert.Certificate[1], ca.cert.Raw) {
		t.Errorf("chain has %d certificates, want leaf and CA", len(cert.Certificate))
	}
	if id, err := FromCertificate(leaf); err != nil || id != sleepID {
		t.Errorf("URI SAN: %v, %v; want %s", id, err, sleepID)
	}
	if len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
		t.Errorf("unexpected SANs: %v %v %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage %v, want digitalSignature only", leaf.KeyUsage)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Errorf("ExtKeyUsage %v", leaf.ExtKeyUsage)
	}
	if leaf.IsCA || !leaf.BasicConstraintsValid {
		t.Errorf("IsCA %v, BasicConstraintsValid %v", leaf.IsCA, leaf.BasicConstraintsValid)
	}
	now := clock.Now()
	if !leaf.NotBefore.Before(now.Add(-time.Minute)) || leaf.NotBefore.Before(now.Add(-10*time.Minute)) {
		t.Errorf("NotBefore %v is not a few minutes before %v", leaf.NotBefore, now)
	}
	if want := now.Add(DefaultLeafTTL).Truncate(time.Second); !leaf.NotAfter.Equal(want) {
		t.Errorf("NotAfter %v, want now+24h = %v", leaf.NotAfter, want)
	}
	key, ok := cert.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		t.Fatalf("private key %T, want ECDSA P-256", cert.PrivateKey)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		t.Error("private key does not match the leaf")
	}
	// The SAN extension is critical: the subject is empty.
	for _, ext := range leaf.Extensions {
		if ext.Id.String() == "2.5.29.17" && !ext.Critical {
			t.Error("subjectAltName not critical with an empty subject")
		}
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: iss.Roots(), KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("leaf does not verify for %v: %v", usage, err)
		}
	}
	// And not against another CA.
	evil := newTestCA(t, "cluster.local", time.Hour)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: evil.issuer(t, CAOptions{}).Roots()}); err == nil {
		t.Error("leaf verifies against an unrelated CA")
	}
}

func TestCertificateCached(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour*24*365)
	iss := ca.issuer(t, CAOptions{})
	a, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	b, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	if a != b {
		t.Error("second call minted a new certificate")
	}
	c, err := iss.Certificate(context.Background(), httpbinID)
	if err != nil {
		t.Fatal(err)
	}
	if c == a {
		t.Error("two identities share a certificate")
	}
	if id, _ := FromCertificate(c.Leaf); id != httpbinID {
		t.Errorf("certificate for %s carries %s", httpbinID, id)
	}
	if n := iss.mints.Load(); n != 2 {
		t.Errorf("%d mints, want 2", n)
	}
}

func TestCertificateRenewedAfterHalfLife(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour*24*365)
	clock := newFakeClock()
	iss := ca.issuer(t, CAOptions{Clock: clock.Now, LeafTTL: 10 * time.Hour})
	first, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(5*time.Hour - time.Second)
	if again, _ := iss.Certificate(context.Background(), sleepID); again != first {
		t.Fatal("renewed before half its lifetime")
	}
	clock.Advance(2 * time.Second)
	renewed, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	if renewed == first {
		t.Fatal("not renewed after half its lifetime")
	}
	if want := clock.Now().Add(10 * time.Hour).Truncate(time.Second); !renewed.Leaf.NotAfter.Equal(want) {
		t.Errorf("renewed NotAfter %v, want %v", renewed.Leaf.NotAfter, want)
	}
	if renewed.Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) == 0 {
		t.Error("renewed certificate has the same serial number")
	}
	if n := iss.mints.Load(); n != 2 {
		t.Errorf("%d mints, want 2", n)
	}
	// Long past expiry (a suspended machine): a fresh one again.
	clock.Advance(48 * time.Hour)
	late, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	if late == renewed || !clock.Now().Before(late.Leaf.NotAfter) {
		t.Error("expired certificate returned")
	}
}

func TestCertificateConcurrentCallersShareOneMint(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour*24*365)
	iss := ca.issuer(t, CAOptions{})
	// Slow mints, so that every caller arrives while the first one runs.
	iss.mintHook = func(ID) { time.Sleep(50 * time.Millisecond) }
	const n = 64
	certs := make([]*tls.Certificate, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			certs[i], errs[i] = iss.Certificate(context.Background(), sleepID)
		})
	}
	close(start)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if certs[i] != certs[0] {
			t.Fatalf("caller %d got another certificate", i)
		}
	}
	if got := iss.mints.Load(); got != 1 {
		t.Errorf("%d mints for %d concurrent callers, want 1", got, n)
	}
}

// A mint for one identity does not hold up another identity's.
func TestCertificateMintsOfDifferentIdentitiesOverlap(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour*24*365)
	iss := ca.issuer(t, CAOptions{})
	httpbinStarted := make(chan struct{})
	iss.mintHook = func(id ID) {
		if id == sleepID {
			select {
			case <-httpbinStarted:
			case <-time.After(5 * time.Second):
				t.Error("httpbin's mint did not start while sleep's was running")
			}
		} else {
			close(httpbinStarted)
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := iss.Certificate(context.Background(), sleepID); err != nil {
			t.Error(err)
		}
	})
	for iss.mints.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	if _, err := iss.Certificate(context.Background(), httpbinID); err != nil {
		t.Error(err)
	}
	wg.Wait()
}

func TestCertificateContext(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour*24*365)
	iss := ca.issuer(t, CAOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := iss.Certificate(ctx, sleepID); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), sleepID.String()) {
		t.Errorf("canceled context: %v", err)
	}
	// A caller waiting for someone else's mint gives up with its context; the mint goes on.
	release := make(chan struct{})
	var blocked atomic.Bool
	iss.mintHook = func(ID) {
		if blocked.CompareAndSwap(false, true) { // the first mint only
			<-release
		}
	}
	done := make(chan *tls.Certificate)
	go func() {
		c, err := iss.Certificate(context.Background(), sleepID)
		if err != nil {
			t.Error(err)
		}
		done <- c
	}()
	for iss.mints.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := iss.Certificate(ctx, sleepID); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("waiting caller with an expiring context: %v", err)
	}
	close(release)
	c := <-done
	if again, err := iss.Certificate(context.Background(), sleepID); err != nil || again != c {
		t.Errorf("after the mint: %v, same certificate %v", err, again == c)
	}
}

func TestNotAfterCappedByCA(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour)
	clock := newFakeClock()
	iss := ca.issuer(t, CAOptions{Clock: clock.Now})
	cert, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	if !cert.Leaf.NotAfter.Equal(ca.cert.NotAfter) {
		t.Errorf("leaf NotAfter %v, want the CA's %v", cert.Leaf.NotAfter, ca.cert.NotAfter)
	}
	if cert.Leaf.NotBefore.Before(ca.cert.NotBefore) {
		t.Errorf("leaf NotBefore %v before the CA's %v", cert.Leaf.NotBefore, ca.cert.NotBefore)
	}
	// Renewal follows the capped lifetime: half of it, not half of 24h.
	clock.Advance(31 * time.Minute)
	renewed, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	if renewed == cert {
		t.Error("capped certificate not renewed after half its (capped) lifetime")
	}
	// Once the CA has expired, nothing more is minted.
	clock.Advance(time.Hour)
	_, err = iss.Certificate(context.Background(), sleepID)
	if err == nil || !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), sleepID.String()) {
		t.Errorf("CA expired: %v", err)
	}
}

func TestCertificateRejectsIdentity(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour)
	iss := ca.issuer(t, CAOptions{})
	for _, tc := range []struct {
		id  ID
		why string
	}{
		{ForServiceAccount("other.domain", "default", "sleep"), "not in trust domain cluster.local"},
		{ForServiceAccount("cluster.local", "", "sleep"), "namespace is empty"},
		{ID{}, "trust domain is empty"},
	} {
		_, err := iss.Certificate(context.Background(), tc.id)
		if err == nil || !strings.Contains(err.Error(), tc.why) || !strings.Contains(err.Error(), tc.id.String()) {
			t.Errorf("Certificate(%s) = %v; want an error naming it and saying %q", tc.id, err, tc.why)
		}
	}
	if n := iss.mints.Load(); n != 0 {
		t.Errorf("%d mints", n)
	}
}

func TestNewCAIssuerOptions(t *testing.T) {
	ca := newTestCA(t, "example.org", time.Hour)
	iss := ca.issuer(t, CAOptions{TrustDomain: "example.org", LeafTTL: 10 * time.Minute})
	cert, err := iss.Certificate(context.Background(), ForServiceAccount("example.org", "ns1", "sa1"))
	if err != nil {
		t.Fatal(err)
	}
	if life := cert.Leaf.NotAfter.Sub(cert.Leaf.NotBefore); life > 16*time.Minute || life < 10*time.Minute {
		t.Errorf("lifetime %v with LeafTTL 10m", life)
	}
}

func TestNewCAIssuerRejects(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour)
	other := newTestCA(t, "cluster.local", time.Hour)
	leaf := ca.sign(t, leafTemplate(sleepID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour)))
	leafPEM := encodeCertificate(leaf.Certificate[0])
	leafKeyPEM, err := marshalPrivateKey(leaf.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	noSign := ca.sign(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "no certSign"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageDigitalSignature,
	})
	noSignKeyPEM, _ := marshalPrivateKey(noSign.PrivateKey.(*ecdsa.PrivateKey))
	for _, tc := range []struct {
		name            string
		certPEM, keyPEM []byte
		opts            CAOptions
		why             string
	}{
		{"no certificate", []byte("junk"), ca.keyPEM, CAOptions{}, "no PEM CERTIFICATE"},
		{"bad certificate", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2}}), ca.keyPEM, CAOptions{}, "CA certificate"},
		{"no key", ca.certPEM, ca.certPEM, CAOptions{}, "no PEM private key"},
		{"bad key", ca.certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte{1}}), CAOptions{}, "EC PRIVATE KEY"},
		{"key of another CA", ca.certPEM, other.keyPEM, CAOptions{}, "does not match"},
		{"not a CA", leafPEM, leafKeyPEM, CAOptions{}, "not a CA"},
		{"CA without certSign", encodeCertificate(noSign.Certificate[0]), noSignKeyPEM, CAOptions{}, "may not sign"},
		{"chain out of order", append(slices.Clone(ca.certPEM), other.certPEM...), ca.keyPEM, CAOptions{}, "not signed by the next one"},
		{"bad trust domain", ca.certPEM, ca.keyPEM, CAOptions{TrustDomain: "Cluster.Local"}, `"Cluster.Local"`},
		{"negative TTL", ca.certPEM, ca.keyPEM, CAOptions{LeafTTL: -time.Hour}, "negative"},
		{"expired CA", ca.certPEM, ca.keyPEM, CAOptions{Clock: func() time.Time { return time.Now().Add(2 * time.Hour) }}, "not now"},
	} {
		_, err := NewCAIssuer(tc.certPEM, tc.keyPEM, tc.opts)
		if err == nil || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("%s: %v; want an error saying %q", tc.name, err, tc.why)
		}
	}
}

// A CA file holding an intermediate then its root: leaves carry both, Roots is the root.
func TestIntermediateCA(t *testing.T) {
	root := newTestCA(t, "cluster.local", time.Hour)
	inter := root.sign(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "intermediate"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageCertSign,
	})
	interKeyPEM, err := marshalPrivateKey(inter.PrivateKey.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	certPEM := append(encodeCertificate(inter.Certificate[0]), root.certPEM...)
	iss, err := NewCAIssuer(certPEM, interKeyPEM, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := iss.Certificate(context.Background(), sleepID)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.Certificate) != 3 || !bytes.Equal(cert.Certificate[1], inter.Certificate[0]) || !bytes.Equal(cert.Certificate[2], root.cert.Raw) {
		t.Fatalf("chain of %d, want leaf, intermediate, root", len(cert.Certificate))
	}
	if _, err := verifyPeer(root.issuer(t, CAOptions{}).Roots(), parseChain(t, cert), x509.ExtKeyUsageClientAuth, "client"); err != nil {
		t.Error(err)
	}
	// The intermediate is not a root: the leaf alone does not verify.
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: iss.Roots()}); err == nil {
		t.Error("leaf verifies without its intermediate")
	}
}

func parseChain(t *testing.T, cert *tls.Certificate) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, der := range cert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

func TestGenerateRoot(t *testing.T) {
	certPEM, keyPEM, err := GenerateRoot("example.org", 48*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := ParseCertificates(certPEM)
	if err != nil || len(certs) != 1 {
		t.Fatalf("%d certificates, %v", len(certs), err)
	}
	c := certs[0]
	if !c.IsCA || !c.BasicConstraintsValid {
		t.Error("not a CA")
	}
	if c.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("KeyUsage %v", c.KeyUsage)
	}
	if c.Subject.CommonName != "nftmesh root CA example.org" || !slices.Equal(c.Subject.Organization, []string{"nftmesh"}) {
		t.Errorf("subject %v", c.Subject)
	}
	if len(c.URIs) != 1 || c.URIs[0].String() != "spiffe://example.org" {
		t.Errorf("URIs %v", c.URIs)
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		t.Errorf("not self-signed: %v", err)
	}
	if life := time.Until(c.NotAfter); life < 47*time.Hour || life > 48*time.Hour {
		t.Errorf("expires in %v, want 48h", life)
	}
	if pub, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("key %T, want ECDSA P-256", c.PublicKey)
	}
	if b, _ := pem.Decode(keyPEM); b == nil || b.Type != "PRIVATE KEY" {
		t.Error("key is not a PKCS#8 PEM block")
	}
	if _, err := NewCAIssuer(certPEM, keyPEM, CAOptions{TrustDomain: "example.org"}); err != nil {
		t.Errorf("NewCAIssuer on a generated root: %v", err)
	}
	if _, _, err := GenerateRoot("Bad_Domain", time.Hour); err == nil || !strings.Contains(err.Error(), `"Bad_Domain"`) {
		t.Errorf("bad trust domain: %v", err)
	}
	if _, _, err := GenerateRoot("cluster.local", 0); err == nil {
		t.Error("zero TTL accepted")
	}
	// Two roots are two keys.
	_, key2, _ := GenerateRoot("example.org", time.Hour)
	if bytes.Equal(key2, keyPEM) {
		t.Error("same key twice")
	}
}
