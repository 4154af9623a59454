package proxy

import (
	"context"
	"io"
	"log/slog"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
	"github.com/nftmesh/nftmesh/zds"
)

// holdingIssuer is a CAIssuer that counts the holds of each identity (identity.Holder).
type holdingIssuer struct {
	*identity.CAIssuer
	mu       sync.Mutex
	holds    map[identity.ID]int // now
	held     map[identity.ID]int // Hold calls in all
	calls    int
	problems []string
}

func (h *holdingIssuer) Hold(id identity.ID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.holds[id]++
	h.held[id]++
	h.calls++
}

func (h *holdingIssuer) Release(id identity.ID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.holds[id] == 0 {
		h.problems = append(h.problems, "Release("+id.String()+") without a hold")
		return
	}
	h.holds[id]--
	if h.holds[id] == 0 {
		delete(h.holds, id)
	}
}

func (h *holdingIssuer) snapshot() (map[identity.ID]int, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.holds), h.calls
}

// TestHoldsFollowInstances: the proxy holds a pod's identity with the issuer while it
// serves the pod, once per pod, and releases it exactly once however the pod goes:
// deleted, replaced by a new sandbox, dropped by a snapshot, failed to start, or shut down.
func TestHoldsFollowInstances(t *testing.T) {
	nettest.Require(t)
	certPEM, keyPEM, err := identity.GenerateRoot("cluster.local", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	iss := &holdingIssuer{CAIssuer: ca, holds: map[identity.ID]int{}, held: map[identity.ID]int{}}
	store, err := workload.NewStatic(&workload.File{})
	if err != nil {
		t.Fatal(err)
	}
	p := New(Config{ShutdownDeadline: 200 * time.Millisecond}, iss, store, policy.NewStore(policy.Options{}), nil,
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx := context.Background()
	idOf := func(sa string) identity.ID { return identity.ForServiceAccount("cluster.local", "demo", sa) }
	a, c, d := idOf("a"), idOf("c"), idOf("d")
	// expect waits for the holds to be want (releases follow drains, in the background).
	expect := func(step string, want map[identity.ID]int) {
		t.Helper()
		var got map[identity.ID]int
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if got, _ = iss.snapshot(); maps.Equal(got, want) {
				break
			}
		}
		if !maps.Equal(got, want) {
			t.Errorf("%s: holds %v, want %v", step, got, want)
		}
	}
	add := func(uid, sa string, ns *nettest.Netns) error {
		t.Helper()
		return addFrom(t, p, uid, zds.WorkloadInfo{Name: uid, Namespace: "demo", ServiceAccount: sa}, ns)
	}
	nsA, nsB := nettest.New(t), nettest.New(t)
	if err := add("pod-a", "a", nsA); err != nil {
		t.Fatal(err)
	}
	expect("one pod", map[identity.ID]int{a: 1})
	if err := add("pod-b", "a", nsB); err != nil {
		t.Fatal(err)
	}
	expect("two pods of one identity", map[identity.ID]int{a: 2})
	_, before := iss.snapshot()
	if err := add("pod-a", "a", nsA); err != nil { // re-sent after a reconnect: kept
		t.Fatal(err)
	}
	if _, after := iss.snapshot(); after != before {
		t.Errorf("re-sending a running pod held its identity again (%d holds, then %d)", before, after)
	}
	expect("a pod re-sent", map[identity.ID]int{a: 2})
	if err := add("pod-a", "a", nettest.New(t)); err != nil { // a new sandbox
		t.Fatal(err)
	}
	expect("a pod in a new sandbox", map[identity.ID]int{a: 2})
	p.DelWorkload(ctx, "pod-b")
	expect("a pod deleted", map[identity.ID]int{a: 1})
	if err := add("pod-c", "c", squattedNS(t)); err == nil {
		t.Fatal("AddWorkload in a namespace whose 15008 is taken: no error")
	}
	expect("a pod whose listeners failed", map[identity.ID]int{a: 1})
	if err := add("pod-d", "d", nettest.New(t)); err != nil {
		t.Fatal(err)
	}
	expect("another identity", map[identity.ID]int{a: 1, d: 1})
	p.SnapshotDone(ctx, map[string]bool{"pod-a": true})
	expect("a pod the snapshot did not name", map[identity.ID]int{a: 1})
	sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	p.Shutdown(sctx)
	expect("shut down", map[identity.ID]int{})
	iss.mu.Lock()
	defer iss.mu.Unlock()
	if len(iss.problems) > 0 {
		t.Errorf("%d bad releases: %v", len(iss.problems), iss.problems)
	}
	if iss.calls != 6 { // a, a, the new sandbox's a, its bridge over the swap, c, d
		t.Errorf("%d holds, want 6", iss.calls)
	}
	if iss.held[c] != 1 {
		t.Errorf("the pod whose listeners failed held its identity %d times, want 1 (and released it)", iss.held[c])
	}
}
