package hbone

import (
	"context"
	"errors"
	"io"
	"math/bits"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/nftmesh/nftmesh/internal/rawio"
)

// stream is one CONNECT on a server connection. Fields after sc and id are guarded by sc.mu.
type stream struct {
	sc *serverConn
	id uint32

	inMap      bool     // open on the wire: in sc.streams, counted in sc.open
	remoteDone bool     // END_STREAM received
	localDone  bool     // END_STREAM queued
	err        error    // reset or connection gone: both directions stop
	rq         [][]byte // received, not yet given to the upstream
	rqBytes    int
	recvAvail  int32 // stream window the peer may still fill
	recvUnsent int32
	sendWindow int64 // stream window the peer granted us
	cancel     context.CancelFunc
	dialing    bool                      // a CONNECT not yet answered
	started    bool                      // its Dialer was started: a reset now is no early reset (onRSTStream)
	queued     bool                      // in sc.queued, waiting for a dial slot
	delivering bool                      // someone is writing received data to the upstream
	tryWrite   func([]byte) (int, error) // the upstream's non-blocking write, once accepted
	onAbort    func()                    // resets the upstream, once accepted: see abortLocked
	delivered  atomic.Int64              // bytes the read loop wrote to the upstream itself

	recvReady chan struct{} // cap 1: rq, remoteDone or err changed
	sendReady chan struct{} // cap 1: a window grew or err was set
	wdone     chan error    // cap 2: the last DATA frame of a queueData call was written
}

// recv waits for received data (appended to dst, the caller now owns the chunks), the end of
// the request body (io.EOF) or a reset.
func (st *stream) recv(dst [][]byte) ([][]byte, error) {
	sc := st.sc
	sc.mu.Lock()
	for len(st.rq) == 0 && st.err == nil && !st.remoteDone {
		sc.mu.Unlock()
		<-st.recvReady
		sc.mu.Lock()
	}
	defer sc.mu.Unlock()
	switch {
	case st.err != nil:
		return dst, st.err
	case len(st.rq) > 0:
		dst = append(dst, st.rq...)
		clear(st.rq)
		st.rq, st.rqBytes = st.rq[:0], 0
		st.delivering = true // until consumed: the read loop must not write in between
		return dst, nil
	}
	return dst, io.EOF
}

// consumed returns n delivered bytes to the flow-control windows.
func (st *stream) consumed(n int) {
	sc := st.sc
	sc.mu.Lock()
	st.delivering = false
	sc.returnConnLocked(int32(n))
	sc.returnStreamLocked(st, int32(n))
	sc.mu.Unlock()
	sc.flush()
}

// bulkSize splits the two ways of moving data. Below it a tunnel's goroutine writes its
// frames itself and the read loop writes to the upstream itself: no hand-off, the least
// latency. From it up, the writer goroutine and the tunnel's goroutine take the work, so
// that reading, encryption and writing overlap on different cores.
const bulkSize = 64 << 10

// queueData queues p as DATA frames within the peer's windows, waiting for window as
// needed, and writes them itself when p is small. The last frame signals st.wdone once
// written; until then p stays referenced. On error, frames already queued may still
// reference p: the caller must not reuse it.
func (st *stream) queueData(p []byte) error {
	direct := len(p) < bulkSize
	sc := st.sc
	for len(p) > 0 {
		sc.mu.Lock()
		for {
			if st.err != nil {
				err := st.err
				sc.mu.Unlock()
				return err
			}
			if st.localDone {
				sc.mu.Unlock()
				return errStreamEnded
			}
			if st.sendWindow > 0 && sc.sendWindow > 0 {
				break
			}
			sc.mu.Unlock()
			<-st.sendReady
			sc.mu.Lock()
		}
		n := min(int64(len(p)), st.sendWindow, sc.sendWindow, int64(sc.peerFrame))
		st.sendWindow -= n
		sc.sendWindow -= n
		f := wframe{kind: fkData, id: st.id, data: p[:n]}
		p = p[n:]
		if len(p) == 0 {
			f.done = st.wdone
		}
		sc.enqueueOrdLocked(f)
		if direct {
			sc.mu.Unlock()
			sc.flush()
		} else {
			sc.wakeLocked()
			sc.mu.Unlock()
		}
	}
	return nil
}

// sendEnd ends the response (END_STREAM): the upstream sent FIN.
func (st *stream) sendEnd() {
	sc := st.sc
	defer sc.flush()
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if st.err != nil || st.localDone {
		return
	}
	st.localDone = true
	sc.enqueueOrdLocked(wframe{kind: fkData, id: st.id, end: true})
	if st.remoteDone {
		sc.closeStreamLocked(st)
	}
}

// reset ends the stream with RST_STREAM(code), if it is still open on the wire.
func (st *stream) reset(code http2.ErrCode, cause error) {
	sc := st.sc
	sc.mu.Lock()
	sc.abortLocked(st, resetError(cause), true, code)
	sc.mu.Unlock()
	sc.flush()
}

// respond refuses the CONNECT with status.
func (st *stream) respond(status int) {
	st.sc.mu.Lock()
	st.sc.respondLocked(st, status)
	st.sc.mu.Unlock()
	st.sc.flush()
}

// accept sends the 200; false when the stream was reset while the Dialer ran.
// From then on the read loop may write received data to up itself, when up can do it
// without blocking (a TryWriter, or a socket).
func (st *stream) accept(up net.Conn, onAbort func()) bool {
	sc := st.sc
	tw := tryWriterOf(up)
	sc.mu.Lock()
	if st.err != nil {
		sc.mu.Unlock()
		return false
	}
	st.tryWrite, st.onAbort = tw, onAbort
	st.dialing = false
	sc.enqueueOrdLocked(wframe{kind: fkHeaders, id: st.id, status: http.StatusOK})
	sc.mu.Unlock()
	sc.flush()
	return true
}

// TryWriter is an upstream connection that can write without blocking: TryWrite writes what
// the socket takes at once and returns. A Dialer's wrapper around a socket may provide it
// (rawio.Conn.TryWrite does the work); without it, only a bare *net.TCPConn gets writes from the
// read loop, since a wrapper's own Write (counting, say) must not be bypassed.
type TryWriter interface {
	TryWrite(p []byte) (int, error)
}

func tryWriterOf(c net.Conn) func([]byte) (int, error) {
	switch u := c.(type) {
	case TryWriter:
		return u.TryWrite
	case *net.TCPConn:
		rc, err := rawio.NewConn(u)
		if err != nil {
			return nil
		}
		return rc.TryWrite
	}
	return nil
}

type closeWriter interface{ CloseWrite() error }
type linger interface{ SetLinger(sec int) error }

// tunnel copies between a stream and its upstream connection.
type tunnel struct {
	st        *stream
	up        net.Conn
	aborted   atomic.Bool
	abortOnce sync.Once
	toUp      atomic.Int64
	fromUp    atomic.Int64
}

// abort closes the upstream with RST (SO_LINGER 0): the peer reset, or the tunnel broke.
func (t *tunnel) abort() {
	t.abortOnce.Do(func() {
		t.aborted.Store(true)
		if l, ok := t.up.(linger); ok {
			l.SetLinger(0)
		}
		t.up.Close()
	})
}

func (sc *serverConn) runTunnel(ctx context.Context, st *stream, req Request) {
	start := time.Now()
	log := sc.log.With("stream", st.id, "authority", req.Authority.String())
	defer func() {
		st.cancel()
		sc.mu.Lock()
		sc.handlers--
		sc.maybeFinishLocked()
		sc.mu.Unlock()
		sc.flush()
		sc.srv.handlers.Add(-1)
	}()

	if ctx.Err() != nil {
		sc.dialDone()
		log.Debug("hbone: stream reset before dialing")
		return // nothing to answer: the stream is reset
	}
	up, status, err := sc.srv.Dial(ctx, req)
	sc.dialDone()
	if up == nil || err != nil {
		if up != nil {
			up.Close()
		}
		if status < 400 || status > 599 {
			status = http.StatusServiceUnavailable
		}
		log.Debug("hbone: CONNECT refused", "status", status, "err", err)
		st.respond(status)
		return
	}
	t := &tunnel{st: st, up: up}
	if !st.accept(up, t.abort) {
		t.abort()
		log.Debug("hbone: stream reset while dialing")
		return
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		t.upstreamToClient()
	}()
	t.clientToUpstream()
	<-done
	if !t.aborted.Load() {
		up.Close()
	}
	sc.mu.Lock()
	err = st.err
	sc.mu.Unlock()
	log.Debug("hbone: tunnel closed", "to_upstream", t.toUp.Load()+st.delivered.Load(), "from_upstream", t.fromUp.Load(),
		"duration", time.Since(start), "err", err)
}

// clientToUpstream delivers the request body; its end is a FIN (CloseWrite) upstream.
func (t *tunnel) clientToUpstream() {
	var chunks [][]byte
	var bufs net.Buffers
	for {
		var err error
		chunks, err = t.st.recv(chunks[:0])
		if errors.Is(err, io.EOF) {
			if cw, ok := t.up.(closeWriter); ok {
				if err := cw.CloseWrite(); err != nil && !t.aborted.Load() {
					t.st.reset(http2.ErrCodeConnect, err)
					t.abort()
				}
			}
			return
		}
		if err != nil {
			t.abort() // the client reset the stream, or the connection died
			return
		}
		n := 0
		bufs = append(bufs[:0], chunks...)
		for _, c := range chunks {
			n += len(c)
		}
		_, werr := bufs.WriteTo(t.up) // writev
		for i, c := range chunks {
			putChunk(c)
			chunks[i] = nil
		}
		t.toUp.Add(int64(n))
		t.st.consumed(n)
		if werr != nil {
			if !t.aborted.Load() {
				t.st.reset(http2.ErrCodeConnect, werr)
				t.abort()
			}
			return
		}
	}
}

// upstreamToClient sends what the upstream writes; its FIN ends the response (END_STREAM)
// and its RST resets the stream with CONNECT_ERROR (RFC 9113 §8.5).
//
// Two buffers alternate, so the next upstream read overlaps the write of the previous one.
// They grow while reads fill them: idle tunnels stay small, bulk ones get large frames.
func (t *tunnel) upstreamToClient() {
	size := 16 << 10
	var bufs [2][]byte
	inflight, cur := 0, 0
	clean := false
	defer func() {
		if !clean {
			return // queued frames may still reference the buffers: leave them to the GC
		}
		for _, b := range bufs {
			if b != nil {
				putChunk(b)
			}
		}
	}()
	// settle waits for the oldest queued buffer to be written.
	settle := func() error {
		inflight--
		return <-t.st.wdone
	}
	for {
		if inflight == 2 {
			if err := settle(); err != nil {
				t.abort()
				return
			}
		}
		// bufs[cur] is free now: the one in flight, if any, is the other.
		if cap(bufs[cur]) < size {
			if bufs[cur] != nil {
				putChunk(bufs[cur])
			}
			bufs[cur] = getChunk(size)
		}
		buf := bufs[cur][:size]
		n, err := t.up.Read(buf)
		if n > 0 {
			t.fromUp.Add(int64(n))
			if serr := t.st.queueData(buf[:n]); serr != nil {
				t.abort()
				return
			}
			inflight++
			cur ^= 1
			if n == len(buf) && size < 512<<10 {
				size *= 2
			}
		}
		if err != nil {
			for inflight > 0 {
				if serr := settle(); serr != nil && errors.Is(err, io.EOF) {
					err = serr
				}
			}
			clean = true // every queued frame has been written or dropped
			switch {
			case errors.Is(err, io.EOF):
				t.st.sendEnd()
			case !t.aborted.Load():
				t.st.reset(http2.ErrCodeConnect, err) // a no-op when the stream already failed
				t.abort()
			}
			return
		}
	}
}

// Chunk pools by power-of-two size, 1 KiB to 1 MiB (the largest frame we accept).
var chunkPools [11]sync.Pool

func chunkClass(n int) int {
	if n <= 1<<10 {
		return 0
	}
	return bits.Len(uint(n-1)) - 10
}

func getChunk(n int) []byte {
	c := chunkClass(n)
	if c >= len(chunkPools) {
		return make([]byte, n)
	}
	if p, ok := chunkPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(10+c))
}

func putChunk(b []byte) {
	c := cap(b)
	if c < 1<<10 || c&(c-1) != 0 {
		return
	}
	i := bits.Len(uint(c)) - 11
	if i >= len(chunkPools) {
		return
	}
	b = b[:0]
	chunkPools[i].Put(&b)
}
