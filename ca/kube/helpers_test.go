package kube

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nftmesh/nftmesh/ca"
	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if err := kubetest.StopShared(); err != nil {
		code = 1
	}
	os.Exit(code)
}

const (
	audience = "istio-ca"
	nodeA    = "node-a"
	nodeB    = "node-b"
	proxySA  = "proxy" // the trusted node proxies' ServiceAccount
)

// fixture is a fresh namespace of the shared control plane, with the proxies'
// ServiceAccount created and trusted, an Authenticator and a started NodeAuthorizer.
type fixture struct {
	cp    *kubetest.ControlPlane
	ns    string
	authn ca.Authenticator
	authz *NodeAuthorizer
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	cp := kubetest.Shared(t)
	f := &fixture{cp: cp, ns: cp.Namespace(t, nil)}
	f.account(t, proxySA)
	f.authn = NewAuthenticator(cp.Client, []string{audience})
	f.authz = f.startAuthorizer(t, t.Context(), f.ns+"/"+proxySA)
	return f
}

// startAuthorizer starts a NodeAuthorizer whose informer runs until ctx ends.
func (f *fixture) startAuthorizer(t *testing.T, ctx context.Context, trusted ...string) *NodeAuthorizer {
	t.Helper()
	a, err := NewNodeAuthorizer(f.cp.Client, trusted, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return a
}

func (f *fixture) account(t *testing.T, name string) *corev1.ServiceAccount {
	t.Helper()
	sa, err := f.cp.Client.CoreV1().ServiceAccounts(f.ns).Create(context.Background(),
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return sa
}

// pod creates a pod of ServiceAccount sa on node, with a running status.
func (f *fixture) pod(t *testing.T, name, node, sa string) *corev1.Pod {
	t.Helper()
	return f.cp.RunningPod(t, kubetest.PodSpec{Namespace: f.ns, Name: name, NodeName: node, ServiceAccountName: sa})
}

// token mints a token of ServiceAccount sa for audiences (none: audience), bound to pod
// unless it is nil, for 600 s (TokenRequest's minimum).
func (f *fixture) token(t *testing.T, sa string, pod *corev1.Pod, audiences ...string) string {
	t.Helper()
	if len(audiences) == 0 {
		audiences = []string{audience}
	}
	req := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: new(int64(600))}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := f.cp.Client.CoreV1().ServiceAccounts(f.ns).CreateToken(context.Background(), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token of %s/%s: %v", f.ns, sa, err)
	}
	return tr.Status.Token
}

// caller authenticates token, which must pass.
func (f *fixture) caller(t *testing.T, token string) ca.Caller {
	t.Helper()
	c, err := f.authn.Authenticate(t.Context(), token)
	if err != nil {
		t.Fatalf("Authenticate: %v", err)
	}
	return c
}

func (f *fixture) id(sa string) identity.ID {
	return identity.ForServiceAccount(identity.DefaultTrustDomain, f.ns, sa)
}

// waitIndexed waits until the authorizer's index has (want) or lacks a pod of sa on node.
func waitIndexed(t *testing.T, a *NodeAuthorizer, node, ns, sa string, want bool) {
	t.Helper()
	key := nodeAccountKey(node, ns, sa)
	deadline := time.Now().Add(10 * time.Second)
	for {
		keys, err := a.pods.GetIndexer().IndexKeys(byNodeAccount, key)
		if err != nil {
			t.Fatal(err)
		}
		if (len(keys) > 0) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("index %q: has %v, want a pod: %v", key, keys, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// wantRefusal fails unless err is a ca.Refusal with reason whose message holds every
// one of parts.
func wantRefusal(t *testing.T, err error, reason string, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("allowed, want refusal %q", reason)
	}
	if got := ca.RefusalReason(err); got != reason {
		t.Fatalf("error %q: reason %q, want %q", err, got, reason)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not say %q", err, p)
		}
	}
}

// eventually retries fn until it returns nil, for up to 10 s, and fails with its last error.
func eventually(t *testing.T, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// signingKey is the control plane's service-account signing key and issuer, from
// kube-apiserver's command line (internal/controlplane writes the key file in the
// control plane's directory and does not export its path).
func signingKey(t *testing.T, cp *kubetest.ControlPlane) (*ecdsa.PrivateKey, string) {
	t.Helper()
	_, pid := cp.PIDs()
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var keyFile, issuer string
	for arg := range bytes.SplitSeq(cmdline, []byte{0}) {
		if v, ok := strings.CutPrefix(string(arg), "--service-account-signing-key-file="); ok {
			keyFile = v
		}
		if v, ok := strings.CutPrefix(string(arg), "--service-account-issuer="); ok {
			issuer = v
		}
	}
	if keyFile == "" || issuer == "" {
		t.Fatalf("kube-apiserver (pid %d) has no --service-account-signing-key-file or --service-account-issuer: %q", pid, cmdline)
	}
	data, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s: no PEM", keyFile)
	}
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", keyFile, err)
	}
	return key, issuer
}

// signToken signs claims as kube-apiserver does a service-account token: ES256, with the
// key ID kube-apiserver derives from the public key (base64url of the SHA-256 of its
// PKIX DER).
func signToken(t *testing.T, key *ecdsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	kid := sha256.Sum256(der)
	header, _ := json.Marshal(map[string]string{"alg": "ES256", "kid": base64.RawURLEncoding.EncodeToString(kid[:])})
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	signed := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(payload)
	digest := sha256.Sum256([]byte(signed))
	r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64) // JWS ES256: R and S, 32 bytes each, big-endian
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// boundClaims are the claims of a token of ServiceAccount sa bound to pod, as
// kube-apiserver's TokenRequest writes them (k8s.io/kubernetes pkg/serviceaccount/claims.go),
// valid from iat to exp.
func boundClaims(issuer string, sa *corev1.ServiceAccount, pod *corev1.Pod, iat, exp time.Time) map[string]any {
	ref := func(name string, uid any) map[string]any { return map[string]any{"name": name, "uid": uid} }
	return map[string]any{
		"iss": issuer,
		"sub": "system:serviceaccount:" + sa.Namespace + ":" + sa.Name,
		"aud": []string{audience},
		"iat": iat.Unix(),
		"nbf": iat.Unix(),
		"exp": exp.Unix(),
		"jti": fmt.Sprintf("nftmesh-test-%d", time.Now().UnixNano()),
		"kubernetes.io": map[string]any{
			"namespace":      sa.Namespace,
			"serviceaccount": ref(sa.Name, sa.UID),
			"pod":            ref(pod.Name, pod.UID),
			"node":           map[string]any{"name": pod.Spec.NodeName},
		},
	}
}

// testLog is where an authorizer logs: the test's log when -v, else nowhere.
func testLog(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}
