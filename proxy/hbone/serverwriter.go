package hbone

import (
	"encoding/binary"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The server's write side: the frame queues (connection control frames ahead of stream
// frames), the writer goroutine, batches written by whichever goroutine queued them, and the
// encoding of each frame.

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

// enqueueCtrlLocked queues a connection-level frame, ahead of stream frames.
func (sc *serverConn) enqueueCtrlLocked(f wframe) {
	if sc.wstop {
		return
	}
	sc.ctrl = append(sc.ctrl, f)
	sc.nCtrl++
}

// enqueueOrdLocked queues a stream frame, in order. Frames other than DATA count toward
// maxQueuedCtrl until written, those of both queues together: the read loop ends a
// connection whose peer makes it queue more (beforeRead).
func (sc *serverConn) enqueueOrdLocked(f wframe) {
	if sc.wstop {
		if f.done != nil {
			f.done <- errConnClosed
		}
		return
	}
	sc.ord = append(sc.ord, f)
	if f.kind != fkData && f.kind != fkClose {
		sc.nCtrl++
	}
}

// dropQueuedLocked empties both queues (not the batch being written) and returns the stream
// frames dropped, whose done channels the caller signals.
func (sc *serverConn) dropQueuedLocked() []wframe {
	rest := sc.ord
	sc.ctrl, sc.ord = nil, nil
	sc.nCtrl = sc.nCtrlBatch
	return rest
}

// Whoever queues frames then sends them: the read loop (and timers) wake the writer
// goroutine (kick, wakeLocked); tunnel goroutines write the batch themselves (flush).

// wakeLocked wakes the writer goroutine if frames wait and no one is writing them.
func (sc *serverConn) wakeLocked() {
	if !sc.writing && !sc.wstop && len(sc.ctrl)+len(sc.ord) > 0 {
		sc.wcond.Signal()
	}
}

// beforeRead runs in the read loop before each frame is read: it wakes the writer for what
// the frames read so far queued, and ends the connection once more than maxQueuedCtrl frames
// wait for a peer that sends faster than it reads.
func (sc *serverConn) beforeRead() error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.nCtrl > maxQueuedCtrl {
		return errTooManyQueued
	}
	sc.wakeLocked()
	return nil
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
			failFrames(sc.dropQueuedLocked(), errConnClosed)
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
	sc.nCtrlBatch = sc.nCtrl // all that was queued: no other batch is being written
	sc.mu.Unlock()

	closeAfter, err := sc.writeBatch(ctrl, ord)
	clear(ctrl)
	clear(ord)

	sc.mu.Lock()
	sc.writing = false
	sc.spareCtrl, sc.spareOrd = ctrl[:0], ord[:0]
	sc.nCtrl -= sc.nCtrlBatch
	sc.nCtrlBatch = 0
	if err == nil && !closeAfter {
		return
	}
	sc.wstop = true
	rest := sc.dropQueuedLocked()
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
