package e2e

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// The floor legs of the benchmarks answer "what could any pair of user-space proxies do
// on this machine?". Two relay processes (this test binary, re-executed) stand where the
// proxies stand: one in notsleep's namespace, which the client dials on loopback (as the
// capture rules would deliver it), one in httpbin's, which connects to the app locally.
// They do the least two proxies can: read, forward, close. "floor-tcp" relays plain TCP
// with splice (no copy into user space, no crypto); "floor-tls" adds mutual TLS 1.3 with
// the mesh's certificates and TLS configuration between the relays, one TLS connection
// per client connection (no HTTP/2, no policy, no telemetry, no capture rules). What the
// relays cost is the least the mesh's two proxies can cost; so a target the floor misses
// is out of reach of this design on this machine, whatever the proxy's code.

const (
	relayEnv       = "NFTMESH_E2E_RELAY" // set: this process is a relay (TestMain)
	relayPortBase  = 10000               // the outbound relay listens on 127.0.0.1:base+app port
	relayTLSOffset = 100                 // (+ this for the TLS relay)
	relayInPort    = 19443               // the inbound relay's port on httpbin's IP
	relayReadyLine = "relay ready"
	relayBufSize   = 256 << 10
)

// relayConfig configures one relay process (JSON in relayEnv).
type relayConfig struct {
	Inbound   bool     // in httpbin's namespace: accept from the other relay, connect to the app
	TLS       bool     // mutual TLS between the relays
	Listen    []string // addresses to listen on
	Upstream  string   // outbound: the inbound relay's address
	CAFile    string   // TLS: the mesh CA, to mint the relay's certificate and verify the peer's
	CAKeyFile string
	ID, Peer  string // TLS: this relay's SPIFFE ID and the one it expects of its peer (client side)
}

// relayMain runs a relay until it is killed; it returns only on a set-up error.
func relayMain(cfgJSON string) int {
	var cfg relayConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "relay: config:", err)
		return 2
	}
	var tlsCfg *tls.Config
	if cfg.TLS {
		var err error
		if tlsCfg, err = cfg.tlsConfig(); err != nil {
			fmt.Fprintln(os.Stderr, "relay:", err)
			return 2
		}
	}
	var ls []net.Listener
	for _, a := range cfg.Listen {
		l, err := net.Listen("tcp", a)
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay:", err)
			return 2
		}
		ls = append(ls, l)
	}
	fmt.Println(relayReadyLine)
	errc := make(chan error, len(ls))
	for _, l := range ls {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					errc <- err
					return
				}
				if cfg.Inbound {
					go relayInbound(c.(*net.TCPConn), tlsCfg)
				} else {
					go relayOutbound(c.(*net.TCPConn), cfg.Upstream, tlsCfg)
				}
			}
		}()
	}
	fmt.Fprintln(os.Stderr, "relay:", <-errc)
	return 1
}

func (cfg relayConfig) tlsConfig() (*tls.Config, error) {
	certPEM, err := os.ReadFile(cfg.CAFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(cfg.CAKeyFile)
	if err != nil {
		return nil, err
	}
	issuer, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{})
	if err != nil {
		return nil, err
	}
	local, err := identity.ParseID(cfg.ID)
	if err != nil {
		return nil, err
	}
	if cfg.Inbound {
		return identity.ServerTLSConfig(issuer, local), nil
	}
	peer, err := identity.ParseID(cfg.Peer)
	if err != nil {
		return nil, err
	}
	return identity.ClientTLSConfig(issuer, local, []identity.ID{peer}), nil
}

// relayOutbound forwards a client's connection to the inbound relay, after a 2-byte
// header naming the app's port (the least a tunnel must say).
func relayOutbound(c *net.TCPConn, upstream string, tlsCfg *tls.Config) {
	defer c.Close()
	appPort := netip.MustParseAddrPort(c.LocalAddr().String()).Port() - relayPortBase
	if tlsCfg != nil {
		appPort -= relayTLSOffset
	}
	raw, err := net.Dial("tcp", upstream)
	if err != nil {
		return
	}
	defer raw.Close()
	var header [2]byte
	binary.BigEndian.PutUint16(header[:], appPort)
	if tlsCfg == nil {
		if _, err := raw.Write(header[:]); err == nil {
			splicePair(c, raw.(*net.TCPConn))
		}
		return
	}
	tc := newCorked(raw.(*net.TCPConn))
	t := tls.Client(tc, tlsCfg)
	if err := t.Handshake(); err != nil {
		fmt.Fprintln(os.Stderr, "relay: handshake:", err)
		return
	}
	tc.cork = true
	if _, err := t.Write(header[:]); err != nil || tc.flush() != nil {
		return
	}
	tlsPair(c, t, tc)
}

// relayInbound accepts a connection from the outbound relay and forwards it to the app
// port its header names, on this relay's own address.
func relayInbound(c *net.TCPConn, tlsCfg *tls.Config) {
	defer c.Close()
	var peer io.ReadWriter = c
	var tc *corked
	var t *tls.Conn
	if tlsCfg != nil {
		tc = newCorked(c)
		t = tls.Server(tc, tlsCfg)
		if err := t.Handshake(); err != nil {
			fmt.Fprintln(os.Stderr, "relay: handshake:", err)
			return
		}
		tc.cork = true
		peer = t
	}
	var header [2]byte
	if _, err := io.ReadFull(peer, header[:]); err != nil {
		return
	}
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	app, err := net.Dial("tcp", netip.AddrPortFrom(local.Addr(), binary.BigEndian.Uint16(header[:])).String())
	if err != nil {
		return
	}
	defer app.Close()
	if t == nil {
		splicePair(app.(*net.TCPConn), c)
		return
	}
	tlsPair(app.(*net.TCPConn), t, tc)
}

// splicePair copies both ways (io.Copy between TCP sockets splices) and passes each
// half-close on.
func splicePair(a, b *net.TCPConn) {
	done := make(chan struct{})
	go func() {
		io.Copy(b, a)
		b.CloseWrite()
		close(done)
	}()
	io.Copy(a, b)
	a.CloseWrite()
	<-done
}

// tlsPair copies between a plain socket and a TLS connection over the corked socket tc:
// one write(2) per TLS write, however many records it makes.
func tlsPair(plain *net.TCPConn, t *tls.Conn, tc *corked) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, relayBufSize)
		for {
			n, err := plain.Read(buf)
			if n > 0 {
				if _, werr := t.Write(buf[:n]); werr != nil || tc.flush() != nil {
					tc.c.Close() // ends the other direction's copy too
					return
				}
			}
			if err != nil {
				tc.flush()
				tc.cork = false // CloseWrite's close_notify goes straight out
				t.CloseWrite()
				tc.c.CloseWrite()
				return
			}
		}
	}()
	buf := make([]byte, relayBufSize)
	io.CopyBuffer(struct{ io.Writer }{plain}, struct{ io.Reader }{t}, buf)
	plain.CloseWrite()
	<-done
}

// corked buffers writes (TLS records) until flush, once corked (after the handshake),
// and reads in large chunks.
type corked struct {
	c    *net.TCPConn
	r    *bufio.Reader
	w    *bufio.Writer
	cork bool
}

func newCorked(c *net.TCPConn) *corked {
	return &corked{c: c, r: bufio.NewReaderSize(c, 64<<10), w: bufio.NewWriterSize(c, relayBufSize+(64<<10))}
}

func (c *corked) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *corked) Write(p []byte) (int, error) {
	if !c.cork {
		return c.c.Write(p)
	}
	return c.w.Write(p)
}

func (c *corked) flush() error                       { return c.w.Flush() }
func (c *corked) Close() error                       { return c.c.Close() }
func (c *corked) LocalAddr() net.Addr                { return c.c.LocalAddr() }
func (c *corked) RemoteAddr() net.Addr               { return c.c.RemoteAddr() }
func (c *corked) SetDeadline(t time.Time) error      { return c.c.SetDeadline(t) }
func (c *corked) SetReadDeadline(t time.Time) error  { return c.c.SetReadDeadline(t) }
func (c *corked) SetWriteDeadline(t time.Time) error { return c.c.SetWriteDeadline(t) }

// startRelays starts the floor relays of one kind ("tcp" or "tls"; or the "haproxy" peer) for the given app
// ports: the outbound one in notsleep's namespace, the inbound one in httpbin's.
func (m *Mesh) startRelays(tb testing.TB, kind string, ports ...int) {
	tb.Helper()
	if kind == haproxyRelay { // a peer leg (haproxy_test.go)
		m.startHAProxies(tb, ports...)
		return
	}
	upstream := netip.AddrPortFrom(m.Httpbin.V4, relayInPort)
	if kind == "tls" {
		upstream = netip.AddrPortFrom(m.Httpbin.V4, relayInPort+1)
	}
	in := relayConfig{
		Inbound: true, TLS: kind == "tls", Listen: []string{upstream.String()},
		CAFile: m.CAFile, CAKeyFile: m.CAKeyFile, ID: m.Httpbin.Identity().String(),
	}
	out := relayConfig{
		TLS: kind == "tls", Upstream: upstream.String(),
		CAFile: m.CAFile, CAKeyFile: m.CAKeyFile, ID: m.Notsleep.Identity().String(), Peer: m.Httpbin.Identity().String(),
	}
	for _, p := range ports {
		out.Listen = append(out.Listen, m.relayAddr(kind, p).String())
	}
	if m.relays == nil {
		m.relays = map[string][]*Proc{}
	}
	m.relays[kind] = []*Proc{
		startRelay(tb, "relay-in-"+kind, m.Httpbin.NS, in, m.workers),
		startRelay(tb, "relay-out-"+kind, m.Notsleep.NS, out, m.workers),
	}
}

// relayAddr is where a client in notsleep dials the outbound relay of kind for app port.
func (m *Mesh) relayAddr(kind string, appPort int) netip.AddrPort {
	port := relayPortBase + appPort
	switch kind {
	case "tls":
		port += relayTLSOffset
	case haproxyRelay:
		port += haproxyOutOffset
	}
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
}

// startRelay starts one relay process; workers > 0 sets its GOMAXPROCS (as many threads
// as the proxies get), 0 leaves Go's default.
func startRelay(tb testing.TB, name string, ns *nettest.Netns, cfg relayConfig, workers int) *Proc {
	tb.Helper()
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns.Name, self)
	cmd.Env = append(os.Environ(), relayEnv+"="+string(cfgJSON))
	if workers > 0 {
		cmd.Env = append(cmd.Env, "GOMAXPROCS="+strconv.Itoa(workers))
	}
	p := startProc(tb, name, cmd)
	tb.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
		if tb.Failed() {
			tb.Logf("relay %s log:\n%s", name, p.Log)
		}
	})
	deadline := time.Now().Add(readyTimeout)
	for !strings.Contains(p.Log.String(), relayReadyLine) {
		select {
		case <-p.done:
			tb.Fatalf("relay %s exited: %v\n%s", name, p.err, p.Log)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			tb.Fatalf("relay %s not ready after %v:\n%s", name, readyTimeout, p.Log)
		}
	}
	return p
}

// TestFloorRelays: the benchmarks' relays (and the peer legs' proxies) carry what they must (so that a floor is never
// the cost of a relay that dropped the work): a stream and its half-close, request and
// response in turn, and a server that speaks first and closes.
func TestFloorRelays(t *testing.T) {
	m := newBenchMesh(t, 0)
	m.setLeg(false)
	for _, l := range slices.Concat(floorLegs, peerLegs) {
		t.Run(l.name, func(t *testing.T) {
			m.skipLeg(t, l)
			dial := func(port int) net.Conn {
				c, err := Dial(m.Notsleep.NS, "tcp4", m.target(l, port))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				c.SetDeadline(time.Now().Add(ioTimeout))
				return c
			}
			c := dial(sinkPort)
			const size = 4 << 20
			if _, err := c.Write(make([]byte, size)); err != nil {
				t.Fatal(err)
			}
			c.(*net.TCPConn).CloseWrite()
			var n int64
			if err := binary.Read(c, binary.BigEndian, &n); err != nil || n != size {
				t.Errorf("stream: the app counted %d bytes (%v), want %d", n, err, size)
			}
			c = dial(rrPort)
			req, resp := make([]byte, rrSize), make([]byte, rrSize)
			for i := range 3 {
				req[0] = byte(i)
				if _, err := c.Write(req); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(c, resp); err != nil || resp[0] != byte(i) {
					t.Fatalf("round trip %d: %v, first byte %d", i, err, resp[0])
				}
			}
			c = dial(closePort)
			if b, err := io.ReadAll(c); err != nil || string(b) != "bye\n" {
				t.Errorf("server first: %q, %v; want the line, then EOF", b, err)
			}
		})
	}
}
