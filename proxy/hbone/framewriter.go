package hbone

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// frameWriter is the write side both ends share; serverConn and h2Client embed it. Its mu
// guards, besides the queues, all of the embedding connection's state.
type frameWriter struct {
	conn       *tls.Conn
	sock       net.Conn // under conn: closing it never blocks
	cork       *bufConn
	fr         *http2.Framer
	bw         *bufio.Writer
	dataHeader [9]byte // the writer's scratch: a local would escape through bw
	henc       *hpack.Encoder
	hbuf       bytes.Buffer
	settings   []http2.Setting // our SETTINGS (fkSettings)
	writerDone chan struct{}

	mu         sync.Mutex
	wcond      *sync.Cond // the writer goroutine waits here for frames
	ctrl, ord  []wframe
	spareCtrl  []wframe // the queues' other halves, reused batch after batch
	spareOrd   []wframe
	nCtrl      int  // frames other than DATA waiting to be written, the batch being written included (maxQueuedCtrl)
	nCtrlBatch int  // of those, in the batch being written
	writing    bool // a goroutine is writing a batch: it owns fr's writer, bw and the cork
	wstop      bool // writing must end; enqueue drops frames
	// lazy: no writer goroutine waits for work (writeLoop); one is started when frames wait
	// and no one writes them, and ends when they are written (spawned while it runs). The
	// client's choice: its read loop queues little besides WINDOW_UPDATEs, and an idle
	// pooled connection then costs one goroutine, its read loop, as x/net's did.
	lazy, spawned bool
}

// initWriter sets w up on tc (over cork, which it gives its read buffer).
func (w *frameWriter) initWriter(tc *tls.Conn, cork *bufConn, settings []http2.Setting) {
	w.conn, w.sock, w.cork = tc, cork.Conn, cork
	w.settings = settings
	w.writerDone = make(chan struct{})
	w.wcond = sync.NewCond(&w.mu)
	w.bw = bufio.NewWriterSize(tc, 32<<10)
	w.fr = http2.NewFramer(w.bw, tc)
	w.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	w.fr.MaxHeaderListSize = maxHeaderListSize
	w.fr.SetMaxReadFrameSize(maxFrameSize)
	w.fr.SetReuseFrames()
	w.henc = hpack.NewEncoder(&w.hbuf)
	cork.buffered()
}

// The write side of an HTTP/2 connection, the server's and the client's: the frame queues
// (connection control frames ahead of stream frames), the writer goroutine, batches written
// by whichever goroutine queued them, and the encoding of each frame.

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
	fkClose  // flush, then close the connection (after a GOAWAY)
	fkMarker // writes nothing: signals done once the frames queued before it are out
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
	err    error      // fkMarker: what done gets when the batch succeeds (dropStreamLocked)
}

// enqueueCtrlLocked queues a connection-level frame, ahead of stream frames.
func (w *frameWriter) enqueueCtrlLocked(f wframe) {
	if w.wstop {
		return
	}
	w.ctrl = append(w.ctrl, f)
	w.nCtrl++
}

// enqueueOrdLocked queues a stream frame, in order. Frames other than DATA count toward
// maxQueuedCtrl until written, those of both queues together: the read loop ends a
// connection whose peer makes it queue more (beforeRead).
func (w *frameWriter) enqueueOrdLocked(f wframe) {
	if w.wstop && !w.writing {
		if f.done != nil {
			f.done <- errConnClosed
		}
		return
	}
	// Stopped with a batch out: queue it anyway. A marker must not release a writer whose
	// earlier frames that batch still reads; the batch's writer fails what is queued once
	// the batch returns.
	w.ord = append(w.ord, f)
	if f.kind != fkData && f.kind != fkClose && f.kind != fkMarker {
		w.nCtrl++
	}
}

// dropQueuedLocked empties both queues (not the batch being written) and returns the stream
// frames dropped, whose done channels the caller signals.
func (w *frameWriter) dropQueuedLocked() []wframe {
	rest := w.ord
	w.ctrl, w.ord = nil, nil
	w.nCtrl = w.nCtrlBatch
	return rest
}

// dropStreamLocked takes stream id's queued HEADERS and DATA out of the queue (not out of
// the batch being written): the stream was reset or refused, and frames for it must not
// follow. A dropped frame with a done becomes a marker that signals err: in its place, so
// that done still comes after the frames of the same write in the batch being written (its
// data stays referenced until then). It reports whether a HEADERS was dropped (the stream
// then never opened on the wire, and must get no RST_STREAM either) and how many DATA bytes
// were dropped: they were charged to the connection's send window and will never be sent,
// so the caller gives them back (the peer will send no WINDOW_UPDATE for them).
func (w *frameWriter) dropStreamLocked(id uint32, err error) (droppedHeaders bool, droppedData int64) {
	keep := w.ord[:0]
	for _, f := range w.ord {
		if f.id != id || f.kind != fkHeaders && f.kind != fkData {
			keep = append(keep, f)
			continue
		}
		if f.kind == fkHeaders {
			droppedHeaders = true
			w.nCtrl--
		} else {
			droppedData += int64(len(f.data))
		}
		if f.done != nil {
			keep = append(keep, wframe{kind: fkMarker, done: f.done, err: err})
		}
	}
	clear(w.ord[len(keep):])
	w.ord = keep
	return droppedHeaders, droppedData
}

// Whoever queues frames then sends them: the read loop (and timers) wake the writer
// goroutine (kick, wakeLocked); tunnel goroutines write the batch themselves (flush).

// wakeLocked wakes the writer goroutine if frames wait and no one is writing them.
func (w *frameWriter) wakeLocked() {
	if !w.writing && !w.wstop && len(w.ctrl)+len(w.ord) > 0 {
		if !w.lazy {
			w.wcond.Signal()
		} else if !w.spawned {
			w.spawned = true
			go w.drainQueued()
		}
	}
}

// drainQueued is the lazy writer (see frameWriter.lazy): it writes what is queued, then
// ends.
func (w *frameWriter) drainQueued() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for !w.writing && !w.wstop && len(w.ctrl)+len(w.ord) > 0 {
		w.writeBatchLocked()
	}
	w.spawned = false
	w.wcond.Broadcast() // waitLazyLocked
}

// waitLazyLocked waits for the lazy writer to end, once writing has stopped.
func (w *frameWriter) waitLazyLocked() {
	for w.spawned {
		w.wcond.Wait()
	}
}

// beforeRead runs in the read loop before each frame is read: it wakes the writer for what
// the frames read so far queued, and ends the connection once more than maxQueuedCtrl frames
// wait for a peer that sends faster than it reads.
func (w *frameWriter) beforeRead() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.nCtrl > maxQueuedCtrl {
		return errTooManyQueued
	}
	w.wakeLocked()
	return nil
}

// flush writes the queued frames from the calling goroutine, unless another writer is at it
// (it, or the writer goroutine after it, sends them). Frames queued meanwhile go to the
// writer goroutine: one batch per call keeps a tunnel from writing for everyone for long.
func (w *frameWriter) flush() {
	w.mu.Lock()
	if !w.writing && !w.wstop && len(w.ctrl)+len(w.ord) > 0 {
		w.writeBatchLocked()
		w.wakeLocked()
	}
	w.mu.Unlock()
}

func (w *frameWriter) writeLoop() {
	defer close(w.writerDone)
	w.mu.Lock()
	defer w.mu.Unlock()
	for {
		for (w.writing || len(w.ctrl)+len(w.ord) == 0) && !w.wstop {
			w.wcond.Wait()
		}
		if w.wstop {
			// With a batch out, its writer fails them once it is written (their done must
			// not come before frames of the same buffer in it are out).
			if !w.writing {
				failFrames(w.dropQueuedLocked(), errConnClosed)
			}
			return
		}
		w.writeBatchLocked()
	}
}

// writeBatchLocked writes what is queued, with w.mu released meanwhile. A write error, or
// a batch that ends the connection, stops all writing.
func (w *frameWriter) writeBatchLocked() {
	w.writing = true
	ctrl, ord := w.ctrl, w.ord
	w.ctrl, w.ord = w.spareCtrl[:0], w.spareOrd[:0]
	w.nCtrlBatch = w.nCtrl // all that was queued: no other batch is being written
	w.mu.Unlock()

	closeAfter, err := w.writeBatch(ctrl, ord)
	clear(ctrl)
	clear(ord)

	w.mu.Lock()
	w.writing = false
	w.spareCtrl, w.spareOrd = ctrl[:0], ord[:0]
	w.nCtrl -= w.nCtrlBatch
	w.nCtrlBatch = 0
	if err == nil && !closeAfter {
		if w.wstop {
			// Writing was stopped (the client's teardown) while this batch was out: what
			// was queued meanwhile will never be written, and its writers wait for done.
			rest := w.dropQueuedLocked()
			w.mu.Unlock()
			failFrames(rest, errConnClosed)
			w.mu.Lock()
		}
		return
	}
	w.wstop = true
	rest := w.dropQueuedLocked()
	w.wcond.Broadcast()
	w.mu.Unlock()
	if err == nil {
		err = errConnClosed
	}
	failFrames(rest, err)
	if closeAfter {
		w.conn.Close() // close_notify, then the read loop ends on EOF
	} else {
		w.sock.Close()
	}
	w.mu.Lock()
}

func failFrames(fs []wframe, err error) {
	for _, f := range fs {
		if f.done != nil {
			f.done <- err
		}
	}
}

func (w *frameWriter) writeBatch(ctrl, ord []wframe) (closeAfter bool, err error) {
	w.sock.SetWriteDeadline(time.Now().Add(writeTimeout))
	w.cork.cork()
	for i := range ctrl {
		if err = w.writeFrame(&ctrl[i]); err != nil {
			break
		}
	}
	for i := range ord {
		f := &ord[i]
		if err == nil && !closeAfter {
			if f.kind == fkClose {
				closeAfter = true
			} else {
				err = w.writeFrame(f)
			}
		}
		if f.done != nil {
			// The frame is in the buffer (or on the wire): its data may be reused.
			switch {
			case err == nil && closeAfter:
				f.done <- errConnClosed
			case err == nil:
				f.done <- f.err
			default:
				f.done <- err
			}
		}
	}
	if err == nil {
		err = w.bw.Flush()
	}
	if uerr := w.cork.uncork(); err == nil {
		err = uerr
	}
	if err != nil {
		err = fmt.Errorf("hbone: writing to %v: %w", w.sock.RemoteAddr(), err)
	}
	return closeAfter, err
}

func (w *frameWriter) writeFrame(f *wframe) error {
	switch f.kind {
	case fkSettings:
		return w.fr.WriteSettings(w.settings...)
	case fkSettingsAck:
		return w.fr.WriteSettingsAck()
	case fkPing:
		return w.fr.WritePing(f.end, f.ping)
	case fkWindowUpdate:
		return w.fr.WriteWindowUpdate(f.id, f.n)
	case fkGoAway:
		return w.fr.WriteGoAway(f.id, f.code, nil)
	case fkRST:
		return w.fr.WriteRSTStream(f.id, f.code)
	case fkHeaders:
		if f.data != nil {
			return w.writeHeaderBlock(f)
		}
		w.hbuf.Reset()
		// Never indexed: the dynamic table stays empty, so the peer's HEADER_TABLE_SIZE
		// never matters.
		w.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(f.status), Sensitive: f.status != http.StatusOK})
		return w.fr.WriteHeaders(http2.HeadersFrameParam{
			StreamID:      f.id,
			BlockFragment: w.hbuf.Bytes(),
			EndStream:     f.end,
			EndHeaders:    true,
		})
	case fkData:
		// By hand: the Framer would copy the payload once more.
		h := &w.dataHeader
		n := len(f.data)
		h[0], h[1], h[2] = byte(n>>16), byte(n>>8), byte(n)
		h[3] = byte(http2.FrameData)
		h[4] = 0
		if f.end {
			h[4] = byte(http2.FlagDataEndStream)
		}
		binary.BigEndian.PutUint32(h[5:], f.id)
		if _, err := w.bw.Write(h[:]); err != nil {
			return err
		}
		_, err := w.bw.Write(f.data)
		return err
	}
	return nil
}

// writeHeaderBlock writes a request's header block, encoded when it was queued, split into
// HEADERS and CONTINUATION frames of at most f.n bytes (the peer's SETTINGS_MAX_FRAME_SIZE).
func (w *frameWriter) writeHeaderBlock(f *wframe) error {
	block := f.data
	first := true
	for first || len(block) > 0 {
		k := min(len(block), int(f.n))
		frag := block[:k]
		block = block[k:]
		var err error
		if first {
			err = w.fr.WriteHeaders(http2.HeadersFrameParam{
				StreamID:      f.id,
				BlockFragment: frag,
				EndStream:     f.end,
				EndHeaders:    len(block) == 0,
			})
			first = false
		} else {
			err = w.fr.WriteContinuation(f.id, len(block) == 0, frag)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
