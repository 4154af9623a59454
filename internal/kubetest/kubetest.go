// Package kubetest runs a real Kubernetes control plane (etcd and kube-apiserver, no
// kubelet, scheduler or controllers) for tests, and makes the objects they need.
//
// Start gives a test a control plane of its own, stopped when the test ends; Shared gives
// every test of a binary the same one, which its TestMain stops:
//
//	func TestMain(m *testing.M) {
//		code := m.Run()
//		kubetest.StopShared()
//		os.Exit(code)
//	}
//
// Starting costs about 3 CPU-seconds (3 s to ready on an idle 2-core machine, more when it
// is busy), stopping up to about 1 s, and the two processes hold about 320 MiB: prefer
// Shared, with a fresh namespace per test. internal/controlplane runs them; the binaries
// come from scripts/controlplane (scripts/setup builds them once; a test never builds
// them), or from the directory NFTMESH_CONTROLPLANE_DIR names.
//
// Nothing runs that a cluster's controllers would do, so:
//   - Use a fresh namespace in each test (Namespace): a deleted namespace stays
//     Terminating for good, as no namespace controller empties it.
//   - Pods are never scheduled nor started: RunningPod sets spec.nodeName and writes the
//     status a kubelet would. Delete them with DeletePod (grace period 0), or they stay
//     Terminating for good.
//   - EndpointSlices are not made for Services, and the ServiceAccount admission plugin is
//     off (no "default" ServiceAccount is made).
//
// The processes are children of the test binary and die with it (SIGKILL from the kernel)
// even if cleanup never runs.
package kubetest

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/controlplane"
)

// ControlPlane is a running etcd and kube-apiserver (controlplane.ControlPlane: Kubeconfig,
// RESTConfig, Client), with helpers that make test objects. Its credentials are an
// admin's (group system:masters). A shared one is used by many tests: copy RESTConfig
// (rest.CopyConfig) before changing it.
type ControlPlane struct {
	*controlplane.ControlPlane
}

// Start runs a control plane for t and stops it (and removes its files) when t ends.
// The processes' output goes to files in t.TempDir(); a failure to start shows their ends.
func Start(t testing.TB) *ControlPlane {
	t.Helper()
	bin, err := controlplane.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir() // before Cleanup below, so that it is removed after the stop
	began := time.Now()
	inner, err := controlplane.Start(bin, dir)
	if err != nil {
		t.Fatal(err)
	}
	cp := &ControlPlane{inner}
	etcd, apiserver := cp.PIDs()
	t.Logf("kubetest: control plane ready in %v (etcd pid %d, kube-apiserver pid %d)",
		time.Since(began).Round(time.Millisecond), etcd, apiserver)
	t.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			t.Error(err)
		}
	})
	return cp
}

var shared struct {
	sync.Mutex
	cp      *ControlPlane
	dir     string
	err     error
	stopped bool
}

// Shared returns the test binary's one control plane, starting it on the first call. It
// outlives the test that started it: TestMain must call StopShared after m.Run.
func Shared(t testing.TB) *ControlPlane {
	t.Helper()
	shared.Lock()
	defer shared.Unlock()
	if shared.stopped {
		t.Fatal("kubetest: Shared called after StopShared")
	}
	if shared.cp == nil && shared.err == nil {
		shared.err = func() error {
			t.Helper()
			bin, err := controlplane.Binaries()
			if err != nil {
				return err
			}
			dir, err := os.MkdirTemp("", fmt.Sprintf("nftmesh-kubetest-%d-", os.Getpid()))
			if err != nil {
				return err
			}
			began := time.Now()
			inner, err := controlplane.Start(bin, dir)
			if err != nil {
				os.RemoveAll(dir)
				return err
			}
			etcd, apiserver := inner.PIDs()
			t.Logf("kubetest: shared control plane ready in %v (etcd pid %d, kube-apiserver pid %d)",
				time.Since(began).Round(time.Millisecond), etcd, apiserver)
			shared.cp, shared.dir = &ControlPlane{inner}, dir
			return nil
		}()
	}
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.cp
}

// StopShared stops the control plane Shared started, if any, and removes its files. A
// problem (a process that had died early) is printed to stderr and returned.
func StopShared() error {
	shared.Lock()
	defer shared.Unlock()
	shared.stopped = true
	if shared.cp == nil {
		return nil
	}
	err := shared.cp.Stop()
	os.RemoveAll(shared.dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubetest:", err)
	}
	return err
}
