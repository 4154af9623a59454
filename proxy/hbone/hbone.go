// Package hbone is the HBONE transport of the node proxy: TCP tunnelled over mutual-TLS
// HTTP/2 CONNECT on port 15008, as Istio ambient's ztunnel does it (docs/hbone.md).
//
// It moves bytes and nothing else. Policy, network namespaces and workload lookup come in
// through callbacks: the Server's Dialer decides and connects each tunnel, the Pool's Dial
// opens each pooled connection; TLS configurations come from the caller.
//
// One CONNECT carries one proxied TCP connection. Both directions half-close independently
// (END_STREAM one way is FIN the other) and resets propagate (RST_STREAM one way is TCP RST the
// other). Both ends are this package's own HTTP/2 on x/net's framer and HPACK. The server:
// x/net's http2.Server cannot end a response while it still reads the request (it answers a
// handler that returns early with RST_STREAM NO_ERROR), nor reset a stream with CONNECT_ERROR,
// and a TCP tunnel needs both. The client: x/net's ClientConn hands every response DATA frame
// from its read loop to the reading goroutine, a thread wake-up per round trip; ours writes
// small ones to the tunnel's destination from the read loop (client.go).
package hbone

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/http2"
)

// HTTP/2 parameters of docs/hbone.md#http2-settings-and-pooling.
const (
	streamWindow       = 4 << 20  // per-stream receive window
	connWindow         = 16 << 20 // per-connection receive window
	maxFrameSize       = 1 << 20  // largest frame we accept
	defaultMaxStreams  = 100      // concurrent streams per connection
	defaultReadIdle    = 10 * time.Second
	defaultPingTimeout = 20 * time.Second
	defaultIdleTimeout = 5 * time.Minute
	maxHeaderListSize  = 64 << 10 // room for a large W3C baggage header
	initialWindow      = 65535    // RFC 9113 initial window, before SETTINGS
)

// ErrReset reports that a tunnel ended abnormally: the peer reset the stream or the HTTP/2
// connection under it died. A proxy answers it by resetting its own side (SO_LINGER 0).
var ErrReset = errors.New("hbone: tunnel reset")

// StatusError is a CONNECT that the server refused.
type StatusError struct {
	Code int // HTTP status: 400, 401, 503, ...
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: CONNECT refused: %d %s", e.Code, http.StatusText(e.Code))
}

// IsReset reports whether err says the tunnel was reset rather than closed in order.
func IsReset(err error) bool { return errors.Is(err, ErrReset) }

// resetError wraps the cause of an abnormal end so that errors.Is(err, ErrReset) holds and
// the cause (an http2.StreamError with its code, say) stays reachable.
func resetError(cause error) error {
	if cause == nil || errors.Is(cause, ErrReset) {
		return cause
	}
	return fmt.Errorf("%w: %w", ErrReset, cause)
}

// ParseForwardedFor returns the address of the first for= node of a Forwarded header
// (RFC 7239), which is where HBONE clients put the original client address: `for="ip:port"`,
// `for="[v6]:port"`, or an address without a port (port 0).
func ParseForwardedFor(v string) (netip.AddrPort, bool) {
	for _, elem := range strings.Split(v, ",") {
		for _, pair := range strings.Split(elem, ";") {
			k, val, found := strings.Cut(strings.TrimSpace(pair), "=")
			if !found || !strings.EqualFold(strings.TrimSpace(k), "for") {
				continue
			}
			val = strings.Trim(strings.TrimSpace(val), `"`)
			if ap, err := netip.ParseAddrPort(val); err == nil {
				return ap, true
			}
			if a, err := netip.ParseAddr(strings.Trim(val, "[]")); err == nil {
				return netip.AddrPortFrom(a, 0), true
			}
			return netip.AddrPort{}, false
		}
	}
	return netip.AddrPort{}, false
}

// streamErrCode extracts the HTTP/2 error code of a stream reset, if err carries one.
func streamErrCode(err error) (http2.ErrCode, bool) {
	var se http2.StreamError
	if errors.As(err, &se) {
		return se.Code, true
	}
	return 0, false
}
