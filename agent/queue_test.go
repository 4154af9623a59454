package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func runQueue[S any](t *testing.T, q *Queue[S]) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { q.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

func wait(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("no answer within 5s")
		return nil
	}
}

// One key never runs twice at once, the last state submitted is the last one processed,
// and every submission is answered.
func TestQueueOneKeyNewestWins(t *testing.T) {
	var running, overlap atomic.Int32
	var mu sync.Mutex
	var last int
	q := NewQueue(8, time.Millisecond, 10*time.Millisecond, func(ctx context.Context, key string, s int) error {
		if running.Add(1) > 1 {
			overlap.Add(1)
		}
		defer running.Add(-1)
		time.Sleep(200 * time.Microsecond)
		mu.Lock()
		last = s
		mu.Unlock()
		return nil
	})
	runQueue(t, q)
	var answers []<-chan error
	for i := 1; i <= 300; i++ {
		answers = append(answers, q.Submit("pod", i))
	}
	for _, a := range answers {
		if err := wait(t, a); err != nil {
			t.Fatal(err)
		}
	}
	if overlap.Load() != 0 {
		t.Errorf("one key ran %d times in parallel", overlap.Load())
	}
	mu.Lock()
	defer mu.Unlock()
	if last != 300 {
		t.Errorf("last state processed %d, want 300 (the newest)", last)
	}
	if n := q.Len(); n != 0 {
		t.Errorf("queue holds %d keys after all work is done", n)
	}
}

// Different keys run in parallel: two attempts wait for each other.
func TestQueueKeysInParallel(t *testing.T) {
	var started sync.WaitGroup
	started.Add(2)
	q := NewQueue(2, time.Millisecond, time.Millisecond, func(ctx context.Context, key string, s int) error {
		started.Done()
		started.Wait() // both must be running at once
		return nil
	})
	runQueue(t, q)
	a, b := q.Submit("a", 1), q.Submit("b", 1)
	if err := wait(t, a); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, b); err != nil {
		t.Fatal(err)
	}
}

// A failure answers its waiter and is retried with backoff until it succeeds; a newer
// state replaces the retried one.
func TestQueueRetries(t *testing.T) {
	var mu sync.Mutex
	attempts := map[string]int{}
	succeeded := make(chan string, 10)
	q := NewQueue(2, 5*time.Millisecond, 20*time.Millisecond, func(ctx context.Context, key string, s string) error {
		mu.Lock()
		attempts[s]++
		n := attempts[s]
		mu.Unlock()
		if s == "flaky" && n < 3 || s == "broken" {
			return fmt.Errorf("attempt %d of %s failed", n, s)
		}
		succeeded <- s
		return nil
	})
	runQueue(t, q)
	if err := wait(t, q.Submit("pod", "flaky")); err == nil {
		t.Fatal("the first attempt's error did not reach the submitter")
	}
	select {
	case s := <-succeeded:
		if s != "flaky" {
			t.Fatalf("succeeded %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a failed state was not retried to success")
	}
	mu.Lock()
	if attempts["flaky"] != 3 {
		t.Errorf("attempts %d, want 3", attempts["flaky"])
	}
	mu.Unlock()

	if err := wait(t, q.Submit("pod2", "broken")); err == nil {
		t.Fatal("broken state succeeded")
	}
	if err := wait(t, q.Submit("pod2", "fixed")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // several backoff periods
	mu.Lock()
	defer mu.Unlock()
	if n := attempts["broken"]; n > 2 {
		t.Errorf("the replaced state was retried %d times after a newer one succeeded", n)
	}
}

func TestQueueStop(t *testing.T) {
	release := make(chan struct{})
	q := NewQueue(1, time.Millisecond, time.Millisecond, func(ctx context.Context, key string, s int) error {
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { q.Run(ctx); close(done) }()
	running := q.Submit("a", 1)
	waiting := q.Submit("b", 1)
	time.Sleep(20 * time.Millisecond)
	cancel()
	<-done
	if err := wait(t, running); !errors.Is(err, context.Canceled) {
		t.Errorf("running attempt: %v, want context.Canceled", err)
	}
	if err := wait(t, waiting); !errors.Is(err, ErrStopped) {
		t.Errorf("waiting submission: %v, want ErrStopped", err)
	}
	if err := wait(t, q.Submit("c", 1)); !errors.Is(err, ErrStopped) {
		t.Errorf("submission after stop: %v, want ErrStopped", err)
	}
	close(release)
}
