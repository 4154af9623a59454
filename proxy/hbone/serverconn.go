package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

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
//     whatever a writer left behind.
//   - Each tunnel runs in two goroutines (one per direction); they wait on per-stream
//     channels, so a slow upstream only stalls its own stream, within its flow-control window.
//   - sc.mu guards all connection and stream state.

var (
	errConnClosed  = errors.New("hbone: HTTP/2 connection closed")
	errStreamEnded = errors.New("hbone: stream already ended")
	errRefused     = errors.New("hbone: CONNECT refused")
	pingPayload    = [8]byte{'h', 'b', 'o', 'n', 'e', 'p', 'n', 'g'}
	maxQueuedCtrl  = 10000 // queued control frames: beyond this the peer floods (PING, SETTINGS)
	writeTimeout   = 30 * time.Second
)

const maxWindow = 1<<31 - 1

type frameKind uint8

const (
	fkSettings frameKind = iota
	fkSettingsAck
	fkPing
	fkWindowUpdate
	fkGoAway
	fkHeaders
	fkData
	fkRST
	fkClose // flush, then close the connection (after a GOAWAY)
)

type wframe struct {
	kind   frameKind
	id     uint32
	data   []byte
	end    bool // END_STREAM; for fkPing: ACK
	status int
	code   http2.ErrCode
	n      uint32 // WINDOW_UPDATE increment
	ping   [8]byte
	done   chan error // signalled once the frame is written (its data no longer referenced)
}

type serverConn struct {
	srv         *Server
	conn        *tls.Conn
	raw         net.Conn // under conn: closing it never blocks
	cork        *bufConn
	tls         tls.ConnectionState
	log         *slog.Logger
	fr          *http2.Framer
	bw          *bufio.Writer
	dataHeader  [9]byte // the writer's scratch: a local would escape through bw
	henc        *hpack.Encoder
	hbuf        bytes.Buffer
	maxStreams  uint32
	readIdle    time.Duration
	pingTimeout time.Duration
	start       time.Time
	lastRead    atomic.Int64 // time.Since(start) of the last frame read
	writerDone  chan struct{}

	mu         sync.Mutex
	wcond      *sync.Cond // the writer goroutine waits here for frames
	ctrl, ord  []wframe
	spareCtrl  []wframe // the queues' other halves, reused batch after batch
	spareOrd   []wframe
	writing    bool // a goroutine is writing a batch: it owns fr's writer, bw and the cork
	wstop      bool // writing must end; enqueue drops frames
	closed     bool // torn down
	finishing  bool // fkClose queued
	streams    map[uint32]*stream
	maxID      uint32 // highest client stream id seen
	open       int    // streams counting toward MAX_CONCURRENT_STREAMS
	handlers   int    // tunnels running on this connection
	goingAway  bool   // we sent GOAWAY: no new streams
	peerGoAway bool
	sendWindow int64  // connection window the peer granted us
	peerInit   int32  // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame  uint32 // peer's SETTINGS_MAX_FRAME_SIZE
	recvAvail  int32  // connection window the peer may still fill
	recvUnsent int32  // consumed bytes not yet returned by WINDOW_UPDATE
	pingOut    bool
	pingAt     time.Duration
	health     *time.Timer
}

func newServerConn(s *Server, tc *tls.Conn, cork *bufConn, log *slog.Logger) *serverConn {
	sc := &serverConn{
		srv:         s,
		conn:        tc,
		raw:         cork.Conn,
		cork:        cork,
		tls:         tc.ConnectionState(),
		log:         log,
		maxStreams:  s.maxStreams(),
		readIdle:    orDefault(s.ReadIdleTimeout, defaultReadIdle),
		pingTimeout: orDefault(s.PingTimeout, defaultPingTimeout),
		start:       time.Now(),
		writerDone:  make(chan struct{}),
		streams:     make(map[uint32]*stream),
		sendWindow:  initialWindow,
		peerInit:    initialWindow,
		peerFrame:   16384,
		recvAvail:   initialWindow,
	}
	sc.wcond = sync.NewCond(&sc.mu)
	sc.bw = bufio.NewWriterSize(tc, 32<<10)
	sc.fr = http2.NewFramer(sc.bw, tc)
	sc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	sc.fr.MaxHeaderListSize = maxHeaderListSize
	sc.fr.SetMaxReadFrameSize(maxFrameSize)
	sc.fr.SetReuseFrames()
	sc.henc = hpack.NewEncoder(&sc.hbuf)
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
		sc.kick()
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
	}
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
	return sc.enqueueReplyLocked(wframe{kind: fkSettingsAck})
}

func (sc *serverConn) onPing(f *http2.PingFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if f.IsAck() {
		if f.Data == pingPayload {
			sc.pingOut = false
		}
		return nil
	}
	return sc.enqueueReplyLocked(wframe{kind: fkPing, end: true, ping: f.Data})
}

func (sc *serverConn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if f.StreamID == 0 {
		sc.sendWindow += int64(f.Increment)
		if sc.sendWindow > maxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		for _, st := range sc.streams {
			notify(st.sendReady)
		}
		return nil
	}
	st := sc.streams[f.StreamID]
	if st == nil {
		if f.StreamID > sc.maxID {
			return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream
		}
		return nil // closed stream: allowed, ignored
	}
	st.sendWindow += int64(f.Increment)
	if st.sendWindow > maxWindow {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	notify(st.sendReady)
	return nil
}

func (sc *serverConn) onRSTStream(f *http2.RSTStreamFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	st := sc.streams[f.StreamID]
	if st == nil {
		if f.StreamID > sc.maxID {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	cause := http2.StreamError{StreamID: f.StreamID, Code: f.ErrCode, Cause: errors.New("reset by peer")}
	sc.abortLocked(st, resetError(cause), false, 0)
	return nil
}

func (sc *serverConn) onData(f *http2.DataFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	n := int32(f.Length) // padding counts toward flow control
	if n > sc.recvAvail {
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	sc.recvAvail -= n
	st := sc.streams[f.StreamID]
	if st == nil || st.remoteDone {
		sc.returnConnLocked(n)
		switch {
		case f.StreamID > sc.maxID:
			return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream
		case st != nil:
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeStreamClosed}
		}
		return nil // a stream we closed or reset: frames in flight are ignored (RFC 9113 §5.4.2)
	}
	if n > st.recvAvail {
		sc.returnConnLocked(n)
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	st.recvAvail -= n
	data := f.Data()
	if pad := n - int32(len(data)); pad > 0 {
		sc.returnConnLocked(pad)
		sc.returnStreamLocked(st, pad)
	}
	if len(data) > 0 && len(data) < bulkSize && st.err == nil && len(st.rq) == 0 && !st.delivering && st.tryWrite != nil {
		// Small, nothing queued and the tunnel's goroutine not writing: the upstream socket
		// takes what it can now, without waking that goroutine. Its errors are left to that
		// goroutine, which meets them on its own write of the rest.
		st.delivering = true
		sc.mu.Unlock()
		k, _ := st.tryWrite(data)
		sc.mu.Lock()
		st.delivering = false
		if k > 0 {
			data = data[k:]
			st.delivered.Add(int64(k))
			sc.returnConnLocked(int32(k))
			sc.returnStreamLocked(st, int32(k))
		}
		if st.err != nil {
			// Aborted meanwhile: the rest is dropped like any undelivered data.
			sc.returnConnLocked(int32(len(data)))
			data = nil
		}
	}
	if len(data) > 0 && st.err == nil {
		c := getChunk(len(data))
		copy(c, data)
		st.rq = append(st.rq, c)
		st.rqBytes += len(data)
		notify(st.recvReady)
	}
	if f.StreamEnded() {
		sc.endRemoteLocked(st)
	}
	return nil
}

func (sc *serverConn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if st := sc.streams[id]; st != nil {
		// Trailers: they end the request body; a CONNECT tunnel has no use for their fields.
		if !f.StreamEnded() || st.remoteDone {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
		}
		sc.endRemoteLocked(st)
		return nil
	}
	if id%2 == 0 || id <= sc.maxID {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	sc.maxID = id
	if sc.goingAway || sc.closed || uint32(sc.open) >= sc.maxStreams || sc.handlers >= 4*int(sc.maxStreams) {
		// Over the limit, or reset-and-reopen faster than tunnels finish dialing (CVE-2023-44487):
		// the client may retry on another connection.
		sc.enqueueOrdLocked(wframe{kind: fkRST, id: id, code: http2.ErrCodeRefusedStream})
		return nil
	}
	st := &stream{
		sc:         sc,
		id:         id,
		inMap:      true,
		recvAvail:  streamWindow,
		sendWindow: int64(sc.peerInit),
		recvReady:  make(chan struct{}, 1),
		sendReady:  make(chan struct{}, 1),
		wdone:      make(chan error, 2),
	}
	sc.streams[id] = st
	sc.open++
	if f.StreamEnded() {
		st.remoteDone = true
	}
	req, status := sc.parseRequest(f)
	if status != 0 {
		sc.log.Debug("hbone: bad request", "stream", id, "method", f.PseudoValue("method"),
			"authority", f.PseudoValue("authority"), "status", status)
		sc.respondLocked(st, status)
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	st.cancel = cancel
	sc.handlers++
	sc.srv.handlers.Add(1)
	go sc.runTunnel(ctx, st, req)
	return nil
}

// parseRequest checks CONNECT semantics (RFC 9113 §8.5, reference §5): it returns a status
// other than 0 when the request must be refused.
func (sc *serverConn) parseRequest(f *http2.MetaHeadersFrame) (Request, int) {
	if f.Truncated {
		return Request{}, http.StatusRequestHeaderFieldsTooLarge
	}
	if f.PseudoValue("method") != http.MethodConnect {
		return Request{}, http.StatusBadRequest
	}
	// No :path or :scheme on a CONNECT; :protocol would be extended CONNECT, not enabled.
	if f.PseudoValue("path") != "" || f.PseudoValue("scheme") != "" ||
		f.PseudoValue("protocol") != "" || f.PseudoValue("status") != "" {
		return Request{}, http.StatusBadRequest
	}
	ap, err := netip.ParseAddrPort(f.PseudoValue("authority"))
	if err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" {
		return Request{}, http.StatusBadRequest
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	hdr := make(http.Header, len(f.Fields))
	for _, hf := range f.RegularFields() {
		hdr.Add(http.CanonicalHeaderKey(hf.Name), hf.Value)
	}
	return Request{
		Authority:  ap,
		Forwarded:  hdr.Get("Forwarded"),
		PeerTLS:    sc.tls,
		RemoteAddr: sc.raw.RemoteAddr(),
		Header:     hdr,
	}, 0
}

// respondLocked sends a final refusal and closes the stream.
func (sc *serverConn) respondLocked(st *stream, status int) {
	if st.err != nil {
		return // reset meanwhile
	}
	sc.enqueueOrdLocked(wframe{kind: fkHeaders, id: st.id, status: status, end: true})
	st.localDone = true
	// RFC 9113 §8.1: a complete response, then NO_ERROR to stop the request body.
	sc.abortLocked(st, errRefused, !st.remoteDone, http2.ErrCodeNo)
}

// endRemoteLocked records the peer's END_STREAM.
func (sc *serverConn) endRemoteLocked(st *stream) {
	st.remoteDone = true
	notify(st.recvReady)
	if st.localDone {
		sc.closeStreamLocked(st)
	}
}

// closeStreamLocked ends the stream's life on the wire; the tunnel may still be draining
// what was received.
func (sc *serverConn) closeStreamLocked(st *stream) {
	if !st.inMap {
		return
	}
	st.inMap = false
	delete(sc.streams, st.id)
	sc.open--
	sc.maybeFinishLocked()
}

// abortLocked ends a stream abnormally: optionally RST_STREAM to the peer; data received but
// not delivered is dropped and its connection window returned; both directions wake up.
func (sc *serverConn) abortLocked(st *stream, cause error, sendRST bool, code http2.ErrCode) {
	if st.err != nil {
		return
	}
	st.err = cause
	if st.inMap && sendRST {
		sc.enqueueOrdLocked(wframe{kind: fkRST, id: st.id, code: code})
	}
	sc.closeStreamLocked(st)
	if st.rqBytes > 0 {
		sc.returnConnLocked(int32(st.rqBytes))
	}
	for _, c := range st.rq {
		putChunk(c)
	}
	st.rq, st.rqBytes = nil, 0
	if st.cancel != nil {
		st.cancel()
	}
	if st.onAbort != nil {
		// A reset is a TCP RST upstream (§5) even when no copy is there to see it: after
		// the client's END_STREAM, the only one left may wait on a quiet upstream forever.
		go st.onAbort()
	}
	notify(st.recvReady)
	notify(st.sendReady)
}

// resetIDLocked answers a stream error.
func (sc *serverConn) resetIDLocked(id uint32, code http2.ErrCode) {
	if st := sc.streams[id]; st != nil {
		cause := http2.StreamError{StreamID: id, Code: code, Cause: errors.New("protocol error from peer")}
		sc.abortLocked(st, resetError(cause), true, code)
		return
	}
	sc.enqueueOrdLocked(wframe{kind: fkRST, id: id, code: code})
}

// The windows are returned in large steps (a quarter of the window, or as soon as that
// at least doubles what the peer may send): one WINDOW_UPDATE per megabyte or so, not one
// per DATA frame.
func (sc *serverConn) returnConnLocked(n int32) {
	sc.recvUnsent += n
	if sc.recvUnsent < connWindow/4 && sc.recvUnsent < sc.recvAvail {
		return
	}
	sc.enqueueCtrlLocked(wframe{kind: fkWindowUpdate, n: uint32(sc.recvUnsent)})
	sc.recvAvail += sc.recvUnsent
	sc.recvUnsent = 0
}

func (sc *serverConn) returnStreamLocked(st *stream, n int32) {
	if st.remoteDone || st.err != nil {
		return // the peer sends no more: nothing to open
	}
	st.recvUnsent += n
	if st.recvUnsent < streamWindow/4 && st.recvUnsent < st.recvAvail {
		return
	}
	sc.enqueueCtrlLocked(wframe{kind: fkWindowUpdate, id: st.id, n: uint32(st.recvUnsent)})
	st.recvAvail += st.recvUnsent
	st.recvUnsent = 0
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
	if sc.closed || sc.goingAway {
		return
	}
	sc.goingAway = true
	sc.enqueueOrdLocked(wframe{kind: fkGoAway, id: sc.maxID, code: http2.ErrCodeNo})
	sc.maybeFinishLocked()
	sc.wakeLocked()
}

func (sc *serverConn) healthCheck() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.closed {
		return
	}
	now := sc.now()
	if sc.pingOut {
		wait := now - sc.pingAt
		if wait >= sc.pingTimeout {
			sc.log.Info("hbone: PING unanswered; closing connection", "timeout", sc.pingTimeout)
			sc.raw.Close() // the read loop fails and tears down
			return
		}
		sc.health.Reset(sc.pingTimeout - wait)
		return
	}
	idle := now - time.Duration(sc.lastRead.Load())
	if idle < sc.readIdle {
		sc.health.Reset(sc.readIdle - idle)
		return
	}
	sc.pingOut, sc.pingAt = true, now
	sc.enqueueCtrlLocked(wframe{kind: fkPing, ping: pingPayload})
	sc.wakeLocked()
	sc.health.Reset(sc.pingTimeout)
}

func (sc *serverConn) teardown(err error) {
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		// Tell the peer why, if the writer still can.
		sc.mu.Lock()
		sc.enqueueOrdLocked(wframe{kind: fkGoAway, id: sc.maxID, code: http2.ErrCode(ce)})
		sc.enqueueOrdLocked(wframe{kind: fkClose})
		sc.wakeLocked()
		sc.mu.Unlock()
		select {
		case <-sc.writerDone:
		case <-time.After(time.Second):
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
	sc.raw.Close()
	<-sc.writerDone
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		sc.log.Debug("hbone: connection ended", "err", err)
	}
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// enqueueCtrlLocked queues a connection-level frame, ahead of stream frames.
func (sc *serverConn) enqueueCtrlLocked(f wframe) {
	if sc.wstop {
		return
	}
	sc.ctrl = append(sc.ctrl, f)
}

// enqueueReplyLocked queues a frame answering the peer (SETTINGS ACK, PING ACK); it fails
// when the peer makes us queue more than it reads.
func (sc *serverConn) enqueueReplyLocked(f wframe) error {
	if len(sc.ctrl) >= maxQueuedCtrl {
		return http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
	}
	sc.enqueueCtrlLocked(f)
	return nil
}

func (sc *serverConn) enqueueOrdLocked(f wframe) {
	if sc.wstop {
		if f.done != nil {
			f.done <- errConnClosed
		}
		return
	}
	sc.ord = append(sc.ord, f)
}

// Whoever queues frames then sends them: the read loop (and timers) wake the writer
// goroutine (kick, wakeLocked); tunnel goroutines write the batch themselves (flush).

// wakeLocked wakes the writer goroutine if frames wait and no one is writing them.
func (sc *serverConn) wakeLocked() {
	if !sc.writing && !sc.wstop && len(sc.ctrl)+len(sc.ord) > 0 {
		sc.wcond.Signal()
	}
}

func (sc *serverConn) kick() {
	sc.mu.Lock()
	sc.wakeLocked()
	sc.mu.Unlock()
}

// flush writes the queued frames from the calling goroutine, unless another writer is at it
// (it, or the writer goroutine after it, sends them). Frames queued meanwhile go to the
// writer goroutine: one batch per call keeps a tunnel from writing for everyone for long.
func (sc *serverConn) flush() {
	sc.mu.Lock()
	if !sc.writing && !sc.wstop && len(sc.ctrl)+len(sc.ord) > 0 {
		sc.writeBatchLocked()
		sc.wakeLocked()
	}
	sc.mu.Unlock()
}

func (sc *serverConn) writeLoop() {
	defer close(sc.writerDone)
	sc.mu.Lock()
	defer sc.mu.Unlock()
	for {
		for (sc.writing || len(sc.ctrl)+len(sc.ord) == 0) && !sc.wstop {
			sc.wcond.Wait()
		}
		if sc.wstop {
			rest := sc.ord
			sc.ctrl, sc.ord = nil, nil
			failFrames(rest, errConnClosed)
			return
		}
		sc.writeBatchLocked()
	}
}

// writeBatchLocked writes what is queued, with sc.mu released meanwhile. A write error, or
// a batch that ends the connection, stops all writing.
func (sc *serverConn) writeBatchLocked() {
	sc.writing = true
	ctrl, ord := sc.ctrl, sc.ord
	sc.ctrl, sc.ord = sc.spareCtrl[:0], sc.spareOrd[:0]
	sc.mu.Unlock()

	closeAfter, err := sc.writeBatch(ctrl, ord)
	clear(ctrl)
	clear(ord)

	sc.mu.Lock()
	sc.writing = false
	sc.spareCtrl, sc.spareOrd = ctrl[:0], ord[:0]
	if err == nil && !closeAfter {
		return
	}
	sc.wstop = true
	rest := sc.ord
	sc.ctrl, sc.ord = nil, nil
	sc.wcond.Broadcast()
	sc.mu.Unlock()
	if err == nil {
		err = errConnClosed
	}
	failFrames(rest, err)
	if closeAfter {
		sc.conn.Close() // close_notify, then the read loop ends on EOF
	} else {
		sc.raw.Close()
	}
	sc.mu.Lock()
}

func failFrames(fs []wframe, err error) {
	for _, f := range fs {
		if f.done != nil {
			f.done <- err
		}
	}
}

func (sc *serverConn) writeBatch(ctrl, ord []wframe) (closeAfter bool, err error) {
	sc.raw.SetWriteDeadline(time.Now().Add(writeTimeout))
	sc.cork.cork()
	for i := range ctrl {
		if err = sc.writeFrame(&ctrl[i]); err != nil {
			break
		}
	}
	for i := range ord {
		f := &ord[i]
		if err == nil && !closeAfter {
			if f.kind == fkClose {
				closeAfter = true
			} else {
				err = sc.writeFrame(f)
			}
		}
		if f.done != nil {
			// The frame is in the buffer (or on the wire): its data may be reused.
			if err == nil && closeAfter {
				f.done <- errConnClosed
			} else {
				f.done <- err
			}
		}
	}
	if err == nil {
		err = sc.bw.Flush()
	}
	if uerr := sc.cork.uncork(); err == nil {
		err = uerr
	}
	if err != nil {
		err = fmt.Errorf("hbone: writing to %v: %w", sc.raw.RemoteAddr(), err)
	}
	return closeAfter, err
}

func (sc *serverConn) writeFrame(f *wframe) error {
	switch f.kind {
	case fkSettings:
		return sc.fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: sc.maxStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
		)
	case fkSettingsAck:
		return sc.fr.WriteSettingsAck()
	case fkPing:
		return sc.fr.WritePing(f.end, f.ping)
	case fkWindowUpdate:
		return sc.fr.WriteWindowUpdate(f.id, f.n)
	case fkGoAway:
		return sc.fr.WriteGoAway(f.id, f.code, nil)
	case fkRST:
		return sc.fr.WriteRSTStream(f.id, f.code)
	case fkHeaders:
		sc.hbuf.Reset()
		// Never indexed: the dynamic table stays empty, so the peer's HEADER_TABLE_SIZE
		// never matters.
		sc.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(f.status), Sensitive: f.status != http.StatusOK})
		return sc.fr.WriteHeaders(http2.HeadersFrameParam{
			StreamID:      f.id,
			BlockFragment: sc.hbuf.Bytes(),
			EndStream:     f.end,
			EndHeaders:    true,
		})
	case fkData:
		// By hand: the Framer would copy the payload once more.
		h := &sc.dataHeader
		n := len(f.data)
		h[0], h[1], h[2] = byte(n>>16), byte(n>>8), byte(n)
		h[3] = byte(http2.FrameData)
		h[4] = 0
		if f.end {
			h[4] = byte(http2.FlagDataEndStream)
		}
		binary.BigEndian.PutUint32(h[5:], f.id)
		if _, err := sc.bw.Write(h[:]); err != nil {
			return err
		}
		_, err := sc.bw.Write(f.data)
		return err
	}
	return nil
}
