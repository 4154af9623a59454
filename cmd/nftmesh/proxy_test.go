package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad proxy configuration fails at start with exit 2 and names what is wrong; --help is
// true to the flags.
func TestProxyStartErrors(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if _, errOut, code := runCLI("ca", "init", "--cert", cert, "--key", key); code != exitOK {
		t.Fatalf("ca init: %s", errOut)
	}
	good := filepath.Join(dir, "workloads.yaml")
	os.WriteFile(good, []byte("workloads: []\n"), 0o644)
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("workloads:\n- {uid: a, name: x}\n"), 0o644)
	badPolicy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(badPolicy, []byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec: {action: ALLOW, rules: [{from: [{source: {principal: [x]}}]}]}\n"), 0o644)
	badIntent := filepath.Join(dir, "intent.yaml")
	os.WriteFile(badIntent, []byte("apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\nspec:\n  ports: {hbone: 70000}\n"), 0o644)
	// A kubeconfig whose API server is not there: the proxy fails at its first request.
	unreachable := filepath.Join(dir, "kubeconfig")
	os.WriteFile(unreachable, []byte("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\n"+
		"users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"), 0o600)
	base := []string{"proxy", "--ca-cert", cert, "--ca-key", key, "--metrics-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"proxy"}, "a CA is required: --ca-address HOST:PORT, or --ca-cert and --ca-key"},
		{base, "one of --kube, --kubeconfig FILE and --workloads FILE is required"},
		{append(base, "--kube", "--workloads", good), "--kube, --kubeconfig and --workloads are alternatives"},
		{append(base, "--kubeconfig", good, "--workloads", good), "--kube, --kubeconfig and --workloads are alternatives"},
		{append(base, "--kube", "--kubeconfig", good), "--kube, --kubeconfig and --workloads are alternatives"},
		{append(base, "--kube", "--policies", badPolicy), "--policies goes with --workloads"},
		{append(base, "--kubeconfig", filepath.Join(dir, "absent")), "--kubeconfig " + filepath.Join(dir, "absent") + ": kubernetes: kubeconfig"},
		{append(base, "--kubeconfig", unreachable), "--kubeconfig " + unreachable + ": kubernetes: discovery of security.istio.io/v1"},
		{append(base, "--workloads", good, "--log-format", "xml"), `--log-format: "xml"`},
		{append(base, "--workloads", bad), "bad.yaml"},
		{append(base, "--workloads", bad), "namespace are required"},
		{append(base, "--workloads", good, "--policies", badPolicy), "principal"},
		{[]string{"proxy", "--ca-cert", good, "--ca-key", key, "--workloads", good}, "workloads.yaml"},
		{append(base, "--workloads", good, "--workers", "-1"), "--workers: -1 is negative"},
		{append(base, "--workloads", good, "--metrics-addr", ""), `--metrics-addr: "" is empty`},
		{append(base, "--workloads", good, "--ready-addr", ""), `--ready-addr: "" is empty`},
		{append(base, "--workloads", good, "--cluster-id", ""), `--cluster-id: "" is empty`},
		{append(base, "--workloads", good, "--intent", badIntent), "spec.ports.hbone"},
		{append(base, "--workloads", good, "--intent", filepath.Join(dir, "absent.yaml")), "--intent: open"},
		{append(base, "--workloads", good, "--shutdown-deadline", "0s"), "--shutdown-deadline: 0s is not positive"},
	}
	// Flags that used to be taken as given. Each case also has an --intent that does not
	// load, so that a missing check fails the case instead of starting a proxy.
	twoDocs := filepath.Join(dir, "two.yaml")
	os.WriteFile(twoDocs, []byte("apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\n---\nkind: Other\n"), 0o644)
	guarded := append(append([]string{}, base...), "--workloads", good, "--intent", badIntent)
	for _, tc := range []struct {
		flags []string
		want  string
	}{
		{[]string{"--workers", "100000"}, fmt.Sprintf("--workers: 100000 is more than %d, the limit here", maxWorkers())},
		{[]string{"--workers", fmt.Sprint(maxWorkers() + 1)}, "--workers"},
		{[]string{"--cert-ttl", "1ns"}, "--cert-ttl: 1ns is shorter than the minimum 10m"},
		{[]string{"--cert-ttl", "9m59s"}, "--cert-ttl: 9m59s is shorter than the minimum 10m"},
		{[]string{"--cert-ttl", "0s"}, "--cert-ttl: 0s is not positive"},
		{[]string{"--cert-ttl", "-1h"}, "--cert-ttl: -1h0m0s is not positive"},
		{[]string{"--shutdown-deadline", "-5s"}, "--shutdown-deadline: -5s is not positive"},
		{[]string{"--root-namespace", ""}, "--root-namespace: empty"},
		{[]string{"--root-namespace", "Istio_System"}, `--root-namespace: "Istio_System" is not a namespace name (a DNS label`},
		{[]string{"--root-namespace", strings.Repeat("a", 64)}, "--root-namespace"},
		// Explicitly empty: an error, not the default (both used to start a proxy with it).
		{[]string{"--trust-domain", ""}, `--trust-domain: "" is empty`},
		{[]string{"--trust-domain="}, `--trust-domain: "" is empty`},
		{[]string{"--zds-socket", ""}, `--zds-socket: "" is empty`},
		// A bad trust domain is the flag's fault (it used to be blamed on ca.pem).
		{[]string{"--trust-domain", "a/b"}, `--trust-domain: identity: invalid trust domain "a/b" has '/'`},
		{[]string{"--trust-domain", "Cluster.local"}, `--trust-domain: identity: invalid trust domain "Cluster.local"`},
	} {
		cases = append(cases, struct {
			args []string
			want string
		}{append(append([]string{}, guarded...), tc.flags...), tc.want})
	}
	// Input files: capped at 16 MiB, read through a limit; one intent document.
	cases = append(cases, []struct {
		args []string
		want string
	}{
		{append(base, "--workloads", "/dev/zero"), "--workloads: /dev/zero: larger than 16 MiB"},
		{append(base, "--workloads", good, "--policies", "/dev/zero"), "--policies: /dev/zero: larger than 16 MiB"},
		{append(base, "--workloads", good, "--intent", "/dev/zero"), "--intent: /dev/zero: larger than 16 MiB"},
		{append(base, "--workloads", good, "--intent", twoDocs), "two.yaml: intent: document 2 (line 3)"},
	}...)
	// CA files: an error names the flag and the file (they used to name neither, or
	// --ca-cert's file for the key's fault).
	absent := filepath.Join(dir, "absent.pem")
	cases = append(cases, []struct {
		args []string
		want string
	}{
		{append(base, "--workloads", good, "--ca-cert", absent), "--ca-cert: open " + absent + ": no such file"},
		{append(base, "--workloads", good, "--ca-key", absent), "--ca-key: open " + absent + ": no such file"},
		{append(base, "--workloads", good, "--ca-key", "/dev/zero"), "--ca-key: /dev/zero: larger than 16 MiB"},
		{append(base, "--workloads", good, "--ca-cert", good), "--ca-cert " + good + ", --ca-key " + key + ": identity: CA certificate: no PEM"},
		{append(base, "--workloads", good, "--ca-key", good), "--ca-cert " + cert + ", --ca-key " + good + ": identity: CA key: no PEM"},
	}...)
	for _, tc := range cases {
		_, errOut, code := runCLI(tc.args...)
		if code != exitError || !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", tc.args[1:], code, errOut, tc.want)
		}
	}
	withStdin(t, "apiVersion: nftmesh.dev/v1alpha1\nkind: Intent\nspec: {ports: {hbone: 70000}}\n", func() {
		_, errOut, code := runCLI(append(base, "--workloads", good, "--intent", "-")...)
		if code != exitError || !strings.Contains(errOut, "--intent: stdin: spec.ports.hbone") {
			t.Errorf("--intent - with a bad intent on stdin: exit %d, stderr %q", code, errOut)
		}
	})
	out, _, code := runCLI("proxy", "--help")
	for _, flag := range []string{"--zds-socket PATH", "--ca-cert FILE", "--ca-address HOST:PORT", "--ca-token-file FILE", "--ca-root-file FILE",
		"--ca-cluster-id ID", "/var/run/secrets/tokens/istio-token", "/var/run/secrets/istio/root-cert.pem", "proxy (--ca-address HOST:PORT | --ca-cert", "--workloads FILE", "--kube ", "--kubeconfig FILE", "in-cluster", "--policies FILE", "--log-format FORMAT", "--workers N", "--intent FILE", "SIGHUP", "Exit codes",
		"--cert-ttl DURATION", "at least 10m", "at most 16 MiB", "- reads stdin", "one listener serves both", fmt.Sprintf("At most %d here", maxWorkers()), "a Kubernetes namespace name"} {
		if code != exitOK || !strings.Contains(out, flag) {
			t.Errorf("proxy --help lacks %q", flag)
		}
	}
}

// The CA flags: a CA service (--ca-address, with its token, roots and cluster ID) or a CA
// key here (--ca-cert and --ca-key), exactly one; errors name the flag, exit 2.
func TestProxyCAFlags(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if _, errOut, code := runCLI("ca", "init", "--cert", cert, "--key", key); code != exitOK {
		t.Fatalf("ca init: %s", errOut)
	}
	good := filepath.Join(dir, "workloads.yaml")
	os.WriteFile(good, []byte("workloads: []\n"), 0o644)
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("t0ken\n"), 0o600)
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	absent := filepath.Join(dir, "absent.pem")
	common := []string{"proxy", "--workloads", good, "--metrics-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"}
	remote := append(append([]string{}, common...), "--ca-address", "127.0.0.1:1", "--ca-token-file", token, "--ca-root-file", cert)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{common, "a CA is required"},
		{append(append([]string{}, remote...), "--ca-cert", cert, "--ca-key", key), "--ca-address and --ca-cert/--ca-key are alternatives"},
		{append(append([]string{}, common...), "--ca-cert", cert), "--ca-cert and --ca-key go together"},
		{append(append([]string{}, common...), "--ca-key", key), "--ca-cert and --ca-key go together"},
		{append(append([]string{}, common...), "--ca-cert", cert, "--ca-key", key, "--ca-token-file", token, "--ca-cluster-id", "x"),
			"--ca-cluster-id, --ca-token-file go with --ca-address"},
		{append(append([]string{}, common...), "--ca-cert", cert, "--ca-key", key, "--ca-root-file", cert), "--ca-root-file goes with --ca-address"},
		{append(append([]string{}, remote...), "--ca-token-file", ""), `--ca-token-file: "" is empty`},
		{append(append([]string{}, remote...), "--ca-root-file", ""), `--ca-root-file: "" is empty`},
		{append(append([]string{}, remote...), "--ca-cluster-id", ""), `--ca-cluster-id: "" is empty`},
		{append(append([]string{}, remote...), "--ca-address", "http://ca:15012"), `--ca-address: identity: CA address "http://ca:15012": the scheme must be https://`},
		{append(append([]string{}, remote...), "--ca-address", "ca.example"), `--ca-address: identity: CA address "ca.example" is not host:port`},
		{append(append([]string{}, remote...), "--ca-token-file", empty), "--ca-token-file: identity: CA token file " + empty + " is empty"},
		{append(append([]string{}, remote...), "--ca-token-file", absent), "--ca-token-file: identity: CA token: open " + absent},
		{append(append([]string{}, remote...), "--ca-root-file", absent), "--ca-root-file: identity: CA roots: open " + absent},
		{append(append([]string{}, remote...), "--ca-root-file", token), "--ca-root-file: identity: CA roots " + token + ": no PEM CERTIFICATE block"},
		{append(append([]string{}, remote...), "--cert-ttl", "5m"), "--cert-ttl: 5m0s is shorter than the minimum 10m"},
	} {
		_, errOut, code := runCLI(tc.args...)
		if code != exitError || !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", tc.args[1:], code, errOut, tc.want)
		}
	}
}
