package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// PluginType is the CNI plugin's type: its binary's name in the CNI bin dir.
const PluginType = "nftmesh-cni"

// ErrNoPrimaryConf is a CNI conf dir without a network configuration to chain into: the
// primary CNI has not written one yet.
var ErrNoPrimaryConf = errors.New("no CNI network configuration yet")

// PrimaryConf returns the file the container runtime uses: the first, by name, of the
// .conflist, .conf and .json files in dir (libcni's order).
func PrimaryConf(dir string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	var names []string
	for _, e := range entries {
		ext := filepath.Ext(e.Name())
		if !e.IsDir() && (ext == ".conflist" || ext == ".conf" || ext == ".json") {
			names = append(names, e.Name())
		}
	}
	if len(names) == 0 {
		return "", fmt.Errorf("%s: %w", dir, ErrNoPrimaryConf)
	}
	slices.Sort(names)
	return filepath.Join(dir, names[0]), nil
}

// Chain makes the primary network configuration in dir end with entry (our plugin's
// configuration, its "type" PluginType), replacing an older entry of ours. A single-plugin
// .conf becomes a .conflist of the same name (the runtime prefers neither; the old file is
// removed so that it does not shadow the new one). It reports whether it wrote. Writes are
// atomic (a temporary file renamed over the old one), so the runtime never reads half.
func Chain(dir string, entry map[string]any) (bool, error) {
	entry["type"] = PluginType
	path, data, conf, err := readPrimary(dir)
	if err != nil {
		return false, err
	}
	target := path
	if _, isList := conf["plugins"]; !isList {
		// A single plugin: make it a list of one.
		list := map[string]any{"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": []any{conf}}
		conf = list
		target = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	plugins, ok := conf["plugins"].([]any)
	if !ok {
		return false, fmt.Errorf("%s: plugins is not a list", path)
	}
	var kept []any
	for _, p := range plugins {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			continue
		}
		kept = append(kept, p)
	}
	if len(kept) == 0 {
		return false, fmt.Errorf("%s: no primary plugin to chain after", path)
	}
	conf["plugins"] = append(kept, entry)
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return false, err
	}
	out = append(out, '\n')
	if target == path && sameJSON(data, out) {
		return false, nil
	}
	if err := writeAtomic(target, out); err != nil {
		return false, err
	}
	if target != path {
		if err := os.Remove(path); err != nil {
			return true, err
		}
	}
	return true, nil
}

// readPrimary reads and decodes the primary network configuration of dir.
func readPrimary(dir string) (path string, data []byte, conf map[string]any, err error) {
	if path, err = PrimaryConf(dir); err != nil {
		return "", nil, nil, err
	}
	if data, err = os.ReadFile(path); err != nil {
		return "", nil, nil, err
	}
	// Numbers stay as written: float64 would round integers beyond 2^53 in the primary's
	// configuration.
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&conf); err != nil {
		return "", nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	if _, ok := conf["cniVersion"]; !ok {
		// libcni refuses a list without one, and a single plugin's default (0.1.0) is too
		// old for a chain: leave the file alone and say why.
		return "", nil, nil, fmt.Errorf("%s: no cniVersion: not chaining into it", path)
	}
	return path, data, conf, nil
}

// Unchain removes our entry from the primary configuration, if there.
func Unchain(dir string) (bool, error) {
	path, _, conf, err := readPrimary(dir)
	if errors.Is(err, ErrNoPrimaryConf) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	plugins, _ := conf["plugins"].([]any)
	kept := slices.DeleteFunc(slices.Clone(plugins), func(p any) bool {
		m, ok := p.(map[string]any)
		return ok && m["type"] == PluginType
	})
	if len(kept) == len(plugins) {
		return false, nil
	}
	conf["plugins"] = kept
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return false, err
	}
	return true, writeAtomic(path, append(out, '\n'))
}

// Chained reports whether the primary configuration in dir holds our plugin.
func Chained(dir string) bool {
	path, err := PrimaryConf(dir)
	if err != nil {
		return false
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	var conf struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if json.Unmarshal(data, &conf) != nil {
		return false
	}
	return slices.ContainsFunc(conf.Plugins, func(p struct {
		Type string `json:"type"`
	}) bool {
		return p.Type == PluginType
	})
}

// InstallBinary copies the plugin binary src into binDir, atomically, unless an identical
// one is there. It reports whether it wrote.
func InstallBinary(src, binDir string) (bool, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return false, err
	}
	dst := filepath.Join(binDir, PluginType)
	if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return false, err
	}
	return true, writeFileAtomic(dst, bytes.NewReader(data), 0o755)
}

func sameJSON(a, b []byte) bool {
	var x, y any
	return json.Unmarshal(a, &x) == nil && json.Unmarshal(b, &y) == nil && fmt.Sprint(x) == fmt.Sprint(y)
}

func writeAtomic(path string, data []byte) error {
	// A primary CNI that keeps its file elsewhere and links it here keeps its link: the
	// file it points to is rewritten.
	if target, err := filepath.EvalSymlinks(path); err == nil {
		path = target
	}
	mode := os.FileMode(0o644)
	if st, err := os.Stat(path); err == nil {
		mode = st.Mode().Perm()
	}
	return writeFileAtomic(path, bytes.NewReader(data), mode)
}

func writeFileAtomic(path string, r io.Reader, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	_, err = io.Copy(tmp, r)
	if err == nil {
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}
