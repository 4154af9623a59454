// Package controlplane runs a real Kubernetes control plane on one machine: etcd and
// kube-apiserver on 127.0.0.1 (no kubelet, scheduler or controllers), from the binaries
// scripts/controlplane builds and caches. internal/kubetest uses it for tests, and the
// demo for its cluster.
//
// Starting costs about 3 CPU-seconds (3 s to ready on an idle 2-core machine), stopping up
// to about 1 s, and the two processes hold about 320 MiB. The processes are children of the
// caller and die with it (SIGKILL from the kernel) even if Stop never runs; etcd's data, in
// /dev/shm, is removed by the next Start.
package controlplane

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

// NotBuilt is the failure when the binaries are not there.
const NotBuilt = "control plane not built: run scripts/setup (or scripts/controlplane)"

const readyTimeout = 60 * time.Second

// Binaries returns the directory that holds etcd and kube-apiserver: the one
// NFTMESH_CONTROLPLANE_DIR names, or else the one scripts/controlplane --cached prints.
var Binaries = sync.OnceValues(func() (string, error) {
	if dir := os.Getenv("NFTMESH_CONTROLPLANE_DIR"); dir != "" {
		for _, name := range []string{"etcd", "kube-apiserver"} {
			if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
				return "", fmt.Errorf("%s (NFTMESH_CONTROLPLANE_DIR): %w", NotBuilt, err)
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
		return "", errors.New(NotBuilt)
	}
	if err != nil {
		return "", fmt.Errorf("controlplane: scripts/controlplane --cached: %v: %s", err, stderr.Bytes())
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
			return "", errors.New("controlplane: no go.mod of module github.com/nftmesh/nftmesh above the working directory")
		}
		dir = parent
	}
}

// Start runs etcd and kube-apiserver with their files in dir and waits for /readyz.
// A port taken between choosing and binding it makes it try again with new ones.
func Start(bin, dir string) (*ControlPlane, error) {
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
	cp.dataDir, err = os.MkdirTemp(shmDir(), fmt.Sprintf("nftmesh-controlplane-%d-", os.Getpid()))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			cp.Stop()
		}
	}()
	cp.etcd, err = startProcess("etcd", filepath.Join(dir, "etcd.log"), filepath.Join(bin, "etcd"),
		"--name=nftmesh",
		"--data-dir="+cp.dataDir,
		"--unsafe-no-fsync",
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=nftmesh="+peerURL,
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
		"--allow-privileged=true",                    // as on a real cluster: the agent's DaemonSet is privileged
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
		return nil, fmt.Errorf("controlplane: kube-apiserver is ready but the client fails: %w", err)
	}
	cp.Kubeconfig = filepath.Join(dir, "kubeconfig")
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: nftmesh-local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: nftmesh-local
  context:
    cluster: nftmesh-local
    user: admin
current-context: nftmesh-local
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
					return fmt.Errorf("controlplane: %s could not listen: %w\n%s", p.name, errPortTaken, cp.logTails())
				}
				return fmt.Errorf("controlplane: %s exited while starting: %v\n%s", p.name, p.exitErr, cp.logTails())
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("controlplane: kube-apiserver not ready after %v (last /readyz: %s)\n%s",
				readyTimeout, last, cp.logTails())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop ends kube-apiserver (first: with etcd gone it takes minutes to exit), then etcd,
// and removes etcd's data. It reports a process that had exited before it was stopped.
func (cp *ControlPlane) Stop() error {
	var errs []error
	for _, p := range []*process{cp.apiserver, cp.etcd} {
		if p == nil {
			continue
		}
		if p.stop() {
			errs = append(errs, fmt.Errorf("controlplane: %s exited before it was stopped: %v\n%s", p.name, p.exitErr, p.tail()))
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
// data, and a shared control plane's files (nftmesh-controlplane-<pid>-*, where no process
// <pid> exists any more).
func sweepStale() {
	paths, _ := filepath.Glob(filepath.Join(shmDir(), "nftmesh-controlplane-*-*"))
	if os.TempDir() != shmDir() {
		more, _ := filepath.Glob(filepath.Join(os.TempDir(), "nftmesh-controlplane-*-*"))
		paths = append(paths, more...)
	}
	for _, path := range paths {
		pidText, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(path), "nftmesh-controlplane-"), "-")
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

// PIDs are etcd's and kube-apiserver's process ids.
func (cp *ControlPlane) PIDs() (etcd, apiserver int) { return cp.etcd.pid(), cp.apiserver.pid() }

// DataDir is etcd's data directory (removed by Stop).
func (cp *ControlPlane) DataDir() string { return cp.dataDir }
