package cniapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type okHandler struct{}

func (okHandler) Add(ctx context.Context, r Request) (Response, error) {
	return Response{Enrolled: true}, nil
}
func (okHandler) Del(ctx context.Context, r Request) error { return nil }

var addReq = Request{Command: "ADD", PodName: "a", PodNamespace: "b", NetNS: "/x"}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func listen(t *testing.T, h Handler) (*Server, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "run", "cni.sock")
	s, err := Listen(sock, h, discard())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, sock
}

// An old agent that stops after a new one has bound the socket (a rolling update that
// overlaps them) leaves the new one's socket in place.
func TestOldAgentKeepsNewSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "cni.sock")
	log := discard()
	old, err := Listen(sock, okHandler{}, log)
	if err != nil {
		t.Fatal(err)
	}
	cur, err := Listen(sock, okHandler{}, log)
	if err != nil {
		t.Fatal(err)
	}
	old.Close()
	if _, err := Call(context.Background(), sock, addReq); err != nil {
		t.Fatalf("ADD to the new agent after the old one closed: %v", err)
	}
	cur.Close()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("the last agent's Close left its socket: %v", err)
	}
	if err := cur.Close(); err != nil {
		t.Errorf("a second Close: %v", err)
	}
}

// Close removes its own socket only: not a file someone else put at the path.
func TestCloseRemovesOnlyItsOwnSocket(t *testing.T) {
	s, sock := listen(t, okHandler{})
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sock, []byte("not ours"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if b, err := os.ReadFile(sock); err != nil || string(b) != "not ours" {
		t.Errorf("Close removed or changed a file it did not make: %q, %v", b, err)
	}
}

// The directory is 0700, the socket 0600, and a stale socket (an agent that died) is
// replaced.
func TestListenModesAndStaleSocket(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	sock := filepath.Join(dir, "cni.sock")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if _, err := Call(context.Background(), sock, addReq); !errors.Is(err, ErrAgentUnreachable) {
		t.Fatalf("a stale socket: %v, want ErrAgentUnreachable", err)
	}
	os.Chmod(dir, 0o755)
	s, err := Listen(sock, okHandler{}, discard())
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer s.Close()
	if _, err := Call(context.Background(), sock, addReq); err != nil {
		t.Errorf("ADD after replacing a stale socket: %v", err)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Errorf("socket: %v %v, want a socket 0600", fi.Mode(), err)
	}
	fresh := filepath.Join(t.TempDir(), "new", "dir", "cni.sock")
	s2, err := Listen(fresh, okHandler{}, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if fi, err := os.Stat(filepath.Dir(fresh)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("the socket's new directory: %v %v, want 0700", fi.Mode(), err)
	}
}

type errHandler struct{ add, del error }

func (h errHandler) Add(ctx context.Context, r Request) (Response, error) {
	return Response{Reason: "namespace labelled"}, h.add
}
func (h errHandler) Del(ctx context.Context, r Request) error { return h.del }

func TestAnswers(t *testing.T) {
	_, sock := listen(t, okHandler{})
	resp, err := Call(context.Background(), sock, addReq)
	if err != nil || !resp.Enrolled {
		t.Errorf("ADD: %+v %v", resp, err)
	}
	if _, err := Call(context.Background(), sock, Request{Command: "DEL", PodName: "a", PodNamespace: "b"}); err != nil {
		t.Errorf("DEL: %v", err)
	}

	_, sock = listen(t, errHandler{add: errors.New("zds: no proxy connected"), del: errors.New("nft: busy")})
	resp, err = Call(context.Background(), sock, addReq)
	if err == nil || !strings.Contains(err.Error(), "zds: no proxy connected") || resp.Reason != "namespace labelled" {
		t.Errorf("a failed ADD: %+v %v; want an error with the agent's text, and its reason", resp, err)
	}
	if errors.Is(err, ErrAgentUnreachable) {
		t.Errorf("a failed ADD is not an unreachable agent: %v", err)
	}
	_, err = Call(context.Background(), sock, Request{Command: "DEL", PodName: "a", PodNamespace: "b"})
	if err == nil || !strings.Contains(err.Error(), "nft: busy") {
		t.Errorf("a failed DEL: %v; want an error with the agent's text", err)
	}
	_, err = Call(context.Background(), sock, Request{Command: "ADD", PodNamespace: "b", NetNS: "/x"})
	if err == nil || !strings.Contains(err.Error(), "K8S_POD_NAME") {
		t.Errorf("ADD without a pod name: %v; want an error naming it", err)
	}
	_, err = Call(context.Background(), sock, Request{Command: "CHECK", PodName: "a", PodNamespace: "b"})
	if err == nil || !strings.Contains(err.Error(), `"CHECK" is not ADD or DEL`) {
		t.Errorf("CHECK: %v; want an error naming the command", err)
	}
}

type panicHandler struct{}

func (panicHandler) Add(ctx context.Context, r Request) (Response, error) { panic("oops") }
func (panicHandler) Del(ctx context.Context, r Request) error             { return nil }

// A handler that panics fails its call, not the agent (as net/http's server did).
func TestHandlerPanic(t *testing.T) {
	_, sock := listen(t, panicHandler{})
	if _, err := Call(context.Background(), sock, addReq); err == nil || err.Error() != "agent: handler panicked: oops" {
		t.Errorf("ADD to a handler that panics: %v", err)
	}
	if _, err := Call(context.Background(), sock, Request{Command: "DEL", PodName: "a", PodNamespace: "b"}); err != nil {
		t.Errorf("DEL after a panic: %v", err)
	}
}

// raw sends what the plugin would not, and returns the agent's whole answer.
func raw(t *testing.T, sock string, send []byte) string {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	go func() { // a refused request is not read to its end: do not wait for it
		conn.Write(send)
		conn.(*net.UnixConn).CloseWrite()
	}()
	out, _ := io.ReadAll(conn)
	return string(out)
}

// refusal is the agent's error answer in out, or why out is not one.
func refusal(out string) string {
	first, rest, _ := strings.Cut(out, "\n")
	var r Response
	if err := json.Unmarshal([]byte(rest), &r); first != "nftmesh-cni/1 error" || err != nil || r.Error == "" {
		return fmt.Sprintf("not an error answer (%v): %q", err, out)
	}
	return r.Error
}

func TestRefusesBadFraming(t *testing.T) {
	_, sock := listen(t, okHandler{})
	for _, c := range []struct {
		name, send string
		want       []string
	}{
		{"garbage", "hello agent\n", []string{`first line "hello agent" is not "nftmesh-cni/1"`}},
		{"future version", "nftmesh-cni/2\n{}\n", []string{`"nftmesh-cni/2" is not "nftmesh-cni/1"`}},
		{"binary", strings.Repeat("\x00", 300), []string{"first line", "too long"}},
		{"bad JSON", "nftmesh-cni/1\n{\"command\":\n", []string{"bad request:", "unexpected end of JSON"}},
		{"trailing data", "nftmesh-cni/1\n{} {}\n", []string{"bad request:", "after top-level value"}},
		{"no end of line", "nftmesh-cni/1\n{}", []string{"bad request:", "no end of line"}},
		{"more after the request", "nftmesh-cni/1\n" + `{"command":"DEL","podName":"a","podNamespace":"b"}` + "\nmore\n", []string{"data after the request"}},
		{"not ADD", "nftmesh-cni/1\n" + `{"command":"ADDD","podName":"a","podNamespace":"b"}` + "\n", []string{`"ADDD" is not ADD or DEL`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := refusal(raw(t, sock, []byte(c.send)))
			for _, w := range c.want {
				if !strings.Contains(got, w) {
					t.Errorf("answer %q does not say %q", got, w)
				}
			}
		})
	}
}

func TestRefusesOversizeRequest(t *testing.T) {
	_, sock := listen(t, okHandler{})
	big := `{"command":"ADD","podName":"` + strings.Repeat("a", maxRequest) + `","podNamespace":"b","netns":"/x"}`
	got := refusal(raw(t, sock, []byte(version+"\n"+big+"\n")))
	if !strings.Contains(got, "bad request: too long: over 1048576 bytes") {
		t.Errorf("a request over 1 MiB: %.200q; want an error saying so", got)
	}
	// Just under the limit is a request like any other.
	ok := `{"command":"ADD","podName":"` + strings.Repeat("a", maxRequest-100) + `","podNamespace":"b","netns":"/x"}`
	if got := raw(t, sock, []byte(version+"\n"+ok+"\n")); !strings.HasPrefix(got, "nftmesh-cni/1 ok\n") {
		t.Errorf("a request under 1 MiB: %.200q", got)
	}
	_, err := Call(context.Background(), sock, Request{Command: "ADD", PodName: strings.Repeat("a", maxRequest), PodNamespace: "b", NetNS: "/x"})
	if err == nil || !strings.Contains(err.Error(), "over the agent's limit") {
		t.Errorf("Call with a request over 1 MiB: %v", err)
	}
}

// A plugin older than the agent speaks HTTP: it gets an HTTP answer it can read, with a
// reason its pod's events show.
func TestHTTPRequestGetsHTTPAnswer(t *testing.T) {
	_, sock := listen(t, okHandler{})
	got := raw(t, sock, []byte("POST /v1/cni HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
	if !strings.HasPrefix(got, "HTTP/1.0 400 Bad Request\r\n") || !strings.Contains(got, `{"enrolled":false,"reason":"","error":"framing: \"POST /v1/cni HTTP/1.1\\r\" is an HTTP request: this agent speaks nftmesh-cni/1`) {
		t.Errorf("answer to an HTTP request: %q", got)
	}
}

// A request that does not come within readTimeout is cut.
func TestRequestTimeout(t *testing.T) {
	defer func(d time.Duration) { readTimeout = d }(readTimeout)
	readTimeout = 200 * time.Millisecond
	_, sock := listen(t, okHandler{})
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte(version + "\n{"))
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	out, _ := io.ReadAll(conn)
	if !strings.HasPrefix(string(out), "nftmesh-cni/1 error\n") || !strings.Contains(string(out), "i/o timeout") {
		t.Errorf("a request that never ends: %q; want a timeout error", out)
	}
}

// The agent answers in a framing the plugin does not know (an older agent's HTTP).
func TestUnknownAnswer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "cni.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			bufio.NewReader(c).ReadString('\n')
			c.Write([]byte("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"))
			c.Close()
		}
	}()
	_, err = Call(context.Background(), sock, addReq)
	if err == nil || !strings.Contains(err.Error(), `agent answered "HTTP/1.1 400 Bad Request\r", not "nftmesh-cni/1 ok|error" (an agent older than this plugin`) {
		t.Errorf("an HTTP answer: %v", err)
	}
}

func TestAgentUnreachable(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, err := Call(context.Background(), sock, addReq)
	if !errors.Is(err, ErrAgentUnreachable) || !strings.Contains(err.Error(), sock) {
		t.Errorf("no socket: %v; want ErrAgentUnreachable with the path", err)
	}
	// Not a socket at all.
	os.WriteFile(sock, nil, 0o600)
	if _, err := Call(context.Background(), sock, addReq); !errors.Is(err, ErrAgentUnreachable) {
		t.Errorf("a file that is not a socket: %v; want ErrAgentUnreachable", err)
	}
	// An agent that closes without an answer was reached.
	s, sock := listen(t, okHandler{})
	s.Close()
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			bufio.NewReader(c).ReadString('\n')
			c.Close()
		}
	}()
	_, err = Call(context.Background(), sock, addReq)
	if err == nil || errors.Is(err, ErrAgentUnreachable) || !strings.Contains(err.Error(), "closed the connection without an answer") {
		t.Errorf("an agent that hangs up: %v", err)
	}
}

// holdHandler's Add waits for its ctx (or for release), and says what ended it.
type holdHandler struct {
	started chan Request
	ended   chan error // the ctx's cause
	release chan struct{}
}

func newHold() *holdHandler {
	return &holdHandler{started: make(chan Request, 10), ended: make(chan error, 10), release: make(chan struct{})}
}

func (h *holdHandler) Add(ctx context.Context, r Request) (Response, error) {
	h.started <- r
	select {
	case <-ctx.Done():
		h.ended <- context.Cause(ctx)
		return Response{}, ctx.Err()
	case <-h.release:
		return Response{Enrolled: true}, nil
	}
}
func (h *holdHandler) Del(ctx context.Context, r Request) error { return nil }

func (h *holdHandler) waitStarted(t *testing.T) {
	t.Helper()
	select {
	case <-h.started:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler did not get the request")
	}
}

func (h *holdHandler) waitEnded(t *testing.T, want string) {
	t.Helper()
	select {
	case err := <-h.ended:
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the handler's ctx ended with %v, want %q", err, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's ctx did not end")
	}
}

// A plugin killed mid-ADD (or gone on its timeout) ends the handler's ctx: an ADD waiting
// in the agent stops waiting.
func TestClientGoneCancelsHandler(t *testing.T) {
	h := newHold()
	_, sock := listen(t, h)

	// The connection closed, as by a killed plugin.
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte(version + "\n" + `{"command":"ADD","podName":"a","podNamespace":"b","netns":"/x"}` + "\n"))
	h.waitStarted(t)
	conn.Close()
	h.waitEnded(t, "the CNI plugin went away: EOF")

	// Call's ctx cancelled.
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := Call(ctx, sock, addReq); errc <- err }()
	h.waitStarted(t)
	cancel()
	h.waitEnded(t, "the CNI plugin went away")
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("Call after its ctx was cancelled: %v, want context.Canceled", err)
	}

	// Still served after that.
	go func() { _, err := Call(context.Background(), sock, addReq); errc <- err }()
	h.waitStarted(t)
	close(h.release)
	if err := <-errc; err != nil {
		t.Errorf("ADD released: %v", err)
	}
}

// Call gives up at its ctx's deadline, and the agent's handler learns of it.
func TestCallTimeout(t *testing.T) {
	h := newHold()
	_, sock := listen(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Call(ctx, sock, addReq)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "did not answer") {
		t.Errorf("Call past its deadline: %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Call with a 300ms timeout took %v", d)
	}
	h.waitStarted(t)
	h.waitEnded(t, "the CNI plugin went away")
}

// stuckHandler's Add ignores its ctx until the test ends.
type stuckHandler struct {
	started chan struct{}
	done    chan struct{}
}

func (h stuckHandler) Add(ctx context.Context, r Request) (Response, error) {
	h.started <- struct{}{}
	<-h.done
	return Response{}, nil
}
func (stuckHandler) Del(ctx context.Context, r Request) error { return nil }

// Close cuts the calls in progress (their handlers' ctx ends, their plugins get an error)
// and does not wait for a handler that is stuck.
func TestCloseCutsCalls(t *testing.T) {
	h := newHold()
	s, sock := listen(t, h)
	errc := make(chan error, 1)
	go func() { _, err := Call(context.Background(), sock, addReq); errc <- err }()
	h.waitStarted(t)
	s.Close()
	h.waitEnded(t, "the agent's CNI socket is closing")
	if err := <-errc; err == nil {
		t.Error("a call cut by Close succeeded")
	}

	stuck := stuckHandler{started: make(chan struct{}, 1), done: make(chan struct{})}
	defer close(stuck.done)
	s, sock = listen(t, stuck)
	go func() { _, err := Call(context.Background(), sock, addReq); errc <- err }()
	<-stuck.started
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for a stuck handler")
	}
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), "without an answer") {
			t.Errorf("a call cut by Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a call to a closed server did not end")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("Close left the socket: %v", err)
	}
}

// Many plugins at once, as in a burst of pods.
func TestConcurrentCalls(t *testing.T) {
	_, sock := listen(t, okHandler{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 64 {
		wg.Go(func() {
			if _, err := Call(context.Background(), sock, addReq); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// The failures are logged, as before.
func TestLogs(t *testing.T) {
	var buf syncBuffer
	sock := filepath.Join(t.TempDir(), "cni.sock")
	s, err := Listen(sock, errHandler{add: errors.New("no proxy")}, slog.New(slog.NewTextHandler(&buf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	Call(context.Background(), sock, addReq)
	raw(t, sock, []byte("hello\n"))
	s.Close()
	for _, want := range []string{`level=ERROR msg="cni add failed" request="ADD b/a (uid , netns /x)" error="no proxy"`,
		`level=WARN msg="cni request refused" error="framing: first line \"hello\" is not \"nftmesh-cni/1\""`} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("log\n%s\nhas no %s", buf.String(), want)
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// The request is written by hand (Request.appendJSON), as json.Marshal writes it.
func TestRequestJSON(t *testing.T) {
	ips := []netip.Addr{netip.MustParseAddr("10.244.1.7"), netip.MustParseAddr("fd00:244:1::7"),
		netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("fe80::1%eth0"), {},
		netip.MustParseAddr("fe80::1").WithZone(`a"b<c>\\d&e` + "\x01\u2028")}
	reqs := []Request{{}, addReq, {Command: "DEL", PodName: "a", PodNamespace: "b", IPs: []netip.Addr{}},
		{Command: "ADD", ContainerID: "c0ffee", NetNS: "/var/run/netns/cni-1234", PodName: "sleep-7f9d", PodNamespace: "demo",
			PodUID: "0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e", IPs: ips}}
	for _, s := range []string{"", "plain", `"quoted" \back\slash`, "<html> & </html>", "\x00\x01\x07\b\f\n\r\t\x1f\x7f ",
		"é ü 日本 🚀", "\u2028\u2029", "bad \xff utf-8 \xe2\x82", "\xed\xa0\x80 surrogate", "\uFFFD kept"} {
		reqs = append(reqs, Request{Command: s, ContainerID: s, NetNS: s, PodName: s, PodNamespace: s, PodUID: s})
	}
	for _, r := range reqs {
		checkRequestJSON(t, r)
	}
}

func FuzzRequestJSON(f *testing.F) {
	f.Add("ADD", "c0ffee", "/var/run/netns/x", "sleep", "demo", "uid-1", "10.0.0.1")
	f.Add("", "\x00<>&", "\u2028", "\xff\xfe", `"\`, "日本", "fe80::1%eth0")
	f.Fuzz(func(t *testing.T, cmd, id, netns, name, ns, uid, ip string) {
		r := Request{Command: cmd, ContainerID: id, NetNS: netns, PodName: name, PodNamespace: ns, PodUID: uid}
		if a, err := netip.ParseAddr(ip); err == nil {
			r.IPs = []netip.Addr{a, a.WithZone(ip)}
		}
		checkRequestJSON(t, r)
	})
}

func checkRequestJSON(t *testing.T, r Request) {
	t.Helper()
	want, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.appendJSON(nil); !bytes.Equal(got, want) {
		t.Errorf("%#v:\n got %s\nwant %s", r, got, want)
	}
}
