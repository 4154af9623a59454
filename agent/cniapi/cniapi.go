// Package cniapi is what the CNI plugin (cmd/nftmesh-cni) and the node agent say to each
// other: one request and one answer per connection, on a unix socket that only root on the
// node can reach.
//
// It is not HTTP, on purpose. The container runtime execs the plugin for every pod ADD and
// DEL, and the plugin's own start-up is most of what it costs: with net/http linked (and
// with it crypto/tls, HTTP/2, compress/...), the static plugin took 11.4-11.8 ms of CPU per
// exec on a 2-vCPU VM, where a static Go program importing only net and encoding/json takes
// 6.7 ms and an empty one 4.6-5 ms (perf stat of CNI_COMMAND=VERSION). So neither side of
// this package imports net/http, and it imports nothing of Kubernetes either: the plugin
// went from 206 packages to 101 and to 7.6-7.8 ms, what the CNI library's skel, types and
// version alone take. The plugin's TestNoHTTP keeps it so.
//
// # Framing, version nftmesh-cni/1
//
// Every line ends in "\n"; the JSON lines are what encoding/json writes, which has no
// newline in it:
//
//	plugin → agent:   nftmesh-cni/1
//	                  {"command":"ADD","containerID":...}   (a Request, one line, at most 1 MiB)
//	agent → plugin:   nftmesh-cni/1 ok                      (or: nftmesh-cni/1 error)
//	                  {"enrolled":true,"reason":...}        (a Response, one line)
//
// and the agent closes the connection. "error" has the reason in the Response's error
// field. The plugin's request must arrive within 5 s of its connection; then it sends
// nothing more but keeps its side of the connection open (no half-close) until the answer:
// the agent goes on reading while it handles the request, and the connection's end (the
// plugin killed, or gone on its own timeout) cancels the handler's context, as the HTTP
// server did. A peer that says anything else gets an error naming what it said (an HTTP
// request, from a plugin older than the agent, gets it as an HTTP answer); a new version of
// the framing is a new first line.
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
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

// DefaultSocket is where the agent listens for its CNI plugin.
const DefaultSocket = "/var/run/nftmesh/cni.sock"

// Request is one CNI call, with what the container runtime told the plugin.
type Request struct {
	Command      string       `json:"command"` // ADD or DEL
	ContainerID  string       `json:"containerID"`
	NetNS        string       `json:"netns"` // CNI_NETNS
	PodName      string       `json:"podName"`
	PodNamespace string       `json:"podNamespace"`
	PodUID       string       `json:"podUID"`
	IPs          []netip.Addr `json:"ips"` // from the primary CNI's prevResult
}

func (r Request) String() string {
	return fmt.Sprintf("%s %s/%s (uid %s, netns %s)", r.Command, r.PodNamespace, r.PodName, r.PodUID, r.NetNS)
}

// appendJSON appends r as json.Marshal writes it, byte for byte (TestRequestJSON): the
// plugin's request is the one struct it would encode with reflection, and encoding/json's
// first use of a struct type costs what shows in a process that lives 10 ms (0.19 ms of
// its CPU per ADD, on a 2-vCPU VM). The agent decodes it with encoding/json.
func (r Request) appendJSON(b []byte) []byte {
	b = appendJSONString(append(b, `{"command":`...), r.Command)
	b = appendJSONString(append(b, `,"containerID":`...), r.ContainerID)
	b = appendJSONString(append(b, `,"netns":`...), r.NetNS)
	b = appendJSONString(append(b, `,"podName":`...), r.PodName)
	b = appendJSONString(append(b, `,"podNamespace":`...), r.PodNamespace)
	b = appendJSONString(append(b, `,"podUID":`...), r.PodUID)
	b = append(b, `,"ips":`...)
	if r.IPs == nil {
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i, a := range r.IPs {
			if i > 0 {
				b = append(b, ',')
			}
			// What netip.Addr's MarshalText gives: its String, "" for the zero Addr.
			text := ""
			if a.IsValid() {
				text = a.String()
			}
			b = appendJSONString(b, text)
		}
		b = append(b, ']')
	}
	return append(b, '}')
}

// appendJSONString appends s quoted as encoding/json quotes a string (with its default
// HTML escaping): <, >, & and the control characters as \u00XX (\b, \f, \n, \r, \t
// short), U+2028 and U+2029 escaped, an invalid UTF-8 byte as \ufffd.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(append(b, s[start:i]...), `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(append(b, s[start:i]...), '\\', 'u', '2', '0', '2', hex[r&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	return append(append(b, s[start:]...), '"')
}

// Check reports the first missing field, naming it.
func (r Request) Check() error {
	switch {
	case r.Command != "ADD" && r.Command != "DEL":
		return fmt.Errorf("command %q is not ADD or DEL", r.Command)
	case r.PodName == "" || r.PodNamespace == "":
		return errors.New("K8S_POD_NAME and K8S_POD_NAMESPACE are required in CNI_ARGS")
	case r.Command == "ADD" && r.NetNS == "":
		return errors.New("CNI_NETNS is required for ADD")
	}
	return nil
}

// Response is the agent's answer: whether the pod is now in the mesh, and why (or why not).
type Response struct {
	Enrolled bool   `json:"enrolled"`
	Reason   string `json:"reason"`
	Error    string `json:"error,omitempty"`
}

// Handler is the agent's side. An error from Add fails the CNI ADD, so the pod does not
// start outside the mesh. The ctx given to Add and Del ends when the plugin goes away (it
// was killed, or gave up waiting) or the Server is closed.
type Handler interface {
	Add(ctx context.Context, r Request) (Response, error)
	Del(ctx context.Context, r Request) error
}

const (
	// version is the first line of a request, and starts the first line of an answer.
	version = "nftmesh-cni/1"
	// maxRequest bounds a request's (and an answer's) JSON line; a real one is a few hundred
	// bytes.
	maxRequest = 1 << 20
	// maxFirstLine bounds the version line (and the status line of an answer).
	maxFirstLine = 256
)

// readTimeout bounds the wait for a request, from the connection (as the HTTP server's
// ReadHeaderTimeout did), and the agent's write of its answer. A variable for the tests.
var readTimeout = 5 * time.Second

// Server serves a Handler on a unix socket.
type Server struct {
	ln   *net.UnixListener
	path string
	sock os.FileInfo // the socket file this server made
	h    Handler
	log  *slog.Logger

	ctx    context.Context // every handler's, ended by Close
	cancel context.CancelCauseFunc
	done   chan struct{} // the accept loop has returned

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

// Listen creates the socket (and its directory, 0700) at sock, replacing a stale one, and
// serves h on it until Close.
func Listen(sock string, h Handler, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		return nil, err
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, err
	}
	// Go would unlink the path on Close even after a newer agent (a rolling update that
	// overlaps them) has bound its own socket there: Close unlinks only ours.
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(sock, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	ours, err := os.Lstat(sock)
	if err != nil {
		ln.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	s := &Server{ln: ln, path: sock, sock: ours, h: h, log: log, ctx: ctx, cancel: cancel,
		done: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	go s.accept()
	return s, nil
}

// Close stops serving and removes the socket, if it is still the one this server made.
// Calls in progress are cut: their connections closed, their handlers' ctx cancelled;
// Close does not wait for the handlers to return.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.cancel(errClosing) // before the connections, so that the handlers see why
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	err := s.ln.Close()
	<-s.done
	if fi, lerr := os.Lstat(s.path); lerr == nil && os.SameFile(fi, s.sock) {
		os.Remove(s.path)
	}
	return err
}

var errClosing = errors.New("the agent's CNI socket is closing")

func (s *Server) accept() {
	defer close(s.done)
	var delay time.Duration
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || s.ctx.Err() != nil {
				return
			}
			// Out of file descriptors and the like: wait and try again, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("cni socket: accept failed", "error", err, "retry in", delay)
			select {
			case <-time.After(delay):
			case <-s.ctx.Done():
				return
			}
			continue
		}
		delay = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			conn.Close()
			return
		}
		s.conns[conn] = struct{}{}
		s.mu.Unlock()
		go s.serve(conn)
	}
}

// serve answers the one request on conn, and closes it.
func (s *Server) serve(conn net.Conn) {
	defer func() {
		s.mu.Lock()
		delete(s.conns, conn)
		s.mu.Unlock()
		conn.Close()
	}()
	conn.SetReadDeadline(time.Now().Add(readTimeout))
	br := bufio.NewReaderSize(conn, 4096)
	r, err := readRequest(br)
	if err != nil {
		var he *httpRequestError
		if errors.As(err, &he) {
			s.log.Warn("cni request refused: an HTTP request, from a CNI plugin older than the agent?", "request line", he.line)
			replyHTTP(conn, err)
			return
		}
		s.log.Warn("cni request refused", "error", err)
		reply(conn, false, Response{Error: err.Error()})
		return
	}
	// The plugin sends nothing more: a read that returns means it has gone (or broke the
	// framing), and the handler need not go on.
	conn.SetReadDeadline(time.Time{})
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	go func() {
		var b [1]byte
		_, err := conn.Read(b[:])
		if err == nil {
			err = errors.New("it sent more after its request")
		}
		cancel(fmt.Errorf("the CNI plugin went away: %w", err))
	}()
	defer func() {
		if p := recover(); p != nil {
			buf := make([]byte, 64<<10)
			buf = buf[:runtime.Stack(buf, false)]
			s.log.Error("cni handler panicked", "request", r.String(), "panic", p, "stack", string(buf))
			reply(conn, false, Response{Error: fmt.Sprintf("handler panicked: %v", p)})
		}
	}()
	if r.Command == "DEL" {
		if err := s.h.Del(ctx, r); err != nil {
			s.log.Warn("cni del failed", "request", r.String(), "error", err)
			reply(conn, false, Response{Error: err.Error()})
			return
		}
		reply(conn, true, Response{})
		return
	}
	resp, err := s.h.Add(ctx, r)
	if err != nil {
		s.log.Error("cni add failed", "request", r.String(), "error", err)
		resp.Error = err.Error()
		reply(conn, false, resp)
		return
	}
	reply(conn, true, resp)
}

// readRequest reads the version line and the request, and checks them.
func readRequest(br *bufio.Reader) (Request, error) {
	first, err := readLine(br, maxFirstLine)
	if err != nil {
		return Request{}, fmt.Errorf("framing: reading the first line (want %q): %w", version, err)
	}
	if string(first) != version {
		if f := strings.Fields(string(bytes.TrimSuffix(first, []byte("\r")))); len(f) == 3 && strings.HasPrefix(f[2], "HTTP/") {
			return Request{}, &httpRequestError{line: string(first)}
		}
		return Request{}, fmt.Errorf("framing: first line %s is not %q", quote(first), version)
	}
	line, err := readLine(br, maxRequest)
	if err != nil {
		return Request{}, fmt.Errorf("bad request: %w", err)
	}
	var r Request
	if err := json.Unmarshal(line, &r); err != nil {
		return Request{}, fmt.Errorf("bad request: %w", err)
	}
	if br.Buffered() > 0 {
		return Request{}, errors.New("framing: data after the request")
	}
	if err := r.Check(); err != nil {
		return Request{}, err
	}
	return r, nil
}

// httpRequestError is an HTTP request: this package spoke HTTP before nftmesh-cni/1.
type httpRequestError struct{ line string }

func (e *httpRequestError) Error() string {
	return fmt.Sprintf("framing: %q is an HTTP request: this agent speaks %s (the CNI plugin is older than the agent: the agent installs its own)", e.line, version)
}

// replyHTTP answers an HTTP request in a way the HTTP client of the older plugin reads: a
// 400 with the JSON Response it expects, so that the pod's events say why.
func replyHTTP(conn net.Conn, err error) {
	body, _ := json.Marshal(Response{Error: err.Error()})
	conn.SetWriteDeadline(time.Now().Add(readTimeout))
	fmt.Fprintf(conn, "HTTP/1.0 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}

func reply(conn net.Conn, ok bool, r Response) {
	status := "ok"
	if !ok {
		status = "error"
	}
	body, _ := json.Marshal(r) // a Response always marshals
	msg := make([]byte, 0, len(version)+len(status)+len(body)+3)
	msg = append(append(append(append(append(msg, version...), ' '), status...), '\n'), body...)
	conn.SetWriteDeadline(time.Now().Add(readTimeout))
	conn.Write(append(msg, '\n')) // if the plugin has gone, there is nobody to tell
}

var errTooLong = errors.New("too long")

// readLine reads a line of at most max bytes and returns it without its "\n". A line cut
// short by the end of the connection comes back with io.ErrUnexpectedEOF; no line at all
// with io.EOF.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(line)+len(frag) > max+1 { // +1: the "\n"
			return nil, fmt.Errorf("%w: over %d bytes", errTooLong, max)
		}
		line = append(line, frag...)
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return line, fmt.Errorf("%w after %s, with no end of line", io.ErrUnexpectedEOF, quote(line))
		default:
			return line, err
		}
	}
}

// quote is b quoted, cut to its first 64 bytes.
func quote(b []byte) string {
	if len(b) > 64 {
		return fmt.Sprintf("%q...", b[:64])
	}
	return fmt.Sprintf("%q", b)
}

// ErrAgentUnreachable is a call that never reached the agent (not running, no socket).
var ErrAgentUnreachable = errors.New("nftmesh agent unreachable")

// Call sends r to the agent at sock and waits for its answer until ctx ends (the
// connection's deadline is ctx's, and it is closed when ctx is cancelled: the agent's
// handler sees that as its own ctx ending). A connection that fails is ErrAgentUnreachable;
// an error answer comes back as an error with the agent's text, and its Response.
func Call(ctx context.Context, sock string, r Request) (Response, error) {
	body := r.appendJSON(nil)
	if len(body) > maxRequest {
		return Response{}, fmt.Errorf("request of %d bytes is over the agent's limit of %d", len(body), maxRequest)
	}
	conn, err := dial(ctx, sock)
	if err != nil {
		return Response{}, fmt.Errorf("%w at %s: %w", ErrAgentUnreachable, sock, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	resp, err := exchange(conn, body)
	if err != nil {
		if ctx.Err() != nil {
			return Response{}, fmt.Errorf("agent at %s did not answer: %w", sock, context.Cause(ctx))
		}
		if errors.Is(err, os.ErrDeadlineExceeded) { // ctx's deadline, a moment before ctx sees it
			return Response{}, fmt.Errorf("agent at %s did not answer: %w", sock, context.DeadlineExceeded)
		}
	}
	return resp, err
}

// dial connects to the agent's socket. It is net.Dialer's DialContext for a unix socket,
// cut down, for the plugin's sake: the connection is an *os.File on the same netpoller
// (deadlines, and a Close that wakes a pending Read, work as on a net.Conn), without the
// Dialer's address resolution, dial racing and address look-ups (getsockname,
// getpeername), which cost the plugin 0.31 ms of CPU per ADD of some 10.5 ms on a 2-vCPU
// VM (mean of 800 ADDs, interleaved A/B). Its errors read as net's: "dial unix <sock>:
// connect: no such file or directory". A blocking socket read without the netpoller would
// be cheaper still to set up, but not to wait on: the P stays in the syscall and sysmon
// polls it every 20 µs (+0.45 ms of CPU over a 5 ms enrollment, against +0.06 ms here).
func dial(ctx context.Context, sock string) (*os.File, error) {
	opError := func(err error) error {
		return &net.OpError{Op: "dial", Net: "unix", Addr: &net.UnixAddr{Name: sock, Net: "unix"}, Err: err}
	}
	if err := ctx.Err(); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, opError(os.ErrDeadlineExceeded) // "i/o timeout", as net says
		}
		return nil, opError(errCanceled)
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, opError(os.NewSyscallError("socket", err))
	}
	// Non-blocking, a unix socket's connect does not wait: it succeeds, or fails (EAGAIN
	// when the agent's backlog is full, and net.Dial fails then too).
	sa := &syscall.SockaddrUnix{Name: sock}
	for {
		err = syscall.Connect(fd, sa)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil && err != syscall.EISCONN {
		syscall.Close(fd)
		return nil, opError(os.NewSyscallError("connect", err))
	}
	// Non-blocking, so os.NewFile puts it on the netpoller.
	return os.NewFile(uintptr(fd), sock), nil
}

// errCanceled is net's text for a dial whose ctx was cancelled.
var errCanceled = errors.New("operation was canceled")

// exchange sends the request (body, one line of JSON) and reads the answer.
func exchange(conn io.ReadWriter, body []byte) (Response, error) {
	msg := make([]byte, 0, len(version)+len(body)+2)
	msg = append(append(append(append(msg, version...), '\n'), body...), '\n')
	if _, err := conn.Write(msg); err != nil {
		return Response{}, fmt.Errorf("sending the request: %w", err)
	}
	br := bufio.NewReaderSize(conn, 4096)
	first, err := readLine(br, maxFirstLine)
	if errors.Is(err, io.EOF) {
		return Response{}, errors.New("agent closed the connection without an answer")
	}
	if err != nil {
		return Response{}, fmt.Errorf("reading the agent's answer: %w", err)
	}
	status, ok := strings.CutPrefix(string(first), version+" ")
	if !ok || status != "ok" && status != "error" {
		hint := ""
		if bytes.HasPrefix(first, []byte("HTTP/")) {
			hint = " (an agent older than this plugin, that speaks HTTP?)"
		}
		return Response{}, fmt.Errorf("agent answered %s, not %q%s", quote(first), version+" ok|error", hint)
	}
	line, err := readLine(br, maxRequest)
	if err != nil {
		return Response{}, fmt.Errorf("reading the agent's answer: %w", err)
	}
	var out Response
	if err := json.Unmarshal(line, &out); err != nil {
		return Response{}, fmt.Errorf("agent answered %s with %s: %w", status, quote(line), err)
	}
	if status == "error" {
		if out.Error == "" {
			out.Error = "(no reason given)"
		}
		return out, fmt.Errorf("agent: %s", out.Error)
	}
	return out, nil
}
