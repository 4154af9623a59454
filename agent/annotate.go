package agent

import (
	"context"
	"time"
)

// AsyncAnnotator writes the redirection annotation behind the pod's enrollment instead of
// inside it: the Enroller still asks for it last, once the rules, the proxy and the probe
// set are done, but the CNI ADD is answered without waiting for the API server. The
// annotation tells other controllers what the node already did; the pod's traffic does
// not depend on it, so a pod must neither start later (a pods/status patch was a fifth of
// an ADD on the benchmark machine, BENCHMARKS.md) nor fail to start because the API server is slow or away.
//
// Work is keyed by pod UID in its own Queue: the newest wanted value wins, failures are
// retried with backoff, and since the Enroller asks in its own per-pod order, an enable
// never overtakes a later removal's disable. A pod whose annotation was still pending when
// the agent stopped is annotated by the next agent's start-up reconcile.
type AsyncAnnotator struct {
	queue *Queue[annotation]
}

type annotation struct {
	pod     Pod
	enabled bool
}

// NewAsyncAnnotator annotates through a, with workers in parallel; onError (may be nil)
// hears of each failed attempt, which is then retried.
func NewAsyncAnnotator(a Annotator, workers int, onError func(pod Pod, enabled bool, err error)) *AsyncAnnotator {
	return &AsyncAnnotator{queue: NewQueue(workers, 200*time.Millisecond, 30*time.Second,
		func(ctx context.Context, _ string, w annotation) error {
			err := a.SetRedirection(ctx, w.pod, w.enabled)
			if err != nil && ctx.Err() == nil && onError != nil {
				onError(w.pod, w.enabled, err)
			}
			return err
		})}
}

// Run writes annotations until ctx ends.
func (a *AsyncAnnotator) Run(ctx context.Context) { a.queue.Run(ctx) }

// SetRedirection is Annotator's: it records the wanted value and returns at once.
func (a *AsyncAnnotator) SetRedirection(_ context.Context, pod Pod, enabled bool) error {
	a.queue.Submit(pod.UID, annotation{pod: pod, enabled: enabled})
	return nil
}

// Pending is the number of pods whose annotation is not written yet, for metrics.
func (a *AsyncAnnotator) Pending() int { return a.queue.Len() }
