package kernel

import (
	"bytes"
	"errors"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// These tests pin what the reference encoding (google_linux_test.go, which the direct
// encoding is compared with) relies on in google/nftables' test dial hook. They need no
// root: nothing reaches a socket.

func nftMsg(typ int) netlink.HeaderType {
	return netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | typ)
}

// queueEveryKind queues one message of each kind our transactions use and returns their
// types in order.
func queueEveryKind(t *testing.T, enc *nftables.Conn) []netlink.HeaderType {
	t.Helper()
	nt := nfTable("t")
	enc.AddTable(nt)
	enc.DelTable(nt)
	enc.AddTable(nt)
	set := nfSet(nt, &ruleset.Set{Name: "s", Type: ruleset.SetTypeIPv4Addr}, 1)
	if err := enc.AddSet(set, []nftables.SetElement{{Key: []byte{10, 0, 0, 1}}}); err != nil {
		t.Fatal(err)
	}
	ch := enc.AddChain(&nftables.Chain{Name: "c", Table: nt})
	enc.AddRule(&nftables.Rule{Table: nt, Chain: ch, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}})
	if err := enc.SetDeleteElements(set, []nftables.SetElement{{Key: []byte{10, 0, 0, 1}}}); err != nil {
		t.Fatal(err)
	}
	if err := enc.SetAddElements(set, []nftables.SetElement{{Key: []byte{10, 0, 0, 1}, Comment: "uid"}}); err != nil {
		t.Fatal(err)
	}
	return []netlink.HeaderType{
		nftMsg(unix.NFT_MSG_NEWTABLE), nftMsg(unix.NFT_MSG_DELTABLE), nftMsg(unix.NFT_MSG_NEWTABLE),
		nftMsg(unix.NFT_MSG_NEWSET), nftMsg(unix.NFT_MSG_NEWSETELEM), nftMsg(unix.NFT_MSG_NEWCHAIN),
		nftMsg(unix.NFT_MSG_NEWRULE), nftMsg(unix.NFT_MSG_DELSETELEM), nftMsg(unix.NFT_MSG_NEWSETELEM),
	}
}

// A queued transaction reaches send once, whole, framed as a batch; Flush succeeds on
// send's success (the hook then acks every answer google/nftables waits for).
func TestEncoderSendsOneBatch(t *testing.T) {
	var batches [][]netlink.Message
	enc, err := newEncoder(func(b []netlink.Message) error {
		batches = append(batches, b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := queueEveryKind(t, enc.Conn)
	if err := enc.Flush(); err != nil {
		t.Fatalf("Flush: %v, want success after one ack", err)
	}
	if len(batches) != 1 {
		t.Fatalf("send called with %d batches, want 1", len(batches))
	}
	b := batches[0]
	if len(b) != len(want)+2 {
		t.Fatalf("batch of %d messages, want BATCH_BEGIN, %d queued, BATCH_END", len(b), len(want))
	}
	// The batch messages carry the nftables subsystem as their resource id.
	batchHeader := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}
	if first := b[0]; first.Header.Type != unix.NFNL_MSG_BATCH_BEGIN || !bytes.Equal(first.Data, batchHeader) {
		t.Errorf("first message: type %#x data %x, want BATCH_BEGIN %x", first.Header.Type, first.Data, batchHeader)
	}
	if last := b[len(b)-1]; last.Header.Type != unix.NFNL_MSG_BATCH_END || !bytes.Equal(last.Data, batchHeader) {
		t.Errorf("last message: type %#x data %x, want BATCH_END %x", last.Header.Type, last.Data, batchHeader)
	}
	for i, typ := range want {
		m := b[i+1]
		if m.Header.Type != typ {
			t.Errorf("message %d: type %#x, want %#x", i+1, m.Header.Type, typ)
		}
		if len(m.Data) < 4 || m.Data[0] != unix.NFPROTO_INET {
			t.Errorf("message %d: no nfgenmsg header of family inet: %x", i+1, m.Data[:min(4, len(m.Data))])
		}
	}
	// Queued messages are sent once: a second Flush has nothing to send.
	if err := enc.Flush(); err != nil || len(batches) != 1 {
		t.Errorf("second Flush: %v, %d batches sent in all, want nil and 1", err, len(batches))
	}
}

// An error from send comes out of Flush once, as send made it (not once per queued
// message: issue #11), still matching with errors.Is: Delete tells a table deleted
// meanwhile (ENOENT) from a failure that way.
func TestEncoderFlushReturnsSendError(t *testing.T) {
	for _, sendErr := range []error{unix.ENOENT, unix.EPERM, unix.ENOBUFS, errors.New("netlink send: broken")} {
		t.Run(sendErr.Error(), func(t *testing.T) {
			calls := 0
			enc, err := newEncoder(func([]netlink.Message) error {
				calls++
				return sendErr
			})
			if err != nil {
				t.Fatal(err)
			}
			queueEveryKind(t, enc.Conn)
			err = enc.Flush()
			if !errors.Is(err, sendErr) {
				t.Errorf("Flush: %v, want an error wrapping %v", err, sendErr)
			}
			if err != nil && err.Error() != sendErr.Error() {
				t.Errorf("Flush: %q, want send's error as is: %q", err, sendErr)
			}
			// The encoder is reusable: the next transaction does not see the old error.
			queueEveryKind(t, enc.Conn)
			calls, sendErr = 0, nil
			if err := enc.Flush(); err != nil {
				t.Errorf("second Flush: %v, want nil", err)
			}
			if calls != 1 {
				t.Errorf("send called %d times for the second batch, want 1", calls)
			}
		})
	}
}

// The user data layout ruleset's validation budgets for: a TLV (type, length, value,
// NUL) for the comment, if any, and one for the stamp.
func TestRuleUserDataLayout(t *testing.T) {
	for _, comment := range []string{"", "a comment"} {
		body := "meta l4proto tcp accept"
		want := 2 + len(body) + 1
		if comment != "" {
			want += 2 + len(comment) + 1
		}
		if got := len(ruleUserData(ruleset.Rule{Comment: comment}, body)); got != want {
			t.Errorf("comment %q: %d bytes of user data, want %d", comment, got, want)
		}
	}
}
