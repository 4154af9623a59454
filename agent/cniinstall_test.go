package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// cniLogRecorder keeps the messages logged, to count what the installer says it wrote.
type cniLogRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *cniLogRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *cniLogRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *cniLogRecorder) WithGroup(string) slog.Handler            { return r }
func (r *cniLogRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, rec.Message)
	return nil
}

func (r *cniLogRecorder) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.msgs...)
}

// count is how many messages were exactly msg.
func (r *cniLogRecorder) count(msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

const (
	cniLogChained   = "CNI plugin chained"
	cniLogBinary    = "CNI plugin binary installed"
	cniPluginBinary = "#!/bin/sh\necho nftmesh-cni\n"
)

// newCNIInstaller is an installer on fresh temporary dirs (ConfDir not created), its plugin
// source written; Resync is long, so that only events make Watch act unless a test says
// otherwise.
func newCNIInstaller(t *testing.T) (*CNIInstaller, *cniLogRecorder) {
	t.Helper()
	root := t.TempDir()
	src := filepath.Join(root, "src", PluginType)
	if err := os.MkdirAll(filepath.Dir(src), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src, []byte(cniPluginBinary), 0o755); err != nil {
		t.Fatal(err)
	}
	rec := &cniLogRecorder{}
	return &CNIInstaller{
		ConfDir:   filepath.Join(root, "etc", "cni", "net.d"),
		BinDir:    filepath.Join(root, "opt", "cni", "bin"),
		PluginSrc: src,
		Entry:     pluginEntry(),
		Resync:    time.Hour,
		Log:       slog.New(rec),
	}, rec
}

func cniWriteFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// cniWriteRename writes data to a temporary file and renames it over path, as CNIs do.
func cniWriteRename(t *testing.T, path, data string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// cniStartWatch runs Watch until the test ends (failing it if Watch does not return then) and
// returns a channel that receives each time Watch has (re)started watching.
func cniStartWatch(t *testing.T, c *CNIInstaller) <-chan struct{} {
	t.Helper()
	watching := make(chan struct{}, 16)
	c.watching = func() { watching <- struct{}{} }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Watch(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Watch: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("Watch did not return after its context ended")
		}
	})
	return watching
}

func cniWaitWatching(t *testing.T, watching <-chan struct{}) {
	t.Helper()
	select {
	case <-watching:
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not start watching")
	}
}

// eventually polls cond until it holds, failing the test after d.
func cniEventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stays checks that cond holds throughout d.
func cniStays(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !cond() {
			t.Fatalf("within %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func cniTypes(t *testing.T, path string) string {
	t.Helper()
	return strings.Join(pluginTypes(t, path), ",")
}

func cniDecode(t *testing.T, data []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	return v
}

func cniReadFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func cniStat(t *testing.T, path string) os.FileInfo {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func cniInstalled(t *testing.T, c *CNIInstaller) bool {
	t.Helper()
	ok, err := c.Installed()
	if err != nil {
		t.Fatalf("Installed: %v", err)
	}
	return ok
}

const cniFlannel = `{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"isDefaultGateway":true}}]}
`

func TestCNIInstallChainsLowestAndCopiesBinary(t *testing.T) {
	c, rec := newCNIInstaller(t)
	primary := filepath.Join(c.ConfDir, "10-calico.conflist")
	other := filepath.Join(c.ConfDir, "20-flannel.conflist")
	cniWriteFile(t, other, cniFlannel)
	cniWriteFile(t, primary, calico)
	if cniInstalled(t, c) {
		t.Errorf("Installed before Install")
	}
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	if got := cniTypes(t, primary); got != "calico,portmap,nftmesh-cni" {
		t.Errorf("primary plugins %s", got)
	}
	if got := string(cniReadFile(t, other)); got != cniFlannel {
		t.Errorf("the shadowed conflist was changed:\n%s", got)
	}
	bin := filepath.Join(c.BinDir, PluginType)
	if got := string(cniReadFile(t, bin)); got != cniPluginBinary {
		t.Errorf("binary %q", got)
	}
	if perm := cniStat(t, bin).Mode().Perm(); perm != 0o755 {
		t.Errorf("binary mode %v", perm)
	}
	if _, ok := c.Entry["type"]; ok {
		t.Errorf("Install changed the caller's Entry: %v", c.Entry)
	}
	if rec.count(cniLogBinary) != 1 || rec.count(cniLogChained) != 1 {
		t.Errorf("logged %q", rec.all())
	}
	if !cniInstalled(t, c) {
		t.Errorf("not Installed after Install")
	}
	// Readiness follows what is on disk.
	cniWriteFile(t, bin, "other")
	if cniInstalled(t, c) {
		t.Errorf("Installed with a different binary")
	}
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	cniWriteFile(t, primary, calico)
	if cniInstalled(t, c) {
		t.Errorf("Installed with our entry gone")
	}
}

func TestCNIInstallTwiceWritesNothing(t *testing.T) {
	c, rec := newCNIInstaller(t)
	primary := filepath.Join(c.ConfDir, "10-calico.conflist")
	bin := filepath.Join(c.BinDir, PluginType)
	cniWriteFile(t, primary, calico)
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	confBefore, binBefore := cniStat(t, primary), cniStat(t, bin)
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	// Writes are renames of a new file: the same inode means nothing was written.
	if !os.SameFile(confBefore, cniStat(t, primary)) {
		t.Errorf("the second Install rewrote %s", primary)
	}
	if !os.SameFile(binBefore, cniStat(t, bin)) {
		t.Errorf("the second Install rewrote %s", bin)
	}
	if rec.count(cniLogBinary) != 1 || rec.count(cniLogChained) != 1 ||
		rec.count("CNI plugin binary unchanged") != 1 || rec.count("CNI plugin already chained") != 1 {
		t.Errorf("logged %q", rec.all())
	}
	if entries, _ := os.ReadDir(c.ConfDir); len(entries) != 1 {
		t.Errorf("conf dir holds %v", entries)
	}
}

func TestCNIInstallConfBecomesConflist(t *testing.T) {
	c, _ := newCNIInstaller(t)
	conf := filepath.Join(c.ConfDir, "10-bridge.conf")
	cniWriteFile(t, conf, `{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0"}`)
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(conf); !os.IsNotExist(err) {
		t.Errorf("the .conf is still there: %v", err)
	}
	if got := cniTypes(t, filepath.Join(c.ConfDir, "10-bridge.conflist")); got != "bridge,nftmesh-cni" {
		t.Errorf("plugins %s", got)
	}
	// Also when a .conf appears while watching: it sorts first, and becomes a conflist.
	watching := cniStartWatch(t, c)
	cniWaitWatching(t, watching)
	cniWriteRename(t, filepath.Join(c.ConfDir, "05-ptp.conf"), `{"cniVersion":"1.0.0","name":"ptp","type":"ptp"}`)
	cniEventually(t, 3*time.Second, "05-ptp.conf not turned into a chained 05-ptp.conflist", func() bool {
		_, err := os.Stat(filepath.Join(c.ConfDir, "05-ptp.conf"))
		return os.IsNotExist(err) && Chained(c.ConfDir) && strings.HasSuffix(cniMust(PrimaryConf(c.ConfDir)), "05-ptp.conflist")
	})
	if got := cniTypes(t, filepath.Join(c.ConfDir, "05-ptp.conflist")); got != "ptp,nftmesh-cni" {
		t.Errorf("plugins %s", got)
	}
}

func cniMust(s string, err error) string {
	if err != nil {
		return ""
	}
	return s
}

func TestCNIInstallEmptyDirThenWatch(t *testing.T) {
	c, rec := newCNIInstaller(t)
	// Not even the directory: the primary CNI has not started yet.
	if err := c.Install(); err != nil {
		t.Fatalf("Install without a configuration: %v", err)
	}
	if got := string(cniReadFile(t, filepath.Join(c.BinDir, PluginType))); got != cniPluginBinary {
		t.Errorf("binary not installed: %q", got)
	}
	if cniInstalled(t, c) {
		t.Errorf("Installed without a configuration")
	}
	watching := cniStartWatch(t, c)
	cniWaitWatching(t, watching)
	if st, err := os.Stat(c.ConfDir); err != nil || !st.IsDir() {
		t.Fatalf("Watch did not create the conf dir: %v", err)
	}
	// Resync is an hour: only the event can chain it.
	primary := filepath.Join(c.ConfDir, "10-calico.conflist")
	cniWriteFile(t, primary, calico)
	cniEventually(t, 3*time.Second, "not chained after the conflist appeared", func() bool { return Chained(c.ConfDir) })
	if got := cniTypes(t, primary); got != "calico,portmap,nftmesh-cni" {
		t.Errorf("plugins %s", got)
	}
	if !cniInstalled(t, c) {
		t.Errorf("not Installed after chaining")
	}
	if n := rec.count(cniLogChained); n != 1 {
		t.Errorf("chained %d times", n)
	}
}

func TestCNIWatchRechainsAfterRewrite(t *testing.T) {
	for name, rewrite := range map[string]func(t *testing.T, path, data string){
		"rename":   cniWriteRename,
		"truncate": cniWriteFile,
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c, rec := newCNIInstaller(t)
			primary := filepath.Join(c.ConfDir, "10-calico.conflist")
			cniWriteFile(t, primary, calico)
			if err := c.Install(); err != nil {
				t.Fatal(err)
			}
			watching := cniStartWatch(t, c)
			cniWaitWatching(t, watching)
			for i := 1; i <= 2; i++ {
				rewrite(t, primary, calico)
				cniEventually(t, 3*time.Second, "not chained again after the primary CNI rewrote its conflist", func() bool {
					return Chained(c.ConfDir) && rec.count(cniLogChained) == 1+i
				})
				if got := cniTypes(t, primary); got != "calico,portmap,nftmesh-cni" {
					t.Errorf("plugins %s", got)
				}
				// Our own write is an event too: it must not make Watch write again.
				after := cniStat(t, primary)
				cniStays(t, 500*time.Millisecond, "Watch wrote again after its re-chain", func() bool {
					st, err := os.Stat(primary)
					return err == nil && os.SameFile(after, st) && st.ModTime().Equal(after.ModTime()) && rec.count(cniLogChained) == 1+i
				})
			}
			if entries, _ := os.ReadDir(c.ConfDir); len(entries) != 1 {
				t.Errorf("conf dir holds %v", entries)
			}
		})
	}
}

func TestCNIWatchNewLowerNamedFile(t *testing.T) {
	c, _ := newCNIInstaller(t)
	calicoPath := filepath.Join(c.ConfDir, "10-calico.conflist")
	cniWriteFile(t, calicoPath, calico)
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	watching := cniStartWatch(t, c)
	cniWaitWatching(t, watching)
	cilium := filepath.Join(c.ConfDir, "05-cilium.conflist")
	cniWriteRename(t, cilium, `{"cniVersion":"0.3.1","name":"cilium","plugins":[{"type":"cilium-cni"}]}`)
	cniEventually(t, 3*time.Second, "the new first conflist was not chained", func() bool {
		return strings.Join(pluginTypes(t, cilium), ",") == "cilium-cni,nftmesh-cni"
	})
	if got := cniTypes(t, calicoPath); got != "calico,portmap,nftmesh-cni" {
		t.Errorf("the old conflist: %s", got)
	}
}

func TestCNIWatchRecreatesConfDir(t *testing.T) {
	c, _ := newCNIInstaller(t)
	watching := cniStartWatch(t, c)
	cniWaitWatching(t, watching)
	if err := os.RemoveAll(c.ConfDir); err != nil {
		t.Fatal(err)
	}
	cniWaitWatching(t, watching) // anew, on a new directory
	if _, err := os.Stat(c.ConfDir); err != nil {
		t.Fatalf("conf dir not recreated: %v", err)
	}
	cniWriteFile(t, filepath.Join(c.ConfDir, "10-calico.conflist"), calico)
	cniEventually(t, 3*time.Second, "not chained in the recreated conf dir", func() bool { return Chained(c.ConfDir) })
}

func TestCNIWatchResyncReinstallsBinary(t *testing.T) {
	c, _ := newCNIInstaller(t)
	cniWriteFile(t, filepath.Join(c.ConfDir, "10-calico.conflist"), calico)
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	c.Resync = 20 * time.Millisecond
	watching := cniStartWatch(t, c)
	cniWaitWatching(t, watching)
	bin := filepath.Join(c.BinDir, PluginType)
	// Nothing watches the bin dir: the periodic re-check puts the binary back.
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	cniEventually(t, 3*time.Second, "binary not reinstalled", func() bool {
		data, err := os.ReadFile(bin)
		return err == nil && string(data) == cniPluginBinary
	})
	cniWriteFile(t, bin, "stale")
	cniEventually(t, 3*time.Second, "a changed binary not replaced", func() bool {
		data, err := os.ReadFile(bin)
		return err == nil && string(data) == cniPluginBinary
	})
}

func TestCNIUninstall(t *testing.T) {
	c, rec := newCNIInstaller(t)
	primary := filepath.Join(c.ConfDir, "10-calico.conflist")
	cniWriteFile(t, primary, calico)
	// A conflist we chained into before a lower-named file appeared: shadowed now, but it
	// would be used, with a missing binary, once 10-calico went.
	shadowed := filepath.Join(c.ConfDir, "20-flannel.conflist")
	cniWriteFile(t, shadowed, strings.Replace(cniFlannel, `}}]}`, `}},{"type":"nftmesh-cni","agentSocket":"/old.sock"}]}`, 1))
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	if cniTypes(t, shadowed) != "flannel,nftmesh-cni" || cniTypes(t, primary) != "calico,portmap,nftmesh-cni" {
		t.Fatalf("setup: %s / %s", cniTypes(t, primary), cniTypes(t, shadowed))
	}
	if err := c.Uninstall(); err != nil {
		t.Fatal(err)
	}
	// The primary's plugins, exactly as the primary CNI wrote them (our writes reformat).
	if got, want := cniDecode(t, cniReadFile(t, primary)), cniDecode(t, []byte(calico)); !reflect.DeepEqual(got, want) {
		t.Errorf("primary after Uninstall:\n%s", cniReadFile(t, primary))
	}
	if got, want := cniDecode(t, cniReadFile(t, shadowed)), cniDecode(t, []byte(cniFlannel)); !reflect.DeepEqual(got, want) {
		t.Errorf("shadowed conflist after Uninstall:\n%s", cniReadFile(t, shadowed))
	}
	if _, err := os.Stat(filepath.Join(c.BinDir, PluginType)); !os.IsNotExist(err) {
		t.Errorf("binary still there: %v", err)
	}
	if string(cniReadFile(t, c.PluginSrc)) != cniPluginBinary {
		t.Errorf("Uninstall touched the plugin source")
	}
	if cniInstalled(t, c) {
		t.Errorf("Installed after Uninstall")
	}
	if rec.count("CNI plugin binary removed") != 1 || rec.count("CNI plugin unchained") != 1 {
		t.Errorf("logged %q", rec.all())
	}
	if entries, _ := os.ReadDir(c.ConfDir); len(entries) != 2 {
		t.Errorf("conf dir holds %v", entries)
	}
	// Again, and with nothing there at all: nothing to do.
	if err := c.Uninstall(); err != nil {
		t.Errorf("second Uninstall: %v", err)
	}
	empty, _ := newCNIInstaller(t)
	if err := empty.Uninstall(); err != nil {
		t.Errorf("Uninstall of nothing: %v", err)
	}
}

func TestCNIUninstallKeepsBinaryIfUnchainFails(t *testing.T) {
	c, _ := newCNIInstaller(t)
	cniWriteFile(t, filepath.Join(c.ConfDir, "10-calico.conflist"), calico)
	if err := c.Install(); err != nil {
		t.Fatal(err)
	}
	// The primary is now unreadable: our entry may still be in the chain, so the binary it
	// names must stay.
	cniWriteFile(t, filepath.Join(c.ConfDir, "05-broken.conflist"), `{"plugins": `)
	if err := c.Uninstall(); err == nil || !strings.Contains(err.Error(), "05-broken.conflist") {
		t.Errorf("Uninstall with a broken primary: %v, want an error naming it", err)
	}
	if data, err := os.ReadFile(filepath.Join(c.BinDir, PluginType)); err != nil || !bytes.Equal(data, []byte(cniPluginBinary)) {
		t.Errorf("binary removed while the chain may still name it: %v", err)
	}
}

func TestCNIWatchBrokenPrimaryIsRetried(t *testing.T) {
	c, rec := newCNIInstaller(t)
	primary := filepath.Join(c.ConfDir, "10-calico.conflist")
	cniWriteFile(t, primary, `{"name": "k8s-pod-network", `)
	if err := c.Install(); err == nil {
		t.Fatal("Install into a broken conflist succeeded")
	}
	watching := cniStartWatch(t, c)
	cniWaitWatching(t, watching) // its first chain fails, and is logged
	if Chained(c.ConfDir) {
		t.Fatal("chained into a broken conflist")
	}
	cniWriteRename(t, primary, calico)
	cniEventually(t, 3*time.Second, "not chained once the conflist was fixed", func() bool { return Chained(c.ConfDir) })
	if rec.count("CNI plugin not chained: will retry") == 0 {
		t.Errorf("the failure was not logged: %q", rec.all())
	}
}
