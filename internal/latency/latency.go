// Package latency summarises the durations of single operations, for the benchmarks.
package latency

import (
	"slices"
	"time"
)

// Percentile is the p-th quantile (0 < p <= 1) of ds by the nearest-rank method: the
// smallest duration at least a fraction p of them do not exceed; 0 for none.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p+0.999999) - 1
	return s[max(0, min(i, len(s)-1))]
}

// Mean is the mean of ds; 0 for none.
func Mean(ds []time.Duration) time.Duration {
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return sum / time.Duration(max(1, len(ds)))
}
