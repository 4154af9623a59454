package agent

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
)

// fakeProc makes a /proc-like tree: each process a cgroup file and an ns/net link to a
// real namespace.
func fakeProc(t *testing.T, procs map[string][2]string) string {
	root := t.TempDir()
	for pid, p := range procs {
		dir := filepath.Join(root, pid)
		os.MkdirAll(filepath.Join(dir, "ns"), 0o755)
		os.WriteFile(filepath.Join(dir, "cgroup"), []byte(p[0]), 0o644)
		if err := os.Symlink(p[1], filepath.Join(dir, "ns", "net")); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(root, "self"), 0o755) // not a PID: skipped
	return root
}

func TestNetNSScanner(t *testing.T) {
	nettest.Require(t)
	pod, other := nettest.New(t), nettest.New(t)
	pod.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	pod.MustRun(t, "ip", "addr", "add", "10.9.0.5/24", "dev", "eth0")
	other.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	other.MustRun(t, "ip", "addr", "add", "10.9.0.6/24", "dev", "eth0")
	uid := "0b6c3bd0-6a4e-4b54-9b0b-2b3a3f1f2d11"
	systemd := "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b6c3bd0_6a4e_4b54_9b0b_2b3a3f1f2d11.slice/cri-containerd-1.scope\n"
	cgroupfs := "0::/kubepods/besteffort/pod" + uid + "/abc\n"
	ip := []netip.Addr{netip.MustParseAddr("10.9.0.5")}

	for name, cg := range map[string]string{"systemd": systemd, "cgroupfs": cgroupfs} {
		root := fakeProc(t, map[string][2]string{
			"100": {"0::/system.slice/containerd.service\n", pod.Path}, // not the pod's cgroup
			"200": {cg, other.Path},                                    // the pod's cgroup, another namespace (host network, reused PID)
			"300": {cg, pod.Path},
		})
		got, err := (&NetNSScanner{ProcRoot: root}).Find(uid, ip)
		if err != nil || got != filepath.Join(root, "300", "ns", "net") {
			t.Errorf("%s: %q, %v; want process 300's namespace", name, got, err)
		}
	}
	root := fakeProc(t, map[string][2]string{"300": {cgroupfs, other.Path}})
	if _, err := (&NetNSScanner{ProcRoot: root}).Find(uid, ip); !errors.Is(err, ErrNetNSNotFound) {
		t.Errorf("no namespace with the IP: %v, want ErrNetNSNotFound", err)
	}
}
