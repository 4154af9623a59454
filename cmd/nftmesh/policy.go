package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/nftmesh/nftmesh/internal/input"
	"github.com/nftmesh/nftmesh/policy"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// policyStdin is what `-f -` reads; a variable so tests can feed it.
var policyStdin io.Reader = os.Stdin

func policyCommands() []command {
	return []command{
		{"explain", "decide one connection; print allow or deny, the reason and the matching path", runPolicyExplain},
		{"lint", "print what each policy becomes at L4, dropped L7 rules and warnings included", runPolicyLint},
	}
}

func policyUsage(w io.Writer) {
	fmt.Fprint(w, `Usage: nftmesh policy <subcommand> [flags]

L4 authorization as the node proxy enforces it: Istio AuthorizationPolicy objects
(security.istio.io/v1 and v1beta1) translated to what can be checked on a connection.
DENY policies are evaluated first; with no ALLOW policy for the workload a connection is
allowed; otherwise an ALLOW policy must match. L7 fields cannot be enforced at L4: an
ALLOW rule using them is dropped (fail closed), a DENY rule keeps its L4 part.

Subcommands:
`)
	for _, c := range policyCommands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, `
Run 'nftmesh policy <subcommand> --help' for its flags.

Exit codes: explain: 0 allow, 1 deny, 2 error; lint: 0 enforced as written, 1 warnings, 2 error.
`)
}

func runPolicy(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		policyUsage(stderr)
		return exitError
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		policyUsage(stdout)
		return exitOK
	}
	for _, c := range policyCommands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "nftmesh policy: unknown subcommand %q\n\n", args[0])
	policyUsage(stderr)
	return exitError
}

// fileList is a repeatable -f.
type fileList []string

func (f *fileList) String() string     { return strings.Join(*f, ",") }
func (f *fileList) Set(s string) error { *f = append(*f, s); return nil }

// labelFlag is a repeatable --dst-labels that also takes k=v,k=v (label values cannot
// hold commas).
type labelFlag struct{ kv keyValues }

func (l labelFlag) String() string { return l.kv.String() }
func (l labelFlag) Set(s string) error {
	for _, p := range strings.Split(s, ",") {
		if err := l.kv.Set(p); err != nil {
			return err
		}
	}
	return nil
}

type policyFlags struct {
	files fileList
	root  string
}

func (f *policyFlags) register(fs *flag.FlagSet) {
	fs.Var(&f.files, "f", "AuthorizationPolicy `FILE` (YAML or JSON, several documents or a List; - reads stdin); repeatable, required")
	fs.StringVar(&f.root, "root-namespace", policy.DefaultRootNamespace, "Istio's root `NAMESPACE`: its policies without selector apply mesh-wide")
}

// load parses every file. Errors come one per line, each naming the file, the
// document, the object and the field.
func (f *policyFlags) load() ([]*policy.Policy, error) {
	ps, _, err := f.loadWithOrigins()
	return ps, err
}

// loadWithOrigins is load that also says where each policy came from: "FILE object N".
func (f *policyFlags) loadWithOrigins() ([]*policy.Policy, []string, error) {
	if len(f.files) == 0 {
		return nil, nil, errors.New("-f is required (see --help)")
	}
	var all []*policy.Policy
	var origins []string
	var errs []error
	for fi, name := range f.files {
		var data []byte
		var err error
		data, err = input.ReadFileOr(name, policyStdin)
		if name == "-" {
			name = "stdin"
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ps, err := policy.Parse(data, policy.Options{RootNamespace: f.root})
		if err != nil {
			for _, line := range strings.Split(err.Error(), "\n") {
				errs = append(errs, fmt.Errorf("%s: %s", name, line))
			}
			continue
		}
		for i := range ps {
			o := fmt.Sprintf("%s object %d", name, i+1)
			if slices.Index(f.files, f.files[fi]) != fi || slices.Index(f.files[fi+1:], f.files[fi]) >= 0 {
				o += fmt.Sprintf(" (-f #%d)", fi+1) // the same file given twice
			}
			origins = append(origins, o)
		}
		all = append(all, ps...)
	}
	return all, origins, errors.Join(errs...)
}

func printErrors(stderr io.Writer, cmd string, err error) {
	for _, line := range strings.Split(err.Error(), "\n") {
		fmt.Fprintf(stderr, "nftmesh %s: %s\n", cmd, line)
	}
}

func runPolicyExplain(args []string, stdout, stderr io.Writer) int {
	var pf policyFlags
	labels := labelFlag{keyValues{}}
	var dstNS, dstIP, dstPort, srcPrincipal, srcIP string
	fs := newFlagSet("policy explain",
		"policy explain -f policies.yaml --dst-namespace NS [--dst-labels k=v,...] --dst-ip IP --dst-port PORT [--src-principal ID] [--src-ip IP]",
		"Decide one inbound connection against the policies in the files, as the node proxy\n"+
			"would, and print the decision, its reason (which policy and rule matched, or why\n"+
			"none did) and the path: every applicable policy, rule, clause and match, with why\n"+
			"each failed. Without --src-principal the connection is plaintext (no principal, no\n"+
			"namespace); given, it must be a SPIFFE ID. Without --src-ip its source address\n"+
			"matches no ipBlocks.",
		"0 allowed; 1 denied; 2 bad flags, unreadable file or invalid policy (the error names\n"+
			"the object and the field).", stdout)
	pf.register(fs)
	fs.StringVar(&dstNS, "dst-namespace", "", "the destination workload's `NAMESPACE` (required)")
	fs.Var(labels, "dst-labels", "the destination workload's labels, `KEY=VALUE[,KEY=VALUE...]`; repeatable")
	fs.StringVar(&dstIP, "dst-ip", "", "the destination `IP` (required)")
	fs.StringVar(&dstPort, "dst-port", "", "the destination `PORT` (required)")
	fs.StringVar(&srcPrincipal, "src-principal", "", "the source's SPIFFE `ID`, e.g. cluster.local/ns/x/sa/y (spiffe:// optional)")
	fs.StringVar(&srcIP, "src-ip", "", "the source `IP`")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	const cmd = "policy explain"
	conn := policy.Connection{SrcPrincipal: srcPrincipal}
	var errs []error
	// Plaintext is the flag left out, never a value that happens to carry no identity.
	principalSet := false
	fs.Visit(func(f *flag.Flag) { principalSet = principalSet || f.Name == "src-principal" })
	if principalSet {
		if err := checkPrincipal(srcPrincipal); err != nil {
			errs = append(errs, err)
		}
	}
	if dstNS == "" {
		errs = append(errs, errors.New("--dst-namespace is required (see --help)"))
	}
	var err error
	if conn.DstIP, err = netip.ParseAddr(dstIP); err != nil {
		errs = append(errs, fmt.Errorf("--dst-ip: %q is not an IP address (see --help)", dstIP))
	}
	if p, err := strconv.ParseUint(dstPort, 10, 16); err != nil {
		errs = append(errs, fmt.Errorf("--dst-port: %q is not a port, 0-65535 (see --help)", dstPort))
	} else {
		conn.DstPort = uint16(p)
	}
	if srcIP != "" {
		if conn.SrcIP, err = netip.ParseAddr(srcIP); err != nil {
			errs = append(errs, fmt.Errorf("--src-ip: %q is not an IP address (see --help)", srcIP))
		}
	}
	if err := errors.Join(errs...); err != nil {
		printErrors(stderr, cmd, err)
		return exitError
	}
	ps, err := pf.load()
	if err != nil {
		printErrors(stderr, cmd, err)
		return exitError
	}
	store := policy.NewStore(policy.Options{RootNamespace: pf.root})
	if err := store.Put(ps...); err != nil {
		printErrors(stderr, cmd, err)
		return exitError
	}
	w := policy.Workload{Namespace: dstNS, Labels: labels.kv}
	e := store.Snapshot().Explain(conn, w)
	fmt.Fprint(stdout, e.Format())
	// Warnings of the policies that took part, where the reader will look for them.
	for _, t := range append(e.Deny, e.Allow...) {
		for _, wn := range t.Policy.Warnings {
			fmt.Fprintf(stderr, "nftmesh %s: warning: %s\n", cmd, wn)
		}
	}
	if e.Decision.Allow {
		return exitOK
	}
	return exitDiff
}

// checkPrincipal accepts a SPIFFE ID of a service account, with or without its
// spiffe:// scheme; the error names the flag and the value.
func checkPrincipal(v string) error {
	if v == "" {
		return errors.New(`--src-principal: "" is empty; leave the flag out for a plaintext connection (see --help)`)
	}
	if _, err := identity.ParseID("spiffe://" + strings.TrimPrefix(v, "spiffe://")); err != nil {
		return fmt.Errorf("--src-principal: %q: %v; spiffe:// is optional, and a plaintext connection leaves the flag out", v, strings.TrimPrefix(err.Error(), "identity: "))
	}
	return nil
}

func runPolicyLint(args []string, stdout, stderr io.Writer) int {
	var pf policyFlags
	fs := newFlagSet("policy lint", "policy lint -f policies.yaml [--root-namespace NS]",
		"Print what each AuthorizationPolicy becomes at L4: its scope and action, each rule's\n"+
			"clauses and matches, the rules dropped for L7 fields, and a warning wherever the node\n"+
			"proxy enforces something other than what was written (or ignores the policy).",
		"0 every policy is enforced as written; 1 at least one warning (see each policy);\n"+
			"2 bad flags, unreadable file or invalid policy (the error names the object and the field).", stdout)
	pf.register(fs)
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	ps, origins, err := pf.loadWithOrigins()
	if err != nil {
		printErrors(stderr, "policy lint", err)
		return exitError
	}
	policy.WarnDuplicates(ps, origins)
	warned, ignored := 0, 0
	for i, p := range ps {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		fmt.Fprint(stdout, p.Format())
		switch {
		case p.Ignored != "":
			ignored++
		case len(p.Warnings) > 0:
			warned++
		}
	}
	fmt.Fprintf(stdout, "\n%d policies: %d without warnings, %d with warnings, %d ignored\n",
		len(ps), len(ps)-warned-ignored, warned, ignored)
	if warned+ignored > 0 {
		return exitDiff
	}
	return exitOK
}
