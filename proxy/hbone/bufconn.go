package hbone

import (
	"bufio"
	"io"
	"net"
	"sync"

	"github.com/nftmesh/nftmesh/internal/rawio"
)

// bufConn sits under the tls.Conn of both ends of an HBONE connection.
//
// Writes: crypto/tls writes every record (at most 16 KiB) with its own write(2). While corked
// (a writer flushing a batch of frames, on either end) the records
// gather and go out in large writes instead.
//
// Reads: crypto/tls reads about one record per read(2); the buffer below it takes whatever the
// socket holds in one call. The buffer exists only once the handshake is done (buffered):
// a connection that never completes one, a flood of idle ones, costs no 64 KiB each.
type bufConn struct {
	net.Conn
	rw io.ReadWriter // the socket's raw calls when it is TCP (see rawio), else Conn
	r  *bufio.Reader // nil until buffered: reads go straight to the socket
	// drained, if set, runs in the reading goroutine each time a read finds the buffer
	// empty, before it goes to the socket: all that has arrived has been read.
	drained func()

	mu     sync.Mutex // crypto/tls may write alerts and key updates from the reading goroutine
	corked bool
	buf    []byte
}

const (
	corkMax     = 256 << 10
	readBufSize = 64 << 10
)

func newBufConn(c net.Conn) *bufConn {
	var rw io.ReadWriter = c
	if tc, ok := c.(*net.TCPConn); ok {
		if rc, err := rawio.NewConn(tc); err == nil {
			rw = rc
		}
	}
	return &bufConn{Conn: c, rw: rw}
}

// buffered gives the connection its read buffer; the reading goroutine calls it once the
// handshake is done.
func (c *bufConn) buffered() {
	if c.r == nil {
		c.r = bufio.NewReaderSize(c.rw, readBufSize)
	}
}

func (c *bufConn) Read(p []byte) (int, error) {
	if c.r == nil {
		return c.rw.Read(p)
	}
	if c.drained != nil && c.r.Buffered() == 0 {
		c.drained()
	}
	return c.r.Read(p)
}

func (c *bufConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return c.rw.Write(p)
	}
	c.buf = append(c.buf, p...)
	if len(c.buf) >= corkMax {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (c *bufConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork sends what was gathered and goes back to writing through.
func (c *bufConn) uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	return c.flushLocked()
}

func (c *bufConn) flushLocked() error {
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.rw.Write(c.buf)
	if cap(c.buf) > 2*corkMax {
		c.buf = nil // a burst grew it; do not keep it for an idle connection
	} else {
		c.buf = c.buf[:0]
	}
	return err
}
