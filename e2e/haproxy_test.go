package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// The peer legs of the benchmarks put a production proxy where the node proxies stand,
// as the floor relays do (floor_test.go): "peer-haproxy" is two HAProxy processes (the
// distribution's, `apt-get install haproxy`; scripts/setup installs it), mode tcp, one
// in notsleep's namespace, which the client dials on loopback, one in httpbin's, which
// connects to the app locally; between them mutual TLS 1.3 with P-256 certificates from
// the mesh's CA, one TLS connection per client connection. The pods' rules are off. The
// leg is skipped when haproxy is not installed.

const (
	haproxyRelay     = "haproxy" // the relay kind (leg.relay) of the HAProxy pair
	haproxyOutOffset = 200       // the outbound haproxy listens on 127.0.0.1:relayPortBase+this+app port
	haproxyInBase    = 10500     // the inbound haproxy listens on httpbin's IP, this+app port
)

// haproxyThreads is the inbound and outbound haproxy's nbthread: as many threads as the
// proxies run Go code on when the benchmark sets their --workers; otherwise HAProxy's own
// default, a thread per CPU the process may use (what runtime.NumCPU reports here).
func (m *Mesh) haproxyThreads() int {
	if m.workers > 0 {
		return m.workers
	}
	return runtime.NumCPU()
}

// startHAProxies starts the HAProxy pair for the given app ports, as startRelays does the
// floor relays; without haproxy on PATH it starts nothing (skipLeg then skips the leg).
func (m *Mesh) startHAProxies(tb testing.TB, ports ...int) {
	tb.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return
	}
	dir := tb.TempDir()
	pemFile := func(name string, id identity.ID) string {
		cert, err := m.Issuer.Certificate(context.Background(), id)
		if err != nil {
			tb.Fatal(err)
		}
		var data []byte
		for _, der := range cert.Certificate {
			data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
		}
		key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
		if err != nil {
			tb.Fatal(err)
		}
		data = append(data, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})...)
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			tb.Fatal(err)
		}
		return path
	}
	inPEM := pemFile("in.pem", m.Httpbin.Identity())
	outPEM := pemFile("out.pem", m.Notsleep.Identity())

	// Both ends TLS 1.3 only; the default TLS 1.3 cipher suites (OpenSSL's). Logs go to
	// stderr (the Proc's Log): start-up alerts, and only the sessions that ended in an
	// error (dontlog-normal), so that a good connection logs nothing.
	global := fmt.Sprintf(`global
	nbthread %d
	log stderr format raw local0 info
	ssl-default-bind-options ssl-min-ver TLSv1.3
	ssl-default-server-options ssl-min-ver TLSv1.3

defaults
	mode tcp
	log global
	option tcplog
	option dontlog-normal
	timeout connect 5s
	timeout client 1m
	timeout server 1m
`, m.haproxyThreads())
	in, out := global, global
	for _, p := range ports {
		inAddr := netip.AddrPortFrom(m.Httpbin.V4, uint16(haproxyInBase+p))
		app := netip.AddrPortFrom(m.Httpbin.V4, uint16(p))
		in += fmt.Sprintf(`
listen in-%d
	bind %s ssl crt %s ca-file %s verify required
	server app %s
`, p, inAddr, inPEM, m.CAFile, app)
		// no-ssl-reuse: every connection makes a full handshake, no TLS session
		// resumption between the haproxies. The mesh pays a CONNECT per connection on
		// its pooled HBONE connection, not a handshake, and no resumed session either;
		// this peer has no pool, so the connection rate shows what per-connection
		// mutual TLS costs, not what a warm session cache saves. The server's
		// certificate is verified against the mesh CA; its SPIFFE ID (a URI SAN) is
		// not checked (HAProxy's verifyhost checks DNS names).
		out += fmt.Sprintf(`
listen out-%d
	bind %s
	server in %s ssl verify required ca-file %s crt %s no-ssl-reuse
`, p, m.relayAddr(haproxyRelay, p), inAddr, m.CAFile, outPEM)
	}
	if m.relays == nil {
		m.relays = map[string][]*Proc{}
	}
	m.relays[haproxyRelay] = []*Proc{
		startHAProxy(tb, bin, dir, "haproxy-in", m.Httpbin.NS, in),
		startHAProxy(tb, bin, dir, "haproxy-out", m.Notsleep.NS, out),
	}
}

// startHAProxy runs `ip netns exec <ns> haproxy -db -f <config>` (in the foreground: no
// daemon; ip execs haproxy in place, so the Proc's PID is haproxy's) and waits until it
// listens on every bind address of the config; it is killed when the test ends.
func startHAProxy(tb testing.TB, bin, dir, name string, ns *nettest.Netns, config string) *Proc {
	tb.Helper()
	cfgFile := filepath.Join(dir, name+".cfg")
	if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
		tb.Fatal(err)
	}
	p := startProc(tb, name, exec.Command("ip", "netns", "exec", ns.Name, bin, "-db", "-f", cfgFile))
	tb.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
		if tb.Failed() {
			tb.Logf("%s log:\n%s\nconfig:\n%s", name, p.Log, config)
		}
	})
	var binds []string
	for _, line := range strings.Split(config, "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "bind" {
			binds = append(binds, f[1])
		}
	}
	deadline := time.Now().Add(readyTimeout)
	for {
		select {
		case <-p.done:
			tb.Fatalf("%s exited: %v\n%s\nconfig:\n%s", name, p.err, p.Log, config)
		default:
		}
		out, err := ns.Run("", "ss", "-Htln")
		if err != nil {
			tb.Fatal(err)
		}
		listening := 0
		for _, b := range binds {
			if strings.Contains(out, " "+b+" ") {
				listening++
			}
		}
		if listening == len(binds) {
			return p
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s not listening on %v after %v:\n%s\nss:\n%s", name, binds, readyTimeout, p.Log, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// skipLeg skips a relay leg whose relays did not start (haproxy not installed).
func (m *Mesh) skipLeg(tb testing.TB, l leg) {
	tb.Helper()
	if l.relay != "" && m.relays[l.relay] == nil {
		tb.Skipf("leg %s: %s is not installed (scripts/setup installs it)", l.name, l.relay)
	}
}

// TestHAProxyPeerTLS: the inbound haproxy speaks TLS 1.3 only, with the mesh CA's
// certificate for httpbin, and refuses a client without a certificate from the mesh CA.
func TestHAProxyPeerTLS(t *testing.T) {
	m := newBenchMesh(t, 0)
	m.skipLeg(t, peerLegs[0])
	dst := netip.AddrPortFrom(m.Httpbin.V4, uint16(haproxyInBase+closePort))
	handshake := func(cfg *tls.Config) (tls.ConnectionState, error) {
		c, err := Dial(m.Notsleep.NS, "tcp4", dst)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(ioTimeout))
		tc := tls.Client(c, cfg)
		if err := tc.Handshake(); err != nil {
			return tls.ConnectionState{}, err
		}
		// TLS 1.3: a missing client certificate is refused after the client's Finished.
		line, err := bufio.NewReader(tc).ReadString('\n')
		if err == nil && line != "bye\n" {
			err = fmt.Errorf("read %q", line)
		}
		return tc.ConnectionState(), err
	}
	roots := m.Issuer.Roots()
	cert, err := m.Issuer.Certificate(context.Background(), m.Notsleep.Identity())
	if err != nil {
		t.Fatal(err)
	}
	cs, err := handshake(&tls.Config{RootCAs: roots, ServerName: m.Httpbin.V4.String(), Certificates: []tls.Certificate{*cert},
		InsecureSkipVerify: true, MaxVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatalf("with the mesh certificate: %v", err)
	}
	if cs.Version != tls.VersionTLS13 {
		t.Errorf("TLS version %x, want 1.3", cs.Version)
	}
	if id, err := identity.FromCertificate(cs.PeerCertificates[0]); err != nil || id != m.Httpbin.Identity() {
		t.Errorf("server certificate for %v (%v), want %v", id, err, m.Httpbin.Identity())
	}
	if _, err := handshake(&tls.Config{InsecureSkipVerify: true}); err == nil {
		t.Error("without a client certificate: connected, want refused")
	}
	if _, err := handshake(&tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*cert}}); err == nil {
		t.Error("TLS 1.2: connected, want refused")
	}
}
