package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The HTTP/2 client side of HBONE: one h2Client per pooled connection, speaking just
// enough HTTP/2 for CONNECT tunnels on x/net's Framer and HPACK, the mirror of the server
// (serverconn.go). x/net's ClientConn hands every DATA frame from its read loop to the
// goroutine reading the response body; on a machine with an idle core that is a thread
// wake-up per round trip. Here the read loop writes small DATA straight to the tunnel's
// destination when it takes them without blocking (clientstream.go), frames go out through
// the server's writer (framewriter.go), and a tunnel's goroutine writes its own frames.
// cc.mu (the frameWriter's) guards all connection and stream state.

var (
	errClientClosed = errors.New("hbone: client connection closed")
	errGoAway       = errors.New("hbone: stream not processed: server sent GOAWAY")
	errUnusable     = errors.New("hbone: client connection not usable")
)

// Streams assumed before the server's SETTINGS, and when they set no limit (as x/net's).
const (
	initialClientStreams = 100
	defaultClientStreams = 1000
)

type h2Client struct {
	frameWriter
	keepalive
	log       *slog.Logger
	start     time.Time
	lastRead  atomic.Int64  // time.Since(start) of the last frame read
	settingsc chan struct{} // closed at the server's first SETTINGS, or when the connection ends
	readDone  chan struct{}
	unusable  func() // the pool's: the connection takes no more streams (GOAWAY, its end)

	// Guarded by mu.
	henc2          *hpack.Encoder // request headers, encoded as they are queued (stream order)
	hreq           bytes.Buffer
	streams        map[uint32]*cstream
	nextID         uint32
	reserved       int    // slots promised by reserve, not yet opened
	maxStreams     uint32 // the server's MAX_CONCURRENT_STREAMS
	gotSettings    bool
	goAway         bool // GOAWAY received: no new streams
	idsOut         bool // stream IDs used up: no new streams
	closing        bool // Close called
	closed         bool // torn down
	err            error
	sendWindow     int64
	peerInit       int32
	peerFrame      uint32
	peerHeaderList uint32
	recvAvail      int32
	recvUnsent     int32
}

// clientState is what the pool needs to know of a connection (named as x/net's, which
// the tests read).
type clientState struct {
	Closed, Closing      bool
	MaxConcurrentStreams uint32
}

// unusable, if not nil, is called (cc.mu not held) when a GOAWAY comes or the connection
// ends: the pool can then retire a connection without tunnels at once.
func newH2Client(tc *tls.Conn, cork *bufConn, readIdle, pingTimeout time.Duration, log *slog.Logger, unusable func()) *h2Client {
	cc := &h2Client{
		log:            log,
		unusable:       unusable,
		keepalive:      keepalive{readIdle: readIdle, pingTimeout: pingTimeout},
		start:          time.Now(),
		settingsc:      make(chan struct{}),
		readDone:       make(chan struct{}),
		streams:        make(map[uint32]*cstream),
		nextID:         1,
		maxStreams:     initialClientStreams,
		sendWindow:     initialWindow,
		peerInit:       initialWindow,
		peerFrame:      16384,
		peerHeaderList: maxWindow,
		recvAvail:      connWindow,
	}
	cc.initWriter(tc, cork, []http2.Setting{
		{ID: http2.SettingEnablePush, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
	})
	// No dynamic table: a request's block then never depends on the ones before it, and
	// the server's HEADER_TABLE_SIZE never matters.
	cc.lazy = true
	cc.henc2 = hpack.NewEncoder(&cc.hreq)
	cc.henc2.SetMaxDynamicTableSizeLimit(0)
	cc.bw.WriteString(http2.ClientPreface) // goes out with the first batch, before any frame
	cc.mu.Lock()
	cc.enqueueCtrlLocked(wframe{kind: fkSettings})
	cc.enqueueCtrlLocked(wframe{kind: fkWindowUpdate, n: connWindow - initialWindow})
	cc.health = time.AfterFunc(readIdle, cc.healthCheck)
	cc.wakeLocked()
	cc.mu.Unlock()
	go cc.readLoop()
	return cc
}

func (cc *h2Client) now() time.Duration { return time.Since(cc.start) }

// waitSettings waits for the server's first SETTINGS: until then its stream limit is a
// guess. A server that rejects our certificate says so on the first read: an error here.
func (cc *h2Client) waitSettings(ctx context.Context) error {
	select {
	case <-cc.settingsc:
	case <-ctx.Done():
		return ctx.Err()
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if !cc.gotSettings {
		return cc.err
	}
	return nil
}

// reserve claims a stream slot for a roundTrip to come; false when the connection takes
// no more streams.
func (cc *h2Client) reserve() bool {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.closed || cc.closing || cc.goAway || cc.idsOut || len(cc.streams)+cc.reserved >= int(cc.maxStreams) {
		return false
	}
	// Stream IDs are 31 bits and never reused: a long-lived connection runs out after 2^30
	// streams. The reserved slots take the next IDs in turn; once this one would not fit,
	// the connection reports itself closing, so the pool retires it once its tunnels end
	// and dials a new one (a HEADERS with a bad ID would end it with every tunnel on it).
	if uint64(cc.nextID)+2*uint64(cc.reserved) > math.MaxInt32 {
		cc.idsOut = true
		return false
	}
	cc.reserved++
	return true
}

func (cc *h2Client) State() clientState {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return clientState{Closed: cc.closed, Closing: cc.closing || cc.goAway || cc.idsOut, MaxConcurrentStreams: cc.maxStreams}
}

// Close closes the connection at once; its streams fail as reset.
func (cc *h2Client) Close() error {
	cc.mu.Lock()
	cc.closing = true
	cc.mu.Unlock()
	// close_notify, but at most 250 ms stuck behind a dead peer (or a writer stuck on one)
	// before the socket is closed under it.
	t := time.AfterFunc(250*time.Millisecond, func() { cc.sock.Close() })
	cc.conn.Close()
	t.Stop()
	cc.sock.Close()
	<-cc.readDone
	return nil
}

// roundTrip opens a CONNECT stream on a slot taken by reserve and waits for the response
// headers. A non-200 response is a *StatusError.
func (cc *h2Client) roundTrip(ctx context.Context, authority string, h http.Header) (*cstream, error) {
	cc.mu.Lock()
	cc.reserved--
	if cc.closed || cc.closing || cc.goAway || cc.nextID > math.MaxInt32 {
		cc.mu.Unlock()
		return nil, errUnusable
	}
	block, err := cc.encodeRequestLocked(authority, h)
	if err != nil {
		cc.mu.Unlock()
		return nil, err
	}
	st := &cstream{
		cc:         cc,
		id:         cc.nextID,
		inMap:      true,
		recvAvail:  streamWindow,
		sendWindow: int64(cc.peerInit),
		readyc:     make(chan struct{}),
		recvReady:  make(chan struct{}, 1),
		sendReady:  make(chan struct{}, 1),
		wdone:      make(chan error, 2),
		endDone:    make(chan error, 1),
	}
	cc.nextID += 2
	cc.streams[st.id] = st
	cc.enqueueOrdLocked(wframe{kind: fkHeaders, id: st.id, data: block, n: cc.peerFrame})
	cc.mu.Unlock()
	cc.flush()

	select {
	case <-st.readyc:
	case <-ctx.Done():
		st.reset(http2.ErrCodeCancel, ctx.Err())
		return nil, ctx.Err()
	}
	cc.mu.Lock()
	status, err := st.status, st.err
	cc.mu.Unlock()
	if status == 0 {
		return nil, err
	}
	if status != http.StatusOK {
		st.reset(http2.ErrCodeCancel, errRefused) // a no-op once the server ended it
		return nil, &StatusError{Code: status}
	}
	return st, nil
}

// encodeRequestLocked encodes the CONNECT's header block (RFC 9113 §8.5).
func (cc *h2Client) encodeRequestLocked(authority string, h http.Header) ([]byte, error) {
	cc.hreq.Reset()
	size := uint64(len(":method") + len("CONNECT") + 32 + len(":authority") + len(authority) + 32)
	cc.henc2.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect})
	cc.henc2.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
	for k, vs := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return nil, fmt.Errorf("hbone: invalid header field name %q", k)
		}
		name := strings.ToLower(k)
		switch name {
		case "connection", "proxy-connection", "transfer-encoding", "upgrade", "keep-alive", "host", "content-length":
			continue // connection-specific, or not for a CONNECT (RFC 9113 §8.2.2)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil, fmt.Errorf("hbone: invalid value for header field %q", k)
			}
			size += uint64(len(name) + len(v) + 32)
			cc.henc2.WriteField(hpack.HeaderField{Name: name, Value: v})
		}
	}
	if size > uint64(cc.peerHeaderList) {
		return nil, fmt.Errorf("hbone: request headers of %d bytes exceed the server's limit of %d", size, cc.peerHeaderList)
	}
	return bytes.Clone(cc.hreq.Bytes()), nil
}

func (cc *h2Client) readLoop() {
	defer close(cc.readDone)
	cc.teardown(cc.readFrames())
}

func (cc *h2Client) readFrames() error {
	first := true
	for {
		if err := cc.beforeRead(); err != nil {
			return err
		}
		f, err := cc.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				// A malformed header block of one stream: HPACK state is intact.
				cc.mu.Lock()
				cc.resetIDLocked(se.StreamID, se.Code)
				cc.mu.Unlock()
				continue
			}
			if errors.Is(err, http2.ErrFrameTooLarge) {
				return http2.ConnectionError(http2.ErrCodeFrameSize)
			}
			return err
		}
		cc.lastRead.Store(int64(cc.now()))
		if first {
			// RFC 9113 §3.4: the server's preface is a SETTINGS frame.
			if sf, ok := f.(*http2.SettingsFrame); !ok || sf.IsAck() {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			first = false
		}
		if err := cc.processFrame(f); err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				cc.mu.Lock()
				cc.resetIDLocked(se.StreamID, se.Code)
				cc.mu.Unlock()
				continue
			}
			return err
		}
	}
}

func (cc *h2Client) processFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return cc.onSettings(f)
	case *http2.MetaHeadersFrame:
		return cc.onHeaders(f)
	case *http2.DataFrame:
		return cc.onData(f)
	case *http2.WindowUpdateFrame:
		return cc.onWindowUpdate(f)
	case *http2.PingFrame:
		return cc.onPing(f)
	case *http2.RSTStreamFrame:
		return cc.onRSTStream(f)
	case *http2.GoAwayFrame:
		return cc.onGoAway(f)
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol) // we disabled push
	default:
		return nil // PRIORITY, unknown extension frames
	}
}

func (cc *h2Client) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	first := !cc.gotSettings
	if first {
		cc.maxStreams = defaultClientStreams
	}
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			// RFC 9113 §6.9.2: the change applies to every open stream's send window.
			delta := int64(s.Val) - int64(cc.peerInit)
			for _, st := range cc.streams {
				st.sendWindow += delta
				if st.sendWindow > maxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				notify(st.sendReady)
			}
			cc.peerInit = int32(s.Val)
		case http2.SettingMaxFrameSize:
			cc.peerFrame = s.Val
		case http2.SettingMaxConcurrentStreams:
			cc.maxStreams = s.Val
		case http2.SettingMaxHeaderListSize:
			cc.peerHeaderList = s.Val
		}
		// HEADER_TABLE_SIZE needs nothing: requests never use the dynamic table.
		return nil
	})
	if err != nil {
		return err
	}
	cc.enqueueCtrlLocked(wframe{kind: fkSettingsAck})
	if first {
		cc.gotSettings = true
		close(cc.settingsc)
	}
	return nil
}

func (cc *h2Client) onPing(f *http2.PingFrame) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	cc.onPingLocked(f, &cc.frameWriter)
	return nil
}

// onGoAway: no new streams; those the server will not process fail as refused (the pool
// retries them), their HEADERS and DATA still queued dropped (abortLocked): they must not
// follow the GOAWAY. The others run to their end.
func (cc *h2Client) onGoAway(f *http2.GoAwayFrame) error {
	cc.mu.Lock()
	cc.goAway = true
	if f.ErrCode != http2.ErrCodeNo {
		cc.log.Debug("hbone: GOAWAY from server", "code", f.ErrCode, "last_stream", f.LastStreamID)
	}
	for id, st := range cc.streams {
		if id > f.LastStreamID {
			cc.abortLocked(st, resetError(http2.StreamError{StreamID: id, Code: http2.ErrCodeRefusedStream, Cause: errGoAway}), false, 0)
		}
	}
	cc.mu.Unlock()
	if cc.unusable != nil {
		cc.unusable() // without tunnels, the connection leaves the pool now
	}
	return nil
}

func (cc *h2Client) healthCheck() {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.closed {
		return
	}
	if cc.checkLocked(cc.now(), time.Duration(cc.lastRead.Load()), &cc.frameWriter) {
		cc.log.Info("hbone: PING unanswered; closing connection", "timeout", cc.pingTimeout)
		cc.sock.Close() // the read loop fails and tears down
	}
}

func (cc *h2Client) teardown(err error) {
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		// Tell the server why, if that can be done now.
		cc.mu.Lock()
		cc.enqueueOrdLocked(wframe{kind: fkGoAway, code: http2.ErrCode(ce)})
		cc.enqueueOrdLocked(wframe{kind: fkClose})
		cc.mu.Unlock()
		done := make(chan struct{})
		go func() {
			cc.flush()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(time.Second):
		}
	}
	cause := err
	if cause == nil || errors.Is(cause, io.EOF) || errors.Is(cause, net.ErrClosed) {
		cause = errClientClosed
	}
	cc.mu.Lock()
	cc.closed = true
	cc.err = cause
	cc.health.Stop()
	serr := resetError(fmt.Errorf("%w: %w", errConnClosed, cause))
	for _, st := range cc.streams {
		if st.remoteDone {
			// The response is complete: it stays readable; only the request failed.
			cc.stopSendLocked(st, serr)
		} else {
			cc.abortLocked(st, serr, false, 0)
		}
	}
	cc.wstop = true
	// The client has no writeLoop to fail what stays queued (frames left for a lazy writer
	// that will now not write them, or queued while a batch was out), and their writers
	// (Write, ReadFrom) wait for done. With a batch out, its writer fails them when it
	// returns (writeBatchLocked): done must not come before the batch is written, which may
	// hold earlier frames of the same buffer.
	var rest []wframe
	if !cc.writing {
		rest = cc.dropQueuedLocked()
	}
	cc.wcond.Broadcast()
	if !cc.gotSettings {
		close(cc.settingsc)
	}
	cc.mu.Unlock()
	failFrames(rest, errConnClosed)
	cc.sock.Close()
	cc.mu.Lock()
	cc.waitLazyLocked()
	cc.mu.Unlock()
	if cc.unusable != nil {
		cc.unusable()
	}
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		cc.log.Debug("hbone: client connection ended", "err", err)
	}
}

// parseStatus reads a response's :status; 0 if it is missing or malformed.
func parseStatus(f *http2.MetaHeadersFrame) int {
	s := f.PseudoValue("status")
	if len(s) != 3 {
		return 0
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 100 {
		return 0
	}
	return n
}
