package identity_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/ca"
	"github.com/nftmesh/nftmesh/proxy/identity"
)

// BenchmarkFirstCertificate: how long a pod's first handshake waits for its certificate,
// from RemoteIssuer.Certificate's call to its return, against nftmesh's CA service (a
// ca.Server with an Authenticator and Authorizer that answer at once) over gRPC and TLS on
// 127.0.0.1, on a connection already open (the node proxy's one channel to the CA).
//
//   - prefetched/gap=D: the proxy holds the identity when the pod is added (Hold, at the
//     ZDS Add, as proxy/instance.go does), and the pod's first connection comes D later:
//     at least the rest of the CNI ADD and the container's start. The wait is about
//     max(0, fetch - D).
//   - on-demand: no Hold; the first Certificate fetches: the wait is the whole fetch (a
//     new key and CSR, the request, the CA's checks and signature, the answer checked).
//   - cached/gap=D (the floor): Certificate of one held identity whose certificate is
//     there, D after the last call: the lookup alone, and what idling D costs it (cold
//     caches, a descheduled vCPU), which prefetched/gap=D pays too.
//
// Every op but cached's uses a new identity (no cache hit across ops) and releases it
// after. ns/op is the whole op, gap included; p50-us and p99-us are of the wait alone.
func BenchmarkFirstCertificate(b *testing.B) {
	for _, gap := range []time.Duration{0, time.Millisecond, 20 * time.Millisecond} {
		b.Run(fmt.Sprintf("prefetched/gap=%v", gap), func(b *testing.B) {
			r := benchIssuer(b)
			benchWaits(b, func(id identity.ID) time.Duration {
				r.Hold(id)
				defer r.Release(id)
				if gap > 0 {
					time.Sleep(gap)
				}
				return timedCertificate(b, r, id)
			})
		})
	}
	b.Run("on-demand", func(b *testing.B) {
		r := benchIssuer(b)
		benchWaits(b, func(id identity.ID) time.Duration {
			return timedCertificate(b, r, id)
		})
	})
	for _, gap := range []time.Duration{0, 20 * time.Millisecond} {
		b.Run(fmt.Sprintf("cached/gap=%v", gap), func(b *testing.B) {
			r := benchIssuer(b)
			id := identity.ForServiceAccount(identity.DefaultTrustDomain, "bench", "cached")
			r.Hold(id)
			defer r.Release(id)
			timedCertificate(b, r, id)
			benchWaits(b, func(identity.ID) time.Duration {
				if gap > 0 {
					time.Sleep(gap)
				}
				return timedCertificate(b, r, id)
			})
		})
	}
}

// benchWaits runs op b.N times with a fresh identity each and reports the p50 and p99 of
// the waits it returns.
func benchWaits(b *testing.B, op func(identity.ID) time.Duration) {
	waits := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		id := identity.ForServiceAccount(identity.DefaultTrustDomain, "bench", fmt.Sprintf("sa-%d-%d", b.N, i))
		waits = append(waits, op(id))
	}
	b.StopTimer()
	slices.Sort(waits)
	b.ReportMetric(float64(waits[len(waits)/2].Nanoseconds())/1e3, "p50-us")
	b.ReportMetric(float64(waits[min(len(waits)-1, len(waits)*99/100)].Nanoseconds())/1e3, "p99-us")
}

func timedCertificate(b *testing.B, r *identity.RemoteIssuer, id identity.ID) time.Duration {
	start := time.Now()
	cert, err := r.Certificate(context.Background(), id)
	wait := time.Since(start)
	if err != nil {
		b.Fatal(err)
	}
	if got, err := identity.FromCertificate(cert.Leaf); err != nil || got != id {
		b.Fatalf("certificate for %v (%v), want %v", got, err, id)
	}
	return wait
}

// benchIssuer serves a ca.Server on 127.0.0.1 until b ends and returns a RemoteIssuer
// for it whose connection is up (one certificate fetched).
func benchIssuer(b *testing.B) *identity.RemoteIssuer {
	b.Helper()
	certPEM, keyPEM, err := identity.GenerateRoot(identity.DefaultTrustDomain, 24*time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	signer, err := ca.NewSigner(certPEM, keyPEM)
	if err != nil {
		b.Fatal(err)
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := ca.NewServer(ca.Options{Signer: signer, Authenticator: instantAuthn{}, Authorizer: instantAuthz{},
		DNSNames: []string{"127.0.0.1"}, Log: quiet})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	b.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			b.Error(err)
		}
	})

	dir := b.TempDir()
	rootFile, tokenFile := filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "istio-token")
	if err := os.WriteFile(rootFile, signer.RootPEM(), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(tokenFile, []byte("proxy-token\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	r, err := identity.NewRemoteIssuer(identity.RemoteOptions{Address: ln.Addr().String(), RootFile: rootFile,
		TokenFile: tokenFile, Log: quiet})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { r.Close() })
	warm := identity.ForServiceAccount(identity.DefaultTrustDomain, "bench", "warm-up")
	if _, err := r.Certificate(context.Background(), warm); err != nil {
		b.Fatal(err)
	}
	return r
}

// instantAuthn and instantAuthz answer at once: a trusted node proxy, allowed.
type instantAuthn struct{}

func (instantAuthn) Authenticate(context.Context, string) (ca.Caller, error) {
	return ca.Caller{Namespace: "nftmesh-system", ServiceAccount: "nftmesh-proxy",
		PodName: "nftmesh-proxy-x1", PodUID: "uid-1", NodeName: "node-a"}, nil
}

type instantAuthz struct{}

func (instantAuthz) Authorize(context.Context, ca.Caller, identity.ID) error { return nil }
