package proxy

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/kubetest"
)

// TestRunKube: with --kubeconfig the proxy reads the cluster (without the
// AuthorizationPolicy CRD: no policy can exist, and it starts) and then serves.
func TestRunKube(t *testing.T) {
	cp := kubetest.Start(t)
	o := runOptions(t)
	o.WorkloadsFile = ""
	o.Kubeconfig = cp.Kubeconfig
	metrics, ready := freeAddr(t), freeAddr(t)
	o.MetricsAddr, o.ReadyAddr = metrics, ready
	startRun(t, o, metrics, ready)
	checkHTTP(t, []httpCheck{
		{"GET", metrics, "/metrics", 200, "go_goroutines"},
		{"GET", ready, "/healthz/ready", 503, "not ready"}, // no agent: no snapshot yet
	})
}

// TestRunSourceErrors: one source of workloads, named by its flags when the combination
// is wrong.
func TestRunSourceErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(*Options)
		want string
	}{
		{"none", func(o *Options) { o.WorkloadsFile = "" }, "no source of workloads: give --workloads FILE, --kubeconfig FILE or --kube"},
		{"file and cluster", func(o *Options) { o.InCluster = true }, "--workloads and --kube/--kubeconfig: give one"},
		{"both configurations", func(o *Options) { o.WorkloadsFile, o.InCluster, o.Kubeconfig = "", true, "k" }, "--kubeconfig and --kube: give one"},
		{"policies file with the cluster", func(o *Options) { o.WorkloadsFile, o.Kubeconfig, o.PoliciesFile = "", "k", "p" }, "--policies and --kube/--kubeconfig"},
		{"no kubeconfig", func(o *Options) { o.WorkloadsFile, o.Kubeconfig = "", "/absent/kubeconfig" }, "--kubeconfig /absent/kubeconfig: kubernetes: kubeconfig /absent/kubeconfig"},
	} {
		o := runOptions(t)
		o.MetricsAddr, o.ReadyAddr = "127.0.0.1:0", "127.0.0.1:0"
		c.edit(&o)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second) // a missing check must not hang the test
		err := Run(ctx, o)
		cancel()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q in the error", c.name, err, c.want)
		}
	}
}
