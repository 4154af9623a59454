package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// The server's per-connection code is in four files: this one holds the connection itself
// (its state, the read loop and frame dispatch, SETTINGS and PING, keepalive, graceful
// shutdown and teardown); serverstream.go opens, ends and resets streams; serverflow.go
// takes DATA in and keeps the flow-control windows; serverwriter.go queues and writes frames.

// The HTTP/2 server side of HBONE. It speaks just enough HTTP/2 for CONNECT tunnels, on
// x/net's Framer and HPACK. Design:
//   - One read loop per connection parses frames and never blocks on the network write side:
//     every frame it wants sent goes to a queue, and the writer goroutine sends it. DATA for
//     a tunnel whose upstream can take it goes straight to the upstream socket with a
//     non-blocking write; what it cannot take waits for the tunnel's goroutine.
//   - Frames are written in batches (connection control frames first, then stream frames in
//     order), one flush per batch, by one writer at a time: a tunnel goroutine that queued
//     frames writes the batch itself when no one else is writing, so the common path has no
//     hand-off between goroutines; the writer goroutine takes the read loop's frames and
//     whatever a writer left behind. Frames other than DATA waiting to be written are
//     bounded (maxQueuedCtrl): a peer that asks for more answers than it reads is dropped.
//   - Each tunnel runs in two goroutines (one per direction); they wait on per-stream
//     channels, so a slow upstream only stalls its own stream, within its flow-control window.
//   - sc.mu guards all connection and stream state.

var (
	errConnClosed  = errors.New("hbone: HTTP/2 connection closed")
	errStreamEnded = errors.New("hbone: stream already ended")
	errRefused     = errors.New("hbone: CONNECT refused")
	pingPayload    = [8]byte{'h', 'b', 'o', 'n', 'e', 'p', 'n', 'g'}
	writeTimeout   = 30 * time.Second
)

// maxQueuedCtrl bounds the frames other than DATA that wait to be written on a connection
// (queued, or in the batch being written), as x/net's server bounds its queued control
// frames (maxQueuedControlFrames, the same number). Most answer the peer: a RST_STREAM per
// HEADERS refused, a PING or SETTINGS ACK, a WINDOW_UPDATE, a reset or a refusal. A peer that
// makes us queue more than that does not read what it asks for (a flood): the connection is
// closed (errTooManyQueued). DATA needs no such bound: the peer's windows and one write in
// flight per tunnel bound it.
var maxQueuedCtrl = 10000

var errTooManyQueued = fmt.Errorf("hbone: too many frames queued for a peer that does not read them: %w",
	http2.ConnectionError(http2.ErrCodeEnhanceYourCalm))

const maxWindow = 1<<31 - 1

type serverConn struct {
	frameWriter // sc.mu guards all connection and stream state
	srv         *Server
	raw         net.Conn // under conn: closing it never blocks
	tls         tls.ConnectionState
	log         *slog.Logger
	maxStreams  uint32
	keepalive
	start    time.Time
	lastRead atomic.Int64 // time.Since(start) of the last frame read

	// Guarded by mu.
	closed     bool // torn down
	finishing  bool // fkClose queued
	streams    map[uint32]*stream
	maxID      uint32          // highest client stream id seen
	open       int             // streams counting toward MAX_CONCURRENT_STREAMS
	handlers   int             // tunnels on this connection: waiting to dial, dialing or running
	dials      int             // Dialers running (at most maxStreams): see startDialLocked
	queued     []pendingTunnel // CONNECTs waiting for a dial slot, in order; all live
	goingAway  bool            // we sent GOAWAY: no new streams
	peerGoAway bool
	sendWindow int64         // connection window the peer granted us
	peerInit   int32         // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame  uint32        // peer's SETTINGS_MAX_FRAME_SIZE
	recvAvail  int32         // connection window the peer may still fill
	recvUnsent int32         // consumed bytes not yet returned by WINDOW_UPDATE
	resetTAT   time.Duration // early resets: the GCRA's theoretical arrival time (allowEarlyResetLocked)

	// Read loop only: CONNECTs whose Dialer has not started yet (startPending), and the
	// frames read since the first of them.
	pending       []pendingTunnel
	pendingFrames int
}

// pendingTunnel is an accepted CONNECT waiting for the read loop, or a dial slot, to start
// its Dialer.
type pendingTunnel struct {
	ctx context.Context
	st  *stream
	req Request
}

func newServerConn(s *Server, tc *tls.Conn, cork *bufConn, log *slog.Logger) *serverConn {
	sc := &serverConn{
		srv:        s,
		raw:        cork.Conn,
		tls:        tc.ConnectionState(),
		log:        log,
		maxStreams: s.maxStreams(),
		keepalive:  keepalive{readIdle: orDefault(s.ReadIdleTimeout, defaultReadIdle), pingTimeout: orDefault(s.PingTimeout, defaultPingTimeout)},
		start:      time.Now(),
		streams:    make(map[uint32]*stream),
		sendWindow: initialWindow,
		peerInit:   initialWindow,
		peerFrame:  16384,
		recvAvail:  initialWindow,
	}
	sc.initWriter(tc, cork, []http2.Setting{
		{ID: http2.SettingMaxConcurrentStreams, Val: sc.maxStreams},
		{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
	})
	cork.drained = sc.startPending
	return sc
}

func (sc *serverConn) now() time.Duration { return time.Since(sc.start) }

// serve runs the connection until it ends, then tears it down.
func (sc *serverConn) serve(prefaceTimeout time.Duration) {
	go sc.writeLoop()
	err := sc.readLoop(prefaceTimeout)
	sc.teardown(err)
}

func (sc *serverConn) readLoop(prefaceTimeout time.Duration) error {
	sc.mu.Lock()
	sc.enqueueCtrlLocked(wframe{kind: fkSettings})
	sc.enqueueCtrlLocked(wframe{kind: fkWindowUpdate, n: connWindow - initialWindow})
	sc.recvAvail = connWindow
	sc.wakeLocked()
	sc.mu.Unlock()

	sc.conn.SetReadDeadline(time.Now().Add(prefaceTimeout))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(sc.conn, preface[:]); err != nil {
		return fmt.Errorf("reading the HTTP/2 preface: %w", err)
	}
	if string(preface[:]) != http2.ClientPreface {
		return errors.New("not an HTTP/2 client preface")
	}
	first := true
	for {
		if err := sc.beforeRead(); err != nil {
			return err
		}
		f, err := sc.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				// A malformed stream (bad header field, say): HPACK state is intact.
				sc.mu.Lock()
				if se.StreamID > sc.maxID && se.StreamID%2 == 1 {
					sc.maxID = se.StreamID
				}
				sc.resetIDLocked(se.StreamID, se.Code)
				sc.mu.Unlock()
				continue
			}
			if errors.Is(err, http2.ErrFrameTooLarge) {
				return http2.ConnectionError(http2.ErrCodeFrameSize)
			}
			return err
		}
		sc.lastRead.Store(int64(sc.now()))
		if first {
			// RFC 9113 §3.4: the preface ends with a SETTINGS frame.
			if sf, ok := f.(*http2.SettingsFrame); !ok || sf.IsAck() {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			sc.conn.SetReadDeadline(time.Time{})
			sc.mu.Lock()
			sc.health = time.AfterFunc(sc.readIdle, sc.healthCheck)
			sc.mu.Unlock()
			first = false
		}
		if err := sc.processFrame(f); err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				sc.mu.Lock()
				sc.resetIDLocked(se.StreamID, se.Code)
				sc.mu.Unlock()
				continue
			}
			return err
		}
		if len(sc.pending) > 0 {
			// Dials start when all that arrived has been read (bufConn.drained), or after
			// this many frames when the input never runs dry.
			if sc.pendingFrames++; sc.pendingFrames >= maxPendingFrames {
				sc.startPending()
			}
		}
	}
}

// maxPendingFrames bounds how long a CONNECT's dial may wait behind a busy connection's input.
const maxPendingFrames = 64

// startPending starts the Dialer of each pending CONNECT, except those reset meanwhile: a
// HEADERS and its RST_STREAM read together never reach the app (CVE-2023-44487). It runs
// in the read loop, before a read would block on the socket.
func (sc *serverConn) startPending() {
	if len(sc.pending) == 0 {
		return
	}
	sc.mu.Lock()
	for i, p := range sc.pending {
		if p.st.err != nil || sc.closed {
			sc.dropLocked(p)
		} else {
			sc.startDialLocked(p)
		}
		sc.pending[i] = pendingTunnel{}
	}
	sc.pending = sc.pending[:0]
	sc.pendingFrames = 0
	sc.maybeFinishLocked()
	sc.wakeLocked()
	sc.mu.Unlock()
}

// startDialLocked starts p's tunnel if a dial slot is free, else queues it. Dialers in
// flight are bounded per connection (MAX_CONCURRENT_STREAMS), as x/net's server bounds its
// running handlers. A reset cancels its dial, so the bound is reached only when cancelled
// Dialers are slow to return; then new CONNECTs wait their turn, and neither more dials run
// at once nor does the connection end.
func (sc *serverConn) startDialLocked(p pendingTunnel) {
	if sc.dials >= int(sc.maxStreams) {
		p.st.queued = true
		sc.queued = append(sc.queued, p)
		return
	}
	sc.dials++
	p.st.started = true
	go sc.runTunnel(p.ctx, p.st, p.req)
}

// dialDone frees the dial slot of a tunnel whose Dialer returned, for the first CONNECT
// waiting for one.
func (sc *serverConn) dialDone() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.dials--
	for len(sc.queued) > 0 && sc.dials < int(sc.maxStreams) {
		p := sc.queued[0]
		sc.queued[0] = pendingTunnel{}
		sc.queued = sc.queued[1:]
		p.st.queued = false
		sc.startDialLocked(p)
	}
	if len(sc.queued) == 0 {
		sc.queued = nil // let the array go
	}
}

// unqueueLocked takes st, reset while waiting for a dial slot, out of sc.queued.
func (sc *serverConn) unqueueLocked(st *stream) {
	for i, p := range sc.queued {
		if p.st == st {
			st.queued = false
			sc.queued = slices.Delete(sc.queued, i, i+1)
			sc.dropLocked(p)
			return
		}
	}
}

// dropLocked gives up a tunnel whose Dialer never started.
func (sc *serverConn) dropLocked(p pendingTunnel) {
	p.st.cancel()
	sc.handlers--
	sc.srv.handlers.Add(-1)
}

// Early resets: a client's RST_STREAM on a CONNECT whose Dialer has not started (pending,
// or queued for a dial slot). Only those are counted: they cost the client a frame and us
// a stream, while a reset once the dial runs saves us the rest of a dial we are already
// paying for (the Dialer bound keeps those few at a time). Past a burst of earlyResetBurst x
// MAX_CONCURRENT_STREAMS and a rate of earlyResetRate x MAX_CONCURRENT_STREAMS a second,
// the connection goes away (goAwayLocked) with ENHANCE_YOUR_CALM.
const (
	earlyResetBurst = 2
	earlyResetRate  = 1
)

// allowEarlyResetLocked counts one early reset (GCRA: a token bucket kept as one time).
func (sc *serverConn) allowEarlyResetLocked() bool {
	interval := time.Second / time.Duration(earlyResetRate*sc.maxStreams)
	tolerance := time.Duration(earlyResetBurst*sc.maxStreams-1) * interval
	now := sc.now()
	tat := max(sc.resetTAT, now)
	if tat-now > tolerance {
		return false
	}
	sc.resetTAT = tat + interval
	return true
}

func (sc *serverConn) processFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return sc.onSettings(f)
	case *http2.MetaHeadersFrame:
		return sc.onHeaders(f)
	case *http2.DataFrame:
		return sc.onData(f)
	case *http2.WindowUpdateFrame:
		return sc.onWindowUpdate(f)
	case *http2.PingFrame:
		return sc.onPing(f)
	case *http2.RSTStreamFrame:
		return sc.onRSTStream(f)
	case *http2.GoAwayFrame:
		sc.mu.Lock()
		sc.peerGoAway = true
		sc.maybeFinishLocked()
		sc.mu.Unlock()
		return nil
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol) // clients cannot push
	default:
		return nil // PRIORITY, PRIORITY_UPDATE, unknown extension frames
	}
}

func (sc *serverConn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			// RFC 9113 §6.9.2: the change applies to every open stream's send window.
			delta := int64(s.Val) - int64(sc.peerInit)
			for _, st := range sc.streams {
				st.sendWindow += delta
				if st.sendWindow > maxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				notify(st.sendReady)
			}
			sc.peerInit = int32(s.Val)
		case http2.SettingMaxFrameSize:
			sc.peerFrame = s.Val
		}
		// HEADER_TABLE_SIZE needs nothing: responses never use the dynamic table.
		return nil
	})
	if err != nil {
		return err
	}
	sc.enqueueCtrlLocked(wframe{kind: fkSettingsAck})
	return nil
}

func (sc *serverConn) onPing(f *http2.PingFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.onPingLocked(f, &sc.frameWriter)
	return nil
}

// maybeFinishLocked closes a connection that is going away once nothing runs on it.
func (sc *serverConn) maybeFinishLocked() {
	if (sc.goingAway || sc.peerGoAway) && sc.open == 0 && sc.handlers == 0 && !sc.finishing && !sc.closed {
		sc.finishing = true
		sc.enqueueOrdLocked(wframe{kind: fkClose})
	}
}

// shutdown starts a graceful close: GOAWAY, no new streams, close when the last tunnel ends.
func (sc *serverConn) shutdown() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.goAwayLocked(http2.ErrCodeNo)
}

// goAwayLocked sends GOAWAY with code and closes the connection once its last tunnel ends:
// new streams are refused, open ones go on. The code tells the client why; x/net's client
// and h2 (ztunnel's) keep the streams the GOAWAY covers whatever it is.
func (sc *serverConn) goAwayLocked(code http2.ErrCode) {
	if sc.closed || sc.goingAway {
		return
	}
	sc.goingAway = true
	sc.enqueueOrdLocked(wframe{kind: fkGoAway, id: sc.maxID, code: code})
	sc.maybeFinishLocked()
	sc.wakeLocked()
}

func (sc *serverConn) healthCheck() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.closed {
		return
	}
	if sc.checkLocked(sc.now(), time.Duration(sc.lastRead.Load()), &sc.frameWriter) {
		sc.log.Info("hbone: PING unanswered; closing connection", "timeout", sc.pingTimeout)
		sc.raw.Close() // the read loop fails and tears down
	}
}

func (sc *serverConn) teardown(err error) {
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		// Tell the peer why, if the writer still can.
		sc.mu.Lock()
		goAway := true
		if errors.Is(err, errTooManyQueued) {
			// The peer does not read: what waits for it goes, and a GOAWAY only if the
			// writer is free to send it now. One stuck in a batch is stuck on the peer: the
			// connection is closed at once (x/net's server closes without a GOAWAY), and
			// that batch's writer fails the queue when its write returns; failing it here
			// could release a tunnel whose earlier frames the batch still reads.
			goAway = !sc.writing
			if goAway {
				failFrames(sc.dropQueuedLocked(), errConnClosed)
			}
		}
		if goAway {
			sc.enqueueOrdLocked(wframe{kind: fkGoAway, id: sc.maxID, code: http2.ErrCode(ce)})
			sc.enqueueOrdLocked(wframe{kind: fkClose})
			sc.wakeLocked()
		}
		sc.mu.Unlock()
		if goAway {
			select {
			case <-sc.writerDone:
			case <-time.After(time.Second):
			}
		}
	}
	sc.mu.Lock()
	sc.closed = true
	if sc.health != nil {
		sc.health.Stop()
	}
	for _, st := range sc.streams {
		sc.abortLocked(st, resetError(errConnClosed), false, 0)
	}
	sc.wstop = true
	sc.wcond.Broadcast()
	sc.mu.Unlock()
	sc.startPending() // drops them all: their streams are aborted
	sc.raw.Close()
	<-sc.writerDone
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		sc.log.Debug("hbone: connection ended", "err", err)
	}
}
