package main

import (
	"bytes"
	"context"
	"debug/buildinfo"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/agent/cniapi"
)

var plugin string

// The tests run the built plugin the way a container runtime does: CNI_* variables, the
// network configuration on stdin, the result or a CNI error on stdout.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nftmesh-cni-test")
	if err != nil {
		panic(err)
	}
	plugin = filepath.Join(dir, "nftmesh-cni")
	if out, err := exec.Command("go", "build", "-o", plugin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type fakeAgent struct {
	mu   sync.Mutex
	reqs []cniapi.Request
	err  error
	// hold, if set, makes Add wait for its ctx, say so on started and ended (the ctx's
	// cause), and fail.
	hold           bool
	started, ended chan error
}

func (a *fakeAgent) Add(ctx context.Context, r cniapi.Request) (cniapi.Response, error) {
	a.mu.Lock()
	a.reqs = append(a.reqs, r)
	err, hold := a.err, a.hold
	a.mu.Unlock()
	if hold {
		a.started <- nil
		<-ctx.Done()
		a.ended <- context.Cause(ctx)
		return cniapi.Response{}, ctx.Err()
	}
	if err != nil {
		return cniapi.Response{}, err
	}
	return cniapi.Response{Enrolled: true, Reason: "namespace labelled"}, nil
}

func (a *fakeAgent) Del(ctx context.Context, r cniapi.Request) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reqs = append(a.reqs, r)
	return a.err
}

func startAgent(t *testing.T) (*fakeAgent, string) {
	sock := filepath.Join(t.TempDir(), "cni.sock")
	a := &fakeAgent{}
	s, err := cniapi.Listen(sock, a, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return a, sock
}

const prevResult = `{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/pod"}],` +
	`"ips":[{"address":"10.244.1.7/24","gateway":"10.244.1.1","interface":0},{"address":"fd00:244:1::7/64","interface":0}]}`

func conf(sock string, extra string) string {
	return `{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"nftmesh-cni","agentSocket":"` + sock + `",` +
		`"excludeNamespaces":["kube-system"],"timeout":"5s"` + extra + `,"prevResult":` + prevResult + `}`
}

func run(t *testing.T, command, ns, stdin string) (string, error) {
	t.Helper()
	cmd := pluginCmd(command, ns, stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	return out.String(), err
}

func pluginCmd(command, ns, stdin string) *exec.Cmd {
	cmd := exec.Command(plugin)
	cmd.Env = []string{"CNI_COMMAND=" + command, "CNI_CONTAINERID=c0ffee", "CNI_NETNS=/var/run/netns/pod",
		"CNI_IFNAME=eth0", "CNI_PATH=/opt/cni/bin",
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=" + ns + ";K8S_POD_NAME=sleep;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-1"}
	cmd.Stdin = strings.NewReader(stdin)
	return cmd
}

func TestAddPassesPrevResultThrough(t *testing.T) {
	a, sock := startAgent(t)
	out, err := run(t, "ADD", "demo", conf(sock, ""))
	if err != nil {
		t.Fatalf("ADD: %v: %s", err, out)
	}
	var got, want map[string]any
	json.Unmarshal([]byte(out), &got)
	json.Unmarshal([]byte(prevResult), &want)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("ADD printed\n%s\nwant the prevResult unchanged\n%s", out, prevResult)
	}
	if len(a.reqs) != 1 {
		t.Fatalf("agent got %d requests", len(a.reqs))
	}
	r := a.reqs[0]
	if r.Command != "ADD" || r.PodName != "sleep" || r.PodNamespace != "demo" || r.PodUID != "uid-1" || r.NetNS != "/var/run/netns/pod" ||
		fmt.Sprint(r.IPs) != "[10.244.1.7 fd00:244:1::7]" || r.ContainerID != "c0ffee" {
		t.Errorf("agent got %+v", r)
	}
}

func TestAddFailsClosed(t *testing.T) {
	a, sock := startAgent(t)
	a.err = errors.New("zds: add uid-1: no proxy connected")
	out, err := run(t, "ADD", "demo", conf(sock, ""))
	if err == nil || !strings.Contains(out, "no proxy connected") || !strings.Contains(out, "not started outside the mesh") {
		t.Errorf("ADD with a failing agent: %v, %s; want a CNI error with the agent's reason", err, out)
	}
	out, err = run(t, "ADD", "demo", conf(filepath.Join(t.TempDir(), "none.sock"), ""))
	if err == nil || !strings.Contains(out, "agent unreachable") {
		t.Errorf("ADD with no agent: %v, %s; want a CNI error", err, out)
	}
}

func TestExcludedNamespaceNeedsNoAgent(t *testing.T) {
	out, err := run(t, "ADD", "kube-system", conf(filepath.Join(t.TempDir(), "none.sock"), ""))
	if err != nil || !strings.Contains(out, "10.244.1.7/24") {
		t.Errorf("ADD in an excluded namespace: %v, %s; want the prevResult", err, out)
	}
}

func TestDelCheckVersion(t *testing.T) {
	a, sock := startAgent(t)
	if out, err := run(t, "DEL", "demo", conf(sock, "")); err != nil {
		t.Errorf("DEL: %v %s", err, out)
	}
	if len(a.reqs) != 1 || a.reqs[0].Command != "DEL" {
		t.Errorf("agent got %+v", a.reqs)
	}
	if out, err := run(t, "DEL", "demo", conf(filepath.Join(t.TempDir(), "none.sock"), "")); err != nil {
		t.Errorf("DEL with the agent gone must succeed: %v %s", err, out)
	}
	if out, err := run(t, "CHECK", "demo", conf(sock, "")); err != nil {
		t.Errorf("CHECK: %v %s", err, out)
	}
	noPrev := `{"cniVersion":"1.1.0","name":"n","type":"nftmesh-cni"}`
	if out, err := run(t, "ADD", "demo", noPrev); err == nil || !strings.Contains(out, "chain the plugin after the primary CNI") {
		t.Errorf("ADD without prevResult: %v %s", err, out)
	}
	out, err := run(t, "VERSION", "demo", `{"cniVersion":"1.1.0"}`)
	if err != nil || !strings.Contains(out, `"1.1.0"`) || !strings.Contains(out, `"0.4.0"`) {
		t.Errorf("VERSION: %v %s", err, out)
	}
	if out, err := run(t, "ADD", "demo", conf(sock, `,"timeout":"soon"`)); err == nil || !strings.Contains(out, "timeout") {
		t.Errorf("bad timeout accepted: %v %s", err, out)
	}
}

func holdingAgent(t *testing.T) (*fakeAgent, string) {
	a, sock := startAgent(t)
	a.hold, a.started, a.ended = true, make(chan error, 1), make(chan error, 1)
	return a, sock
}

func wait(t *testing.T, c chan error, what string) error {
	t.Helper()
	select {
	case err := <-c:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not within 10s", what)
		return nil
	}
}

// The runtime kills a plugin it has given up on: an ADD waiting in the agent must see its
// ctx end, not go on enrolling a pod nobody waits for.
func TestKilledPluginEndsTheAgentsWait(t *testing.T) {
	a, sock := holdingAgent(t)
	cmd := pluginCmd("ADD", "demo", conf(sock, ""))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	wait(t, a.started, "the agent got the ADD")
	cmd.Process.Kill()
	cmd.Wait()
	if err := wait(t, a.ended, "the agent's ADD ended"); err == nil || !strings.Contains(err.Error(), "the CNI plugin went away") {
		t.Errorf("the agent's ADD ended with %v", err)
	}
}

// The plugin gives up at its timeout, with an error saying so, and the agent learns of it.
func TestAddTimesOut(t *testing.T) {
	a, sock := holdingAgent(t)
	start := time.Now()
	out, err := run(t, "ADD", "demo", conf(sock, `,"timeout":"300ms"`))
	if err == nil || !strings.Contains(out, "did not answer: context deadline exceeded") || !strings.Contains(out, "not started outside the mesh") {
		t.Errorf("ADD with an agent that does not answer: %v, %s; want a CNI error naming the timeout", err, out)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("ADD with a 300ms timeout took %v", d)
	}
	wait(t, a.started, "the agent got the ADD")
	if err := wait(t, a.ended, "the agent's ADD ended"); err == nil || !strings.Contains(err.Error(), "the CNI plugin went away") {
		t.Errorf("the agent's ADD ended with %v", err)
	}
}

// The plugin is exec'd for every pod: its start-up is most of its cost, and net/http (with
// crypto/tls, HTTP/2...) about doubled it. cniapi must not bring it back.
func TestNoHTTP(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range strings.Fields(string(out)) {
		if p == "net/http" || p == "crypto/tls" || strings.HasPrefix(p, "k8s.io/") {
			t.Errorf("the plugin links %s", p)
		}
	}
}

// The plugin is built without the runtime's GOMAXPROCS updater (//go:debug in main.go).
func TestStartupSettings(t *testing.T) {
	bi, err := buildinfo.ReadFile(plugin)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range bi.Settings {
		if s.Key == "DefaultGODEBUG" && slices.Contains(strings.Split(s.Value, ","), "updatemaxprocs=0") {
			return
		}
	}
	t.Errorf("the plugin's build settings %v have no DefaultGODEBUG with updatemaxprocs=0", bi.Settings)
}
