package controlplane

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A process that dies while starting fails Start with the ends of both logs, and the
// other process is stopped.
func TestStartFailureShowsLogs(t *testing.T) {
	bin := t.TempDir()
	write := func(name, script string) {
		if err := os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// etcd dies after the fake apiserver has written its line.
	write("etcd", "sleep 0.3; echo etcd-says-goodbye; exit 3\n")
	write("kube-apiserver", "echo apiserver-waits; exec sleep 60\n")
	_, err := Start(bin, t.TempDir())
	if err == nil {
		t.Fatal("start succeeded")
	}
	for _, want := range []string{"etcd exited while starting", "exit status 3", "etcd-says-goodbye", "apiserver-waits"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	out, _ := exec.Command("pgrep", "-f", "-x", "sleep 60", "-P", fmt.Sprint(os.Getpid())).Output()
	if len(out) > 0 {
		t.Errorf("the fake kube-apiserver still runs: pid %s", out)
	}
}

func TestNotBuilt(t *testing.T) {
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "internal", "controlplane")); err != nil {
		t.Fatalf("repoRoot %s: %v", root, err)
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "controlplane"), "--cached")
	cmd.Env = append(os.Environ(), "NFTMESH_CONTROLPLANE_CACHE="+t.TempDir())
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), "run scripts/controlplane") {
		t.Errorf("scripts/controlplane --cached with an empty cache: %v: %s", err, out)
	}
}
