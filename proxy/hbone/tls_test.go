package hbone

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// mTLS: client certificates required and checked, TLS 1.3 and h2 only.

func TestTLSRequiresClientCertificate(t *testing.T) {
	pki := sharedPKI(t)
	noCert := pki.clientTLS(t)
	noCert.Certificates = nil
	var dials, refused atomic.Int64
	e := newEnv(t, withClientTLS(noCert), withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		dials.Add(1)
		return dialTCP(ctx, req)
	}), withServer(func(s *Server) { s.OnHandshakeError = func(error) { refused.Add(1) } }))
	if _, err := e.connect(testCtx(t, 10*time.Second)); err == nil {
		t.Fatal("Connect succeeded without a client certificate")
	}
	// In TLS 1.3 the client's handshake completes before the server checks the client's
	// certificate; the refusal arrives as an alert on the first read (a write may instead
	// meet the closed socket).
	c, err := tls.Dial("tcp", e.hbone.String(), noCert)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "certificate required") {
		t.Errorf("read: %v, want the server's certificate_required alert", err)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("the Dialer ran %d times", n)
	}
	if e.srv.numConns() != 0 {
		t.Error("server kept an HTTP/2 connection without a client certificate")
	}
	// Both the pool's attempt and tls.Dial's, each heard once (the hook runs just after
	// the alert goes out, so it may lag the client's read).
	for deadline := time.Now().Add(5 * time.Second); refused.Load() < 2 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if n := refused.Load(); n != 2 {
		t.Errorf("OnHandshakeError ran %d times, want 2", n)
	}
}

func TestTLSWrongTrustDomainRejected(t *testing.T) {
	other := newTestPKI(t)
	conf := sharedPKI(t).clientTLS(t)
	cert, _, _ := other.leaf(t, "spiffe://other.domain/ns/default/sa/sleep")
	conf.Certificates = []tls.Certificate{cert}
	e := newEnv(t, withClientTLS(conf))
	if _, err := e.connect(testCtx(t, 10*time.Second)); err == nil {
		t.Fatal("Connect succeeded with a certificate from another CA")
	}
}

// TestTLS12Rejected: the server refuses a TLS 1.2 client (the pool never offers one).
func TestTLS12Rejected(t *testing.T) {
	conf := sharedPKI(t).clientTLS(t)
	conf.MinVersion = tls.VersionTLS12
	conf.MaxVersion = tls.VersionTLS12
	e := newEnv(t)
	tc, err := tls.Dial("tcp", e.hbone.String(), conf)
	if err == nil {
		tc.Close()
		t.Fatal("TLS 1.2 handshake succeeded")
	}
	if !strings.Contains(err.Error(), "protocol version") {
		t.Errorf("err %v, want a protocol version alert", err)
	}
}

// TestPoolPinsTLS13: whatever versions and protocols the caller's configuration lists, the
// pool offers TLS 1.3 and h2 only.
func TestPoolPinsTLS13(t *testing.T) {
	conf := sharedPKI(t).clientTLS(t)
	conf.MinVersion = tls.VersionTLS12
	conf.MaxVersion = tls.VersionTLS12
	conf.NextProtos = []string{"http/1.1"}
	e := newEnv(t, withClientTLS(conf))
	c, err := e.connect(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := exchange(c, []byte("pinned")); err != nil {
		t.Fatal(err)
	}
}

func TestServeRejectsConfigWithoutClientAuth(t *testing.T) {
	conf := sharedPKI(t).serverTLS(t)
	conf.ClientAuth = tls.NoClientCert
	s := &Server{TLS: conf, Dial: dialTCP}
	l := listen(t, "tcp4")
	defer l.Close()
	if err := s.Serve(l); err == nil || !strings.Contains(err.Error(), "client certificate") {
		t.Fatalf("Serve: %v, want a configuration error", err)
	}
}
