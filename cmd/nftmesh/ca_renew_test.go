package main

import (
	"context"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nftmesh/nftmesh/ca"
	"github.com/nftmesh/nftmesh/internal/controlplane"
	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// The proxy's client (identity.RemoteIssuer) against the real service and a real API
// server: a held identity of a pod on the proxy's node is renewed before it expires
// although the CA is down across its half-life, and a token stolen from another node's
// proxy cannot get this node's identities.
func TestCAServeRenewalAndStolenToken(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane")
	}
	if _, err := controlplane.Binaries(); err != nil {
		t.Skip(err)
	}
	cp := kubetest.Start(t)
	ns := cp.Namespace(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	for _, sa := range []string{"nftmesh-proxy", "sleep"} {
		if _, err := cp.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	token := func(node string) string {
		pod := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "proxy-" + node, NodeName: node, ServiceAccountName: "nftmesh-proxy"})
		tr, err := cp.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "nftmesh-proxy", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
			Audiences:      []string{"istio-ca"},
			BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, node+"-token")
		if err := os.WriteFile(path, []byte(tr.Status.Token), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	tokenA, tokenB := token("node-a"), token("node-b")
	cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "sleep-1", NodeName: "node-a", ServiceAccountName: "sleep"})
	sleep := identity.ForServiceAccount("cluster.local", ns, "sleep")

	certFile, keyFile := writeCA(t, dir)
	certPEM, _ := os.ReadFile(certFile)
	keyPEM, _ := os.ReadFile(keyFile)
	signer, err := ca.NewSigner(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	// A port of our own, so that the CA comes back where the proxy dials it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	// Renewed at half: 6 s after it arrives, while the CA is down (7 s). Once the CA is
	// back, the request waiting for it reconnects within gRPC's connect backoff (0.5 s
	// doubling): with 8 s of validity the last reconnect could land just after expiry.
	const validity = 12 * time.Second
	cfg := caServeConfig{signer: signer, listen: addr, dnsNames: []string{"127.0.0.1"}, trustDomain: "cluster.local",
		trustedAccounts: []string{ns + "/nftmesh-proxy"}, audiences: []string{"istio-ca"}, maxValidity: validity,
		kubeconfig: cp.Kubeconfig}
	var logs syncWriter
	startCA := func() (stop func()) {
		sctx, cancel := context.WithCancel(context.Background())
		served, listening := make(chan error, 1), make(chan struct{})
		go func() {
			served <- serveCA(sctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)), func(string, string) { close(listening) })
		}()
		select {
		case <-listening:
		case err := <-served:
			t.Fatalf("serveCA: %v\n%s", err, logs.String())
		}
		return func() {
			cancel()
			if err := <-served; err != nil {
				t.Errorf("serveCA: %v", err)
			}
		}
	}
	stopCA := startCA()
	rootFile := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(rootFile, signer.RootPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	issuer := func(tokenFile string) *identity.RemoteIssuer {
		r, err := identity.NewRemoteIssuer(identity.RemoteOptions{Address: addr, RootFile: rootFile, TokenFile: tokenFile,
			TrustDomain: "cluster.local", Validity: validity})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}

	// A stolen token: node B's proxy asks for the identity of a pod that runs on node A only.
	if _, err := issuer(tokenB).Certificate(ctx, sleep); err == nil || !strings.Contains(err.Error(), "PermissionDenied") ||
		!strings.Contains(err.Error(), "no-pod-on-node") {
		t.Errorf("node B's token for node A's identity: %v, want PermissionDenied no-pod-on-node", err)
	}

	a := issuer(tokenA)
	a.Hold(sleep)
	first, err := a.Certificate(ctx, sleep)
	if err != nil {
		t.Fatalf("node A's proxy, a pod of node A: %v\n%s", err, logs.String())
	}
	if san := first.Leaf.URIs; len(san) != 1 || san[0].String() != sleep.String() {
		t.Errorf("SAN %v, want %s", san, sleep)
	}
	// The CA goes away before the half-life, and comes back after it, before expiry.
	stopCA()
	time.Sleep(validity/2 + time.Second)
	if _, err := a.Certificate(ctx, sleep); err != nil {
		t.Errorf("with the CA down and the certificate valid: %v", err)
	}
	stopCA = startCA()
	defer func() { stopCA() }()
	var renewed *x509.Certificate
	for deadline := first.Leaf.NotAfter; time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		c, err := a.Certificate(ctx, sleep)
		if err != nil {
			t.Fatalf("while renewing: %v", err)
		}
		if c.Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) != 0 {
			renewed = c.Leaf
			break
		}
	}
	if renewed == nil {
		t.Fatalf("not renewed before the first certificate expired (%s)\n%s", first.Leaf.NotAfter.Format(time.RFC3339Nano), logs.String())
	}
	if !renewed.NotAfter.After(first.Leaf.NotAfter) {
		t.Errorf("renewed certificate ends %s, not after the first's %s", renewed.NotAfter, first.Leaf.NotAfter)
	}
}
