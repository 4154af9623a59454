package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Timings of CNIInstaller.Watch.
const (
	// cniDebounce coalesces a burst of events in the conf dir (a CNI writing a temporary
	// file and renaming it, or writing in several steps) into one Chain.
	cniDebounce = 100 * time.Millisecond
	// DefaultCNIResync is how often Watch re-checks the chain and the binary without an
	// event, a safety net for missed events.
	DefaultCNIResync = 30 * time.Second
)

// CNIInstaller puts the nftmesh CNI plugin on the node and keeps it there: the binary in the
// CNI bin dir, and its entry at the end of the primary network configuration (the first
// file, by name, of the conf dir: the one the container runtime uses).
//
// The agent runs Install, then Watch until it stops. A restart or an upgrade of the agent
// must leave the plugin in place (pods started meanwhile must still wait for the agent, not
// start outside the mesh), so the agent's Run never calls Uninstall: only `nftmesh agent
// uninstall` does, when nftmesh leaves the node.
type CNIInstaller struct {
	ConfDir   string         // the host's CNI conf dir, e.g. /etc/cni/net.d
	BinDir    string         // the host's CNI bin dir, e.g. /opt/cni/bin
	PluginSrc string         // the nftmesh-cni binary to copy into BinDir ("": do not copy)
	Entry     map[string]any // our plugin's configuration in the chain (type is set by Chain)
	// Resync is how often Watch re-checks without an event (0: DefaultCNIResync).
	Resync time.Duration
	Log    *slog.Logger

	mu sync.Mutex // one reader-modifier-writer of the conf dir and the binary at a time
	// watching, if set, is called by Watch each time it has (re)started watching ConfDir
	// and re-checked the chain: tests wait for it instead of sleeping.
	watching func()
}

func (c *CNIInstaller) log() *slog.Logger {
	if c.Log == nil {
		return slog.Default()
	}
	return c.Log
}

func (c *CNIInstaller) resync() time.Duration {
	if c.Resync <= 0 {
		return DefaultCNIResync
	}
	return c.Resync
}

// binPath is where the plugin binary goes.
func (c *CNIInstaller) binPath() string { return filepath.Join(c.BinDir, PluginType) }

// Install copies the plugin binary into BinDir (when PluginSrc is set), then chains our
// entry into the primary configuration. A conf dir without a configuration yet (the primary
// CNI has not written it, or not even created the directory) is not an error: Watch chains
// when the file appears. The binary goes first, so that the runtime never finds an entry
// whose plugin is missing.
func (c *CNIInstaller) Install() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.installBinary(true); err != nil {
		return err
	}
	_, err := c.chain(true)
	if errors.Is(err, ErrNoPrimaryConf) {
		c.log().Info("no CNI network configuration yet: chaining the nftmesh plugin once the primary CNI writes it", "dir", c.ConfDir)
		return nil
	}
	return err
}

// installBinary copies PluginSrc into BinDir unless an identical binary is there. verbose
// also logs an unchanged binary (Install's report); Watch logs only what it writes.
func (c *CNIInstaller) installBinary(verbose bool) (bool, error) {
	if c.PluginSrc == "" {
		return false, nil
	}
	wrote, err := InstallBinary(c.PluginSrc, c.BinDir)
	if err != nil {
		return false, fmt.Errorf("install the CNI plugin %s into %s: %w", c.PluginSrc, c.BinDir, err)
	}
	switch {
	case wrote:
		c.log().Info("CNI plugin binary installed", "path", c.binPath(), "from", c.PluginSrc)
	case verbose:
		c.log().Info("CNI plugin binary unchanged", "path", c.binPath())
	}
	return wrote, nil
}

// chain runs Chain on ConfDir, a missing ConfDir counting as one without a configuration
// (ErrNoPrimaryConf). verbose also logs an unchanged configuration.
func (c *CNIInstaller) chain(verbose bool) (bool, error) {
	entry := maps.Clone(c.Entry) // Chain sets "type": leave the caller's map alone
	if entry == nil {
		entry = map[string]any{}
	}
	wrote, err := Chain(c.ConfDir, entry)
	if errors.Is(err, fs.ErrNotExist) && !errors.Is(err, ErrNoPrimaryConf) {
		if _, serr := os.Stat(c.ConfDir); errors.Is(serr, fs.ErrNotExist) {
			err = fmt.Errorf("%s: %w", c.ConfDir, ErrNoPrimaryConf)
		}
	}
	if err != nil && !errors.Is(err, ErrNoPrimaryConf) {
		err = fmt.Errorf("chain the CNI plugin into %s: %w", c.ConfDir, err)
	}
	if err != nil {
		return wrote, err
	}
	path, _ := PrimaryConf(c.ConfDir) // the file written: a .conf became a .conflist
	switch {
	case wrote:
		c.log().Info("CNI plugin chained", "conf", path)
	case verbose:
		c.log().Info("CNI plugin already chained", "conf", path)
	}
	return wrote, nil
}

// Installed reports whether the plugin is in place: the primary configuration holds our
// entry, and the binary is in BinDir (identical to PluginSrc when that is set). For the
// agent's readiness. An error is a configuration or binary it cannot read.
func (c *CNIInstaller) Installed() (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st, err := os.Stat(c.binPath())
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return false, nil
	}
	if c.PluginSrc != "" {
		want, err := os.ReadFile(c.PluginSrc)
		if err != nil {
			return false, err
		}
		have, err := os.ReadFile(c.binPath())
		if err != nil {
			return false, err
		}
		if !bytes.Equal(want, have) {
			return false, nil
		}
	}
	_, _, conf, err := readPrimary(c.ConfDir)
	if errors.Is(err, ErrNoPrimaryConf) || errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	plugins, _ := conf["plugins"].([]any)
	return slices.ContainsFunc(plugins, isOurs), nil
}

func isOurs(p any) bool {
	m, ok := p.(map[string]any)
	return ok && m["type"] == PluginType
}

// Uninstall removes our entry from the configurations in ConfDir, then the binary from
// BinDir: for `nftmesh agent uninstall`, when nftmesh leaves the node. The agent's Run never
// calls it (see CNIInstaller). If an entry cannot be removed, the binary stays: an entry
// without its binary fails every pod's sandbox creation.
//
// Besides the primary configuration (Unchain), it also cleans the files that the primary
// shadows: an entry left in one of them would come back to life, binary-less, when the
// file before it goes away.
func (c *CNIInstaller) Uninstall() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := Unchain(c.ConfDir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("unchain the CNI plugin from %s: %w", c.ConfDir, err)
	}
	entries, err := os.ReadDir(c.ConfDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	var errs []error
	for _, e := range entries {
		if e.IsDir() || !isConfName(e.Name()) {
			continue
		}
		path := filepath.Join(c.ConfDir, e.Name())
		removed, err := unchainFile(path)
		if err != nil {
			errs = append(errs, err)
		}
		if removed {
			c.log().Info("CNI plugin unchained", "conf", path)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("unchain the CNI plugin (its binary stays in %s): %w", c.BinDir, err)
	}
	switch err := os.Remove(c.binPath()); {
	case err == nil:
		c.log().Info("CNI plugin binary removed", "path", c.binPath())
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	return nil
}

// unchainFile removes our entries from the conflist at path, if it holds any. A file that is
// not a conflist, or not JSON, is not ours to judge: it is left alone.
func unchainFile(path string) (bool, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var conf map[string]any
	if json.Unmarshal(data, &conf) != nil {
		return false, nil
	}
	plugins, ok := conf["plugins"].([]any)
	if !ok || !slices.ContainsFunc(plugins, isOurs) {
		return false, nil
	}
	conf["plugins"] = slices.DeleteFunc(slices.Clone(plugins), isOurs)
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return false, err
	}
	return true, writeAtomic(path, append(out, '\n'))
}

// isConfName is a file name the runtime reads as a network configuration (PrimaryConf's).
func isConfName(name string) bool {
	switch filepath.Ext(name) {
	case ".conflist", ".conf", ".json":
		return true
	}
	return false
}

// Watch keeps the plugin chained until ctx ends, then returns nil. Whenever a configuration
// file in ConfDir is created, written, renamed or removed (the primary CNI rewrote its
// conflist without our entry, or wrote a new file that now sorts first), it chains again,
// once per burst of events. Our own writes are events too, but the Chain that follows them
// finds nothing to change and writes nothing, so they do not loop. Every Resync it also
// re-checks the chain and re-installs a binary that went missing or changed. A ConfDir that
// does not exist (or goes away) is created. A failure to chain is logged and retried on the
// next event or tick, never fatal.
func (c *CNIInstaller) Watch(ctx context.Context) error {
	var w *dirWatch
	defer func() {
		if w != nil {
			w.Close()
		}
	}()
	tick := time.NewTicker(c.resync())
	defer tick.Stop()
	retry := time.NewTimer(0) // start watching at once
	defer retry.Stop()
	backoff := cniDebounce
	var debounce <-chan time.Time // non-nil while a burst of events is being coalesced
	for {
		var changed, lost <-chan struct{}
		if w != nil {
			changed, lost = w.changed, w.done
		}
		select {
		case <-ctx.Done():
			return nil
		case <-retry.C:
			var err error
			if w, err = c.watchConfDir(); err != nil {
				// Until it works (inotify instances are a per-user limit), the tick still
				// re-checks.
				c.log().Warn("cannot watch the CNI conf dir: re-checking only periodically", "dir", c.ConfDir, "retry", backoff, "err", err)
				retry.Reset(backoff)
				backoff = min(2*backoff, c.resync())
				continue
			}
			backoff = cniDebounce
			c.log().Debug("watching the CNI conf dir", "dir", c.ConfDir)
			c.recheck() // what changed while nobody watched
			if c.watching != nil {
				c.watching()
			}
		case <-lost:
			c.log().Info("the CNI conf dir was removed or moved: watching it anew", "dir", c.ConfDir)
			w.Close()
			w = nil
			retry.Reset(cniDebounce)
		case <-changed:
			if debounce == nil {
				debounce = time.After(cniDebounce)
			}
		case <-debounce:
			debounce = nil
			c.mu.Lock()
			c.rechain()
			c.mu.Unlock()
		case <-tick.C:
			c.recheck()
		}
	}
}

// recheck re-installs the binary if needed, then chains.
func (c *CNIInstaller) recheck() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.installBinary(false); err != nil {
		c.log().Warn("CNI plugin binary: will retry", "err", err)
	}
	c.rechain()
}

// rechain chains, logging a failure (Watch retries on the next event or tick).
func (c *CNIInstaller) rechain() {
	switch _, err := c.chain(false); {
	case errors.Is(err, ErrNoPrimaryConf):
		c.log().Debug("no CNI network configuration yet", "dir", c.ConfDir)
	case err != nil:
		c.log().Warn("CNI plugin not chained: will retry", "err", err)
	}
}

// watchConfDir creates ConfDir if needed and watches it.
func (c *CNIInstaller) watchConfDir() (*dirWatch, error) {
	if err := os.MkdirAll(c.ConfDir, 0o755); err != nil {
		return nil, err
	}
	return watchDir(c.ConfDir)
}

// dirWatch is an inotify watch on one directory (golang.org/x/sys, which the module
// already has, rather than another dependency for one watch).
type dirWatch struct {
	f       *os.File
	changed chan struct{} // a configuration file changed (capacity 1: signals coalesce)
	done    chan struct{} // closed when the watch ends: the directory went away, or Close
}

// The events that matter: a file created, written, renamed or removed; the directory itself
// removed, moved or unmounted (then the watch has to start anew on the path).
const dirWatchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_MOVED_FROM |
	unix.IN_MOVED_TO | unix.IN_DELETE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

func watchDir(dir string) (*dirWatch, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, dirWatchMask); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "inotify_add_watch", Path: dir, Err: err}
	}
	// Non-blocking: the runtime poller waits for it, and Close wakes the reader.
	w := &dirWatch{f: os.NewFile(uintptr(fd), "inotify:"+dir), changed: make(chan struct{}, 1), done: make(chan struct{})}
	go w.read()
	return w, nil
}

func (w *dirWatch) read() {
	defer close(w.done)
	buf := make([]byte, 64<<10) // many events, each at most header + NAME_MAX + 1
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			return // closed
		}
		relevant, gone := false, false
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			// struct inotify_event: wd int32, mask uint32, cookie uint32, len uint32, name.
			mask := binary.NativeEndian.Uint32(buf[off+4:])
			nameLen := int(binary.NativeEndian.Uint32(buf[off+12:]))
			name := buf[off+unix.SizeofInotifyEvent : min(n, off+unix.SizeofInotifyEvent+nameLen)]
			off += unix.SizeofInotifyEvent + nameLen
			switch {
			case mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_UNMOUNT) != 0:
				gone = true
			case mask&unix.IN_Q_OVERFLOW != 0:
				relevant = true // events were lost: look
			case isConfName(strings.TrimRight(string(name), "\x00")):
				// Not our temporary files (".name.tmp123"): their rename is the event.
				relevant = true
			}
		}
		if relevant {
			select {
			case w.changed <- struct{}{}:
			default: // one is pending already
			}
		}
		if gone {
			return
		}
	}
}

// Close ends the watch and waits for its reader.
func (w *dirWatch) Close() {
	w.f.Close()
	<-w.done
}
