package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/dataplane"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/ruleset"
)

// The commands that act on a live network namespace: apply, show, delete, and diff with
// --netns.

// selfNetNS is the namespace nftmesh runs in: the node's, for --host without --netns.
const selfNetNS = "/proc/self/ns/net"

type netnsFlags struct {
	intentFlags
	netns string
	host  bool
}

func (f *netnsFlags) register(fs *flag.FlagSet, withIntent bool) {
	fs.StringVar(&f.netns, "netns", "", "the network namespace: a `PATH` (/proc/PID/ns/net, /run/netns/x) or a name from `ip netns`;\nrequired for a pod, default "+selfNetNS+" with --host")
	fs.BoolVar(&f.host, "host", false, "act on the node ruleset (probe SNAT, pod IP sets) instead of the pod's")
	if withIntent {
		f.annotations = keyValues{}
		fs.StringVar(&f.file, "f", "", "intent `FILE` (YAML, kind: Intent, one document, at most 16 MiB; - reads stdin);\nwithout it, the built-in default intent")
		fs.Var(f.annotations, "pod-annotation", "a pod annotation `KEY=VALUE` applied over the intent's pod section; repeatable")
	}
}

// path resolves --netns, defaulting to the node's namespace for --host.
func (f *netnsFlags) path() (string, error) {
	if f.netns == "" {
		if f.host {
			return selfNetNS, nil
		}
		return "", errors.New("--netns is required (or --host for the node)")
	}
	return netns.Resolve(f.netns), nil
}

// desired compiles what --host selects: the node ruleset, or a pod's table and routing.
func (f *netnsFlags) desired(stderr io.Writer) (ruleset.Desired, error) {
	f.target = string(compiler.TargetPod)
	if f.host {
		f.target = string(compiler.TargetHost)
	}
	return f.state(stderr)
}

func logger(stderr io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

const netnsExitCodes = "0 done; 2 bad flags, invalid intent, or the namespace could not be changed\n(nothing is half-applied: the table changes in one transaction, routing is rolled back)."

func runApply(args []string, stdout, stderr io.Writer) int {
	var f netnsFlags
	fs := newFlagSet("apply", "apply --netns PATH|NAME [-f intent.yaml] [--pod-annotation k=v ...] | apply --host [--netns PATH|NAME] [-f intent.yaml]",
		"Compile the intent and make the namespace hold exactly that ruleset: nftmesh's table in one\n"+
			"atomic transaction (nothing written when it is already identical), and for a pod the policy\n"+
			"routing (fwmark rule at pref 32764, local route in table 100; any other rule at that pref\n"+
			"or route in that table is deleted). Nothing else is touched. Applies to one namespace, from\n"+
			"any number of processes, take turns on a lock file in "+dataplane.DefaultLockDir+" ($"+dataplane.LockDirEnv+").",
		netnsExitCodes, stdout)
	f.register(fs, true)
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	path, err := f.path()
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh apply: %v\n", err)
		return exitError
	}
	d, err := f.desired(stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh apply: %v\n", err)
		return exitError
	}
	ns, err := netns.Open(path)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh apply: %v\n", err)
		return exitError
	}
	defer ns.Close()
	m := dataplane.NewManager(logger(stderr), 0)
	defer m.Close()
	res, err := m.Apply(ns, d)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh apply: %v\n", err)
		return exitError
	}
	routing := ""
	if d.Routing != nil {
		routing = ", routing unchanged"
		if res.RoutingChanged {
			routing = ", routing updated"
		}
	}
	fmt.Fprintf(stdout, "%s: table inet %s %s (%d netlink writes)%s\n", path, d.Table.Name, res.Action, res.Writes, routing)
	return exitOK
}

func runShow(args []string, stdout, stderr io.Writer) int {
	var f netnsFlags
	fs := newFlagSet("show", "show --netns PATH|NAME | show --host [--netns PATH|NAME]",
		"Print nftmesh's live table in the namespace as canonical nft text, the layout of `nftmesh\n"+
			"compile`. Rules nftmesh did not write show as a comment line with their handle.",
		"0 printed; 1 there is no nftmesh table; 2 bad flags or the namespace cannot be read.", stdout)
	f.register(fs, false)
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	path, err := f.path()
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh show: %v\n", err)
		return exitError
	}
	ns, err := netns.Open(path)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh show: %v\n", err)
		return exitError
	}
	defer ns.Close()
	text, err := dataplane.Show(ns, compiler.TableName)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh show: %v\n", err)
		return exitError
	}
	if text == "" {
		fmt.Fprintf(stderr, "nftmesh show: %s: no table inet %s\n", path, compiler.TableName)
		return exitDiff
	}
	fmt.Fprint(stdout, text)
	return exitOK
}

func runDelete(args []string, stdout, stderr io.Writer) int {
	var f netnsFlags
	fs := newFlagSet("delete", "delete --netns PATH|NAME [-f intent.yaml] | delete --host [--netns PATH|NAME]",
		"Remove nftmesh's table from the namespace and, for a pod, its policy routing: every rule at\n"+
			"the intent's pref and every route in its table, whatever marks they carry. What is already\n"+
			"gone is skipped.",
		"0 removed or nothing to remove; 2 bad flags or the namespace could not be changed.", stdout)
	f.register(fs, true)
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	path, err := f.path()
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh delete: %v\n", err)
		return exitError
	}
	d, err := f.desired(stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh delete: %v\n", err)
		return exitError
	}
	ns, err := netns.Open(path)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh delete: %v\n", err)
		return exitError
	}
	defer ns.Close()
	m := dataplane.NewManager(logger(stderr), 0)
	defer m.Close()
	removed, err := m.Remove(ns, d)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh delete: %v\n", err)
		return exitError
	}
	what := "removed"
	if !removed {
		what = "nothing to remove"
	}
	fmt.Fprintf(stdout, "%s: %s\n", path, what)
	return exitOK
}

// diffLive is `nftmesh diff --netns`: the live table against the compiled one and, for a
// pod, the live policy routing (rules at nftmesh's pref, routes in its table) against
// the intent's.
func diffLive(f *netnsFlags, stdout, stderr io.Writer) int {
	path, err := f.path()
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	d, err := f.desired(stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	ns, err := netns.Open(path)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	defer ns.Close()
	out, err := dataplane.Diff(ns, d)
	if err != nil {
		fmt.Fprintf(stderr, "nftmesh diff: %v\n", err)
		return exitError
	}
	if out == "" {
		return exitOK
	}
	fmt.Fprint(stdout, out)
	return exitDiff
}
