package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/ruleset"
	"github.com/nftmesh/nftmesh/zds"
)

// The mesh the seed describes, as namespaces on one machine:
//
//	sleep    (eth0) <-veth-> (vsleep)    node1 (tonode2) <-veth-> (tonode1) node2 (vnotsleep) <-veth-> (eth0) notsleep
//	httpbin  (eth0) <-veth-> (vhttpbin)  node1
//	outside  (eth0) <-veth-> (voutside)  node1      (not enrolled: a client from outside the mesh)
//
// Link k (a pod's veth, or the node-to-node link, k = 100) is 10.247.k.0/24 and
// fd00:247:k::/64: the pod's end (node2's, on the node link) is .2 / ::2, the node's
// (node1's) end .1 / ::1. Pods route everything through their node; each node routes the
// other node's pod links over the node link and forwards. These ranges are used by no
// other test (dataplane's and proxy's topologies use 10.248.0.0/16) and exist only inside
// the test's namespaces.
//
// sleep, httpbin and notsleep are enrolled: in-pod rules applied with dataplane.Manager,
// their IPs in their node's pod IP sets, handed to their node's `nftmesh proxy` process
// over ZDS by the test, which plays the agent. They live in Kubernetes namespace
// ambient-demo with service accounts named after them; httpbin is labelled app=httpbin,
// as the seed's policy expects.

const (
	meshNamespace = "ambient-demo"
	trustDomain   = "cluster.local"
	appPort       = 8080 // httpbin's app: greets with the peer address it sees, then echoes
	nodeLink      = 100
)

// family is one IP family of the mesh.
type family struct {
	name, tcp string
	v6        bool
}

var families = []family{{"ipv4", "tcp4", false}, {"ipv6", "tcp6", true}}

// Node is a node namespace with its agent socket and its proxy process.
type Node struct {
	Name   string
	NS     *nettest.Netns
	V4, V6 netip.Addr // its address on the node-to-node link
	Sock   string     // the ZDS socket the test (the agent) listens on
	Agent  *zds.Server
	Proxy  *Proc
	Pods   []*Pod
}

// Pod is a pod namespace with one veth to its node.
type Pod struct {
	Name, UID, SA string
	Labels        map[string]string
	NS            *nettest.Netns
	Node          *Node
	Link          int // k of the 10.247.k.0/24 link
	V4, V6        netip.Addr
	Enrolled      bool
}

// Addr is the pod's address in family f.
func (p *Pod) Addr(f family) netip.Addr {
	if f.v6 {
		return p.V6
	}
	return p.V4
}

// Identity is the pod's SPIFFE ID.
func (p *Pod) Identity() identity.ID {
	return identity.ForServiceAccount(trustDomain, meshNamespace, p.SA)
}

// Mesh is the whole topology with its CA, files, proxies and app.
type Mesh struct {
	tb      testing.TB
	Capture compiler.CaptureMode
	Dir     string
	// Intent compiles the pods' and nodes' rules, and the proxies read it (--intent): one
	// source of ports and marks. Config is it resolved.
	Intent     compiler.Intent
	Config     compiler.Config
	IntentFile string

	CACert, CAKey               []byte
	Issuer                      *identity.CAIssuer
	CAFile, CAKeyFile           string
	WorkloadsFile, PoliciesFile string
	Node1, Node2                *Node
	Sleep, Httpbin, Notsleep    *Pod
	Outside                     *Pod // not enrolled
	Pods                        []*Pod

	mgr                     *dataplane.Manager
	podDesired, hostDesired ruleset.Desired
	rulesOn                 map[*Pod]bool
	relays                  map[string][]*Proc // the benchmarks' floor relays by kind
	// workers is the proxies' --workers, and the threads of the benchmarks' relays and
	// HAProxy peers; 0: each one's default.
	workers   int
	nextIndex int
	agentLogs *nettest.SyncBuffer
}

// Deadlines: short, so that a failure fails fast instead of hanging.
const (
	readyTimeout     = 10 * time.Second // proxy start to ZDS snapshot done
	enrollTimeout    = 10 * time.Second // one ZDS AddWorkload and its Ack
	shutdownDeadline = 2 * time.Second  // the proxies' --shutdown-deadline
	stopWait         = 6 * time.Second  // SIGTERM to exit
	logWait          = 5 * time.Second  // a connection's close to its access log line
	ioTimeout        = 3 * time.Second  // one dial, greeting or echo
)

// NewMesh builds the mesh with inbound capture mode capture, starts both proxies and
// enrolls the pods. Everything is torn down when the test ends: proxies first (SIGTERM,
// exit 0 expected), then the agents, then the namespaces.
func NewMesh(tb testing.TB, capture compiler.CaptureMode) *Mesh {
	tb.Helper()
	in := compiler.DefaultIntent()
	in.Spec.InboundCapture = &capture
	return NewMeshWithIntent(tb, in)
}

// NewMeshWithIntent is NewMesh for any intent: its capture mode, ports and marks.
func NewMeshWithIntent(tb testing.TB, in compiler.Intent) *Mesh {
	tb.Helper()
	return newMesh(tb, in, 0)
}

// newMesh is NewMeshWithIntent with the proxies' --workers (0: their default).
func newMesh(tb testing.TB, in compiler.Intent, workers int) *Mesh {
	tb.Helper()
	nettest.Require(tb)
	cfg, err := compiler.Resolve(in)
	if err != nil {
		tb.Fatal(err)
	}
	m := &Mesh{tb: tb, Capture: cfg.InboundCapture, Intent: in, Config: cfg, Dir: tb.TempDir(), nextIndex: 10,
		agentLogs: &nettest.SyncBuffer{}, rulesOn: map[*Pod]bool{}, workers: workers}
	m.Node1 = m.newNode("node1", 1)
	m.Node2 = m.newNode("node2", 2)
	m.Sleep = m.newPod("sleep", m.Node1, 1, true, nil)
	m.Httpbin = m.newPod("httpbin", m.Node1, 2, true, map[string]string{"app": "httpbin"})
	m.Outside = m.newPod("outside", m.Node1, 3, false, nil)
	m.Notsleep = m.newPod("notsleep", m.Node2, 11, true, nil)
	m.wire()
	m.applyRules()
	m.writeFiles()
	m.Serve(m.Httpbin, appPort, greetAndEcho)
	for _, n := range []*Node{m.Node1, m.Node2} {
		m.startNode(n)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("agent (test) ZDS log:\n%s", m.agentLogs)
		}
	})
	return m
}

func (m *Mesh) newNode(name string, i int) *Node {
	n := &Node{
		Name: name, NS: nettest.New(m.tb),
		V4: netip.MustParseAddr(fmt.Sprintf("10.247.%d.%d", nodeLink, i)),
		V6: netip.MustParseAddr(fmt.Sprintf("fd00:247:%d::%d", nodeLink, i)),
	}
	m.sysctls(n.NS)
	n.NS.Sysctl(m.tb, "net.ipv4.ip_forward", "1", "net.ipv6.conf.all.forwarding", "1")
	return n
}

func (m *Mesh) newPod(name string, node *Node, link int, enrolled bool, labels map[string]string) *Pod {
	p := &Pod{
		Name: name, UID: "uid-" + name, SA: name, Labels: labels, NS: nettest.New(m.tb), Node: node, Link: link,
		V4:       netip.MustParseAddr(fmt.Sprintf("10.247.%d.2", link)),
		V6:       netip.MustParseAddr(fmt.Sprintf("fd00:247:%d::2", link)),
		Enrolled: enrolled,
	}
	m.sysctls(p.NS)
	node.Pods = append(node.Pods, p)
	m.Pods = append(m.Pods, p)
	return p
}

// sysctls are set before any link exists, so that links inherit the defaults: IPv6 on,
// no duplicate address detection (addresses usable at once), no reverse path filter
// (the proxy sends from the client's address on purpose).
func (m *Mesh) sysctls(ns *nettest.Netns) {
	ns.Sysctl(m.tb,
		"net.ipv6.conf.all.disable_ipv6", "0",
		"net.ipv6.conf.default.disable_ipv6", "0",
		"net.ipv6.conf.all.accept_dad", "0",
		"net.ipv6.conf.default.accept_dad", "0",
		"net.ipv4.conf.all.rp_filter", "0",
		"net.ipv4.conf.default.rp_filter", "0",
	)
}

// veth makes a veth inside a with its peer placed straight into b (nothing ever appears
// in the machine's own namespace). Both ends get interface indexes that no other link of
// the mesh has: the kernel's linkwatch handles a carrier change at once only for a device
// whose index differs from its peer's; with equal indexes (2 and 2 in fresh namespaces)
// it waits for its next one-second round, and until then IPv6 neighbor discovery to the
// node's address stalls the first connection (see nettest.NewTopology).
func (m *Mesh) veth(a *nettest.Netns, aName string, b *nettest.Netns, bName string) {
	ia, ib := m.nextIndex, m.nextIndex+1
	m.nextIndex += 2
	a.IP(m.tb, fmt.Sprintf("link add %s index %d type veth peer name %s index %d netns %s", aName, ia, bName, ib, b.Name))
}

func addrLine(a netip.Addr, dev string) string {
	if a.Is6() {
		return fmt.Sprintf("addr add %s/64 dev %s nodad", a, dev)
	}
	return fmt.Sprintf("addr add %s/24 dev %s", a, dev)
}

func gw(p *Pod, v6 bool) netip.Addr {
	if v6 {
		return netip.MustParseAddr(fmt.Sprintf("fd00:247:%d::1", p.Link))
	}
	return netip.MustParseAddr(fmt.Sprintf("10.247.%d.1", p.Link))
}

// wire makes the links, addresses and routes, and waits until every link is up.
func (m *Mesh) wire() {
	n1, n2 := m.Node1, m.Node2
	m.veth(n1.NS, "tonode2", n2.NS, "tonode1")
	nodeLines := map[*Node][]string{
		n1: {addrLine(n1.V4, "tonode2"), addrLine(n1.V6, "tonode2"), "link set tonode2 up"},
		n2: {addrLine(n2.V4, "tonode1"), addrLine(n2.V6, "tonode1"), "link set tonode1 up"},
	}
	nodeLinks := map[*Node][]string{n1: {"tonode2"}, n2: {"tonode1"}}
	for _, p := range m.Pods {
		dev := "v" + p.Name
		m.veth(p.NS, "eth0", p.Node.NS, dev)
		p.NS.IP(m.tb,
			addrLine(p.V4, "eth0"), addrLine(p.V6, "eth0"), "link set eth0 up",
			"route add default via "+gw(p, false).String(), "route add default via "+gw(p, true).String())
		nodeLines[p.Node] = append(nodeLines[p.Node], addrLine(gw(p, false), dev), addrLine(gw(p, true), dev), "link set "+dev+" up")
		nodeLinks[p.Node] = append(nodeLinks[p.Node], dev)
		// The other node reaches this pod's link through this node.
		other, via := n2, n1
		if p.Node == n2 {
			other, via = n1, n2
		}
		nodeLines[other] = append(nodeLines[other],
			fmt.Sprintf("route add 10.247.%d.0/24 via %s", p.Link, via.V4),
			fmt.Sprintf("route add fd00:247:%d::/64 via %s", p.Link, via.V6))
	}
	// Addresses before routes: a route's gateway must be on a link that is up.
	for _, n := range []*Node{n1, n2} {
		var addrs, routes []string
		for _, l := range nodeLines[n] {
			if strings.HasPrefix(l, "route") {
				routes = append(routes, l)
			} else {
				addrs = append(addrs, l)
			}
		}
		n.NS.IP(m.tb, append(addrs, routes...)...)
	}
	for _, p := range m.Pods {
		p.NS.WaitUp(m.tb, "eth0")
	}
	for _, n := range []*Node{n1, n2} {
		n.NS.WaitUp(m.tb, nodeLinks[n]...)
	}
}

// applyRules writes each enrolled pod's ruleset and policy routing and each node's
// ruleset with the pod IPs of its enrolled pods, through the project's apply code.
func (m *Mesh) applyRules() {
	m.mgr = dataplane.NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), 0)
	m.tb.Cleanup(func() { m.mgr.Close() }) // its cached sockets in the test's namespaces
	var err error
	if m.podDesired, err = compiler.PodState(m.Intent, nil); err != nil {
		m.tb.Fatal(err)
	}
	if m.hostDesired, err = compiler.HostState(m.Intent); err != nil {
		m.tb.Fatal(err)
	}
	for _, n := range []*Node{m.Node1, m.Node2} {
		if _, err := m.mgr.Apply(n.NS.Handle, m.hostDesired); err != nil {
			m.tb.Fatalf("%s: %v", n.Name, err)
		}
	}
	for _, p := range m.Pods {
		if !p.Enrolled {
			continue
		}
		m.SetRules(p, true)
		for _, ip := range []netip.Addr{p.V4, p.V6} {
			if _, err := m.mgr.AddPodIP(p.Node.NS.Handle, ip, p.UID); err != nil {
				m.tb.Fatalf("%s: %v", p.Name, err)
			}
		}
	}
}

// SetRules applies (on) or removes (off) a pod's in-pod ruleset and policy routing. The
// benchmarks' baselines run over the same veths with the rules off.
func (m *Mesh) SetRules(p *Pod, on bool) {
	m.tb.Helper()
	if m.rulesOn[p] == on {
		return
	}
	var err error
	if on {
		_, err = m.mgr.Apply(p.NS.Handle, m.podDesired)
	} else {
		_, err = m.mgr.Remove(p.NS.Handle, m.podDesired)
	}
	if err != nil {
		m.tb.Fatalf("%s: rules on=%v: %v", p.Name, on, err)
	}
	m.rulesOn[p] = on
}

// writeFiles writes the CA, the static workloads file both proxies read, an empty
// policies file (no policy: allow all) and the intent.
func (m *Mesh) writeFiles() {
	var err error
	m.CACert, m.CAKey, err = identity.GenerateRoot(trustDomain, time.Hour)
	if err != nil {
		m.tb.Fatal(err)
	}
	if m.Issuer, err = identity.NewCAIssuer(m.CACert, m.CAKey, identity.CAOptions{}); err != nil {
		m.tb.Fatal(err)
	}
	var wf workload.File
	for _, p := range m.Pods {
		if p.Enrolled {
			wf.Workloads = append(wf.Workloads, workload.Workload{
				UID: p.UID, Name: p.Name, Namespace: meshNamespace, ServiceAccount: p.SA,
				IPs: []netip.Addr{p.V4, p.V6}, Labels: p.Labels, Node: p.Node.Name, InMesh: true,
			})
		}
	}
	wdata, err := yaml.Marshal(&wf)
	if err != nil {
		m.tb.Fatal(err)
	}
	m.CAFile = m.write("ca.pem", m.CACert)
	m.CAKeyFile = m.write("ca-key.pem", m.CAKey)
	m.WorkloadsFile = m.write("workloads.yaml", wdata)
	m.PoliciesFile = m.write("policies.yaml", nil)
	idata, err := m.Intent.Marshal()
	if err != nil {
		m.tb.Fatal(err)
	}
	m.IntentFile = m.write("intent.yaml", idata)
}

func (m *Mesh) write(name string, data []byte) string {
	path := filepath.Join(m.Dir, name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		m.tb.Fatal(err)
	}
	return path
}

// startNode plays the agent for node n: it listens on n's ZDS socket, starts n's proxy
// process inside n's namespace, waits for the proxy's Hello and (empty) snapshot, then
// hands over each enrolled pod of n with its netns.
func (m *Mesh) startNode(n *Node) {
	tb := m.tb
	n.Sock = filepath.Join(m.Dir, n.Name+".sock")
	agent, err := zds.Listen(n.Sock, slog.New(slog.NewTextHandler(m.agentLogs, nil)).With("node", n.Name))
	if err != nil {
		tb.Fatal(err)
	}
	n.Agent = agent
	served := make(chan struct{})
	go func() {
		defer close(served)
		agent.Serve(context.Background(), nil)
	}()
	tb.Cleanup(func() {
		agent.Close()
		<-served
	})
	n.Proxy = StartProxy(tb, n.Name, n.NS, m.ProxyArgs(n.Sock)...)
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	if err := agent.WaitReady(ctx, 1); err != nil {
		tb.Fatalf("%s: proxy did not connect: %v\n%s", n.Name, err, n.Proxy.Log)
	}
	for _, p := range n.Pods {
		if p.Enrolled {
			m.Enroll(n.Agent, p.UID, zds.WorkloadInfo{Name: p.Name, Namespace: meshNamespace, ServiceAccount: p.SA}, p.NS)
		}
	}
}

// ProxyArgs are the `nftmesh proxy` flags for a node whose agent listens on sock.
func (m *Mesh) ProxyArgs(sock string) []string {
	args := []string{
		"--zds-socket", sock, "--ca-cert", m.CAFile, "--ca-key", m.CAKeyFile,
		"--workloads", m.WorkloadsFile, "--policies", m.PoliciesFile, "--intent", m.IntentFile,
		"--log-format", "json", "--shutdown-deadline", shutdownDeadline.String(),
	}
	if m.workers > 0 { // the benchmarks' worker counts (bench_test.go)
		args = append(args, "--workers", strconv.Itoa(m.workers))
	}
	return args
}

// Enroll hands a pod's netns to the proxy behind agent (ZDS AddWorkload) and waits for its
// Ack: its listeners are up when this returns.
func (m *Mesh) Enroll(agent *zds.Server, uid string, info zds.WorkloadInfo, ns *nettest.Netns) {
	m.tb.Helper()
	h, err := netns.Open(ns.Path)
	if err != nil {
		m.tb.Fatal(err)
	}
	defer h.Close() // the agent keeps ownership; the proxy got a duplicate
	ctx, cancel := context.WithTimeout(context.Background(), enrollTimeout)
	defer cancel()
	if err := agent.AddWorkload(ctx, uid, info, h); err != nil {
		m.tb.Fatalf("enroll %s: %v", info.Name, err)
	}
}

// Serve runs an app in pod p on port (both families): handle gets each connection.
func (m *Mesh) Serve(p *Pod, port int, handle func(net.Conn)) {
	m.tb.Helper()
	for _, f := range families {
		ServeIn(m.tb, p.NS, f.tcp, netip.AddrPortFrom(p.Addr(f), uint16(port)), handle)
	}
}

// ServeIn runs an app listening on addr inside ns until the test ends: handle gets each
// connection (and closes nothing: ServeIn does).
func ServeIn(tb testing.TB, ns *nettest.Netns, network string, addr netip.AddrPort, handle func(net.Conn)) {
	tb.Helper()
	var l net.Listener
	if err := ns.Do(func() (err error) {
		l, err = net.Listen(network, addr.String())
		return
	}); err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	tb.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	})
}

// greetAndEcho is httpbin's app: one line with the peer address it sees, then an echo.
func greetAndEcho(c net.Conn) {
	fmt.Fprintf(c, "%s\n", c.RemoteAddr())
	io.Copy(c, c)
}

// Dial connects from inside ns, as an app there would: in an enrolled pod, the pod's
// rules capture the connection.
func Dial(ns *nettest.Netns, network string, dst netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.DialTimeout(network, dst.String(), ioTimeout)
		return
	})
	return c, err
}

// Greeting reads the app's greeting: the source address the app saw.
func Greeting(c net.Conn, r *bufio.Reader) (netip.AddrPort, error) {
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	defer c.SetReadDeadline(time.Time{})
	line, err := r.ReadString('\n')
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("greeting: %w (read %q)", err, line)
	}
	ap, err := netip.ParseAddrPort(strings.TrimSpace(line))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("greeting %q: %w", line, err)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// Echo checks that the app echoes a line.
func Echo(c net.Conn, r *bufio.Reader, msg string) error {
	c.SetDeadline(time.Now().Add(ioTimeout))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return fmt.Errorf("echo: write: %w", err)
	}
	got, err := r.ReadString('\n')
	if err != nil || got != msg+"\n" {
		return fmt.Errorf("echo: got %q, %v; want %q", got, err, msg+"\n")
	}
	return nil
}

// Session is a connection to httpbin's app, greeting read.
type Session struct {
	net.Conn
	R    *bufio.Reader
	Seen netip.AddrPort // the source address the app saw
}

// Connect dials httpbin's app from a pod as an app would (captured by its rules), reads
// the greeting and checks an echo.
func (m *Mesh) Connect(from *Pod, f family) (*Session, error) {
	c, err := Dial(from.NS, f.tcp, netip.AddrPortFrom(m.Httpbin.Addr(f), appPort))
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	s := &Session{Conn: c, R: bufio.NewReader(c)}
	if s.Seen, err = Greeting(c, s.R); err != nil {
		c.Close()
		return nil, err
	}
	if err := Echo(c, s.R, "ping"); err != nil {
		c.Close()
		return nil, err
	}
	return s, nil
}

// Proc is a process the test started in a namespace: an `nftmesh proxy` or a relay.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	Log  *nettest.SyncBuffer // stdout and stderr: the JSON log, access log lines included
	done chan struct{}
	err  error
	once sync.Once
}

// StartProxy starts `ip netns exec <ns> nftmesh proxy <args>` (ip execs the binary in
// place, so the process is the proxy itself) and stops it when the test ends.
func StartProxy(tb testing.TB, name string, ns *nettest.Netns, args ...string) *Proc {
	tb.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name, nftmeshBin, "proxy"}, args...)...)
	// NFTMESH_E2E_PROXY_ENV adds environment variables (space separated) for the proxies
	// only, for experiments: NFTMESH_E2E_PROXY_ENV="GOMAXPROCS=1 GODEBUG=...".
	if extra := strings.Fields(os.Getenv("NFTMESH_E2E_PROXY_ENV")); len(extra) > 0 {
		cmd.Env = append(os.Environ(), extra...)
	}
	p := startProc(tb, name, cmd)
	tb.Cleanup(func() { p.Stop(tb) })
	return p
}

// startProc starts cmd with its output in the Proc's Log.
func startProc(tb testing.TB, name string, cmd *exec.Cmd) *Proc {
	tb.Helper()
	p := &Proc{Name: name, Log: &nettest.SyncBuffer{}, done: make(chan struct{}), cmd: cmd}
	p.cmd.Stdout, p.cmd.Stderr = p.Log, p.Log
	// Should the test binary die, the process dies with it. The kernel sends the signal
	// when the thread that forked ends, not the process; Go ends threads whose goroutine
	// exits locked (Netns.Do's), and any thread may have run that goroutine before. So
	// the fork happens on a thread locked for the process's lifetime.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := p.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		tb.Fatalf("start %s: %v", name, err)
	}
	return p
}

// Pid is the proxy's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Stop sends SIGTERM and expects the proxy to drain and exit 0 in time. Idempotent.
func (p *Proc) Stop(tb testing.TB) {
	p.once.Do(func() {
		select {
		case <-p.done:
			tb.Errorf("proxy %s exited before the test stopped it: %v", p.Name, p.err)
		default:
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
				if p.err != nil {
					tb.Errorf("proxy %s: after SIGTERM: %v, want exit status 0", p.Name, p.err)
				} else if !strings.Contains(p.Log.String(), `"msg":"stopped"`) {
					tb.Errorf("proxy %s exited 0 without logging that it stopped", p.Name)
				}
			case <-time.After(stopWait):
				p.cmd.Process.Kill()
				<-p.done
				tb.Errorf("proxy %s still running %v after SIGTERM (drain deadline %v): killed", p.Name, stopWait, shutdownDeadline)
			}
		}
		if tb.Failed() {
			tb.Logf("proxy %s log:\n%s", p.Name, p.Log)
		}
	})
}

// LogLine is one JSON log line of a proxy.
type LogLine map[string]any

// S returns a string field ("" if absent).
func (l LogLine) S(key string) string {
	v, _ := l[key].(string)
	return v
}

func (l LogLine) String() string {
	b, _ := json.Marshal(map[string]any(l))
	return string(b)
}

// Lines returns the proxy's log lines with message msg.
func (p *Proc) Lines(msg string) []LogLine {
	var out []LogLine
	for _, line := range strings.Split(p.Log.String(), "\n") {
		var l LogLine
		if json.Unmarshal([]byte(line), &l) == nil && l.S("msg") == msg {
			out = append(out, l)
		}
	}
	return out
}

// WaitLine waits for a log line with message msg for which match holds (lines are
// written when a connection completes, so they may lag the client's close).
func (p *Proc) WaitLine(tb testing.TB, msg string, what string, match func(LogLine) bool) LogLine {
	tb.Helper()
	deadline := time.Now().Add(logWait)
	for {
		for _, l := range p.Lines(msg) {
			if match(l) {
				return l
			}
		}
		if time.Now().After(deadline) {
			tb.Fatalf("proxy %s: no %q log line %s within %v; log:\n%s", p.Name, msg, what, logWait, p.Log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// AccessLine waits for an access log line ("connection complete") with the given fields
// and for which every extra predicate holds.
func (p *Proc) AccessLine(tb testing.TB, fields map[string]string, extra ...func(LogLine) bool) LogLine {
	tb.Helper()
	return p.WaitLine(tb, "connection complete", fmt.Sprint(fields), func(l LogLine) bool {
		for k, v := range fields {
			if l.S(k) != v {
				return false
			}
		}
		for _, f := range extra {
			if !f(l) {
				return false
			}
		}
		return true
	})
}

// Metrics scrapes the node's proxy at http://<node ip>:15020/metrics from inside the
// node's namespace.
func (n *Node) Metrics(tb testing.TB) string {
	tb.Helper()
	addr := netip.AddrPortFrom(n.V4, 15020).String()
	var c net.Conn
	if err := n.NS.Do(func() (err error) { c, err = net.DialTimeout("tcp4", addr, ioTimeout); return }); err != nil {
		tb.Fatalf("%s: metrics: %v", n.Name, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		tb.Fatalf("%s: metrics: %v", n.Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		tb.Fatalf("%s: metrics: %s, %v", n.Name, resp.Status, err)
	}
	return string(body)
}

// MetricSum sums the samples of metric name whose labels include every one of labels.
func MetricSum(text, name string, labels map[string]string) float64 {
	var sum float64
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok && len(labels) == 0 { // no labels
			if v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64); err == nil {
				sum += v
			}
			continue
		}
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		end := strings.LastIndex(line, "}")
		if end < 0 {
			continue
		}
		set := "," + line[len(name)+1:end]
		ok := true
		for k, v := range labels {
			if !strings.Contains(set, ","+k+"="+strconv.Quote(v)) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		if f := strings.Fields(line[end+1:]); len(f) > 0 {
			if v, err := strconv.ParseFloat(f[0], 64); err == nil {
				sum += v
			}
		}
	}
	return sum
}
