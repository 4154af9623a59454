package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestParseIDGood(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ID
	}{
		{"spiffe://cluster.local/ns/default/sa/sleep", ID{"cluster.local", "default", "sleep"}},
		{"spiffe://td/ns/x/sa/y", ID{"td", "x", "y"}},
		{"spiffe://example.org/ns/foo-bar/sa/svc.acct_1", ID{"example.org", "foo-bar", "svc.acct_1"}},
		{"spiffe://a_b-c.d9/ns/N/sa/Sa", ID{"a_b-c.d9", "N", "Sa"}},
	} {
		got, err := ParseID(tc.in)
		if err != nil {
			t.Errorf("ParseID(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseID(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if s := got.String(); s != tc.in {
			t.Errorf("ParseID(%q).String() = %q", tc.in, s)
		}
		if p, want := got.Principal(), strings.TrimPrefix(tc.in, "spiffe://"); p != want {
			t.Errorf("ParseID(%q).Principal() = %q, want %q", tc.in, p, want)
		}
		if u := got.URL().String(); u != tc.in {
			t.Errorf("ParseID(%q).URL() = %q", tc.in, u)
		}
		if err := got.Validate(); err != nil {
			t.Errorf("ParseID(%q).Validate(): %v", tc.in, err)
		}
		if f := ForServiceAccount(tc.want.TrustDomain, tc.want.Namespace, tc.want.ServiceAccount); f != got {
			t.Errorf("ForServiceAccount = %+v, want %+v", f, got)
		}
	}
}

func TestParseIDBad(t *testing.T) {
	for _, tc := range []struct{ in, why string }{
		{"", "scheme"},
		{"cluster.local/ns/a/sa/b", "scheme"},
		{"SPIFFE://cluster.local/ns/a/sa/b", "scheme"},
		{"https://cluster.local/ns/a/sa/b", "scheme"},
		{"spiffe:/cluster.local/ns/a/sa/b", "scheme"},
		{"spiffe://cluster.local:8443/ns/a/sa/b", "port"},
		{"spiffe://user@cluster.local/ns/a/sa/b", "user info"},
		{"spiffe://cluster.local/ns/a/sa/b?x=1", "query"},
		{"spiffe://cluster.local/ns/a/sa/b#frag", "fragment"},
		{"spiffe://cluster.local/ns/a%2Fb/sa/c", "percent"},
		{"spiffe://Cluster.Local/ns/a/sa/b", "lower-case"},
		{"spiffe://clus ter/ns/a/sa/b", "lower-case"},
		{"spiffe:///ns/a/sa/b", "trust domain is empty"},
		{"spiffe://cluster..local/ns/a/sa/b", "empty label"},
		{"spiffe://.cluster.local/ns/a/sa/b", "empty label"},
		{"spiffe://cluster.local.", "empty label"},
		{"spiffe://cluster.local", "path"},
		{"spiffe://cluster.local/", "path"},
		{"spiffe://cluster.local/ns/a", "path"},
		{"spiffe://cluster.local/ns/a/sa/b/", "path"},
		{"spiffe://cluster.local/ns/a/sa/b/c", "path"},
		{"spiffe://cluster.local//ns/a/sa/b", "path"},
		{"spiffe://cluster.local/sa/b/ns/a", "path"},
		{"spiffe://cluster.local/namespace/a/sa/b", "path"},
		{"spiffe://cluster.local/ns/a/serviceaccount/b", "path"},
		{"spiffe://cluster.local/ns//sa/b", "namespace is empty"},
		{"spiffe://cluster.local/ns/a/sa/", "service account is empty"},
		{"spiffe://cluster.local/ns/../sa/b", "relative"},
		{"spiffe://cluster.local/ns/a/sa/.", "relative"},
		{"spiffe://cluster.local/ns/a b/sa/c", "only letters"},
		{"spiffe://cluster.local/ns/a/sa/b*", "only letters"},
		{"spiffe://cluster.local/ns/a/sa/" + strings.Repeat("b", 2048), "longer than"},
		{"spiffe://" + strings.Repeat("a", 256) + "/ns/a/sa/b", "longer than 255"},
	} {
		id, err := ParseID(tc.in)
		if err == nil {
			t.Errorf("ParseID(%q) = %+v, want an error (%s)", tc.in, id, tc.why)
			continue
		}
		msg := err.Error()
		if len(tc.in) < 300 && !strings.Contains(msg, `"`+tc.in+`"`) {
			t.Errorf("ParseID(%q): error does not name the input: %v", tc.in, err)
		}
		if !strings.Contains(msg, tc.why) {
			t.Errorf("ParseID(%q): error %q does not say %q", tc.in, msg, tc.why)
		}
		if !id.IsZero() {
			t.Errorf("ParseID(%q) returned %+v with its error", tc.in, id)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		id  ID
		why string
	}{
		{ID{}, "trust domain is empty"},
		{ForServiceAccount("cluster.local", "", "sleep"), "namespace is empty"},
		{ForServiceAccount("cluster.local", "default", ""), "service account is empty"},
		{ForServiceAccount("Cluster.local", "default", "sleep"), "lower-case"},
		{ForServiceAccount("cluster.local", "a/b", "sleep"), "namespace \"a/b\""},
		{ForServiceAccount("cluster.local", "default", "x/sa/y"), "service account \"x/sa/y\""},
	} {
		err := tc.id.Validate()
		if err == nil {
			t.Errorf("%+v.Validate() = nil, want an error (%s)", tc.id, tc.why)
			continue
		}
		if !strings.Contains(err.Error(), tc.why) || !strings.Contains(err.Error(), tc.id.String()) {
			t.Errorf("%+v.Validate() = %q: want it to name %s and say %q", tc.id, err, tc.id, tc.why)
		}
	}
	if err := CheckTrustDomain("evil.Local"); err == nil || !strings.Contains(err.Error(), `"evil.Local"`) {
		t.Errorf("CheckTrustDomain(evil.Local) = %v", err)
	}
}

func TestFromCertificate(t *testing.T) {
	u := func(s string) *url.URL {
		p, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := "spiffe://cluster.local/ns/default/sa/sleep"
	if id, err := FromCertificate(&x509.Certificate{URIs: []*url.URL{u(good)}}); err != nil || id.String() != good {
		t.Errorf("FromCertificate(one URI) = %v, %v", id, err)
	}
	for _, tc := range []struct {
		uris []*url.URL
		why  string
	}{
		{nil, "no URI SAN"},
		{[]*url.URL{u(good), u("spiffe://cluster.local/ns/default/sa/other")}, "2 URI SANs"},
		{[]*url.URL{u("https://cluster.local/ns/default/sa/sleep")}, "scheme"},
		{[]*url.URL{u("spiffe://cluster.local/ns/a%2Fb/sa/c")}, "percent"},
	} {
		if id, err := FromCertificate(&x509.Certificate{URIs: tc.uris}); err == nil || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("FromCertificate(%v) = %v, %v; want an error saying %q", tc.uris, id, err, tc.why)
		}
	}
}

// TestFromCertificateAsEncoded: the SPIFFE ID is read as the certificate encodes it, not
// as crypto/x509 normalised it (which turns SPIFFE:// into spiffe://).
func TestFromCertificateAsEncoded(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	encoded := func(u *url.URL) *x509.Certificate {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), URIs: []*url.URL{u},
			NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return cert
	}
	good := &url.URL{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/a/sa/b"}
	if id, err := FromCertificate(encoded(good)); err != nil || id.String() != "spiffe://cluster.local/ns/a/sa/b" {
		t.Errorf("FromCertificate(%s) = %v, %v", good, id, err)
	}
	upper := &url.URL{Scheme: "SPIFFE", Host: "cluster.local", Path: "/ns/a/sa/b"}
	cert := encoded(upper)
	if cert.URIs[0].Scheme != "spiffe" {
		t.Fatalf("crypto/x509 no longer normalises the scheme (%s): this test checks nothing", cert.URIs[0])
	}
	if id, err := FromCertificate(cert); err == nil {
		t.Errorf("FromCertificate(URI SAN %s) = %v, want an error", upper, id)
	}
}
