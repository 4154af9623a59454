package dataplane

import (
	"time"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/kernel"
)

// A Manager keeps each namespace's sockets between applies: making them costs a visit to
// the namespace (two setns, a goroutine switch) and half a dozen system calls, more than
// the whole check of a no-op apply. A socket holds a reference on its namespace (the
// kernel frees a namespace, and its nsfs inode number, the key, only when nothing refers
// to it), so the namespace, and with it the key, cannot be reused while cached; that also
// keeps a deleted pod's namespace alive until the entry is dropped: by Remove, by an
// error, or after socketIdle without use. (The cache used to hold a duplicate of the
// namespace's descriptor for that: five system calls per fresh namespace, for nothing
// the sockets do not already do.)

// socketIdle is how long an unused namespace's sockets are kept.
const socketIdle = 30 * time.Second

type nsSockets struct {
	nft   *kernel.Conn
	rt    *kernel.RoutingConn // made when a pod apply first needs it
	used  time.Time           // guarded by Manager.mu, as are inUse and dead
	inUse int                 // applies holding these sockets: never closed under them
	dead  bool                // dropped while in use: the last user closes
}

func (s *nsSockets) close() {
	s.nft.Close()
	if s.rt != nil {
		s.rt.Close()
	}
}

// cachedSockets returns the namespace's sockets, making what is missing, and marks them
// in use until releaseSockets. The caller holds the namespace's turn, so no other apply
// uses them meanwhile; the sweep and Close never close sockets in use.
func (m *Manager) cachedSockets(ns *netns.NS, routing bool) (*nsSockets, error) {
	now := time.Now()
	m.mu.Lock()
	var stale []*nsSockets
	if now.Sub(m.swept) > socketIdle/4 {
		m.swept = now
		for k, x := range m.socks {
			if x.inUse == 0 && now.Sub(x.used) > socketIdle {
				stale = append(stale, x)
				delete(m.socks, k)
			}
		}
	}
	s := m.socks[ns.Key()]
	if s != nil {
		s.inUse++
		s.used = now
	}
	m.mu.Unlock()
	for _, x := range stale {
		x.close()
	}
	if s != nil && (s.rt != nil || !routing) {
		return s, nil
	}
	nft, rt, err := sockets(ns, routing)
	if err != nil {
		if s != nil {
			m.releaseSockets(s)
		}
		return nil, err
	}
	if s != nil { // had the nftables socket; only the routing one was missing
		nft.Close()
		s.rt = rt
		return s, nil
	}
	s = &nsSockets{nft: nft, rt: rt, used: now, inUse: 1}
	m.mu.Lock()
	m.socks[ns.Key()] = s
	m.mu.Unlock()
	return s, nil
}

// releaseSockets ends a use; sockets dropped meanwhile are closed by their last user.
func (m *Manager) releaseSockets(s *nsSockets) {
	m.mu.Lock()
	s.inUse--
	closeNow := s.dead && s.inUse == 0
	m.mu.Unlock()
	if closeNow {
		s.close()
	}
}

// dropSockets forgets the namespace's sockets (after an error their state is unknown;
// after a remove they are not needed) and closes them once no apply uses them.
func (m *Manager) dropSockets(key netns.Key) {
	m.mu.Lock()
	s := m.socks[key]
	delete(m.socks, key)
	closeNow := s != nil && s.inUse == 0
	if s != nil {
		s.dead = true
	}
	m.mu.Unlock()
	if closeNow {
		s.close()
	}
}

// Close releases every cached socket and namespace handle.
func (m *Manager) Close() error {
	m.mu.Lock()
	var idle []*nsSockets
	for _, s := range m.socks {
		s.dead = true
		if s.inUse == 0 {
			idle = append(idle, s)
		}
	}
	m.socks = map[netns.Key]*nsSockets{}
	m.mu.Unlock()
	for _, s := range idle {
		s.close()
	}
	return nil
}
