package zds

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/nftmesh/nftmesh/zds/zdspb"
)

func TestHelloAndSnapshot(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	nsA, nsB := newNetNS(t), newNetNS(t)
	infoA := WorkloadInfo{Name: "sleep-1", Namespace: "default", ServiceAccount: "sleep"}
	s, _ := startServer(t, path, func() []SnapshotEntry {
		return []SnapshotEntry{
			{UID: "a", Info: infoA, NetNS: nsA},
			{UID: "b", Info: WorkloadInfo{Name: "b"}, NetNS: nsB},
			{UID: "c"}, // no netns: Keep
		}
	})
	h := newRecHandler(t)
	startClient(t, path, h)
	waitReady(t, s, 1)
	h.waitEvents(t, "add a", "add b", "keep c", "snapshot [a b c]")

	if !sameFile(t, h.file("a"), nsA.File()) || !sameFile(t, h.file("b"), nsB.File()) {
		t.Errorf("handler did not receive the snapshot's netns descriptors")
	}
	h.mu.Lock()
	gotInfo := h.infos["a"]
	if !h.inSnap["a"] || !h.inSnap["b"] {
		t.Errorf("snapshot Adds not marked InSnapshot: %v", h.inSnap)
	}
	h.mu.Unlock()
	if gotInfo != infoA {
		t.Errorf("info %+v, want %+v", gotInfo, infoA)
	}
	// The server hands over a duplicate; the agent's own files stay open.
	if _, err := nsA.File().Stat(); err != nil {
		t.Errorf("server closed the caller's netns: %v", err)
	}
}

func TestAddAndDelAfterSnapshot(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	s, _ := startServer(t, path, nil)
	h := newRecHandler(t)
	startClient(t, path, h)
	waitReady(t, s, 1)

	ctx := ctxT(t)
	ns := newNetNS(t)
	if err := s.AddWorkload(ctx, "x", WorkloadInfo{Name: "x", Namespace: "ns", ServiceAccount: "sa"}, ns); err != nil {
		t.Fatal(err)
	}
	if !sameFile(t, h.file("x"), ns.File()) {
		t.Errorf("handler got another file")
	}
	if err := s.DelWorkload(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	h.waitEvents(t, "snapshot []", "add x", "del x")
	h.mu.Lock()
	if h.inSnap["x"] {
		t.Error("an Add after the snapshot is marked InSnapshot")
	}
	h.mu.Unlock()
	if len(h.Workloads()) != 0 {
		t.Errorf("workloads left: %v", h.Workloads())
	}
}

// An upgrade overlaps two proxies: adds go to the newest, dels to both.
func TestUpgradeOverlap(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	s, _ := startServer(t, path, nil)
	oldP, newP := newRecHandler(t), newRecHandler(t)
	stopOld := startClient(t, path, oldP)
	waitReady(t, s, 1)
	startClient(t, path, newP)
	waitReady(t, s, 2)

	ctx := ctxT(t)
	if err := s.AddWorkload(ctx, "p", WorkloadInfo{}, openNetNS(t)); err != nil {
		t.Fatal(err)
	}
	if err := s.DelWorkload(ctx, "q"); err != nil {
		t.Fatal(err)
	}
	newP.waitEvents(t, "snapshot []", "add p", "del q")
	oldP.waitEvents(t, "snapshot []", "del q")

	// The old proxy leaves: adds keep working, on the new one.
	stopOld()
	if err := s.AddWorkload(ctx, "r", WorkloadInfo{}, openNetNS(t)); err != nil {
		t.Fatal(err)
	}
	newP.waitEvents(t, "snapshot []", "add p", "del q", "add r")
}

func TestAddWithoutProxyFailsClosed(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	s, _ := startServer(t, path, nil)
	ctx := ctxT(t)
	ns := openNetNS(t)
	if err := s.AddWorkload(ctx, "a", WorkloadInfo{}, ns); !errors.Is(err, ErrNoProxy) {
		t.Fatalf("add with no proxy: got %v, want ErrNoProxy", err)
	}
	// A del with nobody to tell is not an error: a proxy that connects later gets a snapshot
	// without the pod.
	if err := s.DelWorkload(ctx, "a"); err != nil {
		t.Fatalf("del with no proxy: %v", err)
	}

	// The only proxy leaves: fail closed again.
	h := newRecHandler(t)
	stop := startClient(t, path, h)
	waitReady(t, s, 1)
	if err := s.AddWorkload(ctx, "a", WorkloadInfo{}, ns); err != nil {
		t.Fatal(err)
	}
	stop()
	waitFor(t, "the proxy connection to drop", func() bool { return s.newest() == nil })
	if err := s.AddWorkload(ctx, "b", WorkloadInfo{}, ns); !errors.Is(err, ErrNoProxy) {
		t.Fatalf("add after the proxy left: got %v, want ErrNoProxy", err)
	}
	// The proxy keeps its workloads while disconnected.
	if got := h.Workloads(); !slices.Equal(got, []string{"a"}) {
		t.Errorf("workloads %v, want [a]", got)
	}
}

func TestHandlerErrorBecomesAckError(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	h := newRecHandler(t)
	h.fail["bad"] = errors.New("listeners: address in use")
	h.fail["baddel"] = errors.New("drain failed")
	s, _ := startServer(t, path, nil)
	startClient(t, path, h)
	waitReady(t, s, 1)
	ctx := ctxT(t)

	err := s.AddWorkload(ctx, "bad", WorkloadInfo{}, openNetNS(t))
	var ae *AckError
	if !errors.As(err, &ae) || !strings.Contains(ae.Msg, "listeners: address in use") {
		t.Fatalf("add: got %v, want an AckError with the handler's error", err)
	}
	err = s.DelWorkload(ctx, "baddel")
	if !errors.As(err, &ae) || !strings.Contains(ae.Msg, "drain failed") {
		t.Fatalf("del: got %v, want an AckError with the handler's error", err)
	}
	// The connection is still in step.
	if err := s.AddWorkload(ctx, "good", WorkloadInfo{}, openNetNS(t)); err != nil {
		t.Fatal(err)
	}
	h.waitEvents(t, "snapshot []", "add bad", "del baddel", "add good")
}

// TestMalformedRequests drives the client from a raw peer with what a correct agent never sends.
// Each gets an error Ack, no descriptor leaks, and the client keeps serving.
func TestMalformedRequests(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	_, accept := rawAgent(t, path)
	h := newRecHandler(t)
	startClient(t, path, h)
	p := accept()

	f1, f2 := openNetNS(t).File(), newNetNS(t).File()
	plain := openFile(t, "plain")
	many := make([]*os.File, 40) // more than the client has room for: MSG_CTRUNC
	for i := range many {
		many[i] = f1
	}
	tag := func(num protowire.Number) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), nil)
	}
	mustMarshal := func(m *zdspb.WorkloadRequest) []byte {
		b, err := marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	keep := &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Keep{Keep: &zdspb.KeepWorkload{Uid: "k"}}}

	tests := []struct {
		name    string
		b       []byte
		files   []*os.File
		wantErr string
	}{
		{"garbage", []byte{0xff, 0xff, 0xff, 0xff}, nil, "malformed"},
		{"garbage with fd", []byte{0x0a, 0x7f}, []*os.File{f1}, "malformed"},
		{"add without fd", mustMarshal(addMsg("a")), nil, "exactly one netns descriptor, got 0"},
		{"add with two fds", mustMarshal(addMsg("a")), []*os.File{f1, f2}, "exactly one netns descriptor, got 2"},
		{"add with 40 fds", mustMarshal(addMsg("a")), many, "truncated"},
		{"add with empty uid", mustMarshal(addMsg("")), []*os.File{f1}, "need a uid"},
		{"add with a plain file", mustMarshal(addMsg("a")), []*os.File{plain}, "not a network namespace"},
		{"keep with fd", mustMarshal(keep), []*os.File{f1}, "keep with 1 descriptor"},
		{"del with fd", mustMarshal(delRequest("d")), []*os.File{f1}, "del with 1 descriptor"},
		{"del with empty uid", mustMarshal(delRequest("")), nil, "empty uid"},
		{"snapshot sent with fd", mustMarshal(snapshotSentMsg()), []*os.File{f2}, "snapshot_sent with 1 descriptor"},
		{"unknown oneof field", tag(9), nil, "unknown request (field [9])"},
		{"unknown field with fd", tag(4), []*os.File{f1}, "with 1 descriptor"},
		{"oversized", append(tag(9), make([]byte, maxPacket)...), nil, "longer than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := countFDs(t)
			p.send(tt.b, tt.files...)
			got := p.ack()
			if got == "" || !strings.Contains(got, tt.wantErr) {
				t.Fatalf("ack %q, want an error containing %q", got, tt.wantErr)
			}
			// The client closes what it received before it acks.
			if after := countFDs(t); after > before {
				t.Fatalf("descriptors %d -> %d: received ones not closed\n%s", before, after, fdList())
			}
		})
	}
	// Still serving, and in step: a valid snapshot and add are acked OK.
	p.sendMsg(snapshotSentMsg())
	if got := p.ack(); got != "" {
		t.Fatalf("snapshot sent: %q", got)
	}
	for _, tt := range []struct {
		name    string
		m       *zdspb.WorkloadRequest
		wantErr string
	}{
		{"keep after snapshot", keep, "after the snapshot"},
		{"second snapshot sent", snapshotSentMsg(), "second SnapshotSent"},
	} {
		p.sendMsg(tt.m)
		if got := p.ack(); !strings.Contains(got, tt.wantErr) {
			t.Errorf("%s: ack %q, want an error containing %q", tt.name, got, tt.wantErr)
		}
	}
	p.sendMsg(addMsg("ok"), f2)
	if got := p.ack(); got != "" {
		t.Fatalf("add after malformed requests: %q", got)
	}
	h.waitEvents(t, "snapshot [a]", "add ok") // a: named by the Add with a plain file
	if !sameFile(t, h.file("ok"), f2) {
		t.Errorf("handler got another file")
	}
}

// TestReconnect restarts the agent: the proxy keeps its workloads while it is away, and the new
// agent's snapshot, which no longer names one of them, makes the handler drain it.
func TestReconnect(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	nsA, nsB := newNetNS(t), newNetNS(t)
	s1, stop1 := startServer(t, path, func() []SnapshotEntry {
		return []SnapshotEntry{{UID: "a", NetNS: nsA}, {UID: "b", NetNS: nsB}}
	})
	h := newRecHandler(t)
	startClient(t, path, h)
	waitReady(t, s1, 1)
	h.waitEvents(t, "add a", "add b", "snapshot [a b]")
	fileB := h.file("b")

	stop1()
	time.Sleep(50 * time.Millisecond) // several reconnect attempts against nothing
	if got := h.Workloads(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("workloads while disconnected %v, want [a b]", got)
	}

	// The new agent cannot reopen a's netns (Keep) and no longer knows b.
	s2, _ := startServer(t, path, func() []SnapshotEntry { return []SnapshotEntry{{UID: "a"}} })
	waitReady(t, s2, 1)
	h.waitEvents(t, "add a", "add b", "snapshot [a b]", "keep a", "snapshot [a]")
	if got := h.Workloads(); !slices.Equal(got, []string{"a"}) {
		t.Errorf("workloads after the new snapshot %v, want [a]", got)
	}
	if _, err := fileB.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("drained workload's netns not closed: %v", err)
	}
	if !sameFile(t, h.file("a"), nsA.File()) {
		t.Errorf("kept workload lost its netns")
	}
}

func TestHelloVersion(t *testing.T) {
	tests := []struct {
		name  string
		hello []byte
		ok    bool
	}{
		{"V1", []byte{0x08, 0x01}, true},
		{"version 2", []byte{0x08, 0x02}, false},
		{"NOT_USED (empty packet)", nil, false},
		{"garbage", []byte{0xff}, false},
		{"not a hello", []byte{0x12, 0x00}, false}, // unknown field only: version unset
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			path := sockPath(t)
			s, _ := startServer(t, path, nil)
			p := rawDial(t, path)
			if tt.hello == nil {
				// WriteMsgUnix sends a zero-length packet for an empty payload without oob.
				p.c.Write(nil)
			} else {
				p.send(tt.hello)
			}
			b, files, err := p.tryRecv()
			if tt.ok {
				if err != nil || len(files) != 0 || string(b) != string(mustMarshalT(t, snapshotSentMsg())) {
					t.Fatalf("got %x, %v; want SnapshotSent", b, err)
				}
				p.sendAck("")
				waitReady(t, s, 1)
				return
			}
			if err == nil {
				t.Fatalf("server answered %x to a bad hello; want the connection closed", b)
			}
			if s.newest() != nil {
				t.Errorf("server kept the connection")
			}
		})
	}
}

func mustMarshalT(t *testing.T, m *zdspb.WorkloadRequest) []byte {
	b, err := marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestAckTimeoutDropsConnection: a proxy that does not ack in time is dropped (the connection is
// out of step), and it reconnects and gets a new snapshot.
func TestAckTimeoutDropsConnection(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	ns := openNetNS(t)
	s, _ := startServer(t, path, nil, 100*time.Millisecond)
	h := newRecHandler(t)
	release := make(chan struct{})
	h.hold["slow"] = release
	startClient(t, path, h)
	waitReady(t, s, 1)
	first := s.newest()

	ctx := ctxT(t)
	err := s.AddWorkload(ctx, "slow", WorkloadInfo{}, ns)
	if err == nil || !strings.Contains(err.Error(), "no ack within") {
		t.Fatalf("add to a stuck proxy: got %v, want an ack timeout", err)
	}
	close(release)
	waitFor(t, "a new connection", func() bool { sc := s.newest(); return sc != nil && sc != first })
	waitReady(t, s, 1)
	if err := s.AddWorkload(ctx, "fast", WorkloadInfo{}, ns); err != nil {
		t.Fatal(err)
	}
	h.waitEvents(t, "snapshot []", "add slow", "snapshot []", "add fast")
	// The empty snapshot drained "slow", which the agent never confirmed.
	if got := h.Workloads(); !slices.Equal(got, []string{"fast"}) {
		t.Errorf("workloads %v, want [fast]", got)
	}
}

// TestCanceledAddKeepsAcksInStep: a caller that gives up does not free the request slot before
// its Ack arrives, so the next request cannot take that Ack for its own.
func TestCanceledAddKeepsAcksInStep(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	ns := openNetNS(t)
	s, _ := startServer(t, path, nil)
	h := newRecHandler(t)
	release := make(chan struct{})
	h.hold["slow"] = release
	h.fail["slow"] = errors.New("slow failed")
	startClient(t, path, h)
	waitReady(t, s, 1)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s.AddWorkload(ctx, "slow", WorkloadInfo{}, ns); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("canceled add: got %v", err)
	}
	var wg sync.WaitGroup
	var fastErr error
	wg.Go(func() { fastErr = s.AddWorkload(ctxT(t), "fast", WorkloadInfo{}, ns) })
	time.Sleep(20 * time.Millisecond)
	close(release) // "slow" now acks with an error; "fast" must get its own (OK) Ack
	wg.Wait()
	if fastErr != nil {
		t.Fatalf("add after a canceled add: %v", fastErr)
	}
	h.waitEvents(t, "snapshot []", "add slow", "add fast")
}

// TestAddDuringSnapshot: an add for a proxy whose snapshot is still streaming queues behind it.
func TestAddDuringSnapshot(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	nsA := openNetNS(t)
	s, _ := startServer(t, path, func() []SnapshotEntry { return []SnapshotEntry{{UID: "a", NetNS: nsA}} })
	h := newRecHandler(t)
	release := make(chan struct{})
	h.hold["a"] = release
	startClient(t, path, h)
	waitFor(t, "the proxy to connect", func() bool { return s.newest() != nil })

	errc := make(chan error, 1)
	go func() { errc <- s.AddWorkload(ctxT(t), "z", WorkloadInfo{}, nsA) }()
	time.Sleep(20 * time.Millisecond)
	close(release)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	h.waitEvents(t, "add a", "snapshot [a]", "add z")
}

// A snapshot entry whose netns was closed meanwhile (the pod went away) is left out.
func TestSnapshotSkipsClosedNetNS(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	gone := newNetNS(t)
	gone.Close()
	s, _ := startServer(t, path, func() []SnapshotEntry {
		return []SnapshotEntry{{UID: "gone", NetNS: gone}, {UID: "k"}}
	})
	h := newRecHandler(t)
	startClient(t, path, h)
	waitReady(t, s, 1)
	h.waitEvents(t, "keep k", "snapshot [k]")
	if err := s.AddWorkload(ctxT(t), "x", WorkloadInfo{}, gone); err == nil {
		t.Errorf("add with a closed netns succeeded")
	}
	// That failure did not cost the connection.
	if err := s.AddWorkload(ctxT(t), "y", WorkloadInfo{}, openNetNS(t)); err != nil {
		t.Fatal(err)
	}
}

// TestClientAgainstRawAgent checks the client's side of the wire directly: Hello, then one Ack per
// request, in order.
func TestClientAgainstRawAgent(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	_, accept := rawAgent(t, path)
	h := newRecHandler(t)
	h.fail["bad"] = errors.New("nope")
	startClient(t, path, h)
	p := accept()
	ns := openNetNS(t)
	steps := []struct {
		m       *zdspb.WorkloadRequest
		fd      bool
		wantErr string
	}{
		{addMsg("a"), true, ""},
		{keepRequest("k"), false, ""},
		{addMsg("bad"), true, "nope"},
		{snapshotSentMsg(), false, ""},
		{delRequest("a"), false, ""},
	}
	for _, st := range steps {
		if st.fd {
			p.sendMsg(st.m, ns.File())
		} else {
			p.sendMsg(st.m)
		}
		if got := p.ack(); (st.wantErr == "") != (got == "") || !strings.Contains(got, st.wantErr) {
			t.Errorf("%v: ack %q, want %q", st.m, got, st.wantErr)
		}
	}
	h.waitEvents(t, "add a", "keep k", "add bad", "snapshot [a bad k]", "del a")
}

func TestClientConfig(t *testing.T) {
	if err := (&Client{}).Run(context.Background()); err == nil {
		t.Error("Run without a handler succeeded")
	}
}

// TestNoLeaksUnderChurn runs many adds, dels and reconnects, then shuts everything down: every
// descriptor and goroutine must be gone.
func TestNoLeaksUnderChurn(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	ns := openNetNS(t)
	h1, h2 := newRecHandler(t), newRecHandler(t)
	snap := func() []SnapshotEntry { return []SnapshotEntry{{UID: "s1", NetNS: ns}, {UID: "s2"}} }
	startClient(t, path, h2) // lives through every agent restart
	for round := range 3 {
		s, stop := startServer(t, path, snap)
		stopC1 := startClient(t, path, h1)
		waitReady(t, s, 2)
		ctx := ctxT(t)
		for i := range 20 {
			uid := string(rune('a'+round)) + string(rune('a'+i))
			if err := s.AddWorkload(ctx, uid, WorkloadInfo{}, ns); err != nil {
				t.Fatal(err)
			}
			if i%2 == 0 {
				if err := s.DelWorkload(ctx, uid); err != nil {
					t.Fatal(err)
				}
			}
		}
		stopC1()
		stop()
	}
}

// TestServerAgainstRawProxy checks the server's side of the wire directly: the snapshot's
// requests and descriptors, a stray descriptor from the proxy (closed), and an Ack nobody asked
// for (the connection is out of step: dropped).
func TestServerAgainstRawProxy(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	ns := newNetNS(t)
	info := WorkloadInfo{Name: "n", Namespace: "ns", ServiceAccount: "sa"}
	s, _ := startServer(t, path, func() []SnapshotEntry {
		return []SnapshotEntry{{UID: "a", Info: info, NetNS: ns}, {UID: "k"}}
	})
	p := rawDial(t, path)
	p.sendMsg(&zdspb.ZdsHello{Version: zdspb.Version_V1})

	req, files := p.request()
	if req.GetAdd().GetUid() != "a" || infoFromPB(req.GetAdd().GetWorkloadInfo()) != info || len(files) != 1 || !sameFile(t, files[0], ns.File()) {
		t.Fatalf("first request %v with %d fds, want add a with its netns", req, len(files))
	}
	files[0].Close()
	before := countFDs(t)
	stray := openFile(t, "stray")
	p.sendMsg(&zdspb.WorkloadResponse{Payload: &zdspb.WorkloadResponse_Ack{Ack: &zdspb.Ack{}}}, stray)
	stray.Close()
	req, files = p.request()
	if req.GetKeep().GetUid() != "k" || len(files) != 0 {
		t.Fatalf("second request %v with %d fds, want keep k", req, len(files))
	}
	if after := countFDs(t); after > before {
		t.Errorf("descriptors %d -> %d: the server kept a descriptor the proxy sent", before, after)
	}
	p.sendAck("")
	if req, _ = p.request(); req.GetSnapshotSent() == nil {
		t.Fatalf("third request %v, want snapshot_sent", req)
	}
	p.sendAck("")
	waitReady(t, s, 1)

	p.sendAck("") // unsolicited
	if _, _, err := p.tryRecv(); err == nil {
		t.Fatal("server kept a connection that sent an unsolicited ack")
	}
	waitFor(t, "the connection to be dropped", func() bool { return s.newest() == nil })
}

// TestListenSocketFile: a new agent replaces the old one's socket, the old one closing does not
// remove the new one's, and something that is not a socket is never removed.
func TestListenSocketFile(t *testing.T) {
	checkLeaks(t)
	path := sockPath(t)
	old, err := Listen(path, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	s, _ := startServer(t, path, nil)
	old.Close()
	h := newRecHandler(t)
	startClient(t, path, h)
	waitReady(t, s, 1)

	s.Close()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file left after Close: %v", err)
	}

	regular := filepath.Join(t.TempDir(), "not-a-socket")
	if err := os.WriteFile(regular, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err := Listen(regular, testLogger(t)); err == nil {
		s.Close()
		t.Fatal("Listen over a regular file succeeded")
	}
	if _, err := os.Stat(regular); err != nil {
		t.Errorf("Listen removed a regular file: %v", err)
	}
}
