package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAgentHelp(t *testing.T) {
	out, _, code := runCLI("agent", "--help")
	if code != exitOK {
		t.Fatalf("agent --help: exit %d", code)
	}
	for _, want := range []string{"--node NAME", "--kubeconfig FILE", "--intent FILE", "--exclude-namespaces NAMESPACES",
		"--cni-conf-dir DIR", "--cni-bin-dir DIR", "--cni-plugin FILE", "--zds-socket PATH", "--metrics-addr ADDR",
		"istio.io/dataplane-mode=ambient", "Exit codes", "uninstall"} {
		if !strings.Contains(out, want) {
			t.Errorf("agent --help lacks %q:\n%s", want, out)
		}
	}
	if out, _, code := runCLI("agent", "uninstall", "--help"); code != exitOK || !strings.Contains(out, "--cni-conf-dir DIR") {
		t.Errorf("agent uninstall --help: exit %d\n%s", code, out)
	}
}

// Bad input exits 2 before anything starts, naming the flag and the value.
func TestAgentStartErrors(t *testing.T) {
	dir := t.TempDir()
	plugin := filepath.Join(dir, "nftmesh-cni")
	os.WriteFile(plugin, []byte("#!/bin/sh\n"), 0o755)
	t.Setenv("NODE_NAME", "")
	base := []string{"agent", "--node", "n1", "--cni-plugin", plugin, "--metrics-addr", ""}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"agent"}, "--node: empty"},
		{[]string{"agent", "--node", "Node_1"}, `--node: "Node_1" is not a node name`},
		{append(base, "--exclude-namespaces", "kube-system,Bad"), `--exclude-namespaces: "Bad"`},
		{append(base, "--workers", "0"), "--workers: 0 is not positive"},
		{append(base, "--resync", "-1s"), "--resync: -1s is not positive"},
		{append(base, "--zds-socket", ""), "--zds-socket: empty"},
		{append(base, "--log-format", "xml"), `--log-format: "xml"`},
		{append(base, "--intent", filepath.Join(dir, "absent.yaml")), "--intent: open"},
		{[]string{"agent", "--node", "n1", "--cni-plugin", filepath.Join(dir, "nope")}, "--cni-plugin: " + filepath.Join(dir, "nope") + ": not a file"},
		{append(base, "--kubeconfig", filepath.Join(dir, "absent-kubeconfig")), "kubeconfig " + filepath.Join(dir, "absent-kubeconfig")},
		{[]string{"agent", "uninstall", "extra"}, `unexpected argument "extra"`},
	}
	for _, c := range cases {
		_, errOut, code := runCLI(c.args...)
		if code != exitError || !strings.Contains(errOut, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", c.args, code, errOut, c.want)
		}
	}
}

// uninstall takes our entry out of the primary conflist and removes the binary, leaving
// the primary's plugins as they were.
func TestAgentUninstall(t *testing.T) {
	dir := t.TempDir()
	conf, bin := filepath.Join(dir, "net.d"), filepath.Join(dir, "bin")
	os.MkdirAll(conf, 0o755)
	os.MkdirAll(bin, 0o755)
	os.WriteFile(filepath.Join(conf, "10-primary.conflist"), []byte(`{"cniVersion":"1.1.0","name":"p","plugins":[{"type":"bridge"},{"type":"nftmesh-cni","agentSocket":"/x"}]}`), 0o644)
	os.WriteFile(filepath.Join(bin, "nftmesh-cni"), []byte("x"), 0o755)
	out, errOut, code := runCLI("agent", "uninstall", "--cni-conf-dir", conf, "--cni-bin-dir", bin)
	if code != exitOK {
		t.Fatalf("uninstall: exit %d: %s", code, errOut)
	}
	if !strings.Contains(out, "removed") {
		t.Errorf("uninstall printed %q", out)
	}
	data, _ := os.ReadFile(filepath.Join(conf, "10-primary.conflist"))
	if strings.Contains(string(data), "nftmesh-cni") || !strings.Contains(string(data), "bridge") {
		t.Errorf("conflist after uninstall:\n%s", data)
	}
	if _, err := os.Stat(filepath.Join(bin, "nftmesh-cni")); !os.IsNotExist(err) {
		t.Errorf("plugin binary still there: %v", err)
	}
}
