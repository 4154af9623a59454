package dataplane

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/kernel"
	"github.com/nftmesh/nftmesh/ruleset"
)

// Fake is an Interface that keeps each namespace's state in memory, so that the code above
// the dataplane (the agent) is tested in milliseconds without root. It keeps Manager's
// contract where a caller can see it: Apply validates and writes nothing when the state is
// already there, and a replace keeps a runtime set's elements; Remove reports whether there
// was anything; a pod IP needs the node's table and belongs to a UID; a closed handle or a
// state without a table is an error. Where it differs: namespaces are told apart by handle
// name, not by the kernel's key (so that a test without root can make many from its own
// namespace with netns.FromFd(fd, name)): two names for one namespace are two namespaces
// here, and Result.Seq is not set. Dump prints the whole state in a fixed order, for golden
// text. Fail is called with the Fake locked: it must not call the Fake.
type Fake struct {
	// Fail, when set, is asked before every operation ("apply", "remove", "add-pod-ip",
	// "remove-pod-ip") on a namespace; an error it returns fails the operation with nothing
	// changed, as a kernel that rejects a transaction.
	Fail func(op, ns string) error

	mu  sync.Mutex
	ns  map[string]*fakeNS
	ops []string
}

type fakeNS struct {
	table   string // rendered, runtime sets without elements
	name    string // the table's name
	runtime map[string]ruleset.SetType
	routing *ruleset.Routing
	// elems holds runtime set elements: set -> address -> owner.
	elems map[string]map[netip.Addr]string
}

var (
	_ Interface = (*Manager)(nil)
	_ Interface = (*Fake)(nil)
)

// NewFake returns an empty Fake: no namespace holds anything.
func NewFake() *Fake { return &Fake{ns: map[string]*fakeNS{}} }

func (f *Fake) fail(op string, ns *netns.NS) error {
	// As the Manager: a closed handle cannot reach a namespace.
	if _, err := ns.File().Stat(); err != nil {
		return fmt.Errorf("netns %s: %s: %w", ns.Name(), op, err)
	}
	if f.Fail == nil {
		return nil
	}
	if err := f.Fail(op, ns.Name()); err != nil {
		return fmt.Errorf("netns %s: %s: %w", ns.Name(), op, err)
	}
	return nil
}

func (f *Fake) record(format string, args ...any) {
	f.ops = append(f.ops, fmt.Sprintf(format, args...))
}

// Apply makes the namespace hold d, as Manager.Apply.
func (f *Fake) Apply(ns *netns.NS, d ruleset.Desired) (Result, error) {
	if d.Table == nil {
		return Result{}, fmt.Errorf("netns %s: apply: no table", ns.Name())
	}
	if err := d.Table.Validate(); err != nil {
		return Result{}, fmt.Errorf("netns %s: table inet %s: invalid: %w", ns.Name(), d.Table.Name, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("apply", ns); err != nil {
		return Result{}, err
	}
	text, runtime := renderWithoutRuntime(d.Table)
	st := f.ns[ns.Name()]
	var res Result
	// As Manager: a state without routing (the node's) leaves routing alone.
	res.RoutingChanged = d.Routing != nil && !sameRouting(stateRouting(st), d.Routing)
	switch {
	case st != nil && st.table == text && st.name == d.Table.Name:
		res.Action = kernel.Unchanged
	case st == nil || st.table == "":
		res.Action, res.Writes = kernel.Created, 1+len(d.Table.Sets)+len(d.Table.Chains)+rules(d.Table)
	default:
		res.Action, res.Writes = kernel.Replaced, 3+len(d.Table.Sets)+len(d.Table.Chains)+rules(d.Table)
	}
	if res.Action == kernel.Unchanged && !res.RoutingChanged {
		return res, nil
	}
	next := &fakeNS{table: text, name: d.Table.Name, runtime: runtime, elems: map[string]map[netip.Addr]string{}}
	if d.Routing != nil {
		r := *d.Routing
		next.routing = &r
	} else {
		next.routing = stateRouting(st)
	}
	if st != nil {
		// A replace keeps the elements of runtime sets that are still there with their type.
		for set, typ := range runtime {
			if st.runtime[set] == typ && len(st.elems[set]) > 0 {
				next.elems[set] = st.elems[set]
			}
		}
	}
	f.ns[ns.Name()] = next
	f.record("apply %s: table %s, routing changed %v", ns.Name(), res.Action, res.RoutingChanged)
	return res, nil
}

// Remove deletes the table d names and, for a pod, all its routing (whatever intent wrote
// it), as Manager.Remove.
func (f *Fake) Remove(ns *netns.NS, d ruleset.Desired) (bool, error) {
	if d.Table == nil {
		return false, fmt.Errorf("netns %s: remove: no table", ns.Name())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail("remove", ns); err != nil {
		return false, err
	}
	st := f.ns[ns.Name()]
	if st == nil {
		return false, nil
	}
	removed := false
	if d.Table != nil && st.name == d.Table.Name && st.table != "" {
		st.table, st.name, st.runtime, st.elems = "", "", nil, nil
		removed = true
	}
	if d.Routing != nil && st.routing != nil {
		st.routing = nil
		removed = true
	}
	if st.table == "" && st.routing == nil {
		delete(f.ns, ns.Name())
	}
	if removed {
		f.record("remove %s", ns.Name())
	}
	return removed, nil
}

// AddPodIP adds ip to the node's pod IP set, owned by uid, as Manager.AddPodIP.
func (f *Fake) AddPodIP(host *netns.NS, ip netip.Addr, uid string) (bool, error) {
	return f.podIP(host, ip, uid, true)
}

// RemovePodIP removes ip from the node's set if uid owns it, as Manager.RemovePodIP.
func (f *Fake) RemovePodIP(host *netns.NS, ip netip.Addr, uid string) (bool, error) {
	return f.podIP(host, ip, uid, false)
}

func (f *Fake) podIP(host *netns.NS, ip netip.Addr, uid string, add bool) (bool, error) {
	verb, op := "remove", "remove-pod-ip"
	if add {
		verb, op = "add", "add-pod-ip"
	}
	if err := checkPodIP(ip, uid, verb); err != nil {
		return false, err
	}
	ip = ip.Unmap()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail(op, host); err != nil {
		return false, err
	}
	set := podIPSet(ip)
	st := f.ns[host.Name()]
	if st == nil || st.name != compiler.TableName || st.runtime[set] == "" {
		return false, fmt.Errorf("netns %s: pod %s IP %s: %s: table inet %s has no set %s", host.Name(), uid, ip, verb, compiler.TableName, set)
	}
	owners := st.elems[set]
	if owners == nil {
		owners = map[netip.Addr]string{}
		st.elems[set] = owners
	}
	owner, present := owners[ip]
	switch {
	case add && present && owner == uid:
		return false, nil
	case add:
		owners[ip] = uid
	case !present || owner != uid:
		return false, nil // gone, or handed to a newer pod with the same IP
	default:
		delete(owners, ip)
	}
	f.record("pod IP %s %s: %s %s", verb, host.Name(), ip, uid)
	return true, nil
}

// Ops lists the operations that changed something, in order, one line each.
func (f *Fake) Ops() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.ops)
}

// Dump prints every namespace that holds something, sorted by name: its policy routing,
// its table as Render prints it, and the runtime set elements with their owners.
func (f *Fake) Dump() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	names := make([]string, 0, len(f.ns))
	for name := range f.ns {
		names = append(names, name)
	}
	slices.Sort(names)
	var b strings.Builder
	for _, name := range names {
		st := f.ns[name]
		fmt.Fprintf(&b, "# netns %s\n", name)
		if r := st.routing; r != nil {
			families := "ipv4"
			if r.IPv6 {
				families += " ipv6"
			}
			fmt.Fprintf(&b, "# routing: fwmark %#x/%#x lookup %d pref %d (%s)\n", r.Mark, r.Mask, r.Table, r.Priority, families)
		}
		b.WriteString(st.table)
		sets := make([]string, 0, len(st.elems))
		for set := range st.elems {
			sets = append(sets, set)
		}
		slices.Sort(sets)
		for _, set := range sets {
			addrs := make([]netip.Addr, 0, len(st.elems[set]))
			for a := range st.elems[set] {
				addrs = append(addrs, a)
			}
			slices.SortFunc(addrs, netip.Addr.Compare)
			for _, a := range addrs {
				fmt.Fprintf(&b, "# element %s %s owner %s\n", set, a, st.elems[set][a])
			}
		}
	}
	return b.String()
}

// renderWithoutRuntime renders t with its runtime sets empty (their elements are state, not
// desire) and names those sets.
func renderWithoutRuntime(t *ruleset.Table) (string, map[string]ruleset.SetType) {
	c := *t
	c.Sets = make([]*ruleset.Set, len(t.Sets))
	runtime := map[string]ruleset.SetType{}
	for i, s := range t.Sets {
		cs := *s
		if s.Runtime {
			cs.Addrs, cs.Ports = nil, nil
			runtime[s.Name] = s.Type
		}
		c.Sets[i] = &cs
	}
	return c.Render(), runtime
}

func rules(t *ruleset.Table) int {
	n := 0
	for _, c := range t.Chains {
		n += len(c.Rules)
	}
	return n
}

func stateRouting(st *fakeNS) *ruleset.Routing {
	if st == nil {
		return nil
	}
	return st.routing
}

func sameRouting(a, b *ruleset.Routing) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}
