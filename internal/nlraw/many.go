package nlraw

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// Request is one netlink message for ExecuteAll: type, flags (NLM_F_REQUEST|NLM_F_ACK are
// added) and payload.
type Request struct {
	Type  uint16
	Flags uint16
	Data  []byte
}

// ExecuteAll sends every request in one sendmsg and reads one ack per request. It returns
// one error per request (nil: done).
func (r *Conn) ExecuteAll(reqs []Request) ([]error, error) {
	var buf []byte
	first := r.seq.Load() + 1
	for _, q := range reqs {
		seq := r.seq.Add(1)
		l := unix.NLMSG_HDRLEN + len(q.Data)
		var h [unix.NLMSG_HDRLEN]byte
		binary.NativeEndian.PutUint32(h[0:4], uint32(l))
		binary.NativeEndian.PutUint16(h[4:6], q.Type)
		binary.NativeEndian.PutUint16(h[6:8], q.Flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
		binary.NativeEndian.PutUint32(h[8:12], seq)
		buf = append(buf, h[:]...)
		buf = append(buf, q.Data...)
		for len(buf)%unix.NLMSG_ALIGNTO != 0 {
			buf = append(buf, 0)
		}
	}
	if err := unix.Sendto(r.fd, buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("netlink send: %w", err)
	}
	errs := make([]error, len(reqs))
	for got := 0; got < len(reqs); {
		n, _, err := unix.Recvfrom(r.fd, *r.buf, 0)
		if err != nil {
			return nil, fmt.Errorf("netlink receive: %w", err)
		}
		b := (*r.buf)[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			l := int(binary.NativeEndian.Uint32(b[0:4]))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return nil, fmt.Errorf("netlink: malformed message of length %d", l)
			}
			typ := binary.NativeEndian.Uint16(b[4:6])
			seq := binary.NativeEndian.Uint32(b[8:12])
			body := b[unix.NLMSG_HDRLEN:l]
			b = b[min(nlmsgAlign(l), len(b)):]
			i := int(seq - first)
			if typ != unix.NLMSG_ERROR || len(body) < 4 || i < 0 || i >= len(reqs) {
				continue
			}
			if errno := -int32(binary.NativeEndian.Uint32(body[0:4])); errno != 0 {
				errs[i] = unix.Errno(errno)
			}
			got++
		}
	}
	return errs, nil
}
