package kernel

import (
	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
)

// This file is the one place that uses google/nftables' test-only dial hook
// (nftables.WithTestDial, which hands every netlink exchange of a Conn to a function
// instead of a socket).
//
// Why: google/nftables is a good encoder of nftables objects and expressions, but a poor
// transport for us. It opens a socket per Flush in the calling thread's namespace, asks
// for an echo and an ack of every message, and reads each through the runtime poller.
// Through the hook it only queues and encodes; Flush hands the finished batch to send,
// which puts it on our own blocking socket (socket.sendBatch: one sendmsg, one receive).
//
// What we rely on, pinned by encoder_linux_test.go: Flush passes the whole transaction to
// the hook once, as BATCH_BEGIN, the queued messages in order, BATCH_END; it then asks
// the hook for an answer per message by calling it with a nil request, and an ack (an
// NLMSG_ERROR with errno 0) for each satisfies it. If an upgrade of google/nftables
// changes any of that, the test fails before an apply does.
//
// send's error does not go back through google/nftables: its test connection would return
// it once per queued message, and Flush would join them (one line per message: 90,000
// lines for a large pod, issue #11). The hook keeps the error and encoder.Flush returns
// it, once and as send made it.

// encoder is a google/nftables Conn that only queues and encodes; Flush hands the queued
// transaction, as one batch, to send.
type encoder struct {
	*nftables.Conn
	sendErr error
}

// newEncoder returns an encoder whose Flush encodes the queued transaction and hands it,
// as one batch, to send; Flush returns send's error.
func newEncoder(send func(batch []netlink.Message) error) (*encoder, error) {
	e := &encoder{}
	conn, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		// google/nftables reads an answer per message; the batch has been answered whole.
		ack := []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 4)}}
		if req != nil {
			e.sendErr = send(req)
		}
		return ack, nil
	}))
	if err != nil {
		return nil, err
	}
	e.Conn = conn
	return e, nil
}

// Flush encodes the queued messages, sends them as one batch, and returns the encoding's
// or the send's error. With nothing queued it sends nothing.
func (e *encoder) Flush() error {
	e.sendErr = nil
	if err := e.Conn.Flush(); err != nil {
		return err
	}
	err := e.sendErr
	e.sendErr = nil
	return err
}
