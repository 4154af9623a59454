package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

func TestMain(m *testing.M) {
	// Lock files go to a directory of this run, not the machine's /run/nftmesh/locks:
	// tests that set their own (t.Setenv) still may.
	if os.Getenv(dataplane.LockDirEnv) == "" {
		dir, err := os.MkdirTemp("", "nftmesh-locks")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Setenv(dataplane.LockDirEnv, filepath.Join(dir, "locks"))
		code := nettest.RunGuarded(m)
		os.RemoveAll(dir)
		os.Exit(code)
	}
	os.Exit(nettest.RunGuarded(m))
}
