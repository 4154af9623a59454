package zds

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"google.golang.org/protobuf/proto"
)

const (
	// maxPacket bounds one message. Real ones are a few hundred bytes; anything longer is
	// truncated by the kernel and answered as malformed.
	maxPacket = 64 << 10
	// maxFDs is the ancillary room per packet. A peer sending more gets MSG_CTRUNC; the kernel
	// closes the descriptors that did not fit, and we close the ones that did.
	maxFDs = 16
)

// errNetNS marks a failure to attach the netns descriptor (for instance the file was closed):
// nothing was sent and the connection is unaffected.
var errNetNS = errors.New("netns descriptor")

// packetConn is one end of a ZDS connection: one protobuf message per SOCK_SEQPACKET packet.
// read is for one goroutine at a time, write for one (possibly another) at a time.
type packetConn struct {
	c   *net.UnixConn
	buf []byte
	oob []byte
}

func newPacketConn(c *net.UnixConn) *packetConn {
	return &packetConn{
		c:   c,
		buf: make([]byte, maxPacket),
		oob: make([]byte, syscall.CmsgSpace(4*maxFDs)),
	}
}

// read reads one packet. The descriptors that came with it are returned whatever the error, so
// that the caller can close them. An error wrapping errMalformed leaves the connection usable.
func (p *packetConn) read() ([]byte, []*os.File, error) {
	n, oobn, flags, _, err := p.c.ReadMsgUnix(p.buf, p.oob)
	files, perr := parseRights(p.oob[:oobn])
	switch {
	case err != nil:
		// recvmsg returns 0 both for EOF and for an empty packet, and Go reports io.EOF for both.
		// Ancillary data can only come with a packet, so this one is a (malformed) message.
		if errors.Is(err, io.EOF) && oobn > 0 {
			return nil, files, malformed("empty packet with ancillary data")
		}
		return nil, files, err
	case perr != nil:
		return nil, files, malformed("ancillary data: %v", perr)
	case flags&syscall.MSG_TRUNC != 0:
		return nil, files, malformed("packet longer than %d bytes", maxPacket)
	case flags&syscall.MSG_CTRUNC != 0:
		// The kernel also truncates when it cannot install a passed descriptor: this
		// process at its open-file limit (EMFILE) looks the same as a peer sending too many.
		return nil, files, malformed("ancillary data truncated: more than %d descriptors sent, or this process is at its open-file limit (RLIMIT_NOFILE)", maxFDs)
	}
	return append([]byte(nil), p.buf[:n]...), files, nil
}

// parseRights turns the SCM_RIGHTS descriptors in oob into files (close-on-exec already:
// ReadMsgUnix receives with MSG_CMSG_CLOEXEC). Other control messages are ignored.
func parseRights(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var files []*os.File
	var firstErr error
	for i := range msgs {
		m := &msgs[i]
		if m.Header.Level != syscall.SOL_SOCKET || m.Header.Type != syscall.SCM_RIGHTS {
			continue
		}
		fds, err := syscall.ParseUnixRights(m)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "zds-netns"))
		}
	}
	return files, firstErr
}

// write sends m as one packet, with netns (if not nil) as its one SCM_RIGHTS descriptor. The
// caller keeps ownership of netns. deadline bounds the send (a peer that stops reading fills the
// socket buffer).
func (p *packetConn) write(m proto.Message, netns *os.File, deadline time.Time) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("marshal: %w", err)
	}
	if len(b) == 0 {
		// An empty packet reads as EOF on the other side. None of our messages encode empty.
		return fmt.Errorf("refusing to send an empty %T", m)
	}
	if err := p.c.SetWriteDeadline(deadline); err != nil {
		return err
	}
	if netns == nil {
		_, _, err := p.c.WriteMsgUnix(b, nil, nil)
		return err
	}
	rc, err := netns.SyscallConn()
	if err != nil {
		return fmt.Errorf("%w: %w", errNetNS, err)
	}
	var werr error
	// Control holds a reference on the descriptor for the duration of the send, so a concurrent
	// Close cannot let its number be reused by an unrelated file that we would then hand over.
	if err := rc.Control(func(fd uintptr) {
		_, _, werr = p.c.WriteMsgUnix(b, syscall.UnixRights(int(fd)), nil)
	}); err != nil {
		return fmt.Errorf("%w: %w", errNetNS, err)
	}
	return werr
}
