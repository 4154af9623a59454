package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftmesh/nftmesh/internal/kubetest"
)

const ambientLabel = "istio.io/dataplane-mode"

// TestAgent runs the real agent, CNI plugin and proxy against a real kube-apiserver: what
// it enrolls, what it leaves alone, label changes, restarts of either half, the CNI ADD
// and informer race, and the conflist repair. The steps share one node and build on each
// other; each names what it proves.
func TestAgent(t *testing.T) {
	cp := kubetest.Shared(t)
	r := newAgentRig(t, cp)
	ambient := cp.Namespace(t, map[string]string{ambientLabel: "ambient"})
	plainNS := cp.Namespace(t, nil)

	sleep := r.newPod("sleep", ambient, podOpts{})
	httpbin := r.newPod("httpbin", ambient, podOpts{Labels: map[string]string{"app": "httpbin"}})
	r.writeWorkloads()
	r.serve(httpbin)
	r.startAgent()
	r.startProxy()

	t.Run("installs and chains the plugin", func(t *testing.T) {
		if _, err := os.Stat(filepath.Join(r.binDir, "nftmesh-cni")); err != nil {
			t.Fatalf("plugin binary not installed: %v", err)
		}
		data, _ := os.ReadFile(filepath.Join(r.confDir, "10-primary.conflist"))
		var list struct {
			Plugins []map[string]any `json:"plugins"`
		}
		if err := json.Unmarshal(data, &list); err != nil || len(list.Plugins) != 2 ||
			list.Plugins[0]["type"] != "bridge" || list.Plugins[1]["type"] != "nftmesh-cni" {
			t.Fatalf("conflist is not the primary's plugin then ours:\n%s", data)
		}
	})

	t.Run("enrolls at CNI ADD and carries traffic over HBONE", func(t *testing.T) {
		for _, p := range []*agentPod{sleep, httpbin} {
			if r.hasRules(p) {
				t.Fatalf("%s has rules before its CNI ADD", p)
			}
			res := r.add(p)
			// The plugin passes the primary's result through: the pod's IP is in it.
			if !strings.Contains(res.Out, p.IP.String()) {
				t.Errorf("CNI ADD %s: output does not carry prevResult's IP %s: %s", p, p.IP, res.Out)
			}
			// Enrolled when ADD returns, before the kubelet reports the IP.
			if !r.hasRules(p) {
				t.Errorf("%s: no rules when CNI ADD returned", p)
			}
			r.running(p)
			r.enrolled(p, true)
		}
		s, err := r.talk(sleep, httpbin)
		if err != nil {
			t.Fatalf("sleep -> httpbin: %v\nproxy log:\n%s", err, tail(r.proxy.Log.String(), 30))
		}
		s.Close()
		r.proxy.AccessLine(t, map[string]string{"direction": "inbound", "src.workload": "sleep", "dst.workload": "httpbin",
			"src.identity": fmt.Sprintf("spiffe://%s/ns/%s/sa/sleep", trustDomain, ambient)})
		// A second ADD of the same pod (a runtime retry) is a no-op, not an error.
		r.add(sleep)
	})

	var plain, optout, sidecar, hostnet *agentPod
	t.Run("leaves pods outside the mesh alone", func(t *testing.T) {
		plain = r.newPod("plain", plainNS, podOpts{})
		optout = r.newPod("optout", ambient, podOpts{Labels: map[string]string{ambientLabel: "none"}})
		sidecar = r.newPod("sidecar", ambient, podOpts{Sidecar: true, Annotations: map[string]string{"sidecar.istio.io/status": "{}"}})
		hostnet = r.newPod("hostnet", ambient, podOpts{HostNetwork: true})
		for _, p := range []*agentPod{plain, optout, sidecar} {
			r.add(p)
			r.running(p)
			if r.hasRules(p) || r.annotation(p) != "" {
				t.Errorf("%s: enrolled (rules %v, annotation %q), want left alone", p, r.hasRules(p), r.annotation(p))
			}
		}
	})

	t.Run("labels enroll and remove running pods", func(t *testing.T) {
		setLabel(t, cp, "namespaces", "", plainNS, "ambient")
		r.enrolled(plain, true)
		setLabel(t, cp, "namespaces", "", plainNS, "")
		r.enrolled(plain, false)
		setLabel(t, cp, "pods", ambient, optout.Name, "")
		r.enrolled(optout, true)
		setLabel(t, cp, "pods", ambient, optout.Name, "none")
		r.enrolled(optout, false)
		// The host-network pod was never touched, though its namespace is labelled.
		if a := r.annotation(hostnet); a != "" {
			t.Errorf("host-network pod annotated %q", a)
		}
	})

	t.Run("restarting the agent keeps connections and re-snapshots the proxy", func(t *testing.T) {
		live, err := r.talk(sleep, httpbin)
		if err != nil {
			t.Fatal(err)
		}
		defer live.Close()
		r.agent.Stop(t)
		r.startAgent()
		if err := Echo(live, live.R, "after agent restart"); err != nil {
			t.Fatalf("established connection: %v", err)
		}
		r.eventually("the proxy reconnects", 15*time.Second, func() error {
			if n := MetricSum(r.agentMetrics(), "nftmesh_agent_proxies_connected", nil); n != 1 {
				return fmt.Errorf("proxies connected %v", n)
			}
			return nil
		})
		// The new agent found the running pods (the /proc scan) and put them in the snapshot.
		m := r.agentMetrics()
		if !strings.Contains(m, "\nnftmesh_agent_annotations_pending ") {
			t.Error("nftmesh_agent_annotations_pending is not served")
		}
		if n := MetricSum(m, "nftmesh_agent_pods_enrolled", nil); n != 2 {
			t.Errorf("nftmesh_agent_pods_enrolled = %v after restart, want 2 (sleep, httpbin)", n)
		}
		s, err := r.talk(sleep, httpbin)
		if err != nil {
			t.Fatalf("new connection after agent restart: %v", err)
		}
		s.Close()
	})

	t.Run("restarting the proxy gets every pod back", func(t *testing.T) {
		r.proxy.Stop(t)
		r.startProxy()
		r.eventually("sleep -> httpbin through the new proxy", 10*time.Second, func() error {
			s, err := r.talk(sleep, httpbin)
			if err == nil {
				s.Close()
			}
			return err
		})
	})

	t.Run("ADD fails while the proxy or the agent is down", func(t *testing.T) {
		p := r.newPod("late", ambient, podOpts{})
		r.proxy.Stop(t)
		res := r.cni("ADD", p)
		if res.ExitErr == nil {
			t.Errorf("CNI ADD with no proxy connected succeeded, want a failure; stdout %s", res.Out)
		}
		// The failure is on the pod for `kubectl describe`.
		r.eventually("an EnrollFailed event on the pod", 10*time.Second, func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			evs, err := cp.Client.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + p.Name})
			if err != nil {
				return err
			}
			for _, e := range evs.Items {
				if e.Reason == "EnrollFailed" && e.Type == "Warning" && strings.Contains(e.Message, "proxy") {
					return nil
				}
			}
			return fmt.Errorf("%d events, none EnrollFailed naming the proxy", len(evs.Items))
		})
		r.startProxy()
		r.agent.Stop(t)
		res = r.cni("ADD", p)
		if res.ExitErr == nil {
			t.Errorf("CNI ADD with the agent down succeeded, want a failure; stdout %s", res.Out)
		}
		// DEL succeeds with the agent gone (the runtime must be able to clean up).
		if res := r.cni("DEL", p); res.ExitErr != nil {
			t.Errorf("CNI DEL with the agent down: %v: %s", res.ExitErr, res.Err)
		}
		r.startAgent()
		// The proxy reconnects with its backoff; until then an ADD fails (and the kubelet
		// would retry the sandbox).
		r.eventually("the proxy reconnects", 15*time.Second, func() error {
			if n := MetricSum(r.agentMetrics(), "nftmesh_agent_proxies_connected", nil); n != 1 {
				return fmt.Errorf("proxies connected %v", n)
			}
			return nil
		})
		r.add(p) // and it enrolls once both are back
		r.running(p)
		r.enrolled(p, true)
	})

	t.Run("deleting a pod removes it", func(t *testing.T) {
		before := MetricSum(r.agentMetrics(), "nftmesh_agent_pods_enrolled", nil)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		zero := int64(0)
		if err := cp.Client.CoreV1().Pods(ambient).Delete(ctx, optout.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		// optout is not enrolled; delete an enrolled one: "late" from the step before.
		late := r.podNamed("late")
		if err := cp.Client.CoreV1().Pods(ambient).Delete(ctx, late.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		r.eventually("the deleted pod's rules removed", 10*time.Second, func() error {
			if r.hasRules(late) {
				return fmt.Errorf("rules still in %s", late.NS.Path)
			}
			if n := MetricSum(r.agentMetrics(), "nftmesh_agent_pods_enrolled", nil); n != before-1 {
				return fmt.Errorf("pods enrolled %v, want %v", n, before-1)
			}
			return nil
		})
	})

	t.Run("CNI ADD racing an informer event never fails", func(t *testing.T) {
		const rounds = 1000
		const parallel = 8
		var pods []*agentPod
		for i := range parallel {
			p := r.newPod(fmt.Sprintf("race%d", i), ambient, podOpts{})
			r.add(p)
			r.running(p)
			pods = append(pods, p)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		var failures []string
		for w, p := range pods {
			wg.Go(func() {
				for i := w; i < rounds; i += parallel {
					// The informer's event (a label change) and the runtime's ADD at once;
					// half the rounds start from a removed pod (DEL), the other half from an
					// enrolled one.
					if i%2 == 0 {
						if res := r.cni("DEL", p); res.ExitErr != nil {
							mu.Lock()
							failures = append(failures, fmt.Sprintf("round %d DEL %s: %v %s", i, p, res.ExitErr, res.Err))
							mu.Unlock()
						}
					}
					done := make(chan error, 1)
					go func() { done <- patchLabel(cp, "pods", p.Namespace, p.Name, "round", fmt.Sprint(i)) }()
					res := r.cni("ADD", p)
					if err := <-done; err != nil {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("round %d label %s: %v", i, p, err))
						mu.Unlock()
					}
					if res.ExitErr != nil {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("round %d ADD %s: %v %s", i, p, res.ExitErr, res.Err))
						mu.Unlock()
					}
				}
			})
		}
		wg.Wait()
		if len(failures) > 0 {
			t.Fatalf("%d of %d rounds failed; first: %s", len(failures), rounds, failures[0])
		}
		for _, p := range pods {
			r.enrolled(p, true)
		}
		if strings.Contains(r.agent.Log.String(), "already exists") {
			t.Errorf("agent logged an 'already exists' error:\n%s", grep(r.agent.Log.String(), "already exists"))
		}
	})

	t.Run("repairs the conflist after the primary CNI rewrites it", func(t *testing.T) {
		path := filepath.Join(r.confDir, "10-primary.conflist")
		tmp := path + ".tmp"
		r.write(tmp, r.primaryConf)
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		r.eventually("the plugin is chained again", 10*time.Second, func() error {
			data, _ := os.ReadFile(path)
			if !strings.Contains(string(data), `"nftmesh-cni"`) {
				return fmt.Errorf("conflist: %s", data)
			}
			return nil
		})
	})
}

// setLabel sets (or, with value "", removes) istio.io/dataplane-mode on a namespace or pod.
func setLabel(t *testing.T, cp *kubetest.ControlPlane, resource, namespace, name, value string) {
	t.Helper()
	if err := patchLabel(cp, resource, namespace, name, ambientLabel, value); err != nil {
		t.Fatal(err)
	}
}

func patchLabel(cp *kubetest.ControlPlane, resource, namespace, name, key, value string) error {
	var v any = value
	if value == "" {
		v = nil
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{key: v}}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	if resource == "namespaces" {
		_, err = cp.Client.CoreV1().Namespaces().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
	} else {
		_, err = cp.Client.CoreV1().Pods(namespace).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
	}
	if err != nil {
		return fmt.Errorf("label %s %s/%s %s=%q: %w", resource, namespace, name, key, value, err)
	}
	return nil
}
