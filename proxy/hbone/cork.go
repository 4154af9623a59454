package hbone

import (
	"net"
	"sync"
)

// corkConn sits under the server's tls.Conn. crypto/tls writes every record (at most 16 KiB)
// with its own write(2); while the connection writer flushes a batch the records are
// gathered and sent in large writes instead, which on loopback is most of the cost.
type corkConn struct {
	net.Conn
	mu     sync.Mutex // crypto/tls may write alerts from the reading goroutine
	corked bool
	buf    []byte
}

const corkMax = 256 << 10

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return c.Conn.Write(p)
	}
	c.buf = append(c.buf, p...)
	if len(c.buf) >= corkMax {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork sends what was gathered and goes back to writing through.
func (c *corkConn) uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	return c.flushLocked()
}

func (c *corkConn) flushLocked() error {
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.buf)
	if cap(c.buf) > 2*corkMax {
		c.buf = nil // a burst grew it; do not keep it for an idle connection
	} else {
		c.buf = c.buf[:0]
	}
	return err
}
