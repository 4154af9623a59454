package nlraw

import (
	"github.com/mdlayher/netlink"
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
