package zds

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/zds/zdspb"
)

// DefaultAckTimeout bounds the wait for a proxy's Hello and for each Ack.
const DefaultAckTimeout = 5 * time.Second

var errServerClosed = errors.New("zds server closed")

// SnapshotEntry is one pod known to the agent when a proxy connects.
type SnapshotEntry struct {
	UID   string
	Info  WorkloadInfo
	NetNS *netns.NS // nil => Keep (the agent cannot hand the netns over now)
}

// Server is the agent's end of ZDS: it accepts proxy connections and sends them workloads.
// Several proxies may be connected at once (a proxy upgrade overlaps the old and the new one):
// adds go to the newest, dels to all.
type Server struct {
	Path string
	Log  *slog.Logger
	// AckTimeout bounds the wait for the Hello and for each Ack; a proxy that misses it is
	// dropped. Zero means DefaultAckTimeout. Set it before Serve.
	AckTimeout time.Duration

	ln     *net.UnixListener
	sock   os.FileInfo     // the socket file we created, to unlink it only if still ours
	ctx    context.Context // canceled by Close; ends handshakes and snapshots
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
	cerr   error

	mu      sync.Mutex
	closed  bool
	conns   []*serverConn // past Hello, in connection order: the last is the newest
	nextID  uint64
	changed chan struct{} // closed and replaced whenever conns or their state change
}

// Listen creates the socket (and its directory) at path, DefaultSocketPath if empty. A socket
// left there by a previous agent is replaced.
func Listen(path string, log *slog.Logger) (*Server, error) {
	if path == "" {
		path = DefaultSocketPath
	}
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("zds: listen: %w", err)
	}
	// bind fails on an existing path. A stale socket is ours to replace (nobody can be accepting
	// on it but a previous agent); anything else at that path is not, so leave it and fail.
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() == fs.ModeSocket {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("zds: listen: remove stale socket: %w", err)
		}
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("zds: listen: %w", err)
	}
	// Go would unlink the path on Close even if a newer agent has replaced the socket there
	// meanwhile (overlapping restarts), cutting proxies off from it. Close unlinks only our own.
	ln.SetUnlinkOnClose(false)
	sock, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("zds: listen: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{Path: path, Log: log, ln: ln, sock: sock, ctx: ctx, cancel: cancel, changed: make(chan struct{})}, nil
}

func (s *Server) log() *slog.Logger {
	if s.Log == nil {
		return slog.Default()
	}
	return s.Log
}

func (s *Server) ackTimeout() time.Duration {
	if s.AckTimeout > 0 {
		return s.AckTimeout
	}
	return DefaultAckTimeout
}

// Serve accepts proxy connections until ctx is done or the server is closed, then closes the
// server and returns nil. For each connection it reads the Hello (version must be V1), streams
// snapshot() (an Add with the netns, or a Keep, per entry, each waiting for its Ack), then
// SnapshotSent; the connection is then live.
//
// snapshot may be called concurrently (one call per connecting proxy). The server never closes
// the entries' files (the proxy gets duplicates); an entry whose file the caller closes before
// it is sent is left out, as for a pod that went away. The snapshot is taken after the
// connection becomes the newest, so an add racing with it reaches this proxy either in the
// snapshot or right after it, provided the caller records a pod before calling AddWorkload.
func (s *Server) Serve(ctx context.Context, snapshot func() []SnapshotEntry) error {
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	defer s.Close()
	if snapshot == nil {
		snapshot = func() []SnapshotEntry { return nil }
	}
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || s.ctx.Err() != nil {
				return nil
			}
			// EMFILE and the like pass; don't spin on them.
			s.log().Warn("zds: accept", "err", err)
			select {
			case <-s.ctx.Done():
				return nil
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		if !s.goTracked(func() { s.handshake(conn, snapshot) }) {
			conn.Close()
		}
	}
}

// goTracked runs f in a goroutine that Close waits for, unless the server is closed.
func (s *Server) goTracked(f func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Go(f)
	return true
}

// notifyLocked wakes WaitReady callers. s.mu must be held.
func (s *Server) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Server) handshake(conn *net.UnixConn, snapshot func() []SnapshotEntry) {
	log := s.log()
	stop := context.AfterFunc(s.ctx, func() { conn.Close() })
	pc := newPacketConn(conn)
	conn.SetReadDeadline(time.Now().Add(s.ackTimeout()))
	data, files, err := pc.read()
	closeFiles(files)
	var hello zdspb.ZdsHello
	if err == nil {
		err = proto.Unmarshal(data, &hello)
	}
	if err == nil && hello.GetVersion() != zdspb.Version_V1 {
		err = fmt.Errorf("unsupported version %v", hello.GetVersion())
	}
	if err != nil {
		stop()
		conn.Close()
		log.Warn("zds: proxy hello rejected", "err", err)
		return
	}
	conn.SetReadDeadline(time.Time{})
	stop()

	sc := &serverConn{
		s:    s,
		conn: conn,
		pc:   pc,
		sem:  make(chan struct{}, 1),
		acks: make(chan string, 1),
		done: make(chan struct{}),
	}
	// The snapshot holds the request slot, so adds and dels for this proxy queue behind it.
	sc.sem <- struct{}{}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		conn.Close()
		return
	}
	s.nextID++
	sc.id = s.nextID
	sc.log = log.With("proxy", sc.id)
	s.conns = append(s.conns, sc)
	s.notifyLocked()
	s.wg.Go(sc.readLoop)
	s.mu.Unlock()

	entries := snapshot()
	sc.log.Info("zds: proxy connected, sending snapshot", "workloads", len(entries))
	for _, e := range entries {
		if e.UID == "" {
			sc.log.Warn("zds: snapshot entry without uid skipped")
			continue
		}
		req, what, nsFile := keepRequest(e.UID), "keep", (*os.File)(nil)
		if e.NetNS != nil {
			req, what, nsFile = addRequest(e.UID, e.Info), "add", e.NetNS.File()
		}
		ack, sent, err := sc.exchange(s.ctx, req, nsFile)
		switch {
		case err != nil && !sent && errors.Is(err, errNetNS):
			// The pod went away while we streamed (its netns closed): leave it out, the proxy
			// drops it.
			sc.log.Warn("zds: snapshot entry skipped", "uid", e.UID, "err", err)
		case err != nil:
			sc.drop(fmt.Errorf("snapshot %s %s: %w", what, e.UID, err))
			return
		case ack != "":
			sc.log.Warn("zds: proxy refused snapshot entry", "uid", e.UID, "op", what, "err", ack)
		}
	}
	ack, _, err := sc.exchange(s.ctx, &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_SnapshotSent{SnapshotSent: &zdspb.SnapshotSent{}}}, nil)
	if err != nil {
		sc.drop(fmt.Errorf("snapshot sent: %w", err))
		return
	}
	if ack != "" {
		sc.log.Warn("zds: proxy refused SnapshotSent", "err", ack)
	}
	s.mu.Lock()
	sc.live = true
	s.notifyLocked()
	s.mu.Unlock()
	sc.release()
	sc.log.Info("zds: proxy live")
}

func addRequest(uid string, info WorkloadInfo) *zdspb.WorkloadRequest {
	return &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Add{Add: &zdspb.AddWorkload{Uid: uid, WorkloadInfo: infoToPB(info)}}}
}

func keepRequest(uid string) *zdspb.WorkloadRequest {
	return &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Keep{Keep: &zdspb.KeepWorkload{Uid: uid}}}
}

func delRequest(uid string) *zdspb.WorkloadRequest {
	return &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Del{Del: &zdspb.DelWorkload{Uid: uid}}}
}

// AddWorkload hands uid's netns to the newest proxy connection and waits for its Ack. The caller
// keeps ownership of ns. It fails with ErrNoProxy if no proxy is connected, and with an
// *AckError if the proxy refused. A connection whose snapshot is still streaming counts: the add
// queues behind the snapshot. If that connection dies before the add is sent, the next newest is
// tried.
func (s *Server) AddWorkload(ctx context.Context, uid string, info WorkloadInfo, ns *netns.NS) error {
	if uid == "" {
		return errors.New("zds: add: empty uid")
	}
	if ns == nil {
		return fmt.Errorf("zds: add %s: no netns", uid)
	}
	req := addRequest(uid, info)
	for {
		sc := s.newest()
		if sc == nil {
			return fmt.Errorf("zds: add %s: %w", uid, ErrNoProxy)
		}
		ack, sent, err := sc.request(ctx, req, ns.File())
		if err != nil {
			if !sent && sc.isDropped() && ctx.Err() == nil {
				continue // dropped conns leave s.conns, so this terminates
			}
			return fmt.Errorf("zds: add %s: %w", uid, err)
		}
		if ack != "" {
			return fmt.Errorf("zds: add %s: %w", uid, &AckError{Msg: ack})
		}
		return nil
	}
}

// DelWorkload removes uid from every connected proxy. A connection lost on the way is not an
// error: when that proxy reconnects, the snapshot no longer names uid and the proxy drains it.
func (s *Server) DelWorkload(ctx context.Context, uid string) error {
	if uid == "" {
		return errors.New("zds: del: empty uid")
	}
	s.mu.Lock()
	conns := append([]*serverConn(nil), s.conns...)
	s.mu.Unlock()

	req := delRequest(uid)
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for i, sc := range conns {
		wg.Go(func() {
			ack, _, err := sc.request(ctx, req, nil)
			switch {
			case err != nil && sc.isDropped() && ctx.Err() == nil:
				sc.log.Debug("zds: del: proxy gone", "uid", uid, "err", err)
			case err != nil:
				errs[i] = fmt.Errorf("proxy %d: %w", sc.id, err)
			case ack != "":
				errs[i] = fmt.Errorf("proxy %d: %w", sc.id, &AckError{Msg: ack})
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("zds: del %s: %w", uid, err)
	}
	return nil
}

// Live is the number of proxy connections past their snapshot, for metrics and readiness.
func (s *Server) Live() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	live := 0
	for _, sc := range s.conns {
		if sc.live {
			live++
		}
	}
	return live
}

// WaitReady blocks until at least n proxy connections are live (snapshot done).
func (s *Server) WaitReady(ctx context.Context, n int) error {
	for {
		s.mu.Lock()
		live := 0
		for _, sc := range s.conns {
			if sc.live {
				live++
			}
		}
		ch, closed := s.changed, s.closed
		s.mu.Unlock()
		if live >= n {
			return nil
		}
		if closed {
			return fmt.Errorf("zds: %w", errServerClosed)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("zds: waiting for %d proxies (%d live): %w", n, live, ctx.Err())
		}
	}
}

// Close stops accepting, drops every proxy connection and waits for the server's goroutines.
// The proxies keep their workloads and reconnect to the next agent.
func (s *Server) Close() error {
	s.once.Do(func() {
		s.mu.Lock()
		s.closed = true
		conns := append([]*serverConn(nil), s.conns...)
		s.notifyLocked()
		s.mu.Unlock()
		s.cancel()
		s.cerr = s.ln.Close()
		if fi, err := os.Lstat(s.Path); err == nil && os.SameFile(fi, s.sock) {
			os.Remove(s.Path)
		}
		for _, sc := range conns {
			sc.drop(errServerClosed)
		}
	})
	s.wg.Wait()
	return s.cerr
}

func (s *Server) newest() *serverConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) == 0 {
		return nil
	}
	return s.conns[len(s.conns)-1]
}

func (s *Server) unregister(sc *serverConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, c := range s.conns {
		if c == sc {
			s.conns = append(s.conns[:i], s.conns[i+1:]...)
			s.notifyLocked()
			return
		}
	}
}

// serverConn is one proxy connection. Requests are strictly sequential: sem is the one request
// slot, and the Ack that arrives is for the request holding it (ZDS has no request ids).
type serverConn struct {
	s    *Server
	id   uint64
	log  *slog.Logger
	conn *net.UnixConn
	pc   *packetConn
	live bool // snapshot done; guarded by s.mu

	sem     chan struct{}
	pending atomic.Bool // a request was sent and its Ack not yet read
	acks    chan string // the pending request's Ack error; capacity 1

	done     chan struct{} // closed by drop
	dropOnce sync.Once
	dropErr  error // set before done is closed
}

// readLoop reads the proxy's Acks until the connection ends. It also notices a proxy that goes
// away between requests.
func (sc *serverConn) readLoop() {
	for {
		data, files, err := sc.pc.read()
		// A proxy never sends descriptors.
		closeFiles(files)
		if err != nil {
			sc.drop(fmt.Errorf("read: %w", err))
			return
		}
		var resp zdspb.WorkloadResponse
		if err := proto.Unmarshal(data, &resp); err != nil {
			sc.drop(fmt.Errorf("bad response: %w", err))
			return
		}
		ack := resp.GetAck()
		if ack == nil {
			sc.drop(errors.New("response without an ack"))
			return
		}
		if !sc.pending.CompareAndSwap(true, false) {
			sc.drop(errors.New("ack without a request"))
			return
		}
		sc.acks <- ack.GetError()
	}
}

func (sc *serverConn) drop(reason error) {
	sc.dropOnce.Do(func() {
		sc.dropErr = reason
		close(sc.done)
		sc.conn.Close()
		sc.s.unregister(sc)
		level := slog.LevelWarn
		if errors.Is(reason, errServerClosed) {
			level = slog.LevelDebug
		}
		sc.log.Log(context.Background(), level, "zds: proxy connection dropped", "reason", reason)
	})
}

func (sc *serverConn) isDropped() bool {
	select {
	case <-sc.done:
		return true
	default:
		return false
	}
}

func (sc *serverConn) lost() error {
	return fmt.Errorf("proxy %d connection lost: %w", sc.id, sc.dropErr)
}

func (sc *serverConn) release() { <-sc.sem }

// request takes the request slot, sends req and waits for its Ack. sent reports whether req
// reached the socket (if not, the proxy certainly did not act on it).
func (sc *serverConn) request(ctx context.Context, req *zdspb.WorkloadRequest, nsFile *os.File) (ack string, sent bool, err error) {
	select {
	case sc.sem <- struct{}{}:
	case <-sc.done:
		return "", false, sc.lost()
	case <-ctx.Done():
		return "", false, ctx.Err()
	}
	if sc.isDropped() {
		sc.release()
		return "", false, sc.lost()
	}
	ack, sent, err = sc.exchange(ctx, req, nsFile)
	if sent && err != nil && ctx.Err() != nil && !sc.isDropped() {
		// The caller gave up but the Ack is still owed. Keep the slot until it arrives, or the
		// next request would take it for its own.
		deadline := time.Now().Add(sc.s.ackTimeout())
		if sc.s.goTracked(func() { sc.awaitOwed(deadline); sc.release() }) {
			return ack, sent, err
		}
		sc.drop(errServerClosed)
	}
	sc.release()
	return ack, sent, err
}

// exchange sends req and waits for its Ack. The caller holds the slot.
func (sc *serverConn) exchange(ctx context.Context, req *zdspb.WorkloadRequest, nsFile *os.File) (ack string, sent bool, err error) {
	timeout := sc.s.ackTimeout()
	sc.pending.Store(true)
	if err := sc.pc.write(req, nsFile, time.Now().Add(timeout)); err != nil {
		sc.pending.Store(false)
		if !errors.Is(err, errNetNS) {
			sc.drop(fmt.Errorf("write: %w", err))
		}
		return "", false, err
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case ack := <-sc.acks:
		return ack, true, nil
	case <-sc.done:
		return "", true, sc.lost()
	case <-t.C:
		// The proxy is stuck, or an Ack got lost: either way the connection is out of step.
		err := fmt.Errorf("no ack within %v", timeout)
		sc.drop(err)
		return "", true, err
	case <-ctx.Done():
		return "", true, ctx.Err()
	}
}

func (sc *serverConn) awaitOwed(deadline time.Time) {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-sc.acks:
	case <-sc.done:
	case <-t.C:
		sc.drop(errors.New("no ack for an abandoned request"))
	}
}
