// Package demo is `just demo`: the seed's walkthrough (sleep, notsleep, httpbin and an L4
// AuthorizationPolicy) on one machine, with nftmesh's real agent, CNI plugin and proxy
// against a real kube-apiserver and etcd. Nodes and pods are network namespaces; the demo
// plays the container runtime (it makes each pod's namespace and veth, as a primary CNI
// would, then runs the CNI chain's nftmesh plugin) and the kubelet (it reports pod IPs).
package demo

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/nftmesh/nftmesh/internal/controlplane"
)

// Options say where the demo finds what it runs.
type Options struct {
	BinDir          string // nftmesh, nftmesh-cni, nftmesh-demo
	ControlPlaneDir string // etcd, kube-apiserver, kubectl (scripts/controlplane)
	RepoDir         string // deploy/ and fixtures/policy/
	Out             io.Writer
}

const (
	meshNamespace = "ambient-demo"
	appPort       = 8080 // httpbin's container port
	servicePort   = 8000 // httpbin's Service port, as in the seed
	nodeLink      = 100
)

// demoPod is one pod of the walkthrough.
type demoPod struct {
	name, sa string
	node     *demoNode
	link     int
	labels   map[string]string
	ns       string // its network namespace
	ip       netip.Addr
	uid      string
}

type demoNode struct {
	name        string
	ns          string
	ip          netip.Addr // on the node-to-node link
	dir         string
	agent       *proc
	proxy       *proc
	agentHTTP   string // the agent's /metrics, /readyz
	proxyHTTP   string // the proxy's /metrics
	proxyReady  string // the proxy's /healthz/ready
	proxyArgs   []string
	caToken     string // the proxy's pod-bound token for the CA
	cniConfDir  string
	cniBinDir   string
	primaryConf string
}

type demo struct {
	o       Options
	out     io.Writer
	h       *host
	work    string
	cp      *controlplane.ControlPlane
	client  kubernetes.Interface
	kubectl string
	nodes   []*demoNode
	pods    map[string]*demoPod
	vip     netip.Addr
	failed  []string
	ca      *proc  // nftmesh ca serve
	caAddr  string // its gRPC (TLS) address
	caHTTP  string // its /metrics, /readyz
	caRoot  string // the root certificate it wrote: the proxies' trust anchor
	caKey   []byte // the CA's key, to check that no node has it
}

// Run runs the walkthrough, printing each step; it returns an error unless every step
// behaved, and removes all it made (also when ctx is canceled: Ctrl-C).
func Run(ctx context.Context, o Options) (err error) {
	d := &demo{o: o, out: o.Out, h: newHost(), pods: map[string]*demoPod{}}
	if d.out == nil {
		d.out = os.Stdout
	}
	d.kubectl = filepath.Join(o.ControlPlaneDir, "kubectl")
	if d.work, err = os.MkdirTemp("", "nftmesh-demo-"); err != nil {
		return err
	}
	defer func() {
		d.step("Cleaning up")
		errs := d.h.cleanup()
		if d.cp != nil {
			if e := d.cp.Stop(); e != nil {
				errs = append(errs, e)
			}
		}
		os.RemoveAll(d.work)
		if e := errors.Join(errs...); e != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", e))
			d.say("cleanup: %v", e)
		} else {
			d.say("removed the namespaces, processes and files the demo made")
		}
	}()
	for _, f := range []func(context.Context) error{
		d.startControlPlane, d.installNftmesh, d.startCA, d.makeNodes, d.startNodes, d.createPods,
		d.showRules, d.callersReachHttpbin, d.showTelemetry, d.showCA, d.applyPolicy,
	} {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", err)
		}
		if err := f(ctx); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted: %w", ctx.Err())
			}
			d.dumpLogs()
			return err
		}
	}
	if ctx.Err() != nil {
		// The processes may have gone with the signal: what failed says nothing then.
		return fmt.Errorf("interrupted: %w", ctx.Err())
	}
	if len(d.failed) > 0 {
		d.dumpLogs()
		return fmt.Errorf("%d step(s) did not behave: %s", len(d.failed), strings.Join(d.failed, "; "))
	}
	d.step("Done: every step behaved as the seed's walkthrough says")
	return nil
}

func (d *demo) step(title string) { fmt.Fprintf(d.out, "\n==> %s\n", title) }
func (d *demo) say(format string, a ...any) {
	fmt.Fprintf(d.out, "    "+format+"\n", a...)
}
func (d *demo) cmd(line string) { fmt.Fprintf(d.out, "$ %s\n", line) }

// indent prints text indented, each line.
func (d *demo) indent(text string) {
	for line := range strings.Lines(strings.TrimRight(text, "\n") + "\n") {
		fmt.Fprintf(d.out, "    %s", line)
	}
}

// check records a step that did not behave (the demo goes on, and fails at the end).
func (d *demo) check(ok bool, format string, a ...any) {
	if ok {
		fmt.Fprintf(d.out, "    ok: "+format+"\n", a...)
		return
	}
	msg := fmt.Sprintf(format, a...)
	fmt.Fprintf(d.out, "    FAILED: %s\n", msg)
	d.failed = append(d.failed, msg)
}

func (d *demo) startControlPlane(ctx context.Context) error {
	d.step("Starting etcd and kube-apiserver on 127.0.0.1")
	began := time.Now()
	cp, err := controlplane.Start(d.o.ControlPlaneDir, d.work)
	if err != nil {
		return err
	}
	d.cp, d.client = cp, cp.Client
	d.say("ready in %v; kubeconfig %s", time.Since(began).Round(100*time.Millisecond), cp.Kubeconfig)
	return nil
}

// kube runs kubectl with the admin kubeconfig, printing the command and its output.
func (d *demo) kube(stdin string, args ...string) (string, error) {
	d.cmd("kubectl " + strings.Join(args, " "))
	out, err := d.kubeQuiet(stdin, args...)
	d.indent(out)
	return out, err
}

func (d *demo) kubeQuiet(stdin string, args ...string) (string, error) {
	cmd := exec.Command(d.kubectl, append([]string{"--kubeconfig", d.cp.Kubeconfig}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (d *demo) installNftmesh(ctx context.Context) error {
	d.step("Installing nftmesh's objects (deploy/) and Istio's AuthorizationPolicy CRD")
	if _, err := d.kube("", "apply", "--server-side", "-k", filepath.Join(d.o.RepoDir, "deploy")); err != nil {
		return err
	}
	if _, err := d.kube("", "wait", "--for", "condition=Established", "--timeout", "30s", "crd/authorizationpolicies.security.istio.io"); err != nil {
		return err
	}
	d.say("(the DaemonSets stay unscheduled: no kubelet runs here; the demo runs their processes itself)")
	// The mesh CA: made here, as an administrator would, and stored as the Secret deploy/
	// names (its placeholder, with no data, is already there: replaced, as
	// deploy/ca-secret.yaml says).
	ca, key := filepath.Join(d.work, "ca.pem"), filepath.Join(d.work, "ca-key.pem")
	d.cmd("nftmesh ca init --cert " + ca + " --key " + key)
	out, err := d.h.run("", filepath.Join(d.o.BinDir, "nftmesh"), "ca", "init", "--cert", ca, "--key", key)
	if err != nil {
		return fmt.Errorf("nftmesh ca init: %w: %s", err, out)
	}
	d.indent(out)
	create := []string{"create", "secret", "generic", "nftmesh-ca", "-n", "nftmesh-system",
		"--from-file=ca.pem=" + ca, "--from-file=ca-key.pem=" + key, "--dry-run=client", "-o", "yaml"}
	d.cmd("kubectl " + strings.Join(create, " ") + " | kubectl replace -f -")
	secret, err := d.kubeQuiet("", create...)
	if err != nil {
		return err
	}
	if out, err = d.kubeQuiet(secret, "replace", "-f", "-"); err != nil {
		return err
	}
	d.indent(out)
	return nil
}

// startCA runs the mesh's CA service, as deploy/ca-deployment.yaml does: its key from the
// Secret nftmesh-ca (written to a directory, as the kubelet mounts the Secret into the
// CA's pod), the API server as the ServiceAccount nftmesh-ca (deploy/ca-rbac.yaml), and
// the proxies' ServiceAccount as the one trusted to ask for its node's pods' identities.
// The key nftmesh ca init wrote is then removed: only the Secret and the CA have it.
func (d *demo) startCA(ctx context.Context) error {
	d.step("Starting the mesh CA service (nftmesh ca serve): the only process that holds the signing key")
	secret, err := d.client.CoreV1().Secrets("nftmesh-system").Get(ctx, "nftmesh-ca", metav1.GetOptions{})
	if err != nil {
		return err
	}
	vol := filepath.Join(d.work, "nftmesh-ca") // the CA pod's Secret volume
	if err := os.Mkdir(vol, 0o700); err != nil {
		return err
	}
	for _, k := range []string{"ca.pem", "ca-key.pem"} {
		if len(secret.Data[k]) == 0 {
			return fmt.Errorf("secret nftmesh-system/nftmesh-ca has no %s", k)
		}
		if err := os.WriteFile(filepath.Join(vol, k), secret.Data[k], 0o400); err != nil {
			return err
		}
	}
	d.caKey = secret.Data["ca-key.pem"]
	if err := os.Remove(filepath.Join(d.work, "ca-key.pem")); err != nil {
		return err
	}
	kc, err := d.tokenKubeconfig("nftmesh-ca")
	if err != nil {
		return err
	}
	d.caAddr, d.caHTTP = freeAddr(), freeAddr()
	d.caRoot = filepath.Join(d.work, "root-cert.pem")
	args := []string{"ca", "serve", "--ca-cert", filepath.Join(vol, "ca.pem"), "--ca-key", filepath.Join(vol, "ca-key.pem"),
		"--listen", d.caAddr, "--dns-name", "127.0.0.1", "--trusted-accounts", "nftmesh-system/nftmesh-proxy",
		"--kubeconfig", kc, "--root-out", d.caRoot, "--metrics-addr", d.caHTTP, "--log-format", "json"}
	d.cmd("nftmesh " + strings.Join(args, " "))
	if d.ca, err = d.h.start("ca", "", nil, filepath.Join(d.o.BinDir, "nftmesh"), args...); err != nil {
		return err
	}
	if err := waitHTTP(ctx, d.ca, "http://"+d.caHTTP+"/readyz", 60*time.Second); err != nil {
		return fmt.Errorf("CA service: %w", err)
	}
	d.say("the CA's key comes from the Secret nftmesh-ca (%s, as the CA pod mounts it); the copy nftmesh ca init wrote is deleted", vol)
	d.say("ready (its pod cache synced) on %s, as ServiceAccount nftmesh-ca with deploy/'s RBAC; metrics http://%s/metrics", d.caAddr, d.caHTTP)
	d.say("it wrote the mesh's root certificate, and nothing else, for the proxies: %s", d.caRoot)
	d.say("only the CA holds the key: no node and no proxy has it")
	return nil
}

// tokenKubeconfig is a kubeconfig for a ServiceAccount of nftmesh-system (a token from the
// TokenRequest API), so that each half runs with the RBAC deploy/ gives it.
func (d *demo) tokenKubeconfig(sa string) (string, error) {
	token, err := d.kubeQuiet("", "create", "token", sa, "-n", "nftmesh-system", "--duration", "1h")
	if err != nil {
		return "", err
	}
	cfg := d.cp.RESTConfig
	path := filepath.Join(d.work, sa+".kubeconfig")
	data := fmt.Sprintf("apiVersion: v1\nkind: Config\nclusters:\n- name: demo\n  cluster:\n    server: %s\n    certificate-authority-data: %s\n"+
		"users:\n- name: %s\n  user:\n    token: %s\ncontexts:\n- name: demo\n  context: {cluster: demo, user: %s}\ncurrent-context: demo\n",
		cfg.Host, base64.StdEncoding.EncodeToString(cfg.TLSClientConfig.CAData), sa, strings.TrimSpace(token), sa)
	return path, os.WriteFile(path, []byte(data), 0o600)
}

func (d *demo) makeNodes(ctx context.Context) error {
	d.step("Making two nodes and their links (network namespaces)")
	for i, name := range []string{"node1", "node2"} {
		ns, err := d.h.newNetns(name)
		if err != nil {
			return err
		}
		n := &demoNode{name: name, ns: ns, ip: netip.MustParseAddr(fmt.Sprintf("10.245.%d.%d", nodeLink, i+1)), dir: filepath.Join(d.work, name)}
		n.cniConfDir, n.cniBinDir = filepath.Join(n.dir, "net.d"), filepath.Join(n.dir, "bin")
		for _, dir := range []string{n.cniConfDir, n.cniBinDir, filepath.Join(n.dir, "proc")} {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
		}
		// The node's primary CNI configuration, which the agent chains its plugin into.
		n.primaryConf = filepath.Join(n.cniConfDir, "10-demo.conflist")
		if err := os.WriteFile(n.primaryConf, []byte(`{"cniVersion":"1.1.0","name":"demo","plugins":[{"type":"ptp","ipam":{"type":"host-local"}}]}`+"\n"), 0o644); err != nil {
			return err
		}
		if err := d.h.sysctl(ns, meshSysctls("net.ipv4.ip_forward", "1")...); err != nil {
			return err
		}
		d.nodes = append(d.nodes, n)
	}
	n1, n2 := d.nodes[0], d.nodes[1]
	if err := d.h.ip(n1.ns, fmt.Sprintf("link add tonode2 index 10 type veth peer name tonode1 index 11 netns %s", n2.ns),
		fmt.Sprintf("addr add %s/24 dev tonode2", n1.ip), "link set tonode2 up"); err != nil {
		return err
	}
	if err := d.h.ip(n2.ns, fmt.Sprintf("addr add %s/24 dev tonode1", n2.ip), "link set tonode1 up"); err != nil {
		return err
	}
	d.say("node1 %s <-> node2 %s", n1.ip, n2.ip)
	return nil
}

// meshSysctls are a mesh namespace's settings: no reverse path filter (the proxy sends
// from the client's address on purpose), plus extra.
func meshSysctls(extra ...string) []string {
	return append([]string{"net.ipv4.conf.all.rp_filter", "0", "net.ipv4.conf.default.rp_filter", "0"}, extra...)
}

func (d *demo) startNodes(ctx context.Context) error {
	d.step("Starting nftmesh's agent and proxy on each node")
	agentKC, err := d.tokenKubeconfig("nftmesh-agent")
	if err != nil {
		return err
	}
	proxyKC, err := d.tokenKubeconfig("nftmesh-proxy")
	if err != nil {
		return err
	}
	d.say("each half talks to the API server as its own ServiceAccount (a token from TokenRequest), with deploy/'s RBAC")
	if err := d.proxyPods(ctx); err != nil {
		return err
	}
	nftmesh := filepath.Join(d.o.BinDir, "nftmesh")
	for _, n := range d.nodes {
		n.agentHTTP, n.proxyHTTP, n.proxyReady = freeAddr(), freeAddr(), freeAddr()
		sock := filepath.Join(n.dir, "ztunnel.sock")
		args := []string{"agent", "--node", n.name, "--kubeconfig", agentKC, "--host-netns", "/run/netns/" + n.ns,
			"--proc-root", filepath.Join(n.dir, "proc"), "--zds-socket", sock, "--cni-socket", filepath.Join(n.dir, "cni.sock"),
			"--cni-conf-dir", n.cniConfDir, "--cni-bin-dir", n.cniBinDir, "--cni-plugin", filepath.Join(d.o.BinDir, "nftmesh-cni"),
			"--metrics-addr", n.agentHTTP, "--log-format", "json"}
		d.cmd("nftmesh " + strings.Join(args, " "))
		if n.agent, err = d.h.start(n.name+" agent", "", nil, nftmesh, args...); err != nil {
			return err
		}
		if err := waitHTTP(ctx, n.agent, "http://"+n.agentHTTP+"/readyz", 60*time.Second); err != nil {
			return fmt.Errorf("%s agent: %w", n.name, err)
		}
		// The proxy runs in the demo's own namespace: it reaches the API server on
		// 127.0.0.1, and works inside each pod's namespace through the descriptors ZDS
		// hands it.
		args = []string{"proxy", "--kubeconfig", proxyKC,
			"--ca-address", d.caAddr, "--ca-root-file", d.caRoot, "--ca-token-file", n.caToken,
			"--zds-socket", sock, "--metrics-addr", n.proxyHTTP, "--ready-addr", n.proxyReady, "--log-format", "json", "--shutdown-deadline", "2s"}
		d.cmd("nftmesh " + strings.Join(args, " "))
		if n.proxy, err = d.h.start(n.name+" proxy", "", nil, nftmesh, args...); err != nil {
			return err
		}
		if err := waitHTTP(ctx, n.proxy, "http://"+n.proxyReady+"/healthz/ready", 60*time.Second); err != nil {
			return fmt.Errorf("%s proxy: %w", n.name, err)
		}
		n.proxyArgs = args
		d.say("%s: agent ready (metrics http://%s/metrics), proxy connected over ZDS and ready", n.name, n.agentHTTP)
	}
	return nil
}

// proxyPods makes each node's proxy pod object (the DaemonSet's pod, which no kubelet runs
// here: the demo runs its process) and a token bound to it, as the kubelet projects it
// into the pod (deploy/proxy-daemonset.yaml): the proxy's credentials with the CA, which
// signs only the identities of pods on that pod's node.
func (d *demo) proxyPods(ctx context.Context) error {
	var manifest strings.Builder
	for _, n := range d.nodes {
		fmt.Fprintf(&manifest, `---
apiVersion: v1
kind: Pod
metadata:
  name: nftmesh-proxy-%[1]s
  namespace: nftmesh-system
  labels: {app.kubernetes.io/name: nftmesh, app.kubernetes.io/component: proxy, nftmesh.dev/component: proxy}
spec:
  nodeName: %[1]s
  serviceAccountName: nftmesh-proxy
  hostNetwork: true
  containers: [{name: proxy, image: ghcr.io/nftmesh/nftmesh:latest}]
`, n.name)
	}
	if _, err := d.kube(manifest.String(), "apply", "-f", "-"); err != nil {
		return err
	}
	for _, n := range d.nodes {
		pod := "nftmesh-proxy-" + n.name
		// The kubelet's part: the pod runs (on the host's network).
		status, _ := json.Marshal(map[string]any{"status": map[string]any{"phase": "Running", "podIP": n.ip.String(),
			"podIPs": []map[string]string{{"ip": n.ip.String()}}, "hostIP": n.ip.String()}})
		if _, err := d.client.CoreV1().Pods("nftmesh-system").Patch(ctx, pod, types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
			return err
		}
		n.caToken = filepath.Join(n.dir, "istio-token")
		args := []string{"create", "token", "nftmesh-proxy", "-n", "nftmesh-system", "--bound-object-kind", "Pod",
			"--bound-object-name", pod, "--audience", "istio-ca", "--duration", "1h"}
		d.cmd("kubectl " + strings.Join(args, " ") + " > " + n.caToken)
		token, err := d.kubeQuiet("", args...)
		if err != nil {
			return err
		}
		if err := os.WriteFile(n.caToken, []byte(strings.TrimSpace(token)+"\n"), 0o600); err != nil {
			return err
		}
	}
	d.say("each proxy asks the CA with a token bound to its own pod (audience istio-ca), and holds no CA key")
	return nil
}

func freeAddr() string {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return "127.0.0.1:0"
	}
	defer l.Close()
	return l.Addr().String()
}

// waitHTTP polls url until it answers 200, p exits, or within passes.
func waitHTTP(ctx context.Context, p *proc, url string, within time.Duration) error {
	c := http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(within)
	for {
		if resp, err := c.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if p.exited() {
			return fmt.Errorf("exited: %v\n%s", p.err, tail(p.log.String(), 20))
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s not ready within %v\n%s", url, within, tail(p.log.String(), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *demo) createPods(ctx context.Context) error {
	d.step("Creating namespace " + meshNamespace + " (labelled for ambient), its service accounts, httpbin's Service, and the pods")
	manifest := fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata: {name: %[1]s, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sleep, namespace: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: notsleep, namespace: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: httpbin, namespace: %[1]s}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: %[1]s, labels: {app: httpbin}}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: %[2]d, targetPort: %[3]d}]
`, meshNamespace, servicePort, appPort)
	if _, err := d.kube(manifest, "apply", "-f", "-"); err != nil {
		return err
	}
	n1, n2 := d.nodes[0], d.nodes[1]
	for _, p := range []*demoPod{
		{name: "httpbin", sa: "httpbin", node: n1, link: 1, labels: map[string]string{"app": "httpbin"}},
		{name: "sleep", sa: "sleep", node: n1, link: 2, labels: map[string]string{"app": "sleep"}},
		{name: "notsleep", sa: "notsleep", node: n2, link: 3, labels: map[string]string{"app": "notsleep"}},
	} {
		p.ip = netip.MustParseAddr(fmt.Sprintf("10.245.%d.2", p.link))
		if err := d.startPod(ctx, p); err != nil {
			return fmt.Errorf("pod %s: %w", p.name, err)
		}
		d.pods[p.name] = p
	}
	// No controller runs here: the demo writes httpbin's EndpointSlice, as the
	// EndpointSlice controller would once the pod is ready.
	svc, err := d.client.CoreV1().Services(meshNamespace).Get(ctx, "httpbin", metav1.GetOptions{})
	if err != nil {
		return err
	}
	d.vip = netip.MustParseAddr(svc.Spec.ClusterIP)
	hb := d.pods["httpbin"]
	ready, port, name, proto := true, int32(appPort), "http", corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "httpbin-demo", Namespace: meshNamespace, Labels: map[string]string{discoveryv1.LabelServiceName: "httpbin"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{hb.ip.String()}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName: &hb.node.name, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: meshNamespace, Name: hb.name, UID: types.UID(hb.uid)}}},
		Ports: []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
	}
	if _, err := d.client.DiscoveryV1().EndpointSlices(meshNamespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("endpointslice: %w", err)
	}
	d.kube("", "get", "pods,services", "-n", meshNamespace, "-o", "wide")
	return nil
}

// startPod does what the kubelet and the container runtime would: the Pod object, then
// its sandbox (a network namespace, a veth to its node: the primary CNI's part), then the
// CNI chain's nftmesh plugin (ADD, with the primary's result), then the pod's status and
// its process.
func (d *demo) startPod(ctx context.Context, p *demoPod) error {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: meshNamespace, Labels: p.labels},
		Spec: corev1.PodSpec{NodeName: p.node.name, ServiceAccountName: p.sa,
			Containers: []corev1.Container{{Name: p.name, Image: "nftmesh-demo/" + p.name}}},
	}
	created, err := d.client.CoreV1().Pods(meshNamespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	p.uid = string(created.UID)
	if p.ns, err = d.h.newNetns(p.name); err != nil {
		return err
	}
	if err := d.h.sysctl(p.ns, meshSysctls()...); err != nil {
		return err
	}
	dev := "veth" + p.name
	if len(dev) > 15 {
		dev = dev[:15]
	}
	gw := fmt.Sprintf("10.245.%d.1", p.link)
	if err := d.h.ip(p.ns, fmt.Sprintf("link add eth0 index %d type veth peer name %s index %d netns %s", 20+2*p.link, dev, 21+2*p.link, p.node.ns),
		fmt.Sprintf("addr add %s/24 dev eth0", p.ip), "link set eth0 up", "route add default via "+gw); err != nil {
		return err
	}
	if err := d.h.ip(p.node.ns, fmt.Sprintf("addr add %s/24 dev %s", gw, dev), "link set "+dev+" up"); err != nil {
		return err
	}
	// The other node reaches this pod through this pod's node.
	for _, other := range d.nodes {
		if other != p.node {
			if err := d.h.ip(other.ns, fmt.Sprintf("route add 10.245.%d.0/24 via %s", p.link, p.node.ip)); err != nil {
				return err
			}
		}
	}
	began := time.Now()
	if out, err := d.cniAdd(p); err != nil {
		return fmt.Errorf("CNI ADD: %w\n%s", err, out)
	}
	d.say("%s on %s: sandbox %s, IP %s; CNI ADD (nftmesh-cni, chained after the primary CNI) returned after %v: enrolled",
		p.name, p.node.name, p.ns, p.ip, time.Since(began).Round(time.Millisecond))
	status, _ := json.Marshal(map[string]any{"status": map[string]any{"phase": "Running", "podIP": p.ip.String(),
		"podIPs": []map[string]string{{"ip": p.ip.String()}}, "hostIP": p.node.ip.String()}})
	if _, err := d.client.CoreV1().Pods(meshNamespace).Patch(ctx, p.name, types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		return err
	}
	if p.name == "httpbin" {
		if _, err := d.h.start("httpbin", p.ns, nil, filepath.Join(d.o.BinDir, "nftmesh-demo"), "serve-http", "--name", "httpbin",
			"--addr", fmt.Sprintf(":%d", appPort)); err != nil {
			return err
		}
	}
	return nil
}

// cniAdd runs the plugin the agent installed, as a container runtime does.
func (d *demo) cniAdd(p *demoPod) (string, error) {
	data, err := os.ReadFile(p.node.primaryConf)
	if err != nil {
		return "", err
	}
	var list struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		return "", err
	}
	var entry map[string]any
	for _, pl := range list.Plugins {
		if pl["type"] == "nftmesh-cni" {
			entry = pl
		}
	}
	if entry == nil {
		return "", fmt.Errorf("%s: the agent has not chained nftmesh-cni", p.node.primaryConf)
	}
	entry["cniVersion"], entry["name"] = "1.1.0", "demo"
	entry["prevResult"] = map[string]any{"cniVersion": "1.1.0",
		"interfaces": []map[string]any{{"name": "eth0", "sandbox": "/run/netns/" + p.ns}},
		"ips":        []map[string]any{{"address": p.ip.String() + "/24", "gateway": fmt.Sprintf("10.245.%d.1", p.link), "interface": 0}}}
	stdin, _ := json.Marshal(entry)
	cmd := exec.Command(filepath.Join(p.node.cniBinDir, "nftmesh-cni"))
	cmd.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=demo-" + p.uid, "CNI_NETNS=/run/netns/" + p.ns, "CNI_IFNAME=eth0",
		"CNI_PATH=" + p.node.cniBinDir,
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=demo-%s;K8S_POD_UID=%s",
			meshNamespace, p.name, p.uid, p.uid)}
	cmd.Stdin = strings.NewReader(string(stdin))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (d *demo) showRules(ctx context.Context) error {
	sleep := d.pods["sleep"]
	d.step("The rules nftmesh wrote in sleep's network namespace (one table, owned by nftmesh alone)")
	d.cmd("nftmesh show --netns " + sleep.ns)
	out, err := d.h.run("", filepath.Join(d.o.BinDir, "nftmesh"), "show", "--netns", sleep.ns)
	if err != nil {
		return err
	}
	d.indent(out)
	d.check(strings.Contains(out, "table inet nftmesh"), "sleep's namespace holds table inet nftmesh")

	d.step("The proxy's listeners inside sleep's namespace (the node proxy's sockets, not a sidecar's)")
	d.cmd("ip netns exec " + sleep.ns + " ss -ltnp")
	out, err = d.h.run(sleep.ns, "ss", "-ltnp")
	if err != nil {
		return err
	}
	d.indent(out)
	for _, port := range []string{":15001", ":15006", ":15008"} {
		d.check(strings.Contains(out, port), "a listener on %s", port)
	}
	return nil
}

// curl makes one request to httpbin's Service from pod p; it returns the body, or the error.
func (d *demo) curl(p *demoPod) (string, error) {
	url := fmt.Sprintf("http://%s:%d/", d.vip, servicePort)
	out, err := d.h.run(p.ns, filepath.Join(d.o.BinDir, "nftmesh-demo"), "http-get", url)
	return strings.TrimSpace(out), err
}

func (d *demo) callersReachHttpbin(ctx context.Context) error {
	for _, name := range []string{"sleep", "notsleep"} {
		p := d.pods[name]
		d.step(fmt.Sprintf("From %s (%s): a request to httpbin.%s:%d, the Service VIP %s", name, p.node.name, meshNamespace, servicePort, d.vip))
		d.cmd(fmt.Sprintf("ip netns exec %s nftmesh-demo http-get http://%s:%d/   # the pod's curl", p.ns, d.vip, servicePort))
		var body string
		var err error
		// The proxies learn the Service and its endpoints through their informers.
		for deadline := time.Now().Add(15 * time.Second); ; {
			if body, err = d.curl(p); err == nil || time.Now().After(deadline) || ctx.Err() != nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			d.check(false, "%s reaches httpbin: %v", name, err)
			continue
		}
		d.indent(body)
		d.check(strings.HasSuffix(body, "you are "+p.ip.String()), "httpbin sees %s's own pod IP %s", name, p.ip)
	}
	return nil
}

// accessLines are a proxy's access log lines ("connection complete") that match.
func accessLines(p *proc, match func(map[string]any) bool) []map[string]any {
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(p.log.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var l map[string]any
		if json.Unmarshal(sc.Bytes(), &l) == nil && l["msg"] == "connection complete" && match(l) {
			out = append(out, l)
		}
	}
	return out
}

func accessText(l map[string]any) string {
	var b strings.Builder
	for _, k := range []string{"direction", "src.addr", "src.workload", "src.identity", "dst.addr", "dst.hbone_addr", "dst.service", "dst.workload", "dst.identity", "bytes_sent", "bytes_recv", "duration", "error"} {
		if v, ok := l[k]; ok && v != "" {
			fmt.Fprintf(&b, "%s=%v ", k, v)
		}
	}
	return strings.TrimSpace(b.String())
}

func (d *demo) showTelemetry(ctx context.Context) error {
	n1 := d.nodes[0]
	d.step("node1's proxy, where httpbin lives: its access log (inbound, over HBONE, with each caller's SPIFFE identity)")
	time.Sleep(300 * time.Millisecond) // a line is written when its connection completes
	for _, caller := range []string{"sleep", "notsleep"} {
		lines := accessLines(n1.proxy, func(l map[string]any) bool {
			return l["direction"] == "inbound" && l["src.workload"] == caller && l["dst.workload"] == "httpbin"
		})
		d.check(len(lines) > 0, "an inbound access line for %s -> httpbin", caller)
		if len(lines) > 0 {
			d.indent(accessText(lines[len(lines)-1]))
		}
	}
	d.step("node1's proxy metrics for the two callers (Istio's standard TCP metrics)")
	d.say("GET http://%s/metrics, the lines of istio_tcp_connections_opened_total (reporter destination):", n1.proxyHTTP)
	metrics, err := httpGet("http://" + n1.proxyHTTP + "/metrics")
	if err != nil {
		return err
	}
	for _, caller := range []string{"sleep", "notsleep"} {
		found := false
		for line := range strings.Lines(metrics) {
			if strings.HasPrefix(line, "istio_tcp_connections_opened_total{") && strings.Contains(line, `reporter="destination"`) &&
				strings.Contains(line, `source_workload="`+caller+`"`) {
				d.indent(line)
				found = true
			}
		}
		d.check(found, "node1 counts connections from %s, with connection_security_policy=mutual_tls", caller)
	}
	return nil
}

func httpGet(url string) (string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func (d *demo) applyPolicy(ctx context.Context) error {
	d.step("Applying the seed's L4 AuthorizationPolicy: only the sleep service account may reach httpbin")
	policy := filepath.Join(d.o.RepoDir, "fixtures", "policy", "ambient-demo.yaml")
	data, err := os.ReadFile(policy)
	if err != nil {
		return err
	}
	d.indent(string(data))
	if _, err := d.kube("", "apply", "-f", policy); err != nil {
		return err
	}
	notsleep, sleep := d.pods["notsleep"], d.pods["sleep"]
	d.step("From notsleep again: refused")
	d.cmd(fmt.Sprintf("ip netns exec %s nftmesh-demo http-get http://%s:%d/", notsleep.ns, d.vip, servicePort))
	var err2 error
	for deadline := time.Now().Add(15 * time.Second); ; {
		if _, err2 = d.curl(notsleep); err2 != nil || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err2 != nil {
		d.indent(err2.Error())
	}
	d.check(err2 != nil, "notsleep is refused once the policy is in")
	time.Sleep(300 * time.Millisecond)
	denied := accessLines(d.nodes[0].proxy, func(l map[string]any) bool {
		e, _ := l["error"].(string)
		return l["src.workload"] == "notsleep" && strings.Contains(e, "denied")
	})
	d.check(len(denied) > 0, "node1's proxy logged the denial")
	if len(denied) > 0 {
		d.indent(accessText(denied[len(denied)-1]))
	}
	d.step("From sleep again: still allowed")
	d.cmd(fmt.Sprintf("ip netns exec %s nftmesh-demo http-get http://%s:%d/", sleep.ns, d.vip, servicePort))
	body, err := d.curl(sleep)
	if err != nil {
		d.check(false, "sleep still reaches httpbin: %v", err)
		return nil
	}
	d.indent(body)
	d.check(strings.HasSuffix(body, "you are "+sleep.ip.String()), "sleep still reaches httpbin")
	return nil
}

// dumpLogs prints the ends of the CA's, the agents' and the proxies' logs after a failure.
func (d *demo) dumpLogs() {
	if d.ca != nil {
		fmt.Fprintf(d.out, "\n--- %s log (last lines)\n%s\n", d.ca.name, tail(d.ca.log.String(), 25))
	}
	for _, n := range d.nodes {
		for _, p := range []*proc{n.agent, n.proxy} {
			if p != nil {
				fmt.Fprintf(d.out, "\n--- %s log (last lines)\n%s\n", p.name, tail(p.log.String(), 25))
			}
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
