package kernel

import (
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// sendBatch sends an nfnetlink batch (BATCH_BEGIN ... BATCH_END) in one sendmsg, framed by
// frameBatch, then reads until the answer to the message before BATCH_END: one send and,
// on success, one receive. The kernel still answers every failing message, so the first
// error is the first failure. (google/nftables v0.3.0 asks for an echo and an ack of
// every message, each read through the runtime poller: on these machines that was most
// of a fresh enroll's time.)
func (r *socket) sendBatch(msgs []netlink.Message) error {
	n := uint32(len(msgs))
	firstSeq := r.seq.Add(n) - n + 1
	lastSeq := firstSeq + n - 2 // the message before BATCH_END
	if err := r.send(frameBatch(msgs, firstSeq)); err != nil {
		return err
	}
	var first error
	err := r.receive(func(h netlink.Header, body []byte) (bool, error) {
		if h.Type != netlink.Error || h.Sequence < firstSeq || h.Sequence > lastSeq+1 {
			return false, nil // not about this batch
		}
		e, err := errno(body)
		if err != nil {
			return true, err
		}
		if e != 0 && first == nil {
			first = e
		}
		switch {
		case e == unix.EPERM || e == unix.ENOBUFS:
			return true, nil // the kernel sends nothing more
		case e != 0 && (h.Sequence == firstSeq || h.Sequence == lastSeq+1):
			return true, nil // the batch as a whole was refused (at BATCH_BEGIN or BATCH_END)
		}
		return h.Sequence == lastSeq, nil
	})
	if err != nil {
		return err
	}
	return first
}

// frameBatch encodes the batch as the bytes sendBatch sends: the messages numbered from
// firstSeq on, NLM_F_ECHO cleared everywhere and NLM_F_ACK only on the last message
// before BATCH_END, whatever the encoder asked for.
func frameBatch(msgs []netlink.Message, firstSeq uint32) []byte {
	var buf []byte
	last := len(msgs) - 2 // the message before BATCH_END
	for i, m := range msgs {
		flags := uint16(m.Header.Flags) &^ (unix.NLM_F_ECHO | unix.NLM_F_ACK)
		if i == last {
			flags |= unix.NLM_F_ACK
		}
		buf = appendMessage(buf, uint16(m.Header.Type), flags, firstSeq+uint32(i), m.Data)
	}
	return buf
}
