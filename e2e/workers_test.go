package e2e

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

// TestProxyWorkers: --workers sets how many threads run the proxy's Go code, and the start
// line says so (7: more than this machine's CPUs, so not Go's default); without it, the
// default rule applies. The proxy starts without an agent: it waits for one.
func TestProxyWorkers(t *testing.T) {
	m := &Mesh{tb: t, Dir: t.TempDir(), agentLogs: &nettest.SyncBuffer{}, Intent: compiler.DefaultIntent()}
	m.writeFiles()
	node := nettest.New(t)
	p := StartProxy(t, "workers", node, append(m.ProxyArgs(m.Dir+"/no-agent.sock"), "--workers", "7")...)
	p.WaitLine(t, "proxy started", "with workers 7", func(l LogLine) bool {
		w, ok := l["workers"].(float64)
		return ok && w == 7
	})

	// Without the flag: a quarter of the CPUs, at least one, unless a CPU limit (which
	// lowers Go's default GOMAXPROCS, here as in the proxy) or $GOMAXPROCS says otherwise.
	want := max(1, (runtime.NumCPU()+3)/4)
	if os.Getenv("GOMAXPROCS") != "" || runtime.GOMAXPROCS(0) < runtime.NumCPU() {
		want = runtime.GOMAXPROCS(0)
	}
	d := StartProxy(t, "default-workers", nettest.New(t), m.ProxyArgs(m.Dir+"/no-agent-2.sock")...)
	d.WaitLine(t, "proxy started", fmt.Sprintf("with workers %d", want), func(l LogLine) bool {
		w, ok := l["workers"].(float64)
		return ok && int(w) == want
	})
}
