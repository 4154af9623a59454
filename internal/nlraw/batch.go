package nlraw

import (
	"encoding/binary"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// SendBatch sends an nfnetlink batch (BATCH_BEGIN ... BATCH_END) in one sendmsg, with
// NLM_F_ECHO cleared everywhere and NLM_F_ACK only on the last message before BATCH_END,
// then reads until that message's answer: one send and, on success, one receive. The
// kernel still answers every failing message, so the first error is the first failure.
// (google/nftables v0.3.0 asks for an echo and an ack of every message, each read through
// the runtime poller: on these machines that was most of a fresh enroll's time.)
func (r *Conn) SendBatch(msgs []netlink.Message) error {
	size := 0
	for _, m := range msgs {
		size += nlmsgAlign(unix.NLMSG_HDRLEN + len(m.Data))
	}
	buf := make([]byte, 0, size)
	last := len(msgs) - 2 // the message before BATCH_END
	var lastSeq uint32
	for i, m := range msgs {
		seq := r.seq.Add(1)
		flags := uint16(m.Header.Flags) &^ (unix.NLM_F_ECHO | unix.NLM_F_ACK)
		if i == last {
			flags |= unix.NLM_F_ACK
			lastSeq = seq
		}
		l := unix.NLMSG_HDRLEN + len(m.Data)
		var h [unix.NLMSG_HDRLEN]byte
		binary.NativeEndian.PutUint32(h[0:4], uint32(l))
		binary.NativeEndian.PutUint16(h[4:6], uint16(m.Header.Type))
		binary.NativeEndian.PutUint16(h[6:8], flags)
		binary.NativeEndian.PutUint32(h[8:12], seq)
		buf = append(buf, h[:]...)
		buf = append(buf, m.Data...)
		for len(buf)%unix.NLMSG_ALIGNTO != 0 {
			buf = append(buf, 0)
		}
	}
	if err := unix.Sendto(r.fd, buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	var firstErr error
	for {
		n, _, err := unix.Recvfrom(r.fd, *r.buf, 0)
		if err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		b := (*r.buf)[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			l := int(binary.NativeEndian.Uint32(b[0:4]))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return fmt.Errorf("netlink: malformed message of length %d", l)
			}
			typ := binary.NativeEndian.Uint16(b[4:6])
			seq := binary.NativeEndian.Uint32(b[8:12])
			body := b[unix.NLMSG_HDRLEN:l]
			b = b[min(nlmsgAlign(l), len(b)):]
			if typ != unix.NLMSG_ERROR || len(body) < 4 {
				continue
			}
			if errno := -int32(binary.NativeEndian.Uint32(body[0:4])); errno != 0 && firstErr == nil {
				firstErr = unix.Errno(errno)
				if errno == int32(unix.EPERM) || errno == int32(unix.ENOBUFS) {
					return firstErr // the kernel sends nothing more
				}
			}
			if seq == lastSeq {
				return firstErr
			}
		}
	}
}
