package e2e

import (
	"testing"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/nettest"
)

// TestProxyWorkers: --workers sets how many threads run the proxy's Go code, and the start
// line says so (7: more than this machine's CPUs, so not Go's default). The proxy starts
// without an agent: it waits for one.
func TestProxyWorkers(t *testing.T) {
	m := &Mesh{tb: t, Dir: t.TempDir(), agentLogs: &nettest.SyncBuffer{}, Intent: compiler.DefaultIntent()}
	m.writeFiles()
	node := nettest.New(t)
	p := StartProxy(t, "workers", node, append(m.ProxyArgs(m.Dir+"/no-agent.sock"), "--workers", "7")...)
	p.WaitLine(t, "proxy started", "with workers 7", func(l LogLine) bool {
		w, ok := l["workers"].(float64)
		return ok && w == 7
	})
}
