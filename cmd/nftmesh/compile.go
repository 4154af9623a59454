package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/nftmesh/nftmesh/compiler"
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
	fs.StringVar(&f.file, "f", "", "intent `FILE` (YAML, kind: Intent); without it, the built-in default intent")
	fs.StringVar(&f.target, "target", string(compiler.TargetPod), "`TARGET` ruleset: pod (in-pod capture) or host (node probe SNAT)")
	fs.Var(f.annotations, "pod-annotation", "a pod annotation `KEY=VALUE` applied over the intent's pod section; repeatable\n(ambient.istio.io/bypass-inbound-capture, ambient.istio.io/dns-capture, istio.io/reroute-virtual-interfaces)")
}

// compile loads the intent, applies the annotations and compiles. Warnings go to stderr.
func (f *intentFlags) compile(stderr io.Writer) (*ruleset.Table, error) {
	in := compiler.DefaultIntent()
	if f.file != "" {
		data, err := os.ReadFile(f.file)
		if err != nil {
			return nil, err
		}
		if in, err = compiler.Parse(data); err != nil {
			return nil, fmt.Errorf("%s: %w", f.file, err)
		}
	}
	for k := range f.annotations {
		if !slices.Contains(compiler.KnownAnnotations, k) {
			fmt.Fprintf(stderr, "nftmesh: warning: --pod-annotation %s is not an annotation nftmesh reads; ignored\n", k)
		}
	}
	pod, err := compiler.ApplyAnnotations(in.Spec.Pod, f.annotations)
	if err != nil {
		return nil, fmt.Errorf("--pod-annotation: %w", err)
	}
	in.Spec.Pod = pod
	source := f.file
	if source == "" {
		source = "built-in default intent"
	}
	t, err := compiler.Compile(in, compiler.Target(f.target))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	return t, nil
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
	var f intentFlags
	var golden string
	fs := newFlagSet("diff", "diff [-f intent.yaml] --golden file.nft [--target pod|host] [--pod-annotation k=v ...]",
		"Compile an intent and compare it with a golden ruleset file. When they differ, print a\n"+
			"unified diff (golden first) on stdout. For CI pipelines and code review.",
		"0 equal; 1 different (the diff is printed); 2 bad flags, unreadable file or invalid intent.", stdout)
	f.register(fs)
	fs.StringVar(&golden, "golden", "", "the golden ruleset `FILE` to compare with (required)")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	if golden == "" {
		fmt.Fprintln(stderr, "nftmesh diff: --golden is required (see --help)")
		return exitError
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	t, err := f.compile(stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	name := f.file
	if name == "" {
		name = "default intent"
	}
	d := textdiff.Unified(golden, name+" ("+f.target+")", string(want), t.Render())
	if d == "" {
		return exitOK
	}
	fmt.Fprint(stdout, d)
	return exitDiff
}
