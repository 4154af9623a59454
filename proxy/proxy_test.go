package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/zds"
)

// meshFixture is two enrolled pods, "sleep" (the topology's pod) and "httpbin" (its
// remote), with in-pod rules applied and one in-process proxy serving both, and an app
// on httpbin:8080 that answers each connection with the peer address it sees, then echoes.
type meshFixture struct {
	tp       *nettest.Topology
	proxy    *Proxy
	policies *policy.Store
	reg      *prometheus.Registry
	logs     *nettest.SyncBuffer
}

func newMesh(t *testing.T, capture compiler.CaptureMode) *meshFixture {
	t.Helper()
	nettest.Require(t, "nft")
	tp := nettest.NewTopology(t)
	in := compiler.DefaultIntent()
	in.Spec.InboundCapture = &capture
	d, err := compiler.PodState(in, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := dataplane.NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), 0)
	t.Cleanup(func() { m.Close() }) // its cached sockets in the test's namespaces
	for _, ns := range []*nettest.Netns{tp.Pod, tp.Remote} {
		if _, err := m.Apply(ns.Handle, d); err != nil {
			t.Fatal(err)
		}
	}
	certPEM, keyPEM, err := identity.GenerateRoot("cluster.local", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	issuer, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	store, err := workload.NewStatic(&workload.File{Workloads: []workload.Workload{
		{UID: "u-sleep", Name: "sleep", Namespace: "demo", ServiceAccount: "sleep", InMesh: true,
			IPs: []netip.Addr{tp.IPv4.Pod, tp.IPv6.Pod}, Labels: map[string]string{"app": "sleep", "version": "v1"}},
		{UID: "u-httpbin", Name: "httpbin", Namespace: "demo", ServiceAccount: "httpbin", InMesh: true,
			IPs: []netip.Addr{tp.IPv4.Remote, tp.IPv6.Remote}, Labels: map[string]string{"app": "httpbin", "version": "v2"}},
		{UID: "u-gone", Name: "httpbin-old", Namespace: "demo", ServiceAccount: "httpbin", InMesh: true,
			IPs: []netip.Addr{netip.MustParseAddr("10.248.9.9")}},
		{UID: "u-legacy", Name: "legacy", Namespace: "demo", IPs: []netip.Addr{legacyIP}}, // not in the mesh
	}, Services: []workload.Service{{
		Name: "httpbin", Namespace: "demo", VIPs: []netip.Addr{serviceVIP},
		Ports:     []workload.ServicePort{{Port: 80, TargetPort: 8080}},
		Endpoints: []workload.EndpointInfo{{UID: "u-httpbin", Ready: true}, {UID: "u-gone", Ready: false}},
	}, {
		Name: "legacy", Namespace: "demo", VIPs: []netip.Addr{legacyVIP},
		Ports:     []workload.ServicePort{{Port: 80, TargetPort: 8080}},
		Endpoints: []workload.EndpointInfo{{UID: "u-legacy", Ready: true}},
	}, {
		Name: "drained", Namespace: "demo", VIPs: []netip.Addr{drainedVIP},
		Ports:     []workload.ServicePort{{Port: 80, TargetPort: 8080}},
		Endpoints: []workload.EndpointInfo{{UID: "u-gone", Ready: false}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	f := &meshFixture{tp: tp, policies: policy.NewStore(policy.Options{}), reg: prometheus.NewRegistry(), logs: &nettest.SyncBuffer{}}
	log := slog.New(slog.NewTextHandler(f.logs, nil))
	f.proxy = New(Config{ShutdownDeadline: time.Second}, issuer, store, f.policies, NewMetrics(f.reg, "Kubernetes"), log)
	ctx, cancel := context.WithCancel(context.Background())
	go f.proxy.WatchPolicies(ctx)
	t.Cleanup(func() {
		cancel()
		sctx, c := context.WithTimeout(context.Background(), 3*time.Second)
		defer c()
		f.proxy.Shutdown(sctx)
	})
	for _, w := range []struct {
		uid, name, sa string
		ns            *nettest.Netns
	}{{"u-sleep", "sleep", "sleep", tp.Pod}, {"u-httpbin", "httpbin", "httpbin", tp.Remote}} {
		file, err := netns.Open(w.ns.Path)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.proxy.AddWorkload(ctx, w.uid, zds.WorkloadInfo{Name: w.name, Namespace: "demo", ServiceAccount: w.sa}, file); err != nil {
			t.Fatal(err)
		}
	}
	// The app: one line with the peer address it sees, then echo.
	for _, fam := range tp.Families() {
		var l net.Listener
		if err := tp.Remote.Do(func() (err error) {
			l, err = net.Listen(fam.TCP, net.JoinHostPort(fam.Remote.String(), "8080"))
			return
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					fmt.Fprintf(c, "%s\n", c.RemoteAddr())
					// Plain Reader and Writer: no splice. Go pools splice pipes in a
					// sync.Pool that only the GC empties, which blurs the leak test's
					// descriptor count under load.
					io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c})
				}()
			}
		}()
	}
	return f
}

// dialFrom connects from inside ns (an app socket: no mark, so the rules capture it).
func dialFrom(t *testing.T, ns *nettest.Netns, network string, dst netip.AddrPort) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.DialTimeout(network, dst.String(), 3*time.Second)
		return
	})
	return c, err
}

// roundTrip reads the app's greeting (the source it saw) and checks an echo.
func roundTrip(c net.Conn) (string, error) {
	c.SetDeadline(time.Now().Add(3 * time.Second))
	r := bufio.NewReader(c)
	seen, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("greeting: %w", err)
	}
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return "", err
	}
	echo, err := r.ReadString('\n')
	if err != nil || echo != "ping\n" {
		return "", fmt.Errorf("echo %q: %v", echo, err)
	}
	return strings.TrimSpace(seen), nil
}

func TestMeshHBONE(t *testing.T) {
	for _, mode := range []compiler.CaptureMode{compiler.CaptureTProxy, compiler.CaptureRedirect} {
		t.Run(string(mode), func(t *testing.T) {
			f := newMesh(t, mode)
			for _, fam := range f.tp.Families() {
				c, err := dialFrom(t, f.tp.Pod, fam.TCP, netip.AddrPortFrom(fam.Remote, 8080))
				if err != nil {
					t.Fatalf("%s: dial: %v", fam.Name, err)
				}
				seen, err := roundTrip(c)
				c.Close()
				if err != nil {
					t.Fatalf("%s: %v\nlogs:\n%s", fam.Name, err, f.logs)
				}
				if ap, _ := netip.ParseAddrPort(seen); ap.Addr() != fam.Pod {
					t.Errorf("%s: the app saw %s, want the client pod's IP %s", fam.Name, seen, fam.Pod)
				}
			}
			time.Sleep(100 * time.Millisecond)
			opened := testutil.ToFloat64(f.proxy.metrics.opened.With(prometheusLabels("destination", true)))
			if opened < 2 {
				t.Errorf("inbound mTLS connections opened = %v, want 2\n%s", opened, f.logs)
			}
			// Bytes towards the app (received_bytes) count on the destination too (the tunnel
			// writes them with writev, which must not slip past the counting).
			l := prometheusLabels("destination", true)
			if sent, rcv := testutil.ToFloat64(f.proxy.metrics.sent.With(l)), testutil.ToFloat64(f.proxy.metrics.received.With(l)); sent < 10 || rcv < 10 {
				t.Errorf("inbound bytes sent %v, received %v; want both counted", sent, rcv)
			}
			if !strings.Contains(f.logs.String(), "connection complete") || !strings.Contains(f.logs.String(), "src.identity=spiffe://cluster.local/ns/demo/sa/sleep") {
				t.Errorf("no access log line with the source identity:\n%s", f.logs)
			}
		})
	}
}

// TestByteDirections: the byte counters and access log lines tell request from response as
// Istio and ztunnel do. One connection, sleep to httpbin: the request is "ping\n" (5 bytes),
// the response the app's greeting line plus the echo. For both reporters,
// istio_tcp_received_bytes_total counts the request and istio_tcp_sent_bytes_total the
// response; the outbound log line's bytes_sent is the request, the inbound's the response.
func TestByteDirections(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	c, err := dialFrom(t, f.tp.Pod, fam.TCP, netip.AddrPortFrom(fam.Remote, 8080))
	if err != nil {
		t.Fatal(err)
	}
	seen, err := roundTrip(c)
	if err != nil {
		t.Fatalf("%v\n%s", err, f.logs)
	}
	c.Close()
	request, response := 5, len(seen)+1+5
	want := map[string]string{
		"direction=outbound": fmt.Sprintf("bytes_sent=%d bytes_recv=%d", request, response),
		"direction=inbound":  fmt.Sprintf("bytes_sent=%d bytes_recv=%d", response, request),
	}
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		missing := 0
		for dir, bytes := range want {
			found := false
			for _, line := range strings.Split(f.logs.String(), "\n") {
				if strings.Contains(line, "connection complete") && strings.Contains(line, dir) && strings.Contains(line, bytes) {
					found = true
				}
			}
			if !found {
				missing++
				if time.Now().After(deadline) {
					t.Errorf("no %s access log line with %s:\n%s", dir, bytes, f.logs)
				}
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			break
		}
	}
	if !regexp.MustCompile(`msg="connection complete".* duration=[0-9]+ms`).MatchString(f.logs.String()) {
		t.Errorf("no access log line with ztunnel's duration format (12ms):\n%s", f.logs)
	}
	for _, reporter := range []string{"source", "destination"} {
		l := prometheusLabels(reporter, true)
		sent := testutil.ToFloat64(f.proxy.metrics.sent.With(l))
		received := testutil.ToFloat64(f.proxy.metrics.received.With(l))
		if received != float64(request) || sent != float64(response) {
			t.Errorf("reporter %s: istio_tcp_received_bytes_total %v, istio_tcp_sent_bytes_total %v; want %d (request), %d (response)",
				reporter, received, sent, request, response)
		}
	}
}

// TestConnectFailureFlag: a tunnel to a port where the app does not listen ends for the
// client, and both reporters count it closed with ztunnel's response flag CONNECT.
func TestConnectFailureFlag(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	c, err := dialFrom(t, f.tp.Pod, fam.TCP, netip.AddrPortFrom(fam.Remote, 8081))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || n != 0 {
		t.Errorf("read through a tunnel to a closed port: %d bytes, %v; want the connection ended", n, err)
	}
	c.Close()
	for _, reporter := range []string{"source", "destination"} {
		l := prometheusLabels(reporter, true)
		l["response_flags"] = "CONNECT"
		// No service targets 8081.
		l["destination_service"], l["destination_service_name"], l["destination_service_namespace"] = "unknown", "unknown", "unknown"
		var closed float64
		for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if closed = testutil.ToFloat64(f.proxy.metrics.closed.With(l)); closed == 1 {
				break
			}
		}
		if closed != 1 {
			t.Errorf("reporter %s: closed with response_flags CONNECT = %v, want 1\n%s", reporter, closed, f.logs)
		}
	}
	if !strings.Contains(f.logs.String(), `level=ERROR msg="connection complete"`) {
		t.Errorf("no access log line at Error for the failed connection (ztunnel logs them so):\n%s", f.logs)
	}
}

// serviceVIP is a service address no interface has: only the proxy knows where it goes.
// So are legacyVIP (a service whose endpoint, legacyIP, is outside the mesh) and
// drainedVIP (a service with no ready endpoint).
var (
	serviceVIP = netip.MustParseAddr("10.96.0.10")
	legacyVIP  = netip.MustParseAddr("10.96.0.11")
	drainedVIP = netip.MustParseAddr("10.96.0.12")
	legacyIP   = netip.MustParseAddr("10.248.2.3") // added to the remote's eth0 by the test that uses it
)

// TestServiceOutsideTheMesh: a service whose endpoint is outside the mesh is reached as
// ztunnel reaches it, plain TCP straight to the endpoint it picked (no VIP is routable
// here, so a dial to the VIP would fail), and a service without a ready endpoint is refused.
func TestServiceOutsideTheMesh(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	f.tp.Remote.IP(t, "addr add "+legacyIP.String()+"/24 dev eth0")
	var l net.Listener
	if err := f.tp.Remote.Do(func() (err error) {
		l, err = net.Listen("tcp4", netip.AddrPortFrom(legacyIP, 8080).String())
		return
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	c, err := dialFrom(t, f.tp.Pod, "tcp4", netip.AddrPortFrom(legacyVIP, 80))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if ap, _ := netip.ParseAddrPort(strings.TrimSpace(line)); err != nil || ap.Addr() != f.tp.IPv4.Pod {
		t.Fatalf("through the legacy service: %q, %v; want the app's line with the client pod's IP\n%s", line, err, f.logs)
	}
	// Refused: reset as soon as the proxy has the connection (which may be before the
	// client's connect returns).
	if c, err = dialFrom(t, f.tp.Pod, "tcp4", netip.AddrPortFrom(drainedVIP, 80)); err == nil {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, io.EOF) {
		t.Errorf("through a service with no ready endpoint: %v; want the connection ended at once", err)
	}
	for _, want := range []string{
		"dst.addr=" + netip.AddrPortFrom(legacyIP, 8080).String() + " dst.hbone_addr=none dst.service=legacy.demo.svc.cluster.local dst.workload=legacy",
		"dst.service=drained.demo.svc.cluster.local",
		"service demo/drained: no ready endpoint",
	} {
		for deadline := time.Now().Add(3 * time.Second); !strings.Contains(f.logs.String(), want); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Errorf("no access log line with %q:\n%s", want, f.logs)
				break
			}
		}
	}
}

// Outbound to a service VIP picks the ready endpoint (never the unready one, which does
// not exist) and tunnels straight to it, on the target port.
func TestServiceVIP(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	for i := 0; i < 3; i++ {
		c, err := dialFrom(t, f.tp.Pod, "tcp4", netip.AddrPortFrom(serviceVIP, 80))
		if err != nil {
			t.Fatalf("dial the VIP: %v", err)
		}
		seen, err := roundTrip(c)
		c.Close()
		if err != nil {
			t.Fatalf("%v\n%s", err, f.logs)
		}
		if ap, _ := netip.ParseAddrPort(seen); ap.Addr() != f.tp.IPv4.Pod {
			t.Errorf("the app saw %s, want the client pod's IP", seen)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if !strings.Contains(f.logs.String(), "dst.hbone_addr="+netip.AddrPortFrom(f.tp.IPv4.Remote, 8080).String()) {
		t.Errorf("no tunnel to httpbin:8080 in the access log:\n%s", f.logs)
	}
	if !strings.Contains(f.logs.String(), "dst.service=httpbin.demo.svc.cluster.local") {
		t.Errorf("no dst.service in the access log:\n%s", f.logs)
	}
	for _, reporter := range []string{"source", "destination"} {
		// The destination sees a pod IP; it names the service whose endpoint and target
		// port the connection reached.
		l := prometheusLabels(reporter, true)
		l["destination_service"] = "httpbin.demo.svc.cluster.local"
		l["destination_service_name"], l["destination_service_namespace"] = "httpbin", "demo"
		if n := testutil.ToFloat64(f.proxy.metrics.opened.With(l)); n != 3 {
			t.Errorf("%s: connections to the service = %v, want 3", reporter, n)
		}
	}
}

// prometheusLabels are the labels of sleep's connections to httpbin:8080 as reporter sees
// them (the destination names the service whose endpoint and target port it is).
func prometheusLabels(reporter string, mtls bool) map[string]string {
	c := &connInfo{direction: map[string]string{"destination": "inbound", "source": "outbound"}[reporter], mtls: mtls,
		srcWorkload: "sleep", srcNamespace: "demo", srcIdentity: "spiffe://cluster.local/ns/demo/sa/sleep",
		srcLabels: map[string]string{"version": "v1"}, dstLabels: map[string]string{"version": "v2"},
		dstWorkload: "httpbin", dstNamespace: "demo", dstIdentity: "spiffe://cluster.local/ns/demo/sa/httpbin"}
	if reporter == "destination" {
		c.dstService = &workload.Service{Name: "httpbin", Namespace: "demo"}
	}
	return c.labels("Kubernetes")
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// settle waits until f() is at most want, or the deadline passes, and returns the last value.
func settle(want int, f func() int) int {
	deadline := time.Now().Add(2 * time.Second)
	n := f()
	for n > want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		n = f()
	}
	return n
}

// spareCount is the number of spare sockets the proxy holds.
func (p *Proxy) spareCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, i := range p.instances {
		i.spares.mu.Lock()
		for _, fds := range i.spares.free {
			n += len(fds)
		}
		i.spares.mu.Unlock()
	}
	return n
}

// Connections through the proxy leave nothing behind: after a warm-up (which opens the
// pooled HBONE connection and the workers), many connections opened and closed, in order
// or by reset, return the goroutine and descriptor counts to where they were.
func TestNoLeakPerConnection(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	dst := netip.AddrPortFrom(fam.Remote, 8080)
	once := func(reset bool) {
		c, err := dialFrom(t, f.tp.Pod, fam.TCP, dst)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := roundTrip(c); err != nil {
			t.Fatalf("%v\n%s", err, f.logs)
		}
		if reset {
			c.(*net.TCPConn).SetLinger(0)
		}
		c.Close()
	}
	for i := 0; i < 5; i++ {
		once(false)
	}
	// Pooled HBONE connections are not per-connection state: the pool may open another
	// one (x/net counts reset streams until the peer acknowledges them) and keeps it until
	// it idles out. Each costs two descriptors here (both ends live in this process).
	// Spare sockets (made eight at a time for dials from a pod) are not per-connection
	// state either: count descriptors without them.
	fds := func() int { return fdCount(t) - f.proxy.spareCount() }
	time.Sleep(200 * time.Millisecond)
	baseG, baseFD, baseH := runtime.NumGoroutine(), fds(), hboneConns(t, f.tp.Pod)
	var afterG, afterFD [2]int
	for round := 0; round < 2; round++ {
		for i := 0; i < 60; i++ {
			once(i%3 == 0)
		}
		afterG[round] = settle(baseG, runtime.NumGoroutine)
		pooled := hboneConns(t, f.tp.Pod) - baseH
		afterFD[round] = settle(baseFD, fds) - 2*pooled
		afterG[round] -= 8 * pooled // a pooled connection's read, write and ping goroutines, both ends
	}
	t.Logf("goroutines %d -> %v, fds %d -> %v (pooled HBONE connections discounted)", baseG, afterG, baseFD, afterFD)
	// A leak grows with the connections: 60 per round would show as dozens.
	for round := 0; round < 2; round++ {
		if afterG[round] > baseG+4 {
			t.Errorf("goroutines: %d before, %v after each round of 60 connections", baseG, afterG)
		}
		if afterFD[round] > baseFD+8 { // slack: sockets still closing
			t.Errorf("file descriptors: %d before, %v after each round of 60 connections", baseFD, afterFD)
		}
	}
}

// TestAddWorkloadFailsWhole: when a pod's listeners cannot all open (here 15008 is taken
// by a socket without SO_REUSEPORT), AddWorkload fails and leaves nothing behind: no
// listener, no descriptor (the namespace's included), no goroutine.
func TestAddWorkloadFailsWhole(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	ns := nettest.New(t)
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	var squatter net.Listener
	if err := ns.Do(func() (err error) {
		squatter, err = net.Listen("tcp4", "0.0.0.0:15008")
		return
	}); err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	time.Sleep(100 * time.Millisecond)
	baseG, baseFD := runtime.NumGoroutine(), fdCount(t)
	file, err := netns.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	err = f.proxy.AddWorkload(context.Background(), "u-squat", zds.WorkloadInfo{Name: "squat", Namespace: "demo"}, file)
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("AddWorkload: %v, want address in use", err)
	}
	if g, fds := settle(baseG, runtime.NumGoroutine), settle(baseFD, func() int { return fdCount(t) }); g > baseG || fds > baseFD {
		t.Errorf("after the failed add: goroutines %d -> %d, descriptors %d -> %d", baseG, g, baseFD, fds)
	}
	// 15001 opened before 15008 failed: it must be closed again.
	if listensOn(t, ns, 15001) {
		t.Error("the outbound listener is still open after the failed add")
	}
}

// session connects from ns to dst (an app there, captured by its rules), reads the greeting
// and checks an echo; the connection closes when the test ends, if not before.
func session(t *testing.T, ns *nettest.Netns, dst netip.AddrPort) net.Conn {
	t.Helper()
	c, err := dialFrom(t, ns, "tcp4", dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := roundTrip(c); err != nil {
		t.Fatal(err)
	}
	return c
}

// hboneConns counts the established connections to port 15008 in ns.
func hboneConns(t *testing.T, ns *nettest.Netns) int {
	t.Helper()
	out, err := ns.Run("", "ss", "-Htn", "state", "established", "dport", "= :15008")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(out, "\n")
}

// listensOn reports whether a TCP socket listens on port in ns. (A connection would not
// tell: the proxy resets one to its own port.)
func listensOn(t *testing.T, ns *nettest.Netns, port uint16) bool {
	t.Helper()
	out, err := ns.Run("", "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out) != ""
}

// TestOwnPortsRefused: a plaintext connection to a pod's 15006 (from anywhere that reaches
// the pod), or from a pod to its own 15001, is refused at once. Delivered, it would reach
// a proxy listener again and loop until the process ran out of descriptors.
func TestOwnPortsRefused(t *testing.T) {
	for _, mode := range []compiler.CaptureMode{compiler.CaptureTProxy, compiler.CaptureRedirect} {
		t.Run(string(mode), func(t *testing.T) {
			f := newMesh(t, mode)
			fam := f.tp.IPv4
			base := fdCount(t)
			for _, c := range []struct {
				name string
				from *nettest.Netns
				dst  netip.AddrPort
			}{
				{"node to httpbin:15006", f.tp.Node, netip.AddrPortFrom(fam.Remote, 15006)},
				{"sleep to its own 15001", f.tp.Pod, netip.AddrPortFrom(fam.Pod, 15001)},
			} {
				conn, err := dialFrom(t, c.from, fam.TCP, c.dst)
				if err == nil {
					conn.SetDeadline(time.Now().Add(3 * time.Second))
					_, err = conn.Read(make([]byte, 1))
					conn.Close()
				}
				if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, io.EOF) {
					t.Errorf("%s: %v, want the connection refused at once", c.name, err)
				}
			}
			// A loop would have opened thousands by now.
			if n := settle(base+8, func() int { return fdCount(t) }); n > base+8 {
				t.Errorf("descriptors: %d before, %d after", base, n)
			}
			if !strings.Contains(f.logs.String(), "refused a connection to the proxy's own port") {
				t.Errorf("no log line for the refusals:\n%s", f.logs)
			}
		})
	}
}

// flakyListener fails its first Accept as an exhausted descriptor table does.
type flakyListener struct {
	net.Listener
	failed atomic.Bool
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if !l.failed.Swap(true) {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// TestAcceptLoopRetries: a temporary accept error (EMFILE) does not end a pod's listener.
func TestAcceptLoopRetries(t *testing.T) {
	inner, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &nettest.SyncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	i := &instance{p: &Proxy{log: slog.New(slog.NewTextHandler(logs, nil))}, uid: "u-test", ctx: ctx}
	served := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		i.acceptLoop(&flakyListener{Listener: inner}, func(c *net.TCPConn) { c.Close(); served <- struct{}{} })
	}()
	defer func() { cancel(); inner.Close(); <-done; i.wg.Wait() }()
	c, err := net.Dial("tcp4", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case <-served:
	case <-done:
		t.Fatalf("the accept loop ended on a temporary error:\n%s", logs)
	case <-time.After(5 * time.Second):
		t.Fatalf("connection not served after a temporary accept error:\n%s", logs)
	}
	if !strings.Contains(logs.String(), "accept failed; retrying") {
		t.Errorf("the retry was not logged:\n%s", logs)
	}
}

// TestAddWorkloadChecksInfo: an Add whose workload info cannot name an identity fails,
// naming the field, before any listener opens (the agent gets an error Ack).
func TestAddWorkloadChecksInfo(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	ns := nettest.New(t)
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	base := fdCount(t)
	for _, c := range []struct {
		info zds.WorkloadInfo
		want string
	}{
		{zds.WorkloadInfo{}, "workload_info.name is empty"},
		{zds.WorkloadInfo{Name: "p"}, "workload_info.namespace is empty"},
		{zds.WorkloadInfo{Name: "p", Namespace: "demo", ServiceAccount: "a/b"}, `service_account "a/b"`},
	} {
		file, err := netns.Open(ns.Path)
		if err != nil {
			t.Fatal(err)
		}
		err = f.proxy.AddWorkload(context.Background(), "u-bad", c.info, file)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("AddWorkload(%+v): %v, want an error with %q", c.info, err, c.want)
		}
	}
	if n := settle(base, func() int { return fdCount(t) }); n > base {
		t.Errorf("descriptors: %d before, %d after the refused adds", base, n)
	}
	if listensOn(t, ns, 15001) {
		t.Error("a listener opened for a refused add")
	}
}

// TestDelAcksBeforeDrain: deleting a pod with a live connection returns at once (the agent
// waits for the Ack only 5 s, ztunnel acks at once), and the connection is still drained:
// closed when the shutdown deadline (1 s here) passes.
func TestDelAcksBeforeDrain(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	c := session(t, f.tp.Pod, netip.AddrPortFrom(fam.Remote, 8080))
	start := time.Now()
	if err := f.proxy.DelWorkload(context.Background(), "u-httpbin"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 300*time.Millisecond {
		t.Errorf("DelWorkload took %v with a live connection, want it to return before the drain", d)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the live connection was not closed at the drain deadline")
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Errorf("the live connection ended after %v, before the 1 s drain deadline", d)
	}
	for deadline := time.Now().Add(3 * time.Second); !strings.Contains(f.logs.String(), `msg="workload drained" uid=u-httpbin`); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no drained log line:\n%s", f.logs)
		}
	}
}

// TestReAddNewNamespace: the agent re-sends a pod in a new network namespace (kubelet
// recreated its sandbox): the proxy serves the new namespace and lets the old go. The same
// namespace re-sent (after a reconnect) keeps the running instance.
func TestReAddNewNamespace(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	info := zds.WorkloadInfo{Name: "recreated", Namespace: "demo", ServiceAccount: "sleep"}
	add := func(ns *nettest.Netns) {
		t.Helper()
		file, err := netns.Open(ns.Path)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.proxy.AddWorkload(context.Background(), "u-recreated", info, file); err != nil {
			t.Fatal(err)
		}
	}
	listening := func(ns *nettest.Netns) bool { return listensOn(t, ns, 15001) }
	old, recreated := nettest.New(t), nettest.New(t)
	for _, ns := range []*nettest.Netns{old, recreated} {
		ns.MustRun(t, "ip", "link", "set", "lo", "up")
	}
	add(old)
	if !listening(old) {
		t.Fatal("no listener after the first add")
	}
	add(recreated)
	if !listening(recreated) {
		t.Errorf("the new namespace has no listener after the re-add")
	}
	if listening(old) {
		t.Errorf("the old namespace still has the proxy's listener")
	}
	add(recreated) // the same namespace again: kept, not restarted
	if !listening(recreated) {
		t.Errorf("re-sending the same namespace stopped its listener")
	}
	if n := strings.Count(f.logs.String(), `msg="workload removed; draining" uid=u-recreated`); n != 1 {
		t.Errorf("%d drains of u-recreated, want 1 (the old namespace's):\n%s", n, f.logs)
	}
}

// listeners counts the TCP sockets listening on port in ns (with SO_REUSEPORT, two
// instances in one namespace would be two).
// listeners counts the IPv4 listeners on port in ns (a pod whose IPs the store does not
// know also gets IPv6 ones).
func listeners(t *testing.T, ns *nettest.Netns, port uint16) int {
	t.Helper()
	out, err := ns.Run("", "ss", "-4Hltn", fmt.Sprintf("sport = :%d", port))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(out, "\n")
}

// TestTwoPodsOneNamespace: an Add of a second pod UID in a namespace a pod already has is
// refused with an error naming that pod (its listeners would share the first pod's
// connections through SO_REUSEPORT, under another identity), and the first pod keeps
// serving. Once the namespace is free (the first pod moved to a new one), it may be used.
func TestTwoPodsOneNamespace(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	add := func(uid, name string, ns *nettest.Netns) error {
		t.Helper()
		file, err := netns.Open(ns.Path)
		if err != nil {
			t.Fatal(err)
		}
		return f.proxy.AddWorkload(context.Background(), uid, zds.WorkloadInfo{Name: name, Namespace: "demo", ServiceAccount: "sleep"}, file)
	}
	shared, fresh := nettest.New(t), nettest.New(t)
	for _, ns := range []*nettest.Netns{shared, fresh} {
		ns.MustRun(t, "ip", "link", "set", "lo", "up")
	}
	if err := add("u-first", "first", shared); err != nil {
		t.Fatal(err)
	}
	base := fdCount(t)
	err := add("u-second", "second", shared)
	if err == nil || !strings.Contains(err.Error(), "u-second") || !strings.Contains(err.Error(), "already pod u-first's (demo/first)") {
		t.Fatalf("second pod in the first's namespace: %v, want an error naming u-first", err)
	}
	if n := listeners(t, shared, 15001); n != 1 {
		t.Errorf("%d listeners on 15001 in the shared namespace, want the first pod's alone", n)
	}
	if n := settle(base, func() int { return fdCount(t) }); n > base {
		t.Errorf("descriptors: %d before, %d after the refused add", base, n)
	}
	// The same pod re-sent in its namespace is kept; in a new one, it moves.
	if err := add("u-first", "first", shared); err != nil {
		t.Errorf("re-sending the first pod: %v", err)
	}
	if err := add("u-first", "first", fresh); err != nil {
		t.Fatalf("the first pod in a new namespace: %v", err)
	}
	// Now fresh is the first pod's, and shared is free.
	if err := add("u-second", "second", fresh); err == nil || !strings.Contains(err.Error(), "u-first") {
		t.Errorf("second pod in the first's new namespace: %v, want an error naming u-first", err)
	}
	if err := add("u-second", "second", shared); err != nil {
		t.Errorf("second pod in the namespace the first left: %v", err)
	}
	for _, ns := range []*nettest.Netns{shared, fresh} {
		if n := listeners(t, ns, 15001); n != 1 {
			t.Errorf("%s: %d listeners on 15001, want 1", ns.Name, n)
		}
	}
}

// TestOwnPortsOnlyTheListeners: an app in a captured pod may listen on the proxy's other
// well-known ports (15000, 15020, 15021): only 15001, 15006 and 15008 are refused, as
// ztunnel refuses them.
func TestOwnPortsOnlyTheListeners(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	for _, port := range []uint16{15000, 15020, 15021} {
		var l net.Listener
		if err := f.tp.Remote.Do(func() (err error) {
			l, err = net.Listen("tcp4", netip.AddrPortFrom(fam.Remote, port).String())
			return
		}); err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "hello from %d\n", port)
				c.Close()
			}
		}()
		c, err := dialFrom(t, f.tp.Node, "tcp4", netip.AddrPortFrom(fam.Remote, port))
		if err != nil {
			t.Fatalf("%d: %v", port, err)
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if line != fmt.Sprintf("hello from %d\n", port) {
			t.Errorf("plaintext to the app's port %d: %q, %v", port, line, err)
		}
	}
}

// TestPolicyCutResetsApp: a plaintext connection a policy change cuts ends with a reset at
// the app too, not a FIN: a request cut short must not look complete.
func TestPolicyCutResetsApp(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	var l net.Listener
	if err := f.tp.Remote.Do(func() (err error) {
		l, err = net.Listen("tcp4", netip.AddrPortFrom(fam.Remote, 9090).String())
		return
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		buf := make([]byte, 64)
		for {
			if _, err := c.Read(buf); err != nil {
				got <- err
				return
			}
		}
	}()
	c, err := dialFrom(t, f.tp.Node, "tcp4", netip.AddrPortFrom(fam.Remote, 9090))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("part of a request")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // delivered, both copies waiting
	ps, err := policy.Parse([]byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY, rules: [{}]}\n"), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.policies.Replace(ps); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("the app's read after the policy change: %v, want a reset", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the connection was not closed")
	}
}

// TestDelForgetsPooledConnections: a removed pod's pooled HBONE connections (dialled in
// its namespace) take no new tunnels and close with their last; they are not kept for
// another instance with the same IP.
func TestDelForgetsPooledConnections(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	c := session(t, f.tp.Pod, netip.AddrPortFrom(fam.Remote, 8080))
	if n := hboneConns(t, f.tp.Pod); n != 1 {
		t.Fatalf("%d pooled HBONE connections from sleep, want 1", n)
	}
	if err := f.proxy.DelWorkload(context.Background(), "u-sleep"); err != nil {
		t.Fatal(err)
	}
	c.Close() // the last tunnel on it
	for deadline := time.Now().Add(3 * time.Second); hboneConns(t, f.tp.Pod) != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the removed pod's pooled HBONE connection is still open")
		}
	}
}

// TestShutdownCutsDrains: Shutdown's deadline is also that of pods removed before it and
// still draining.
func TestShutdownCutsDrains(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	fam := f.tp.IPv4
	// A live plaintext connection from the node: only httpbin's instance holds it (a
	// tunnel from sleep would end with sleep's instance, first thing in Shutdown).
	session(t, f.tp.Node, netip.AddrPortFrom(fam.Remote, 8080))
	if err := f.proxy.DelWorkload(context.Background(), "u-httpbin"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	f.proxy.Shutdown(ctx)
	if d := time.Since(start); d > 600*time.Millisecond {
		t.Errorf("Shutdown(100 ms) took %v behind a removed pod's drain (1 s deadline)", d)
	}
}
