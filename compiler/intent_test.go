package compiler

import (
	"strings"
	"testing"
)

const header = "apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\n"

// Each bad intent must fail with an error that names the field and the value.
func TestBadIntents(t *testing.T) {
	cases := []struct {
		name string
		yaml string
		want []string // all must appear in the error
	}{
		{"port out of range", header + "spec:\n  ports:\n    outbound: 70000\n",
			[]string{"spec.ports.outbound", "70000", "out of range"}},
		{"port zero", header + "spec:\n  ports:\n    dns: 0\n",
			[]string{"spec.ports.dns", "0 is out of range"}},
		{"negative port", header + "spec:\n  ports:\n    hbone: -1\n",
			[]string{"spec.ports.hbone", "-1 is out of range"}},
		{"two ports equal", header + "spec:\n  ports:\n    inboundPlaintext: 15001\n",
			[]string{"spec.ports.inboundPlaintext", "15001 is already spec.ports.outbound"}},
		{"default port collides", header + "spec:\n  ports:\n    dns: 15008\n",
			[]string{"spec.ports.dns", "15008 is already spec.ports.hbone"}},
		{"listener on 53", header + "spec:\n  ports:\n    dns: 53\n",
			[]string{"spec.ports.dns", "53"}},
		{"port not a number", header + "spec:\n  ports:\n    outbound: \"fifteen\"\n",
			[]string{"ports.outbound", "string"}},
		{"mark outside mask", header + "spec:\n  marks:\n    proxy:\n      value: 0x1539\n",
			[]string{"spec.marks.proxy.value", "0x1539", "outside mask 0xfff"}},
		{"connection mark outside mask", header + "spec:\n  marks:\n    connection:\n      value: 0x111\n      mask: 0xff\n",
			[]string{"spec.marks.connection.value", "0x111", "outside mask 0xff"}},
		{"mask zero", header + "spec:\n  marks:\n    proxy:\n      mask: 0\n",
			[]string{"spec.marks.proxy.mask", "0x0"}},
		{"mark zero", header + "spec:\n  marks:\n    connection:\n      value: 0\n",
			[]string{"spec.marks.connection.value", "0x0", "unmarked"}},
		// Under mask 0x00f the proxy mark reads 0x9 and the connection mark 0x1: fine;
		// under 0x010 both read 0x10: indistinguishable.
		{"marks indistinguishable", header + "spec:\n  marks:\n    proxy:\n      value: 0x10\n      mask: 0x10\n    connection:\n      value: 0x10\n      mask: 0x10\n",
			[]string{"spec.marks", "0x10/0x10", "cannot be told apart"}},
		{"proxy mask hides the difference", header + "spec:\n  marks:\n    proxy:\n      value: 0x1\n      mask: 0x1\n",
			[]string{"spec.marks", "proxy mark 0x1/0x1", "connection mark 0x111/0xfff", "cannot be told apart"}},
		{"mark not a number", header + "spec:\n  marks:\n    proxy:\n      value: banana\n",
			[]string{"banana", "not a 32-bit number"}},
		{"bad probe address", header + "spec:\n  probeSource:\n    ipv4: 300.1.1.1\n",
			[]string{"spec.probeSource.ipv4", `"300.1.1.1"`, "not an IPv4 address"}},
		{"probe CIDR instead of address", header + "spec:\n  probeSource:\n    ipv4: 169.254.7.127/32\n",
			[]string{"spec.probeSource.ipv4", `"169.254.7.127/32"`, "not an IPv4 address"}},
		{"v4 address as v6 probe", header + "spec:\n  probeSource:\n    ipv6: 169.254.7.127\n",
			[]string{"spec.probeSource.ipv6", `"169.254.7.127"`, "not an IPv6 address"}},
		{"v6 CIDR as v6 probe", header + "spec:\n  probeSource:\n    ipv6: fd00::/64\n",
			[]string{"spec.probeSource.ipv6", `"fd00::/64"`}},
		{"loopback probe", header + "spec:\n  probeSource:\n    ipv4: 127.0.0.1\n",
			[]string{"spec.probeSource.ipv4", "127.0.0.1", "cannot be a probe source"}},
		{"bad interface name", header + "spec:\n  pod:\n    rerouteVirtualInterfaces: [eth0, \"eth/1\"]\n",
			[]string{"spec.pod.rerouteVirtualInterfaces[1]", `"eth/1"`}},
		{"interface name too long", header + "spec:\n  pod:\n    rerouteVirtualInterfaces: [averyveryverylongname]\n",
			[]string{"spec.pod.rerouteVirtualInterfaces[0]", "averyveryverylongname", "longer than 15"}},
		{"empty interface name", header + "spec:\n  pod:\n    rerouteVirtualInterfaces: [\"\"]\n",
			[]string{"spec.pod.rerouteVirtualInterfaces[0]", "empty"}},
		{"interface twice", header + "spec:\n  pod:\n    rerouteVirtualInterfaces: [eth1, eth1]\n",
			[]string{"spec.pod.rerouteVirtualInterfaces[1]", `"eth1" is listed twice`}},
		{"lo rerouted", header + "spec:\n  pod:\n    rerouteVirtualInterfaces: [lo]\n",
			[]string{"spec.pod.rerouteVirtualInterfaces[0]", `"lo"`}},
		{"bad capture mode", header + "spec:\n  inboundCapture: ebpf\n",
			[]string{"spec.inboundCapture", `"ebpf"`, "tproxy", "redirect"}},
		{"unknown field", header + "spec:\n  proxyMrk: 1\n",
			[]string{"unknown field", "proxyMrk"}},
		{"unknown nested field", header + "spec:\n  ports:\n    outbund: 1\n",
			[]string{"unknown field", "outbund"}},
		{"unsupported apiVersion", "apiVersion: nftmesh.dev/v2\nkind: Intent\n",
			[]string{"apiVersion", `"nftmesh.dev/v2"`, "not supported"}},
		{"missing apiVersion", "kind: Intent\n",
			[]string{"apiVersion", `""`, "not supported"}},
		{"unsupported kind", "apiVersion: nftmesh.dev/v1alpha1\nkind: Policy\n",
			[]string{"kind", `"Policy"`, "not supported"}},
		{"empty document", "  \n", []string{"empty document"}},
		{"not YAML", "apiVersion: [\n", []string{"intent:"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in, err := Parse([]byte(tc.yaml))
			if err == nil {
				_, err = Compile(in, TargetPod)
			}
			if err == nil {
				t.Fatalf("no error for:\n%s", tc.yaml)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// Every problem is reported at once, not just the first.
func TestResolveReportsAllProblems(t *testing.T) {
	in, err := Parse([]byte(header + "spec:\n  ports:\n    outbound: 0\n    hbone: 99999\n  inboundCapture: x\n"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Resolve(in)
	for _, w := range []string{"spec.ports.outbound", "spec.ports.hbone", "spec.inboundCapture"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error %v does not mention %s", err, w)
		}
	}
}

func TestDefaults(t *testing.T) {
	cfg, err := Resolve(DefaultIntent())
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		ProxyMark: MarkSpec{0x539, 0xfff}, ConnMark: MarkSpec{0x111, 0xfff},
		OutboundPort: 15001, InboundPlaintextPort: 15006, HBONEPort: 15008, DNSPort: 15053,
		InboundCapture: CaptureTProxy, DNSCapture: false, IPv6: true,
	}
	if cfg.ProxyMark != want.ProxyMark || cfg.ConnMark != want.ConnMark ||
		cfg.OutboundPort != want.OutboundPort || cfg.InboundPlaintextPort != want.InboundPlaintextPort ||
		cfg.HBONEPort != want.HBONEPort || cfg.DNSPort != want.DNSPort ||
		cfg.InboundCapture != want.InboundCapture || cfg.DNSCapture != want.DNSCapture || cfg.IPv6 != want.IPv6 {
		t.Errorf("defaults = %+v, want %+v", cfg, want)
	}
	if cfg.ProbeSourceV4.String() != "169.254.7.127" || cfg.ProbeSourceV6.String() != "fd16:9254:7127:1337:ffff:ffff:ffff:ffff" {
		t.Errorf("probe sources = %s, %s", cfg.ProbeSourceV4, cfg.ProbeSourceV6)
	}
}

// Marks may be written as decimal, hex or quoted hex.
func TestMarkSyntax(t *testing.T) {
	for _, v := range []string{"1337", "0x539", `"0x539"`} {
		in, err := Parse([]byte(header + "spec:\n  marks:\n    proxy:\n      value: " + v + "\n"))
		if err != nil {
			t.Fatalf("%s: %v", v, err)
		}
		cfg, err := Resolve(in)
		if err != nil {
			t.Fatalf("%s: %v", v, err)
		}
		if cfg.ProxyMark.Value != 0x539 {
			t.Errorf("%s parsed as %#x", v, cfg.ProxyMark.Value)
		}
	}
}

func TestBadAnnotations(t *testing.T) {
	for _, key := range []string{AnnotationBypassInboundCapture, AnnotationDNSCapture} {
		_, err := ApplyAnnotations(PodOverrides{}, map[string]string{key: "yes"})
		if err == nil || !strings.Contains(err.Error(), key) || !strings.Contains(err.Error(), `"yes"`) {
			t.Errorf("%s=yes: error %v does not name the annotation and value", key, err)
		}
	}
	// A bad interface from an annotation is caught by Resolve with the field path.
	p, err := ApplyAnnotations(PodOverrides{}, map[string]string{AnnotationRerouteVirtualInterfaces: "eth1,bad name"})
	if err != nil {
		t.Fatal(err)
	}
	in := DefaultIntent()
	in.Spec.Pod = p
	if _, err := Resolve(in); err == nil || !strings.Contains(err.Error(), `"bad name"`) {
		t.Errorf("bad interface from annotation: %v", err)
	}
}

func TestDNSOverride(t *testing.T) {
	on, off := true, false
	cases := []struct {
		node, pod *bool
		want      bool
	}{
		{nil, nil, DefaultDNSCapture}, {&on, nil, true}, {&off, nil, false},
		{&off, &on, true}, {&on, &off, false},
	}
	for _, c := range cases {
		in := DefaultIntent()
		in.Spec.DNSCapture, in.Spec.Pod.DNSCapture = c.node, c.pod
		cfg, err := Resolve(in)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Pod.DNSCapture != c.want {
			t.Errorf("node %v pod %v: DNS capture %v, want %v", c.node, c.pod, cfg.Pod.DNSCapture, c.want)
		}
		text := PodRuleset(cfg).Render()
		if strings.Contains(text, "redirect to :15053") != c.want {
			t.Errorf("node %v pod %v: DNS redirect present = %v", c.node, c.pod, !c.want)
		}
	}
}

// Same input, same bytes; and a parsed file equals the same intent built in Go.
func TestDeterministic(t *testing.T) {
	first, err := Compile(DefaultIntent(), TargetPod)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		again, _ := Compile(DefaultIntent(), TargetPod)
		if again.Render() != first.Render() {
			t.Fatal("compiling twice gave different bytes")
		}
	}
	data, err := DefaultIntent().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := Parse(data)
	if err != nil {
		t.Fatalf("the default intent does not parse back: %v\n%s", err, data)
	}
	fromYAML, _ := Compile(parsed, TargetPod)
	if fromYAML.Render() != first.Render() {
		t.Error("marshalled default intent compiles differently")
	}
}

func TestUnknownTarget(t *testing.T) {
	if _, err := Compile(DefaultIntent(), "router"); err == nil || !strings.Contains(err.Error(), `"router"`) {
		t.Errorf("unknown target: %v", err)
	}
}

// The compiler must never panic on bad input, whatever the YAML.
func FuzzParseCompile(f *testing.F) {
	f.Add([]byte(header + "spec:\n  ports:\n    outbound: 1\n"))
	f.Add([]byte(header + "spec:\n  marks:\n    proxy: {value: 0x539, mask: 0xfff}\n  pod: {rerouteVirtualInterfaces: [a]}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		in, err := Parse(data)
		if err != nil {
			return
		}
		for _, target := range []Target{TargetPod, TargetHost} {
			if tbl, err := Compile(in, target); err == nil {
				_ = tbl.Render()
			}
		}
	})
}

// TestOneDocument: an intent file holds one intent. A second document, valid or not, is
// an error naming it (it used to be ignored silently); empty documents around the one
// intent (a leading ---, comments) are fine, and decode errors keep the file's line numbers.
func TestOneDocument(t *testing.T) {
	good := header + "spec:\n  ports: {outbound: 16001}\n"
	for _, c := range []struct {
		name, yaml string
		want       []string // all in the error
	}{
		{"two intents", good + "---\n" + good, []string{"document 2 (line 5)", "document 1 (line 1) is one already"}},
		{"an invalid second document", good + "---\nspec: {ports: {outbound: banana}}\n", []string{"document 2 (line 5)"}},
		{"yaml garbage second", good + "--- # next\n: : :\n", []string{"document 2 (line 5)"}},
		{"content on the separator line", good + "--- {kind: Intent}\n", []string{"document 2 (line 5)"}},
		{"third after an empty second", good + "---\n# nothing\n---\n" + good, []string{"document 3 (line 7)"}},
		{"only empty documents", "---\n# c\n---\n", []string{"intent: empty document"}},
		{"error line kept", "# intent\n---\n" + header + "spec:\n  ports: [1\n", []string{"line 6"}},
		// A leading --- starts document 1: nothing before it is a document (the second
		// intent used to be called document 3, and the first document 2).
		{"two intents after a leading ---", "---\n" + good + "---\n" + good, []string{"document 2 (line 6)", "document 1 (line 1) is one already"}},
		{"two intents after comments and ---", "# intent\n\n---\n" + good + "---\n" + good, []string{"document 2 (line 8)", "document 1 (line 3) is one already"}},
		{"empty first after a leading ---", "---\n---\n" + good + "---\n" + good, []string{"document 3 (line 7)", "document 2 (line 2) is one already"}},
	} {
		_, err := Parse([]byte(c.yaml))
		if err == nil {
			t.Errorf("%s: parsed, want an error", c.name)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %v, want %q in the error", c.name, err, w)
			}
		}
	}
	for _, ok := range []string{
		good,
		"---\n" + good,
		"# a comment\n---\n" + good + "---\n",
		good + "--- # trailing comment only\n# more\n",
		"--- " + "{apiVersion: nftmesh.dev/v1alpha1, kind: Intent, spec: {ports: {outbound: 16001}}}\n",
		"spec:\n  ports: {outbound: 16001}\n" + "apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\nmetadata: {name: '---'}\n",
	} {
		in, err := Parse([]byte(ok))
		if err != nil {
			t.Errorf("%q: %v", ok, err)
			continue
		}
		if in.Spec.Ports.Outbound == nil || *in.Spec.Ports.Outbound != 16001 {
			t.Errorf("%q: outbound port %v, want 16001", ok, in.Spec.Ports.Outbound)
		}
	}
}
