package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// reqBody is the CONNECT's request body, read by x/net's transport goroutine. Its source is
// given once: a pipe that Write feeds, or, through ReadFrom, the proxied connection itself,
// which the transport then reads straight into its frame buffer (no copy, no goroutine
// hand-off per read). The transport closes the body when it is done with the stream's
// sending side.
type reqBody struct {
	srcc   chan io.Reader // cap 1: the source
	src    io.Reader      // the transport goroutine's
	pr     *io.PipeReader
	once   sync.Once
	closed chan struct{}
}

var errBodyClosed = errors.New("hbone: request body closed by the transport")

func (b *reqBody) Read(p []byte) (int, error) {
	if b.src == nil {
		select {
		case b.src = <-b.srcc:
		case <-b.closed:
			return 0, errBodyClosed
		}
	}
	return b.src.Read(p)
}

// Close unblocks a Read on the pipe; a Read on a ReadFrom source returns when that source
// is closed.
func (b *reqBody) Close() error {
	b.once.Do(func() {
		b.pr.CloseWithError(errBodyClosed)
		close(b.closed)
	})
	return nil
}

// Body source modes.
const (
	srcNone int32 = iota
	srcPipe
	srcDirect
)

// directSrc is a ReadFrom source: it counts what the transport read and reports the end.
type directSrc struct {
	r    io.Reader
	n    atomic.Int64
	err  error // set before done is closed
	done chan struct{}
	end  func() // at the source's EOF
}

func (d *directSrc) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	d.n.Add(int64(n))
	if err != nil && d.err == nil {
		d.err = err
		if errors.Is(err, io.EOF) {
			d.end()
		}
		close(d.done)
	}
	return n, err
}

// gracefulCloseWait bounds how long Close waits for the transport to send the last request
// bytes and END_STREAM after both directions ended, before it resets the stream instead.
var gracefulCloseWait = 5 * time.Second

// clientConn is the client end of one tunnel: Read is the response body, Write the request
// body.
type clientConn struct {
	pool   *Pool
	pc     *poolConn
	resp   *http.Response
	pw     *io.PipeWriter
	body   *reqBody
	mode   atomic.Int32 // srcNone, srcPipe or srcDirect
	direct atomic.Pointer[directSrc]
	cancel context.CancelFunc
	local  net.Addr
	remote net.Addr

	readEOF     atomic.Bool
	writeClosed atomic.Bool
	closed      atomic.Bool
	closeOnce   sync.Once
}

func (c *clientConn) Read(p []byte) (int, error) {
	n, err := c.resp.Body.Read(p)
	if err == nil {
		return n, nil
	}
	if errors.Is(err, io.EOF) {
		c.readEOF.Store(true)
		return n, io.EOF
	}
	if c.closed.Load() {
		return n, net.ErrClosed
	}
	return n, &net.OpError{Op: "read", Net: "hbone", Source: c.local, Addr: c.remote, Err: resetError(err)}
}

// WriteTo copies the tunnel's incoming bytes to w; io.Copy uses it. x/net answers every
// body Read of 4 KiB or more with WINDOW_UPDATE frames and a write to the socket, so the
// buffer grows while reads fill it (32 KiB to 512 KiB): bulk transfers make few large reads,
// idle tunnels keep a small buffer.
func (c *clientConn) WriteTo(w io.Writer) (int64, error) {
	size := 32 << 10
	buf := getChunk(size)
	defer func() { putChunk(buf) }()
	var total int64
	for {
		n, err := c.Read(buf)
		if n > 0 {
			k, werr := w.Write(buf[:n])
			total += int64(k)
			if werr != nil {
				return total, werr
			}
			if n == len(buf) && size < 512<<10 {
				putChunk(buf)
				size *= 2
				buf = getChunk(size)
			}
		}
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

func (c *clientConn) Write(p []byte) (int, error) {
	if !c.usePipe() {
		return 0, &net.OpError{Op: "write", Net: "hbone", Source: c.local, Addr: c.remote, Err: errors.New("hbone: Write during ReadFrom")}
	}
	n, err := c.pw.Write(p)
	if err == nil {
		return n, nil
	}
	switch {
	case c.closed.Load():
		err = net.ErrClosed
	case c.writeClosed.Load():
		err = errors.New("hbone: write after CloseWrite")
	default:
		// The transport dropped the request body: the stream was reset or its connection died.
		err = resetError(err)
	}
	return n, &net.OpError{Op: "write", Net: "hbone", Source: c.local, Addr: c.remote, Err: err}
}

// usePipe makes the pipe the body's source, unless ReadFrom made r the source.
func (c *clientConn) usePipe() bool {
	if c.mode.CompareAndSwap(srcNone, srcPipe) {
		c.body.srcc <- c.body.pr
	}
	return c.mode.Load() == srcPipe
}

// ReadFrom sends what r yields until r ends, then ends the request body (END_STREAM) as
// CloseWrite does. x/net's transport goroutine reads r itself. r must allow reads from
// another goroutine and unblock them when closed, as a net.Conn does: a tunnel reset makes
// ReadFrom return at once, while that read goes on until r is closed.
func (c *clientConn) ReadFrom(r io.Reader) (int64, error) {
	if !c.mode.CompareAndSwap(srcNone, srcDirect) {
		// Write came first (or another ReadFrom): copy through Write.
		return io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{r})
	}
	d := &directSrc{r: r, done: make(chan struct{}), end: func() { c.writeClosed.Store(true) }}
	c.direct.Store(d)
	if c.closed.Load() {
		// Close ran meanwhile and may not have seen this source: do not hand it over.
		return 0, &net.OpError{Op: "write", Net: "hbone", Source: c.local, Addr: c.remote, Err: net.ErrClosed}
	}
	c.body.srcc <- d
	select {
	case <-d.done:
	case <-c.body.closed:
		select {
		case <-d.done: // both: the source's end came first
		default:
			err := resetError(errBodyClosed)
			if c.closed.Load() {
				err = net.ErrClosed
			}
			return d.n.Load(), &net.OpError{Op: "write", Net: "hbone", Source: c.local, Addr: c.remote, Err: err}
		}
	}
	if errors.Is(d.err, io.EOF) {
		return d.n.Load(), nil
	}
	return d.n.Load(), d.err // the source's own error: the transport resets the stream
}

// CloseWrite ends the request body: END_STREAM, which the server turns into a FIN upstream.
// Reading goes on. While ReadFrom runs, its source's end is the body's end.
func (c *clientConn) CloseWrite() error {
	if c.writeClosed.Swap(true) {
		return nil
	}
	if !c.usePipe() {
		return nil
	}
	return c.pw.Close()
}

// Close ends the tunnel. When both directions have ended in order it waits (briefly) for
// the transport to finish sending; otherwise it resets the stream (RST_STREAM CANCEL),
// which the server turns into a TCP RST upstream.
func (c *clientConn) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		if c.readEOF.Load() && c.sourceEnded() {
			t := time.NewTimer(gracefulCloseWait)
			select {
			case <-c.body.closed:
			case <-t.C:
			}
			t.Stop()
		}
		c.pw.CloseWithError(net.ErrClosed)
		// Cancelling first resets an unfinished stream without waiting: Body.Close waits for
		// the stream's goroutine, which may be blocked reading the ReadFrom source (closing
		// the body does not stop that read) or behind another tunnel's write stuck on a
		// peer that stopped reading (until x/net's ping gives up, 30 s).
		c.cancel()
		c.resp.Body.Close()
		c.pool.release(c.pc)
	})
	return nil
}

// sourceEnded reports whether the request body's source has ended: CloseWrite closed the
// pipe, or ReadFrom's source reached its end.
func (c *clientConn) sourceEnded() bool {
	if c.mode.Load() != srcDirect {
		return c.writeClosed.Load()
	}
	d := c.direct.Load()
	if d == nil {
		return false
	}
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

func (c *clientConn) LocalAddr() net.Addr  { return c.local }
func (c *clientConn) RemoteAddr() net.Addr { return c.remote }

// Deadlines are not supported: the HTTP/2 body streams have none. Callers time out by
// closing.
func (c *clientConn) SetDeadline(time.Time) error      { return os.ErrNoDeadline }
func (c *clientConn) SetReadDeadline(time.Time) error  { return os.ErrNoDeadline }
func (c *clientConn) SetWriteDeadline(time.Time) error { return os.ErrNoDeadline }
