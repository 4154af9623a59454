package agent

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// blockingAnnotator fails its first `failures` calls, and holds each call until released.
type blockingAnnotator struct {
	mu       sync.Mutex
	failures int
	calls    []bool
	value    map[string]bool
	release  chan struct{}
}

func (a *blockingAnnotator) SetRedirection(ctx context.Context, pod Pod, enabled bool) error {
	if a.release != nil {
		select {
		case <-a.release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, enabled)
	if a.failures > 0 {
		a.failures--
		return errors.New("api server away")
	}
	if a.value == nil {
		a.value = map[string]bool{}
	}
	a.value[pod.UID] = enabled
	return nil
}

func (a *blockingAnnotator) get(uid string) (bool, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.value[uid]
	return v, ok
}

// The enrollment does not wait for the annotation, a failed write is retried (and
// reported), and a removal's disable is never overtaken by the enable before it.
func TestAsyncAnnotator(t *testing.T) {
	slow := &blockingAnnotator{failures: 2, release: make(chan struct{})}
	var mu sync.Mutex
	var reported []error
	a := NewAsyncAnnotator(slow, 4, func(_ Pod, _ bool, err error) {
		mu.Lock()
		reported = append(reported, err)
		mu.Unlock()
	})
	a.queue.minBackoff = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	pod := Pod{UID: "u1", Name: "p", Namespace: "ns"}
	returned := make(chan error, 1)
	go func() { returned <- a.SetRedirection(ctx, pod, true) }()
	select {
	case err := <-returned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SetRedirection waited for the API write")
	}
	if a.Pending() != 1 {
		t.Errorf("pending = %d, want 1", a.Pending())
	}
	// A removal asked while the enable is in flight (or failing) runs after it.
	a.SetRedirection(ctx, pod, false)
	close(slow.release)
	deadline := time.Now().Add(10 * time.Second)
	for a.Pending() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if v, ok := slow.get("u1"); !ok || v {
		t.Errorf("final annotation = %v (written %v), want disabled", v, ok)
	}
	mu.Lock()
	n := len(reported)
	mu.Unlock()
	if n != 2 {
		t.Errorf("%d failures reported, want 2", n)
	}
	slow.mu.Lock()
	calls := slow.calls
	slow.mu.Unlock()
	if last := calls[len(calls)-1]; last {
		t.Errorf("calls %v: the enable ran last", calls)
	}
}
