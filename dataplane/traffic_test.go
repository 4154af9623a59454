package dataplane

// Traffic tests: the applied rules, exercised with real listeners and real connections.
//
// A test "pod" namespace is joined by a veth to a "node" namespace, which forwards to a
// "remote" namespace (nettest.Topology). The pod runs the proxy's listeners (outbound
// 15001, inbound 15006, HBONE 15008, DNS 15053; transparent and proxy-marked, as the
// proxy's are) and an app on 8080; the remote runs a TCP server and two UDP sockets.
// Each listener tells the client which one it is and records the addresses of what it
// accepted, so every case asserts exactly where a connection landed: which listener,
// local, remote, and original destination (SO_ORIGINAL_DST from conntrack).
//
// For each traffic class of docs/rules.md#traffic-classes, in both capture modes (tproxy,
// redirect) and both families, TestTraffic proves where a connection lands, with DNS
// capture off and then on. Then it proves the tests have teeth: it removes the rule (or
// the match, or the policy routing) a class depends on, applies that, asserts the class
// now lands elsewhere or breaks, and applies the intact rules again and asserts the
// class is healed. The node side (docs/rules.md#node-side-probe-snat) is proven the same way.

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/ruleset"
)

const (
	appPort       = 8080 // the app's listener in the pod
	serverPort    = 9000 // a TCP server in the remote
	remoteUDPPort = 9001 // a UDP socket in the remote: not DNS
	dnsPort       = 53

	outboundPort = compiler.DefaultOutboundPort
	inboundPort  = compiler.DefaultInboundPort
	hbonePort    = compiler.DefaultHBONEPort
	dnsProxyPort = compiler.DefaultDNSPort
	proxyMark    = compiler.DefaultProxyMark

	// answered bounds every dial and read that must succeed (it does in microseconds);
	// refused bounds the ones a broken rule makes hang, so that they fail fast.
	answered = 2 * time.Second
	refused  = 400 * time.Millisecond
)

func probeSource(f nettest.Family) netip.Addr {
	if f.Name == "ipv6" {
		return netip.MustParseAddr(compiler.DefaultProbeSourceV6)
	}
	return netip.MustParseAddr(compiler.DefaultProbeSourceV4)
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

func unspecified(f nettest.Family) netip.Addr {
	if f.Name == "ipv6" {
		return netip.IPv6Unspecified()
	}
	return netip.IPv4Unspecified()
}

// world is one topology with listeners and the rules of one capture mode applied.
type world struct {
	mode compiler.CaptureMode
	topo *nettest.Topology
	hub  *hub
	m    *Manager
	base compiler.Intent
	dns  bool // the pod's DNS capture, as applied now
	node bool // the node ruleset is applied in the node namespace, the pod IPs enrolled
}

func newWorld(t *testing.T, fixture string) *world {
	t.Helper()
	base := intent(t, fixture)
	cfg, err := compiler.Resolve(base)
	if err != nil {
		t.Fatal(err)
	}
	w := &world{mode: cfg.InboundCapture, topo: nettest.NewTopology(t), hub: newHub(t), m: quietManager(), base: base}
	pod, remote := w.topo.Pod, w.topo.Remote
	proxy := sockOpts{mark: proxyMark, transparent: true}
	for _, f := range w.topo.Families() {
		wild := unspecified(f)
		w.hub.listenTCP(t, pod, "pod", "outbound", f.TCP, ap(wild, outboundPort), proxy)
		w.hub.listenTCP(t, pod, "pod", "inbound", f.TCP, ap(wild, inboundPort), proxy)
		w.hub.listenTCP(t, pod, "pod", "hbone", f.TCP, ap(wild, hbonePort), proxy)
		w.hub.listenTCP(t, pod, "pod", "dns", f.TCP, ap(f.Loopback, dnsProxyPort), proxy)
		w.hub.listenUDP(t, pod, "pod", "dns", f.UDP, ap(f.Loopback, dnsProxyPort), proxy)
		w.hub.listenTCP(t, pod, "pod", "app", f.TCP, ap(wild, appPort), sockOpts{})
		w.hub.listenTCP(t, remote, "remote", "server", f.TCP, ap(f.Remote, serverPort), sockOpts{})
		w.hub.listenUDP(t, remote, "remote", "dns", f.UDP, ap(f.Remote, dnsPort), sockOpts{})
		w.hub.listenUDP(t, remote, "remote", "udp", f.UDP, ap(f.Remote, remoteUDPPort), sockOpts{})
	}
	return w
}

// podDesired compiles the pod's rules as the world wants them now.
func (w *world) podDesired(t *testing.T) ruleset.Desired {
	t.Helper()
	in := w.base
	if w.dns {
		on := true
		in.Spec.Pod.DNSCapture = &on
	}
	d, err := compiler.PodState(in, nil)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func (w *world) hostDesired(t *testing.T) ruleset.Desired {
	t.Helper()
	d, err := compiler.HostState(w.base)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// applyPod applies the pod's rules, first changed by mutate when it is not nil.
func (w *world) applyPod(t *testing.T, mutate func(*ruleset.Desired)) {
	t.Helper()
	d := w.podDesired(t)
	if mutate != nil {
		mutate(&d)
	}
	if _, err := w.m.Apply(w.topo.Pod.Handle, d); err != nil {
		t.Fatal(err)
	}
}

func (w *world) applyHost(t *testing.T, mutate func(*ruleset.Desired)) {
	t.Helper()
	d := w.hostDesired(t)
	if mutate != nil {
		mutate(&d)
	}
	if _, err := w.m.Apply(w.topo.Node.Handle, d); err != nil {
		t.Fatal(err)
	}
}

// enroll puts the pod's addresses into the node's pod IP sets, as the agent does.
func (w *world) enroll(t *testing.T) {
	t.Helper()
	for _, f := range w.topo.Families() {
		if _, err := w.m.AddPodIP(w.topo.Node.Handle, f.Pod, "pod-uid"); err != nil {
			t.Fatal(err)
		}
	}
}

// intact applies every ruleset of the world as compiled.
func (w *world) intact(t *testing.T) {
	t.Helper()
	w.applyPod(t, nil)
	if w.node {
		w.applyHost(t, nil)
		w.enroll(t)
	}
}

// inboundChain is where the inbound steps live: mangle prerouting (TPROXY) or nat
// prerouting (REDIRECT).
func (w *world) inboundChain() string {
	if w.mode == compiler.CaptureTProxy {
		return compiler.ChainManglePrerouting
	}
	return compiler.ChainNATPrerouting
}

// captured is the landing of a TCP connection from client to the pod's port that inbound
// capture sends to the proxy's inbound listener. Under TPROXY the accepted socket's
// local address is the original destination; under REDIRECT the socket is the listener's
// own address and SO_ORIGINAL_DST gives the original destination.
func (w *world) captured(f nettest.Family, port uint16, client netip.AddrPort) *landing {
	if w.mode == compiler.CaptureTProxy {
		return at("pod", "inbound", ap(f.Pod, port), client)
	}
	return at("pod", "inbound", ap(f.Pod, inboundPort), client).natFrom(ap(f.Pod, port))
}

// class is one traffic class: how to make one connection of it, and where that lands
// with the intact rules.
type class struct {
	name string
	try  func(w *world, f nettest.Family, timeout time.Duration) attempt
	want wantFunc
}

var podClasses = []class{
	{
		name: "pod-to-remote",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Pod, f.TCP, ap(f.Remote, serverPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "outbound", ap(f.Loopback, outboundPort), a.Client).natFrom(ap(f.Remote, serverPort))
		},
	},
	{
		name: "remote-to-app",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Remote, f.TCP, ap(f.Pod, appPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing { return w.captured(f, appPort, a.Client) },
	},
	{
		name: "remote-to-hbone",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Remote, f.TCP, ap(f.Pod, hbonePort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "hbone", ap(f.Pod, hbonePort), a.Client)
		},
	},
	{
		// Kubelet's probe, already SNATed to the probe source: the node namespace sends
		// from that address (bound on its lo) straight to the app.
		name: "probe-to-app",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Node, f.TCP, ap(f.Pod, appPort), sockOpts{local: probeSource(f)}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "app", ap(f.Pod, appPort), a.Client)
		},
	},
	{
		name: "pod-to-loopback",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Pod, f.TCP, ap(f.Loopback, appPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "app", ap(f.Loopback, appPort), a.Client)
		},
	},
	{
		name: "pod-to-own-ip",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Pod, f.TCP, ap(f.Pod, appPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "app", ap(f.Pod, appPort), a.Client)
		},
	},
	{
		// The proxy's own upstream connection: marked, so never redirected.
		name: "proxy-marked-to-remote",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Pod, f.TCP, ap(f.Remote, serverPort), sockOpts{mark: proxyMark}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return atRemote("server", ap(f.Remote, serverPort), a.Client)
		},
	},
	{
		// The proxy delivering an inbound connection to the app with the client's IP as
		// source (HBONE delivery): transparent, bound to the remote's address, marked.
		// The app must see the remote's address, and its replies must come back to this
		// socket (the tag and the echo), through the connection mark and table 100.
		name: "spoofed-inbound-to-app",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			o := sockOpts{mark: proxyMark, transparent: true, local: f.Remote}
			return w.hub.tryTCP(w.topo.Pod, f.TCP, ap(f.Pod, appPort), o, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "app", ap(f.Pod, appPort), ap(f.Remote, a.Client.Port()))
		},
	},
	{
		name: "udp-to-remote",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryUDP(w.topo.Pod, f.UDP, ap(f.Remote, remoteUDPPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return atRemote("udp", ap(f.Remote, remoteUDPPort), a.Client)
		},
	},
	{
		name: "dns-udp",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryUDP(w.topo.Pod, f.UDP, ap(f.Remote, dnsPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			if w.dns {
				// Redirected in output: to the loopback address. The answer still comes
				// back from the remote's address (the connected socket accepts nothing else).
				return at("pod", "dns", ap(f.Loopback, dnsProxyPort), a.Client).datagram()
			}
			return atRemote("dns", ap(f.Remote, dnsPort), a.Client)
		},
	},
	{
		name: "dns-tcp",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Pod, f.TCP, ap(f.Remote, dnsPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			if w.dns {
				return at("pod", "dns", ap(f.Loopback, dnsProxyPort), a.Client).natFrom(ap(f.Remote, dnsPort))
			}
			// Without DNS capture, TCP to port 53 is just outbound TCP.
			return at("pod", "outbound", ap(f.Loopback, outboundPort), a.Client).natFrom(ap(f.Remote, dnsPort))
		},
	},
	{
		// The DNS proxy's own upstream query: marked, so never redirected.
		name: "dns-udp-proxy-marked",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryUDP(w.topo.Pod, f.UDP, ap(f.Remote, dnsPort), sockOpts{mark: proxyMark}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return atRemote("dns", ap(f.Remote, dnsPort), a.Client)
		},
	},
	{
		// The DNS proxy forwarding upstream from the very source port of a query it
		// captured a moment ago (the app's socket is gone; its conntrack entry, with the
		// redirect, lives on). Conntrack zone 1 keeps the proxy's query from matching that
		// entry and being redirected again.
		name: "dns-udp-proxy-marked-reusing-port",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			port := w.hub.nextUDPPort()
			app := w.hub.tryUDP(w.topo.Pod, f.UDP, ap(f.Remote, dnsPort), sockOpts{port: port}, to)
			if app.Err != nil || len(app.Landed) != 1 {
				return attempt{Err: fmt.Errorf("the app's query first: %v", app)}
			}
			return w.hub.tryUDP(w.topo.Pod, f.UDP, ap(f.Remote, dnsPort), sockOpts{mark: proxyMark, port: port}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return atRemote("dns", ap(f.Remote, dnsPort), a.Client)
		},
	},
}

// nodeClasses run with the node ruleset applied in the node namespace and the pod's IPs
// enrolled (docs/rules.md#node-side-probe-snat).
var nodeClasses = []class{
	{
		// Kubelet: a connection made in the node namespace, from no particular address.
		name: "node-to-pod",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Node, f.TCP, ap(f.Pod, appPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			// SNATed to the probe source (any port), so the pod lets it through to the app.
			return at("pod", "app", ap(f.Pod, appPort), ap(probeSource(f), 0))
		},
	},
	{
		name: "forwarded-to-pod",
		try: func(w *world, f nettest.Family, to time.Duration) attempt {
			return w.hub.tryTCP(w.topo.Remote, f.TCP, ap(f.Pod, appPort), sockOpts{}, to)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			// Not SNATed: the pod captures it, with the remote's own address and port.
			return w.captured(f, appPort, a.Client)
		},
	},
}

func classNamed(t *testing.T, classes []class, name string) class {
	t.Helper()
	for _, c := range classes {
		if c.name == name {
			return c
		}
	}
	t.Fatalf("no class %q", name)
	return class{}
}

type wantFunc func(w *world, f nettest.Family, a attempt) *landing

// check makes one connection of the class and asserts where it landed: exactly one
// landing, equal to want, and the client was answered by that very listener (after an
// echo round trip, for TCP); or, when want is nil, no answer and no landing at all.
// With silent, it must land as wanted but the answer must never reach the client.
// A tooth passes the class's intact expectation as unlike, which want must differ from:
// a tooth that expects what the intact rules do proves nothing.
func (w *world) check(t *testing.T, f nettest.Family, c class, want, unlike wantFunc, silent bool) {
	t.Helper()
	if want == nil {
		a := c.try(w, f, refused)
		if a.Err == nil || len(a.Landed) != 0 {
			t.Errorf("%s: want no connection, got %v", c.name, a)
		}
		return
	}
	timeout := answered
	if silent {
		timeout = refused
	}
	a := c.try(w, f, timeout)
	exp := want(w, f, a)
	if unlike != nil && *unlike(w, f, a) == *exp {
		t.Fatalf("%s: the broken rules are expected to do what the intact ones do (%v)", c.name, exp)
	}
	answeredOK := a.Err == nil && a.Reply == exp.tag()
	if silent {
		answeredOK = a.Err != nil
	}
	if !answeredOK || len(a.Landed) != 1 || !a.Landed[0].matches(*exp) {
		what := "want landed"
		if silent {
			what = "want no answer, landed"
		}
		t.Errorf("%s: %v\n\t%s %v", c.name, a, what, exp)
	}
}

func (w *world) checkAll(t *testing.T, classes []class) {
	for _, f := range w.topo.Families() {
		t.Run(f.Name, func(t *testing.T) {
			for _, c := range classes {
				t.Run(c.name, func(t *testing.T) { w.check(t, f, c, c.want, nil, false) })
			}
		})
	}
}

// tooth breaks one thing a class depends on and says where the class lands then.
type tooth struct {
	name  string
	only  compiler.CaptureMode // the mode it applies to; "": both
	dns   bool                 // starts from the pod rules with DNS capture on
	class string
	// breakIt applies the broken state (usually: the pod rules less a rule or a match).
	breakIt func(t *testing.T, w *world)
	want    wantFunc // nil: must not connect at all
	silent  bool     // lands as want says, but the answer never reaches the client
}

// withoutRules and withoutMatches are breakIt functions for the pod rules.
func withoutRules(chain func(*world) string, comment string) func(*testing.T, *world) {
	return func(t *testing.T, w *world) {
		w.applyPod(t, func(d *ruleset.Desired) { dropRules(t, d.Table, chain(w), comment) })
	}
}

func withoutMatches(chain func(*world) string, comment string, pred func(ruleset.Match) bool) func(*testing.T, *world) {
	return func(t *testing.T, w *world) {
		w.applyPod(t, func(d *ruleset.Desired) { dropMatches(t, d.Table, chain(w), comment, pred) })
	}
}

func chain(name string) func(*world) string { return func(*world) string { return name } }

func inbound(w *world) string { return w.inboundChain() }

func isProxyMarkExclusion(m ruleset.Match) bool {
	mk, ok := m.(ruleset.Mark)
	return ok && mk.Kind == ruleset.MetaMark && mk.Negate && mk.Value == proxyMark
}

func isLoopbackExclusion(m ruleset.Match) bool {
	a, ok := m.(ruleset.Addr)
	return ok && a.Dir == ruleset.Destination && a.Negate && a.Prefix.IsSingleIP() && a.Prefix.Addr().IsLoopback()
}

func isSocketMatch(m ruleset.Match) bool {
	_, ok := m.(ruleset.SocketUID)
	return ok
}

var podTeeth = []tooth{
	{
		name: "outbound-redirect-removed", class: "pod-to-remote",
		breakIt: withoutRules(chain(compiler.ChainNATOutput), "outbound:"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return atRemote("server", ap(f.Remote, serverPort), a.Client)
		},
	},
	{
		name: "inbound-capture-removed", class: "remote-to-app",
		breakIt: withoutRules(inbound, "inbound:"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "app", ap(f.Pod, appPort), a.Client)
		},
	},
	{
		name: "hbone-rule-removed", class: "remote-to-hbone",
		breakIt: withoutRules(inbound, "HBONE"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return w.captured(f, hbonePort, a.Client)
		},
	},
	{
		name: "probe-accept-removed", class: "probe-to-app",
		breakIt: withoutRules(inbound, "kubelet probe"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return w.captured(f, appPort, a.Client)
		},
	},
	{
		name: "loopback-exclusion-removed", class: "pod-to-loopback",
		breakIt: withoutMatches(chain(compiler.ChainNATOutput), "outbound:", isLoopbackExclusion),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "outbound", ap(f.Loopback, outboundPort), a.Client).natFrom(ap(f.Loopback, appPort))
		},
	},
	{
		name: "self-accept-removed-from-output", class: "pod-to-own-ip",
		breakIt: withoutRules(chain(compiler.ChainNATOutput), "the pod talking to itself"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "outbound", ap(f.Loopback, outboundPort), a.Client).natFrom(ap(f.Pod, appPort))
		},
	},
	{
		// Under TPROXY the filter chain sees the pod's own packets again on lo. (Under
		// REDIRECT the nat prerouting twin is never consulted for them: NAT was decided
		// once, in output.)
		name: "self-accept-removed-from-prerouting", class: "pod-to-own-ip", only: compiler.CaptureTProxy,
		breakIt: withoutRules(inbound, "the pod talking to itself"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return w.captured(f, appPort, a.Client)
		},
	},
	{
		name: "proxy-mark-exclusion-removed", class: "proxy-marked-to-remote",
		breakIt: withoutMatches(chain(compiler.ChainNATOutput), "outbound:", isProxyMarkExclusion),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "outbound", ap(f.Loopback, outboundPort), a.Client).natFrom(ap(f.Remote, serverPort))
		},
	},
	{
		// Without the connection mark the app's SYN-ACK routes out to the real remote,
		// which resets it: the spoofed socket never hears back.
		name: "connmark-rule-removed", class: "spoofed-inbound-to-app",
		breakIt: withoutRules(chain(compiler.ChainManglePrerouting), "proxy-originated connection"),
		want:    nil, // no connection
	},
	{
		name: "mark-restore-removed", class: "spoofed-inbound-to-app",
		breakIt: withoutRules(chain(compiler.ChainMangleOutput), "replies of proxy-originated"),
		want:    nil, // no connection
	},
	{
		name: "policy-routing-removed", class: "spoofed-inbound-to-app",
		breakIt: func(t *testing.T, w *world) {
			d := w.podDesired(t)
			if _, err := w.m.Remove(w.topo.Pod.Handle, d); err != nil {
				t.Fatal(err)
			}
			w.applyPod(t, func(d *ruleset.Desired) { d.Routing = nil })
		},
		want: nil, // no connection
	},
	{
		name: "dns-udp-redirect-removed", class: "dns-udp", dns: true,
		breakIt: withoutRules(chain(compiler.ChainNATOutput), "DNS over UDP"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return atRemote("dns", ap(f.Remote, dnsPort), a.Client)
		},
	},
	{
		// The proxy's own upstream query is captured by its own DNS listener, and the
		// answer is lost: the query went into conntrack zone 1 (raw output), the answer
		// from 15053 (not port 53) stays in zone 0, finds no connection there, and so is
		// not un-NATed back to the remote's address the client is connected to.
		name: "dns-proxy-mark-exclusion-removed", class: "dns-udp-proxy-marked", dns: true,
		breakIt: withoutMatches(chain(compiler.ChainNATOutput), "DNS over UDP", isProxyMarkExclusion),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "dns", ap(f.Loopback, dnsProxyPort), a.Client).datagram()
		},
		silent: true,
	},
	{
		// The proxy's query meets the captured query's conntrack entry and is redirected
		// to the proxy itself (a loop, in a real proxy).
		name: "dns-upstream-zone-removed", class: "dns-udp-proxy-marked-reusing-port", dns: true,
		breakIt: withoutRules(chain(compiler.ChainRawOutput), "DNS queries from the proxy upstream"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "dns", ap(f.Loopback, dnsProxyPort), a.Client).datagram()
		},
	},
	{
		name: "dns-tcp-redirect-removed", class: "dns-tcp", dns: true,
		breakIt: withoutRules(chain(compiler.ChainNATOutput), "DNS over TCP"),
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "outbound", ap(f.Loopback, outboundPort), a.Client).natFrom(ap(f.Remote, dnsPort))
		},
	},
}

var nodeTeeth = []tooth{
	{
		name: "probe-snat-removed", class: "node-to-pod",
		breakIt: func(t *testing.T, w *world) {
			w.applyHost(t, func(d *ruleset.Desired) { dropRules(t, d.Table, compiler.ChainNATPostrouting, "kubelet probe") })
			w.enroll(t)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return w.captured(f, appPort, a.Client) // the node's own address: captured
		},
	},
	{
		name: "pod-not-enrolled", class: "node-to-pod",
		breakIt: func(t *testing.T, w *world) {
			for _, f := range w.topo.Families() {
				if changed, err := w.m.RemovePodIP(w.topo.Node.Handle, f.Pod, "pod-uid"); err != nil || !changed {
					t.Fatalf("remove pod IP %s: %v %v", f.Pod, changed, err)
				}
			}
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return w.captured(f, appPort, a.Client)
		},
	},
	{
		// `meta skuid >= 0` is what keeps forwarded traffic from being SNATed.
		name: "socket-match-removed", class: "forwarded-to-pod",
		breakIt: func(t *testing.T, w *world) {
			w.applyHost(t, func(d *ruleset.Desired) {
				dropMatches(t, d.Table, compiler.ChainNATPostrouting, "kubelet probe", isSocketMatch)
			})
			w.enroll(t)
		},
		want: func(w *world, f nettest.Family, a attempt) *landing {
			return at("pod", "app", ap(f.Pod, appPort), ap(probeSource(f), 0))
		},
	},
}

// bite runs each tooth: break, assert the class breaks in every family, restore, assert
// the class works again (so the breakage was the removed rule's doing).
func (w *world) bite(t *testing.T, teeth []tooth, classes []class) {
	for _, th := range teeth {
		if th.only != "" && th.only != w.mode {
			continue
		}
		t.Run(th.name, func(t *testing.T) {
			c := classNamed(t, classes, th.class)
			w.dns = th.dns
			w.intact(t)
			th.breakIt(t, w)
			for _, f := range w.topo.Families() {
				t.Run(f.Name, func(t *testing.T) { w.check(t, f, c, th.want, c.want, th.silent) })
			}
			w.intact(t)
			for _, f := range w.topo.Families() {
				t.Run("healed-"+f.Name, func(t *testing.T) { w.check(t, f, c, c.want, nil, false) })
			}
		})
	}
}

func TestTraffic(t *testing.T) {
	nettest.Require(t, "nft")
	for _, tc := range []struct{ name, fixture string }{
		{"tproxy", "default-dualstack"},
		{"redirect", "redirect-dualstack"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newWorld(t, tc.fixture)
			if string(w.mode) != tc.name {
				t.Fatalf("fixture %s has capture mode %s", tc.fixture, w.mode)
			}
			// Kubelet's probes arrive from the probe source: the node owns it.
			w.topo.Node.IP(t, "addr add "+probeSource(w.topo.IPv4).String()+"/32 dev lo",
				"addr add "+probeSource(w.topo.IPv6).String()+"/128 dev lo nodad")

			w.intact(t)
			w.checkAll(t, podClasses)
			t.Run("dns-on", func(t *testing.T) {
				w.dns = true
				w.intact(t)
				w.checkAll(t, podClasses)
			})
			t.Run("teeth", func(t *testing.T) { w.bite(t, podTeeth, podClasses) })
		})
	}
	t.Run("node", func(t *testing.T) {
		t.Parallel()
		w := newWorld(t, "default-dualstack")
		w.node = true
		w.intact(t)
		w.checkAll(t, nodeClasses)
		t.Run("teeth", func(t *testing.T) { w.bite(t, nodeTeeth, nodeClasses) })
	})
}
