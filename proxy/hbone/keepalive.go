package hbone

import (
	"time"

	"golang.org/x/net/http2"
)

// keepalive is a connection's PING health check, the client's and the server's alike: a
// PING once nothing has been read for readIdle, and the connection closed when that PING's
// ACK has not come within pingTimeout. Its state is guarded by the connection's mu.
type keepalive struct {
	readIdle    time.Duration
	pingTimeout time.Duration
	pingOut     bool          // a PING waits for its ACK
	pingAt      time.Duration // when it was queued, since the connection started
	health      *time.Timer
}

// checkLocked is the health timer's work, under the connection's mu; now and lastRead are
// durations since the connection started. It queues a PING on w when one is due and
// reports whether the connection must close: its PING went unanswered.
func (k *keepalive) checkLocked(now, lastRead time.Duration, w *frameWriter) (unanswered bool) {
	if k.pingOut {
		wait := now - k.pingAt
		if wait >= k.pingTimeout {
			return true
		}
		k.health.Reset(k.pingTimeout - wait)
		return false
	}
	if idle := now - lastRead; idle < k.readIdle {
		k.health.Reset(k.readIdle - idle)
		return false
	}
	k.pingOut, k.pingAt = true, now
	w.enqueueCtrlLocked(wframe{kind: fkPing, ping: pingPayload})
	w.wakeLocked()
	k.health.Reset(k.pingTimeout)
	return false
}

// onPingLocked takes a PING frame under the connection's mu: the ACK of ours ends the wait
// for it; the peer's own is answered on w.
func (k *keepalive) onPingLocked(f *http2.PingFrame, w *frameWriter) {
	if f.IsAck() {
		if f.Data == pingPayload {
			k.pingOut = false
		}
		return
	}
	w.enqueueCtrlLocked(wframe{kind: fkPing, end: true, ping: f.Data})
}
