package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

// nftmeshBin, cniBin and demoBin are the nftmesh, nftmesh-cni and nftmesh-demo binaries,
// built once for the whole package (binDir holds them).
var nftmeshBin, cniBin, demoBin, binDir string

func TestMain(m *testing.M) {
	if cfg := os.Getenv(relayEnv); cfg != "" { // re-executed as a floor relay
		os.Exit(relayMain(cfg))
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "nftmesh-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	nftmeshBin = filepath.Join(dir, "nftmesh")
	cniBin = filepath.Join(dir, "nftmesh-cni")
	demoBin = filepath.Join(dir, "nftmesh-demo")
	binDir = dir
	for bin, pkg := range map[string]string{nftmeshBin: "./cmd/nftmesh", cniBin: "./cmd/nftmesh-cni", demoBin: "./cmd/nftmesh-demo"} {
		// The test binary runs in the package directory: the module root is its parent.
		build := exec.Command(goTool(), "build", "-o", bin, pkg)
		if bin == cniBin {
			// As the Dockerfile builds the plugin that ships: static. The default build
			// links the net package's cgo resolver dynamically wherever a C compiler is
			// found, which costs every ADD some 4 ms of CPU (BENCHMARKS.md).
			build = exec.Command(goTool(), "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, pkg)
			build.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		build.Dir = ".."
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: go build %s: %v\n%s", pkg, err, out)
			return 1
		}
	}
	// The namespace lock files of this run's Managers (the agents' too: they inherit the
	// environment) stay in the run's directory.
	os.Setenv("NFTMESH_LOCK_DIR", filepath.Join(dir, "locks"))
	// Every test works in namespaces of its own; the guard proves the machine's own
	// ruleset and policy routing are unchanged afterwards.
	code := nettest.RunGuarded(m)
	if err := kubetest.StopShared(); err != nil {
		code = 1
	}
	// And every namespace this process made is gone again.
	if out, err := exec.Command("ip", "netns", "list").Output(); err == nil {
		prefix := fmt.Sprintf("nftmesh-t%d-", os.Getpid())
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, prefix) {
				fmt.Fprintln(os.Stderr, "FAIL: network namespace left behind:", line)
				code = 1
			}
		}
	}
	return code
}

// goTool is the go command: `go test` puts its own GOROOT/bin first on PATH.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "go"
}
