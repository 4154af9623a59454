package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/zds"
)

// The upgrade's timeline, as a DaemonSet rolling update with maxSurge 1 runs it.
const (
	upgradeLead    = 300 * time.Millisecond // load on the old proxy alone, before the new one starts
	upgradeOverlap = time.Second            // both proxies up, the new one ready, before the SIGTERM (at least)
	upgradeTail    = 500 * time.Millisecond // load on the new proxy alone, after the old one exited
	// minOverlapAttempts is the least number of new connections tried between the new
	// proxy's start and the SIGTERM to the old one (the overlap goes on until there are
	// as many, up to maxOverlap); the drain's add to them.
	minOverlapAttempts = 2000
	maxOverlap         = 15 * time.Second
	upgradeClients     = 4                     // concurrent clients of each kind
	echoEvery          = 50 * time.Millisecond // an established connection's echo interval
	// steerSlack: a connection the old proxy logged as started this long after the new one
	// was ready was accepted after it (log times are to the millisecond).
	steerSlack = 100 * time.Millisecond
)

// attempt is one new connection of the load: when it started and how it ended.
type attempt struct {
	kind  string
	start time.Time
	err   error
}

// TestUpgrade: a proxy upgrade drops no connection, in both inbound capture modes. While
// clients open new connections in a loop (sleep to httpbin over HBONE on the same node,
// IPv4 and IPv6; notsleep to httpbin over HBONE from the other node; a client outside the
// mesh to httpbin in plaintext through 15006), a second `nftmesh proxy` starts on node1,
// takes the agent's snapshot (its listeners in every pod's namespace, beside the first
// proxy's, SO_REUSEPORT), and turns ready; then the first gets SIGTERM, closes its
// listeners at once and drains. Not one new connection may fail, and the connections
// the first proxy had established keep working until its drain deadline, which closes
// them. (proxy's TestReuseportUpgrade shows the kernel behaviour underneath.)
func TestUpgrade(t *testing.T) {
	for _, mode := range []compiler.CaptureMode{compiler.CaptureTProxy, compiler.CaptureRedirect} {
		t.Run(string(mode), func(t *testing.T) { testUpgrade(t, NewMesh(t, mode)) })
	}
}

func testUpgrade(t *testing.T, m *Mesh) {
	node := m.Node1
	v4, v6 := families[0], families[1]
	old := node.Proxy

	// Established before the upgrade: all through the old proxy.
	type established struct {
		name     string
		s        *Session
		lastOK   time.Time // last echo that worked
		failedAt time.Time // first echo that failed
		err      error
	}
	var ests []*established
	for _, e := range []struct {
		name string
		from *Pod
	}{{"sleep->httpbin (HBONE)", m.Sleep}, {"notsleep->httpbin (HBONE, other node)", m.Notsleep}, {"outside->httpbin (plaintext)", m.Outside}} {
		s, err := m.Connect(e.from, v4)
		if err != nil {
			t.Fatalf("established %s: %v", e.name, err)
		}
		t.Cleanup(func() { s.Close() })
		ests = append(ests, &established{name: e.name, s: s})
	}

	// The load: upgradeClients loops of each kind until stop closes.
	kinds := []struct {
		name string
		from *Pod
		f    family
	}{
		{"sleep->httpbin ipv4 (outbound, HBONE)", m.Sleep, v4},
		{"sleep->httpbin ipv6 (outbound, HBONE)", m.Sleep, v6},
		{"notsleep->httpbin ipv4 (HBONE from node2)", m.Notsleep, v4},
		{"outside->httpbin ipv4 (plaintext inbound)", m.Outside, v4},
	}
	stop := make(chan struct{})
	var loadWG sync.WaitGroup
	var mu sync.Mutex
	var attempts []attempt
	for _, k := range kinds {
		for range upgradeClients {
			loadWG.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					a := attempt{kind: k.name, start: time.Now()}
					s, err := m.Connect(k.from, k.f) // dial, greeting, echo
					if err == nil {
						if s.Seen.Addr() != k.from.Addr(k.f) {
							err = fmt.Errorf("the app saw source %s, want %s", s.Seen, k.from.Addr(k.f))
						}
						s.Close()
					}
					a.err = err
					mu.Lock()
					attempts = append(attempts, a)
					mu.Unlock()
				}
			})
		}
	}
	stopLoad := sync.OnceFunc(func() { close(stop); loadWG.Wait() })
	t.Cleanup(stopLoad)
	attemptsSince := func(since time.Time) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, a := range attempts {
			if !a.start.Before(since) {
				n++
			}
		}
		return n
	}

	// The established connections echo all along, until they fail.
	echoStop := make(chan struct{})
	var echoWG sync.WaitGroup
	for _, e := range ests {
		echoWG.Go(func() {
			tick := time.NewTicker(echoEvery)
			defer tick.Stop()
			for {
				select {
				case <-echoStop:
					return
				case <-tick.C:
				}
				if err := Echo(e.s, e.s.R, "still here"); err != nil {
					e.failedAt, e.err = time.Now(), err
					return
				}
				e.lastOK = time.Now()
			}
		})
	}
	stopEcho := sync.OnceFunc(func() { close(echoStop); echoWG.Wait() })
	t.Cleanup(stopEcho)

	time.Sleep(upgradeLead)

	// The agent's side for the new proxy: a snapshot of node1's enrolled pods, each with
	// its namespace, as the agent sends every proxy that connects. (On a socket of its
	// own: the mesh's agent for node1 serves an empty snapshot. The proxy cannot tell.)
	var snap []zds.SnapshotEntry
	for _, p := range node.Pods {
		if !p.Enrolled {
			continue
		}
		h, err := netns.Open(p.NS.Path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		snap = append(snap, zds.SnapshotEntry{UID: p.UID, Info: zds.WorkloadInfo{Name: p.Name, Namespace: meshNamespace, ServiceAccount: p.SA}, NetNS: h})
	}
	sock := filepath.Join(m.Dir, node.Name+"-new.sock")
	agent, err := zds.Listen(sock, slog.New(slog.NewTextHandler(m.agentLogs, nil)).With("node", node.Name+"-new"))
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		agent.Serve(context.Background(), func() []zds.SnapshotEntry { return snap })
	}()
	t.Cleanup(func() { agent.Close(); <-served })

	// The new proxy beside the old one: the same node namespace, so its metrics and
	// readiness take other ports (in a cluster each proxy pod has its own).
	const readyAddr = ":15121"
	tStart := time.Now()
	upgraded := StartProxy(t, node.Name+"-new", node.NS, append(m.ProxyArgs(sock), "--metrics-addr", ":15120", "--ready-addr", readyAddr)...)
	// The kubelet's readiness probe: the rolling update goes on only once it answers 200.
	for deadline := time.Now().Add(readyTimeout); !proxyReady(node, readyAddr); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the new proxy was not ready within %v\n%s", readyTimeout, upgraded.Log)
		}
	}
	tReady := time.Now()
	if n := len(upgraded.Lines("workload added")); n != len(snap) {
		t.Fatalf("the new proxy is ready with %d workloads added, want the snapshot's %d\n%s", n, len(snap), upgraded.Log)
	}
	time.Sleep(upgradeOverlap)
	for time.Since(tStart) < maxOverlap && attemptsSince(tStart) < minOverlapAttempts {
		time.Sleep(50 * time.Millisecond)
	}

	// SIGTERM to the old proxy; Stop waits for it to drain and exit 0.
	tTerm := time.Now()
	old.Stop(t)
	tExited := time.Now()
	time.Sleep(upgradeTail)
	stopLoad()
	stopEcho()

	// New connections: not one failed, anywhere in the run.
	mu.Lock()
	defer mu.Unlock()
	perKind := map[string][2]int{} // attempts, failures
	inOverlap, failed := 0, 0
	var failures []string
	for _, a := range attempts {
		c := perKind[a.kind]
		c[0]++
		if !a.start.Before(tStart) && a.start.Before(tExited) {
			inOverlap++
		}
		if a.err != nil {
			c[1]++
			failed++
			if len(failures) < 20 {
				failures = append(failures, fmt.Sprintf("%+.3fs after the SIGTERM: %s: %v", a.start.Sub(tTerm).Seconds(), a.kind, a.err))
			}
		}
		perKind[a.kind] = c
	}
	var summary []string
	for k, c := range perKind {
		summary = append(summary, fmt.Sprintf("%s: %d attempts, %d failed", k, c[0], c[1]))
	}
	sort.Strings(summary)
	t.Logf("new connections: %d attempts, %d between the new proxy's start and the old one's exit (%.2fs: ready after %v, SIGTERM after %v, exit after %v), %d failed\n  %s",
		len(attempts), inOverlap, tExited.Sub(tStart).Seconds(), tReady.Sub(tStart).Round(time.Millisecond),
		tTerm.Sub(tStart).Round(time.Millisecond), tExited.Sub(tStart).Round(time.Millisecond), failed, strings.Join(summary, "\n  "))
	if failed > 0 {
		t.Errorf("%d of %d new connections failed during the upgrade; the first:\n  %s", failed, len(attempts), strings.Join(failures, "\n  "))
		for _, p := range []*Proc{old, upgraded, m.Node2.Proxy} {
			var lines []string
			for _, l := range p.Lines("connection complete") {
				if l.S("error") != "" && len(lines) < 10 {
					lines = append(lines, l.String())
				}
			}
			t.Logf("proxy %s: access log lines with an error:\n  %s", p.Name, strings.Join(lines, "\n  "))
		}
	}
	if inOverlap < minOverlapAttempts {
		t.Errorf("only %d new connections during the overlap, want at least %d for the test to mean something", inOverlap, minOverlapAttempts)
	}

	// From the moment the new proxy was ready, the old one accepted nothing: the newest
	// listeners take every new connection (proxy/reuseport.go). Tunnels on an HBONE
	// connection node2's proxy had opened to the old proxy before are no accept: they go
	// on until the SIGTERM's GOAWAY.
	late := map[string]int{}
	for _, l := range old.Lines("connection complete") {
		end, err := time.Parse(time.RFC3339Nano, l.S("time"))
		d, derr := time.ParseDuration(l.S("duration"))
		if err != nil || derr != nil {
			t.Fatalf("old proxy: access log line without a time or duration: %s", l)
		}
		if end.Add(-d).Before(tReady.Add(steerSlack)) {
			continue
		}
		switch {
		case l.S("direction") == "outbound":
			late["outbound (15001)"]++
		case l.S("dst.hbone_addr") == "none":
			late["inbound plaintext (15006)"]++
		default:
			late["inbound HBONE tunnels on a pooled connection"]++
		}
	}
	t.Logf("access log lines: old proxy %d, new proxy %d; old proxy's connections started after the new one was ready: %v",
		len(old.Lines("connection complete")), len(upgraded.Lines("connection complete")), late)
	for _, k := range []string{"outbound (15001)", "inbound plaintext (15006)"} {
		if late[k] > 0 {
			t.Errorf("the old proxy accepted %d %s connections after the new one was ready, want none: the new one's listeners take them all", late[k], k)
		}
	}

	// Established connections: working until the drain deadline, closed at it.
	for _, e := range ests {
		switch after := e.failedAt.Sub(tTerm); {
		case e.failedAt.IsZero():
			t.Errorf("established %s: still echoing %v after the SIGTERM, the old proxy gone; want it closed at the drain deadline (%v)", e.name, tExited.Sub(tTerm), shutdownDeadline)
		case after < shutdownDeadline:
			t.Errorf("established %s: failed %v after the SIGTERM, before the drain deadline (%v): %v", e.name, after, shutdownDeadline, e.err)
		case after > shutdownDeadline+time.Second:
			t.Errorf("established %s: closed %v after the SIGTERM, want it closed at the drain deadline (%v)", e.name, after, shutdownDeadline)
		case e.lastOK.Sub(tTerm) < shutdownDeadline-6*echoEvery:
			t.Errorf("established %s: last echo %v after the SIGTERM, want one within %v of the drain deadline (%v)", e.name, e.lastOK.Sub(tTerm), 6*echoEvery, shutdownDeadline)
		default:
			t.Logf("established %s: last echo %v after the SIGTERM, closed %v after it (%v)", e.name,
				e.lastOK.Sub(tTerm).Round(time.Millisecond), after.Round(time.Millisecond), e.err)
		}
	}
}

// proxyReady asks a proxy's readiness endpoint (addr, in node n's namespace) as the
// kubelet's probe would.
func proxyReady(n *Node, addr string) bool {
	_, port, _ := net.SplitHostPort(addr)
	target := net.JoinHostPort(n.V4.String(), port)
	var c net.Conn
	if err := n.NS.Do(func() (err error) { c, err = net.DialTimeout("tcp4", target, ioTimeout); return }); err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ioTimeout))
	fmt.Fprintf(c, "GET /healthz/ready HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
