package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
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
		// The annotation is named, not the intent file, and checked for the node ruleset too.
		{[]string{"compile", "-f", "../../fixtures/intents/default-ipv4.yaml", "--pod-annotation", "ambient.istio.io/dns-capture=maybe"}, "--pod-annotation: annotation ambient.istio.io/dns-capture"},
		{[]string{"compile", "--target", "host", "--pod-annotation", "ambient.istio.io/dns-capture=maybe"}, "--pod-annotation: annotation"},
		{[]string{"compile", "-f", bad, "--target", "router"}, `--target: "router"`},
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
		{[]string{"diff", "--golden", "/dev/zero"}, "larger than 16 MiB"},
		{[]string{"policy", "lint", "-f", "/dev/zero"}, "larger than 16 MiB"},
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

// withStdin runs f with the CLI's stdin reading data.
func withStdin(t *testing.T, data string, f func()) {
	t.Helper()
	saved := stdin
	defer func() { stdin = saved }()
	stdin = strings.NewReader(data)
	f()
}

// TestIntentFromStdin: `-f -` reads the intent from stdin wherever an intent file is taken
// (compile, diff, apply, proxy --intent), as `nftmesh policy -f -` does; errors name stdin.
func TestIntentFromStdin(t *testing.T) {
	intent := "../../fixtures/intents/redirect-ipv4.yaml"
	data, err := os.ReadFile(intent)
	if err != nil {
		t.Fatal(err)
	}
	want, _, _ := runCLI("compile", "-f", intent)
	withStdin(t, string(data), func() {
		out, errOut, code := runCLI("compile", "-f", "-")
		if code != exitOK || out != want {
			t.Errorf("compile -f -: exit %d, stderr %q; output differs from -f %s:\n%s", code, errOut, intent, out)
		}
	})
	withStdin(t, string(data), func() {
		out, errOut, code := runCLI("diff", "-f", "-", "--golden", "../../fixtures/golden/redirect-ipv4.pod.nft")
		if code != exitOK {
			t.Errorf("diff -f -: exit %d\n%s%s", code, out, errOut)
		}
	})
	withStdin(t, "apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\nspec: {ports: {outbound: 0}}\n", func() {
		_, errOut, code := runCLI("compile", "-f", "-")
		if code != exitError || !strings.Contains(errOut, "stdin: spec.ports.outbound") {
			t.Errorf("compile -f - with a bad intent: exit %d, stderr %q; want stdin and the field named", code, errOut)
		}
	})
	t.Run("apply", func(t *testing.T) {
		nettest.Require(t, "nft")
		ns := nettest.New(t)
		withStdin(t, string(data), func() {
			out, errOut, code := runCLI("apply", "--netns", ns.Path, "-f", "-")
			if code != exitOK || !strings.Contains(out, "table inet nftmesh created") {
				t.Fatalf("apply -f -: exit %d\n%s%s", code, out, errOut)
			}
		})
		if _, _, code := runCLI("diff", "--netns", ns.Path, "-f", intent); code != exitOK {
			t.Errorf("the table applied from stdin differs from %s: exit %d", intent, code)
		}
	})
}

// TestIntentInputCaps: an intent input larger than 16 MiB (a wrong path such as /dev/zero,
// or an endless stdin) is an error naming it, read through a limit: the process does not
// grow with it. A multi-document intent names the extra document.
func TestIntentInputCaps(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, append([]byte("# padding\n"), bytes.Repeat([]byte("#\n"), 9<<20)...), 0o644); err != nil {
		t.Fatal(err)
	}
	two := filepath.Join(dir, "two.yaml")
	os.WriteFile(two, []byte("apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\n---\nkind: Nonsense\n"), 0o644)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"compile", "-f", "/dev/zero"}, "/dev/zero: larger than 16 MiB"},
		{[]string{"compile", "-f", big}, "big.yaml: larger than 16 MiB"},
		{[]string{"diff", "-f", "/dev/zero", "--golden", "../../fixtures/golden/default-ipv4.pod.nft"}, "/dev/zero: larger than 16 MiB"},
		{[]string{"compile", "-f", two}, "two.yaml: intent: document 2 (line 3)"},
	} {
		_, errOut, code := runCLI(c.args...)
		if code != exitError || !strings.Contains(errOut, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", c.args, code, errOut, c.want)
		}
	}
	withStdin(t, "", func() {
		stdin = io.MultiReader(strings.NewReader("apiVersion: nftmesh.dev/v1alpha1\n"), zeros{})
		_, errOut, code := runCLI("compile", "-f", "-")
		if code != exitError || !strings.Contains(errOut, "stdin: larger than 16 MiB") {
			t.Errorf("compile -f - with an endless stdin: exit %d, stderr %q", code, errOut)
		}
	})
}

// zeros is an endless reader.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }
