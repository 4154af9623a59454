package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/nftmesh/nftmesh/internal/rawio"
	"github.com/nftmesh/nftmesh/proxy/hbone"
)

// halfCloser is a connection one can close for writing (TCP FIN, or END_STREAM on an HBONE
// tunnel) while still reading.
type halfCloser interface{ CloseWrite() error }

// resetter can end a connection with a reset (TCP RST via SO_LINGER 0).
type resetter interface{ SetLinger(int) error }

// pipe copies both ways between a and b until both directions end. A FIN one way is a
// FIN the other way (each direction half-closes on its own); a reset one way resets the
// other. It returns the bytes copied a->b and b->a and the first abnormal error.
func pipe(a, b net.Conn) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var firstErr atomic.Pointer[error]
	var resetOnce sync.Once
	reset := func() {
		resetOnce.Do(func() {
			for _, c := range []net.Conn{a, b} {
				if r, ok := c.(resetter); ok {
					r.SetLinger(0)
				}
				c.Close()
			}
		})
	}
	one := func(dst, src net.Conn, n *int64) {
		defer wg.Done()
		copied, err := copyConn(dst, src)
		*n = copied
		if errors.Is(err, net.ErrClosed) {
			// Closed here, not by the peer: a reset, a policy change or a stop cut the
			// connection. A FIN passed on (CloseWrite ignores linger) would make a cut
			// stream look complete.
			dst.Close()
			return
		}
		if err != nil {
			firstErr.CompareAndSwap(nil, &err)
			if isReset(err) {
				reset()
				return
			}
		}
		if hc, ok := dst.(halfCloser); ok {
			hc.CloseWrite()
		} else {
			dst.Close()
		}
	}
	wg.Add(2)
	go one(b, a, &aToB)
	go one(a, b, &bToA)
	wg.Wait()
	a.Close()
	b.Close()
	if p := firstErr.Load(); p != nil {
		err = *p
	}
	return aToB, bToA, err
}

// copyBufSize is the buffer for a leg that is neither TCP to TCP nor handled by the
// tunnel itself: big writes mean fewer TLS records, HTTP/2 frames and system calls per
// megabyte.
const copyBufSize = 256 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// copyConn copies src to dst. TCP to TCP goes through io.Copy (splice, no copy to user
// space). A tunnel to TCP goes through the tunnel's WriteTo (it sizes its reads itself);
// TCP into a tunnel through the tunnel's ReadFrom (its sender reads the socket itself,
// no hand-off between goroutines). Anything else gets a large buffer; hiding src's WriteTo
// and dst's ReaderFrom makes io.CopyBuffer really use it.
func copyConn(dst, src net.Conn) (int64, error) {
	srcTCP, srcIsTCP := src.(*net.TCPConn)
	dstTCP, dstIsTCP := dst.(*net.TCPConn)
	switch {
	case srcIsTCP && dstIsTCP:
		return io.Copy(dst, src)
	case srcIsTCP:
		if rf, ok := dst.(io.ReaderFrom); ok {
			return rf.ReadFrom(rawConn(srcTCP))
		}
		buf := copyBufs.Get().(*[]byte)
		defer copyBufs.Put(buf)
		return io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *buf)
	case dstIsTCP:
		if wt, ok := src.(io.WriterTo); ok {
			return wt.WriteTo(rawConn(dstTCP))
		}
	}
	return io.Copy(dst, src)
}

// rawConn is c with raw system calls for a tunnel's own reads and writes (see rawio).
func rawConn(c *net.TCPConn) net.Conn {
	if rc, err := rawio.NewConn(c); err == nil {
		return rc
	}
	return c
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || hbone.IsReset(err)
}
