package compiler

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
)

var update = flag.Bool("update", false, "rewrite the golden files in fixtures/golden")

const (
	intentDir = "../fixtures/intents"
	goldenDir = "../fixtures/golden"
)

// hostCases are the intents whose host ruleset is also kept as a golden file: the host
// ruleset depends only on the probe sources and IPv6, which these vary.
var hostCases = []string{"default-ipv4", "default-dualstack", "custom-ipv4", "custom-dualstack"}

// requiredCases are the cases issue #2 names; each must exist with IPv6 off and on.
var requiredCases = []string{
	"default", "redirect", "ingress-bypass", "virtual-interfaces", "ingress-bypass-virtual-interfaces",
	"dns-pod-enabled", "dns-pod-disabled", "custom",
}

type goldenCase struct {
	intent string
	target Target
}

func (c goldenCase) goldenPath() string {
	return filepath.Join(goldenDir, c.intent+"."+string(c.target)+".nft")
}

func goldenCases(t *testing.T) []goldenCase {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(intentDir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no intents in %s: %v", intentDir, err)
	}
	var cases []goldenCase
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		cases = append(cases, goldenCase{name, TargetPod})
		if slices.Contains(hostCases, name) {
			cases = append(cases, goldenCase{name, TargetHost})
		}
	}
	return cases
}

func compileFile(t *testing.T, name string, target Target) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(intentDir, name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	in, err := Parse(data)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	tbl, err := Compile(in, target)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return tbl.Render()
}

func TestGolden(t *testing.T) {
	cases := goldenCases(t)
	want := map[string]bool{}
	for _, c := range cases {
		want[filepath.Base(c.goldenPath())] = true
		t.Run(c.intent+"/"+string(c.target), func(t *testing.T) {
			got := compileFile(t, c.intent, c.target)
			if *update {
				if err := os.WriteFile(c.goldenPath(), []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			golden, err := os.ReadFile(c.goldenPath())
			if err != nil {
				t.Fatalf("%v (run `go test ./compiler -update` to create it)", err)
			}
			if d := textdiff.Unified(c.goldenPath(), "compiled", string(golden), got); d != "" {
				t.Errorf("compiled ruleset differs from the golden file (run `go test ./compiler -update` if intended):\n%s", d)
			}
		})
	}
	// A golden file nobody compiles any more is stale.
	existing, _ := filepath.Glob(filepath.Join(goldenDir, "*.nft"))
	for _, f := range existing {
		if !want[filepath.Base(f)] {
			if *update {
				os.Remove(f)
				continue
			}
			t.Errorf("stale golden file %s: no intent compiles to it", f)
		}
	}
}

func TestGoldenCoversRequiredCases(t *testing.T) {
	for _, c := range requiredCases {
		for _, v := range []string{"ipv4", "dualstack"} {
			path := filepath.Join(goldenDir, c+"-"+v+".pod.nft")
			if _, err := os.Stat(path); err != nil {
				t.Errorf("required case %s-%s: %v", c, v, err)
			}
		}
	}
	for _, c := range hostCases {
		if _, err := os.Stat(filepath.Join(goldenDir, c+".host.nft")); err != nil {
			t.Errorf("host case %s: %v", c, err)
		}
	}
}

// Every golden file must be accepted by the real nft (`nft -c -f`, then loaded) in a
// namespace of its own, and nft must print it back byte for byte.
func TestGoldenAcceptedByNFT(t *testing.T) {
	nettest.Require(t, "nft")
	files, _ := filepath.Glob(filepath.Join(goldenDir, "*.nft"))
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			text, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			ns := nettest.New(t)
			back := ns.NFTPrintBack(t, string(text), TableName)
			if d := textdiff.Unified(f, "nft list table", string(text), back); d != "" {
				t.Errorf("nft prints the ruleset back differently:\n%s", d)
			}
		})
	}
}

// Pod annotations must give exactly what the intent's pod section gives.
func TestAnnotationsMatchPodSection(t *testing.T) {
	cases := []struct {
		golden      string
		base        string
		annotations map[string]string
	}{
		{"ingress-bypass-dualstack", "default-dualstack", map[string]string{AnnotationBypassInboundCapture: "true"}},
		{"virtual-interfaces-ipv4", "default-ipv4", map[string]string{AnnotationRerouteVirtualInterfaces: " eth1, eth2,"}},
		{"dns-pod-enabled-ipv4", "default-ipv4", map[string]string{AnnotationDNSCapture: "true"}},
		{"ingress-bypass-virtual-interfaces-ipv4", "default-ipv4", map[string]string{
			AnnotationBypassInboundCapture: "true", AnnotationRerouteVirtualInterfaces: "eth1", "unrelated.example/x": "y"}},
	}
	for _, tc := range cases {
		t.Run(tc.golden, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(intentDir, tc.base+".yaml"))
			if err != nil {
				t.Fatal(err)
			}
			in, err := Parse(data)
			if err != nil {
				t.Fatal(err)
			}
			if in.Spec.Pod, err = ApplyAnnotations(in.Spec.Pod, tc.annotations); err != nil {
				t.Fatal(err)
			}
			tbl, err := Compile(in, TargetPod)
			if err != nil {
				t.Fatal(err)
			}
			want := compileFile(t, tc.golden, TargetPod)
			if d := textdiff.Unified(tc.golden, "with annotations", want, tbl.Render()); d != "" {
				t.Error(d)
			}
		})
	}
}
