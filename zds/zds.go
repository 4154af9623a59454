// Package zds implements ZDS, the protocol by which the node agent hands each enrolled pod's
// network namespace to the node proxy (docs/zds.md), both sides of it: Client is the
// proxy's, Server the agent's.
//
// The messages are Istio's (package istio.workload.zds, zdspb here, same field numbers), so
// nftmesh's agent can drive Istio's ztunnel and Istio's node agent can drive nftmesh's proxy. The
// transport is a unix SOCK_SEQPACKET socket carrying one protobuf message per packet, with no
// framing; an AddWorkload carries the pod netns as one SCM_RIGHTS descriptor.
//
// Flow: the proxy connects and sends ZdsHello{V1}; the agent streams a snapshot (one Add or Keep
// per known pod, each waiting for its Ack) and SnapshotSent; the proxy drains every workload the
// snapshot did not name. Afterwards only Add and Del. Every request gets exactly one Ack, in order;
// there are no request ids.
package zds

import (
	"errors"
	"fmt"
	"os"

	"github.com/nftmesh/nftmesh/zds/zdspb"
)

// DefaultSocketPath is where Istio's CNI agent listens and ztunnel connects.
const DefaultSocketPath = "/var/run/ztunnel/ztunnel.sock"

// WorkloadInfo identifies the pod behind a workload uid.
type WorkloadInfo struct {
	Name, Namespace, ServiceAccount string
}

// ErrNoProxy is returned by Server.AddWorkload when no proxy is connected: the pod must not start
// without its proxy (fail closed).
var ErrNoProxy = errors.New("no proxy connected")

// AckError is a non-empty error a proxy put in its Ack.
type AckError struct {
	Msg string
}

func (e *AckError) Error() string { return "proxy refused: " + e.Msg }

// errMalformed marks a packet that was read whole but cannot be used. The connection itself is
// still in sync (SOCK_SEQPACKET keeps message boundaries), so the answer is an error Ack, not a
// disconnect.
var errMalformed = errors.New("malformed message")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errMalformed, fmt.Sprintf(format, args...))
}

func infoToPB(i WorkloadInfo) *zdspb.WorkloadInfo {
	return &zdspb.WorkloadInfo{Name: i.Name, Namespace: i.Namespace, ServiceAccount: i.ServiceAccount}
}

func infoFromPB(i *zdspb.WorkloadInfo) WorkloadInfo {
	return WorkloadInfo{Name: i.GetName(), Namespace: i.GetNamespace(), ServiceAccount: i.GetServiceAccount()}
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
