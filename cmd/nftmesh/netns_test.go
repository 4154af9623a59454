package main

import (
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

// The namespace commands, end to end against a real namespace.
func TestNetnsCommands(t *testing.T) {
	nettest.Require(t, "nft")
	t.Setenv(dataplane.LockDirEnv, t.TempDir())
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
	t.Setenv(dataplane.LockDirEnv, t.TempDir())
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

// ownedRouting is what `ip` shows at nftmesh's pref (32764) and in its table (100).
func ownedRouting(t *testing.T, ns *nettest.Netns) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []string{"-4", "-6"} {
		for _, l := range strings.Split(ns.MustRun(t, "ip", fam, "rule", "show"), "\n") {
			if strings.HasPrefix(l, "32764:") {
				b.WriteString(fam + " rule " + l + "\n")
			}
		}
		out, _ := ns.Run("", "ip", fam, "route", "show", "table", "100")
		if out = strings.TrimSpace(out); out != "" {
			b.WriteString(fam + " route " + out + "\n")
		}
	}
	return b.String()
}

// Routing is part of the desired state: diff shows its drift (exit 1 when only routing
// differs), apply repairs it, a mark change replaces the old rule, and delete removes
// everything at nftmesh's pref and in its table.
func TestNetnsRoutingDrift(t *testing.T) {
	nettest.Require(t, "nft")
	t.Setenv(dataplane.LockDirEnv, t.TempDir())
	ns := nettest.New(t)
	intent := "../../fixtures/intents/default-dualstack.yaml"
	custom := "../../fixtures/intents/custom-dualstack.yaml"
	if out, errOut, code := runCLI("apply", "--netns", ns.Name, "-f", intent); code != exitOK {
		t.Fatalf("apply: exit %d\n%s%s", code, out, errOut)
	}
	clean := ownedRouting(t, ns)

	for _, drift := range [][]string{
		{"route", "replace", "default", "dev", "lo", "table", "100"},
		{"route", "replace", "unreachable", "default", "table", "100"},
	} {
		ns.MustRun(t, "ip", drift...)
		out, errOut, code := runCLI("diff", "--netns", ns.Name, "-f", intent)
		if code != exitDiff || !strings.Contains(out, "+ip -4 route table 100: local default dev lo\n") || strings.Contains(out, "table inet") {
			t.Errorf("diff after %q: exit %d, want 1 and the routing alone:\n%s%s", drift, code, out, errOut)
		}
		out, errOut, code = runCLI("apply", "--netns", ns.Name, "-f", intent)
		if code != exitOK || !strings.Contains(out, "unchanged (0 netlink writes), routing updated") {
			t.Errorf("apply after %q: exit %d\n%s%s", drift, code, out, errOut)
		}
		if got := ownedRouting(t, ns); got != clean {
			t.Errorf("apply did not repair %q:\n%s", drift, got)
		}
		if out, _, code := runCLI("diff", "--netns", ns.Name, "-f", intent); code != exitOK {
			t.Errorf("diff after the repair of %q: exit %d\n%s", drift, code, out)
		}
	}

	// Another connection mark: the old rule is replaced, not kept beside the new one.
	if out, errOut, code := runCLI("apply", "--netns", ns.Name, "-f", custom); code != exitOK || !strings.Contains(out, "routing updated") {
		t.Fatalf("apply another intent: exit %d\n%s%s", code, out, errOut)
	}
	if r := ownedRouting(t, ns); strings.Count(r, " rule ") != 2 || strings.Contains(r, "0x111/0xfff") {
		t.Errorf("after a mark change, want the new rule alone in each family:\n%s", r)
	}
	// delete with the first intent (other marks) still removes all of it.
	if out, errOut, code := runCLI("delete", "--netns", ns.Name, "-f", intent); code != exitOK || !strings.Contains(out, "removed") {
		t.Fatalf("delete: exit %d\n%s%s", code, out, errOut)
	}
	if r := ownedRouting(t, ns); r != "" {
		t.Errorf("routing left after delete:\n%s", r)
	}
}

// A namespace whose lo is down: apply says so, naming the namespace, and applies nothing.
func TestNetnsApplyLoopbackDown(t *testing.T) {
	nettest.Require(t, "nft")
	t.Setenv(dataplane.LockDirEnv, t.TempDir())
	ns := nettest.New(t)
	ns.MustRun(t, "ip", "link", "set", "lo", "down")
	for _, intent := range []string{"default-dualstack", "default-ipv4"} {
		out, errOut, code := runCLI("apply", "--netns", ns.Name, "-f", "../../fixtures/intents/"+intent+".yaml")
		if code != exitError || !strings.Contains(errOut, "loopback is down in "+ns.Path) || strings.Contains(errOut, "network is down") {
			t.Errorf("%s: apply with lo down: exit %d, want 2 and \"loopback is down in %s\"\n%s%s", intent, code, ns.Path, out, errOut)
		}
	}
	if r := ownedRouting(t, ns); r != "" {
		t.Errorf("routing left:\n%s", r)
	}
	if tables := ns.MustRun(t, "nft", "list", "tables"); tables != "" {
		t.Errorf("tables left:\n%s", tables)
	}
}
