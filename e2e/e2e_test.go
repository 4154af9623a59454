package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// TestMesh runs the seed's scenario end to end, once per inbound capture mode (the two
// meshes are independent namespaces and run in parallel). The subtests share one mesh and
// run in order; Policy comes last because it installs the seed's policy.
func TestMesh(t *testing.T) {
	for _, mode := range []compiler.CaptureMode{compiler.CaptureTProxy, compiler.CaptureRedirect} {
		t.Run(string(mode), func(t *testing.T) {
			t.Parallel()
			m := NewMesh(t, mode)
			t.Run("HBONE", func(t *testing.T) { testHBONE(t, m) })
			t.Run("Plaintext", func(t *testing.T) { testPlaintext(t, m) })
			t.Run("OtherTrustDomain", func(t *testing.T) { testOtherTrustDomain(t, m) })
			t.Run("NodeHTTP2", func(t *testing.T) { testNodeHTTP2(t, m) })
			t.Run("Policy", func(t *testing.T) { testPolicy(t, m) })
		})
	}
}

// hboneAddr is httpbin's HBONE address in family f; appAddr its app's.
func (m *Mesh) hboneAddr(f family) netip.AddrPort {
	return netip.AddrPortFrom(m.Httpbin.Addr(f), m.Config.HBONEPort)
}
func (m *Mesh) appAddr(f family) netip.AddrPort {
	return netip.AddrPortFrom(m.Httpbin.Addr(f), appPort)
}

// srcIP matches an access log line whose src.addr has IP ip.
func srcIP(ip netip.Addr) func(LogLine) bool {
	return func(l LogLine) bool {
		ap, err := netip.ParseAddrPort(l.S("src.addr"))
		return err == nil && ap.Addr().Unmap() == ip
	}
}

// testHBONE: sleep (same node) and notsleep (other node) reach httpbin's app over HBONE,
// IPv4 and IPv6. The app sees the client pod's IP; the destination proxy logs the CONNECT
// (inbound, the client's SPIFFE identity, the tunnel's authority) and counts it as mutual
// TLS; the source proxy logs the tunnel it opened.
func testHBONE(t *testing.T, m *Mesh) {
	for _, client := range []*Pod{m.Sleep, m.Notsleep} {
		for _, f := range families {
			s, err := m.Connect(client, f)
			if err != nil {
				t.Fatalf("%s -> httpbin %s: %v", client.Name, f.name, err)
			}
			s.Close()
			if s.Seen.Addr() != client.Addr(f) {
				t.Errorf("%s -> httpbin %s: the app saw source %s, want the client pod's IP %s", client.Name, f.name, s.Seen, client.Addr(f))
			}
			in := m.Node1.Proxy.AccessLine(t, map[string]string{
				"direction":      "inbound",
				"src.identity":   client.Identity().String(),
				"src.workload":   client.Name,
				"dst.workload":   "httpbin",
				"dst.identity":   m.Httpbin.Identity().String(),
				"dst.addr":       m.hboneAddr(f).String(),
				"dst.hbone_addr": m.appAddr(f).String(),
			}, srcIP(client.Addr(f)))
			if e := in.S("error"); e != "" {
				t.Errorf("%s -> httpbin %s: destination proxy logged an error: %s", client.Name, f.name, in)
			}
			client.Node.Proxy.AccessLine(t, map[string]string{
				"direction":      "outbound",
				"src.identity":   client.Identity().String(),
				"src.workload":   client.Name,
				"dst.identity":   m.Httpbin.Identity().String(),
				"dst.addr":       m.hboneAddr(f).String(),
				"dst.hbone_addr": m.appAddr(f).String(),
			}, srcIP(client.Addr(f)))
		}
	}
	dst := m.Node1.Metrics(t)
	for _, client := range []*Pod{m.Sleep, m.Notsleep} {
		labels := map[string]string{
			"reporter": "destination", "connection_security_policy": "mutual_tls",
			"source_principal": client.Identity().String(), "source_workload": client.Name,
			"destination_workload": "httpbin", "destination_principal": m.Httpbin.Identity().String(),
			"response_flags": "-",
		}
		if n := MetricSum(dst, "istio_tcp_connections_opened_total", labels); n < 2 {
			t.Errorf("node1 istio_tcp_connections_opened_total%v = %v, want >= 2 (IPv4 and IPv6)\n%s", labels, n, grep(dst, "istio_tcp_connections_opened_total"))
		}
	}
	src := m.Node2.Metrics(t)
	labels := map[string]string{
		"reporter": "source", "connection_security_policy": "mutual_tls",
		"source_principal": m.Notsleep.Identity().String(), "destination_workload": "httpbin",
	}
	if n := MetricSum(src, "istio_tcp_connections_opened_total", labels); n < 2 {
		t.Errorf("node2 istio_tcp_connections_opened_total%v = %v, want >= 2\n%s", labels, n, grep(src, "istio_tcp_connections_opened_total"))
	}
}

// testPlaintext: a client outside the mesh (not enrolled, no rules, no proxy) reaches
// httpbin's app through its inbound capture (15006); the app sees the client's own IP and
// the proxy logs the connection without an identity.
func testPlaintext(t *testing.T, m *Mesh) {
	for _, f := range families {
		s, err := m.Connect(m.Outside, f)
		if err != nil {
			t.Fatalf("outside -> httpbin %s: %v", f.name, err)
		}
		s.Close()
		if s.Seen.Addr() != m.Outside.Addr(f) {
			t.Errorf("outside -> httpbin %s: the app saw %s, want the outside client's IP %s", f.name, s.Seen, m.Outside.Addr(f))
		}
		l := m.Node1.Proxy.AccessLine(t, map[string]string{
			"direction": "inbound", "src.identity": "unknown", "dst.hbone_addr": "none",
			"dst.workload": "httpbin", "dst.addr": m.appAddr(f).String(),
		}, srcIP(m.Outside.Addr(f)))
		if e := l.S("error"); e != "" {
			t.Errorf("outside -> httpbin %s: proxy logged an error: %s", f.name, l)
		}
	}
	text := m.Node1.Metrics(t)
	labels := map[string]string{
		"reporter": "destination", "connection_security_policy": "unknown",
		"source_principal": "unknown", "destination_workload": "httpbin", "response_flags": "-",
	}
	if n := MetricSum(text, "istio_tcp_connections_opened_total", labels); n < 2 {
		t.Errorf("node1 istio_tcp_connections_opened_total%v = %v, want >= 2\n%s", labels, n, grep(text, "istio_tcp_connections_opened_total"))
	}
}

// testOtherTrustDomain: a Go HBONE client outside the mesh connects to httpbin:15008 with
// a certificate from the mesh CA (control: 200 and the app's greeting), then with one
// from another CA for evil.local, then with one the mesh CA signed for the identity
// spiffe://other.domain/...: both are refused in the TLS handshake, no tunnel opens.
func testOtherTrustDomain(t *testing.T, m *Mesh) {
	ctx := context.Background()
	good, err := m.Issuer.Certificate(ctx, m.Sleep.Identity())
	if err != nil {
		t.Fatal(err)
	}
	evilCA, evilKey, err := identity.GenerateRoot("evil.local", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	evilIssuer, err := identity.NewCAIssuer(evilCA, evilKey, identity.CAOptions{TrustDomain: "evil.local"})
	if err != nil {
		t.Fatal(err)
	}
	evil, err := evilIssuer.Certificate(ctx, identity.ForServiceAccount("evil.local", meshNamespace, "sleep"))
	if err != nil {
		t.Fatal(err)
	}
	// The mesh's own CA, minting for another trust domain: the chain verifies, the
	// SPIFFE ID's trust domain does not match.
	otherIssuer, err := identity.NewCAIssuer(m.CACert, m.CAKey, identity.CAOptions{TrustDomain: "other.domain"})
	if err != nil {
		t.Fatal(err)
	}
	other, err := otherIssuer.Certificate(ctx, identity.ForServiceAccount("other.domain", meshNamespace, "sleep"))
	if err != nil {
		t.Fatal(err)
	}
	refusedLabels := map[string]string{"destination_workload": "httpbin", "destination_workload_namespace": meshNamespace}
	refused0 := MetricSum(m.Node1.Metrics(t), "nftmesh_hbone_handshake_failures_total", refusedLabels)
	for _, f := range families {
		res := hboneConnect(m, m.Outside, f, good)
		if res.err != nil || res.status != http.StatusOK || res.greeting.Addr() != m.Outside.Addr(f) {
			t.Fatalf("%s: control with a mesh certificate: %v, want 200 and a greeting from %s", f.name, res, m.Outside.Addr(f))
		}
		for name, cert := range map[string]*tls.Certificate{"evil.local CA": evil, "mesh CA, spiffe://other.domain": other} {
			res := hboneConnect(m, m.Outside, f, cert)
			if res.status == http.StatusOK || res.err == nil {
				t.Errorf("%s: client certificate from %s: %v, want the handshake refused", f.name, name, res)
				continue
			}
			if !strings.Contains(res.err.Error(), "tls: bad certificate") {
				t.Errorf("%s: client certificate from %s: %v, want the server's bad_certificate alert", f.name, name, res.err)
			}
			t.Logf("%s: client certificate from %s: refused: %v", f.name, name, res.err)
		}
	}
	// Each refusal counted once, for httpbin (the hook may lag the client's alert a little).
	want := refused0 + float64(2*len(families))
	var text string
	for deadline := time.Now().Add(logWait); ; time.Sleep(10 * time.Millisecond) {
		text = m.Node1.Metrics(t)
		n := MetricSum(text, "nftmesh_hbone_handshake_failures_total", refusedLabels)
		if n == want {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("node1 nftmesh_hbone_handshake_failures_total%v = %v, want %v\n%s", refusedLabels, n, want, grep(text, "nftmesh_hbone"))
			break
		}
	}
	for _, bad := range []string{"evil.local", "other.domain"} {
		if strings.Contains(text, bad) {
			t.Errorf("node1 counted a connection from %s:\n%s", bad, grep(text, bad))
		}
	}
}

// replayConn returns buf before reading on from Conn.
type replayConn struct {
	net.Conn
	buf []byte
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.buf) > 0 {
		n := copy(p, c.buf)
		c.buf = c.buf[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

type hboneResult struct {
	status   int
	greeting netip.AddrPort
	echo     bool
	err      error
}

func (r hboneResult) String() string {
	return fmt.Sprintf("status %d, greeting %v, echo %v, error %v", r.status, r.greeting, r.echo, r.err)
}

// hboneConnect is a Go HBONE client (crypto/tls and x/net/http2, not the proxy's code)
// in pod from: TLS 1.3 with cert to httpbin:15008 in family f, the server checked against
// the mesh roots and httpbin's identity, then CONNECT httpbin:8080, the greeting and an
// echo.
func hboneConnect(m *Mesh, from *Pod, f family, cert *tls.Certificate) (res hboneResult) {
	raw, err := Dial(from.NS, f.tcp, m.hboneAddr(f))
	if err != nil {
		res.err = err
		return
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(5 * time.Second))
	want := m.Httpbin.Identity()
	roots := m.Issuer.Roots()
	tc := tls.Client(raw, &tls.Config{
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		Certificates: []tls.Certificate{*cert},
		// No host name to check (HBONE dials a pod IP): the chain and the SPIFFE ID are
		// checked here instead.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no server certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
				return err
			}
			if id, err := identity.FromCertificate(leaf); err != nil || id != want {
				return fmt.Errorf("server is %v (%v), want %s", id, err, want)
			}
			return nil
		},
	})
	if err := tc.Handshake(); err != nil {
		res.err = fmt.Errorf("handshake: %w", err)
		return
	}
	// In TLS 1.3 the client's handshake is over before the server has checked the client's
	// certificate: a refusal is the alert read next. The server speaks first (its HTTP/2
	// SETTINGS), so read that before writing anything, which would otherwise race with the
	// alert and fail with EPIPE instead.
	first := make([]byte, 1)
	if _, err := io.ReadFull(tc, first); err != nil {
		res.err = fmt.Errorf("first read: %w", err)
		return
	}
	cc, err := (&http2.Transport{}).NewClientConn(&replayConn{Conn: tc, buf: first})
	if err != nil {
		res.err = fmt.Errorf("http2: %w", err)
		return
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pr, pw := io.Pipe()
	defer pw.Close()
	authority := m.appAddr(f).String()
	req, err := http.NewRequestWithContext(ctx, http.MethodConnect, "", pr)
	if err != nil {
		res.err = err
		return
	}
	req.URL = &url.URL{Host: authority}
	req.Host = authority
	resp, err := cc.RoundTrip(req)
	if err != nil {
		res.err = fmt.Errorf("CONNECT: %w", err)
		return
	}
	defer resp.Body.Close()
	res.status = resp.StatusCode
	if resp.StatusCode != http.StatusOK {
		return
	}
	r := bufio.NewReader(resp.Body)
	line, err := r.ReadString('\n')
	if err != nil {
		res.err = fmt.Errorf("greeting: %w", err)
		return
	}
	if res.greeting, err = netip.ParseAddrPort(strings.TrimSpace(line)); err != nil {
		res.err = fmt.Errorf("greeting %q: %w", line, err)
		return
	}
	if _, err := io.WriteString(pw, "ping\n"); err != nil {
		res.err = err
		return
	}
	echo, err := r.ReadString('\n')
	res.echo = echo == "ping\n"
	if !res.echo {
		res.err = fmt.Errorf("echo %q: %v", echo, err)
	}
	return
}

// testPolicy installs the seed's policy (only ambient-demo/sleep may reach app=httpbin)
// with a SIGHUP to httpbin's proxy: notsleep's live connection is closed (live re-check)
// while sleep's survives; new notsleep connections are refused (closed before the app's
// greeting; its proxy gets 401 for the CONNECT); sleep still gets through; plaintext
// from outside the mesh (no principal) is refused too.
func testPolicy(t *testing.T, m *Mesh) {
	v4 := families[0]
	liveNot, err := m.Connect(m.Notsleep, v4)
	if err != nil {
		t.Fatalf("notsleep before the policy: %v", err)
	}
	defer liveNot.Close()
	liveSleep, err := m.Connect(m.Sleep, v4)
	if err != nil {
		t.Fatalf("sleep before the policy: %v", err)
	}
	defer liveSleep.Close()
	liveOut, err := m.Connect(m.Outside, v4)
	if err != nil {
		t.Fatalf("outside (plaintext) before the policy: %v", err)
	}
	defer liveOut.Close()

	seed, err := os.ReadFile("../fixtures/policy/ambient-demo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(m.PoliciesFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	reloads := len(m.Node1.Proxy.Lines("policies reloaded"))
	if err := syscall.Kill(m.Node1.Proxy.Pid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(logWait)
	for len(m.Node1.Proxy.Lines("policies reloaded")) == reloads {
		if time.Now().After(deadline) {
			t.Fatalf("node1's proxy did not reload its policies after SIGHUP:\n%s", m.Node1.Proxy.Log)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Live re-check: notsleep's connection ends, promptly, without more data.
	liveNot.SetReadDeadline(time.Now().Add(ioTimeout))
	if b, err := liveNot.R.ReadByte(); err == nil {
		t.Errorf("notsleep's live connection still delivers data (%q) after the policy denied it", b)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Errorf("notsleep's live connection is still open %v after the policy denied it", ioTimeout)
	}
	m.Node1.Proxy.WaitLine(t, "closing connection denied by changed policy", "for notsleep", func(l LogLine) bool {
		return strings.Contains(l.S("connection"), m.Notsleep.Identity().Principal())
	})
	// Its access line says so (and it counts as closed with DENY, below).
	m.Node1.Proxy.AccessLine(t, map[string]string{"direction": "inbound", "src.identity": m.Notsleep.Identity().String()},
		func(l LogLine) bool { return strings.Contains(l.S("error"), "denied by changed policy") })
	// Plaintext from outside is cut with a reset, not a FIN: a cut stream must not look complete.
	liveOut.SetReadDeadline(time.Now().Add(ioTimeout))
	if _, err := liveOut.R.ReadByte(); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("outside's live plaintext connection after the policy denied it: %v, want a reset", err)
	}
	if err := Echo(liveSleep, liveSleep.R, "still allowed"); err != nil {
		t.Errorf("sleep's live connection after the policy change: %v", err)
	}

	for _, f := range families {
		// The local proxy accepts, then closes (with a reset) once the CONNECT is refused:
		// the reset may even beat the end of connect(2).
		if s, err := m.Connect(m.Notsleep, f); err == nil {
			s.Close()
			t.Errorf("notsleep -> httpbin %s: connected (the app saw %s) under the seed's policy", f.name, s.Seen)
		} else if !strings.HasPrefix(err.Error(), "greeting") && !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("notsleep -> httpbin %s: %v, want the connection closed before the app's greeting", f.name, err)
		}
		// The client side: notsleep's proxy (node2) got 401 for its CONNECT.
		m.Node2.Proxy.AccessLine(t, map[string]string{
			"direction": "outbound", "src.workload": "notsleep", "dst.hbone_addr": m.appAddr(f).String(),
		}, func(l LogLine) bool { return strings.Contains(l.S("error"), "401") })
		// The server side: denied by policy.
		m.Node1.Proxy.AccessLine(t, map[string]string{
			"direction": "inbound", "src.identity": m.Notsleep.Identity().String(), "dst.hbone_addr": m.appAddr(f).String(),
		}, func(l LogLine) bool { return strings.Contains(l.S("error"), "denied by policy") })

		s, err := m.Connect(m.Sleep, f)
		if err != nil {
			t.Fatalf("sleep -> httpbin %s under the seed's policy: %v", f.name, err)
		}
		s.Close()
		if s.Seen.Addr() != m.Sleep.Addr(f) {
			t.Errorf("sleep -> httpbin %s: the app saw %s, want %s", f.name, s.Seen, m.Sleep.Addr(f))
		}

		if s, err := m.Connect(m.Outside, f); err == nil {
			s.Close()
			t.Errorf("outside -> httpbin %s: plaintext connected under the seed's policy", f.name)
		}
	}
	// Refusals are counted when the connection closes, with response_flags DENY.
	src := m.Node2.Metrics(t)
	labels := map[string]string{"reporter": "source", "source_principal": m.Notsleep.Identity().String(), "response_flags": "DENY"}
	if n := MetricSum(src, "istio_tcp_connections_closed_total", labels); n < 2 {
		t.Errorf("node2 istio_tcp_connections_closed_total%v = %v, want >= 2\n%s", labels, n, grep(src, "istio_tcp_connections_closed_total"))
	}
	dst := m.Node1.Metrics(t)
	labels = map[string]string{"reporter": "destination", "source_principal": m.Notsleep.Identity().String(), "response_flags": "DENY", "connection_security_policy": "mutual_tls"}
	if n := MetricSum(dst, "istio_tcp_connections_closed_total", labels); n < 2 {
		t.Errorf("node1 istio_tcp_connections_closed_total%v = %v, want >= 2\n%s", labels, n, grep(dst, "istio_tcp_connections_closed_total"))
	}
}

// grep returns the lines of text that contain s.
func grep(text, s string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestCustomPortsAndMarks: an intent with other ports and marks than Istio's. The rules
// and both proxies take them from the one intent file (--intent): sleep and notsleep reach
// httpbin over HBONE on the intent's HBONE port, an outside client through its inbound
// port, and every enrolled pod has the proxy listening on the intent's ports and on none
// of the defaults. A proxy that kept Istio's numbers would listen where nothing is
// redirected, and its unmarked sockets would be captured by the pod's own rules.
func TestCustomPortsAndMarks(t *testing.T) {
	t.Parallel()
	in := compiler.DefaultIntent()
	port := func(p int) *int { return &p }
	num := func(s string) *compiler.Number { n := compiler.Number(s); return &n }
	in.Spec.Ports = compiler.Ports{Outbound: port(16001), InboundPlaintext: port(16006), HBONE: port(16008), DNS: port(16053)}
	in.Spec.Marks = compiler.Marks{
		Proxy:      &compiler.MaskedMark{Value: num("0x7000"), Mask: num("0xf000")},
		Connection: &compiler.MaskedMark{Value: num("0x22"), Mask: num("0xff")},
	}
	m := NewMeshWithIntent(t, in)
	t.Run("HBONE", func(t *testing.T) { testHBONE(t, m) })
	t.Run("Plaintext", func(t *testing.T) { testPlaintext(t, m) })
	t.Run("Listeners", func(t *testing.T) {
		for _, p := range m.Pods {
			if !p.Enrolled {
				continue
			}
			out, err := p.NS.Run("", "ss", "-Hltn")
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []int{16001, 16006, 16008} {
				if !strings.Contains(out, fmt.Sprintf(":%d ", want)) {
					t.Errorf("%s: nothing listens on the intent's port %d:\n%s", p.Name, want, out)
				}
			}
			for _, def := range []int{15001, 15006, 15008} {
				if strings.Contains(out, fmt.Sprintf(":%d ", def)) {
					t.Errorf("%s: the proxy listens on Istio's default port %d, not the intent's:\n%s", p.Name, def, out)
				}
			}
		}
	})
}
