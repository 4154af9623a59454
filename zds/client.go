package zds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/zds/zdspb"
)

const (
	defaultMinBackoff = 100 * time.Millisecond
	defaultMaxBackoff = 5 * time.Second
	// ackWriteTimeout bounds sending an Ack (and the Hello) to an agent that stopped reading.
	ackWriteTimeout = 5 * time.Second
)

// Handler is the proxy's side of ZDS. The Client calls it from one goroutine, one request at a
// time, and acks each request with the handler's result.
type Handler interface {
	// AddWorkload must return once the workload's listeners are up; ns is owned by the handler
	// from then on, whatever it returns (close it when done). It may name a uid the handler
	// already has (a new snapshot after a reconnect re-sends every pod, with a fresh descriptor).
	AddWorkload(ctx context.Context, uid string, info WorkloadInfo, ns *netns.NS) error
	// KeepWorkload comes only during a snapshot: keep uid if present; nothing to open.
	KeepWorkload(ctx context.Context, uid string) error
	DelWorkload(ctx context.Context, uid string) error
	// SnapshotDone is called after SnapshotSent with the uids the snapshot named (Add or Keep); the
	// handler drains every other workload it has.
	SnapshotDone(ctx context.Context, named map[string]bool) error
}

type inSnapshotKey struct{}

// InSnapshot reports whether an AddWorkload's ctx is of the snapshot a connection starts
// with, rather than a pod added later. The agent sends later Adds only to its newest
// connection, so a pod added later is served by no other proxy (docs/zds.md), while a
// snapshot's pods may be an older proxy's too (an upgrade).
func InSnapshot(ctx context.Context) bool {
	v, _ := ctx.Value(inSnapshotKey{}).(bool)
	return v
}

// Client is the proxy's end of ZDS: it connects to the agent, serves its requests and reconnects
// when the agent goes away. Workloads keep running while it is disconnected: only a new snapshot
// (or a Del) removes them.
type Client struct {
	Path    string // agent socket; DefaultSocketPath if empty
	Handler Handler
	Log     *slog.Logger // slog.Default() if nil
	// Reconnect delay bounds: it doubles from MinBackoff to MaxBackoff, with jitter, and starts
	// again from MinBackoff after a connection that served requests. Zero means 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration
}

// Run serves the agent until ctx is done, then returns nil. It fails only on a configuration
// error; connection failures are logged and retried.
func (c *Client) Run(ctx context.Context) error {
	if c.Handler == nil {
		return errors.New("zds: client without a handler")
	}
	path := c.Path
	if path == "" {
		path = DefaultSocketPath
	}
	log := c.Log
	if log == nil {
		log = slog.Default()
	}
	log = log.With("socket", path)
	minB, maxB := c.MinBackoff, c.MaxBackoff
	if minB <= 0 {
		minB = defaultMinBackoff
	}
	if maxB <= 0 {
		maxB = defaultMaxBackoff
	}
	maxB = max(maxB, minB)

	backoff := minB
	for failures := 1; ; failures++ {
		served, err := c.session(ctx, path, log)
		if ctx.Err() != nil {
			return nil
		}
		if served {
			backoff, failures = minB, 1
		}
		// The first failure is news; a long outage is one line per attempt at debug level.
		level := slog.LevelWarn
		if failures > 1 {
			level = slog.LevelDebug
		}
		wait := jitter(backoff)
		log.Log(ctx, level, "zds: disconnected from agent, retrying", "err", err, "in", wait, "attempt", failures)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, maxB)
	}
}

// jitter spreads d over [d/2, d] so proxies restarted together do not reconnect in lockstep.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// session runs one connection. served reports whether the agent sent at least one request (the
// connection was real, so the backoff restarts).
func (c *Client) session(ctx context.Context, path string, log *slog.Logger) (served bool, err error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return false, fmt.Errorf("zds: connect: %w", err)
	}
	conn := nc.(*net.UnixConn)
	defer conn.Close()
	// Closing the socket is what unblocks the read on shutdown.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	pc := newPacketConn(conn)
	hello := &zdspb.ZdsHello{Version: zdspb.Version_V1}
	if err := pc.write(hello, nil, time.Now().Add(ackWriteTimeout)); err != nil {
		return false, fmt.Errorf("zds: send hello: %w", err)
	}
	log.Info("zds: connected to agent")

	st := &clientSession{c: c, named: map[string]bool{}}
	for {
		data, files, err := pc.read()
		if err != nil && !errors.Is(err, errMalformed) {
			closeFiles(files)
			return served, fmt.Errorf("zds: read: %w", err)
		}
		served = true
		if err != nil {
			closeFiles(files)
			err = fmt.Errorf("zds: %w", err)
		} else {
			err = st.handle(ctx, data, files)
		}
		ack := &zdspb.Ack{}
		if err != nil {
			ack.Error = err.Error()
			log.Warn("zds: request failed", "err", err)
		}
		resp := &zdspb.WorkloadResponse{Payload: &zdspb.WorkloadResponse_Ack{Ack: ack}}
		if err := pc.write(resp, nil, time.Now().Add(ackWriteTimeout)); err != nil {
			return served, fmt.Errorf("zds: send ack: %w", err)
		}
	}
}

// clientSession is the per-connection protocol state.
type clientSession struct {
	c            *Client
	snapshotDone bool
	named        map[string]bool // uids named by the snapshot so far
}

// handle decodes and runs one request. Every file in files is either handed to the handler or
// closed here.
func (s *clientSession) handle(ctx context.Context, data []byte, files []*os.File) error {
	var req zdspb.WorkloadRequest
	if err := proto.Unmarshal(data, &req); err != nil {
		closeFiles(files)
		return fmt.Errorf("zds: %w: %v", errMalformed, err)
	}
	h := s.c.Handler
	// Only an Add may carry a descriptor; for anything else it is an error and must not leak.
	if _, isAdd := req.Payload.(*zdspb.WorkloadRequest_Add); !isAdd && len(files) > 0 {
		closeFiles(files)
		return fmt.Errorf("zds: %w: %s with %d descriptor(s)", errMalformed, kind(&req), len(files))
	}
	switch p := req.Payload.(type) {
	case *zdspb.WorkloadRequest_Add:
		uid := p.Add.GetUid()
		if uid == "" || len(files) != 1 {
			closeFiles(files)
			return fmt.Errorf("zds: add %q: %w: need a uid and exactly one netns descriptor, got %d", uid, errMalformed, len(files))
		}
		// Named even if the handler fails: the agent knows the pod, so an instance the handler
		// already runs for it survives the snapshot.
		if !s.snapshotDone {
			s.named[uid] = true
		}
		// The descriptor must be a network namespace: anything else (a socket, a mount
		// namespace) would have the proxy open listeners in the wrong place. The uid is named
		// all the same, like a handler failure: an instance already running for it stays.
		ns, err := netns.FromFile(files[0])
		if err != nil {
			return fmt.Errorf("zds: add %s: %w: descriptor: %w", uid, errMalformed, err)
		}
		addCtx := ctx
		if !s.snapshotDone {
			addCtx = context.WithValue(ctx, inSnapshotKey{}, true)
		}
		if err := h.AddWorkload(addCtx, uid, infoFromPB(p.Add.GetWorkloadInfo()), ns); err != nil {
			return fmt.Errorf("zds: add %s: %w", uid, err)
		}
	case *zdspb.WorkloadRequest_Keep:
		uid := p.Keep.GetUid()
		if uid == "" {
			return fmt.Errorf("zds: keep: %w: empty uid", errMalformed)
		}
		if s.snapshotDone {
			return fmt.Errorf("zds: keep %s: %w: after the snapshot", uid, errMalformed)
		}
		s.named[uid] = true
		if err := h.KeepWorkload(ctx, uid); err != nil {
			return fmt.Errorf("zds: keep %s: %w", uid, err)
		}
	case *zdspb.WorkloadRequest_Del:
		uid := p.Del.GetUid()
		if uid == "" {
			return fmt.Errorf("zds: del: %w: empty uid", errMalformed)
		}
		delete(s.named, uid)
		if err := h.DelWorkload(ctx, uid); err != nil {
			return fmt.Errorf("zds: del %s: %w", uid, err)
		}
	case *zdspb.WorkloadRequest_SnapshotSent:
		if s.snapshotDone {
			return fmt.Errorf("zds: snapshot: %w: second SnapshotSent", errMalformed)
		}
		named := s.named
		s.snapshotDone, s.named = true, nil
		if err := h.SnapshotDone(ctx, named); err != nil {
			return fmt.Errorf("zds: snapshot: %w", err)
		}
	default:
		return fmt.Errorf("zds: %w: %s", errMalformed, kind(&req))
	}
	return nil
}

// kind names a request for error messages, including the field numbers of a payload this
// version does not know (a newer agent's).
func kind(req *zdspb.WorkloadRequest) string {
	if req.Payload != nil {
		return string(req.ProtoReflect().WhichOneof(req.ProtoReflect().Descriptor().Oneofs().ByName("payload")).Name())
	}
	var nums []protowire.Number
	for b := req.ProtoReflect().GetUnknown(); len(b) > 0; {
		num, _, n := protowire.ConsumeField(b)
		if n < 0 {
			break
		}
		nums = append(nums, num)
		b = b[n:]
	}
	if len(nums) == 0 {
		return "empty request"
	}
	return fmt.Sprintf("unknown request (field %v)", nums)
}
