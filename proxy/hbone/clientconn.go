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

// reqBody is the CONNECT's request body: the pipe the tunnel's writes go through. The
// transport closes it when it is done with the stream's sending side.
type reqBody struct {
	pr     *io.PipeReader
	once   sync.Once
	closed chan struct{}
}

var errBodyClosed = errors.New("hbone: request body closed by the transport")

func (b *reqBody) Read(p []byte) (int, error) { return b.pr.Read(p) }

func (b *reqBody) Close() error {
	b.once.Do(func() {
		b.pr.CloseWithError(errBodyClosed)
		close(b.closed)
	})
	return nil
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

// CloseWrite ends the request body: END_STREAM, which the server turns into a FIN upstream.
// Reading goes on.
func (c *clientConn) CloseWrite() error {
	if c.writeClosed.Swap(true) {
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
		if c.readEOF.Load() && c.writeClosed.Load() {
			t := time.NewTimer(gracefulCloseWait)
			select {
			case <-c.body.closed:
			case <-t.C:
			}
			t.Stop()
		}
		c.pw.CloseWithError(net.ErrClosed)
		c.resp.Body.Close() // resets an unfinished stream; waits for the stream's goroutine
		c.cancel()
		c.pool.release(c.pc)
	})
	return nil
}

func (c *clientConn) LocalAddr() net.Addr  { return c.local }
func (c *clientConn) RemoteAddr() net.Addr { return c.remote }

// Deadlines are not supported: the HTTP/2 body streams have none. Callers time out by
// closing.
func (c *clientConn) SetDeadline(time.Time) error      { return os.ErrNoDeadline }
func (c *clientConn) SetReadDeadline(time.Time) error  { return os.ErrNoDeadline }
func (c *clientConn) SetWriteDeadline(time.Time) error { return os.ErrNoDeadline }
