package proxy

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

// runOptions writes a CA and an empty workloads file and returns Options for Run with no
// agent (it keeps retrying the absent ZDS socket).
func runOptions(t *testing.T) Options {
	t.Helper()
	dir := t.TempDir()
	certPEM, keyPEM, err := identity.GenerateRoot("cluster.local", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{
		ZDSSocket:     filepath.Join(dir, "no-agent.sock"),
		CACertFile:    filepath.Join(dir, "ca.pem"),
		CAKeyFile:     filepath.Join(dir, "ca-key.pem"),
		WorkloadsFile: filepath.Join(dir, "workloads.yaml"),
		Log:           slog.New(slog.NewTextHandler(io.Discard, nil)),
		Config:        Config{ShutdownDeadline: 100 * time.Millisecond},
	}
	for path, data := range map[string][]byte{o.CACertFile: certPEM, o.CAKeyFile: keyPEM, o.WorkloadsFile: []byte("workloads: []\n")} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return o
}

// freeAddr returns a loopback address no one listens on (now).
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startRun runs Run with o until the test ends, and waits until addr answers HTTP.
func startRun(t *testing.T, o Options, addrs ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, o) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	for _, addr := range addrs {
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			select {
			case err := <-done:
				t.Fatalf("Run ended: %v", err)
			default:
			}
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("nothing listens on %s", addr)
			}
		}
	}
}

// status sends method path to addr and returns the status code and body.
func status(t *testing.T, method, addr, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

type httpCheck struct {
	method, addr, path string
	code               int
	body               string // in the body, if not ""
}

func checkHTTP(t *testing.T, checks []httpCheck) {
	t.Helper()
	for _, c := range checks {
		code, body := status(t, c.method, c.addr, c.path)
		if code != c.code || !strings.Contains(body, c.body) {
			t.Errorf("%s http://%s%s: %d %.80q, want %d with %q", c.method, c.addr, c.path, code, body, c.code, c.body)
		}
	}
}

// TestHTTPEndpoints: /metrics and /healthz/ready answer GET and HEAD on their own paths;
// other methods get 405, other paths 404 (the metrics handler used to answer everything).
func TestHTTPEndpoints(t *testing.T) {
	o := runOptions(t)
	metrics, ready := freeAddr(t), freeAddr(t)
	o.MetricsAddr, o.ReadyAddr = metrics, ready
	startRun(t, o, metrics, ready)
	checkHTTP(t, []httpCheck{
		{"GET", metrics, "/metrics", 200, "go_goroutines"},
		{"HEAD", metrics, "/metrics", 200, ""},
		{"POST", metrics, "/metrics", 405, ""},
		{"DELETE", metrics, "/metrics", 405, ""},
		{"GET", metrics, "/", 404, ""},
		{"GET", metrics, "/metricsx", 404, ""},
		{"GET", metrics, "/metrics/x", 404, ""},
		{"GET", metrics, "/healthz/ready", 404, ""},
		{"GET", ready, "/healthz/ready", 503, "not ready"}, // no agent: no snapshot yet
		{"HEAD", ready, "/healthz/ready", 503, ""},
		{"POST", ready, "/healthz/ready", 405, ""},
		{"GET", ready, "/healthz/ready/x", 404, ""},
		{"GET", ready, "/", 404, ""},
		{"GET", ready, "/metrics", 404, ""},
	})
}

// TestMetricsAndReadyOneAddress: with --metrics-addr equal to --ready-addr, one listener
// serves both paths (it used to serve readiness alone: /metrics answered 404).
func TestMetricsAndReadyOneAddress(t *testing.T) {
	o := runOptions(t)
	addr := freeAddr(t)
	o.MetricsAddr, o.ReadyAddr = addr, addr
	startRun(t, o, addr)
	checkHTTP(t, []httpCheck{
		{"GET", addr, "/metrics", 200, "go_goroutines"},
		{"GET", addr, "/healthz/ready", 503, "not ready"},
		{"POST", addr, "/metrics", 405, ""},
		{"GET", addr, "/", 404, ""},
	})
}

// TestRunRefusesShortCertTTL: a workload certificate lifetime under MinCertTTL would be
// served expired (or nearly) while the proxy says it is ready.
func TestRunRefusesShortCertTTL(t *testing.T) {
	o := runOptions(t)
	o.MetricsAddr, o.ReadyAddr = "127.0.0.1:0", "127.0.0.1:0"
	for _, ttl := range []time.Duration{time.Nanosecond, -time.Second, MinCertTTL - time.Second} {
		o.CertTTL = ttl
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // a missing check must not hang the test
		err := Run(ctx, o)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "shorter than 10m0s") {
			t.Errorf("CertTTL %v: %v, want an error naming the minimum", ttl, err)
		}
	}
}

// TestRunCapsInputs: workloads and policies files larger than 16 MiB (a big file, or
// /dev/zero, which used to grow the process until it was killed) are refused, read
// through a limit.
func TestRunCapsInputs(t *testing.T) {
	big := filepath.Join(t.TempDir(), "big.yaml")
	if err := os.WriteFile(big, []byte(strings.Repeat("#\n", 9<<20)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{big, "/dev/zero"} {
		for _, field := range []string{"workloads", "policies"} {
			o := runOptions(t)
			o.MetricsAddr, o.ReadyAddr = "127.0.0.1:0", "127.0.0.1:0"
			if field == "workloads" {
				o.WorkloadsFile = path
			} else {
				o.PoliciesFile = path
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // a missing cap must not hang the test
			err := Run(ctx, o)
			cancel()
			if err == nil || !strings.Contains(err.Error(), path+": larger than 16 MiB") {
				t.Errorf("%s %s: %v, want the size limit", field, path, err)
			}
		}
	}
}

// TestRunErrorsNameFlags: a bad trust domain is named as --trust-domain (it used to be
// blamed on the CA certificate file), and a CA file that does not load is named with its
// flag and path.
func TestRunErrorsNameFlags(t *testing.T) {
	absent := filepath.Join(t.TempDir(), "absent.pem")
	for _, c := range []struct {
		name string
		edit func(*Options)
		want string
	}{
		{"trust domain", func(o *Options) { o.TrustDomain = "a/b" }, `--trust-domain: identity: invalid trust domain "a/b" has '/'`},
		{"absent certificate", func(o *Options) { o.CACertFile = absent }, "--ca-cert: open " + absent + ": no such file"},
		{"absent key", func(o *Options) { o.CAKeyFile = absent }, "--ca-key: open " + absent + ": no such file"},
		{"huge key", func(o *Options) { o.CAKeyFile = "/dev/zero" }, "--ca-key: /dev/zero: larger than 16 MiB"},
		{"key for certificate", func(o *Options) { o.CACertFile = o.CAKeyFile }, "--ca-cert %CERT, --ca-key %KEY: identity: CA certificate: no PEM"},
		{"certificate for key", func(o *Options) { o.CAKeyFile = o.CACertFile }, "--ca-cert %CERT, --ca-key %KEY: identity: CA key: no PEM"},
	} {
		o := runOptions(t)
		o.MetricsAddr, o.ReadyAddr = "127.0.0.1:0", "127.0.0.1:0"
		c.edit(&o)
		want := strings.NewReplacer("%CERT", o.CACertFile, "%KEY", o.CAKeyFile).Replace(c.want)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // a missing check must not hang the test
		err := Run(ctx, o)
		cancel()
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q in the error", c.name, err, want)
		}
	}
}
