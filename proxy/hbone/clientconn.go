package hbone

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// gracefulCloseWait bounds how long Close waits for the END_STREAM to be written after both
// directions ended, before it resets the stream instead.
var gracefulCloseWait = 5 * time.Second

// Request-side modes: the first of Write and ReadFrom decides.
const (
	srcNone int32 = iota
	srcWrite
	srcDirect
)

// clientConn is the client end of one tunnel: Read and WriteTo take the response's DATA,
// Write and ReadFrom send the request's.
type clientConn struct {
	pool   *Pool
	pc     *poolConn
	st     *cstream
	local  net.Addr
	remote net.Addr

	rbuf [][]byte // received chunks Read has not returned yet (the reader's)
	roff int      // bytes of rbuf[0] already returned

	wmu  sync.Mutex // one Write at a time: each waits for its frames
	mode atomic.Int32

	// ReadFrom's source while it runs, so that a reset can interrupt a read blocked on it.
	srcMu sync.Mutex
	src   io.Reader

	readEOF     atomic.Bool
	writeClosed atomic.Bool
	srcEnded    atomic.Bool // END_STREAM queued: CloseWrite, or ReadFrom's source ended
	closed      atomic.Bool
	closeOnce   sync.Once
}

func newClientConn(p *Pool, pc *poolConn, st *cstream, remote net.Addr) *clientConn {
	c := &clientConn{pool: p, pc: pc, st: st, local: pc.tc.LocalAddr(), remote: remote}
	st.cc.mu.Lock()
	st.onAbort = c.interruptSource
	st.cc.mu.Unlock()
	return c
}

func (c *clientConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "hbone", Source: c.local, Addr: c.remote, Err: err}
}

// readErr maps a stream's end to what Read returns.
func (c *clientConn) readErr(err error) error {
	if errors.Is(err, io.EOF) {
		c.readEOF.Store(true)
		return io.EOF
	}
	if c.closed.Load() {
		return net.ErrClosed
	}
	return c.opError("read", resetError(err))
}

func (c *clientConn) Read(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	if len(c.rbuf) == 0 {
		var err error
		c.rbuf, err = c.st.recv(c.rbuf[:0])
		if err != nil {
			return 0, c.readErr(err)
		}
		c.roff = 0
	}
	n := 0
	for len(c.rbuf) > 0 && n < len(p) {
		k := copy(p[n:], c.rbuf[0][c.roff:])
		n += k
		c.roff += k
		if c.roff == len(c.rbuf[0]) {
			putChunk(c.rbuf[0])
			c.rbuf[0] = nil
			c.rbuf = c.rbuf[1:]
			c.roff = 0
		}
	}
	if len(c.rbuf) == 0 {
		c.rbuf = c.rbuf[:0:0]
	}
	c.st.consumed(n)
	return n, nil
}

// WriteTo copies the tunnel's incoming bytes to w until the response ends; io.Copy uses
// it. While it runs, the connection's read loop itself writes small DATA to w when w can
// take them without blocking (a TryWriter, or a *net.TCPConn), so a request/response
// exchange wakes no goroutine on this side; the rest this goroutine writes, with writev.
func (c *clientConn) WriteTo(w io.Writer) (total int64, err error) {
	left := 0
	for len(c.rbuf) > 0 { // what a Read left
		k, err := w.Write(c.rbuf[0][c.roff:])
		total += int64(k)
		left += k
		if err != nil {
			c.roff += k
			c.st.consumed(left)
			return total, err
		}
		putChunk(c.rbuf[0])
		c.rbuf = c.rbuf[1:]
		c.roff = 0
	}
	c.rbuf = nil
	if left > 0 {
		c.st.consumed(left) // recv took them from the windows: give them back
	}
	if tw := tryWriterOfWriter(w); tw != nil {
		base := c.st.delivered.Load()
		c.st.setTryWrite(tw)
		defer func() {
			c.st.setTryWrite(nil) // waits for a write in progress
			total += c.st.delivered.Load() - base
		}()
	}
	var chunks [][]byte
	var bufs net.Buffers
	for {
		chunks, err = c.st.recv(chunks[:0])
		if err != nil {
			if err = c.readErr(err); errors.Is(err, io.EOF) {
				err = nil
			}
			return total, err
		}
		n := 0
		bufs = append(bufs[:0], chunks...)
		for _, b := range chunks {
			n += len(b)
		}
		k, werr := bufs.WriteTo(w) // writev
		for i, b := range chunks {
			putChunk(b)
			chunks[i] = nil
		}
		total += k
		c.st.consumed(n)
		if werr != nil {
			return total, werr
		}
	}
}

// tryWriterOfWriter is the non-blocking write of w, if it has one (see TryWriter).
func tryWriterOfWriter(w io.Writer) func([]byte) (int, error) {
	if nc, ok := w.(net.Conn); ok {
		return tryWriterOf(nc)
	}
	if tw, ok := w.(TryWriter); ok {
		return tw.TryWrite
	}
	return nil
}

func (c *clientConn) Write(p []byte) (int, error) {
	c.mode.CompareAndSwap(srcNone, srcWrite)
	if c.mode.Load() != srcWrite {
		return 0, c.opError("write", errors.New("hbone: Write during ReadFrom"))
	}
	if len(p) == 0 {
		return 0, nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	queued, err := c.st.queueData(p)
	if queued {
		// The frames reference p until written; Write's caller may reuse p on return.
		if werr := <-c.st.wdone; err == nil && werr != nil {
			err = werr
		}
	}
	if err == nil {
		return len(p), nil
	}
	return 0, c.opError("write", c.writeErr(err))
}

func (c *clientConn) writeErr(err error) error {
	switch {
	case c.closed.Load():
		return net.ErrClosed
	case errors.Is(err, errRequestStopped):
		return err // not a reset: the server had what it wanted
	case errors.Is(err, errStreamEnded):
		return errors.New("hbone: write after CloseWrite")
	}
	return resetError(err)
}

// ReadFrom sends what r yields until r ends, then ends the request (END_STREAM) as
// CloseWrite does. This goroutine reads r and writes its frames itself when no one else
// is writing: no hand-off between goroutines. A reset of the tunnel (or Close) interrupts a
// read blocked on r through r's read deadline, set in the past, when r has one (a net.Conn);
// the caller is then expected to close r.
func (c *clientConn) ReadFrom(r io.Reader) (int64, error) {
	if !c.mode.CompareAndSwap(srcNone, srcDirect) {
		// Write came first (or another ReadFrom): copy through Write.
		return io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{r})
	}
	if c.closed.Load() {
		return 0, c.opError("write", net.ErrClosed)
	}
	c.srcMu.Lock()
	c.src = r
	c.srcMu.Unlock()
	defer func() {
		c.srcMu.Lock()
		c.src = nil
		c.srcMu.Unlock()
	}()
	if err := c.streamErr(); err != nil {
		// Failed before r was there to interrupt: do not start reading it.
		return c.readFromErr(0, err)
	}
	st := c.st
	// Two buffers alternate, so the next read overlaps the write of the previous one; they
	// grow while reads fill them (as the server's upstreamToClient).
	size := 16 << 10
	var bufs [2][]byte
	inflight, cur := 0, 0
	var total int64
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
	settle := func() error {
		inflight--
		return <-st.wdone
	}
	fail := func(err error) (int64, error) {
		for inflight > 0 {
			settle()
		}
		clean = true
		return c.readFromErr(total, err)
	}
	for {
		if inflight == 2 {
			if err := settle(); err != nil {
				return fail(err)
			}
		}
		if cap(bufs[cur]) < size {
			if bufs[cur] != nil {
				putChunk(bufs[cur])
			}
			bufs[cur] = getChunk(size)
		}
		buf := bufs[cur][:size]
		n, rerr := r.Read(buf)
		if n > 0 {
			queued, err := st.queueData(buf[:n])
			if queued {
				inflight++
				cur ^= 1
			}
			if err != nil {
				return fail(err)
			}
			total += int64(n)
			if n == len(buf) && size < 512<<10 {
				size *= 2
			}
		}
		if rerr == nil {
			continue
		}
		var serr error
		for inflight > 0 {
			if err := settle(); err != nil && serr == nil {
				serr = err
			}
		}
		clean = true
		if serr != nil {
			return c.readFromErr(total, serr)
		}
		if errors.Is(rerr, io.EOF) {
			c.writeClosed.Store(true)
			if !st.sendEnd() {
				return c.readFromErr(total, c.streamErr())
			}
			c.srcEnded.Store(true)
			return total, nil
		}
		if err := c.streamErr(); err != nil {
			// The read failed because a reset (or the server's stop) interrupted it.
			return c.readFromErr(total, err)
		}
		// The source's own error: the stream is reset, as the server resets the upstream.
		st.reset(http2.ErrCodeCancel, rerr)
		return total, rerr
	}
}

// readFromErr is what ReadFrom returns when sending failed with err. The server's
// RST_STREAM(NO_ERROR) after its complete response ends the request in order: no error, so
// that the proxy does not reset the client (pipe); the rest of the source is not wanted.
func (c *clientConn) readFromErr(total int64, err error) (int64, error) {
	if errors.Is(err, errRequestStopped) {
		return total, nil
	}
	return total, c.opError("write", c.writeErr(err))
}

// streamErr is why the request can go no further (the stream's failure, or the request
// side's alone), if anything.
func (c *clientConn) streamErr() error {
	c.st.cc.mu.Lock()
	defer c.st.cc.mu.Unlock()
	return c.st.sendErrLocked()
}

type readDeadliner interface{ SetReadDeadline(time.Time) error }

// interruptSource runs (under the connection's lock) when the stream fails: a ReadFrom
// blocked reading its source returns.
func (c *clientConn) interruptSource() {
	c.srcMu.Lock()
	defer c.srcMu.Unlock()
	if d, ok := c.src.(readDeadliner); ok {
		d.SetReadDeadline(time.Unix(1, 0))
	}
}

// CloseWrite ends the request: END_STREAM, which the server turns into a FIN upstream.
// Reading goes on. While ReadFrom runs, its source's end is the request's end.
func (c *clientConn) CloseWrite() error {
	if c.writeClosed.Swap(true) {
		return nil
	}
	c.mode.CompareAndSwap(srcNone, srcWrite)
	if c.mode.Load() != srcWrite {
		return nil
	}
	if c.st.sendEnd() {
		c.srcEnded.Store(true)
	}
	return nil
}

// Close ends the tunnel. When both directions have ended in order it waits (briefly) for
// the END_STREAM to be written; otherwise it resets the stream (RST_STREAM CANCEL), which
// the server turns into a TCP RST upstream.
func (c *clientConn) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		if c.readEOF.Load() && c.srcEnded.Load() {
			t := time.NewTimer(gracefulCloseWait)
			select {
			case <-c.st.endDone:
			case <-t.C:
			}
			t.Stop()
		}
		// A no-op on the wire when the stream already closed there.
		c.st.reset(http2.ErrCodeCancel, net.ErrClosed)
		c.pool.release(c.pc)
	})
	return nil
}

func (c *clientConn) LocalAddr() net.Addr  { return c.local }
func (c *clientConn) RemoteAddr() net.Addr { return c.remote }

// Deadlines are not supported: the HTTP/2 streams have none. Callers time out by closing.
func (c *clientConn) SetDeadline(time.Time) error      { return os.ErrNoDeadline }
func (c *clientConn) SetReadDeadline(time.Time) error  { return os.ErrNoDeadline }
func (c *clientConn) SetWriteDeadline(time.Time) error { return os.ErrNoDeadline }
