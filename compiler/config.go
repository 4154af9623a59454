package compiler

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/nftmesh/nftmesh/ruleset"
)

// Istio's values, used for every field an intent leaves unset.
const (
	DefaultProxyMark      = 0x539
	DefaultProxyMarkMask  = 0xfff
	DefaultConnMark       = 0x111
	DefaultConnMarkMask   = 0xfff
	DefaultOutboundPort   = 15001
	DefaultInboundPort    = 15006
	DefaultHBONEPort      = 15008
	DefaultDNSPort        = 15053
	DefaultProbeSourceV4  = "169.254.7.127"
	DefaultProbeSourceV6  = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
	DefaultInboundCapture = CaptureTProxy
	// DefaultDNSCapture is Istio 1.21's (the seed's) node-wide default; Istio 1.25 and
	// later turn it on by default.
	DefaultDNSCapture = false
	DefaultIPv6       = true
)

// MarkSpec is a resolved mark: Value compared and written under Mask.
type MarkSpec struct {
	Value uint32
	Mask  uint32
}

// Config is an intent with every default filled in and every value checked: what the
// compiler builds from.
type Config struct {
	ProxyMark            MarkSpec
	ConnMark             MarkSpec
	OutboundPort         uint16
	InboundPlaintextPort uint16
	HBONEPort            uint16
	DNSPort              uint16
	ProbeSourceV4        netip.Addr
	ProbeSourceV6        netip.Addr
	InboundCapture       CaptureMode
	DNSCapture           bool // node-wide
	IPv6                 bool
	Pod                  PodConfig
}

// PodConfig is the resolved per-pod behaviour.
type PodConfig struct {
	BypassInboundCapture     bool
	DNSCapture               bool // effective: the pod override, else the node-wide setting
	RerouteVirtualInterfaces []string
}

// DefaultIntent is the built-in intent: every field unset, so every default applies.
func DefaultIntent() Intent {
	return Intent{APIVersion: APIVersion, Kind: Kind, Metadata: Metadata{Name: "default"}}
}

// Resolve fills in defaults and validates. The error lists every problem, each naming
// the field path and the value.
func Resolve(in Intent) (Config, error) {
	var errs []error
	bad := func(field string, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	s := in.Spec
	var cfg Config
	proxyOK, connOK := false, false
	cfg.ProxyMark, proxyOK = resolveMark(s.Marks.Proxy, "spec.marks.proxy", DefaultProxyMark, DefaultProxyMarkMask, bad)
	cfg.ConnMark, connOK = resolveMark(s.Marks.Connection, "spec.marks.connection", DefaultConnMark, DefaultConnMarkMask, bad)
	markOK := proxyOK && connOK
	for _, m := range []struct {
		field  string
		spec   MarkSpec
		parsed bool
	}{{"spec.marks.proxy", cfg.ProxyMark, proxyOK}, {"spec.marks.connection", cfg.ConnMark, connOK}} {
		switch {
		case !m.parsed:
		case m.spec.Mask == 0:
			bad(m.field+".mask", "0x0 compares no bits: every packet would match")
			markOK = false
		case m.spec.Value&^m.spec.Mask != 0:
			bad(m.field+".value", "%#x has bits outside mask %#x", m.spec.Value, m.spec.Mask)
			markOK = false
		case m.spec.Value == 0:
			bad(m.field+".value", "0x0 cannot be told from an unmarked packet")
			markOK = false
		}
	}
	if markOK {
		p, c := cfg.ProxyMark, cfg.ConnMark
		if c.Value&p.Mask == p.Value || p.Value&c.Mask == c.Value {
			bad("spec.marks", "proxy mark %#x/%#x and connection mark %#x/%#x cannot be told apart under their masks",
				p.Value, p.Mask, c.Value, c.Mask)
		}
	}

	ports := []struct {
		field string
		value *int
		def   int
		dst   *uint16
	}{
		{"spec.ports.outbound", s.Ports.Outbound, DefaultOutboundPort, &cfg.OutboundPort},
		{"spec.ports.inboundPlaintext", s.Ports.InboundPlaintext, DefaultInboundPort, &cfg.InboundPlaintextPort},
		{"spec.ports.hbone", s.Ports.HBONE, DefaultHBONEPort, &cfg.HBONEPort},
		{"spec.ports.dns", s.Ports.DNS, DefaultDNSPort, &cfg.DNSPort},
	}
	usedBy := map[int]string{}
	for _, p := range ports {
		v := p.def
		if p.value != nil {
			v = *p.value
		}
		if v < 1 || v > 65535 {
			bad(p.field, "%d is out of range 1-65535", v)
			continue
		}
		if v == 53 {
			bad(p.field, "53 is the DNS port the proxy captures; a listener there would capture itself")
			continue
		}
		if other, dup := usedBy[v]; dup {
			bad(p.field, "%d is already %s; each listener needs its own port", v, other)
			continue
		}
		usedBy[v] = p.field
		*p.dst = uint16(v)
	}

	cfg.ProbeSourceV4 = resolveAddr(s.ProbeSource.IPv4, DefaultProbeSourceV4, true, "spec.probeSource.ipv4", bad)
	cfg.ProbeSourceV6 = resolveAddr(s.ProbeSource.IPv6, DefaultProbeSourceV6, false, "spec.probeSource.ipv6", bad)

	cfg.InboundCapture = DefaultInboundCapture
	if s.InboundCapture != nil {
		switch *s.InboundCapture {
		case CaptureTProxy, CaptureRedirect:
			cfg.InboundCapture = *s.InboundCapture
		default:
			bad("spec.inboundCapture", "%q is not one of %q, %q", *s.InboundCapture, CaptureTProxy, CaptureRedirect)
		}
	}
	cfg.DNSCapture = boolOr(s.DNSCapture, DefaultDNSCapture)
	cfg.IPv6 = boolOr(s.IPv6, DefaultIPv6)

	cfg.Pod.BypassInboundCapture = s.Pod.BypassInboundCapture
	cfg.Pod.DNSCapture = boolOr(s.Pod.DNSCapture, cfg.DNSCapture)
	seen := map[string]bool{}
	for i, name := range s.Pod.RerouteVirtualInterfaces {
		field := fmt.Sprintf("spec.pod.rerouteVirtualInterfaces[%d]", i)
		if err := ruleset.ValidateInterfaceName(name); err != nil {
			bad(field, "%v", err)
			continue
		}
		if name == "lo" {
			bad(field, `"lo" cannot be rerouted: the pod's own and the proxy's traffic use it`)
			continue
		}
		// A trailing '*' is a prefix wildcard (as in nft): one that matches "lo" would
		// reroute it.
		if prefix, ok := strings.CutSuffix(name, "*"); ok && strings.HasPrefix("lo", prefix) {
			bad(field, `%q matches "lo", which cannot be rerouted: the pod's own and the proxy's traffic use it`, name)
			continue
		}
		if seen[name] {
			bad(field, "%q is listed twice", name)
			continue
		}
		seen[name] = true
		cfg.Pod.RerouteVirtualInterfaces = append(cfg.Pod.RerouteVirtualInterfaces, name)
	}
	return cfg, errors.Join(errs...)
}

func resolveMark(m *MaskedMark, field string, value, mask uint32, bad func(string, string, ...any)) (MarkSpec, bool) {
	spec := MarkSpec{Value: value, Mask: mask}
	if m == nil {
		return spec, true
	}
	ok := true
	for _, n := range []struct {
		name string
		in   *Number
		out  *uint32
	}{{"value", m.Value, &spec.Value}, {"mask", m.Mask, &spec.Mask}} {
		if n.in == nil {
			continue
		}
		v, err := n.in.parse()
		if err != nil {
			bad(field+"."+n.name, "%v", err)
			ok = false
			continue
		}
		*n.out = v
	}
	return spec, ok
}

func resolveAddr(s *string, def string, want4 bool, field string, bad func(string, string, ...any)) netip.Addr {
	text := def
	if s != nil {
		text = strings.TrimSpace(*s)
	}
	family := "IPv6"
	if want4 {
		family = "IPv4"
	}
	a, err := netip.ParseAddr(text)
	if err != nil || a.Zone() != "" || a.Is4() != want4 || a.Is4In6() {
		bad(field, "%q is not an %s address", text, family)
		return netip.Addr{}
	}
	if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
		bad(field, "%s cannot be a probe source (unspecified, loopback or multicast)", a)
		return netip.Addr{}
	}
	return a
}

func boolOr(b *bool, def bool) bool {
	if b == nil {
		return def
	}
	return *b
}
