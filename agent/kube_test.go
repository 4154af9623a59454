package agent

import (
	"context"
	"os"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nftmesh/nftmesh/internal/kubetest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if err := kubetest.StopShared(); err != nil {
		code = 1
	}
	os.Exit(code)
}

// The annotation carries a uid precondition: a pod deleted and recreated under its name
// is never annotated for the old one, and removing the old one's annotation is done (not
// an error retried forever: the API answers 422 Invalid there, not 409).
func TestRedirectionAnnotationOfReplacedPod(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := cp.Namespace(t, nil)
	old := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "web-0", NodeName: "n1", PodIPs: []string{"10.0.0.1"}})
	k := NewKube(cp.Client, "n1", quiet)
	defer k.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := k.Start(ctx); err != nil {
		t.Fatal(err)
	}
	oldPod := Pod{UID: string(old.UID), Name: "web-0", Namespace: ns}
	if err := k.SetRedirection(ctx, oldPod, true); err != nil {
		t.Fatal(err)
	}
	got, err := cp.Client.CoreV1().Pods(ns).Get(ctx, "web-0", metav1.GetOptions{})
	if err != nil || got.Annotations[AnnotationRedirection] != RedirectionEnabled {
		t.Fatalf("annotation after enable: %v, %v", got.Annotations, err)
	}
	cp.DeletePod(t, ns, "web-0")
	cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "web-0", NodeName: "n1", PodIPs: []string{"10.0.0.2"}})
	if err := k.SetRedirection(ctx, oldPod, false); err != nil {
		t.Errorf("removing the old pod's annotation: %v, want done", err)
	}
	err = k.SetRedirection(ctx, oldPod, true)
	if err == nil || !IsPermanent(err) {
		t.Errorf("annotating the old pod's name again: %v, want a permanent error", err)
	}
	got, err = cp.Client.CoreV1().Pods(ns).Get(ctx, "web-0", metav1.GetOptions{})
	if err != nil || got.Annotations[AnnotationRedirection] != "" {
		t.Errorf("the newer pod got the old pod's annotation: %v, %v", got.Annotations, err)
	}
}

// Enable, disable, enable in quick succession ends enabled, whatever the informer has
// seen meanwhile: the cache may still show the first enable when the second comes.
func TestRedirectionAnnotationFlip(t *testing.T) {
	cp := kubetest.Shared(t)
	ns := cp.Namespace(t, nil)
	for i := range 20 {
		name := "flip-" + string(rune('a'+i))
		p := cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: name, NodeName: "n-flip", PodIPs: []string{"10.0.1.1"}})
		k := NewKube(cp.Client, "n-flip", quiet)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := k.Start(ctx); err != nil {
			t.Fatal(err)
		}
		pod := Pod{UID: string(p.UID), Name: name, Namespace: ns}
		for _, v := range []bool{true, false, true} {
			if err := k.SetRedirection(ctx, pod, v); err != nil {
				t.Fatal(err)
			}
		}
		got, err := cp.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil || got.Annotations[AnnotationRedirection] != RedirectionEnabled {
			t.Fatalf("round %d: after enable, disable, enable: %v, %v", i, got.Annotations, err)
		}
		k.Stop()
		cancel()
	}
}
