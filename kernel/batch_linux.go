package kernel

import (
	"errors"
	"fmt"

	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// maxMessagePayload is the most bytes of attributes (after the nfgenmsg header) that one
// message of a batch may carry. A netlink attribute's length is 16 bits and its encoder
// (msgBuf.attrHeader, like mdlayher/netlink's) keeps only the low 16 bits of a longer
// one; a message whose attributes fit in 16 bits in total cannot hold a wrapped one. Every message is checked before a batch is
// sent (checkMessage), so an oversized list is refused here instead of being cut short
// by the kernel (issue #11: 2,000 pod IPs came back as 907).
const maxMessagePayload = 0xffff

// largeBatch is the size above which a batch gets socket buffers sized to it
// (prepareLarge). Below it, the defaults (about 200 KiB) are ample and nothing is paid.
const largeBatch = 16 << 10

// checkMessage refuses a message too large to be encoded faithfully.
func checkMessage(data []byte) error {
	if len(data) > 4+maxMessagePayload {
		return fmt.Errorf("%d bytes of attributes, more than a netlink attribute can describe (%d)", len(data)-4, maxMessagePayload)
	}
	return nil
}

// sendBatch sends an nfnetlink batch (BATCH_BEGIN ... BATCH_END, as encodeApply and its
// kin make it) in one sendmsg, numbered from the socket's counter, then reads until the
// answer to the message before BATCH_END: one send and, on success, one receive. The
// kernel still answers every failing message; the error returned names the first and
// counts them all (*batchError), in a few lines whatever the batch's size.
func (r *socket) sendBatch(b *batch) error {
	n := b.count()
	for i := range n {
		typ, _, payload := b.message(i)
		if err := checkMessage(payload); err != nil {
			return fmt.Errorf("message %d of %d (%s): %w: nothing sent", i, n-2, describe(typ, payload), err)
		}
	}
	firstSeq := r.seq.Add(uint32(n)) - uint32(n) + 1
	lastSeq := firstSeq + uint32(n) - 2 // the message before BATCH_END
	b.stamp(firstSeq)
	if len(b.buf) > largeBatch {
		r.prepareLarge(len(b.buf), n)
	}
	if err := r.send(b.buf); err != nil {
		if errors.Is(err, unix.EMSGSIZE) {
			if r.sndbuf == 0 {
				r.sndbuf, _ = unix.GetsockoptInt(r.fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
			}
			return fmt.Errorf("batch of %d messages, %d bytes, larger than the socket's send buffer (%d bytes; raising it needs CAP_NET_ADMIN or net.core.wmem_max): %w", n-2, len(b.buf), r.sndbuf, err)
		}
		return err
	}
	var failed *batchError
	r.lostData = false
	err := r.receive(func(h netlink.Header, body []byte) (bool, error) {
		if h.Type != netlink.Error || h.Sequence < firstSeq || h.Sequence > lastSeq+1 {
			return false, nil // not about this batch
		}
		e, err := errno(body)
		if err != nil {
			return true, err
		}
		if e != 0 {
			if failed == nil {
				i := int(h.Sequence - firstSeq)
				typ, _, payload := b.message(i)
				failed = &batchError{Errno: e, Index: i, Messages: n - 2, What: describe(typ, payload)}
			}
			failed.Failed++
		}
		switch {
		case e == unix.EPERM || e == unix.ENOBUFS:
			return true, nil // the kernel sends nothing more
		case e != 0 && (h.Sequence == firstSeq || h.Sequence == lastSeq+1):
			return true, nil // the batch as a whole was refused (at BATCH_BEGIN or BATCH_END)
		}
		return h.Sequence == lastSeq, nil
	})
	if failed != nil {
		if err != nil || r.lostData {
			// The receive buffer overflowed (ENOBUFS) or cut an answer: some answers
			// are lost, the count is a lower bound. The batch failed all the same.
			failed.Lost = true
		}
		r.lostData = false
		return failed
	}
	if err != nil {
		return err
	}
	return nil
}

// sendOnce is sendBatch of a batch that is then released.
func (r *socket) sendOnce(b *batch) error {
	defer b.release()
	return r.sendBatch(b)
}

// batchError is the kernel's refusal of a batch: the first message it refused, and how
// many it refused. Errors.Is matches the first refusal's errno.
type batchError struct {
	Errno    unix.Errno
	Index    int    // of the first refused message: 1 is the first after BATCH_BEGIN
	What     string // what that message writes
	Messages int    // in the batch, BATCH_BEGIN and BATCH_END not counted
	Failed   int    // refusals read
	Lost     bool   // some answers were lost: Failed is a lower bound
}

func (e *batchError) Error() string {
	s := fmt.Sprintf("message %d of %d (%s): %v", e.Index, e.Messages, e.What, e.Errno)
	switch {
	case e.Lost:
		s += fmt.Sprintf(" (at least %d messages refused; further answers were lost)", e.Failed)
	case e.Failed > 1:
		s += fmt.Sprintf(" (%d messages refused)", e.Failed)
	}
	return s
}

func (e *batchError) Unwrap() error { return e.Errno }

// prepareLarge gets the socket ready for a batch of size bytes and msgs messages, as nft
// does: a send buffer that holds the whole batch (a netlink send larger than the buffer
// fails with EMSGSIZE), a receive buffer with room for an answer per message (the kernel
// answers every refused message), and answers that do not echo the refused message
// (NETLINK_CAP_ACK), so that they stay small. SO_SNDBUFFORCE and SO_RCVBUFFORCE need
// CAP_NET_ADMIN; without it SO_SNDBUF and SO_RCVBUF raise the buffers up to the
// net.core limits. Errors are left for the send to report.
func (r *socket) prepareLarge(size, msgs int) {
	if !r.capAck {
		r.capAck = unix.SetsockoptInt(r.fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1) == nil
	}
	grow := func(cur *int, force, plain, want int) {
		if *cur == 0 {
			*cur, _ = unix.GetsockoptInt(r.fd, unix.SOL_SOCKET, plain)
		}
		if *cur >= want {
			return
		}
		// The kernel doubles the value it is given (for its bookkeeping) and gives back
		// the doubled value.
		if unix.SetsockoptInt(r.fd, unix.SOL_SOCKET, force, want) != nil {
			unix.SetsockoptInt(r.fd, unix.SOL_SOCKET, plain, want)
		}
		*cur, _ = unix.GetsockoptInt(r.fd, unix.SOL_SOCKET, plain)
	}
	grow(&r.sndbuf, unix.SO_SNDBUFFORCE, unix.SO_SNDBUF, size+4096)
	// An answer costs about 1 KiB of receive buffer (its socket buffer's true size).
	grow(&r.rcvbuf, unix.SO_RCVBUFFORCE, unix.SO_RCVBUF, min(msgs*1024, 32<<20))
}

// msgVerbs names the messages our batches hold.
var msgVerbs = map[int]string{
	unix.NFT_MSG_NEWTABLE: "add table", unix.NFT_MSG_DELTABLE: "delete table",
	unix.NFT_MSG_NEWSET: "add set", unix.NFT_MSG_NEWSETELEM: "add elements to set",
	unix.NFT_MSG_DELSETELEM: "delete elements from set", unix.NFT_MSG_NEWCHAIN: "add chain",
	unix.NFT_MSG_NEWRULE: "add rule to chain",
}

// describe says what a message of a batch writes, in one short line: its kind and the
// table, set or chain it names; for a rule, its stamp; for elements, how many.
func describe(typ uint16, payload []byte) string {
	switch typ {
	case unix.NFNL_MSG_BATCH_BEGIN:
		return "batch begin"
	case unix.NFNL_MSG_BATCH_END:
		return "batch end"
	}
	verb, ok := msgVerbs[int(typ&0xff)]
	if typ>>8 != unix.NFNL_SUBSYS_NFTABLES || !ok {
		return fmt.Sprintf("message type %#04x", typ)
	}
	if len(payload) < 4 {
		return verb
	}
	ad, err := netlink.NewAttributeDecoder(payload[4:])
	if err != nil {
		return verb
	}
	var name, stamp string
	elems := 0
	for ad.Next() {
		switch int(typ & 0xff) {
		case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE:
			if ad.Type() == unix.NFTA_TABLE_NAME {
				name = ad.String()
			}
		case unix.NFT_MSG_NEWSET:
			if ad.Type() == unix.NFTA_SET_NAME {
				name = ad.String()
			}
		case unix.NFT_MSG_NEWCHAIN:
			if ad.Type() == unix.NFTA_CHAIN_NAME {
				name = ad.String()
			}
		case unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
			switch ad.Type() &^ unix.NLA_F_NESTED {
			case unix.NFTA_SET_ELEM_LIST_SET:
				name = ad.String()
			case unix.NFTA_SET_ELEM_LIST_ELEMENTS:
				if list, err := netlink.NewAttributeDecoder(ad.Bytes()); err == nil {
					for list.Next() {
						elems++
					}
				}
			}
		case unix.NFT_MSG_NEWRULE:
			switch ad.Type() {
			case unix.NFTA_RULE_CHAIN:
				name = ad.String()
			case unix.NFTA_RULE_USERDATA:
				stamp, _ = userdata.GetString(ad.Bytes(), stampType)
			}
		}
	}
	s := verb + " " + name
	if elems > 0 {
		s += fmt.Sprintf(", %d elements", elems)
	}
	if stamp != "" {
		s += ": " + stamp
	}
	return s
}
