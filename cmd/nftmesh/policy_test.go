package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const policyFixtures = "../../fixtures/policy/"

func TestPolicyExplain(t *testing.T) {
	seed := policyFixtures + "ambient-demo.yaml"
	mesh := policyFixtures + "mesh.yaml"
	httpbin := []string{"--dst-namespace", "ambient-demo", "--dst-labels", "app=httpbin", "--dst-ip", "10.244.1.5", "--dst-port", "8080", "--src-ip", "10.244.1.4"}
	args := func(file string, extra ...string) []string {
		return append([]string{"policy", "explain", "-f", file}, extra...)
	}
	cases := []struct {
		name   string
		args   []string
		code   int
		stdout []string
		stderr []string
	}{
		{"seed: sleep is allowed", args(seed, append(httpbin, "--src-principal", "cluster.local/ns/ambient-demo/sa/sleep")...), exitOK,
			[]string{"decision: allow: an ALLOW policy matched (ambient-demo/allow-sleep-to-httpbin rule 0)\n",
				"ALLOW ambient-demo/allow-sleep-to-httpbin (workload scope, selector app=httpbin): rule 0 matched -> allow",
				"from: matched by [0] principals cluster.local/ns/ambient-demo/sa/sleep"}, nil},
		{"seed: notsleep is denied", args(seed, append(httpbin, "--src-principal", "spiffe://cluster.local/ns/ambient-demo/sa/notsleep")...), exitDiff,
			[]string{"decision: deny: allow policies exist but none matched\n",
				"from: no match: principal cluster.local/ns/ambient-demo/sa/notsleep matches none of cluster.local/ns/ambient-demo/sa/sleep",
				"no ALLOW policy matched, so the connection is denied"}, nil},
		{"seed: plaintext is denied", args(seed, httpbin...), exitDiff,
			[]string{"connection: plaintext (no principal, no namespace) from 10.244.1.4 to 10.244.1.5:8080"}, nil},
		{"seed: labels given as a list", args(seed, "--dst-namespace", "ambient-demo", "--dst-labels", "version=v1,app=httpbin", "--dst-ip", "10.244.1.5", "--dst-port", "8080", "--src-principal", "cluster.local/ns/ambient-demo/sa/sleep"), exitOK,
			[]string{"workload: namespace ambient-demo, labels app=httpbin,version=v1"}, nil},
		{"seed: another workload is not selected", args(seed, "--dst-namespace", "ambient-demo", "--dst-labels", "app=sleep", "--dst-ip", "10.244.1.6", "--dst-port", "80", "--src-principal", "cluster.local/ns/ambient-demo/sa/notsleep"), exitOK,
			[]string{"decision: allow: no ALLOW policy applies to the workload\n", "not applicable: ALLOW ambient-demo/allow-sleep-to-httpbin: selector app=httpbin does not match"}, nil},
		{"mesh: global DENY of plaintext", args(mesh, "--dst-namespace", "open", "--dst-ip", "10.4.0.1", "--dst-port", "80"), exitDiff,
			[]string{"decision: deny: a DENY policy matched (istio-system/deny-plaintext rule 0)\n", "ALLOW policies (2 apply) are not consulted"}, nil},
		{"mesh: another root namespace makes it namespace-wide", args(mesh, "--dst-namespace", "open", "--dst-ip", "10.4.0.1", "--dst-port", "80", "--root-namespace", "mesh-root"), exitOK,
			[]string{"decision: allow: an ALLOW policy matched (open/allow-all rule 0)\n", "(root namespace mesh-root)"}, nil},
		{"L7: the DENY rule's port holds", args(policyFixtures+"l7-mixed.yaml", "--dst-namespace", "shop", "--dst-labels", "app=catalog", "--dst-ip", "10.0.0.1", "--dst-port", "9090", "--src-principal", "cluster.local/ns/frontend/sa/ui"), exitDiff,
			[]string{"decision: deny: a DENY policy matched (shop/deny-admin rule 0)\n", "ALLOW policies (1 apply) are not consulted: a DENY policy matched"},
			[]string{"nftmesh policy explain: warning: shop/deny-admin: rule 0: the L7 fields of to[0].operation (paths) are removed"}},
		{"L7: only a dropped ALLOW rule would allow", args(policyFixtures+"l7-mixed.yaml", "--dst-namespace", "shop", "--dst-labels", "app=catalog", "--dst-ip", "10.0.0.1", "--dst-port", "8080", "--src-principal", "cluster.local/ns/shop/sa/sleep"), exitDiff,
			[]string{"decision: deny: allow policies exist but none matched\n", "rule 1: dropped at L4 (uses to[0].operation.methods, to[0].operation.paths), never matches",
				"ignored: shop/waypoint-only: targetRef binds it to a waypoint or gateway"},
			[]string{"nftmesh policy explain: warning: shop/allow-get-from-sleep: rule 1: dropped: it uses to[0].operation.methods"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := runCLI(tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\n%s%s", code, tc.code, out, errOut)
			}
			for _, w := range tc.stdout {
				if !strings.Contains(out, w) {
					t.Errorf("stdout lacks %q:\n%s", w, out)
				}
			}
			for _, w := range tc.stderr {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr lacks %q:\n%s", w, errOut)
				}
			}
			if !strings.HasPrefix(out, "decision: ") {
				t.Errorf("the decision is not the first line:\n%s", out)
			}
		})
	}
}

func TestPolicyExplainStdin(t *testing.T) {
	data, err := os.ReadFile(policyFixtures + "ambient-demo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer func(r any) { policyStdin = r.(*os.File) }(policyStdin)
	policyStdin = strings.NewReader(string(data))
	out, errOut, code := runCLI("policy", "explain", "-f", "-", "--dst-namespace", "ambient-demo", "--dst-labels", "app=httpbin", "--dst-ip", "10.0.0.1", "--dst-port", "80", "--src-principal", "cluster.local/ns/ambient-demo/sa/sleep")
	if code != exitOK || !strings.Contains(out, "allow-sleep-to-httpbin rule 0") {
		t.Errorf("exit %d\n%s%s", code, out, errOut)
	}
}

func TestPolicyErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	badCIDR := write("bad.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/33]}\n")
	typo := write("typo.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ok, namespace: x}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: x}\nspec:\n  rules:\n  - from:\n    - source: {principal: [a]}\n")
	notAP := write("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm, namespace: x}\n")
	notYAML := write("broken.yaml", "spec: [\n")
	dst := []string{"--dst-namespace", "x", "--dst-ip", "10.0.0.1", "--dst-port", "80"}
	cases := []struct {
		args []string
		want string
	}{
		{append([]string{"policy", "explain", "-f", badCIDR}, dst...), badCIDR + `: document 1 (line 1): AuthorizationPolicy x/bad: spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR "10.0.0.0/33"`},
		{append([]string{"policy", "explain", "-f", typo}, dst...), typo + ": document 2 (line 5): AuthorizationPolicy x/typo: spec.rules[0].from[0].source.principal: unknown field"},
		{append([]string{"policy", "explain", "-f", notAP}, dst...), `ConfigMap x/cm: kind: "ConfigMap" is not supported (want AuthorizationPolicy)`},
		{append([]string{"policy", "explain", "-f", notYAML}, dst...), notYAML + ": document 1 (line 1):"},
		{append([]string{"policy", "explain", "-f", filepath.Join(dir, "missing.yaml")}, dst...), "no such file"},
		{append([]string{"policy", "explain"}, dst...), "-f is required"},
		{[]string{"policy", "explain", "-f", badCIDR}, "--dst-namespace is required"},
		{[]string{"policy", "explain", "-f", badCIDR, "--dst-namespace", "x", "--dst-ip", "nope", "--dst-port", "80"}, `--dst-ip: "nope" is not an IP address`},
		{[]string{"policy", "explain", "-f", badCIDR, "--dst-namespace", "x", "--dst-ip", "10.0.0.1", "--dst-port", "70000"}, `--dst-port: "70000" is not a port`},
		{[]string{"policy", "explain", "-f", badCIDR, "--dst-namespace", "x", "--dst-ip", "10.0.0.1", "--dst-port", "80", "--src-ip", "x"}, `--src-ip: "x" is not an IP address`},
		// --src-principal given but not an identity is an error, not plaintext.
		{append([]string{"policy", "explain", "-f", badCIDR, "--src-principal", "spiffe://"}, dst...), `--src-principal: "spiffe://": invalid SPIFFE ID`},
		{append([]string{"policy", "explain", "-f", badCIDR, "--src-principal", ""}, dst...), `--src-principal: "" is empty; leave the flag out for a plaintext connection`},
		{append([]string{"policy", "explain", "-f", badCIDR, "--src-principal=spiffe://cluster.local/ns/x"}, dst...), `--src-principal: "spiffe://cluster.local/ns/x": invalid SPIFFE ID`},
		{append([]string{"policy", "explain", "-f", badCIDR, "--src-principal", "cluster.local/ns/x/sa/y/z"}, dst...), `--src-principal: "cluster.local/ns/x/sa/y/z"`},
		{[]string{"policy", "explain", "--dst-labels", "novalue"}, "not key=value"},
		{[]string{"policy", "explain", "stray"}, `unexpected argument "stray"`},
		{[]string{"policy", "lint", "-f", badCIDR}, "AuthorizationPolicy x/bad: spec.rules[0].from[0].source.ipBlocks[0]"},
		{[]string{"policy", "lint"}, "-f is required"},
		{[]string{"policy", "frobnicate"}, `unknown subcommand "frobnicate"`},
		{[]string{"policy"}, "Subcommands:"},
	}
	for _, tc := range cases {
		out, errOut, code := runCLI(tc.args...)
		if code != exitError || !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, stdout %q; want exit 2 and %q", tc.args, code, errOut, out, tc.want)
		}
	}
}

func TestPolicyLint(t *testing.T) {
	out, errOut, code := runCLI("policy", "lint", "-f", policyFixtures+"l7-mixed.yaml")
	if code != exitDiff {
		t.Errorf("exit %d, want 1 (warnings)\n%s", code, errOut)
	}
	for _, w := range []string{
		"shop/allow-get-from-sleep: ALLOW, workload scope, selector app=catalog\n  rule 0: all of\n    from: namespaces frontend\n    to: destination ports 8080\n",
		"  rule 1: dropped (uses L7 fields: to[0].operation.methods, to[0].operation.paths)\n",
		"  warning: rule 1: dropped: it uses to[0].operation.methods, to[0].operation.paths, which the node proxy cannot enforce at L4",
		"shop/deny-admin: DENY, namespace scope, no selector\n  rule 0: all of\n    to: destination ports 9090\n",
		"    from: nothing left at L4: never matches\n",
		"  warning: rule 1: its from clause has nothing left that can match at L4, so the rule never matches and has no effect\n",
		"shop/waypoint-only: ALLOW, namespace scope, no selector: IGNORED\n",
		"\n3 policies: 0 without warnings, 2 with warnings, 1 ignored\n",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("lint output lacks %q:\n%s", w, out)
		}
	}
	out, errOut, code = runCLI("policy", "lint", "-f", policyFixtures+"ambient-demo.yaml", "-f", policyFixtures+"mesh.yaml")
	if code != exitOK {
		t.Errorf("exit %d, want 0\n%s", code, errOut)
	}
	for _, w := range []string{
		"ambient-demo/allow-sleep-to-httpbin: ALLOW, workload scope, selector app=httpbin\n  rule 0: all of\n    from: principals cluster.local/ns/ambient-demo/sa/sleep\n",
		"istio-system/deny-plaintext: DENY, global scope, root namespace without selector\n",
		"locked/allow-nothing: ALLOW, namespace scope, no selector\n  no rules: matches nothing, so every connection to the workloads it applies to is denied\n",
		"5 policies: 5 without warnings, 0 with warnings, 0 ignored\n",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("lint output lacks %q:\n%s", w, out)
		}
	}
}

func TestPolicyHelp(t *testing.T) {
	for _, args := range [][]string{{"policy", "--help"}, {"policy", "help"}, {"policy", "-h"}} {
		out, _, code := runCLI(args...)
		if code != exitOK || !strings.Contains(out, "Subcommands:\n  explain") || !strings.Contains(out, "\n  lint ") || !strings.Contains(out, "Exit codes") {
			t.Errorf("%v: exit %d\n%s", args, code, out)
		}
	}
	out, _, code := runCLI("policy", "explain", "--help")
	for _, w := range []string{"Usage: nftmesh policy explain -f policies.yaml", "-f FILE", "--dst-namespace NAMESPACE", "--dst-labels KEY=VALUE", "--dst-ip IP", "--dst-port PORT", "--src-principal ID", "--src-ip IP", "--root-namespace NAMESPACE", "Exit codes: 0 allowed; 1 denied; 2"} {
		if code != exitOK || !strings.Contains(out, w) {
			t.Errorf("policy explain --help: exit %d, lacks %q\n%s", code, w, out)
		}
	}
	out, _, code = runCLI("policy", "lint", "--help")
	for _, w := range []string{"Usage: nftmesh policy lint -f policies.yaml", "-f FILE", "Exit codes: 0 every policy is enforced as written; 1 at least one warning"} {
		if code != exitOK || !strings.Contains(out, w) {
			t.Errorf("policy lint --help: exit %d, lacks %q\n%s", code, w, out)
		}
	}
	if out, _, _ := runCLI("--help"); !strings.Contains(out, "  policy    explain and lint L4 authorization policies\n") {
		t.Errorf("nftmesh --help does not list policy:\n%s", out)
	}
}

// lint warns about a namespace/name given twice (the later replaces the earlier), port
// "0", and IPv4-mapped IPv6 blocks, which never match.
func TestPolicyLintWarnings(t *testing.T) {
	seed := policyFixtures + "ambient-demo.yaml"
	out, errOut, code := runCLI("policy", "lint", "-f", seed, "-f", seed)
	if code != exitDiff {
		t.Errorf("the same file twice: exit %d, want 1\n%s%s", code, out, errOut)
	}
	for _, w := range []string{
		"  warning: ambient-demo/allow-sleep-to-httpbin is defined again later (" + seed + " object 1 (-f #2) replaces this one, " + seed + " object 1 (-f #1)), so this one is not enforced\n",
		"  warning: ambient-demo/allow-sleep-to-httpbin is defined 2 times (here, " + seed + " object 1 (-f #2)); this last one replaces the others\n",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("lint output lacks %q:\n%s", w, out)
		}
	}
	f := filepath.Join(t.TempDir(), "odd.yaml")
	if err := os.WriteFile(f, []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: odd, namespace: app}
spec:
  action: DENY
  rules:
  - from:
    - source: {ipBlocks: ["::ffff:10.0.0.0/104"]}
    to:
    - operation: {ports: ["0"]}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	out, errOut, code = runCLI("policy", "lint", "-f", f)
	if code != exitDiff {
		t.Errorf("exit %d, want 1\n%s%s", code, out, errOut)
	}
	for _, w := range []string{
		`  warning: rule 0: from[0].source.ipBlocks[0]: "::ffff:10.0.0.0/104" is an IPv4-mapped IPv6 address, but IPv4 connections are compared in their IPv4 form, so it never matches a connection; write "10.0.0.0/8"`,
		`  warning: rule 0: to[0].operation.ports[0]: port "0": no connection has destination port 0, so it never matches a connection`,
	} {
		if !strings.Contains(out, w) {
			t.Errorf("lint output lacks %q:\n%s", w, out)
		}
	}
}
