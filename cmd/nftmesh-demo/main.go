// Command nftmesh-demo runs the seed's walkthrough on one machine (`just demo`): a real
// kube-apiserver and etcd, two nodes running nftmesh's agent and proxy, and the sleep,
// notsleep and httpbin pods, then the L4 policy. Run as root. Its serve-http and http-get
// commands are the pods' processes.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nftmesh/nftmesh/internal/demo"
)

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	cmd := "run"
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	switch cmd {
	case "run":
		fs := flag.NewFlagSet("nftmesh-demo", flag.ContinueOnError)
		fs.Usage = func() {
			fmt.Fprint(fs.Output(), "Usage: nftmesh-demo [run] --bin-dir DIR --controlplane-dir DIR [--repo-dir DIR]\n\n"+
				"Runs the seed's walkthrough as root on this machine and removes all it made, also on Ctrl-C.\n"+
				"`just demo` builds what it needs and runs it.\n\nFlags:\n")
			fs.PrintDefaults()
			fmt.Fprint(fs.Output(), "\nExit codes: 0 every step behaved; 1 a step did not; 2 bad flags.\n")
		}
		var o demo.Options
		fs.StringVar(&o.BinDir, "bin-dir", "bin", "`DIR` holding nftmesh, nftmesh-cni and nftmesh-demo")
		fs.StringVar(&o.ControlPlaneDir, "controlplane-dir", "", "`DIR` holding etcd, kube-apiserver and kubectl (what scripts/controlplane prints)")
		fs.StringVar(&o.RepoDir, "repo-dir", ".", "the repository `DIR` (deploy/, fixtures/policy/)")
		if err := fs.Parse(args); err != nil {
			if err == flag.ErrHelp {
				return 0
			}
			return 2
		}
		if o.ControlPlaneDir == "" || fs.NArg() > 0 {
			fmt.Fprintln(os.Stderr, "nftmesh-demo: --controlplane-dir is required and no arguments are taken (see --help)")
			return 2
		}
		if os.Geteuid() != 0 {
			fmt.Fprintln(os.Stderr, "nftmesh-demo: run as root: the demo makes network namespaces")
			return 2
		}
		if err := demo.Run(ctx, o); err != nil {
			fmt.Fprintf(os.Stderr, "\nnftmesh-demo: %v\n", err)
			return 1
		}
		return 0
	case "serve-http":
		fs := flag.NewFlagSet("serve-http", flag.ContinueOnError)
		name := fs.String("name", "httpbin", "the app's `NAME`, in its answers")
		addr := fs.String("addr", ":8080", "listen `ADDR`")
		if fs.Parse(args) != nil {
			return 2
		}
		if err := demo.ServeHTTP(ctx, *name, *addr); err != nil {
			fmt.Fprintln(os.Stderr, "serve-http:", err)
			return 1
		}
		return 0
	case "http-get":
		fs := flag.NewFlagSet("http-get", flag.ContinueOnError)
		timeout := fs.Duration("timeout", 5*time.Second, "request `TIMEOUT`")
		if fs.Parse(args) != nil || fs.NArg() != 1 {
			fmt.Fprintln(os.Stderr, "usage: nftmesh-demo http-get [--timeout D] URL")
			return 2
		}
		if err := demo.Get(fs.Arg(0), *timeout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	fmt.Fprintf(os.Stderr, "nftmesh-demo: unknown command %q (run, serve-http, http-get)\n", cmd)
	return 2
}
