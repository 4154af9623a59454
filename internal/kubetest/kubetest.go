// Package kubetest runs a real Kubernetes control plane (etcd and kube-apiserver, no
// kubelet, scheduler or controllers) for tests, and makes the objects they need.
//
// Start gives a test a control plane of its own, stopped when the test ends; Shared gives
// every test of a binary the same one, which its TestMain stops:
//
//	func TestMain(m *testing.M) {
//		code := m.Run()
//		kubetest.StopShared()
//		os.Exit(code)
//	}
//
// Starting costs about 3 CPU-seconds (3 s to ready on an idle 2-core machine, more when it
// is busy), stopping up to about 1 s, and the two processes hold about 320 MiB: prefer
// Shared, with a fresh namespace per test. The binaries come from
// scripts/controlplane (scripts/setup builds them once; a test never builds them), or from
// the directory NFTMESH_CONTROLPLANE_DIR names.
//
// Nothing runs that a cluster's controllers would do, so:
//   - Use a fresh namespace in each test (Namespace): a deleted namespace stays
//     Terminating for good, as no namespace controller empties it.
//   - Pods are never scheduled nor started: RunningPod sets spec.nodeName and writes the
//     status a kubelet would. Delete them with DeletePod (grace period 0), or they stay
//     Terminating for good.
//   - EndpointSlices are not made for Services, and the ServiceAccount admission plugin is
//     off (no "default" ServiceAccount is made).
//
// The processes are children of the test binary and die with it (SIGKILL from the kernel)
// even if cleanup never runs; etcd's data, in /dev/shm, is removed by the next Start.
package kubetest

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// ControlPlane is a running etcd and kube-apiserver. Its credentials are an admin's
// (group system:masters). A shared one is used by many tests: copy RESTConfig
// (rest.CopyConfig) before changing it.
type ControlPlane struct {
	// Kubeconfig is the path of a kubeconfig file for the admin (token, and the
	// apiserver's self-signed certificate as CA).
	Kubeconfig string
	RESTConfig *rest.Config
	Client     kubernetes.Interface

	etcd, apiserver *process
	dataDir         string // etcd's, under /dev/shm
}

// notBuilt is the failure when the binaries are not there.
const notBuilt = "control plane not built: run scripts/setup (or scripts/controlplane)"

const readyTimeout = 60 * time.Second

// Start runs a control plane for t and stops it (and removes its files) when t ends.
// The processes' output goes to files in t.TempDir(); a failure to start shows their ends.
func Start(t testing.TB) *ControlPlane {
	t.Helper()
	bin, err := binaries()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir() // before Cleanup below, so that it is removed after the stop
	began := time.Now()
	cp, err := start(bin, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubetest: control plane ready in %v (etcd pid %d, kube-apiserver pid %d)",
		time.Since(began).Round(time.Millisecond), cp.etcd.pid(), cp.apiserver.pid())
	t.Cleanup(func() {
		if err := cp.stop(); err != nil {
			t.Error(err)
		}
	})
	return cp
}

var shared struct {
	sync.Mutex
	cp      *ControlPlane
	dir     string
	err     error
	stopped bool
}

// Shared returns the test binary's one control plane, starting it on the first call. It
// outlives the test that started it: TestMain must call StopShared after m.Run.
func Shared(t testing.TB) *ControlPlane {
	t.Helper()
	shared.Lock()
	defer shared.Unlock()
	if shared.stopped {
		t.Fatal("kubetest: Shared called after StopShared")
	}
	if shared.cp == nil && shared.err == nil {
		shared.err = func() error {
			t.Helper()
			bin, err := binaries()
			if err != nil {
				return err
			}
			dir, err := os.MkdirTemp("", fmt.Sprintf("nftmesh-kubetest-%d-", os.Getpid()))
			if err != nil {
				return err
			}
			began := time.Now()
			cp, err := start(bin, dir)
			if err != nil {
				os.RemoveAll(dir)
				return err
			}
			t.Logf("kubetest: shared control plane ready in %v (etcd pid %d, kube-apiserver pid %d)",
				time.Since(began).Round(time.Millisecond), cp.etcd.pid(), cp.apiserver.pid())
			shared.cp, shared.dir = cp, dir
			return nil
		}()
	}
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.cp
}

// StopShared stops the control plane Shared started, if any, and removes its files. A
// problem (a process that had died early) is printed to stderr and returned.
func StopShared() error {
	shared.Lock()
	defer shared.Unlock()
	shared.stopped = true
	if shared.cp == nil {
		return nil
	}
	err := shared.cp.stop()
	os.RemoveAll(shared.dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubetest:", err)
	}
	return err
}

// binaries returns the directory that holds etcd and kube-apiserver: the one
// NFTMESH_CONTROLPLANE_DIR names, or else the one scripts/controlplane --cached prints.
var binaries = sync.OnceValues(func() (string, error) {
	if dir := os.Getenv("NFTMESH_CONTROLPLANE_DIR"); dir != "" {
		for _, name := range []string{"etcd", "kube-apiserver"} {
			if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
				return "", fmt.Errorf("%s (NFTMESH_CONTROLPLANE_DIR): %w", notBuilt, err)
			}
		}
		return dir, nil
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "controlplane"), "--cached")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if exit := (*exec.ExitError)(nil); errors.As(err, &exit) && exit.ExitCode() == 1 {
		return "", errors.New(notBuilt)
	}
	if err != nil {
		return "", fmt.Errorf("kubetest: scripts/controlplane --cached: %v: %s", err, stderr.Bytes())
	}
	return strings.TrimSpace(string(out)), nil
})

// repoRoot walks up from the working directory (a test's package directory) to the
// directory whose go.mod is nftmesh's.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if data, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil {
			for line := range strings.Lines(string(data)) {
				if f := strings.Fields(line); len(f) == 2 && f[0] == "module" &&
					strings.Trim(f[1], `"`) == "github.com/nftmesh/nftmesh" {
					return dir, nil
				}
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("kubetest: no go.mod of module github.com/nftmesh/nftmesh above the working directory")
		}
		dir = parent
	}
}

// start runs etcd and kube-apiserver with their files in dir and waits for /readyz.
// A port taken between choosing and binding it makes it try again with new ones.
func start(bin, dir string) (*ControlPlane, error) {
	sweepOnce.Do(sweepStale)
	files, err := writeFiles(dir)
	if err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		cp, err := launch(bin, dir, files)
		if err == nil {
			return cp, nil
		}
		if !errors.Is(err, errPortTaken) || attempt == 5 {
			return nil, err
		}
	}
}

type startFiles struct {
	token, tokens, saKey, certDir string
}

// writeFiles makes the admin token file, a service-account signing key and a cert dir.
func writeFiles(dir string) (startFiles, error) {
	f := startFiles{
		tokens:  filepath.Join(dir, "tokens.csv"),
		saKey:   filepath.Join(dir, "sa.key"),
		certDir: filepath.Join(dir, "certs"),
	}
	b := make([]byte, 16)
	rand.Read(b)
	f.token = hex.EncodeToString(b)
	if err := os.WriteFile(f.tokens, []byte(f.token+",admin,admin,system:masters\n"), 0o600); err != nil {
		return f, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return f, err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return f, err
	}
	if err := os.WriteFile(f.saKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return f, err
	}
	return f, os.MkdirAll(f.certDir, 0o700)
}

var errPortTaken = errors.New("port taken")

func launch(bin, dir string, f startFiles) (_ *ControlPlane, err error) {
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	host := "https://127.0.0.1:" + strconv.Itoa(ports[2])
	cp := &ControlPlane{}
	cp.dataDir, err = os.MkdirTemp(shmDir(), fmt.Sprintf("nftmesh-kubetest-%d-", os.Getpid()))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			cp.stop()
		}
	}()
	cp.etcd, err = startProcess("etcd", filepath.Join(dir, "etcd.log"), filepath.Join(bin, "etcd"),
		"--name=kubetest",
		"--data-dir="+cp.dataDir,
		"--unsafe-no-fsync",
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kubetest="+peerURL,
	)
	if err != nil {
		return nil, err
	}
	cp.apiserver, err = startProcess("kube-apiserver", filepath.Join(dir, "kube-apiserver.log"), filepath.Join(bin, "kube-apiserver"),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(ports[2]),
		"--cert-dir="+f.certDir,
		"--token-auth-file="+f.tokens,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+f.saKey,
		"--service-account-signing-key-file="+f.saKey,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--endpoint-reconciler-type=none",            // else it refuses the loopback advertise address
		"--disable-admission-plugins=ServiceAccount", // no controller makes the "default" ServiceAccount
		"--etcd-servers="+etcdURL,
	)
	if err != nil {
		return nil, err
	}
	if err := cp.waitReady(host, f.token); err != nil {
		return nil, err
	}

	// The cert dir's file is the serving certificate followed by its self-signed CA.
	ca, err := os.ReadFile(filepath.Join(f.certDir, "apiserver.crt"))
	if err != nil {
		return nil, err
	}
	cp.RESTConfig = &rest.Config{
		Host:            host,
		BearerToken:     f.token,
		TLSClientConfig: rest.TLSClientConfig{CAData: ca},
		QPS:             1000, // client-go's default of 5 would pace the tests
		Burst:           2000,
	}
	cp.Client, err = kubernetes.NewForConfig(cp.RESTConfig)
	if err != nil {
		return nil, err
	}
	if _, err := cp.Client.Discovery().ServerVersion(); err != nil { // checks the CA too
		return nil, fmt.Errorf("kubetest: kube-apiserver is ready but the client fails: %w", err)
	}
	cp.Kubeconfig = filepath.Join(dir, "kubeconfig")
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kubetest
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: kubetest
  context:
    cluster: kubetest
    user: admin
current-context: kubetest
`, host, base64.StdEncoding.EncodeToString(ca), f.token)
	if err := os.WriteFile(cp.Kubeconfig, []byte(kubeconfig), 0o600); err != nil {
		return nil, err
	}
	return cp, nil
}

// waitReady polls /readyz until it answers ok, a process exits, or readyTimeout passes.
func (cp *ControlPlane) waitReady(host, token string) error {
	client := &http.Client{
		Timeout: 2 * time.Second,
		// The certificate is the apiserver's own, not known before it serves.
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
	}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(readyTimeout)
	last := "no answer"
	for {
		req, _ := http.NewRequest(http.MethodGet, host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if resp, err := client.Do(req); err != nil {
			last = err.Error()
		} else {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && string(body) == "ok" {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, body)
		}
		for _, p := range []*process{cp.etcd, cp.apiserver} {
			if p.exited() {
				if p.logContains("address already in use") {
					return fmt.Errorf("kubetest: %s could not listen: %w\n%s", p.name, errPortTaken, cp.logTails())
				}
				return fmt.Errorf("kubetest: %s exited while starting: %v\n%s", p.name, p.exitErr, cp.logTails())
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubetest: kube-apiserver not ready after %v (last /readyz: %s)\n%s",
				readyTimeout, last, cp.logTails())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends kube-apiserver (first: with etcd gone it takes minutes to exit), then etcd,
// and removes etcd's data. It reports a process that had exited before it was stopped.
func (cp *ControlPlane) stop() error {
	var errs []error
	for _, p := range []*process{cp.apiserver, cp.etcd} {
		if p == nil {
			continue
		}
		if p.stop() {
			errs = append(errs, fmt.Errorf("kubetest: %s exited before it was stopped: %v\n%s", p.name, p.exitErr, p.tail()))
		}
	}
	if cp.dataDir != "" {
		if err := os.RemoveAll(cp.dataDir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (cp *ControlPlane) logTails() string {
	var b strings.Builder
	for _, p := range []*process{cp.etcd, cp.apiserver} {
		if p != nil {
			b.WriteString(p.tail())
		}
	}
	return b.String()
}

// freePorts picks n distinct free ports on 127.0.0.1. Another process may take one
// before it is used: start then tries again.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// shmDir is where etcd's data goes: memory, so that nothing waits for a disk.
func shmDir() string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		return "/dev/shm"
	}
	return os.TempDir()
}

var sweepOnce sync.Once

// sweepStale removes what test binaries that died without cleaning up left behind: etcd's
// data, and a shared control plane's files (nftmesh-kubetest-<pid>-*, where no process
// <pid> exists any more).
func sweepStale() {
	paths, _ := filepath.Glob(filepath.Join(shmDir(), "nftmesh-kubetest-*-*"))
	if os.TempDir() != shmDir() {
		more, _ := filepath.Glob(filepath.Join(os.TempDir(), "nftmesh-kubetest-*-*"))
		paths = append(paths, more...)
	}
	for _, path := range paths {
		pidText, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(path), "nftmesh-kubetest-"), "-")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(filepath.Join("/proc", pidText)); errors.Is(err, os.ErrNotExist) {
			os.RemoveAll(path)
		}
	}
}

// tailLines returns the last n lines of the file at path.
func tailLines(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error() + "\n"
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n") + "\n"
}
