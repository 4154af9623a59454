// Package kube is the Kubernetes half of nftmesh's CA service (package ca): who a caller is,
// from a TokenReview of its bearer token (NewAuthenticator), and which identities it may
// have certificates for, from the pods on its node (NodeAuthorizer), as istiod decides
// both (docs/ca.md).
//
// The CA's ServiceAccount needs create on authentication.k8s.io tokenreviews, and get,
// list and watch on pods in every namespace.
package kube

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/nftmesh/nftmesh/ca"
)

// DefaultAudience is the token audience when NewAuthenticator is given none: istiod's
// default TOKEN_AUDIENCES, and the audience of the token ztunnel's chart projects.
const DefaultAudience = "istio-ca"

// The extras of a pod-bound service-account token (status.user.extra of its review).
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

const (
	saUserPrefix = "system:serviceaccount:" // + <namespace>:<name>
	saGroup      = "system:serviceaccounts" // every service-account token's user has it
)

// RESTConfig loads a kubeconfig file, or the in-cluster configuration (the pod's
// ServiceAccount) when kubeconfig is "". The configuration speaks protobuf (the CA uses
// only Kubernetes' own types: pods and TokenReviews), names itself nftmesh-ca, and
// allows 100 requests a second (burst 200): every certificate request costs a
// TokenReview, and client-go's default of 5 would queue a node's start-up.
func RESTConfig(kubeconfig string) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		if cfg, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("kubernetes: in-cluster configuration (outside a pod, give --kubeconfig): %w", err)
		}
	} else if cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig); err != nil {
		return nil, fmt.Errorf("kubernetes: kubeconfig %s: %w", kubeconfig, err)
	}
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	if cfg.UserAgent == "" {
		cfg.UserAgent = "nftmesh-ca"
	}
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = 100, 200
	}
	return cfg, nil
}

type authenticator struct {
	client    kubernetes.Interface
	audiences []string
	reviews   chan struct{} // a slot per TokenReview in flight

	mu    sync.Mutex
	cache map[[sha256.Size]byte]reviewResult // by the token's hash
}

// reviewResult is a TokenReview's answer, kept for reviewCacheTTL: a caller that sends
// the same token again (a proxy's renewals and prefetches, or a flood of a bad token)
// costs the API server nothing more meanwhile. The API server itself caches a success
// for 10 s, so this makes no token live longer.
type reviewResult struct {
	caller  ca.Caller
	refusal error // a ca.Refusal, or nil
	expires time.Time
}

const (
	reviewCacheTTL = 10 * time.Second
	// reviewCacheMax bounds the cache; when full, expired answers go, then all.
	reviewCacheMax = 10000
	// reviewsInFlight bounds the TokenReviews the service has outstanding, so that a flood
	// of requests queues here (until the request's deadline) instead of in client-go's
	// rate limiter, where it would delay every proxy's renewals.
	reviewsInFlight = 32
	// maxTokenBytes: a ServiceAccount token is a JWS of a few hundred bytes to a few KiB.
	maxTokenBytes = 16 << 10
)

// NewAuthenticator authenticates a caller by a TokenReview (authentication.k8s.io/v1) of
// its token for audiences (none: DefaultAudience). The token must be a ServiceAccount's
// (user system:serviceaccount:<ns>:<sa>) and the review must say it is meant for one of
// audiences: istiod trusts the API server for that; this checks status.audiences too. A
// pod-bound token also gives the pod's name and UID and the node it was on when the token
// was minted (its extras authentication.kubernetes.io/pod-name, pod-uid, node-name).
//
// A token it refuses comes back as a ca.Refusal "unauthenticated" that says why; a
// review that could not be made (the API server unreachable, no permission) as another
// error: the CA's failure, not the caller's.
//
// A pod-bound token passes for a moment after its pod is deleted: the API server looks
// the pod up in its own informer's cache, and caches a successful authentication for
// 10 s (no flag sets that), so a token reviewed just before the deletion passes again
// for up to 10 s. NodeAuthorizer checks the caller's pod itself.
func NewAuthenticator(client kubernetes.Interface, audiences []string) ca.Authenticator {
	if len(audiences) == 0 {
		audiences = []string{DefaultAudience}
	}
	return &authenticator{client: client, audiences: slices.Clone(audiences), reviews: make(chan struct{}, reviewsInFlight),
		cache: map[[sha256.Size]byte]reviewResult{}}
}

func (a *authenticator) Authenticate(ctx context.Context, token string) (ca.Caller, error) {
	if token == "" {
		return ca.Caller{}, ca.Refuse("unauthenticated", errors.New("no bearer token"))
	}
	// Not a JWS compact serialization: no API server would accept it, so none is asked.
	if len(token) > maxTokenBytes || strings.Count(token, ".") != 2 {
		return ca.Caller{}, ca.Refuse("unauthenticated", errors.New("the bearer token is not a ServiceAccount token (a JWT)"))
	}
	key := sha256.Sum256([]byte(token))
	now := time.Now()
	a.mu.Lock()
	r, ok := a.cache[key]
	a.mu.Unlock()
	if ok && now.Before(r.expires) {
		return r.caller, r.refusal
	}
	select {
	case a.reviews <- struct{}{}:
		defer func() { <-a.reviews }()
	case <-ctx.Done():
		return ca.Caller{}, fmt.Errorf("kubernetes: token review: waiting for a slot: %w", context.Cause(ctx))
	}
	caller, err := a.review(ctx, token)
	if err == nil || ca.RefusalReason(err) != "" { // an API failure is not an answer about the token
		a.mu.Lock()
		if len(a.cache) >= reviewCacheMax {
			for k, v := range a.cache {
				if !now.Before(v.expires) {
					delete(a.cache, k)
				}
			}
			if len(a.cache) >= reviewCacheMax {
				clear(a.cache)
			}
		}
		a.cache[key] = reviewResult{caller: caller, refusal: err, expires: now.Add(reviewCacheTTL)}
		a.mu.Unlock()
	}
	return caller, err
}

func (a *authenticator) review(ctx context.Context, token string) (ca.Caller, error) {
	review, err := a.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return ca.Caller{}, fmt.Errorf("kubernetes: token review: %w", err)
	}
	st := review.Status
	if !st.Authenticated {
		why := st.Error
		if why == "" {
			why = "no reason given"
		}
		return ca.Caller{}, ca.Refuse("unauthenticated", fmt.Errorf("token review (audience %s): not authenticated: %s",
			strings.Join(a.audiences, ", "), why))
	}
	user := st.User.Username
	ns, sa, ok := splitServiceAccount(user)
	if !ok || !slices.Contains(st.User.Groups, saGroup) {
		return ca.Caller{}, ca.Refuse("unauthenticated", fmt.Errorf("token review: user %q is not a ServiceAccount (want %s<namespace>:<name> in group %s)",
			user, saUserPrefix, saGroup))
	}
	if !slices.ContainsFunc(st.Audiences, func(aud string) bool { return slices.Contains(a.audiences, aud) }) {
		return ca.Caller{}, ca.Refuse("unauthenticated", fmt.Errorf("token review: the token of ServiceAccount %s/%s is for audiences [%s], none of ours (%s)",
			ns, sa, strings.Join(st.Audiences, ", "), strings.Join(a.audiences, ", ")))
	}
	extra := func(key string) string {
		if v := st.User.Extra[key]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	return ca.Caller{
		Namespace:      ns,
		ServiceAccount: sa,
		PodName:        extra(extraPodName),
		PodUID:         extra(extraPodUID),
		NodeName:       extra(extraNodeName),
	}, nil
}

// splitServiceAccount splits system:serviceaccount:<ns>:<sa>.
func splitServiceAccount(user string) (ns, sa string, ok bool) {
	rest, ok := strings.CutPrefix(user, saUserPrefix)
	if !ok {
		return "", "", false
	}
	ns, sa, ok = strings.Cut(rest, ":")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, ":") {
		return "", "", false
	}
	return ns, sa, true
}
