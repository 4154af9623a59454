package compiler

import (
	"fmt"
	"net/netip"

	rs "github.com/nftmesh/nftmesh/ruleset"
)

// TableName is the table nftmesh owns, in pod and node namespaces alike. Nothing else is
// ever written.
const TableName = "nftmesh"

// Chain and set names. Chains are named after the iptables table whose job they do and
// the hook they attach to, so that people who know Istio's rules find their way.
const (
	ChainRawPrerouting    = "raw_prerouting"
	ChainManglePrerouting = "mangle_prerouting"
	ChainNATPrerouting    = "nat_prerouting"
	ChainRawOutput        = "raw_output"
	ChainMangleOutput     = "mangle_output"
	ChainNATOutput        = "nat_output"
	ChainNATPostrouting   = "nat_postrouting"

	SetPodIPsV4 = "pod_ips_v4"
	SetPodIPsV6 = "pod_ips_v6"
)

// DNSConntrackZone separates the proxy's upstream DNS flows from the app's captured ones.
const DNSConntrackZone = 1

const dnsPort = 53

// Target selects which ruleset to compile.
type Target string

const (
	TargetPod  Target = "pod"
	TargetHost Target = "host"
)

// Compile resolves the intent and builds the ruleset for target.
func Compile(in Intent, target Target) (*rs.Table, error) {
	cfg, err := Resolve(in)
	if err != nil {
		return nil, err
	}
	var t *rs.Table
	switch target {
	case TargetPod:
		t = PodRuleset(cfg)
	case TargetHost:
		t = HostRuleset(cfg)
	default:
		return nil, fmt.Errorf("target: %q is not %q or %q", target, TargetPod, TargetHost)
	}
	// A failure here is a compiler bug, not bad input: Resolve accepted the intent.
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("compiler produced an invalid %s ruleset: %w", target, err)
	}
	return t, nil
}

// family is what differs between the IPv4 rules and their IPv6 twins.
type family struct {
	ip          rs.IPFamily
	loopback    netip.Prefix
	probeSource netip.Addr
	podIPs      string
}

func (c Config) families() []family {
	fs := []family{{rs.IPv4, netip.MustParsePrefix("127.0.0.1/32"), c.ProbeSourceV4, SetPodIPsV4}}
	if c.IPv6 {
		fs = append(fs, family{rs.IPv6, netip.MustParsePrefix("::1/128"), c.ProbeSourceV6, SetPodIPsV6})
	}
	return fs
}

// builder holds the matches and statements shared by many rules.
type builder struct {
	cfg Config
}

func (b builder) proxyMarked() rs.Match {
	return rs.Mark{Kind: rs.MetaMark, Mask: b.cfg.ProxyMark.Mask, Value: b.cfg.ProxyMark.Value}
}

func (b builder) notProxyMarked() rs.Match {
	return rs.Mark{Kind: rs.MetaMark, Mask: b.cfg.ProxyMark.Mask, Value: b.cfg.ProxyMark.Value, Negate: true}
}

func (b builder) connMarked(kind rs.MarkKind) rs.Match {
	return rs.Mark{Kind: kind, Mask: b.cfg.ConnMark.Mask, Value: b.cfg.ConnMark.Value}
}

// setConnMark writes the connection mark into kind, keeping the bits outside its mask.
func (b builder) setConnMark(kind rs.MarkKind) rs.Statement {
	return rs.SetMark{Target: kind, From: kind, Mask: b.cfg.ConnMark.Mask, Value: b.cfg.ConnMark.Value}
}

// tproxy marks the packet and hands it to the local transparent socket on port, then
// accepts. The accept is needed: nftables' tproxy statement, unlike iptables' TPROXY
// target, is not terminal. Without it evaluation goes on, and a later tproxy rule (the
// inbound one, which also matches HBONE traffic) takes the packet from the socket the
// first one gave it to.
func (b builder) tproxy(f rs.IPFamily, port uint16) []rs.Statement {
	return []rs.Statement{b.setConnMark(rs.MetaMark), rs.TProxy{Family: f, Port: port}, rs.Verdict{Kind: rs.Accept}}
}

func addr(f family, dir rs.Direction, p netip.Prefix, negate bool) rs.Match {
	return rs.Addr{Family: f.ip, Dir: dir, Prefix: p, Negate: negate}
}

func host(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

var (
	tcp         = rs.MetaL4Proto{Proto: rs.TCP}
	accept      = []rs.Statement{rs.Verdict{Kind: rs.Accept}}
	fromLo      = rs.Interface{Name: "lo"}
	toLo        = rs.Interface{Out: true, Name: "lo"}
	notToLo     = rs.Interface{Out: true, Name: "lo", Negate: true}
	established = rs.CtState{States: rs.CtEstablished | rs.CtRelated}
)

func dport(proto rs.L4Proto, port uint16) rs.Match {
	return rs.Port{Proto: proto, Dir: rs.DPort, Port: port}
}

// PodRuleset builds the in-pod ruleset (docs/rules.md#traffic-classes).
func PodRuleset(cfg Config) *rs.Table {
	b := builder{cfg}
	fams := cfg.families()
	pod := cfg.Pod
	capture := !pod.BypassInboundCapture
	tproxyMode := cfg.InboundCapture == CaptureTProxy

	t := &rs.Table{Name: TableName}
	add := func(c *rs.Chain) {
		if len(c.Rules) > 0 {
			t.Chains = append(t.Chains, c)
		}
	}

	rawPre := baseChain(ChainRawPrerouting, rs.ChainTypeFilter, rs.HookPrerouting, rs.PriorityRaw)
	rawOut := baseChain(ChainRawOutput, rs.ChainTypeFilter, rs.HookOutput, rs.PriorityRaw)
	if pod.DNSCapture {
		rawPre.Rules = append(rawPre.Rules, rs.Rule{
			Matches:    []rs.Match{rs.Port{Proto: rs.UDP, Dir: rs.SPort, Port: dnsPort}, b.notProxyMarked()},
			Statements: []rs.Statement{rs.SetCtZone{Zone: DNSConntrackZone}},
			Comment:    "DNS answers from upstream to the proxy: conntrack zone 1",
		})
		rawOut.Rules = append(rawOut.Rules, rs.Rule{
			Matches:    []rs.Match{dport(rs.UDP, dnsPort), b.proxyMarked()},
			Statements: []rs.Statement{rs.SetCtZone{Zone: DNSConntrackZone}},
			Comment:    "DNS queries from the proxy upstream: conntrack zone 1",
		})
	}

	manglePre := baseChain(ChainManglePrerouting, rs.ChainTypeFilter, rs.HookPrerouting, rs.PriorityMangle)
	natPre := baseChain(ChainNATPrerouting, rs.ChainTypeNAT, rs.HookPrerouting, rs.PriorityDstNAT)

	// Virtual interfaces come first: their TCP is outbound, redirected to the outbound
	// listener in nat prerouting, so the TPROXY rules must let it pass.
	for _, vif := range pod.RerouteVirtualInterfaces {
		if tproxyMode {
			manglePre.Rules = append(manglePre.Rules, rs.Rule{
				Matches:    []rs.Match{rs.Interface{Name: vif}, tcp},
				Statements: []rs.Statement{rs.Verdict{Kind: rs.Return}},
				Comment:    "virtual interface " + vif + ": outbound, left to nat_prerouting",
			})
		}
		natPre.Rules = append(natPre.Rules, rs.Rule{
			Matches:    []rs.Match{rs.Interface{Name: vif}, tcp},
			Statements: []rs.Statement{rs.Redirect{Port: cfg.OutboundPort}},
			Comment:    "virtual interface " + vif + ": treated as outbound",
		})
	}

	manglePre.Rules = append(manglePre.Rules, rs.Rule{
		Matches:    []rs.Match{b.proxyMarked()},
		Statements: []rs.Statement{b.setConnMark(rs.CtMark)},
		Comment:    "proxy-originated connection: its replies route back to the proxy",
	})

	// The inbound steps (docs/rules.md#prerouting, steps 2-6) live in the mangle chain
	// under TPROXY and in the nat chain under REDIRECT.
	inbound := &natPre.Rules
	if tproxyMode {
		inbound = &manglePre.Rules
	}
	if capture {
		for _, f := range fams {
			*inbound = append(*inbound, rs.Rule{
				Matches:    []rs.Match{addr(f, rs.Source, host(f.probeSource), false), tcp},
				Statements: accept,
				Comment:    "kubelet probe: reaches the app untouched",
			})
		}
	}
	for _, f := range fams {
		*inbound = append(*inbound, rs.Rule{
			Matches:    []rs.Match{fromLo, addr(f, rs.Destination, f.loopback, true), tcp},
			Statements: accept,
			Comment:    "the pod talking to itself",
		})
	}
	if tproxyMode {
		// One rule for both families: a port-only tproxy uses the packet's family.
		*inbound = append(*inbound, rs.Rule{
			Matches:    []rs.Match{dport(rs.TCP, cfg.HBONEPort), b.notProxyMarked()},
			Statements: b.tproxy(rs.IPAny, cfg.HBONEPort),
			Comment:    "HBONE: to the proxy's HBONE listener",
		})
		*inbound = append(*inbound, rs.Rule{
			Matches:    []rs.Match{tcp, established},
			Statements: accept,
			Comment:    "established connections stay with their socket",
		})
	} else {
		*inbound = append(*inbound, rs.Rule{
			Matches:    []rs.Match{dport(rs.TCP, cfg.HBONEPort), b.notProxyMarked()},
			Statements: accept,
			Comment:    "HBONE: the proxy listens on this port itself",
		})
	}
	if capture {
		for _, f := range fams {
			var stmts []rs.Statement
			if tproxyMode {
				stmts = b.tproxy(f.ip, cfg.InboundPlaintextPort)
			} else {
				stmts = []rs.Statement{rs.Redirect{Port: cfg.InboundPlaintextPort}}
			}
			*inbound = append(*inbound, rs.Rule{
				Matches:    []rs.Match{addr(f, rs.Destination, f.loopback, true), tcp, b.notProxyMarked()},
				Statements: stmts,
				Comment:    "inbound: to the proxy's inbound listener",
			})
		}
	}

	mangleOut := baseChain(ChainMangleOutput, rs.ChainTypeRoute, rs.HookOutput, rs.PriorityMangle)
	mangleOut.Rules = append(mangleOut.Rules, rs.Rule{
		Matches:    []rs.Match{b.connMarked(rs.CtMark)},
		Statements: []rs.Statement{rs.SetMark{Target: rs.MetaMark, From: rs.CtMark}},
		Comment:    "replies of proxy-originated connections: route via the proxy's table",
	})

	natOut := baseChain(ChainNATOutput, rs.ChainTypeNAT, rs.HookOutput, rs.PriorityDstNAT)
	for _, f := range fams {
		natOut.Rules = append(natOut.Rules, rs.Rule{
			Matches:    []rs.Match{addr(f, rs.Destination, host(f.probeSource), false), tcp},
			Statements: accept,
			Comment:    "replies to kubelet probes",
		})
	}
	natOut.Rules = append(natOut.Rules, rs.Rule{
		Matches:    []rs.Match{tcp, b.connMarked(rs.MetaMark)},
		Statements: accept,
		Comment:    "proxy-originated inbound connections",
	})
	for _, f := range fams {
		natOut.Rules = append(natOut.Rules, rs.Rule{
			Matches:    []rs.Match{toLo, addr(f, rs.Destination, f.loopback, true)},
			Statements: accept,
			Comment:    "the pod talking to itself",
		})
	}
	if pod.DNSCapture {
		natOut.Rules = append(natOut.Rules, rs.Rule{
			Matches:    []rs.Match{notToLo, dport(rs.UDP, dnsPort), b.notProxyMarked()},
			Statements: []rs.Statement{rs.Redirect{Port: cfg.DNSPort}},
			Comment:    "DNS over UDP: to the proxy's DNS listener",
		})
		for _, f := range fams {
			natOut.Rules = append(natOut.Rules, rs.Rule{
				Matches:    []rs.Match{addr(f, rs.Destination, f.loopback, true), dport(rs.TCP, dnsPort), b.notProxyMarked()},
				Statements: []rs.Statement{rs.Redirect{Port: cfg.DNSPort}},
				Comment:    "DNS over TCP: to the proxy's DNS listener",
			})
		}
	}
	for _, f := range fams {
		natOut.Rules = append(natOut.Rules, rs.Rule{
			Matches:    []rs.Match{addr(f, rs.Destination, f.loopback, true), tcp, b.notProxyMarked()},
			Statements: []rs.Statement{rs.Redirect{Port: cfg.OutboundPort}},
			Comment:    "outbound: to the proxy's outbound listener",
		})
	}

	// Packet path order: raw, mangle, nat; prerouting before output.
	for _, c := range []*rs.Chain{rawPre, manglePre, natPre, rawOut, mangleOut, natOut} {
		add(c)
	}
	return t
}

// HostRuleset builds the node ruleset (docs/rules.md#node-side-probe-snat): locally originated TCP to
// an enrolled pod's IP leaves with the probe source. `meta skuid` only matches a packet
// that carries a full local socket, so `meta skuid >= 0` is iptables' `--socket-exists`:
// kubelet's probes match whatever its uid, forwarded traffic never does, and no process
// scan is needed. The pod IP sets start empty; the agent fills them per pod.
func HostRuleset(cfg Config) *rs.Table {
	t := &rs.Table{Name: TableName}
	post := baseChain(ChainNATPostrouting, rs.ChainTypeNAT, rs.HookPostrouting, rs.PrioritySrcNAT)
	for _, f := range cfg.families() {
		setType := rs.SetTypeIPv4Addr
		if f.ip == rs.IPv6 {
			setType = rs.SetTypeIPv6Addr
		}
		t.Sets = append(t.Sets, &rs.Set{Name: f.podIPs, Type: setType, Runtime: true})
		post.Rules = append(post.Rules, rs.Rule{
			Matches: []rs.Match{
				rs.Addr{Family: f.ip, Dir: rs.Destination, Set: f.podIPs},
				tcp,
				rs.SocketUID{Op: rs.OpGe, UID: 0},
			},
			Statements: []rs.Statement{rs.SNAT{Addr: f.probeSource}},
			Comment:    "kubelet probe: locally originated TCP to an enrolled pod",
		})
	}
	t.Chains = append(t.Chains, post)
	return t
}

func baseChain(name string, typ rs.ChainType, hook rs.Hook, priority int) *rs.Chain {
	return &rs.Chain{Name: name, Base: &rs.BaseChain{Type: typ, Hook: hook, Priority: priority, Policy: rs.PolicyAccept}}
}

// Policy routing in the pod namespace: packets carrying the connection mark (replies of
// connections the proxy originated with a spoofed source) are delivered locally, to the
// proxy's transparent socket, through their own table.
const (
	RouteTable   = 100
	RulePriority = 32764
)

// PodRouting returns the policy routing that goes with the pod ruleset.
func PodRouting(cfg Config) rs.Routing {
	return rs.Routing{Mark: cfg.ConnMark.Value, Mask: cfg.ConnMark.Mask, Table: RouteTable, Priority: RulePriority, IPv6: cfg.IPv6}
}

// PodState is what a pod's namespace should hold: the intent's pod section with the pod's
// annotations laid over it, compiled to the pod ruleset and its policy routing. The CLI
// and the node agent both derive a pod's state here, so they cannot disagree.
func PodState(in Intent, annotations map[string]string) (rs.Desired, error) {
	pod, err := ApplyAnnotations(in.Spec.Pod, annotations)
	if err != nil {
		return rs.Desired{}, err
	}
	in.Spec.Pod = pod
	cfg, err := Resolve(in)
	if err != nil {
		return rs.Desired{}, err
	}
	t, err := Compile(in, TargetPod)
	if err != nil {
		return rs.Desired{}, err
	}
	r := PodRouting(cfg)
	return rs.Desired{Table: t, Routing: &r}, nil
}

// HostState is what the node's namespace should hold: the node ruleset, no routing.
func HostState(in Intent) (rs.Desired, error) {
	t, err := Compile(in, TargetHost)
	if err != nil {
		return rs.Desired{}, err
	}
	return rs.Desired{Table: t}, nil
}
