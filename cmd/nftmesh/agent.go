package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/nftmesh/nftmesh/agent"
	"github.com/nftmesh/nftmesh/agent/cniapi"
	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/zds"
)

const (
	defaultCNIConfDir = "/etc/cni/net.d"
	defaultCNIBinDir  = "/opt/cni/bin"
)

func runAgent(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "uninstall" {
		return runAgentUninstall(args[1:], stdout, stderr)
	}
	fs := newFlagSet("agent", "agent --node NAME [--kubeconfig FILE] [--intent intent.yaml] [flags]\n       nftmesh agent uninstall [flags]",
		"Run the node agent (a DaemonSet, privileged, hostNetwork, hostPID). It enrolls this node's pods\n"+
			"in the mesh as Istio's istio-cni agent decides (the pod's or its namespace's label\n"+
			"istio.io/dataplane-mode=ambient; never host-network, sidecar, excluded or finished pods): the\n"+
			"pod's rules, the pod handed to the node proxy over ZDS, its IPs in the node's probe sets, and the\n"+
			"annotation ambient.istio.io/redirection=enabled. It installs its CNI plugin after the primary\n"+
			"CNI's, so that a pod starts only once enrolled, and keeps it there when the file is rewritten.\n"+
			"At start it applies the node's rules and reconciles the pods already running before it serves.\n"+
			"SIGTERM and SIGINT stop it; pods keep their rules and the proxy its pods (an upgrade drops\n"+
			"nothing). `nftmesh agent uninstall` takes the plugin out of the CNI configuration.",
		"0 after SIGTERM or SIGINT; 2 bad flags, an input that does not load, or a failure to start.", stdout)
	var o agent.Options
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "kubeconfig `FILE`; none: the in-cluster configuration (the pod's service account)")
	fs.StringVar(&o.NodeName, "node", os.Getenv("NODE_NAME"), "this node's `NAME` (default $NODE_NAME): only its pods are enrolled")
	intentFile := fs.String("intent", "", "intent `FILE` (YAML, kind: Intent, at most 16 MiB; - reads stdin) the rules are compiled from;\nwithout it, the built-in default intent")
	exclude := fs.String("exclude-namespaces", strings.Join(agent.DefaultExcludeNamespaces, ","), "comma-separated `NAMESPACES` never enrolled (empty: none)")
	fs.StringVar(&o.HostNetNS, "host-netns", agent.DefaultHostNetNS, "the node's network namespace `PATH` (its probe sets and rules)")
	fs.StringVar(&o.ProcRoot, "proc-root", agent.DefaultProcRoot, "the node's /proc `DIR`, scanned at start for running pods' namespaces (needs hostPID)")
	fs.StringVar(&o.ZDSSocket, "zds-socket", zds.DefaultSocketPath, "`PATH` of the ZDS socket the node proxy connects to")
	fs.StringVar(&o.CNISocket, "cni-socket", cniapi.DefaultSocket, "`PATH` of the socket the CNI plugin calls")
	confDir := fs.String("cni-conf-dir", defaultCNIConfDir, "the host's CNI configuration `DIR`: the plugin goes into its first file by name")
	binDir := fs.String("cni-bin-dir", defaultCNIBinDir, "the host's CNI binary `DIR`: the plugin is copied there")
	plugin := fs.String("cni-plugin", "", "the nftmesh-cni binary `FILE` to install (default: nftmesh-cni beside this executable)")
	install := fs.Bool("cni-install", true, "install the CNI plugin and keep it chained; false: someone else does")
	pluginTimeout := fs.Duration("cni-timeout", 30*time.Second, "how long the plugin waits for an enrollment before ADD fails (`DURATION`)")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", agent.DefaultMetricsAddr, "listen `ADDR` of /metrics, /healthz and /readyz; empty: none")
	fs.IntVar(&o.Workers, "workers", agent.DefaultWorkers, "`N` pods enrolled at once (each pod's work is serial)")
	fs.DurationVar(&o.Resync, "resync", agent.DefaultResync, "how often the node's rules are checked and repaired (`DURATION`; unchanged: no writes)")
	logFormat := fs.String("log-format", "text", "log `FORMAT`: text or json")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "nftmesh agent: "+format+"\n", a...)
		return exitError
	}
	log, err := newLogger(*logFormat, stderr)
	if err != nil {
		return fail("%v", err)
	}
	o.Log = log
	if o.NodeName == "" {
		return fail("--node: empty; give this node's name (or set NODE_NAME, from the Downward API's spec.nodeName)")
	}
	if errs := validation.IsDNS1123Subdomain(o.NodeName); len(errs) > 0 {
		return fail("--node: %q is not a node name: %s", o.NodeName, strings.Join(errs, "; "))
	}
	o.ExcludeNamespaces = []string{}
	for _, ns := range strings.Split(*exclude, ",") {
		if ns = strings.TrimSpace(ns); ns == "" {
			continue
		}
		if len(validation.IsDNS1123Label(ns)) > 0 {
			return fail("--exclude-namespaces: %q is not a namespace name", ns)
		}
		o.ExcludeNamespaces = append(o.ExcludeNamespaces, ns)
	}
	for flag, v := range map[string]string{"--host-netns": o.HostNetNS, "--proc-root": o.ProcRoot, "--zds-socket": o.ZDSSocket, "--cni-socket": o.CNISocket} {
		if v == "" {
			return fail("%s: empty", flag)
		}
	}
	switch {
	case o.Workers <= 0:
		return fail("--workers: %d is not positive", o.Workers)
	case o.Resync <= 0:
		return fail("--resync: %s is not positive", o.Resync)
	case *pluginTimeout <= 0:
		return fail("--cni-timeout: %s is not positive", *pluginTimeout)
	}
	intent := intentFlags{file: *intentFile}
	if o.Intent, err = intent.loadIntent(); err != nil {
		return fail("--intent: %v", err)
	}
	if _, err := compiler.Resolve(o.Intent); err != nil {
		return fail("--intent: %s: %v", intent.source(), err)
	}
	if *install {
		src := *plugin
		if src == "" {
			exe, err := os.Executable()
			if err != nil {
				return fail("--cni-plugin: not given, and this executable's path is unknown: %v", err)
			}
			src = filepath.Join(filepath.Dir(exe), agent.PluginType)
		}
		if st, err := os.Stat(src); err != nil || !st.Mode().IsRegular() {
			return fail("--cni-plugin: %s: not a file (build it: go build ./cmd/nftmesh-cni)", src)
		}
		if *confDir == "" || *binDir == "" {
			return fail("--cni-conf-dir and --cni-bin-dir must not be empty with --cni-install")
		}
		o.CNI = &agent.CNIInstaller{ConfDir: *confDir, BinDir: *binDir, PluginSrc: src, Log: log,
			Entry: map[string]any{"name": "nftmesh", "agentSocket": o.CNISocket,
				"excludeNamespaces": o.ExcludeNamespaces, "timeout": pluginTimeout.String()}}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := agent.Run(ctx, o); err != nil {
		log.Error("agent failed", "error", err)
		return fail("%v", err)
	}
	log.Info("stopped")
	return exitOK
}

func runAgentUninstall(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("agent uninstall", "agent uninstall [--cni-conf-dir DIR] [--cni-bin-dir DIR]",
		"Take nftmesh's CNI plugin out of the primary CNI configuration and remove its binary. Pods\n"+
			"already enrolled keep their rules until they end; new pods start outside the mesh. The\n"+
			"agent never does this itself: a restart or an upgrade leaves the plugin in place.",
		"0 done (or nothing to do); 2 bad flags or a failure.", stdout)
	confDir := fs.String("cni-conf-dir", defaultCNIConfDir, "the host's CNI configuration `DIR`")
	binDir := fs.String("cni-bin-dir", defaultCNIBinDir, "the host's CNI binary `DIR`")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "nftmesh agent uninstall: unexpected argument %q\n", fs.Arg(0))
		return exitError
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	in := agent.CNIInstaller{ConfDir: *confDir, BinDir: *binDir, Log: log}
	if err := in.Uninstall(); err != nil {
		fmt.Fprintf(stderr, "nftmesh agent uninstall: %v\n", err)
		return exitError
	}
	fmt.Fprintf(stdout, "nftmesh CNI plugin removed from %s and %s\n", *confDir, *binDir)
	return exitOK
}

// newLogger is --log-format's logger.
func newLogger(format string, w io.Writer) (*slog.Logger, error) {
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, nil)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, nil)), nil
	}
	return nil, fmt.Errorf("--log-format: %q is not text or json", format)
}
