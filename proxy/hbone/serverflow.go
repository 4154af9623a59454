package hbone

import "golang.org/x/net/http2"

// DATA and flow control on the server: received DATA is checked against the windows and
// delivered (small frames straight to the upstream socket, the rest queued for the tunnel);
// the peer's WINDOW_UPDATEs open our send windows; consumed bytes are returned to the peer
// in WINDOW_UPDATEs of our own.

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
