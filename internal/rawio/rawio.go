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
	"sync"
	"syscall"
	"unsafe"
)

// op is one direction's system call. It is made once per Conn: a closure handed to
// RawConn.Read or Write escapes, and would cost three allocations per call.
type op struct {
	mu    sync.Mutex // RawConn serializes the calls, but p, wait, n and errno are set before
	p     []byte
	wait  bool // write: wait until all of p is written
	n     int
	errno syscall.Errno
	fn    func(fd uintptr) bool
}

func newReadOp() *op {
	o := &op{}
	o.fn = o.read
	return o
}

func newWriteOp() *op {
	o := &op{}
	o.fn = o.write
	return o
}

func (o *op) read(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&o.p[0])), uintptr(len(o.p)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // the poller waits until the socket is readable
		}
		o.n, o.errno = int(r), e
		return true
	}
}

func (o *op) write(fd uintptr) bool {
	for o.n < len(o.p) {
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&o.p[o.n])), uintptr(len(o.p)-o.n))
		switch e {
		case 0:
			o.n += int(r)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return !o.wait // false: the poller waits until the socket is writable
		default:
			o.errno = e
			return true
		}
	}
	return true
}

// readInto reads from the socket into p, waiting (in the netpoller) until it has data.
func (o *op) readInto(rc syscall.RawConn, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	o.mu.Lock()
	o.p, o.n, o.errno = p, 0, 0
	err := rc.Read(o.fn)
	n, errno := o.n, o.errno
	o.p = nil
	o.mu.Unlock()
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

// writeFrom writes p: all of it, waiting (in the netpoller) while the socket is full, or
// (!wait) what the socket takes at once.
func (o *op) writeFrom(rc syscall.RawConn, p []byte, wait bool) (int, error) {
	raceWriteStart()
	o.mu.Lock()
	o.p, o.wait, o.n, o.errno = p, wait, 0, 0
	err := rc.Write(o.fn)
	n, errno := o.n, o.errno
	o.p = nil
	o.mu.Unlock()
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
	rc     syscall.RawConn
	rd, wr *op
}

// NewConn wraps c.
func NewConn(c *net.TCPConn) (*Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	return &Conn{TCPConn: c, rc: rc, rd: newReadOp(), wr: newWriteOp()}, nil
}

func (c *Conn) Read(p []byte) (int, error) {
	n, err := c.rd.readInto(c.rc, p)
	if err != nil && err != io.EOF {
		err = c.opError("read", err)
	}
	return n, err
}

func (c *Conn) Write(p []byte) (int, error) {
	n, err := c.wr.writeFrom(c.rc, p, true)
	if err != nil {
		err = c.opError("write", err)
	}
	return n, err
}

// TryWrite writes what the socket takes without waiting.
func (c *Conn) TryWrite(p []byte) (int, error) {
	n, err := c.wr.writeFrom(c.rc, p, false)
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
