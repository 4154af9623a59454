// Package rawio reads and writes sockets with raw system calls.
//
// Go's syscall.Read and Write tell the scheduler they may block (entersyscall). When every P
// of the process was idle, that wakes the runtime's monitor thread (sysmon), which then polls
// every 20 µs for the next millisecond. A proxy that waits between small packets pays that
// on nearly every packet: measured on the e2e latency benchmark, sysmon made 43 % of the
// proxies' context switches, and a context switch is the most expensive thing a proxy does
// on a virtual machine. The sockets here are non-blocking, so a raw call returns at once
// (EAGAIN when it would block) and the wait goes through the netpoller as usual: deadlines
// and Close behave as for net.Conn.
package rawio

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// Read reads from the socket into p, waiting (in the netpoller) until it has data.
func Read(rc syscall.RawConn, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var errno syscall.Errno
	err := rc.Read(func(fd uintptr) bool {
		for {
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
			switch e {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false
			}
			n, errno = int(r), e
			return true
		}
	})
	switch {
	case err != nil:
		return 0, err
	case errno != 0:
		return 0, os.NewSyscallError("read", errno)
	case n == 0:
		return 0, io.EOF
	}
	raceReadDone(p[:n])
	return n, nil
}

// Write writes all of p, waiting (in the netpoller) while the socket is full.
func Write(rc syscall.RawConn, p []byte) (int, error) { return write(rc, p, true) }

// TryWrite writes as much of p as the socket takes now, without waiting.
func TryWrite(rc syscall.RawConn, p []byte) (int, error) { return write(rc, p, false) }

func write(rc syscall.RawConn, p []byte, wait bool) (int, error) {
	raceWriteStart()
	var n int
	var errno syscall.Errno
	err := rc.Write(func(fd uintptr) bool {
		for n < len(p) {
			r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[n])), uintptr(len(p)-n))
			switch e {
			case 0:
				n += int(r)
			case syscall.EINTR:
			case syscall.EAGAIN:
				return !wait // false: the poller waits until the socket is writable
			default:
				errno = e
				return true
			}
		}
		return true
	})
	if err == nil && errno != 0 {
		err = os.NewSyscallError("write", errno)
	}
	raceWriteDone(p[:n])
	return n, err
}

// Conn is a TCP connection whose Read, Write and TryWrite use raw system calls. Errors
// are *net.OpError, as the TCPConn's own.
type Conn struct {
	*net.TCPConn
	rc syscall.RawConn
}

// NewConn wraps c.
func NewConn(c *net.TCPConn) (*Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	return &Conn{TCPConn: c, rc: rc}, nil
}

func (c *Conn) Read(p []byte) (int, error) {
	n, err := Read(c.rc, p)
	if err != nil && err != io.EOF {
		err = c.opError("read", err)
	}
	return n, err
}

func (c *Conn) Write(p []byte) (int, error) {
	n, err := Write(c.rc, p)
	if err != nil {
		err = c.opError("write", err)
	}
	return n, err
}

// TryWrite writes what the socket takes without waiting.
func (c *Conn) TryWrite(p []byte) (int, error) {
	n, err := TryWrite(c.rc, p)
	if err != nil {
		err = c.opError("write", err)
	}
	return n, err
}

// ReadFrom and WriteTo hide the TCPConn's (splice and sendfile paths, with ordinary system
// calls): io.Copy through a Conn reads and writes raw.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	return io.Copy(struct{ io.Writer }{c}, r)
}

func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	return io.Copy(w, struct{ io.Reader }{c})
}

func (c *Conn) opError(op string, err error) error {
	if _, ok := err.(*net.OpError); ok {
		return err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
