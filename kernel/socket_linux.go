package kernel

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"

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
}

// soNetNSCookie is SO_NETNS_COOKIE (Linux 5.14): a 64-bit id of the socket's network
// namespace, never reused while the system runs (unlike the nsfs inode).
const soNetNSCookie = 71

// openSocket makes a socket of the netlink protocol (unix.NETLINK_NETFILTER,
// unix.NETLINK_ROUTE) in the calling thread's network namespace.
func openSocket(protocol int) (*socket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, protocol)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	// Strict checking lets the kernel filter dumps by the request's header and attributes
	// (routes of one table), and rejects malformed requests instead of guessing.
	if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_GET_STRICT_CHK, 1); err != nil && protocol == unix.NETLINK_ROUTE {
		unix.Close(fd)
		return nil, fmt.Errorf("NETLINK_GET_STRICT_CHK: %w", err)
	}
	// A kernel that never answers must not hang an apply forever.
	tv := unix.Timeval{Sec: 10}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &socket{fd: fd}, nil
}

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

// netNSCookie identifies the socket's namespace for as long as the system runs.
func (r *socket) netNSCookie() (uint64, error) {
	v, err := unix.GetsockoptUint64(r.fd, unix.SOL_SOCKET, soNetNSCookie)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
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

func (r *socket) send(buf []byte) error {
	r.requests++
	if err := unix.Sendto(r.fd, buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	return nil
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
		n, _, err := unix.Recvfrom(r.fd, buf, unix.MSG_TRUNC)
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

func nlmsgAlign(l int) int { return (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// request is one netlink message for executeAll: type, flags (NLM_F_REQUEST|NLM_F_ACK are
// added) and payload.
type request struct {
	Type  uint16
	Flags uint16
	Data  []byte
}

// executeAll sends every request in one sendmsg and reads one ack per request. It returns
// one error per request (nil: done).
func (r *socket) executeAll(reqs []request) ([]error, error) {
	var buf []byte
	first := r.seq.Load() + 1
	for _, q := range reqs {
		buf = appendMessage(buf, q.Type, q.Flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK, r.seq.Add(1), q.Data)
	}
	if err := r.send(buf); err != nil {
		return nil, err
	}
	errs := make([]error, len(reqs))
	got := 0
	err := r.receive(func(h netlink.Header, body []byte) (bool, error) {
		i := int(h.Sequence - first)
		if h.Type != netlink.Error || i < 0 || i >= len(reqs) {
			return false, nil
		}
		e, err := errno(body)
		if err != nil {
			return true, err
		}
		if e != 0 {
			errs[i] = e
		}
		got++
		return got == len(reqs), nil
	})
	if err != nil {
		return nil, err
	}
	return errs, nil
}
