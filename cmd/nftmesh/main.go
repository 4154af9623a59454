// Command nftmesh is the single binary of the nftmesh dataplane. Each subcommand is a
// thin layer over a package: it reads files and flags, calls the package, and prints.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
)

// Exit codes shared by every subcommand.
const (
	exitOK    = 0
	exitDiff  = 1 // diff: the two sides differ
	exitError = 2 // bad flags, bad input, or a failure
)

// stdin is what an input flag given "-" reads; a variable so tests can feed it.
var stdin io.Reader = os.Stdin

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"compile", "compile an intent and print the nftables ruleset", runCompile},
		{"diff", "compare the compiled ruleset with a golden file or a live namespace", runDiff},
		{"apply", "apply the ruleset to a pod's (or the node's) network namespace", runApply},
		{"show", "print nftmesh's live table in a network namespace", runShow},
		{"delete", "remove nftmesh's table and routing from a network namespace", runDelete},
		{"policy", "explain and lint L4 authorization policies", runPolicy},
		{"ca", "run the mesh CA service; make a root CA for demos and tests", runCA},
		{"proxy", "run the node proxy (HBONE, L4 authorization, metrics)", runProxy},
		{"agent", "run the node agent (enrolls this node's pods; the CNI plugin; ZDS)", runAgent},
		{"version", "print the version", runVersion},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitError
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return exitOK
	case "-version", "--version":
		return runVersion(nil, stdout, stderr)
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "nftmesh: unknown command %q\n\n", args[0])
	usage(stderr)
	return exitError
}

func usage(w io.Writer) {
	fmt.Fprint(w, `nftmesh: the nftables-native node dataplane for ambient service meshes.

Usage: nftmesh <command> [flags]

Commands:
`)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, `
Run 'nftmesh <command> --help' for a command's flags.

Exit codes: 0 success; 1 a negative answer ('diff': a difference, 'show': no table,
'policy explain': denied, 'policy lint': warnings); 2 bad flags, bad input, or failure.
`)
}

// newFlagSet returns a flag set whose --help prints the description, the flags and the
// exit codes to stdout.
func newFlagSet(name, synopsis, description, exitCodes string, stdout io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(stdout, "Usage: nftmesh %s\n\n%s\n", synopsis, description)
		printFlags(stdout, fs)
		fmt.Fprintf(stdout, "\nExit codes: %s\n", exitCodes)
	}
	return fs
}

// printFlags lists flags as they are usually typed: -f for one letter, --name otherwise.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	first := true
	fs.VisitAll(func(f *flag.Flag) {
		if first {
			fmt.Fprint(w, "\nFlags:\n")
			first = false
		}
		dash := "--"
		if len(f.Name) == 1 {
			dash = "-"
		}
		arg, usage := flag.UnquoteUsage(f)
		fmt.Fprintf(w, "  %s%s %s\n", dash, f.Name, arg)
		fmt.Fprintf(w, "      %s", strings.ReplaceAll(usage, "\n", "\n      "))
		if f.DefValue != "" && f.DefValue != "false" {
			fmt.Fprintf(w, " (default %q)", f.DefValue)
		}
		fmt.Fprintln(w)
	})
}

// parseFlags parses args; it returns done=true with the exit code when the command
// must stop (help asked for, or bad flags).
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) (done bool, code int) {
	// The flag package prints usage on every error; print it only for --help, and the
	// error alone to stderr.
	usage := fs.Usage
	fs.Usage = func() {}
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.Usage = usage
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.Usage()
		return true, exitOK
	case err != nil:
		fmt.Fprintf(stderr, "nftmesh %s: %v (see --help)\n", fs.Name(), err)
		return true, exitError
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "nftmesh %s: unexpected argument %q (see --help)\n", fs.Name(), fs.Arg(0))
		return true, exitError
	}
	return false, exitOK
}

func runVersion(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("version", "version", "Print the nftmesh version and the Go version it was built with.", "0 always.", stdout)
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	v := version
	if info, ok := debug.ReadBuildInfo(); ok && v == "dev" && info.Main.Version != "" && info.Main.Version != "(devel)" {
		v = info.Main.Version
	}
	fmt.Fprintf(stdout, "nftmesh %s %s %s/%s\n", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return exitOK
}

// keyValues is a repeatable k=v flag.
type keyValues map[string]string

func (kv keyValues) String() string {
	keys := make([]string, 0, len(kv))
	for k := range kv {
		keys = append(keys, k+"="+kv[k])
	}
	sort.Strings(keys)
	return strings.Join(keys, ",")
}

func (kv keyValues) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not key=value", s)
	}
	kv[k] = v
	return nil
}
