package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// socket is a blocking netlink socket in one network namespace, for request/response
// exchanges (dumps, small queries) and batches. mdlayher/netlink routes every receive
// through the runtime poller, which parks and wakes the goroutine per message; for a
// handful of small request/response exchanges a plain blocking socket is several times
// cheaper, and the no-op apply is nothing but such exchanges.
type socket struct {
	fd       int
	seq      atomic.Uint32
	requests int // requests sent, for tests that prove a read was skipped

	// big replaces the pooled receive buffer once a datagram did not fit in it.
	big []byte
	// truncated counts datagrams that did not fit in the receive buffer (their data is
	// lost; a dump that lost one is done again with a larger buffer).
	truncated int
	lostData  bool // set by receive when a datagram lost data; cleared by its callers

	// Buffer sizes as last read (0: not read yet) and NETLINK_CAP_ACK, set by
	// prepareLarge before the first large batch; small batches never pay for them.
	sndbuf, rcvbuf int
	capAck         bool

	cookie uint64 // SO_NETNS_COOKIE, once read (never 0)

	busyDumps int // dumps asked again because they went with another (tests)
}

// soNetNSCookie is SO_NETNS_COOKIE (Linux 5.14): a 64-bit id of the socket's network
// namespace, never reused while the system runs (unlike the nsfs inode).
const soNetNSCookie = 71

// openSocket makes a socket of the netlink protocol (unix.NETLINK_NETFILTER,
// unix.NETLINK_ROUTE) in the calling thread's network namespace. It makes as few system
// calls as it can (each is dear on this kind of VM, and a fresh enroll makes two
// sockets): no bind, as the kernel binds a netlink socket on its first send, and no
// receive timeout (see recv).
func openSocket(protocol int) (*socket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, protocol)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	// Strict checking lets rtnetlink filter dumps by the request's header and attributes
	// (routes of one table), and reject malformed requests instead of guessing.
	// nfnetlink does not look at it.
	if protocol == unix.NETLINK_ROUTE {
		if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_GET_STRICT_CHK, 1); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("NETLINK_GET_STRICT_CHK: %w", err)
		}
	}
	return &socket{fd: fd}, nil
}

// receiveTimeout bounds a wait for the kernel's answer: a kernel that never answers must
// not hang an apply forever.
const receiveTimeout = 10 * time.Second

// Close closes the socket; later calls fail with EBADF instead of reaching a reused fd.
func (r *socket) Close() error {
	if r.fd < 0 {
		return unix.EBADF
	}
	fd := r.fd
	r.fd = -1
	return unix.Close(fd)
}

// bufPool holds receive buffers, borrowed for one exchange: a dump part can be up to
// 64 KiB, and a fresh buffer of that size (zeroed, and paged in) costs more than the
// exchange; a buffer per open socket would pin megabytes for cached sockets.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 1<<16); return &b }}

// netNSCookie identifies the socket's namespace for as long as the system runs. A socket
// never changes namespace: the cookie is read once.
func (r *socket) netNSCookie() (uint64, error) {
	if r.cookie != 0 {
		return r.cookie, nil
	}
	v, err := unix.GetsockoptUint64(r.fd, unix.SOL_SOCKET, soNetNSCookie)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	r.cookie = v
	return v, nil
}

// appendMessage appends one netlink message (header, payload, padding) to buf.
func appendMessage(buf []byte, typ, flags uint16, seq uint32, data []byte) []byte {
	var h [unix.NLMSG_HDRLEN]byte
	binary.NativeEndian.PutUint32(h[0:4], uint32(unix.NLMSG_HDRLEN+len(data)))
	binary.NativeEndian.PutUint16(h[4:6], typ)
	binary.NativeEndian.PutUint16(h[6:8], flags)
	binary.NativeEndian.PutUint32(h[8:12], seq)
	buf = append(append(buf, h[:]...), data...)
	for len(buf)%unix.NLMSG_ALIGNTO != 0 {
		buf = append(buf, 0)
	}
	return buf
}

// send sends buf, one or more messages, to the kernel in one datagram. A netlink socket
// that was not connected sends to the kernel: write(2) needs no address.
func (r *socket) send(buf []byte) error {
	r.requests++
	if _, err := unix.Write(r.fd, buf); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	return nil
}

// recv reads one datagram into p and returns its real size (MSG_TRUNC), which is larger
// than p when the datagram did not fit. Unlike unix.Recvfrom it asks for no address (one
// allocation less per receive).
//
// It does not block in recvfrom: netlink answers requests, batches and each next part of
// a dump before the send (or the receive of the part before) returns, so the answer is
// there, and the socket needs no SO_RCVTIMEO (one system call less per socket, two per
// fresh enroll). Should it not be there, poll waits for it, at most receiveTimeout; the
// error is then EAGAIN, as a receive timeout's would be.
func (r *socket) recv(p []byte) (int, error) {
	for {
		n, _, errno := unix.Syscall6(unix.SYS_RECVFROM, uintptr(r.fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), unix.MSG_TRUNC|unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			fds := []unix.PollFd{{Fd: int32(r.fd), Events: unix.POLLIN}}
			ready, err := unix.Poll(fds, int(receiveTimeout/time.Millisecond))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return 0, err
			}
			if ready == 0 {
				return 0, unix.EAGAIN
			}
			continue
		}
		return 0, errno
	}
}

// receive reads messages and hands each to fn until fn says it is done. A datagram larger
// than the buffer (the kernel tells its real size: MSG_TRUNC) loses its tail: the
// messages that fit are handed on, an error message cut short still gives its errno,
// the buffer grows for the next receive, and lostData is set for the caller.
func (r *socket) receive(fn func(h netlink.Header, body []byte) (done bool, err error)) error {
	var buf []byte
	if r.big != nil {
		buf = r.big
	} else {
		pooled := bufPool.Get().(*[]byte)
		defer bufPool.Put(pooled)
		buf = *pooled
	}
	for {
		n, err := r.recv(buf)
		if err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		b := buf[:min(n, len(buf))]
		if n > len(buf) {
			r.truncated++
			r.lostData = true
			r.big = make([]byte, max(nlmsgAlign(n), 2*len(buf)))
		}
		for len(b) >= unix.NLMSG_HDRLEN {
			l := int(binary.NativeEndian.Uint32(b[0:4]))
			h := netlink.Header{
				Length:   uint32(l),
				Type:     netlink.HeaderType(binary.NativeEndian.Uint16(b[4:6])),
				Flags:    netlink.HeaderFlags(binary.NativeEndian.Uint16(b[6:8])),
				Sequence: binary.NativeEndian.Uint32(b[8:12]),
				PID:      binary.NativeEndian.Uint32(b[12:16]),
			}
			if l < unix.NLMSG_HDRLEN {
				return fmt.Errorf("netlink: malformed message of length %d", l)
			}
			if l > len(b) {
				if n <= len(buf) {
					return fmt.Errorf("netlink: malformed message of length %d", l)
				}
				// Cut short by the buffer: only an error's errno survives usefully.
				if h.Type == netlink.Error && len(b) >= unix.NLMSG_HDRLEN+4 {
					if done, err := fn(h, b[unix.NLMSG_HDRLEN:]); done || err != nil {
						return err
					}
				}
				break
			}
			body := b[unix.NLMSG_HDRLEN:l]
			b = b[min(nlmsgAlign(l), len(b)):]
			if done, err := fn(h, body); done || err != nil {
				return err
			}
		}
	}
}

// errno reads the error code of an NLMSG_ERROR message; 0 is an ack.
func errno(body []byte) (unix.Errno, error) {
	if len(body) < 4 {
		return 0, fmt.Errorf("netlink: short error message")
	}
	return unix.Errno(-int32(binary.NativeEndian.Uint32(body[0:4]))), nil
}

// execute sends one request and returns the replies: all parts of a dump, or the one
// answer to a plain request. A kernel error comes back as an error wrapping the errno. A
// dump the kernel marks interrupted (the ruleset changed while it was being dumped) is
// done again, so that callers never see a torn one.
func (r *socket) execute(msgType uint16, flags netlink.HeaderFlags, data []byte) ([]netlink.Message, error) {
	for attempt := 0; ; attempt++ {
		out, interrupted, err := r.executeOnce(msgType, flags, data)
		if err != nil || !interrupted {
			return out, err
		}
		if attempt == 4 {
			return nil, fmt.Errorf("netlink dump: interrupted %d times by concurrent changes (or answers too large for the buffer)", attempt+1)
		}
	}
}

func (r *socket) executeOnce(msgType uint16, flags netlink.HeaderFlags, data []byte) ([]netlink.Message, bool, error) {
	seq := r.seq.Add(1)
	r.lostData = false
	if err := r.send(appendMessage(nil, msgType, uint16(flags|netlink.Request), seq, data)); err != nil {
		return nil, false, err
	}
	dump := flags&netlink.Dump != 0
	var out []netlink.Message
	interrupted := false
	err := r.receive(func(h netlink.Header, body []byte) (bool, error) {
		if h.Sequence != seq {
			return false, nil // a late answer to an earlier request
		}
		if h.Flags&netlink.DumpInterrupted != 0 {
			interrupted = true
		}
		switch h.Type {
		case netlink.Done:
			// A dump that failed says so here, not in an NLMSG_ERROR (netlink_dump_done).
			if e, _ := errno(body); e != 0 {
				return true, e
			}
			return true, nil
		case netlink.Error:
			e, err := errno(body)
			if err == nil && e != 0 {
				err = e
			}
			return true, err // an ack, or the kernel's refusal
		}
		out = append(out, netlink.Message{Header: h, Data: append([]byte(nil), body...)})
		return !dump && h.Flags&netlink.Multi == 0, nil
	})
	if err != nil {
		return nil, false, err
	}
	if r.lostData {
		// Part of the answer did not fit in the buffer, which has grown: ask again.
		r.lostData = false
		return nil, true, nil
	}
	return out, interrupted, nil
}

// query is one request of executeQueries and what came back for it: its replies (all
// parts of a dump), or the kernel's refusal.
type query struct {
	Type  uint16
	Flags netlink.HeaderFlags // 0, or netlink.Dump
	Data  []byte
	Out   []netlink.Message
	Err   error // the kernel's refusal (an errno)
}

// executeQueries sends the queries in one sendmsg and reads every answer: one exchange,
// where execute would make one per query. A dump the kernel marks interrupted, or an
// answer cut short by the buffer, makes them all be asked again, as execute does.
//
// The kernel runs one dump at a time per socket, and a dump asked for while another runs
// is refused with EBUSY. A small dump (the few ip rules of a pod) is whole after its first
// pass, which the kernel makes while it takes the request, before the next request of the
// same sendmsg: so dumps can go together. One refused that way is asked again, alone.
func (r *socket) executeQueries(qs ...*query) error {
	if err := r.queryRetry(qs); err != nil {
		return err
	}
	for _, q := range qs {
		if q.Flags&netlink.Dump != 0 && errors.Is(q.Err, unix.EBUSY) {
			r.busyDumps++
			if err := r.queryRetry([]*query{q}); err != nil {
				return err
			}
		}
	}
	return nil
}

func (r *socket) queryRetry(qs []*query) error {
	for attempt := 0; ; attempt++ {
		again, err := r.queryOnce(qs)
		if err != nil || !again {
			return err
		}
		if attempt == 4 {
			return fmt.Errorf("netlink dump: interrupted %d times by concurrent changes (or answers too large for the buffer)", attempt+1)
		}
	}
}

func (r *socket) queryOnce(qs []*query) (again bool, err error) {
	n := uint32(len(qs))
	first := r.seq.Add(n) - n + 1
	m := newMsgBuf(0, len(qs))
	defer m.release()
	for _, q := range qs {
		q.Out, q.Err = nil, nil
		m.begin(q.Type, uint16(q.Flags|netlink.Request))
		m.raw(q.Data)
		m.end()
	}
	m.stamp(first)
	r.lostData = false
	if err := r.send(m.buf); err != nil {
		return false, err
	}
	interrupted := false
	pending := len(qs)
	answered := make([]bool, len(qs))
	finish := func(i int) {
		if !answered[i] {
			answered[i] = true
			pending--
		}
	}
	err = r.receive(func(h netlink.Header, body []byte) (bool, error) {
		i := int(h.Sequence - first)
		if i < 0 || i >= len(qs) {
			return false, nil // a late answer to an earlier request
		}
		q := qs[i]
		if h.Flags&netlink.DumpInterrupted != 0 {
			interrupted = true
		}
		switch h.Type {
		case netlink.Done:
			// A dump that failed says so here, not in an NLMSG_ERROR (netlink_dump_done).
			if e, _ := errno(body); e != 0 {
				q.Err = e
			}
			finish(i)
		case netlink.Error:
			e, err := errno(body)
			if err != nil {
				return true, err
			}
			if e != 0 {
				q.Err = e
			}
			finish(i)
			if e == unix.EPERM || e == unix.ENOBUFS {
				// nfnetlink answers a sender without CAP_NET_ADMIN once, for the first
				// message of the datagram, and drops the rest (nfnetlink_rcv); a full
				// socket buffer drops answers too. Nothing more will come: the others
				// fail the same way rather than wait out the receive timeout.
				for j, other := range qs {
					if !answered[j] && other.Err == nil {
						other.Err = e
					}
				}
				return true, nil
			}
		default:
			q.Out = append(q.Out, netlink.Message{Header: h, Data: append([]byte(nil), body...)})
			if q.Flags&netlink.Dump == 0 && h.Flags&netlink.Multi == 0 {
				finish(i)
			}
		}
		return pending == 0, nil
	})
	if err != nil {
		return false, err
	}
	if r.lostData {
		r.lostData = false
		return true, nil
	}
	return interrupted, nil
}

func nlmsgAlign(l int) int { return (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// request is one netlink message for executeAll: type, flags (NLM_F_REQUEST|NLM_F_ACK are
// added) and payload.
type request struct {
	Type  uint16
	Flags uint16
	Data  []byte
}

// executeAll sends every request in one sendmsg and returns one error per request (nil:
// done). The kernel runs them in order and answers every one it refuses; only the last
// asks for an ack, which comes after every other answer: one receive when all succeed,
// however many requests.
func (r *socket) executeAll(reqs []request) ([]error, error) {
	m := frameRequests(reqs)
	defer m.release()
	return r.sendRequests(m)
}

// frameRequests frames requests for sendRequests: NLM_F_REQUEST on each, NLM_F_ACK on
// the last.
func frameRequests(reqs []request) *msgBuf {
	size := 0
	for _, q := range reqs {
		size += unix.NLMSG_HDRLEN + nlmsgAlign(len(q.Data))
	}
	m := newMsgBuf(size, len(reqs))
	for i, q := range reqs {
		flags := q.Flags | unix.NLM_F_REQUEST
		if i == len(reqs)-1 {
			flags |= unix.NLM_F_ACK
		}
		m.begin(q.Type, flags)
		m.raw(q.Data)
		m.end()
	}
	return m
}

// sendRequests sends requests framed as executeAll frames them (the last one asking for
// an ack), numbered from the socket's counter, and reads until the last one's answer.
func (r *socket) sendRequests(m *msgBuf) ([]error, error) {
	n := m.count()
	if n == 0 {
		return nil, nil
	}
	first := r.seq.Add(uint32(n)) - uint32(n) + 1
	m.stamp(first)
	if err := r.send(m.buf); err != nil {
		return nil, err
	}
	errs := make([]error, n)
	err := r.receive(func(h netlink.Header, body []byte) (bool, error) {
		i := int(h.Sequence - first)
		if h.Type != netlink.Error || i < 0 || i >= n {
			return false, nil
		}
		e, err := errno(body)
		if err != nil {
			return true, err
		}
		if e != 0 {
			errs[i] = e
		}
		return i == n-1, nil
	})
	if err != nil {
		return nil, err
	}
	return errs, nil
}
