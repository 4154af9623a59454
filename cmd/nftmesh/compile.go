package main

import (
	"flag"
	"fmt"
	"io"
	"slices"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/input"
	"github.com/nftmesh/nftmesh/internal/textdiff"
	"github.com/nftmesh/nftmesh/ruleset"
)

// intentFlags are the flags every command that compiles an intent takes.
type intentFlags struct {
	file        string
	target      string
	annotations keyValues
}

func (f *intentFlags) register(fs *flag.FlagSet) {
	f.annotations = keyValues{}
	fs.StringVar(&f.file, "f", "", "intent `FILE` (YAML, kind: Intent, one document, at most 16 MiB; - reads stdin);\nwithout it, the built-in default intent")
	fs.StringVar(&f.target, "target", string(compiler.TargetPod), "`TARGET` ruleset: pod (in-pod capture) or host (node probe SNAT)")
	fs.Var(f.annotations, "pod-annotation", "a pod annotation `KEY=VALUE` applied over the intent's pod section; repeatable\n(ambient.istio.io/bypass-inbound-capture, ambient.istio.io/dns-capture, istio.io/reroute-virtual-interfaces)")
}

// loadIntent loads the intent file (stdin for "-"), or the built-in default intent.
func (f *intentFlags) loadIntent() (compiler.Intent, error) {
	in := compiler.DefaultIntent()
	if f.file == "" {
		return in, nil
	}
	data, err := input.ReadFileOr(f.file, stdin)
	if err != nil {
		return in, err
	}
	if in, err = compiler.Parse(data); err != nil {
		return in, fmt.Errorf("%s: %w", f.source(), err)
	}
	return in, nil
}

// source names where the intent came from, for errors.
func (f *intentFlags) source() string {
	switch f.file {
	case "":
		return "built-in default intent"
	case input.Stdin:
		return "stdin"
	}
	return f.file
}

func (f *intentFlags) warnUnknownAnnotations(stderr io.Writer) {
	for k := range f.annotations {
		if !slices.Contains(compiler.KnownAnnotations, k) {
			fmt.Fprintf(stderr, "nftmesh: warning: --pod-annotation %s is not an annotation nftmesh reads; ignored\n", k)
		}
	}
}

// state loads the intent and compiles the --target state: for a pod through
// compiler.PodState, as the agent does. Flags are checked before the intent is read, and
// the annotations whatever the target, so that their errors name them.
func (f *intentFlags) state(stderr io.Writer) (ruleset.Desired, error) {
	target := compiler.Target(f.target)
	if target != compiler.TargetPod && target != compiler.TargetHost {
		return ruleset.Desired{}, fmt.Errorf("--target: %q is not %q or %q", f.target, compiler.TargetPod, compiler.TargetHost)
	}
	f.warnUnknownAnnotations(stderr)
	if _, err := compiler.ApplyAnnotations(compiler.PodOverrides{}, f.annotations); err != nil {
		return ruleset.Desired{}, fmt.Errorf("--pod-annotation: %w", err)
	}
	in, err := f.loadIntent()
	if err != nil {
		return ruleset.Desired{}, err
	}
	var d ruleset.Desired
	if target == compiler.TargetHost {
		d, err = compiler.HostState(in)
	} else {
		d, err = compiler.PodState(in, f.annotations)
	}
	if err != nil {
		return ruleset.Desired{}, fmt.Errorf("%s: %w", f.source(), err)
	}
	return d, nil
}

// compile is state's table.
func (f *intentFlags) compile(stderr io.Writer) (*ruleset.Table, error) {
	d, err := f.state(stderr)
	return d.Table, err
}

func runCompile(args []string, stdout, stderr io.Writer) int {
	var f intentFlags
	fs := newFlagSet("compile", "compile [-f intent.yaml] [--target pod|host] [--pod-annotation k=v ...]",
		"Compile an intent and print the ruleset as canonical nft text on stdout: what nftmesh\n"+
			"would apply, readable, diffable, and loadable with `nft -f`. Nothing touches a kernel.",
		"0 printed; 2 bad flags or an invalid intent (the error names the field and value).", stdout)
	f.register(fs)
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	t, err := f.compile(stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh compile: %v\n", err)
		return exitError
	}
	fmt.Fprint(stdout, t.Render())
	return exitOK
}

func runDiff(args []string, stdout, stderr io.Writer) int {
	var f netnsFlags
	var golden string
	fs := newFlagSet("diff", "diff [-f intent.yaml] --golden file.nft [--target pod|host] [--pod-annotation k=v ...]\n"+
		"       nftmesh diff --netns PATH|NAME [-f intent.yaml] [--pod-annotation k=v ...] | diff --host [--netns PATH|NAME] [-f intent.yaml]",
		"Compile an intent and compare it with a golden ruleset file (--golden), for CI pipelines and\n"+
			"code review, or with nftmesh's live table in a namespace (--netns, --host), to find drift.\n"+
			"When they differ, print a unified diff (golden or live first) on stdout.",
		"0 equal; 1 different (the diff is printed); 2 bad flags, unreadable file, invalid intent\nor unreadable namespace.", stdout)
	f.intentFlags.register(fs)
	fs.StringVar(&f.netns, "netns", "", "compare with the live table in this namespace (`PATH` or `ip netns` name)")
	fs.BoolVar(&f.host, "host", false, "the node ruleset (same as --target host); with no --netns, the node's own namespace")
	fs.StringVar(&golden, "golden", "", "the golden ruleset `FILE` to compare with")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	live := f.netns != "" || f.host && golden == ""
	switch {
	case live && golden != "":
		fmt.Fprintln(stderr, "nftmesh diff: --golden and --netns exclude each other (see --help)")
		return exitError
	case live:
		return diffLive(&f, stdout, stderr)
	case golden == "":
		fmt.Fprintln(stderr, "nftmesh diff: --golden or --netns is required (see --help)")
		return exitError
	}
	if f.host {
		f.target = string(compiler.TargetHost)
	}
	want, err := input.ReadFile(golden)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	t, err := f.compile(stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	name := f.source()
	if f.file == "" {
		name = "default intent"
	}
	d := textdiff.Unified(golden, name+" ("+f.target+")", string(want), t.Render())
	if d == "" {
		return exitOK
	}
	fmt.Fprint(stdout, d)
	return exitDiff
}
