package policy

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
)

// Store holds the policies the node proxy enforces. Readers decide against an immutable
// Snapshot that they load atomically, so they never wait for a writer; writers copy the
// namespaces they change (copy-on-write) and publish a new snapshot with the next
// generation, then notify subscribers so the proxy can re-check its live connections.
type Store struct {
	root string
	mu   sync.Mutex // serializes writers
	cur  atomic.Pointer[Snapshot]
	subs map[chan uint64]struct{}
}

// NewStore returns an empty store (generation 0) whose root namespace is
// opts.RootNamespace (default istio-system).
func NewStore(opts Options) *Store {
	s := &Store{root: opts.rootNamespace(), subs: map[chan uint64]struct{}{}}
	s.cur.Store(&Snapshot{root: s.root, ns: map[string]*nsState{}})
	return s
}

// Snapshot is an immutable view of the store at one generation.
type Snapshot struct {
	gen  uint64
	root string
	ns   map[string]*nsState
}

// nsState holds one namespace's policies, sorted by name, ignored ones included, and
// their index. The writer builds the index before publishing, so a reader never waits
// for it: until the new snapshot is out, readers use the previous one.
type nsState struct {
	pols []*cPolicy
	idx  *nsIndex
}

func newNSState(pols []*cPolicy) *nsState {
	return &nsState{pols: pols, idx: buildIndex(pols)}
}

func (n *nsState) index() *nsIndex {
	if n == nil {
		return nil
	}
	return n.idx
}

// Snapshot returns the current snapshot.
func (s *Store) Snapshot() *Snapshot { return s.cur.Load() }

// Generation is the current generation; it grows by one with every change.
func (s *Store) Generation() uint64 { return s.cur.Load().gen }

// Decide decides a connection against the current snapshot.
func (s *Store) Decide(c Connection, w Workload) Decision { return s.cur.Load().Decide(c, w) }

// Put adds policies or replaces those with the same namespace/name, all at once: if
// one is invalid, nothing changes. Policies must not be modified afterwards. Each write
// re-indexes the namespaces it touches, so load many policies with one Put or Replace.
func (s *Store) Put(ps ...*Policy) error {
	cs, err := s.compileAll(ps)
	if err != nil || len(cs) == 0 {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.cur.Load()
	next := maps.Clone(old.ns)
	byNS := map[string][]*cPolicy{}
	for _, c := range cs {
		byNS[c.p.Namespace] = append(byNS[c.p.Namespace], c)
	}
	for ns, add := range byNS {
		var pols []*cPolicy
		if st := old.ns[ns]; st != nil {
			pols = slices.Clone(st.pols)
		}
		for _, c := range add {
			i, found := slices.BinarySearchFunc(pols, c.p.Name, byName)
			if found {
				pols[i] = c
			} else {
				pols = slices.Insert(pols, i, c)
			}
		}
		next[ns] = newNSState(pols)
	}
	s.publish(next)
	return nil
}

// Delete removes a policy; it reports whether there was one.
func (s *Store) Delete(namespace, name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.cur.Load()
	st := old.ns[namespace]
	if st == nil {
		return false
	}
	i, found := slices.BinarySearchFunc(st.pols, name, byName)
	if !found {
		return false
	}
	next := maps.Clone(old.ns)
	if len(st.pols) == 1 {
		delete(next, namespace)
	} else {
		next[namespace] = newNSState(slices.Delete(slices.Clone(st.pols), i, i+1))
	}
	s.publish(next)
	return true
}

// Replace makes ps the whole set of policies (a resync), in one change.
func (s *Store) Replace(ps []*Policy) error {
	cs, err := s.compileAll(ps)
	if err != nil {
		return err
	}
	byNS := map[string][]*cPolicy{}
	for _, c := range cs {
		byNS[c.p.Namespace] = append(byNS[c.p.Namespace], c)
	}
	next := map[string]*nsState{}
	for ns, pols := range byNS {
		slices.SortStableFunc(pols, func(a, b *cPolicy) int { return cmp.Compare(a.p.Name, b.p.Name) })
		// The last of duplicate names wins, as with Put.
		out := pols[:0]
		for _, c := range pols {
			if n := len(out); n > 0 && out[n-1].p.Name == c.p.Name {
				out[n-1] = c
				continue
			}
			out = append(out, c)
		}
		next[ns] = newNSState(out)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.publish(next)
	return nil
}

func byName(c *cPolicy, name string) int { return cmp.Compare(c.p.Name, name) }

// compileAll compiles ps and checks that each scope agrees with this store's root
// namespace (a policy translated with another root would be placed wrongly).
func (s *Store) compileAll(ps []*Policy) ([]*cPolicy, error) {
	var errs []error
	cs := make([]*cPolicy, 0, len(ps))
	for _, p := range ps {
		if p == nil {
			errs = append(errs, errors.New("nil policy"))
			continue
		}
		if want := scopeOf(p.Namespace, p.Scope == ScopeWorkload, s.root); p.Scope != want {
			errs = append(errs, fmt.Errorf("policy %s: scope %v, but in a store whose root namespace is %s it is %v", p.Key(), p.Scope, s.root, want))
			continue
		}
		c, err := compile(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cs = append(cs, c)
	}
	return cs, errors.Join(errs...)
}

// publish stores the next snapshot and tells subscribers. Called with s.mu held.
func (s *Store) publish(next map[string]*nsState) {
	snap := &Snapshot{gen: s.cur.Load().gen + 1, root: s.root, ns: next}
	s.cur.Store(snap)
	for ch := range s.subs {
		// Keep only the newest generation: drop an unread one, then send. Only writers
		// send, under s.mu, so the send cannot block.
		select {
		case <-ch:
		default:
		}
		ch <- snap.gen
	}
}

// Subscribe returns a channel that receives the generation after every change, and a
// function that ends the subscription and closes the channel. The channel holds one
// value, the newest: a slow reader skips generations but never misses the last one, and
// never slows a writer. On each value, take Snapshot() and re-check live connections.
func (s *Store) Subscribe() (<-chan uint64, func()) {
	ch := make(chan uint64, 1)
	s.mu.Lock()
	s.subs[ch] = struct{}{}
	s.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			s.mu.Lock()
			delete(s.subs, ch)
			s.mu.Unlock()
			close(ch)
		})
	}
}

// Generation of this snapshot.
func (s *Snapshot) Generation() uint64 { return s.gen }

// RootNamespace of the store this snapshot belongs to.
func (s *Snapshot) RootNamespace() string { return s.root }

// Policies returns every policy, ignored ones included, sorted by namespace and name.
func (s *Snapshot) Policies() []*Policy {
	var out []*Policy
	for _, ns := range slices.Sorted(maps.Keys(s.ns)) {
		for _, c := range s.ns[ns].pols {
			out = append(out, c.p)
		}
	}
	return out
}

// Get returns the policy namespace/name, or nil.
func (s *Snapshot) Get(namespace, name string) *Policy {
	st := s.ns[namespace]
	if st == nil {
		return nil
	}
	if i, ok := slices.BinarySearchFunc(st.pols, name, byName); ok {
		return st.pols[i].p
	}
	return nil
}

// scopeOf derives a policy's scope the way Istio does.
func scopeOf(namespace string, hasSelector bool, root string) Scope {
	switch {
	case hasSelector:
		return ScopeWorkload
	case namespace == root:
		return ScopeGlobal
	}
	return ScopeNamespace
}

// namespaces returns the states that can hold policies for a workload in ns: the root
// namespace's first, then ns's own (nil when absent, or when ns is the root).
func (s *Snapshot) namespaces(ns string) (root, local *nsState) {
	root = s.ns[s.root]
	if ns != s.root {
		local = s.ns[ns]
	}
	return root, local
}

// Applicable returns the enforced policies that apply to w, in evaluation order: DENY
// policies first (root namespace, then the workload's, each by name), then ALLOW ones.
func (s *Snapshot) Applicable(w Workload) []*Policy {
	root, local := s.namespaces(w.Namespace)
	var deny, allow []*Policy
	for _, st := range []*nsState{root, local} {
		if st == nil {
			continue
		}
		for _, c := range st.pols {
			if c.p.Ignored != "" || !selects(c.p, w.Labels) {
				continue
			}
			if c.p.Action == Deny {
				deny = append(deny, c.p)
			} else {
				allow = append(allow, c.p)
			}
		}
	}
	return append(deny, allow...)
}

// Decide applies Istio's order: a matching DENY policy denies; with no ALLOW policy
// for the workload the connection is allowed; a matching ALLOW policy allows; otherwise
// it is denied. It does not allocate.
func (s *Snapshot) Decide(c Connection, w Workload) Decision {
	v := newView(&c)
	rootSt, localSt := s.namespaces(w.Namespace)
	root, local := rootSt.index(), localSt.index()
	if r := root.firstDeny(&v, w.Labels); r != nil {
		return Decision{Allow: false, Policy: r.pol.key, RuleIndex: r.index, Reason: ReasonDenyMatched}
	}
	if r := local.firstDeny(&v, w.Labels); r != nil {
		return Decision{Allow: false, Policy: r.pol.key, RuleIndex: r.index, Reason: ReasonDenyMatched}
	}
	if !root.allowApplies(w.Labels) && !local.allowApplies(w.Labels) {
		return Decision{Allow: true, RuleIndex: -1, Reason: ReasonNoAllowPolicy}
	}
	if r := root.firstAllow(&v, w.Labels); r != nil {
		return Decision{Allow: true, Policy: r.pol.key, RuleIndex: r.index, Reason: ReasonAllowMatched}
	}
	if r := local.firstAllow(&v, w.Labels); r != nil {
		return Decision{Allow: true, Policy: r.pol.key, RuleIndex: r.index, Reason: ReasonAllowMatched}
	}
	return Decision{Allow: false, RuleIndex: -1, Reason: ReasonNoAllowMatched}
}
