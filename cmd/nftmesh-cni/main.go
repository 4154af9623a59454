// Command nftmesh-cni is nftmesh's CNI plugin, chained after the node's primary CNI. ADD
// passes the primary's result through unchanged, after the node agent has enrolled the pod
// (or said it is not for the mesh); if the agent cannot do it, ADD fails and the pod does
// not start outside the mesh. The agent installs the binary and the chain entry.
//
// The runtime execs the plugin for every pod, so its start-up is most of what it costs: it
// links no net/http (agent/cniapi's framing is its own; TestNoHTTP checks). Nor does the Go
// runtime start its GOMAXPROCS updater (updatemaxprocs=0, below), a goroutine it would wake
// a thread for while the plugin starts, to follow cgroup CPU limit changes once a second:
// the plugin lives some 10 ms, and the updater cost it 0.26 ms of CPU per ADD on a 2-vCPU VM
// (mean of 1,000 ADDs, interleaved A/B).
//
//go:debug updatemaxprocs=0
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/nftmesh/nftmesh/agent/cniapi"
)

// Conf is the plugin's entry in the conflist, as the agent writes it.
type Conf struct {
	types.NetConf
	// AgentSocket is the agent's socket (default cniapi.DefaultSocket).
	AgentSocket string `json:"agentSocket,omitempty"`
	// ExcludeNamespaces succeed at once without asking the agent: the namespaces the agent
	// never enrolls, among them its own, so that the mesh's own pods start while the agent
	// is not up yet.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	// Timeout bounds the wait for the agent's answer to an ADD (default 30s).
	Timeout string `json:"timeout,omitempty"`
}

// k8sArgs are the CNI_ARGS Kubernetes runtimes pass.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive // the runtime's names
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
}

const delTimeout = 10 * time.Second

func parse(args *skel.CmdArgs) (*Conf, *k8sArgs, time.Duration, error) {
	conf := &Conf{}
	if err := json.Unmarshal(args.StdinData, conf); err != nil {
		return nil, nil, 0, fmt.Errorf("nftmesh-cni: config: %w", err)
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return nil, nil, 0, fmt.Errorf("nftmesh-cni: prevResult: %w", err)
		}
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = cniapi.DefaultSocket
	}
	timeout := 30 * time.Second
	if conf.Timeout != "" {
		d, err := time.ParseDuration(conf.Timeout)
		if err != nil || d <= 0 {
			return nil, nil, 0, fmt.Errorf("nftmesh-cni: config: timeout: %q is not a positive duration", conf.Timeout)
		}
		timeout = d
	}
	k := &k8sArgs{}
	if err := types.LoadArgs(args.Args, k); err != nil {
		return nil, nil, 0, fmt.Errorf("nftmesh-cni: CNI_ARGS: %w", err)
	}
	return conf, k, timeout, nil
}

func request(cmd string, args *skel.CmdArgs, k *k8sArgs, ips []netip.Addr) cniapi.Request {
	return cniapi.Request{Command: cmd, ContainerID: args.ContainerID, NetNS: args.Netns,
		PodName: string(k.K8S_POD_NAME), PodNamespace: string(k.K8S_POD_NAMESPACE), PodUID: string(k.K8S_POD_UID), IPs: ips}
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, k, timeout, err := parse(args)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return errors.New("nftmesh-cni: no prevResult: chain the plugin after the primary CNI")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return fmt.Errorf("nftmesh-cni: prevResult: %w", err)
	}
	// Not a Kubernetes pod, or one the agent never enrolls: nothing to wait for.
	if k.K8S_POD_NAME == "" || slices.Contains(conf.ExcludeNamespaces, string(k.K8S_POD_NAMESPACE)) {
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	}
	var ips []netip.Addr
	for _, ip := range prev.IPs {
		if a, ok := netip.AddrFromSlice(ip.Address.IP); ok {
			ips = append(ips, a.Unmap())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if _, err := cniapi.Call(ctx, conf.AgentSocket, request("ADD", args, k, ips)); err != nil {
		return fmt.Errorf("nftmesh-cni: pod %s/%s not started outside the mesh: %w", k.K8S_POD_NAMESPACE, k.K8S_POD_NAME, err)
	}
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

func cmdDel(args *skel.CmdArgs) error {
	conf, k, _, err := parse(args)
	if err != nil {
		return err
	}
	if k.K8S_POD_NAME == "" || slices.Contains(conf.ExcludeNamespaces, string(k.K8S_POD_NAMESPACE)) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), delTimeout)
	defer cancel()
	_, err = cniapi.Call(ctx, conf.AgentSocket, request("DEL", args, k, nil))
	if errors.Is(err, cniapi.ErrAgentUnreachable) {
		return nil // nothing to undo here: the agent cleans up when it is back
	}
	if err != nil {
		return fmt.Errorf("nftmesh-cni: del %s/%s: %w", k.K8S_POD_NAMESPACE, k.K8S_POD_NAME, err)
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, _, _, err := parse(args)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return errors.New("nftmesh-cni: no prevResult: chain the plugin after the primary CNI")
	}
	return nil
}

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck},
		version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"),
		"nftmesh-cni: enrolls pods in the nftmesh ambient mesh through the node agent")
}
