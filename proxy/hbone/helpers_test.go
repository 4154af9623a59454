package hbone

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

const (
	trustDomain = "cluster.local"
	clientID    = "spiffe://cluster.local/ns/default/sa/sleep"
	serverID    = "spiffe://cluster.local/ns/default/sa/httpbin"
)

// testPKI is a throwaway mesh CA with SPIFFE leaves, as proxy/identity would mint them.
type testPKI struct {
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
	caPEM  []byte
	roots  *x509.CertPool
}

var (
	pkiOnce sync.Once
	pkiVal  *testPKI
)

// sharedPKI is built once per test binary: key generation is slow under -race.
func sharedPKI(t testing.TB) *testPKI {
	t.Helper()
	pkiOnce.Do(func() { pkiVal = newTestPKI(t) })
	return pkiVal
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"nftmesh test"}, CommonName: "test root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	return &testPKI{caCert: cert, caKey: key, roots: roots,
		caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// leaf mints an X509-SVID for id, with both TLS usages as SPIFFE leaves have.
func (p *testPKI) leaf(t testing.TB, id string) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return c, certPEM, keyPEM
}

// verifySPIFFE checks a chain against the roots and the leaf's URI SAN: want is an exact id,
// or a "spiffe://td/" prefix (trust domain only).
func (p *testPKI) verifySPIFFE(usage x509.ExtKeyUsage, want string) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("no certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return err
			}
			certs[i] = c
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		if _, err := certs[0].Verify(x509.VerifyOptions{Roots: p.roots, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			return err
		}
		for _, u := range certs[0].URIs {
			if s := u.String(); s == want || strings.HasSuffix(want, "/") && strings.HasPrefix(s, want) {
				return nil
			}
		}
		return fmt.Errorf("peer identity %v, want %s", certs[0].URIs, want)
	}
}

func (p *testPKI) serverTLS(t testing.TB) *tls.Config {
	cert, _, _ := p.leaf(t, serverID)
	return &tls.Config{
		Certificates:          []tls.Certificate{cert},
		ClientAuth:            tls.RequireAndVerifyClientCert,
		ClientCAs:             p.roots,
		MinVersion:            tls.VersionTLS13,
		NextProtos:            []string{"h2"},
		VerifyPeerCertificate: p.verifySPIFFE(x509.ExtKeyUsageClientAuth, "spiffe://"+trustDomain+"/"),
	}
}

func (p *testPKI) clientTLS(t testing.TB) *tls.Config {
	cert, _, _ := p.leaf(t, clientID)
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		// No SNI (docs/hbone.md#tls): the server is checked by its SPIFFE id, not a host name.
		InsecureSkipVerify:    true,
		VerifyPeerCertificate: p.verifySPIFFE(x509.ExtKeyUsageServerAuth, serverID),
	}
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("HBONE_TEST_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// countingListener counts accepted connections, and hands each to onAccept if set.
type countingListener struct {
	net.Listener
	accepted atomic.Int64
	onAccept func(net.Conn)
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
		if l.onAccept != nil {
			l.onAccept(c)
		}
	}
	return c, err
}

func listen(t testing.TB, network string) net.Listener {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "tcp6" {
		addr = "[::1]:0"
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

// upstream is a TCP server playing the pod's application; handle runs per connection.
type upstream struct {
	l     net.Listener
	addr  netip.AddrPort
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func newUpstream(t testing.TB, network string, handle func(*net.TCPConn)) *upstream {
	t.Helper()
	u := &upstream{l: listen(t, network), conns: map[net.Conn]struct{}{}}
	u.addr = addrPort(u.l.Addr())
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := u.l.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.conns[c] = struct{}{}
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				handle(c.(*net.TCPConn))
				c.Close()
				u.mu.Lock()
				delete(u.conns, c)
				u.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(u.close)
	return u
}

func (u *upstream) close() {
	u.l.Close()
	u.mu.Lock()
	for c := range u.conns {
		c.Close()
	}
	u.mu.Unlock()
	u.wg.Wait()
}

// echo copies until EOF, then half-closes: the FIN goes back through the tunnel. The
// plain Reader and Writer keep io.Copy from splicing: net pools splice pipes in a sync.Pool
// that only GC finalizers close, which would blur the leak test's descriptor count.
func echo(c *net.TCPConn) {
	io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c})
	c.CloseWrite()
}

// dialTCP is the plainest Dialer: connect to the authority.
func dialTCP(ctx context.Context, req Request) (net.Conn, int, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", req.Authority.String())
	if err != nil {
		return nil, http.StatusServiceUnavailable, fmt.Errorf("upstream %v: %w", req.Authority, err)
	}
	return c, http.StatusOK, nil
}

// env is an HBONE server, a pool pointed at it, and an echo upstream.
type env struct {
	pki     *testPKI
	srv     *Server
	ln      *countingListener
	hbone   netip.AddrPort
	pool    *Pool
	key     PoolKey
	echo    *upstream
	clTLS   *tls.Config
	served  chan error
	network string
	accept  func(net.Conn) // the server's side of each connection, as it is accepted
}

type envOpt func(*env)

func withDial(d Dialer) envOpt                               { return func(e *env) { e.srv.Dial = d } }
func withMaxStreams(n int) envOpt                            { return func(e *env) { e.pool.MaxStreams = n } }
func withIdle(d time.Duration) envOpt                        { return func(e *env) { e.pool.IdleTimeout = d } }
func withServer(f func(*Server)) envOpt                      { return func(e *env) { f(e.srv) } }
func withClientTLS(c *tls.Config) envOpt                     { return func(e *env) { e.clTLS = c } }
func withNetwork(network string) envOpt                      { return func(e *env) { e.network = network } }
func withPool(f func(*Pool)) envOpt                          { return func(e *env) { f(e.pool) } }
func withEcho(u *upstream) envOpt                            { return func(e *env) { e.echo = u } }
func withAccepted(f func(net.Conn)) envOpt                   { return func(e *env) { e.accept = f } }
func (e *env) connect(ctx context.Context) (net.Conn, error) { return e.connectTo(ctx, e.echo.addr) }

func (e *env) connectTo(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
	h := http.Header{}
	h.Set("Forwarded", `for="10.0.0.7:41234"`)
	h.Set("Baggage", "k8s.namespace.name=default")
	h.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	return e.pool.Connect(ctx, e.key, a, h)
}

func newEnv(t testing.TB, opts ...envOpt) *env {
	t.Helper()
	e := &env{pki: sharedPKI(t), served: make(chan error, 1), network: "tcp4"}
	e.srv = &Server{TLS: e.pki.serverTLS(t), Dial: dialTCP, Log: testLogger(t)}
	e.pool = &Pool{Log: testLogger(t)}
	e.clTLS = e.pki.clientTLS(t)
	for _, o := range opts {
		o(e)
	}
	e.ln = &countingListener{Listener: listen(t, e.network), onAccept: e.accept}
	if e.echo == nil {
		e.echo = newUpstream(t, e.network, echo)
	}
	e.hbone = addrPort(e.ln.Addr())
	e.key = PoolKey{SrcID: clientID, DstID: serverID, Dst: e.hbone, SrcIP: netip.MustParseAddr("127.0.0.1")}
	clTLS := e.clTLS
	e.pool.TLSConfig = func(PoolKey) (*tls.Config, error) { return clTLS, nil }
	e.pool.Dial = func(ctx context.Context, key PoolKey) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", key.Dst.String())
	}
	go func() { e.served <- e.srv.Serve(e.ln) }()
	t.Cleanup(func() {
		e.pool.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		select {
		case err := <-e.served:
			if !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve returned %v, want ErrServerClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("Serve did not return after Shutdown")
		}
	})
	return e
}

// serverConns is how many HTTP/2 connections the server holds.
func (s *Server) numConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// eventually polls cond until it holds or d passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// watchdog closes c if the test runs past d, so a hung read fails instead of hanging.
func watchdog(t testing.TB, d time.Duration, c io.Closer) {
	tm := time.AfterFunc(d, func() {
		t.Errorf("watchdog: still running after %v; closing", d)
		c.Close()
	})
	t.Cleanup(func() { tm.Stop() })
}

func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// rawClient is a bare x/net ClientConn on a fresh TLS connection to the server, for requests
// the Pool would never send.
func (e *env) rawClient(t testing.TB) *http2.ClientConn {
	t.Helper()
	c, err := tls.Dial("tcp", e.hbone.String(), e.clTLS)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http2.Transport{}
	cc, err := tr.NewClientConn(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func hpackEncoder(w io.Writer) func(name, value string) {
	enc := hpack.NewEncoder(w)
	return func(name, value string) { enc.WriteField(hpack.HeaderField{Name: name, Value: value}) }
}

func numFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func goroutines() int { return runtime.NumGoroutine() }

func stacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}
