package hbone

import (
	"errors"
	"io"
	"net/http"
	"sync/atomic"

	"golang.org/x/net/http2"
)

// Streams of the client: response HEADERS, DATA (small frames straight to the tunnel's
// destination, the rest queued for the tunnel's goroutine), flow control both ways, and
// ending and resetting streams. The same design as the server's (serverflow.go,
// serverstream.go, tunnel.go), on the other end of the stream.

// cstream is one CONNECT on a client connection. Fields after cc and id are guarded by cc.mu.
type cstream struct {
	cc *h2Client
	id uint32

	inMap      bool // open on the wire: in cc.streams
	ready      bool // readyc closed
	status     int  // the response's :status, once received
	remoteDone bool // END_STREAM received
	localDone  bool // END_STREAM queued
	err        error
	sendErr    error    // the request side alone ended, the response complete (stopSendLocked)
	rq         [][]byte // received, not yet given to the tunnel's reader
	rqBytes    int
	held       int // bytes recv gave the reader that it has not passed to consumed yet
	recvAvail  int32
	recvUnsent int32
	sendWindow int64
	delivering bool                      // someone is writing received data to the destination
	waitDeliv  bool                      // the reader waits for the read loop's write to end
	tryWrite   func([]byte) (int, error) // the destination's non-blocking write, while WriteTo runs
	onAbort    func()                    // unblocks a ReadFrom waiting on its source
	delivered  atomic.Int64              // bytes the read loop wrote to the destination itself

	readyc    chan struct{} // closed when the response headers came, or the stream failed
	recvReady chan struct{} // cap 1: rq, remoteDone, err or delivering changed
	sendReady chan struct{} // cap 1: a window grew or err was set
	wdone     chan error    // cap 2: the last frame of a queueData call was written or dropped
	endDone   chan error    // cap 1: END_STREAM was written or dropped
}

func (cc *h2Client) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	cc.mu.Lock()
	defer cc.mu.Unlock()
	st := cc.streams[id]
	if st == nil {
		if id%2 == 0 || id >= cc.nextID {
			return http2.ConnectionError(http2.ErrCodeProtocol) // push, or an idle stream
		}
		return nil // a stream we reset: frames in flight are ignored
	}
	if st.status != 0 {
		// Trailers: they end the response; a tunnel has no use for their fields.
		if !f.StreamEnded() || st.remoteDone {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
		}
		cc.endRemoteLocked(st)
		return nil
	}
	if f.Truncated {
		// Fields beyond our header list limit were dropped: do not act on what is left
		// (x/net's client resets such a stream the same way).
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	status := parseStatus(f)
	switch {
	case status == 0 || status == http.StatusSwitchingProtocols:
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	case status < 200:
		if f.StreamEnded() {
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
		}
		return nil // informational: the final response follows
	}
	st.status = status
	st.markReadyLocked()
	if f.StreamEnded() {
		cc.endRemoteLocked(st)
	}
	return nil
}

func (st *cstream) markReadyLocked() {
	if !st.ready {
		st.ready = true
		close(st.readyc)
	}
}

func (cc *h2Client) onData(f *http2.DataFrame) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	n := int32(f.Length) // padding counts toward flow control
	if n > cc.recvAvail {
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	cc.recvAvail -= n
	st := cc.streams[f.StreamID]
	if st == nil || st.remoteDone || st.status == 0 {
		cc.returnConnLocked(n)
		switch {
		case f.StreamID%2 == 0 || f.StreamID >= cc.nextID:
			return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream
		case st != nil && st.status == 0:
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol} // DATA before HEADERS
		case st != nil:
			return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeStreamClosed}
		}
		return nil // a stream we closed or reset
	}
	if n > st.recvAvail {
		cc.returnConnLocked(n)
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	st.recvAvail -= n
	data := f.Data()
	if pad := n - int32(len(data)); pad > 0 {
		cc.returnConnLocked(pad)
		cc.returnStreamLocked(st, pad)
	}
	if len(data) > 0 && len(data) < bulkSize && st.err == nil && len(st.rq) == 0 && !st.delivering && st.tryWrite != nil {
		// Small, nothing queued and the tunnel's goroutine not writing: the destination
		// takes what it can now, without waking that goroutine (the point of this client).
		// Its errors are left to that goroutine, which meets them on its own write.
		st.delivering = true
		tw := st.tryWrite
		cc.mu.Unlock()
		k, _ := tw(data)
		cc.mu.Lock()
		st.delivering = false
		if st.waitDeliv {
			notify(st.recvReady)
		}
		if k > 0 {
			data = data[k:]
			st.delivered.Add(int64(k))
			cc.returnConnLocked(int32(k))
			cc.returnStreamLocked(st, int32(k))
		}
		if st.err != nil {
			cc.returnConnLocked(int32(len(data)))
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
		cc.endRemoteLocked(st)
	}
	return nil
}

// returnSendWindowLocked gives back to the connection's send window n bytes of DATA that
// were charged to it but dropped unsent, and wakes the streams waiting for window.
func (cc *h2Client) returnSendWindowLocked(n int64) {
	if n == 0 {
		return
	}
	cc.sendWindow += n
	for _, st := range cc.streams {
		notify(st.sendReady)
	}
}

func (cc *h2Client) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if f.StreamID == 0 {
		cc.sendWindow += int64(f.Increment)
		if cc.sendWindow > maxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		for _, st := range cc.streams {
			notify(st.sendReady)
		}
		return nil
	}
	st := cc.streams[f.StreamID]
	if st == nil {
		if f.StreamID >= cc.nextID {
			return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream
		}
		return nil
	}
	st.sendWindow += int64(f.Increment)
	if st.sendWindow > maxWindow {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	notify(st.sendReady)
	return nil
}

func (cc *h2Client) onRSTStream(f *http2.RSTStreamFrame) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	st := cc.streams[f.StreamID]
	if st == nil {
		if f.StreamID >= cc.nextID {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	cause := http2.StreamError{StreamID: f.StreamID, Code: f.ErrCode, Cause: errors.New("reset by peer")}
	if st.remoteDone {
		// After a complete response (RFC 9113 §8.1): the server wants no more of the
		// request, and the response "MUST NOT" be discarded. x/net's server does this when
		// its handler returns before the request ended. NO_ERROR ends the request in order;
		// another code makes it a reset, the response still intact.
		var err error = errRequestStopped
		if f.ErrCode != http2.ErrCodeNo {
			err = resetError(cause)
		}
		cc.stopSendLocked(st, err)
		return nil
	}
	cc.abortLocked(st, resetError(cause), false, 0)
	return nil
}

// errRequestStopped: the server ended the request side with RST_STREAM(NO_ERROR) after a
// complete response. Not a reset: what it did not read it did not want.
var errRequestStopped = errors.New("hbone: server stopped reading the request after a complete response")

// stopSendLocked ends the request side of a stream whose response is complete (remoteDone):
// the stream leaves the wire and its queued frames go, Write and ReadFrom's source fail
// with err, and what was received stays readable, then io.EOF.
func (cc *h2Client) stopSendLocked(st *cstream, err error) {
	if st.err != nil || st.sendErr != nil {
		return
	}
	st.sendErr = err
	_, unsent := cc.dropStreamLocked(st.id, err)
	cc.returnSendWindowLocked(unsent)
	cc.closeStreamLocked(st)
	if !st.localDone && st.onAbort != nil {
		st.onAbort() // a ReadFrom blocked on its source
	}
	notify(st.sendReady)
}

// sendErrLocked is why nothing more can be sent on st, if anything.
func (st *cstream) sendErrLocked() error {
	if st.err != nil {
		return st.err
	}
	return st.sendErr
}

// The windows are returned in large steps, as the server does (returnConnLocked there).
func (cc *h2Client) returnConnLocked(n int32) {
	cc.recvUnsent += n
	if cc.recvUnsent < connWindow/4 && cc.recvUnsent < cc.recvAvail {
		return
	}
	cc.enqueueCtrlLocked(wframe{kind: fkWindowUpdate, n: uint32(cc.recvUnsent)})
	cc.recvAvail += cc.recvUnsent
	cc.recvUnsent = 0
}

func (cc *h2Client) returnStreamLocked(st *cstream, n int32) {
	if st.remoteDone || st.err != nil {
		return
	}
	st.recvUnsent += n
	if st.recvUnsent < streamWindow/4 && st.recvUnsent < st.recvAvail {
		return
	}
	cc.enqueueCtrlLocked(wframe{kind: fkWindowUpdate, id: st.id, n: uint32(st.recvUnsent)})
	st.recvAvail += st.recvUnsent
	st.recvUnsent = 0
}

func (cc *h2Client) endRemoteLocked(st *cstream) {
	st.remoteDone = true
	notify(st.recvReady)
	if st.localDone {
		cc.closeStreamLocked(st)
	}
}

func (cc *h2Client) closeStreamLocked(st *cstream) {
	if !st.inMap {
		return
	}
	st.inMap = false
	delete(cc.streams, st.id)
}

// abortLocked ends a stream abnormally: its HEADERS and DATA still queued are dropped;
// optionally RST_STREAM to the server; data received but not consumed (queued, or taken by
// the reader and not returned yet) is dropped and its connection window returned; everyone
// waiting wakes up.
func (cc *h2Client) abortLocked(st *cstream, cause error, sendRST bool, code http2.ErrCode) {
	if st.err != nil {
		return
	}
	st.err = cause
	if st.inMap {
		// A stream whose HEADERS never went out is idle to the server: no RST_STREAM,
		// which would be a connection error there.
		droppedHeaders, unsent := cc.dropStreamLocked(st.id, cause)
		cc.returnSendWindowLocked(unsent)
		if droppedHeaders {
			sendRST = false
		}
		if sendRST {
			cc.enqueueOrdLocked(wframe{kind: fkRST, id: st.id, code: code})
		}
	}
	cc.closeStreamLocked(st)
	// The reader's share (held) too: it may never Read again (Close), and consumed credits
	// no more than held.
	if n := st.rqBytes + st.held; n > 0 {
		cc.returnConnLocked(int32(n))
	}
	for _, c := range st.rq {
		putChunk(c)
	}
	st.rq, st.rqBytes, st.held = nil, 0, 0
	st.markReadyLocked()
	if st.onAbort != nil {
		st.onAbort()
	}
	notify(st.recvReady)
	notify(st.sendReady)
}

func (cc *h2Client) resetIDLocked(id uint32, code http2.ErrCode) {
	if st := cc.streams[id]; st != nil {
		cause := http2.StreamError{StreamID: id, Code: code, Cause: errors.New("protocol error from server")}
		cc.abortLocked(st, resetError(cause), true, code)
		return
	}
	cc.enqueueOrdLocked(wframe{kind: fkRST, id: id, code: code})
}

// recv waits for received data (appended to dst; the caller owns the chunks and must call
// consumed), the end of the response (io.EOF) or a reset.
func (st *cstream) recv(dst [][]byte) ([][]byte, error) {
	cc := st.cc
	cc.mu.Lock()
	for len(st.rq) == 0 && st.err == nil && !st.remoteDone {
		cc.mu.Unlock()
		<-st.recvReady
		cc.mu.Lock()
	}
	defer cc.mu.Unlock()
	switch {
	case len(st.rq) > 0:
		// Data that came before a reset is still dropped by abortLocked; this is data
		// that came before the end, or before the reset was seen.
		dst = append(dst, st.rq...)
		clear(st.rq)
		st.held += st.rqBytes
		st.rq, st.rqBytes = st.rq[:0], 0
		st.delivering = true // until consumed: the read loop must not write in between
		return dst, nil
	case st.err != nil:
		return dst, st.err
	}
	return dst, io.EOF
}

// consumed returns n delivered bytes to the flow-control windows: bytes recv gave, never
// more than it gave (abortLocked returns what a reader still held).
func (st *cstream) consumed(n int) {
	cc := st.cc
	cc.mu.Lock()
	st.delivering = false
	n = min(n, st.held)
	st.held -= n
	cc.returnConnLocked(int32(n))
	cc.returnStreamLocked(st, int32(n))
	cc.mu.Unlock()
	cc.flush()
}

// setTryWrite lets the read loop write to the destination (tw non-nil), or stops it and
// waits for a write it is making.
func (st *cstream) setTryWrite(tw func([]byte) (int, error)) {
	cc := st.cc
	cc.mu.Lock()
	defer cc.mu.Unlock()
	st.tryWrite = tw
	if tw != nil {
		return
	}
	for st.delivering {
		st.waitDeliv = true
		cc.mu.Unlock()
		<-st.recvReady
		cc.mu.Lock()
	}
	st.waitDeliv = false
}

// queueData queues p as DATA frames within the server's windows, waiting for window as
// needed, and writes them itself when p is small (as the server's stream.queueData). It
// reports whether it queued anything; if so, exactly one value arrives on st.wdone once
// every frame of p was written or dropped, and until then p stays referenced.
func (st *cstream) queueData(p []byte) (queued bool, err error) {
	direct := len(p) < bulkSize
	cc := st.cc
	for len(p) > 0 {
		cc.mu.Lock()
		for {
			if serr := st.sendErrLocked(); serr != nil || st.localDone {
				err = serr
				if err == nil {
					err = errStreamEnded
				}
				if queued {
					// Frames of p are queued without a signal: one that follows them.
					cc.enqueueOrdLocked(wframe{kind: fkMarker, done: st.wdone})
					cc.wakeLocked()
				}
				cc.mu.Unlock()
				return queued, err
			}
			if st.sendWindow > 0 && cc.sendWindow > 0 {
				break
			}
			cc.mu.Unlock()
			<-st.sendReady
			cc.mu.Lock()
		}
		n := min(int64(len(p)), st.sendWindow, cc.sendWindow, int64(cc.peerFrame))
		st.sendWindow -= n
		cc.sendWindow -= n
		f := wframe{kind: fkData, id: st.id, data: p[:n]}
		p = p[n:]
		if len(p) == 0 {
			f.done = st.wdone
		}
		cc.enqueueOrdLocked(f)
		queued = true
		if direct {
			cc.mu.Unlock()
			cc.flush()
		} else {
			cc.wakeLocked()
			cc.mu.Unlock()
		}
	}
	return queued, nil
}

// sendEnd ends the request (END_STREAM); false if the stream already ended or failed.
func (st *cstream) sendEnd() bool {
	cc := st.cc
	defer cc.flush()
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if st.sendErrLocked() != nil || st.localDone {
		return false
	}
	st.localDone = true
	cc.enqueueOrdLocked(wframe{kind: fkData, id: st.id, end: true, done: st.endDone})
	if st.remoteDone {
		cc.closeStreamLocked(st)
	}
	return true
}

// reset ends the stream with RST_STREAM(code), if it is still open on the wire.
func (st *cstream) reset(code http2.ErrCode, cause error) {
	cc := st.cc
	cc.mu.Lock()
	cc.abortLocked(st, resetError(cause), true, code)
	cc.mu.Unlock()
	cc.flush()
}
