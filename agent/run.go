package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nftmesh/nftmesh/agent/cniapi"
	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/opshttp"
	"github.com/nftmesh/nftmesh/zds"
)

// Defaults of `nftmesh agent`.
const (
	DefaultHostNetNS   = "/proc/self/ns/net" // the agent runs in the node's namespace (hostNetwork)
	DefaultProcRoot    = "/proc"             // the node's (hostPID)
	DefaultMetricsAddr = ":15014"            // istio-cni's monitoring port
	DefaultWorkers     = 16
	DefaultResync      = time.Minute
)

// DefaultExcludeNamespaces are never enrolled: the control plane's and nftmesh's own.
var DefaultExcludeNamespaces = []string{"kube-system", "nftmesh-system"}

// Options is everything `nftmesh agent` runs with.
type Options struct {
	Kubeconfig        string // "": in-cluster configuration
	NodeName          string // this node: only its pods are enrolled
	Intent            compiler.Intent
	ExcludeNamespaces []string
	HostNetNS         string // the node's network namespace (its probe sets and rules)
	ProcRoot          string // where to scan for running pods' namespaces
	ZDSSocket         string
	CNISocket         string
	CNI               *CNIInstaller // nil: the plugin is installed by someone else
	MetricsAddr       string        // /metrics, /healthz, /readyz; "" serves none
	Workers           int           // pods enrolled at once
	Resync            time.Duration // how often the node's rules are checked (unchanged: no writes)
	Log               *slog.Logger
	// Dataplane writes the rules (nil: a dataplane.Manager).
	Dataplane dataplane.Interface
	// Ready, if set, is called once the agent serves (readiness turns 200).
	Ready func()
}

// RESTConfig loads a kubeconfig file, or the in-cluster configuration when path is "".
func RESTConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kubernetes: in-cluster configuration (give --kubeconfig outside a pod): %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: kubeconfig %s: %w", path, err)
	}
	return c, nil
}

// Run is the node agent: it keeps the node's rules, enrolls this node's pods as the
// Kubernetes API and the CNI plugin report them, serves the node proxy over ZDS, and
// returns when ctx ends (nil) or when it cannot start (an error naming what).
//
// Start-up order matters: the node's rules; the informers' caches; every pod already
// running reconciled into the ZDS snapshot (a proxy that reconnects drops the pods its
// snapshot lacks); then ZDS is served and the CNI socket opened (a CNI ADD before the
// caches would decide on a namespace not yet known); then readiness.
func Run(ctx context.Context, o Options) error {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	if o.NodeName == "" {
		return errors.New("node name: empty (the Downward API's spec.nodeName)")
	}
	o = o.withDefaults()
	cfg, err := RESTConfig(o.Kubeconfig)
	if err != nil {
		return err
	}
	cfg.UserAgent = "nftmesh-agent/" + o.NodeName
	// Enrollment writes one annotation per pod; client-go's default 5 QPS would make
	// 1,000 pods take minutes.
	cfg.QPS, cfg.Burst = 200, 400
	// Only Kubernetes' own types (pods, namespaces, events): protobuf costs the API server
	// and the agent less than JSON for every watch event and every patch's answer.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes: %w", err)
	}
	hostState, err := compiler.HostState(o.Intent)
	if err != nil {
		return fmt.Errorf("intent: node rules: %w", err)
	}
	if _, err := compiler.PodState(o.Intent, nil); err != nil {
		return fmt.Errorf("intent: pod rules: %w", err)
	}
	// Listened on before anything is written, so that a bad address changes nothing.
	var opsLn net.Listener
	if o.MetricsAddr != "" {
		if opsLn, err = net.Listen("tcp", o.MetricsAddr); err != nil {
			return fmt.Errorf("metrics address %q: %w", o.MetricsAddr, err)
		}
		defer opsLn.Close()
	}
	host, err := netns.Open(o.HostNetNS)
	if err != nil {
		return fmt.Errorf("node network namespace: %w", err)
	}
	defer host.Close()
	dp := o.Dataplane
	if dp == nil {
		dp = dataplane.NewManager(log, 0)
	}
	applyHost := func() error {
		res, err := dp.Apply(host, hostState)
		if err != nil {
			return fmt.Errorf("node rules: %w", err)
		}
		if res.Writes > 0 || res.RoutingChanged {
			log.Info("node rules applied", "netns", host.Name(), "action", res.Action, "writes", res.Writes, "routing_changed", res.RoutingChanged)
		}
		return nil
	}
	if err := applyHost(); err != nil {
		return err
	}

	kube := NewKube(client, o.NodeName, log)
	defer kube.Stop()
	var m *metrics
	// The annotation is written behind the enrollment, off the CNI ADD's path (AsyncAnnotator).
	annotator := NewAsyncAnnotator(kube, o.Workers, func(pod Pod, enabled bool, err error) {
		op := map[bool]string{true: "enroll", false: "remove"}[enabled]
		m.failures.WithLabelValues(op, "annotation").Inc()
		log.Warn("pod annotation failed; retrying", "pod", pod.String(), "uid", pod.UID, "enabled", enabled, "error", err)
		kube.Event(pod, "AnnotationFailed", err.Error())
	})
	enroller := &Enroller{Annotator: annotator, Dataplane: dp, Host: host, Intent: o.Intent, Log: log, CheckNetNS: LoopbackUp}
	enroller.DeferProxy()
	// Deferred before the ZDS server's Close, so it runs after it: no snapshot in flight
	// holds a namespace it closes.
	defer enroller.Close()
	zsrv, err := zds.Listen(o.ZDSSocket, log)
	if err != nil {
		return err
	}
	defer zsrv.Close()
	enroller.Proxy = zsrv

	var ready atomic.Bool
	reg := prometheus.NewRegistry()
	var queue *Queue[Work]
	m = newMetrics(reg, func() float64 { return float64(enroller.Count()) }, func() float64 { return float64(queue.Len()) },
		func() float64 { return float64(zsrv.Live()) }, func() float64 { return float64(annotator.Pending()) })
	queue = NewQueue(o.Workers, 200*time.Millisecond, 30*time.Second, func(ctx context.Context, uid string, w Work) error {
		start := time.Now()
		err := enroller.Process(ctx, uid, w)
		op := "remove"
		if w.Enroll {
			op = "enroll"
		}
		m.observe(op, start, err)
		if err != nil && ctx.Err() == nil {
			log.Warn("pod work failed; retrying", "op", op, "pod", w.Pod.String(), "uid", uid, "reason", w.Reason, "error", err)
			kube.Event(w.Pod, map[bool]string{true: "EnrollFailed", false: "RemoveFailed"}[w.Enroll], err.Error())
		}
		return err
	})
	scanner := &NetNSScanner{ProcRoot: o.ProcRoot}
	ctrl := &Controller{
		Selector: Selector{ExcludeNamespaces: toSet(o.ExcludeNamespaces)},
		Queue:    queue, Enroller: enroller, Source: kube, Log: log,
		FindNetNS: func(p *corev1.Pod) (string, error) { return scanner.Find(string(p.UID), podIPs(p)) },
	}

	var httpErr chan error
	if opsLn != nil {
		srv := &http.Server{Handler: opshttp.Handler(reg, &ready, "starting: reconciling running pods"), ReadHeaderTimeout: 5 * time.Second}
		httpErr = make(chan error, 1)
		go func() { httpErr <- srv.Serve(opsLn) }()
		defer srv.Close()
		log.Info("serving metrics and health", "addr", opsLn.Addr().String())
	}

	qctx, stopQueue := context.WithCancel(context.Background())
	queueDone := make(chan struct{})
	annotateDone := make(chan struct{})
	go func() { queue.Run(qctx); close(queueDone) }()
	go func() { annotator.Run(qctx); close(annotateDone) }()
	defer func() { stopQueue(); <-queueDone; <-annotateDone }()

	if err := kube.Watch(ctrl); err != nil {
		return fmt.Errorf("kubernetes: %w", err)
	}
	// The informers live as long as Run, not its caller's context.
	kctx, stopKube := context.WithCancel(ctx)
	defer stopKube()
	syncStart := time.Now()
	log.Info("waiting for the informers to sync with the API server", "host", cfg.Host)
	slow := time.AfterFunc(10*time.Second, func() {
		log.Warn("informers still not synced: is the API server reachable, and may this agent list pods and namespaces?", "host", cfg.Host)
	})
	err = kube.Start(kctx)
	slow.Stop()
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	pods := kube.AllPods()
	results := ctrl.Reconcile(pods)
	failed := 0
	for _, r := range results {
		select {
		case err := <-r:
			if err != nil {
				failed++
			}
		case <-ctx.Done():
			return nil
		}
	}
	enroller.HandOff()
	log.Info("start-up reconcile done", "node", o.NodeName, "pods_on_node", len(pods), "reconciled", len(results),
		"failed", failed, "enrolled", enroller.Count(), "took", time.Since(syncStart).Round(time.Millisecond))

	zdsDone := make(chan error, 1)
	go func() { zdsDone <- zsrv.Serve(ctx, enroller.Snapshot) }()
	log.Info("serving ZDS", "socket", zsrv.Path)

	csrv, err := cniapi.Listen(o.CNISocket, &countingHandler{h: ctrl, m: m}, log)
	if err != nil {
		return fmt.Errorf("cni socket: %w", err)
	}
	defer csrv.Close()
	log.Info("serving the CNI plugin", "socket", o.CNISocket)
	if o.CNI != nil {
		if err := o.CNI.Install(); err != nil {
			return fmt.Errorf("cni install: %w", err)
		}
		watchDone := make(chan struct{})
		go func() { o.CNI.Watch(kctx); close(watchDone) }()
		defer func() { stopKube(); <-watchDone }()
	}

	ready.Store(true)
	if o.Ready != nil {
		o.Ready()
	}
	log.Info("agent ready", "node", o.NodeName)

	tick := time.NewTicker(o.Resync)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			log.Info("agent stopping: pods keep their rules, proxies keep their pods")
			return nil
		case err := <-httpErr:
			return fmt.Errorf("metrics: %w", err)
		case err := <-zdsDone:
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("zds: server ended: %v", err)
		case <-tick.C:
			if err := applyHost(); err != nil {
				log.Error("node rules", "error", err)
			}
		}
	}
}

func (o Options) withDefaults() Options {
	if o.HostNetNS == "" {
		o.HostNetNS = DefaultHostNetNS
	}
	if o.ProcRoot == "" {
		o.ProcRoot = DefaultProcRoot
	}
	if o.ZDSSocket == "" {
		o.ZDSSocket = zds.DefaultSocketPath
	}
	if o.CNISocket == "" {
		o.CNISocket = cniapi.DefaultSocket
	}
	if o.Workers <= 0 {
		o.Workers = DefaultWorkers
	}
	if o.Resync <= 0 {
		o.Resync = DefaultResync
	}
	if o.ExcludeNamespaces == nil {
		o.ExcludeNamespaces = DefaultExcludeNamespaces
	}
	return o
}

func toSet(xs []string) map[string]bool {
	m := make(map[string]bool, len(xs))
	for _, x := range xs {
		m[x] = true
	}
	return m
}

// countingHandler counts CNI calls by command and result.
type countingHandler struct {
	h cniapi.Handler
	m *metrics
}

func (c *countingHandler) Add(ctx context.Context, r cniapi.Request) (cniapi.Response, error) {
	resp, err := c.h.Add(ctx, r)
	result := "skipped"
	switch {
	case err != nil:
		result = "error"
	case resp.Enrolled:
		result = "enrolled"
	}
	c.m.cni.WithLabelValues("ADD", result).Inc()
	return resp, err
}

func (c *countingHandler) Del(ctx context.Context, r cniapi.Request) error {
	err := c.h.Del(ctx, r)
	result := "ok"
	if err != nil {
		result = "error"
	}
	c.m.cni.WithLabelValues("DEL", result).Inc()
	return err
}
