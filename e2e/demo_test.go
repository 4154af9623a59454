package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/controlplane"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

// TestDemo runs `just demo`'s program, as CI must: the seed's walkthrough on a real
// kube-apiserver, every step checked by the demo itself (exit 0 only if all behaved), and
// nothing of it left behind.
func TestDemo(t *testing.T) {
	nettest.Require(t, "nft", "ss")
	cpDir, err := controlplane.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, demoBin, "run", "--bin-dir", binDir, "--controlplane-dir", cpDir, "--repo-dir", "..")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	text := string(out)
	for _, want := range []string{
		"only the CA holds the key",
		"table inet nftmesh",
		"ok: httpbin sees sleep's own pod IP",
		"ok: httpbin sees notsleep's own pod IP",
		"ok: the CA issued",
		"ok: no node holds the CA key",
		"ok: the CA refuses it (PermissionDenied)",
		"ok: notsleep is refused once the policy is in",
		"ok: sleep still reaches httpbin",
		"every step behaved",
		"removed the namespaces, processes and files the demo made",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q:\n%s", want, text)
		}
	}
	prefix := fmt.Sprintf("nftmesh-demo-%d-", cmd.Process.Pid)
	if list, err := exec.Command("ip", "netns", "list").Output(); err == nil && strings.Contains(string(list), prefix) {
		t.Errorf("the demo left network namespaces behind:\n%s", list)
	}
}
