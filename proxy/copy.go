package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

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
		copied, err := io.Copy(dst, src)
		*n = copied
		if err != nil && !errors.Is(err, net.ErrClosed) {
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

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || hbone.IsReset(err)
}
