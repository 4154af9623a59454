// Package ca is nftmesh's certificate authority service: istiod's IstioCertificateService
// (istio.v1.auth.IstioCertificateService/CreateCertificate, gRPC over TLS), so that no
// node holds the mesh's signing key. A node proxy asks for each pod's certificate with
// its own ServiceAccount token and the pod's identity as ImpersonatedIdentity; the
// service signs only identities that have a live pod on the caller's node (docs/ca.md).
//
// The package does not speak Kubernetes: who a caller is (Authenticator) and what it may
// ask for (Authorizer) come from ca/kube.
package ca

import (
	"context"
	"errors"
	"fmt"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

// Caller is who sent a request, as its token says.
type Caller struct {
	Namespace, ServiceAccount string // from the token's username system:serviceaccount:<ns>:<sa>
	// PodName and PodUID: the pod the token is bound to (its extras
	// authentication.kubernetes.io/pod-name and pod-uid); empty for an unbound token.
	PodName, PodUID string
	// NodeName: the node of that pod, from the token (authentication.kubernetes.io/node-name,
	// set when the token was minted) or else from the pod object.
	NodeName string
}

func (c Caller) String() string {
	s := c.Namespace + "/" + c.ServiceAccount
	if c.PodName != "" {
		s += " (pod " + c.PodName + ")"
	}
	if c.NodeName != "" {
		s += " on node " + c.NodeName
	}
	return s
}

// Authenticator validates a bearer token (a TokenReview) and says whose it is.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (Caller, error)
}

// Authorizer decides whether caller may have a certificate for id. The caller's own
// identity (no impersonation) is also asked through it.
type Authorizer interface {
	Authorize(ctx context.Context, caller Caller, id identity.ID) error
}

// Refusal is a request the service refuses; Reason is a short label for the metric
// (e.g. "unauthenticated", "untrusted-caller", "no-pod-on-node", "bad-csr").
type Refusal struct {
	Reason string
	Err    error
}

func (r *Refusal) Error() string { return fmt.Sprintf("%s: %v", r.Reason, r.Err) }
func (r *Refusal) Unwrap() error { return r.Err }

// Refuse wraps err as a Refusal with reason.
func Refuse(reason string, err error) error { return &Refusal{Reason: reason, Err: err} }

// RefusalReason is err's Refusal reason, or "" if it is none.
func RefusalReason(err error) string {
	var r *Refusal
	if errors.As(err, &r) {
		return r.Reason
	}
	return ""
}
