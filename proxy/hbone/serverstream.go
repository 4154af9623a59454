package hbone

import (
	"context"
	"errors"
	"net/http"
	"net/netip"

	"golang.org/x/net/http2"
)

// Stream lifecycle on the server: a CONNECT's HEADERS open a stream (or are refused), the
// peer's END_STREAM half-closes it, and closing, aborting and resetting end it.

// maxHandlersPerStream x MAX_CONCURRENT_STREAMS bounds the tunnels of a connection (waiting
// to dial, dialing or running), as x/net's server bounds its queue of handlers not yet
// started; beyond it a CONNECT is refused (REFUSED_STREAM), not the connection ended.
const maxHandlersPerStream = 4

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
	if sc.goingAway || sc.closed || uint32(sc.open) >= sc.maxStreams || sc.handlers >= maxHandlersPerStream*int(sc.maxStreams) {
		// Over the limit, or reset-and-reopen faster than tunnels end (a Dialer or upstream
		// slow to notice): refused, not processed, so the client may retry, here or on
		// another connection; the connection and its tunnels stay.
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
	st.dialing = true
	sc.handlers++
	sc.srv.handlers.Add(1)
	// Started by startPending, once the frames that came with these HEADERS (a reset,
	// say) have been read.
	if len(sc.pending) == 0 {
		sc.pendingFrames = 0
	}
	sc.pending = append(sc.pending, pendingTunnel{ctx: ctx, st: st, req: req})
	return nil
}

// parseRequest checks CONNECT semantics (RFC 9113 §8.5, docs/hbone.md#connect): it returns a status
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
	st.dialing = false
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
	early := st.dialing && !st.started && st.err == nil
	sc.abortLocked(st, resetError(cause), false, 0)
	if early && !sc.goingAway && !sc.allowEarlyResetLocked() {
		// CVE-2023-44487: CONNECTs opened and reset faster than their dials could start.
		// Tunnels already open are no part of it: they drain.
		sc.log.Info("hbone: too many streams reset before their dial started; going away", "code", http2.ErrCodeEnhanceYourCalm)
		sc.goAwayLocked(http2.ErrCodeEnhanceYourCalm)
	}
	return nil
}

// abortLocked ends a stream abnormally: optionally RST_STREAM to the peer; data received but
// not delivered is dropped and its connection window returned; both directions wake up.
func (sc *serverConn) abortLocked(st *stream, cause error, sendRST bool, code http2.ErrCode) {
	if st.err != nil {
		return
	}
	st.err = cause
	if st.queued {
		sc.unqueueLocked(st)
	}
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
		// A reset is a TCP RST upstream (docs/hbone.md#connect) even when no copy is there to see it: after
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

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
