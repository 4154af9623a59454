package proxy

import (
	"context"
	"net"
	"testing"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/zds"
)

// squattedNS is a namespace whose port 15008 a socket without SO_REUSEPORT holds: a pod
// there gets no listeners.
func squattedNS(t *testing.T) *nettest.Netns {
	t.Helper()
	ns := nettest.New(t)
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	var squatter net.Listener
	if err := ns.Do(func() (err error) { squatter, err = net.Listen("tcp4", "0.0.0.0:15008"); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { squatter.Close() })
	return ns
}

func addFrom(t *testing.T, p *Proxy, uid string, info zds.WorkloadInfo, ns *nettest.Netns) error {
	t.Helper()
	h, err := netns.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	return p.AddWorkload(context.Background(), uid, info, h)
}

// TestReadyMeansListening: readiness (what a rolling update waits for before it stops the
// old proxy) holds only when every pod of the agent's first snapshot has its listeners. A
// pod whose listeners failed keeps the proxy not ready until it is deleted or a later Add
// starts it; a pod refused for its workload info (no proxy could serve it) does not, nor
// does a failure after the first snapshot.
func TestReadyMeansListening(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy) // adds sleep and httpbin: the snapshot's Adds
	p := f.proxy
	ctx := context.Background()
	named := map[string]bool{"u-sleep": true, "u-httpbin": true, "u-squat": true, "u-bad": true}
	if err := addFrom(t, p, "u-squat", zds.WorkloadInfo{Name: "squat", Namespace: "demo"}, squattedNS(t)); err == nil {
		t.Fatal("AddWorkload in a namespace whose 15008 is taken: no error")
	}
	if err := addFrom(t, p, "u-bad", zds.WorkloadInfo{Namespace: "demo"}, nettest.New(t)); err == nil {
		t.Fatal("AddWorkload without a name: no error")
	}
	if p.Ready() {
		t.Fatal("ready before the snapshot is done")
	}
	p.SnapshotDone(ctx, named)
	if p.Ready() {
		t.Fatal("ready with a pod of the snapshot (u-squat) without listeners")
	}
	p.DelWorkload(ctx, "u-squat")
	if !p.Ready() {
		t.Fatal("not ready after the pod without listeners was deleted")
	}
	// After the first snapshot a failed Add is the agent's to report (it fails the pod's
	// CNI ADD); the proxy stays ready for the pods it serves.
	if err := addFrom(t, p, "u-squat2", zds.WorkloadInfo{Name: "squat2", Namespace: "demo"}, squattedNS(t)); err == nil {
		t.Fatal("AddWorkload in a namespace whose 15008 is taken: no error")
	}
	if !p.Ready() {
		t.Fatal("not ready after a later Add failed")
	}
}

// TestReadyNextSnapshotForgets: a failed pod the next snapshot does not name is gone: it
// no longer holds readiness back.
func TestReadyNextSnapshotForgets(t *testing.T) {
	f := newMesh(t, compiler.CaptureTProxy)
	p := f.proxy
	if err := addFrom(t, p, "u-squat", zds.WorkloadInfo{Name: "squat", Namespace: "demo"}, squattedNS(t)); err == nil {
		t.Fatal("AddWorkload in a namespace whose 15008 is taken: no error")
	}
	p.SnapshotDone(context.Background(), map[string]bool{"u-sleep": true, "u-httpbin": true})
	if !p.Ready() {
		t.Fatal("not ready: the snapshot did not name the pod without listeners")
	}
}
