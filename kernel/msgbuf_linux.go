package kernel

import (
	"encoding/binary"
	"sync"

	"golang.org/x/sys/unix"
)

// msgBuf is a run of netlink messages encoded into one buffer, as they go out in one
// sendmsg: each message's header (its length, type and flags final; its sequence number
// stamped at send, from the socket's counter), its payload and padding. Attributes are
// written in place: nested ones get their length when they close. Nothing is encoded
// twice, and a transaction costs one buffer and one slice of offsets.
type msgBuf struct {
	buf    []byte
	offs   []int // where each message starts
	open   int   // where the message being written starts; -1: none
	pooled bool
}

// Buffers of up to pooledSize bytes (every pod's and node's table, with a few hundred
// pod IPs) are reused: a fresh one per apply was most of what the encoding allocated
// (zeroed, and paged in on this kind of VM).
const pooledSize = 64 << 10

var msgBufPool = sync.Pool{New: func() any {
	return &msgBuf{buf: make([]byte, 0, 16<<10), offs: make([]int, 0, 64)}
}}

// newMsgBuf returns an empty msgBuf with room for about size bytes and msgs messages.
// Give it back with release once sent.
func newMsgBuf(size, msgs int) *msgBuf {
	if size > pooledSize {
		return &msgBuf{buf: make([]byte, 0, size), offs: make([]int, 0, msgs), open: -1}
	}
	m := msgBufPool.Get().(*msgBuf)
	m.buf, m.offs, m.open, m.pooled = m.buf[:0], m.offs[:0], -1, true
	return m
}

// release gives a pooled buffer back; m must not be used after.
func (m *msgBuf) release() {
	if m.pooled && cap(m.buf) <= pooledSize {
		m.pooled = false
		msgBufPool.Put(m)
	}
}

// count is the number of messages.
func (m *msgBuf) count() int { return len(m.offs) }

// begin starts a message of type typ with flags; end closes it.
func (m *msgBuf) begin(typ, flags uint16) {
	m.open = len(m.buf)
	m.offs = append(m.offs, m.open)
	var h [unix.NLMSG_HDRLEN]byte // length at end, sequence at stamp, port id 0
	binary.NativeEndian.PutUint16(h[4:6], typ)
	binary.NativeEndian.PutUint16(h[6:8], flags)
	m.buf = append(m.buf, h[:]...)
}

// end closes the message: its length is what was written (as appendMessage counts it),
// and padding follows.
func (m *msgBuf) end() {
	binary.NativeEndian.PutUint32(m.buf[m.open:], uint32(len(m.buf)-m.open))
	m.open = -1
	m.pad()
}

// raw appends payload bytes as they are (a request's whole payload, a fixed header).
func (m *msgBuf) raw(b []byte) { m.buf = append(m.buf, b...) }

func (m *msgBuf) pad() {
	for len(m.buf)%4 != 0 {
		m.buf = append(m.buf, 0)
	}
}

// attrHeader appends an attribute header. As github.com/mdlayher/netlink does, the length
// is kept in 16 bits whatever it is: checkMessage refuses, before any send, a message
// that could hold a longer attribute.
func (m *msgBuf) attrHeader(typ uint16, length int) {
	m.buf = binary.NativeEndian.AppendUint16(m.buf, uint16(length))
	m.buf = binary.NativeEndian.AppendUint16(m.buf, typ)
}

func (m *msgBuf) attr(typ uint16, data []byte) {
	m.attrHeader(typ, 4+len(data))
	m.buf = append(m.buf, data...)
	m.pad()
}

// attrString appends s and its terminating NUL.
func (m *msgBuf) attrString(typ uint16, s string) {
	m.attrHeader(typ, 4+len(s)+1)
	m.buf = append(m.buf, s...)
	m.buf = append(m.buf, 0)
	m.pad()
}

func (m *msgBuf) attrU32(typ uint16, v uint32) { // big-endian, as nftables wants numbers
	m.attrHeader(typ, 8)
	m.buf = binary.BigEndian.AppendUint32(m.buf, v)
}

func (m *msgBuf) attrU64(typ uint16, v uint64) {
	m.attrHeader(typ, 12)
	m.buf = binary.BigEndian.AppendUint64(m.buf, v)
}

// attrNativeU32 is for rtnetlink, whose numbers are in the host's order.
func (m *msgBuf) attrNativeU32(typ uint16, v uint32) {
	m.attrHeader(typ, 8)
	m.buf = binary.NativeEndian.AppendUint32(m.buf, v)
}

// nest opens a nested attribute (typ carries NLA_F_NESTED if wanted) and returns where it
// starts, for unnest.
func (m *msgBuf) nest(typ uint16) int {
	at := len(m.buf)
	m.attrHeader(typ, 0)
	return at
}

func (m *msgBuf) unnest(at int) {
	binary.NativeEndian.PutUint16(m.buf[at:], uint16(len(m.buf)-at))
}

// message returns message i's type, flags and payload (after the netlink header).
func (m *msgBuf) message(i int) (typ, flags uint16, payload []byte) {
	start := m.offs[i]
	end := len(m.buf)
	if i+1 < len(m.offs) {
		end = m.offs[i+1]
	}
	h := m.buf[start:]
	l := int(binary.NativeEndian.Uint32(h[0:4]))
	return binary.NativeEndian.Uint16(h[4:6]), binary.NativeEndian.Uint16(h[6:8]), m.buf[start+unix.NLMSG_HDRLEN : min(start+l, end)]
}

// setFlags ORs flags into message i's header.
func (m *msgBuf) setFlags(i int, flags uint16) {
	h := m.buf[m.offs[i]+6:]
	binary.NativeEndian.PutUint16(h, binary.NativeEndian.Uint16(h)|flags)
}

// stamp numbers the messages from first on.
func (m *msgBuf) stamp(first uint32) {
	for i, at := range m.offs {
		binary.NativeEndian.PutUint32(m.buf[at+8:], first+uint32(i))
	}
}
