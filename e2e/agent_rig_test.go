package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/proxy/identity"
	"github.com/nftmesh/nftmesh/proxy/workload"
)

// The agent's world, for the tests that run the real `nftmesh agent`:
//
//	pod k (eth0 10.246.k.2/24) <-veth-> (vpk 10.246.k.1) node
//
// one node namespace (the agent's --host-netns, where the proxy runs) and a namespace per
// pod, plus Pod objects in a real kube-apiserver with spec.nodeName = the node. The test
// plays the container runtime: it runs the CNI plugin the agent installed, with the
// primary CNI's result, as a runtime does. 10.246.0.0/16 is used by no other test.
//
// Pods that ran before an agent started are found by a scan of a /proc-shaped tree the
// test makes (--proc-root): per pod, a "process" whose cgroup names the pod UID in
// kubelet's form and whose ns/net is the pod's namespace. A real sandbox process would
// need a cgroup of the machine's; the agent's scan reads the tree the same way.

// agentRig is one node with an agent and a proxy.
type agentRig struct {
	t        *testing.T
	cp       *kubetest.ControlPlane
	dir      string
	nodeName string
	node     *nettest.Netns
	intent   compiler.Intent

	kubeconfig, zdsSock, cniSock, confDir, binDir, procRoot string
	caFile, caKeyFile, intentFile, workloadsFile, policies  string
	metricsAddr                                             string
	primaryConf                                             []byte

	mu        sync.Mutex
	pods      []*agentPod
	nextLink  int
	nextIndex int
	agent     *Proc
	proxy     *Proc
}

// agentPod is a pod: its namespace, address and API object.
type agentPod struct {
	Name, Namespace, SA string
	NS                  *nettest.Netns
	IP                  netip.Addr
	Link                int
	UID                 string
	Obj                 *corev1.Pod
}

func (p *agentPod) String() string { return p.Namespace + "/" + p.Name }

func newAgentRig(t *testing.T, cp *kubetest.ControlPlane) *agentRig {
	t.Helper()
	nettest.Require(t, "nft")
	r := &agentRig{t: t, cp: cp, dir: t.TempDir(), nextLink: 1, nextIndex: 10, intent: compiler.DefaultIntent()}
	r.nodeName = fmt.Sprintf("node-%d-%d", os.Getpid(), time.Now().UnixNano()%100000)
	r.node = nettest.New(t)
	meshSysctls(t, r.node)
	r.node.Sysctl(t, "net.ipv4.ip_forward", "1")
	r.kubeconfig = cp.Kubeconfig
	r.zdsSock = filepath.Join(r.dir, "zds.sock")
	r.cniSock = filepath.Join(r.dir, "cni.sock")
	r.confDir = filepath.Join(r.dir, "net.d")
	r.binDir = filepath.Join(r.dir, "bin")
	r.procRoot = filepath.Join(r.dir, "proc")
	for _, d := range []string{r.confDir, r.binDir, r.procRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The primary CNI's configuration, as a runtime finds it.
	r.primaryConf = []byte(`{"cniVersion":"1.1.0","name":"primary","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}}]}` + "\n")
	r.write(filepath.Join(r.confDir, "10-primary.conflist"), r.primaryConf)
	r.metricsAddr = freeLoopbackAddr(t)

	caCert, caKey, err := identity.GenerateRoot(trustDomain, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	r.caFile = r.write(filepath.Join(r.dir, "ca.pem"), caCert)
	r.caKeyFile = r.write(filepath.Join(r.dir, "ca-key.pem"), caKey)
	idata, err := r.intent.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	r.intentFile = r.write(filepath.Join(r.dir, "intent.yaml"), idata)
	r.policies = r.write(filepath.Join(r.dir, "policies.yaml"), nil)
	r.workloadsFile = filepath.Join(r.dir, "workloads.yaml")
	r.writeWorkloads()
	return r
}

func (r *agentRig) write(path string, data []byte) string {
	if err := os.WriteFile(path, data, 0o600); err != nil {
		r.t.Fatal(err)
	}
	return path
}

// meshSysctls are the mesh's namespace settings (see Mesh.sysctls).
func meshSysctls(tb testing.TB, ns *nettest.Netns) { (&Mesh{tb: tb}).sysctls(ns) }

func freeLoopbackAddr(tb testing.TB) string {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// podOpts shape a pod object.
type podOpts struct {
	Labels, Annotations map[string]string
	HostNetwork         bool
	Sidecar             bool // an istio-proxy container
}

// newPod makes a pod's namespace and link, and its Pod object (Pending, no IP yet: the
// runtime's CNI ADD comes first, then the kubelet reports the IP).
func (r *agentRig) newPod(name, namespace string, o podOpts) *agentPod {
	t := r.t
	t.Helper()
	r.mu.Lock()
	link, ia := r.nextLink, r.nextIndex
	r.nextLink++
	r.nextIndex += 2
	r.mu.Unlock()
	p := &agentPod{Name: name, Namespace: namespace, SA: name, Link: link,
		IP: netip.MustParseAddr(fmt.Sprintf("10.246.%d.2", link))}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: o.Labels, Annotations: o.Annotations},
		Spec: corev1.PodSpec{NodeName: r.nodeName, ServiceAccountName: p.SA, HostNetwork: o.HostNetwork,
			Containers: []corev1.Container{{Name: "app", Image: "example"}}},
	}
	if o.Sidecar {
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{Name: "istio-proxy", Image: "proxyv2"})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	created, err := r.cp.Client.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", namespace, name, err)
	}
	p.Obj, p.UID = created, string(created.UID)
	if o.HostNetwork {
		return p // no namespace, no CNI
	}
	p.NS = nettest.New(t)
	meshSysctls(t, p.NS)
	dev := fmt.Sprintf("vp%d", link)
	p.NS.IP(t, fmt.Sprintf("link add eth0 index %d type veth peer name %s index %d netns %s", ia, dev, ia+1, r.node.Name))
	p.NS.IP(t, fmt.Sprintf("addr add %s/24 dev eth0", p.IP), "link set eth0 up",
		fmt.Sprintf("route add default via 10.246.%d.1", link))
	r.node.IP(t, fmt.Sprintf("addr add 10.246.%d.1/24 dev %s", link, dev), "link set "+dev+" up")
	p.NS.WaitUp(t, "eth0")
	r.node.WaitUp(t, dev)
	// Its "sandbox process" in the /proc-shaped tree (see the top of this file).
	proc := filepath.Join(r.procRoot, fmt.Sprint(1000+link))
	if err := os.MkdirAll(filepath.Join(proc, "ns"), 0o755); err != nil {
		t.Fatal(err)
	}
	r.write(filepath.Join(proc, "cgroup"), []byte("0::/kubepods/besteffort/pod"+p.UID+"/sandbox\n"))
	if err := os.Symlink(p.NS.Path, filepath.Join(proc, "ns", "net")); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.pods = append(r.pods, p)
	r.mu.Unlock()
	return p
}

// podNamed is the rig's pod of that name.
func (r *agentRig) podNamed(name string) *agentPod {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range r.pods {
		if p.Name == name {
			return p
		}
	}
	r.t.Fatalf("no pod %s", name)
	return nil
}

// running reports the pod's IP and phase Running, as the kubelet does once the sandbox is up.
func (r *agentRig) running(p *agentPod) {
	r.t.Helper()
	ip := p.IP.String()
	patch, _ := json.Marshal(map[string]any{"status": map[string]any{
		"phase": "Running", "podIP": ip, "podIPs": []map[string]string{{"ip": ip}}, "hostIP": "10.246.0.1"}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	obj, err := r.cp.Client.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	if err != nil {
		r.t.Fatalf("pod %s: status: %v", p, err)
	}
	p.Obj = obj
}

// writeWorkloads writes the proxy's static workloads (the proxy does not read Kubernetes
// yet): every pod the rig made.
func (r *agentRig) writeWorkloads() {
	var wf workload.File
	r.mu.Lock()
	for _, p := range r.pods {
		wf.Workloads = append(wf.Workloads, workload.Workload{UID: p.UID, Name: p.Name, Namespace: p.Namespace,
			ServiceAccount: p.SA, IPs: []netip.Addr{p.IP}, Node: r.nodeName, InMesh: true})
	}
	r.mu.Unlock()
	data, err := yaml.Marshal(&wf)
	if err != nil {
		r.t.Fatal(err)
	}
	r.write(r.workloadsFile, data)
}

// startAgent runs `nftmesh agent` for the node and waits for /readyz.
func (r *agentRig) startAgent(extra ...string) *Proc {
	t := r.t
	t.Helper()
	args := []string{"agent", "--node", r.nodeName, "--kubeconfig", r.kubeconfig, "--intent", r.intentFile,
		"--host-netns", r.node.Path, "--proc-root", r.procRoot, "--zds-socket", r.zdsSock, "--cni-socket", r.cniSock,
		"--cni-conf-dir", r.confDir, "--cni-bin-dir", r.binDir, "--cni-plugin", cniBin,
		"--metrics-addr", r.metricsAddr, "--log-format", "json"}
	p := startProc(t, "agent", exec.Command(nftmeshBin, append(args, extra...)...))
	t.Cleanup(func() { p.Stop(t) })
	r.agent = p
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, _ := r.agentGet("/readyz")
		if code == http.StatusOK {
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("agent exited before ready: %v\n%s", p.err, p.Log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready in 30s (readyz %d); log:\n%s", code, p.Log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startProxy runs `nftmesh proxy` in the node's namespace, connected to the agent.
func (r *agentRig) startProxy() *Proc {
	r.t.Helper()
	p := StartProxy(r.t, "proxy", r.node, "--zds-socket", r.zdsSock, "--ca-cert", r.caFile, "--ca-key", r.caKeyFile,
		"--workloads", r.workloadsFile, "--policies", r.policies, "--intent", r.intentFile,
		"--log-format", "json", "--shutdown-deadline", shutdownDeadline.String(),
		"--metrics-addr", "127.0.0.1:15020", "--ready-addr", "127.0.0.1:15020")
	r.proxy = p
	r.eventually("the proxy connects to the agent", 15*time.Second, func() error {
		if n := MetricSum(r.agentMetrics(), "nftmesh_agent_proxies_connected", nil); n < 1 {
			return fmt.Errorf("nftmesh_agent_proxies_connected = %v", n)
		}
		return nil
	})
	return p
}

func (r *agentRig) agentGet(path string) (int, string) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + r.metricsAddr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (r *agentRig) agentMetrics() string {
	_, body := r.agentGet("/metrics")
	return body
}

// cniResult is what a plugin printed and how it ended.
type cniResult struct {
	Out, Err string
	ExitErr  error
	Took     time.Duration
}

// cni runs the installed plugin as a container runtime does, for command (ADD, DEL, CHECK)
// on pod p, with the primary CNI's result as prevResult.
func (r *agentRig) cni(command string, p *agentPod) cniResult {
	r.t.Helper()
	entry := r.pluginEntry()
	conf := map[string]any{}
	for k, v := range entry {
		conf[k] = v
	}
	conf["cniVersion"] = "1.1.0"
	conf["name"] = "primary"
	if command != "DEL" {
		conf["prevResult"] = map[string]any{
			"cniVersion": "1.1.0",
			"interfaces": []map[string]any{{"name": "eth0", "sandbox": p.NS.Path}},
			"ips":        []map[string]any{{"address": p.IP.String() + "/24", "gateway": fmt.Sprintf("10.246.%d.1", p.Link), "interface": 0}},
		}
	}
	stdin, _ := json.Marshal(conf)
	cmd := exec.Command(filepath.Join(r.binDir, "nftmesh-cni"))
	cmd.Env = []string{"CNI_COMMAND=" + command, "CNI_CONTAINERID=sandbox-" + p.UID, "CNI_NETNS=" + p.NS.Path,
		"CNI_IFNAME=eth0", "CNI_PATH=" + r.binDir,
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=sandbox-%s;K8S_POD_UID=%s",
			p.Namespace, p.Name, p.UID, p.UID)}
	cmd.Stdin = strings.NewReader(string(stdin))
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	return cniResult{Out: out.String(), Err: errb.String(), ExitErr: err, Took: time.Since(start)}
}

// pluginEntry is our plugin's entry in the primary conflist (the agent wrote it).
func (r *agentRig) pluginEntry() map[string]any {
	r.t.Helper()
	data, err := os.ReadFile(filepath.Join(r.confDir, "10-primary.conflist"))
	if err != nil {
		r.t.Fatal(err)
	}
	var list struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		r.t.Fatal(err)
	}
	for _, p := range list.Plugins {
		if p["type"] == "nftmesh-cni" {
			return p
		}
	}
	r.t.Fatalf("the primary conflist has no nftmesh-cni entry:\n%s", data)
	return nil
}

// add runs CNI ADD and fails the test unless it succeeds.
func (r *agentRig) add(p *agentPod) cniResult {
	r.t.Helper()
	res := r.cni("ADD", p)
	if res.ExitErr != nil {
		r.t.Fatalf("CNI ADD %s: %v\nstdout: %s\nstderr: %s\nagent log:\n%s", p, res.ExitErr, res.Out, res.Err, r.agent.Log)
	}
	return res
}

// hasRules reports whether nftmesh's table is in the pod's namespace (the real nft).
func (r *agentRig) hasRules(p *agentPod) bool {
	r.t.Helper()
	out, err := p.NS.Run("", "nft", "list", "tables")
	if err != nil {
		r.t.Fatalf("nft list tables in %s: %v", p, err)
	}
	return strings.Contains(out, "inet nftmesh")
}

// annotation is the pod's ambient.istio.io/redirection as the API server has it.
func (r *agentRig) annotation(p *agentPod) string {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	obj, err := r.cp.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		r.t.Fatalf("get pod %s: %v", p, err)
	}
	return obj.Annotations["ambient.istio.io/redirection"]
}

// eventually polls f until it returns nil, or fails the test with its last error.
func (r *agentRig) eventually(what string, within time.Duration, f func() error) {
	r.t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("%s: not within %v: %v", what, within, err)
			if r.agent != nil {
				msg += "\nagent log:\n" + tail(r.agent.Log.String(), 40)
			}
			r.t.Fatal(msg)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// enrolled waits until p is enrolled (rules and annotation) or not (neither).
func (r *agentRig) enrolled(p *agentPod, want bool) {
	r.t.Helper()
	r.eventually(fmt.Sprintf("pod %s enrolled=%v", p, want), 10*time.Second, func() error {
		rules, ann := r.hasRules(p), r.annotation(p)
		if rules != want || (ann == "enabled") != want {
			return fmt.Errorf("rules %v, annotation %q", rules, ann)
		}
		return nil
	})
}

// talk connects from one pod to another's app port and checks the greeting and an echo:
// the app sees the client's own IP.
func (r *agentRig) talk(from, to *agentPod) (*Session, error) {
	c, err := Dial(from.NS, "tcp4", netip.AddrPortFrom(to.IP, appPort))
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	s := &Session{Conn: c, R: bufio.NewReader(c)}
	if s.Seen, err = Greeting(c, s.R); err != nil {
		c.Close()
		return nil, err
	}
	if s.Seen.Addr() != from.IP {
		c.Close()
		return nil, fmt.Errorf("the app saw source %s, want %s", s.Seen, from.IP)
	}
	if err := Echo(c, s.R, "ping"); err != nil {
		c.Close()
		return nil, err
	}
	return s, nil
}

// serve runs the greet-and-echo app in pod p on appPort.
func (r *agentRig) serve(p *agentPod) {
	r.t.Helper()
	ServeIn(r.t, p.NS, "tcp4", netip.AddrPortFrom(p.IP, appPort), greetAndEcho)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
