package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/nftmesh/nftmesh/ca"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// (a) The proxy on node A, with its pod-bound token, may have the identity of a pod on
// node A: the caller is read from the token, the pod found in the index.
func TestProxyGetsIdentityOfPodOnItsNode(t *testing.T) {
	f := newFixture(t)
	proxy := f.pod(t, "proxy-a", nodeA, proxySA)
	f.account(t, "app")
	f.pod(t, "app-1", nodeA, "app")

	caller := f.caller(t, f.token(t, proxySA, proxy))
	want := ca.Caller{Namespace: f.ns, ServiceAccount: proxySA, PodName: "proxy-a", PodUID: string(proxy.UID), NodeName: nodeA}
	if caller != want {
		t.Fatalf("caller %+v, want %+v", caller, want)
	}
	waitIndexed(t, f.authz, nodeA, f.ns, "app", true)
	if err := f.authz.Authorize(t.Context(), caller, f.id("app")); err != nil {
		t.Fatal(err)
	}
	// Its own identity too.
	if err := f.authz.Authorize(t.Context(), caller, f.id(proxySA)); err != nil {
		t.Fatal(err)
	}

	// A pod just created has no status yet (Pending): the proxy prefetches then, and it
	// counts.
	f.account(t, "fresh")
	pending := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: "fresh-1"},
		Spec: corev1.PodSpec{NodeName: nodeA, ServiceAccountName: "fresh",
			Containers: []corev1.Container{{Name: "app", Image: "example"}}},
	}
	got, err := f.cp.Client.CoreV1().Pods(f.ns).Create(t.Context(), pending, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != corev1.PodPending {
		t.Fatalf("new pod's phase %q, want Pending", got.Status.Phase)
	}
	if err := f.authz.Authorize(t.Context(), caller, f.id("fresh")); err != nil {
		t.Fatal(err)
	}
}

// (b) Not for a pod on node B only; (c) nor for a ServiceAccount with no pod at all.
func TestRefusedWithoutPodOnCallersNode(t *testing.T) {
	f := newFixture(t)
	proxy := f.pod(t, "proxy-a", nodeA, proxySA)
	f.account(t, "remote")
	f.pod(t, "remote-1", nodeB, "remote")
	f.account(t, "idle")
	caller := f.caller(t, f.token(t, proxySA, proxy))

	waitIndexed(t, f.authz, nodeB, f.ns, "remote", true) // the index has it, on B
	err := f.authz.Authorize(t.Context(), caller, f.id("remote"))
	wantRefusal(t, err, "no-pod-on-node", caller.String(), f.id("remote").String(),
		"no running pod of ServiceAccount "+f.ns+"/remote is on node "+nodeA)

	err = f.authz.Authorize(t.Context(), caller, f.id("idle"))
	wantRefusal(t, err, "no-pod-on-node", caller.String(), f.id("idle").String(), "node "+nodeA)
}

// (d) An expired token is refused. TokenRequest will not mint one (600 s at least), so the
// test signs one as kube-apiserver would, with its key; the same token unexpired passes,
// which shows the signing is right and the expiry is what is refused.
func TestRefusedExpiredToken(t *testing.T) {
	f := newFixture(t)
	sa, err := f.cp.Client.CoreV1().ServiceAccounts(f.ns).Get(t.Context(), proxySA, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	proxy := f.pod(t, "proxy-a", nodeA, proxySA)
	key, issuer := signingKey(t, f.cp)
	now := time.Now()

	valid := signToken(t, key, boundClaims(issuer, sa, proxy, now.Add(-time.Minute), now.Add(10*time.Minute)))
	caller, err := f.authn.Authenticate(t.Context(), valid)
	if err != nil {
		t.Fatalf("the unexpired self-signed token: %v", err)
	}
	if want := (ca.Caller{Namespace: f.ns, ServiceAccount: proxySA, PodName: "proxy-a", PodUID: string(proxy.UID), NodeName: nodeA}); caller != want {
		t.Fatalf("caller %+v, want %+v", caller, want)
	}

	// Past the validator's 1 min leeway.
	expired := signToken(t, key, boundClaims(issuer, sa, proxy, now.Add(-20*time.Minute), now.Add(-10*time.Minute)))
	_, err = f.authn.Authenticate(t.Context(), expired)
	wantRefusal(t, err, "unauthenticated", "expired")
}

// (e) A token for another audience is refused.
func TestRefusedWrongAudience(t *testing.T) {
	f := newFixture(t)
	proxy := f.pod(t, "proxy-a", nodeA, proxySA)
	_, err := f.authn.Authenticate(t.Context(), f.token(t, proxySA, proxy, "other"))
	wantRefusal(t, err, "unauthenticated", "audience "+audience, `"other"`)

	// The same token passes an authenticator for that audience.
	other := NewAuthenticator(f.cp.Client, []string{"other"})
	if _, err := other.Authenticate(t.Context(), f.token(t, proxySA, proxy, "other")); err != nil {
		t.Fatal(err)
	}
}

// (f) A caller whose ServiceAccount is not trusted may not ask for another identity,
// even with a pod-bound token and the pod on its node.
func TestRefusedUntrustedCaller(t *testing.T) {
	f := newFixture(t)
	f.account(t, "impostor")
	impostor := f.pod(t, "impostor-1", nodeA, "impostor")
	f.account(t, "app")
	f.pod(t, "app-1", nodeA, "app")
	caller := f.caller(t, f.token(t, "impostor", impostor))
	waitIndexed(t, f.authz, nodeA, f.ns, "app", true)

	err := f.authz.Authorize(t.Context(), caller, f.id("app"))
	wantRefusal(t, err, "untrusted-caller", caller.String(), f.id("app").String(),
		f.ns+"/impostor is not in --trusted-accounts ("+f.ns+"/"+proxySA+")")
}

// (g) A token stolen from node B's proxy, presented to ask for a node-A pod's identity:
// the token says node B, its pod is on node B, and node B has no such pod.
func TestRefusedStolenTokenFromOtherNode(t *testing.T) {
	f := newFixture(t)
	f.pod(t, "proxy-a", nodeA, proxySA)
	proxyB := f.pod(t, "proxy-b", nodeB, proxySA)
	f.account(t, "app")
	f.pod(t, "app-1", nodeA, "app")
	caller := f.caller(t, f.token(t, proxySA, proxyB))
	if caller.PodName != "proxy-b" || caller.NodeName != nodeB {
		t.Fatalf("caller %+v, want pod proxy-b on %s", caller, nodeB)
	}
	waitIndexed(t, f.authz, nodeA, f.ns, "app", true)

	err := f.authz.Authorize(t.Context(), caller, f.id("app"))
	wantRefusal(t, err, "no-pod-on-node", "proxy-b", f.id("app").String(), "node "+nodeB)

	// A caller whose token names node A but whose pod is on node B (a token minted for
	// a pod elsewhere): refused, whichever node would allow it.
	forged := caller
	forged.NodeName = nodeA
	err = f.authz.Authorize(t.Context(), forged, f.id("app"))
	wantRefusal(t, err, "caller-node-mismatch", "proxy-b", f.id("app").String(),
		"minted for node "+nodeA, "is on node "+nodeB)
}

// (h) A caller may have its own identity without being trusted, with no pod checks; and
// an unbound token of a trusted account may not ask for another identity.
func TestOwnIdentityAndUnboundToken(t *testing.T) {
	f := newFixture(t)
	f.account(t, "app")
	app := f.pod(t, "app-1", nodeA, "app")
	caller := f.caller(t, f.token(t, "app", app))
	if err := f.authz.Authorize(t.Context(), caller, f.id("app")); err != nil {
		t.Fatalf("own identity: %v", err)
	}
	// Another trust domain's spelling of it too: the trust domain is the server's business.
	if err := f.authz.Authorize(t.Context(), caller, identity.ForServiceAccount("example.org", f.ns, "app")); err != nil {
		t.Fatalf("own identity in another trust domain: %v", err)
	}
	// An unbound token: its own identity still, another not.
	unbound := f.caller(t, f.token(t, "app", nil))
	if unbound.PodName != "" || unbound.PodUID != "" {
		t.Fatalf("unbound token's caller %+v has a pod", unbound)
	}
	if err := f.authz.Authorize(t.Context(), unbound, f.id("app")); err != nil {
		t.Fatalf("own identity, unbound token: %v", err)
	}
	wantRefusal(t, f.authz.Authorize(t.Context(), unbound, f.id(proxySA)), "untrusted-caller")

	f.pod(t, "proxy-a", nodeA, proxySA)
	proxy := f.caller(t, f.token(t, proxySA, nil))
	err := f.authz.Authorize(t.Context(), proxy, f.id("app"))
	wantRefusal(t, err, "unbound-token", proxy.String(), f.id("app").String(), "bound to no pod")
}

// (i) Once the caller's pod is deleted, a caller authenticated before is refused by the
// authorizer, and the pod's tokens by the TokenReview. Both only eventually: the API
// server checks the pod in its own informer's cache, and caches a successful review for
// 10 s, so the test reviews a new token (minted before the deletion) each time. A pod
// recreated under the same name does not revive the old caller.
func TestRefusedWhenCallerPodGone(t *testing.T) {
	f := newFixture(t)
	proxy := f.pod(t, "proxy-a", nodeA, proxySA)
	f.account(t, "app")
	f.pod(t, "app-1", nodeA, "app")
	caller := f.caller(t, f.token(t, proxySA, proxy))
	if err := f.authz.Authorize(t.Context(), caller, f.id("app")); err != nil {
		t.Fatal(err)
	}
	var unused []string // never reviewed: no cached success
	for range 30 {
		unused = append(unused, f.token(t, proxySA, proxy))
	}

	f.cp.DeletePod(t, f.ns, "proxy-a")
	eventually(t, func() error {
		err := f.authz.Authorize(t.Context(), caller, f.id("app"))
		if ca.RefusalReason(err) != "caller-pod-gone" {
			return errors.New("not refused as caller-pod-gone: " + errString(err))
		}
		if !strings.Contains(err.Error(), f.ns+"/proxy-a is gone") || !strings.Contains(err.Error(), f.id("app").String()) {
			t.Errorf("error %q does not name the pod and the identity", err)
		}
		return nil
	})
	for i, token := range unused {
		_, err := f.authn.Authenticate(t.Context(), token)
		if err != nil {
			wantRefusal(t, err, "unauthenticated", "invalidated")
			t.Logf("the TokenReview refused a token of the deleted pod after %d tries", i+1)
			break
		}
		if i == len(unused)-1 {
			t.Fatalf("the TokenReview still accepts tokens of the deleted pod after %d tries", len(unused))
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The same name again, another UID.
	again := f.pod(t, "proxy-a", nodeA, proxySA)
	eventually(t, func() error {
		err := f.authz.Authorize(t.Context(), caller, f.id("app"))
		if ca.RefusalReason(err) != "caller-pod-gone" || !strings.Contains(err.Error(), "has UID "+string(again.UID)) {
			return errors.New("old caller not refused for the new pod's UID: " + errString(err))
		}
		return nil
	})
	// The new pod's own token works.
	if err := f.authz.Authorize(t.Context(), f.caller(t, f.token(t, proxySA, again)), f.id("app")); err != nil {
		t.Fatal(err)
	}
}

// The index counts unfinished pods: one that turns Failed or Succeeded stops counting
// once the informer hears of it; one being deleted (terminating) still counts.
func TestIndexFollowsPhase(t *testing.T) {
	f := newFixture(t)
	proxy := f.pod(t, "proxy-a", nodeA, proxySA)
	caller := f.caller(t, f.token(t, proxySA, proxy))
	pods := f.cp.Client.CoreV1().Pods(f.ns)
	setPhase := func(name string, phase corev1.PodPhase) {
		t.Helper()
		patch, _ := json.Marshal(map[string]any{"status": map[string]any{"phase": phase}})
		if _, err := pods.Patch(t.Context(), name, types.MergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
			t.Fatal(err)
		}
	}

	for _, phase := range []corev1.PodPhase{corev1.PodFailed, corev1.PodSucceeded} {
		sa := strings.ToLower(string(phase))
		f.account(t, sa)
		f.pod(t, sa+"-1", nodeA, sa)
		waitIndexed(t, f.authz, nodeA, f.ns, sa, true)
		if err := f.authz.Authorize(t.Context(), caller, f.id(sa)); err != nil {
			t.Fatalf("%s, still running: %v", sa, err)
		}
		setPhase(sa+"-1", phase)
		waitIndexed(t, f.authz, nodeA, f.ns, sa, false)
		// Neither the index nor the API server's list counts it.
		wantRefusal(t, f.authz.Authorize(t.Context(), caller, f.id(sa)), "no-pod-on-node", f.id(sa).String())
	}

	// Terminating: deleted with a grace period that no kubelet will end.
	f.account(t, "draining")
	f.pod(t, "draining-1", nodeA, "draining")
	if err := pods.Delete(t.Context(), "draining-1", metav1.DeleteOptions{GracePeriodSeconds: new(int64(300))}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.cp.DeletePod(t, f.ns, "draining-1") })
	eventually(t, func() error {
		obj, ok, _ := f.authz.pods.GetIndexer().GetByKey(f.ns + "/draining-1")
		if !ok || obj.(*corev1.Pod).DeletionTimestamp == nil {
			return errors.New("the cache has not seen draining-1 terminating")
		}
		return nil
	})
	if err := f.authz.Authorize(t.Context(), caller, f.id("draining")); err != nil {
		t.Fatalf("terminating pod: %v", err)
	}
}

// The cache may lag the API server: a pod it has not heard of is found by one request.
// Here the informer is stopped after its sync, so it hears of nothing new.
func TestFallbackToAPIServer(t *testing.T) {
	f := newFixture(t)
	ctx, stop := context.WithCancel(t.Context())
	a := f.startAuthorizer(t, ctx, f.ns+"/"+proxySA)
	stop()
	time.Sleep(100 * time.Millisecond) // let the informer stop

	proxy := f.pod(t, "proxy-a", nodeA, proxySA)
	f.account(t, "late")
	f.pod(t, "late-1", nodeA, "late")
	f.account(t, "elsewhere")
	f.pod(t, "elsewhere-1", nodeB, "elsewhere")
	caller := f.caller(t, f.token(t, proxySA, proxy))
	if _, ok, _ := a.pods.GetIndexer().GetByKey(f.ns + "/proxy-a"); ok {
		t.Fatal("the stopped informer has the proxy's pod")
	}
	if keys, _ := a.pods.GetIndexer().IndexKeys(byNodeAccount, nodeAccountKey(nodeA, f.ns, "late")); len(keys) > 0 {
		t.Fatal("the stopped informer has the pod")
	}
	if err := a.Authorize(t.Context(), caller, f.id("late")); err != nil {
		t.Fatal(err)
	}
	wantRefusal(t, a.Authorize(t.Context(), caller, f.id("elsewhere")), "no-pod-on-node")
	wantRefusal(t, a.Authorize(t.Context(), caller, f.id("nobody")), "no-pod-on-node")

	// A caller pod of another ServiceAccount than the token's (found by the API server).
	f.account(t, "other")
	otherPod := f.pod(t, "other-1", nodeA, "other")
	forged := ca.Caller{Namespace: f.ns, ServiceAccount: proxySA, PodName: "other-1", PodUID: string(otherPod.UID)}
	wantRefusal(t, a.Authorize(t.Context(), forged, f.id("late")), "caller-pod-gone", "runs as ServiceAccount other")
}

// Authorize before Start's sync is the CA's failure, not a refusal; the caller's own
// identity needs no cache.
func TestAuthorizeBeforeStart(t *testing.T) {
	a, err := NewNodeAuthorizer(kubernetes.NewForConfigOrDie(&rest.Config{Host: "http://127.0.0.1:1"}), []string{"ns/proxy"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	caller := ca.Caller{Namespace: "ns", ServiceAccount: "proxy", PodName: "p", PodUID: "u", NodeName: "n"}
	err = a.Authorize(t.Context(), caller, identity.ForServiceAccount("cluster.local", "ns", "app"))
	if err == nil || ca.RefusalReason(err) != "" {
		t.Fatalf("before Start: %v, want a failure that is no refusal", err)
	}
	if err := a.Authorize(t.Context(), caller, identity.ForServiceAccount("cluster.local", "ns", "proxy")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if err := a.Start(ctx); err == nil {
		t.Fatal("Start synced with no API server")
	}
}

func TestNewNodeAuthorizerTrustedAccounts(t *testing.T) {
	client := kubernetes.NewForConfigOrDie(&rest.Config{Host: "http://127.0.0.1:1"})
	for _, bad := range []string{"proxy", "/proxy", "ns/", "ns/a/b", ""} {
		if _, err := NewNodeAuthorizer(client, []string{"ok/proxy", bad}, nil); err == nil || !strings.Contains(err.Error(), "<namespace>/<service account>") {
			t.Errorf("%q: %v, want an error", bad, err)
		}
	}
	a, err := NewNodeAuthorizer(client, []string{" istio-system/ztunnel", "nftmesh/proxy", "nftmesh/proxy"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.trustedList != "istio-system/ztunnel, nftmesh/proxy" || !a.trusted["istio-system/ztunnel"] {
		t.Fatalf("trusted %v (%s)", a.trusted, a.trustedList)
	}
}

func TestNodeAccountIndex(t *testing.T) {
	pod := func(node, sa string, phase corev1.PodPhase) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p"},
			Spec:       corev1.PodSpec{NodeName: node, ServiceAccountName: sa},
			Status:     corev1.PodStatus{Phase: phase},
		}
	}
	for _, c := range []struct {
		pod  *corev1.Pod
		want string
	}{
		{pod("n", "sa", corev1.PodRunning), "n/ns/sa"},
		{pod("n", "sa", corev1.PodPending), "n/ns/sa"},
		{pod("n", "sa", corev1.PodUnknown), "n/ns/sa"},
		{pod("n", "sa", corev1.PodFailed), ""},
		{pod("n", "sa", corev1.PodSucceeded), ""},
		{pod("", "sa", corev1.PodPending), ""},
		{pod("n", "", corev1.PodRunning), ""},
	} {
		keys, err := nodeAccountIndex(c.pod)
		got := strings.Join(keys, ",")
		if err != nil || got != c.want {
			t.Errorf("node %q sa %q phase %s: %q, %v; want %q", c.pod.Spec.NodeName, c.pod.Spec.ServiceAccountName, c.pod.Status.Phase, got, err, c.want)
		}
	}
	stripped, _ := stripPod(pod("n", "sa", corev1.PodRunning))
	if keys, _ := nodeAccountIndex(stripped); len(keys) != 1 || keys[0] != "n/ns/sa" {
		t.Errorf("stripped pod indexed as %v", keys)
	}
}

// What a real API server cannot be made to answer: a review whose user is no
// ServiceAccount, or whose audiences are not ours; and a review that fails.
func TestAuthenticatorChecksTheReview(t *testing.T) {
	var status authnv1.TokenReviewStatus
	var fail bool
	var gotAudiences []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req authnv1.TokenReview
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			t.Errorf("review request (%s): %v", r.Header.Get("Content-Type"), err)
		}
		gotAudiences = req.Spec.Audiences
		w.Header().Set("Content-Type", "application/json")
		if fail {
			w.WriteHeader(http.StatusForbidden)
			json.NewEncoder(w).Encode(metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
				Status: metav1.StatusFailure, Reason: metav1.StatusReasonForbidden, Code: http.StatusForbidden,
				Message: `tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:x:ca" cannot create resource "tokenreviews"`})
			return
		}
		req.Status = status
		req.APIVersion, req.Kind = "authentication.k8s.io/v1", "TokenReview"
		json.NewEncoder(w).Encode(req)
	}))
	defer srv.Close()
	authn := NewAuthenticator(kubernetes.NewForConfigOrDie(&rest.Config{Host: srv.URL, ContentConfig: rest.ContentConfig{ContentType: "application/json"}}), nil)
	saUser := authnv1.UserInfo{
		Username: "system:serviceaccount:ns:proxy",
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:ns", "system:authenticated"},
		Extra: map[string]authnv1.ExtraValue{
			extraPodName: {"proxy-a"}, extraPodUID: {"uid-1"}, extraNodeName: {"node-a"},
			"authentication.kubernetes.io/credential-id": {"JTI=x"},
		},
	}

	status = authnv1.TokenReviewStatus{Authenticated: true, User: saUser, Audiences: []string{"istio-ca"}}
	caller, err := authn.Authenticate(t.Context(), jwtShaped())
	if err != nil {
		t.Fatal(err)
	}
	if want := (ca.Caller{Namespace: "ns", ServiceAccount: "proxy", PodName: "proxy-a", PodUID: "uid-1", NodeName: "node-a"}); caller != want {
		t.Fatalf("caller %+v, want %+v", caller, want)
	}
	if len(gotAudiences) != 1 || gotAudiences[0] != DefaultAudience {
		t.Fatalf("review asked for audiences %v, want [%s]", gotAudiences, DefaultAudience)
	}

	status.Audiences = []string{"other"}
	_, err = authn.Authenticate(t.Context(), jwtShaped())
	wantRefusal(t, err, "unauthenticated", "ns/proxy", "audiences [other], none of ours (istio-ca)")
	status.Audiences = nil
	wantRefusal(t, second(authn.Authenticate(t.Context(), jwtShaped())), "unauthenticated", "none of ours")

	status.Audiences = []string{"istio-ca"}
	for _, user := range []string{"admin", "system:serviceaccount:ns", "system:serviceaccount::proxy", "system:serviceaccount:ns:", "system:serviceaccount:ns:a:b", "system:node:n"} {
		status.User = saUser
		status.User.Username = user
		wantRefusal(t, second(authn.Authenticate(t.Context(), jwtShaped())), "unauthenticated", `user "`+user+`" is not a ServiceAccount`)
	}
	status.User = saUser
	status.User.Groups = []string{"system:authenticated"}
	wantRefusal(t, second(authn.Authenticate(t.Context(), jwtShaped())), "unauthenticated", "is not a ServiceAccount")

	status = authnv1.TokenReviewStatus{Authenticated: false, Error: "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}
	wantRefusal(t, second(authn.Authenticate(t.Context(), jwtShaped())), "unauthenticated", "cryptographic primitive")
	wantRefusal(t, second(authn.Authenticate(t.Context(), "")), "unauthenticated", "no bearer token")

	fail = true
	_, err = authn.Authenticate(t.Context(), jwtShaped())
	if err == nil || ca.RefusalReason(err) != "" || !strings.Contains(err.Error(), "forbidden") {
		t.Fatalf("a failed review: %v, want a failure that is no refusal and says why", err)
	}
}

// A non-ServiceAccount token the API server accepts (the control plane's admin) is refused.
func TestAuthenticatorRefusesNonServiceAccount(t *testing.T) {
	f := newFixture(t)
	_, issuer := signingKey(t, f.cp) // the API server's audience defaults to its issuer
	authn := NewAuthenticator(f.cp.Client, []string{issuer})
	_, err := authn.Authenticate(t.Context(), f.cp.RESTConfig.BearerToken)
	// The control plane's admin token is a static token, not a JWT: refused without a review.
	wantRefusal(t, err, "unauthenticated", `not a ServiceAccount token`)
}

func second[T any](_ T, err error) error { return err }

var jwtCounter atomic.Int64

// jwtShaped is a new token of a JWT's shape (three dot-separated parts) each time: the
// authenticator asks the API server only about such tokens, and remembers each answer.
func jwtShaped() string { return fmt.Sprintf("header.claims%d.signature", jwtCounter.Add(1)) }

// The authenticator asks the API server once per token within reviewCacheTTL, good or
// bad, and not at all about a token that is no JWT.
func TestAuthenticatorCachesReviews(t *testing.T) {
	var reviews atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reviews.Add(1)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(authnv1.TokenReview{TypeMeta: metav1.TypeMeta{Kind: "TokenReview", APIVersion: "authentication.k8s.io/v1"},
			Status: authnv1.TokenReviewStatus{Authenticated: false, Error: "invalid bearer token"}})
	}))
	defer srv.Close()
	client, err := kubernetes.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	authn := NewAuthenticator(client, nil)
	bad := jwtShaped()
	for range 50 {
		wantRefusal(t, second(authn.Authenticate(t.Context(), bad)), "unauthenticated", "invalid bearer token")
	}
	if n := reviews.Load(); n != 1 {
		t.Errorf("%d TokenReviews for one token asked 50 times, want 1", n)
	}
	wantRefusal(t, second(authn.Authenticate(t.Context(), "not-a-jwt")), "unauthenticated", "not a ServiceAccount token")
	if n := reviews.Load(); n != 1 {
		t.Errorf("a token that is no JWT was reviewed (%d reviews)", n)
	}
}

func errString(err error) string {
	if err == nil {
		return "allowed"
	}
	return err.Error()
}
