package agent

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const calico = `{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "calico", "ipam": {"type": "calico-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

func pluginEntry() map[string]any {
	return map[string]any{"agentSocket": "/var/run/nftmesh/cni.sock", "excludeNamespaces": []string{"kube-system"}}
}

func pluginTypes(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var conf struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(data, &conf); err != nil {
		t.Fatalf("%s: %v\n%s", path, err, data)
	}
	var out []string
	for _, p := range conf.Plugins {
		out = append(out, p.Type)
	}
	return out
}

func TestChain(t *testing.T) {
	dir := t.TempDir()
	if _, err := Chain(dir, pluginEntry()); !errors.Is(err, ErrNoPrimaryConf) {
		t.Errorf("empty dir: %v, want ErrNoPrimaryConf", err)
	}
	// The runtime uses the first file by name: that is the one to chain into.
	os.WriteFile(filepath.Join(dir, "10-calico.conflist"), []byte(calico), 0o600)
	os.WriteFile(filepath.Join(dir, "99-loopback.conf"), []byte(`{"cniVersion":"1.0.0","name":"lo","type":"loopback"}`), 0o644)
	primary := filepath.Join(dir, "10-calico.conflist")
	if wrote, err := Chain(dir, pluginEntry()); err != nil || !wrote {
		t.Fatalf("chain: %v, %v", wrote, err)
	}
	if got := strings.Join(pluginTypes(t, primary), ","); got != "calico,portmap,nftmesh-cni" {
		t.Errorf("plugins %s", got)
	}
	if st, _ := os.Stat(primary); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want the primary's 0600 kept", st.Mode().Perm())
	}
	if wrote, err := Chain(dir, pluginEntry()); err != nil || wrote {
		t.Errorf("chain again: wrote %v, %v; want nothing written", wrote, err)
	}
	if !Chained(dir) {
		t.Errorf("Chained is false after Chain")
	}
	// The primary CNI rewrites its file: chaining again puts us back, once.
	os.WriteFile(primary, []byte(calico), 0o600)
	if Chained(dir) {
		t.Errorf("Chained is true after the rewrite")
	}
	if wrote, err := Chain(dir, pluginEntry()); err != nil || !wrote {
		t.Fatalf("rechain: %v, %v", wrote, err)
	}
	if got := strings.Join(pluginTypes(t, primary), ","); got != "calico,portmap,nftmesh-cni" {
		t.Errorf("plugins after rechain %s", got)
	}
	// A changed entry (a new socket) replaces ours instead of adding a second.
	e := pluginEntry()
	e["agentSocket"] = "/other.sock"
	if wrote, err := Chain(dir, e); err != nil || !wrote {
		t.Fatalf("chain a new entry: %v %v", wrote, err)
	}
	if got := strings.Join(pluginTypes(t, primary), ","); got != "calico,portmap,nftmesh-cni" {
		t.Errorf("plugins after a new entry %s", got)
	}
	if removed, err := Unchain(dir); err != nil || !removed {
		t.Fatalf("unchain: %v %v", removed, err)
	}
	if got := strings.Join(pluginTypes(t, primary), ","); got != "calico,portmap" {
		t.Errorf("plugins after unchain %s", got)
	}
	if removed, err := Unchain(dir); err != nil || removed {
		t.Errorf("unchain again: %v %v", removed, err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Errorf("temporary files left: %v", entries)
	}
}

func TestChainSinglePluginConf(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "10-bridge.conf"), []byte(`{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0"}`), 0o644)
	if _, err := Chain(dir, pluginEntry()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "10-bridge.conf")); !os.IsNotExist(err) {
		t.Errorf("the .conf is still there and would shadow the .conflist")
	}
	if got := strings.Join(pluginTypes(t, filepath.Join(dir, "10-bridge.conflist")), ","); got != "bridge,nftmesh-cni" {
		t.Errorf("plugins %s", got)
	}
	os.WriteFile(filepath.Join(dir, "05-broken.conflist"), []byte(`{"plugins": 3`), 0o644)
	if _, err := Chain(dir, pluginEntry()); err == nil || !strings.Contains(err.Error(), "05-broken.conflist") {
		t.Errorf("a broken primary: %v, want an error naming it", err)
	}
}

func TestInstallBinary(t *testing.T) {
	src := filepath.Join(t.TempDir(), "plugin")
	os.WriteFile(src, []byte("#!/bin/sh\nexit 0\n"), 0o700)
	bin := t.TempDir()
	if wrote, err := InstallBinary(src, bin); err != nil || !wrote {
		t.Fatalf("install: %v %v", wrote, err)
	}
	st, err := os.Stat(filepath.Join(bin, PluginType))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed: %v %v", st, err)
	}
	if wrote, err := InstallBinary(src, bin); err != nil || wrote {
		t.Errorf("install of the same binary wrote: %v %v", wrote, err)
	}
}

// Chaining keeps what it does not own as it was: big integers, and a symlinked file's link.
func TestChainKeepsNumbersAndLinks(t *testing.T) {
	dir, elsewhere := t.TempDir(), t.TempDir()
	real := filepath.Join(elsewhere, "primary.conflist")
	os.WriteFile(real, []byte(`{"cniVersion":"1.0.0","name":"p","plugins":[{"type":"bridge","mtu":12345678901234567890}]}`), 0o644)
	link := filepath.Join(dir, "10-p.conflist")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Chain(dir, map[string]any{"agentSocket": "/x"}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the link was replaced by a file: %v", err)
	}
	data, _ := os.ReadFile(real)
	if !strings.Contains(string(data), "12345678901234567890") || !strings.Contains(string(data), PluginType) {
		t.Errorf("chained file:\n%s", data)
	}
	// A single plugin without cniVersion is not rewritten into a list libcni would refuse.
	os.Remove(link)
	conf := filepath.Join(dir, "10-old.conf")
	os.WriteFile(conf, []byte(`{"name":"p","type":"bridge"}`), 0o644)
	if _, err := Chain(dir, map[string]any{}); err == nil || !strings.Contains(err.Error(), "cniVersion") {
		t.Errorf("chaining a .conf without cniVersion: %v", err)
	}
}
