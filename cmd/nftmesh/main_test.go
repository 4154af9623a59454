package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(args ...string) (stdout, stderr string, code int) {
	var o, e bytes.Buffer
	code = run(args, &o, &e)
	return o.String(), e.String(), code
}

func TestCompileDefaultIsDualStackDefault(t *testing.T) {
	out, errOut, code := runCLI("compile")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	want, err := os.ReadFile("../../fixtures/golden/default-dualstack.pod.nft")
	if err != nil {
		t.Fatal(err)
	}
	if out != string(want) {
		t.Errorf("compile without -f differs from the default golden file:\n%s", out)
	}
}

// Every golden file must be reproduced by `nftmesh diff` with exit 0.
func TestDiffEveryGolden(t *testing.T) {
	goldens, _ := filepath.Glob("../../fixtures/golden/*.nft")
	if len(goldens) == 0 {
		t.Fatal("no golden files")
	}
	for _, g := range goldens {
		base := strings.TrimSuffix(filepath.Base(g), ".nft")
		intent, target, _ := strings.Cut(base, ".")
		out, errOut, code := runCLI("diff", "-f", "../../fixtures/intents/"+intent+".yaml", "--golden", g, "--target", target)
		if code != exitOK {
			t.Errorf("%s: exit %d\n%s%s", base, code, out, errOut)
		}
	}
}

func TestDiffReportsDifference(t *testing.T) {
	out, _, code := runCLI("diff", "-f", "../../fixtures/intents/redirect-ipv4.yaml", "--golden", "../../fixtures/golden/default-ipv4.pod.nft")
	if code != exitDiff {
		t.Fatalf("exit %d, want %d", code, exitDiff)
	}
	for _, want := range []string{"--- ../../fixtures/golden/default-ipv4.pod.nft", "+++ ../../fixtures/intents/redirect-ipv4.yaml (pod)",
		"\n+\t\tip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0x00000fff != 0x00000539 redirect to :15006"} {
		if !strings.Contains(out, want) {
			t.Errorf("diff output lacks %q:\n%s", want, out)
		}
	}
}

func TestErrorsExitTwo(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\nspec:\n  ports:\n    outbound: 70000\n"), 0o644)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"compile", "-f", bad}, "spec.ports.outbound: 70000"},
		{[]string{"compile", "-f", filepath.Join(dir, "missing.yaml")}, "no such file"},
		{[]string{"compile", "--target", "router"}, `"router"`},
		{[]string{"compile", "--pod-annotation", "ambient.istio.io/bypass-inbound-capture=yes"}, "bypass-inbound-capture"},
		{[]string{"compile", "--pod-annotation", "novalue"}, "not key=value"},
		{[]string{"compile", "--nope"}, "-nope"},
		{[]string{"compile", "stray"}, `"stray"`},
		{[]string{"diff"}, "--golden or --netns is required"},
		{[]string{"apply"}, "--netns is required"},
		{[]string{"show"}, "--netns is required"},
		{[]string{"delete"}, "--netns is required"},
		{[]string{"diff", "--netns", "x", "--golden", "y"}, "exclude each other"},
		{[]string{"apply", "--netns", "nftmesh-no-such-netns"}, "/run/netns/nftmesh-no-such-netns"},
		{[]string{"diff", "--golden", filepath.Join(dir, "missing.nft")}, "no such file"},
		{[]string{"diff", "-f", bad, "--golden", "../../fixtures/golden/default-ipv4.pod.nft"}, "spec.ports.outbound"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{nil, "Usage"},
	}
	for _, tc := range cases {
		_, errOut, code := runCLI(tc.args...)
		if code != exitError || !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", tc.args, code, errOut, tc.want)
		}
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"help"}, {"compile", "--help"}, {"diff", "-h"}, {"version", "--help"}} {
		out, _, code := runCLI(args...)
		if code != exitOK || !strings.Contains(out, "Exit codes") || !strings.Contains(out, "Usage") {
			t.Errorf("%v: exit %d, output %q", args, code, out)
		}
	}
	out, _, _ := runCLI("diff", "--help")
	for _, flag := range []string{"-f FILE", "--golden FILE", "--target TARGET", "--pod-annotation KEY=VALUE", "1 different"} {
		if !strings.Contains(out, flag) {
			t.Errorf("diff --help lacks %q:\n%s", flag, out)
		}
	}
}

func TestUnknownAnnotationWarns(t *testing.T) {
	_, errOut, code := runCLI("compile", "--pod-annotation", "example.com/x=1")
	if code != exitOK || !strings.Contains(errOut, "example.com/x is not an annotation nftmesh reads") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
}

func TestVersion(t *testing.T) {
	out, _, code := runCLI("version")
	if code != exitOK || !strings.HasPrefix(out, "nftmesh ") {
		t.Errorf("exit %d, output %q", code, out)
	}
}
