// Package dataplane makes compiled rulesets real in network namespaces: the nftmesh table
// (through package kernel, one transaction), the pod's policy routing, and the node's
// pod IP sets. A Manager serializes work per namespace and runs different namespaces in
// parallel through a bounded pool. Nothing here ever calls setns on a thread that goes
// back to the Go scheduler's pool. Fake is a Manager for tests without a kernel.
package dataplane

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/internal/textdiff"
	"github.com/nftmesh/nftmesh/kernel"
	"github.com/nftmesh/nftmesh/ruleset"
)

// Interface is what the code above the dataplane (the CLI, the agent) uses: Manager
// writes to the kernel, Fake to memory. Remove takes the state Apply took.
type Interface interface {
	Apply(ns *netns.NS, d ruleset.Desired) (Result, error)
	Remove(ns *netns.NS, d ruleset.Desired) (bool, error)
	AddPodIP(host *netns.NS, ip netip.Addr, uid string) (bool, error)
	RemovePodIP(host *netns.NS, ip netip.Addr, uid string) (bool, error)
}

// Result reports one Apply.
type Result struct {
	kernel.Result
	RoutingChanged bool
	// Superseded is true when a newer Apply or Remove for the same namespace was
	// submitted before this one got its turn: it did nothing, the newer one decides.
	Superseded bool
	// Seq orders submissions: a higher Seq was submitted later.
	Seq uint64
}

// DefaultWorkers bounds ApplyAll's parallelism. Transactions that delete wait for an RCU
// grace period (about 10 ms); in different namespaces those waits overlap, so a wide
// pool pays off even on two cores.
const DefaultWorkers = 32

// Manager applies rulesets to namespaces: one at a time per namespace, in submission
// order (the newest intent wins), different namespaces in parallel. Across processes
// (another Manager, a CLI), each namespace's critical section is guarded by a lock file
// in LockDir (see nslock.go): they never interleave, though their order is the lock's.
type Manager struct {
	// LockDir holds the namespace lock files: DefaultLockDir, or $NFTMESH_LOCK_DIR.
	// Every process that writes a namespace must use the same directory.
	LockDir string

	log     *slog.Logger
	workers int

	cache *kernel.Cache

	seq   atomic.Uint64
	mu    sync.Mutex
	state map[netns.Key]*nsState
	socks map[netns.Key]*nsSockets // see sockcache.go
	swept time.Time
}

type nsState struct {
	mu     sync.Mutex
	latest uint64 // newest Seq submitted for this namespace
	users  int
}

// NewManager returns a Manager that logs to log (nil: slog.Default()) and runs ApplyAll
// with at most workers namespaces at once (0: DefaultWorkers).
func NewManager(log *slog.Logger, workers int) *Manager {
	if log == nil {
		log = slog.Default()
	}
	if workers <= 0 {
		workers = DefaultWorkers
	}
	return &Manager{LockDir: lockDirFromEnv(), log: log, workers: workers, cache: kernel.NewCache(), state: map[netns.Key]*nsState{}, socks: map[netns.Key]*nsSockets{}}
}

// acquire returns the namespace's state, counted as in use, and, when ordered, a new
// submission number for it; release undoes it. The number is taken under the same lock
// as the state, so a state released (and deleted) meanwhile cannot forget a newer one.
func (m *Manager) acquire(key netns.Key, ordered bool) (*nsState, uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var seq uint64
	if ordered {
		seq = m.seq.Add(1)
	}
	st := m.state[key]
	if st == nil {
		st = &nsState{}
		m.state[key] = st
	}
	st.users++
	st.latest = max(st.latest, seq)
	return st, seq
}

func (m *Manager) release(key netns.Key, st *nsState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if st.users--; st.users == 0 {
		delete(m.state, key)
	}
}

// turn registers a submission for the namespace and waits for its turn. It returns
// superseded=true, holding nothing, when a newer submission exists by then: that one
// will apply (or has applied) the newer intent, which must win.
func (m *Manager) turn(key netns.Key) (seq uint64, superseded bool, done func()) {
	st, seq := m.acquire(key, true)
	st.mu.Lock()
	m.mu.Lock()
	newer := st.latest > seq
	m.mu.Unlock()
	if newer {
		st.mu.Unlock()
		m.release(key, st)
		return seq, true, func() {}
	}
	return seq, false, func() { st.mu.Unlock(); m.release(key, st) }
}

// sockets opens, in one visit to the namespace, an nftables connection and, when routing
// is wanted, an rtnetlink one for the policy routing. The caller closes them. The visit
// is made by a fresh goroutine locked to its thread while the caller waits
// (netns.NS.DoHere), not handed to a pooled thread and back: on this kind of VM those two
// hand-offs cost more than making the sockets.
func sockets(ns *netns.NS, routing bool) (*kernel.Conn, *kernel.RoutingConn, error) {
	var conn *kernel.Conn
	var rt *kernel.RoutingConn
	err := ns.DoHere(func() error {
		var err error
		if conn, err = kernel.NewConn(); err != nil {
			return err
		}
		if routing {
			if rt, err = kernel.NewRoutingConn(); err != nil {
				conn.Close()
				return fmt.Errorf("rtnetlink socket: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("netns %s: %w", ns, err)
	}
	return conn, rt, nil
}

// Apply makes namespace ns hold exactly d: policy routing first (idempotent, harmless
// without the rules; any other rule at its priority and any other route in its table
// are deleted), then the table in one transaction. If the table fails, the routing is
// put back as it was (what was added is removed, what was deleted is re-added): nothing
// is left half-applied. Routing and table are written under the namespace's lock, so
// no other process's apply interleaves with them; a no-op only reads, without the lock.
func (m *Manager) Apply(ns *netns.NS, d ruleset.Desired) (Result, error) {
	start := time.Now()
	if d.Table == nil {
		return Result{}, fmt.Errorf("netns %s: apply: no table", ns)
	}
	seq, superseded, done := m.turn(ns.Key())
	defer done()
	res := Result{Seq: seq, Superseded: superseded}
	if superseded {
		m.log.Debug("apply superseded by a newer one", "netns", ns.Name(), "seq", seq)
		return res, nil
	}

	socks, err := m.cachedSockets(ns, d.Routing != nil)
	if err != nil {
		return res, err
	}
	defer m.releaseSockets(socks)
	// Look first, reading only and without the lock: a no-op (every resync) then costs
	// no lock file's open, flock, stat and close. Writes happen under the lock only,
	// after ApplyChecked and Ensure check again there: another process may have written
	// between this look and the lock.
	chk, err := socks.nft.Check(d.Table, m.cache)
	if err != nil {
		m.dropSockets(ns.Key())
		return res, fmt.Errorf("netns %s: %w", ns, err)
	}
	if chk.Holds() {
		holds := true
		if d.Routing != nil {
			if holds, err = socks.rt.Holds(*d.Routing); err != nil {
				m.dropSockets(ns.Key())
				return res, routingError(ns, err)
			}
		}
		if holds {
			res.Action = kernel.Unchanged
			return res, nil
		}
	}
	lock, err := m.lockNS(ns)
	if err != nil {
		return res, err
	}
	defer lock.unlock(false)
	undo := func() {}
	if d.Routing != nil {
		res.RoutingChanged, undo, err = socks.rt.Ensure(*d.Routing)
		if err != nil {
			undo()
			m.dropSockets(ns.Key())
			return res, routingError(ns, err)
		}
	}
	res.Result, err = socks.nft.ApplyChecked(chk)
	if err != nil {
		undo()
		m.dropSockets(ns.Key())
		return res, fmt.Errorf("netns %s: %w", ns, err)
	}
	if res.Action != kernel.Unchanged || res.RoutingChanged {
		m.log.Info("applied", "netns", ns.Name(), "table", d.Table.Name, "action", res.Action,
			"writes", res.Writes, "routing_changed", res.RoutingChanged, "duration", time.Since(start))
	}
	return res, nil
}

// routingError names the namespace; a loopback that is down gets its own words, since
// the kernel's (ENETDOWN, "network is down") point nowhere.
func routingError(ns *netns.NS, err error) error {
	if errors.Is(err, kernel.ErrLoopbackDown) {
		return fmt.Errorf("%w in %s: the policy routing needs it (ip link set lo up); nothing was applied", kernel.ErrLoopbackDown, ns)
	}
	return fmt.Errorf("netns %s: routing: %w", ns, err)
}

// Remove deletes from namespace ns what Apply(ns, d) wrote: d's table and, for a pod,
// all the policy routing nftmesh owns (every rule at d.Routing's priority, every route
// in its table, whatever intent wrote them). What is already gone is skipped. It
// reports whether it removed anything.
func (m *Manager) Remove(ns *netns.NS, d ruleset.Desired) (bool, error) {
	if d.Table == nil {
		return false, fmt.Errorf("netns %s: remove: no table", ns)
	}
	_, superseded, done := m.turn(ns.Key())
	defer done()
	if superseded {
		return false, nil
	}
	m.dropSockets(ns.Key())
	conn, rt, err := sockets(ns, d.Routing != nil)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	if rt != nil {
		defer rt.Close()
	}
	lock, err := m.lockNS(ns)
	if err != nil {
		return false, err
	}
	dropLockFile := false
	defer func() { lock.unlock(dropLockFile) }()
	if cookie, err := conn.NetNSCookie(); err == nil {
		m.cache.Forget(cookie)
	}
	removed, err := conn.Delete(d.Table.Name)
	if err != nil {
		return false, fmt.Errorf("netns %s: %w", ns, err)
	}
	if d.Routing != nil {
		r, err := rt.Remove(*d.Routing)
		removed = removed || r
		if err != nil {
			return removed, fmt.Errorf("netns %s: routing: %w", ns, err)
		}
	}
	if removed {
		m.log.Info("removed", "netns", ns.Name(), "table", d.Table.Name)
	}
	dropLockFile = d.Routing != nil // a pod's namespace holds nothing of ours now
	return removed, nil
}

// readLive reads nftmesh's table (with set elements) from namespace ns.
func readLive(ns *netns.NS, table string) (*kernel.Live, error) {
	conn, _, err := sockets(ns, false)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	live, err := conn.ReadLive(table, true)
	if err != nil {
		return nil, fmt.Errorf("netns %s: table inet %s: %w", ns, table, err)
	}
	return live, nil
}

// Show returns the live table of namespace ns as canonical text, or "" when there is
// none.
func Show(ns *netns.NS, table string) (string, error) {
	live, err := readLive(ns, table)
	if err != nil || live == nil {
		return "", err
	}
	return live.Render(), nil
}

// Diff compares namespace ns with want: the live table with want.Table, and, for a pod
// (want.Routing set), the policy routing nftmesh owns (rules at its priority, routes in
// its table, rendered one per line as kernel.RoutingConn.Show does) with what
// want.Routing asks for. It returns "" when both match, else a unified diff (live
// first) of each that differs, the table's then the routing's. Runtime set elements are
// not compared.
func Diff(ns *netns.NS, want ruleset.Desired) (string, error) {
	if want.Table == nil {
		return "", fmt.Errorf("netns %s: diff: no table", ns)
	}
	out, err := diffTable(ns, want.Table)
	if err != nil || want.Routing == nil {
		return out, err
	}
	conn, rt, err := sockets(ns, true)
	if err != nil {
		return "", err
	}
	conn.Close() // only the routing socket is needed here
	defer rt.Close()
	live, err := rt.Show(*want.Routing)
	if err != nil {
		return "", fmt.Errorf("netns %s: routing: %w", ns, err)
	}
	if desired := kernel.RoutingText(*want.Routing); live != desired {
		out += textdiff.Unified("live "+ns.Name()+" routing", "desired routing", live, desired)
	}
	return out, nil
}

func diffTable(ns *netns.NS, want *ruleset.Table) (string, error) {
	live, err := readLive(ns, want.Name)
	if err != nil {
		return "", err
	}
	if live.Matches(want) {
		return "", nil
	}
	liveText := "(no table inet " + want.Name + ")\n"
	if live != nil {
		liveText = live.Render()
	}
	d := textdiff.Unified("live "+ns.Name(), "desired", liveText, want.Render())
	if d == "" {
		// Equal text, different state: runtime elements are rendered but not compared,
		// so this only happens for a difference the text cannot show.
		d = "--- live " + ns.Name() + "\n+++ desired\n(differs in a way the text does not show: re-apply)\n"
	}
	return d, nil
}

// Job is one namespace for ApplyAll.
type Job struct {
	NS      *netns.NS
	Desired ruleset.Desired
}

// JobResult is the outcome of one Job, in the same position.
type JobResult struct {
	Result Result
	Err    error
}

// ApplyAll applies every job, at most the Manager's worker count at a time.
func (m *Manager) ApplyAll(jobs []Job) []JobResult {
	out := make([]JobResult, len(jobs))
	next := atomic.Int64{}
	var wg sync.WaitGroup
	for w := 0; w < min(m.workers, len(jobs)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(jobs) {
					return
				}
				out[i].Result, out[i].Err = m.Apply(jobs[i].NS, jobs[i].Desired)
			}
		}()
	}
	wg.Wait()
	return out
}

func podIPSet(ip netip.Addr) string {
	if ip.Is4() {
		return compiler.SetPodIPsV4
	}
	return compiler.SetPodIPsV6
}

// AddPodIP adds an enrolled pod's IP to the node's pod IP set, owned by the pod's UID.
// Idempotent; an IP still owned by another UID (reused) is handed over. It reports
// whether it wrote.
func (m *Manager) AddPodIP(host *netns.NS, ip netip.Addr, uid string) (bool, error) {
	return m.podIP(host, ip, uid, (*kernel.Conn).AddElement, "add")
}

// RemovePodIP removes a pod's IP from the node's set, only if uid still owns it: a new
// pod that got the same IP keeps its entry. It reports whether it wrote.
func (m *Manager) RemovePodIP(host *netns.NS, ip netip.Addr, uid string) (bool, error) {
	return m.podIP(host, ip, uid, (*kernel.Conn).DeleteElement, "remove")
}

// checkPodIP refuses what no kernel would be asked: an element without owner or address.
func checkPodIP(ip netip.Addr, uid, verb string) error {
	if uid == "" {
		return fmt.Errorf("pod IP %s: %s: empty pod UID", ip, verb)
	}
	if !ip.IsValid() {
		return fmt.Errorf("pod %s: %s: invalid IP", uid, verb)
	}
	return nil
}

func (m *Manager) podIP(host *netns.NS, ip netip.Addr, uid string,
	op func(*kernel.Conn, string, string, netip.Addr, string) (bool, error), verb string) (bool, error) {
	if err := checkPodIP(ip, uid, verb); err != nil {
		return false, err
	}
	ip = ip.Unmap()
	// Element changes are not superseded by later submissions: each is its own fact.
	st, _ := m.acquire(host.Key(), false)
	st.mu.Lock()
	defer func() { st.mu.Unlock(); m.release(host.Key(), st) }()
	conn, _, err := sockets(host, false)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	lock, err := m.lockNS(host)
	if err != nil {
		return false, err
	}
	defer lock.unlock(false)
	changed, err := op(conn, compiler.TableName, podIPSet(ip), ip, uid)
	if err != nil {
		return false, fmt.Errorf("netns %s: pod %s IP %s: %s: %w", host, uid, ip, verb, err)
	}
	if changed {
		m.log.Info("pod IP "+verb, "netns", host.Name(), "uid", uid, "ip", ip)
	}
	return changed, nil
}
