package zds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/zds/zdspb"
)

const waitTimeout = 5 * time.Second

func TestMain(m *testing.M) {
	// Warm up the runtime's lazily created descriptors and goroutines (netpoll), so that the
	// first test's leak baseline is not below the steady state.
	dir, err := os.MkdirTemp("", "zds-warmup")
	if err != nil {
		panic(err)
	}
	if ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: filepath.Join(dir, "s"), Net: "unixpacket"}); err == nil {
		ln.SetDeadline(time.Now())
		ln.Accept()
		ln.Close()
	}
	os.RemoveAll(dir)
	os.Exit(m.Run())
}

// testLogger logs through t, and drops lines that come after the test ended.
func testLogger(t *testing.T) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(b)))
	}
	return len(b), nil
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1 // the directory's own descriptor
}

func fdList() string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		out = append(out, e.Name()+"->"+l)
	}
	return strings.Join(out, " ")
}

// checkLeaks must be called first in a test: its cleanup runs last, after everything the test
// started has been stopped, and fails the test if descriptors or goroutines were left behind.
func checkLeaks(t *testing.T) {
	t.Helper()
	// An unclosed *os.File is closed by its finalizer at some GC: that would hide a leak, so no
	// GC while the test runs.
	gc := debug.SetGCPercent(-1)
	fds, gs := countFDs(t), runtime.NumGoroutine()
	t.Cleanup(func() {
		defer debug.SetGCPercent(gc)
		deadline := time.Now().Add(waitTimeout)
		for {
			nf, ng := countFDs(t), runtime.NumGoroutine()
			if nf <= fds && ng <= gs {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("leak: descriptors %d -> %d, goroutines %d -> %d\nfds: %s\n%s", fds, nf, gs, ng, fdList(), buf)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func sockPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "zds.sock")
}

// openNetNS returns a handle on the test's own network namespace, never entered.
func openNetNS(t *testing.T) *netns.NS {
	t.Helper()
	ns, err := netns.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// newNetNS returns a handle on a fresh, empty network namespace, so that descriptors can be
// told apart by identity. It is made on a thread that then ends: no thread of the test
// stays in it.
func newNetNS(t *testing.T) *netns.NS {
	t.Helper()
	nettest.Require(t)
	type result struct {
		ns  *netns.NS
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("unshare (needs root): %w", err)}
			return
		}
		ns, err := netns.Open("/proc/thread-self/ns/net")
		ch <- result{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.ns.Close() })
	return r.ns
}

// recHandler records calls and plays a proxy's workload table: it owns the netns files it was
// given, closes replaced ones, and drains what a snapshot leaves out.
type recHandler struct {
	mu        sync.Mutex
	events    []string
	workloads map[string]*netns.NS
	infos     map[string]WorkloadInfo
	fail      map[string]error         // per uid: AddWorkload/DelWorkload/KeepWorkload fail
	hold      map[string]chan struct{} // per uid: AddWorkload waits for the channel to close
	inSnap    map[string]bool          // per uid: InSnapshot of its last Add's ctx
}

func newRecHandler(t *testing.T) *recHandler {
	h := &recHandler{workloads: map[string]*netns.NS{}, infos: map[string]WorkloadInfo{},
		fail: map[string]error{}, hold: map[string]chan struct{}{}, inSnap: map[string]bool{}}
	// Registered before the client starts, so it runs after the client stopped.
	t.Cleanup(h.closeAll)
	return h
}

func (h *recHandler) record(format string, args ...any) {
	h.events = append(h.events, fmt.Sprintf(format, args...))
}

func (h *recHandler) AddWorkload(ctx context.Context, uid string, info WorkloadInfo, ns *netns.NS) error {
	h.mu.Lock()
	hold := h.hold[uid]
	h.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.inSnap[uid] = InSnapshot(ctx)
	h.record("add %s", uid)
	if err := h.fail[uid]; err != nil {
		ns.Close()
		return err
	}
	if old := h.workloads[uid]; old != nil {
		old.Close()
	}
	h.workloads[uid], h.infos[uid] = ns, info
	return nil
}

func (h *recHandler) KeepWorkload(ctx context.Context, uid string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.record("keep %s", uid)
	return h.fail[uid]
}

func (h *recHandler) DelWorkload(ctx context.Context, uid string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.record("del %s", uid)
	if f := h.workloads[uid]; f != nil {
		f.Close()
		delete(h.workloads, uid)
	}
	return h.fail[uid]
}

func (h *recHandler) SnapshotDone(ctx context.Context, named map[string]bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	uids := make([]string, 0, len(named))
	for uid := range named {
		uids = append(uids, uid)
	}
	slices.Sort(uids)
	h.record("snapshot [%s]", strings.Join(uids, " "))
	for uid, f := range h.workloads {
		if !named[uid] {
			f.Close()
			delete(h.workloads, uid)
		}
	}
	return nil
}

func (h *recHandler) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for uid, f := range h.workloads {
		f.Close()
		delete(h.workloads, uid)
	}
}

func (h *recHandler) Events() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.events)
}

func (h *recHandler) Workloads() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var uids []string
	for uid := range h.workloads {
		uids = append(uids, uid)
	}
	slices.Sort(uids)
	return uids
}

// file is the namespace file the handler holds for uid, nil if none.
func (h *recHandler) file(uid string) *os.File {
	h.mu.Lock()
	defer h.mu.Unlock()
	if ns := h.workloads[uid]; ns != nil {
		return ns.File()
	}
	return nil
}

func (h *recHandler) waitEvents(t *testing.T, want ...string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		got := h.Events()
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) || len(got) > len(want) {
			// Give a late event a moment so the failure shows it.
			t.Fatalf("handler events:\n got  %q\n want %q", got, want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// startClient runs a Client until the test ends, then checks that Run returned.
func startClient(t *testing.T, path string, h Handler) context.CancelFunc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{Path: path, Handler: h, Log: testLogger(t).With("side", "proxy"),
		MinBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	stop := func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Client.Run: %v", err)
			}
			done <- nil // for a second call
		case <-time.After(waitTimeout):
			t.Errorf("Client.Run did not return after cancel")
		}
	}
	t.Cleanup(stop)
	return stop
}

// startServer listens on path and serves snapshot until the test ends (or stop is called).
// ackTimeout, if given, replaces the tests' default of 2 s.
func startServer(t *testing.T, path string, snapshot func() []SnapshotEntry, ackTimeout ...time.Duration) (*Server, func()) {
	t.Helper()
	s, err := Listen(path, testLogger(t).With("side", "agent"))
	if err != nil {
		t.Fatal(err)
	}
	s.AckTimeout = 2 * time.Second
	for _, d := range ackTimeout {
		s.AckTimeout = d
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, snapshot) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Serve: %v", err)
				}
			case <-time.After(waitTimeout):
				t.Errorf("Serve did not return after cancel")
			}
			if err := s.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				t.Errorf("Close: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return s, stop
}

func waitReady(t *testing.T, s *Server, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := s.WaitReady(ctx, n); err != nil {
		t.Fatal(err)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// rawPeer is a hand-driven end of a ZDS connection, for sending what our own code never would.
type rawPeer struct {
	t *testing.T
	c *net.UnixConn
}

// rawAgent listens on path and accepts one proxy connection, checking its Hello.
func rawAgent(t *testing.T, path string) (*net.UnixListener, func() *rawPeer) {
	t.Helper()
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accept := func() *rawPeer {
		t.Helper()
		ln.SetDeadline(time.Now().Add(waitTimeout))
		c, err := ln.AcceptUnix()
		if err != nil {
			t.Fatalf("accept: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		p := &rawPeer{t: t, c: c}
		b, files := p.recv()
		if len(files) != 0 || string(b) != "\x08\x01" {
			t.Fatalf("hello: got %x with %d fds, want 0801", b, len(files))
		}
		return p
	}
	return ln, accept
}

func rawDial(t *testing.T, path string) *rawPeer {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawPeer{t: t, c: c}
}

func (p *rawPeer) send(b []byte, files ...*os.File) {
	p.t.Helper()
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = syscall.UnixRights(fds...)
	}
	p.c.SetWriteDeadline(time.Now().Add(waitTimeout))
	if _, _, err := p.c.WriteMsgUnix(b, oob, nil); err != nil {
		p.t.Fatalf("send: %v", err)
	}
}

func (p *rawPeer) sendMsg(m proto.Message, files ...*os.File) {
	p.t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		p.t.Fatal(err)
	}
	p.send(b, files...)
}

// recv reads one packet; it fails the test on EOF or timeout.
func (p *rawPeer) recv() ([]byte, []*os.File) {
	p.t.Helper()
	b, files, err := p.tryRecv()
	if err != nil {
		p.t.Fatalf("recv: %v", err)
	}
	return b, files
}

func (p *rawPeer) tryRecv() ([]byte, []*os.File, error) {
	b := make([]byte, 1<<16)
	oob := make([]byte, syscall.CmsgSpace(4*16))
	p.c.SetReadDeadline(time.Now().Add(waitTimeout))
	n, oobn, _, _, err := p.c.ReadMsgUnix(b, oob)
	files, _ := parseRights(oob[:oobn])
	for _, f := range files {
		p.t.Cleanup(func() { f.Close() })
	}
	return b[:n], files, err
}

// ack reads one WorkloadResponse and returns its Ack error.
func (p *rawPeer) ack() string {
	p.t.Helper()
	b, files := p.recv()
	if len(files) != 0 {
		p.t.Fatalf("ack came with %d descriptors", len(files))
	}
	var r zdspb.WorkloadResponse
	if err := proto.Unmarshal(b, &r); err != nil || r.GetAck() == nil {
		p.t.Fatalf("not an ack: %x (%v)", b, err)
	}
	return r.GetAck().GetError()
}

// request reads one WorkloadRequest (acting as a proxy).
func (p *rawPeer) request() (*zdspb.WorkloadRequest, []*os.File) {
	p.t.Helper()
	b, files := p.recv()
	var r zdspb.WorkloadRequest
	if err := proto.Unmarshal(b, &r); err != nil {
		p.t.Fatalf("not a request: %x (%v)", b, err)
	}
	return &r, files
}

func (p *rawPeer) sendAck(errMsg string) {
	p.t.Helper()
	p.sendMsg(&zdspb.WorkloadResponse{Payload: &zdspb.WorkloadResponse_Ack{Ack: &zdspb.Ack{Error: errMsg}}})
}

// openFile returns a distinct open file, so a received descriptor can be told apart by identity.
func openFile(t *testing.T, name string) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func sameFile(t *testing.T, a, b *os.File) bool {
	t.Helper()
	if a == nil || b == nil {
		return false
	}
	ai, err := a.Stat()
	if err != nil {
		t.Fatal(err)
	}
	bi, err := b.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return os.SameFile(ai, bi)
}

func addMsg(uid string) *zdspb.WorkloadRequest {
	return addRequest(uid, WorkloadInfo{Name: uid, Namespace: "ns", ServiceAccount: "sa"})
}

func snapshotSentMsg() *zdspb.WorkloadRequest {
	return &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_SnapshotSent{SnapshotSent: &zdspb.SnapshotSent{}}}
}

func marshal(m *zdspb.WorkloadRequest) ([]byte, error) { return proto.Marshal(m) }
