package main

import (
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
	base := []string{"proxy", "--ca-cert", cert, "--ca-key", key, "--metrics-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"proxy"}, "--ca-cert, --ca-key and --workloads are required"},
		{append(base, "--workloads", good, "--log-format", "xml"), `--log-format: "xml"`},
		{append(base, "--workloads", bad), "bad.yaml"},
		{append(base, "--workloads", bad), "namespace are required"},
		{append(base, "--workloads", good, "--policies", badPolicy), "principal"},
		{[]string{"proxy", "--ca-cert", good, "--ca-key", key, "--workloads", good}, "workloads.yaml"},
		{append(base, "--workloads", good, "--workers", "-1"), "--workers: -1 is negative"},
		{append(base, "--workloads", good, "--intent", badIntent), "spec.ports.hbone"},
		{append(base, "--workloads", good, "--intent", filepath.Join(dir, "absent.yaml")), "--intent: open"},
		{append(base, "--workloads", good, "--shutdown-deadline", "0s"), "--shutdown-deadline: 0s is not positive"},
	}
	for _, tc := range cases {
		_, errOut, code := runCLI(tc.args...)
		if code != exitError || !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", tc.args[1:], code, errOut, tc.want)
		}
	}
	out, _, code := runCLI("proxy", "--help")
	for _, flag := range []string{"--zds-socket PATH", "--ca-cert FILE", "--workloads FILE", "--policies FILE", "--log-format FORMAT", "--workers N", "--intent FILE", "SIGHUP", "Exit codes"} {
		if code != exitOK || !strings.Contains(out, flag) {
			t.Errorf("proxy --help lacks %q", flag)
		}
	}
}
