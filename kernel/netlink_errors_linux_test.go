package kernel

import (
	"errors"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/internal/nettest"
)

// onThreadWithoutNetAdmin runs fn on a fresh thread whose effective capabilities lack
// CAP_NET_ADMIN (capabilities are per thread); the thread is never given back (it dies).
func onThreadWithoutNetAdmin(t *testing.T, fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			t.Errorf("capget: %v", err)
			return
		}
		data[0].Effective &^= 1 << unix.CAP_NET_ADMIN
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			t.Errorf("capset: %v", err)
			return
		}
		fn()
	}()
	<-done
}

// TestPipelinedQueriesEPERM: nfnetlink answers a sender without CAP_NET_ADMIN with one
// EPERM, for the first message of the datagram only (nfnetlink_rcv), and drops the rest.
// look (Apply with a cache, and ApplyChecked) sends GETGEN and GETTABLE together: it must
// fail at once with EPERM, as a lone request does, not wait out the receive timeout and
// report EAGAIN.
func TestPipelinedQueriesEPERM(t *testing.T) {
	onThreadWithoutNetAdmin(t, func() {
		r, err := openSocket(unix.NETLINK_NETFILTER)
		if err != nil {
			t.Errorf("socket: %v", err)
			return
		}
		defer r.Close()
		// One query: EPERM at once.
		g := genQuery()
		start := time.Now()
		err = r.executeQueries(g)
		t.Logf("GETGEN alone: err=%v q.Err=%v in %v", err, g.Err, time.Since(start))
		// Two queries in one send, as look sends them.
		var tb *query
		g, tb = genQuery(), tableQuery("nftmesh")
		start = time.Now()
		err = r.executeQueries(g, tb)
		took := time.Since(start)
		t.Logf("GETGEN+GETTABLE: err=%v gen.Err=%v table.Err=%v in %v", err, g.Err, tb.Err, took)
		if err != nil || !errors.Is(g.Err, unix.EPERM) || took > time.Second {
			t.Errorf("pipelined queries without CAP_NET_ADMIN: err=%v after %v; want the kernel's EPERM at once", err, took.Round(time.Millisecond))
		}
	})
}

// TestDumpErrorInDone: a dump that fails reports its errno in NLMSG_DONE's payload
// (netlink_dump_done), not in an NLMSG_ERROR; read as success, a failed dump would read as
// an empty one. Shown with a route dump strict checking refuses (rtm_dst_len set): the
// kernel answers DONE carrying -EINVAL.
func TestDumpErrorInDone(t *testing.T) {
	nettest.Require(t)
	c := openRouting(t, nettest.New(t))
	hdr := make([]byte, 12)
	hdr[0] = unix.AF_INET
	hdr[1] = 8 // rtm_dst_len: invalid in a dump request under NETLINK_GET_STRICT_CHK
	msgs, err := c.raw.execute(unix.RTM_GETROUTE, 0x300, hdr)
	t.Logf("execute: %d messages, err=%v", len(msgs), err)
	if err == nil {
		t.Errorf("a dump the kernel refused (errno in NLMSG_DONE) read as %d messages and no error", len(msgs))
	}
	q := &query{Type: unix.RTM_GETROUTE, Flags: 0x300, Data: hdr}
	err = c.raw.executeQueries(q)
	t.Logf("executeQueries: %d messages, err=%v, q.Err=%v", len(q.Out), err, q.Err)
	if err == nil && q.Err == nil {
		t.Errorf("executeQueries: a refused dump read as %d messages and no error", len(q.Out))
	}
}
