package kube

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// PublishRoot creates the ConfigMap, writes nothing when it holds the root, replaces a
// different root and keeps the ConfigMap's other keys.
func TestPublishRoot(t *testing.T) {
	f := newFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cms := f.cp.Client.CoreV1().ConfigMaps(f.ns)
	get := func() map[string]string {
		cm, err := cms.Get(ctx, "root", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return cm.Data
	}
	for i, step := range []struct {
		root  string
		wrote bool
	}{{"root-1", true}, {"root-1", false}, {"root-2", true}} {
		wrote, err := PublishRoot(ctx, f.cp.Client, f.ns, "root", []byte(step.root))
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if wrote != step.wrote {
			t.Errorf("step %d: wrote %v, want %v", i, wrote, step.wrote)
		}
		if got := get()[RootKey]; got != step.root {
			t.Errorf("step %d: %s = %q, want %q", i, RootKey, got, step.root)
		}
		if i == 0 { // someone else's key beside ours
			cm, err := cms.Get(ctx, "root", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			cm.Data["other"] = "kept"
			if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if get()["other"] != "kept" {
		t.Error("another key of the ConfigMap was dropped")
	}
}
