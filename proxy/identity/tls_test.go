package identity

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

type handshakeResult struct {
	client, server       tls.ConnectionState
	clientErr, serverErr error
	serverName           string // the SNI the server saw
}

// handshake runs a TLS handshake between the two configurations over net.Pipe. After
// it, the server writes "hello" and closes; the client reads to EOF, so that an alert
// the server sends after the client thinks it is done (TLS 1.3 client authentication)
// reaches the client as its error.
func handshake(t *testing.T, clientCfg, serverCfg *tls.Config) handshakeResult {
	t.Helper()
	var r handshakeResult
	cc, sc := net.Pipe()
	deadline := time.Now().Add(10 * time.Second)
	cc.SetDeadline(deadline)
	sc.SetDeadline(deadline)
	serverCfg = serverCfg.Clone()
	getCert := serverCfg.GetCertificate
	serverCfg.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		r.serverName = hello.ServerName
		return getCert(hello)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s := tls.Server(sc, serverCfg)
		defer s.Close()
		if r.serverErr = s.Handshake(); r.serverErr != nil {
			return
		}
		r.server = s.ConnectionState()
		if _, err := s.Write([]byte("hello")); err != nil {
			r.serverErr = err
		}
	}()
	c := tls.Client(cc, clientCfg)
	r.clientErr = c.Handshake()
	if r.clientErr == nil {
		r.client = c.ConnectionState()
		var got []byte
		got, r.clientErr = io.ReadAll(c)
		if r.clientErr == nil && string(got) != "hello" {
			t.Errorf("client read %q, want hello", got)
		}
	}
	c.Close()
	<-done
	return r
}

func wantRejected(t *testing.T, r handshakeResult, side, why string) {
	t.Helper()
	var err, other error = r.serverErr, r.clientErr
	if side == "client" {
		err, other = r.clientErr, r.serverErr
	}
	if err == nil || !strings.Contains(err.Error(), why) {
		t.Errorf("%s error %v; want one saying %q", side, err, why)
	}
	if other == nil {
		t.Errorf("the other side of a refused handshake saw no error")
	}
}

func TestHandshake(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour)
	iss := ca.issuer(t, CAOptions{})
	r := handshake(t, ClientTLSConfig(iss, sleepID, []ID{httpbinID}), ServerTLSConfig(iss, httpbinID))
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("client: %v; server: %v", r.clientErr, r.serverErr)
	}
	for side, cs := range map[string]tls.ConnectionState{"client": r.client, "server": r.server} {
		if cs.Version != tls.VersionTLS13 {
			t.Errorf("%s: version %x, want TLS 1.3", side, cs.Version)
		}
		if cs.NegotiatedProtocol != "h2" {
			t.Errorf("%s: ALPN %q, want h2", side, cs.NegotiatedProtocol)
		}
	}
	if r.serverName != "" {
		t.Errorf("client sent SNI %q", r.serverName)
	}
	if id, err := PeerID(r.client); err != nil || id != httpbinID {
		t.Errorf("client's PeerID = %v, %v; want %s", id, err, httpbinID)
	}
	if id, err := PeerID(r.server); err != nil || id != sleepID {
		t.Errorf("server's PeerID = %v, %v; want %s", id, err, sleepID)
	}
	// Any of several expected identities will do.
	other := ForServiceAccount("cluster.local", "default", "other")
	r = handshake(t, ClientTLSConfig(iss, sleepID, []ID{other, httpbinID}), ServerTLSConfig(iss, httpbinID))
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("two expected identities: client: %v; server: %v", r.clientErr, r.serverErr)
	}
}

func TestHandshakePresentsRenewedCertificate(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour)
	clock := newFakeClock()
	// Short enough that the renewed leaf is already valid by the real clock the peers check.
	iss := ca.issuer(t, CAOptions{Clock: clock.Now, LeafTTL: 8 * time.Minute})
	serverCfg := ServerTLSConfig(iss, httpbinID)
	clientCfg := ClientTLSConfig(iss, sleepID, []ID{httpbinID})
	first := handshake(t, clientCfg, serverCfg)
	clock.Advance(4*time.Minute + time.Second)
	second := handshake(t, clientCfg, serverCfg)
	if first.clientErr != nil || second.clientErr != nil || first.serverErr != nil || second.serverErr != nil {
		t.Fatal(first.clientErr, second.clientErr, first.serverErr, second.serverErr)
	}
	if first.client.PeerCertificates[0].SerialNumber.Cmp(second.client.PeerCertificates[0].SerialNumber) == 0 {
		t.Error("server presented the same certificate after renewal")
	}
	if first.server.PeerCertificates[0].SerialNumber.Cmp(second.server.PeerCertificates[0].SerialNumber) == 0 {
		t.Error("client presented the same certificate after renewal")
	}
}

func TestHandshakeRejects(t *testing.T) {
	ca := newTestCA(t, "cluster.local", time.Hour)
	iss := ca.issuer(t, CAOptions{})
	serverCfg := ServerTLSConfig(iss, httpbinID)
	goodClient := ClientTLSConfig(iss, sleepID, []ID{httpbinID})
	now := time.Now()

	t.Run("client cert from another CA", func(t *testing.T) {
		evilCA := newTestCA(t, "evil.local", time.Hour)
		evilID := ForServiceAccount("evil.local", "default", "sleep")
		// The evil client trusts our roots, so that the server is the one to decide.
		evil := otherRoots{evilCA.issuer(t, CAOptions{TrustDomain: "evil.local"}), iss.Roots()}
		r := handshake(t, ClientTLSConfig(evil, evilID, []ID{httpbinID}), serverCfg)
		wantRejected(t, r, "server", "client certificate for spiffe://evil.local/ns/default/sa/sleep does not verify")
	})
	t.Run("client cert from another CA claiming our trust domain", func(t *testing.T) {
		evilCA := newTestCA(t, "cluster.local", time.Hour)
		evil := otherRoots{evilCA.issuer(t, CAOptions{}), iss.Roots()}
		r := handshake(t, ClientTLSConfig(evil, sleepID, []ID{httpbinID}), serverCfg)
		wantRejected(t, r, "server", "certificate signed by unknown authority")
	})
	t.Run("client cert from our CA for another trust domain", func(t *testing.T) {
		otherTD := ca.issuer(t, CAOptions{TrustDomain: "other.domain"})
		otherID := ForServiceAccount("other.domain", "default", "sleep")
		r := handshake(t, ClientTLSConfig(otherTD, otherID, []ID{httpbinID}), serverCfg)
		wantRejected(t, r, "server", "client spiffe://other.domain/ns/default/sa/sleep is not in trust domain cluster.local")
	})
	t.Run("client without certificate", func(t *testing.T) {
		cfg := goodClient.Clone()
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
		r := handshake(t, cfg, serverCfg)
		wantRejected(t, r, "server", "certificate")
	})
	t.Run("expired client certificate", func(t *testing.T) {
		expired := ca.sign(t, leafTemplate(sleepID, now.Add(-time.Hour), now.Add(-time.Minute)))
		cfg := ClientTLSConfig(staticIssuer{expired, iss.Roots(), "cluster.local"}, sleepID, []ID{httpbinID})
		r := handshake(t, cfg, serverCfg)
		wantRejected(t, r, "server", "expired")
	})
	t.Run("client certificate without clientAuth", func(t *testing.T) {
		tmpl := leafTemplate(sleepID, now.Add(-time.Minute), now.Add(time.Hour))
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		cert := ca.sign(t, tmpl)
		r := handshake(t, ClientTLSConfig(staticIssuer{cert, iss.Roots(), "cluster.local"}, sleepID, []ID{httpbinID}), serverCfg)
		wantRejected(t, r, "server", "incompatible key usage")
	})
	t.Run("client CA certificate as leaf", func(t *testing.T) {
		tmpl := leafTemplate(sleepID, now.Add(-time.Minute), now.Add(time.Hour))
		tmpl.IsCA = true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		cert := ca.sign(t, tmpl)
		r := handshake(t, ClientTLSConfig(staticIssuer{cert, iss.Roots(), "cluster.local"}, sleepID, []ID{httpbinID}), serverCfg)
		wantRejected(t, r, "server", "is a CA certificate")
	})
	t.Run("client without ALPN", func(t *testing.T) {
		cfg := goodClient.Clone()
		cfg.NextProtos = nil
		cfg.VerifyConnection = nil
		r := handshake(t, cfg, serverCfg)
		wantRejected(t, r, "server", `ALPN ""`)
	})
	t.Run("client offering TLS 1.2 only", func(t *testing.T) {
		cfg := goodClient.Clone()
		cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
		r := handshake(t, cfg, serverCfg)
		wantRejected(t, r, "server", "unsupported versions")
	})
	t.Run("server with an unexpected identity", func(t *testing.T) {
		r := handshake(t, ClientTLSConfig(iss, sleepID, []ID{sleepID, ForServiceAccount("cluster.local", "other", "httpbin")}), serverCfg)
		wantRejected(t, r, "client", "server spiffe://cluster.local/ns/default/sa/httpbin is not the expected one of spiffe://cluster.local/ns/default/sa/sleep, spiffe://cluster.local/ns/other/sa/httpbin")
	})
	t.Run("no expected identity", func(t *testing.T) {
		r := handshake(t, ClientTLSConfig(iss, sleepID, nil), serverCfg)
		wantRejected(t, r, "client", "none is expected")
	})
	t.Run("server cert from another CA", func(t *testing.T) {
		// The expected identity, from a CA the client does not trust.
		evilCA := newTestCA(t, "cluster.local", time.Hour)
		evil := evilCA.issuer(t, CAOptions{})
		r := handshake(t, goodClient, ServerTLSConfig(otherRoots{evil, iss.Roots()}, httpbinID))
		wantRejected(t, r, "client", "server certificate for spiffe://cluster.local/ns/default/sa/httpbin does not verify")
	})
	t.Run("expired server certificate", func(t *testing.T) {
		expired := ca.sign(t, leafTemplate(httpbinID, now.Add(-time.Hour), now.Add(-time.Minute)))
		r := handshake(t, goodClient, ServerTLSConfig(staticIssuer{expired, iss.Roots(), "cluster.local"}, httpbinID))
		wantRejected(t, r, "client", "expired")
	})
	t.Run("server certificate without serverAuth", func(t *testing.T) {
		tmpl := leafTemplate(httpbinID, now.Add(-time.Minute), now.Add(time.Hour))
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		cert := ca.sign(t, tmpl)
		r := handshake(t, goodClient, ServerTLSConfig(staticIssuer{cert, iss.Roots(), "cluster.local"}, httpbinID))
		wantRejected(t, r, "client", "incompatible key usage")
	})
}

func TestPeerID(t *testing.T) {
	if _, err := PeerID(tls.ConnectionState{}); err == nil {
		t.Error("PeerID of an unfinished handshake")
	}
	if _, err := PeerID(tls.ConnectionState{HandshakeComplete: true}); err == nil {
		t.Error("PeerID without a peer certificate")
	}
	if _, err := verifyPeer(x509.NewCertPool(), nil, x509.ExtKeyUsageClientAuth, "client"); err == nil || !strings.Contains(err.Error(), "presented no certificate") {
		t.Errorf("verifyPeer with no certificate: %v", err)
	}
}
