package agent

import (
	"context"
	"errors"
	"sync"
	"time"
)

// ErrStopped answers submissions that the queue stopped before running.
var ErrStopped = errors.New("work queue stopped")

// permanentError is a failure that retrying cannot fix (the pod's namespace is gone).
type permanentError struct{ error }

func (p permanentError) Unwrap() error { return p.error }

// Permanent marks err as not worth retrying: the queue reports it and drops the state.
func Permanent(err error) error { return permanentError{err} }

// IsPermanent reports whether err was marked Permanent.
func IsPermanent(err error) bool { return errors.As(err, new(permanentError)) }

// Queue is the one path every change to a pod takes, whatever reported it (the CNI
// plugin, an informer, the start-up scan). Work is keyed by pod UID: one attempt per key
// at a time, different keys in parallel; the newest submitted state wins (a state
// submitted while an older one runs replaces any state still waiting, and runs next); a
// failed attempt is retried with backoff until it succeeds or a newer state arrives. This
// is what keeps two reporters of one pod from racing each other (Istio's iptables-restore
// "Chain already exists").
type Queue[S any] struct {
	process    func(ctx context.Context, key string, state S) error
	workers    int
	minBackoff time.Duration
	maxBackoff time.Duration

	mu      sync.Mutex
	cond    *sync.Cond
	entries map[string]*entry[S]
	ready   []string // keys with a pending state, not running, in arrival order
	stopped bool
}

type entry[S any] struct {
	pending  *S           // the newest state not yet started
	waiters  []chan error // answered by the attempt that runs pending (or a newer one)
	running  bool
	queued   bool // in ready
	attempts int  // consecutive failures of the current state
	retry    *time.Timer
}

// NewQueue returns a queue that runs process with at most workers keys at once, retrying
// failures after minBackoff, doubling up to maxBackoff. Start it with Run.
func NewQueue[S any](workers int, minBackoff, maxBackoff time.Duration, process func(ctx context.Context, key string, state S) error) *Queue[S] {
	q := &Queue[S]{process: process, workers: max(1, workers), minBackoff: minBackoff, maxBackoff: maxBackoff, entries: map[string]*entry[S]{}}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Submit makes state the newest for key. The channel receives the result of the attempt
// that runs it, or of a newer state's attempt if one replaced it before it started, or
// ErrStopped.
func (q *Queue[S]) Submit(key string, state S) <-chan error {
	done := make(chan error, 1)
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.stopped {
		done <- ErrStopped
		return done
	}
	e := q.entries[key]
	if e == nil {
		e = &entry[S]{}
		q.entries[key] = e
	}
	e.pending = &state
	e.waiters = append(e.waiters, done)
	e.attempts = 0
	if e.retry != nil {
		e.retry.Stop()
		e.retry = nil
	}
	q.enqueueLocked(key, e)
	return done
}

func (q *Queue[S]) enqueueLocked(key string, e *entry[S]) {
	if !e.running && !e.queued {
		e.queued = true
		q.ready = append(q.ready, key)
		q.cond.Signal()
	}
}

// Len is the number of keys with work waiting or running, for metrics.
func (q *Queue[S]) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.entries)
}

// Has reports whether key has work waiting, running or backing off.
func (q *Queue[S]) Has(key string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.entries[key] != nil
}

// Run runs the workers until ctx ends, then answers whatever is still waiting with
// ErrStopped. Attempts in progress see ctx canceled.
func (q *Queue[S]) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for range q.workers {
		wg.Go(func() { q.work(ctx) })
	}
	<-ctx.Done()
	q.mu.Lock()
	q.stopped = true
	q.cond.Broadcast()
	for key, e := range q.entries {
		if e.retry != nil {
			e.retry.Stop()
		}
		if !e.running {
			for _, w := range e.waiters {
				w <- ErrStopped
			}
			delete(q.entries, key)
		}
	}
	q.mu.Unlock()
	wg.Wait()
}

func (q *Queue[S]) work(ctx context.Context) {
	for {
		q.mu.Lock()
		for len(q.ready) == 0 && !q.stopped {
			q.cond.Wait()
		}
		if q.stopped || ctx.Err() != nil { // Run answers what is left
			q.mu.Unlock()
			return
		}
		key := q.ready[0]
		q.ready = q.ready[1:]
		e := q.entries[key]
		e.queued = false
		state, waiters := *e.pending, e.waiters
		e.pending, e.waiters, e.running = nil, nil, true
		q.mu.Unlock()

		err := q.process(ctx, key, state)

		q.mu.Lock()
		e.running = false
		for _, w := range waiters {
			w <- err
		}
		switch {
		case q.stopped:
			for _, w := range e.waiters {
				w <- ErrStopped
			}
			delete(q.entries, key)
		case e.pending != nil: // a newer state came meanwhile: it runs next
			q.enqueueLocked(key, e)
		case err != nil && IsPermanent(err):
			delete(q.entries, key)
		case err != nil:
			e.attempts++
			retry := state
			e.retry = time.AfterFunc(q.backoff(e.attempts), func() {
				q.mu.Lock()
				defer q.mu.Unlock()
				if q.stopped || q.entries[key] != e || e.pending != nil || e.running {
					return
				}
				e.retry = nil
				e.pending = &retry
				q.enqueueLocked(key, e)
			})
		default:
			delete(q.entries, key)
		}
		q.mu.Unlock()
	}
}

func (q *Queue[S]) backoff(attempts int) time.Duration {
	d := q.minBackoff
	for i := 1; i < attempts && d < q.maxBackoff; i++ {
		d *= 2
	}
	return min(d, q.maxBackoff)
}
