package main

import (
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
)

// The namespace commands, end to end against a real namespace.
func TestNetnsCommands(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	intent := "../../fixtures/intents/default-dualstack.yaml"

	out, errOut, code := runCLI("apply", "--netns", ns.Name, "-f", intent)
	if code != exitOK || !strings.Contains(out, "table inet nftmesh created") || !strings.Contains(out, "routing updated") {
		t.Fatalf("apply: exit %d\n%s%s", code, out, errOut)
	}
	out, _, code = runCLI("apply", "--netns", ns.Path, "-f", intent)
	if code != exitOK || !strings.Contains(out, "unchanged (0 netlink writes), routing unchanged") {
		t.Errorf("reapply: exit %d: %s", code, out)
	}
	if _, _, code := runCLI("diff", "--netns", ns.Name, "-f", intent); code != exitOK {
		t.Errorf("diff right after apply: exit %d", code)
	}
	shown, _, code := runCLI("show", "--netns", ns.Name)
	want, _, _ := runCLI("compile", "-f", intent)
	if code != exitOK || shown != want {
		t.Errorf("show: exit %d, differs from compile:\n%s", code, shown)
	}

	// Drift: someone adds a rule to our chain.
	ns.MustRun(t, "nft", "add", "rule", "inet", "nftmesh", "nat_output", "tcp", "dport", "9", "accept")
	out, _, code = runCLI("diff", "--netns", ns.Name, "-f", intent)
	if code != exitDiff || !strings.Contains(out, "-\t\t# rule handle") {
		t.Errorf("diff after drift: exit %d\n%s", code, out)
	}
	// A different intent is drift too, shown rule by rule.
	out, _, code = runCLI("diff", "--netns", ns.Name, "-f", "../../fixtures/intents/redirect-dualstack.yaml")
	if code != exitDiff || !strings.Contains(out, "+\t\ttcp dport 15008 meta mark & 0x00000fff != 0x00000539 accept") {
		t.Errorf("diff against another intent: exit %d\n%s", code, out)
	}
	out, _, code = runCLI("apply", "--netns", ns.Name, "-f", intent)
	if code != exitOK || !strings.Contains(out, "replaced") {
		t.Errorf("apply after drift: exit %d %s", code, out)
	}
	if _, _, code := runCLI("diff", "--netns", ns.Name, "-f", intent); code != exitOK {
		t.Errorf("diff after repair: exit %d", code)
	}

	out, _, code = runCLI("delete", "--netns", ns.Name, "-f", intent)
	if code != exitOK || !strings.Contains(out, "removed") {
		t.Errorf("delete: exit %d %s", code, out)
	}
	if r := ns.MustRun(t, "ip", "rule", "show"); strings.Contains(r, "lookup 100") {
		t.Errorf("routing rule left after delete:\n%s", r)
	}
	out, _, code = runCLI("delete", "--netns", ns.Name)
	if code != exitOK || !strings.Contains(out, "nothing to remove") {
		t.Errorf("second delete: exit %d %s", code, out)
	}
	if _, errOut, code := runCLI("show", "--netns", ns.Name); code != exitDiff || !strings.Contains(errOut, "no table") {
		t.Errorf("show after delete: exit %d %s", code, errOut)
	}
	out, _, code = runCLI("diff", "--netns", ns.Name)
	if code != exitDiff || !strings.Contains(out, "-(no table inet nftmesh)") {
		t.Errorf("diff with no table: exit %d\n%s", code, out)
	}
}

func TestNetnsCommandsHost(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	out, errOut, code := runCLI("apply", "--host", "--netns", ns.Name)
	if code != exitOK || !strings.Contains(out, "created") || strings.Contains(out, "routing") {
		t.Fatalf("apply --host: exit %d\n%s%s", code, out, errOut)
	}
	want, _, _ := runCLI("compile", "--target", "host")
	if got := ns.MustRun(t, "nft", "-y", "list", "table", "inet", "nftmesh"); got != want {
		t.Errorf("host table:\n%s", got)
	}
	if _, _, code := runCLI("diff", "--host", "--netns", ns.Name); code != exitOK {
		t.Errorf("diff --host: exit %d", code)
	}
	if r := ns.MustRun(t, "ip", "rule", "show"); strings.Contains(r, "lookup 100") {
		t.Errorf("host apply added pod routing:\n%s", r)
	}
	if out, _, code := runCLI("delete", "--host", "--netns", ns.Name); code != exitOK || !strings.Contains(out, "removed") {
		t.Errorf("delete --host: exit %d %s", code, out)
	}
}
