package policy

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func namesOf(ps []*Policy) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Key())
	}
	return out
}

func TestStoreWrites(t *testing.T) {
	s := NewStore(Options{})
	if s.Generation() != 0 || len(s.Snapshot().Policies()) != 0 {
		t.Fatal("a new store is not empty at generation 0")
	}
	allowSleep := mustParse(t, doc("app", "allow", "selector:\n  matchLabels: {app: web}\nrules:\n- from:\n  - source: {serviceAccounts: [client/sleep]}"), Options{})[0]
	sleep := conn("spiffe://cluster.local/ns/client/sa/sleep")
	web := conn(webID)

	// Add.
	if err := s.Put(allowSleep); err != nil {
		t.Fatal(err)
	}
	gen1 := s.Snapshot()
	if gen1.Generation() != 1 || gen1.Get("app", "allow") != allowSleep {
		t.Fatalf("after Put: generation %d, Get %v", gen1.Generation(), gen1.Get("app", "allow"))
	}
	if d := decideBoth(t, gen1, web, webWorkload); d != noneMatched {
		t.Errorf("web before update: %v", d)
	}
	if d := decideBoth(t, gen1, sleep, webWorkload); d != allowedBy("app/allow", 0) {
		t.Errorf("sleep before update: %v", d)
	}

	// Update the same name: web is allowed now, sleep is not.
	allowWeb := mustParse(t, doc("app", "allow", "selector:\n  matchLabels: {app: web}\nrules:\n- from:\n  - source: {serviceAccounts: [client/web]}"), Options{})[0]
	if err := s.Put(allowWeb); err != nil {
		t.Fatal(err)
	}
	gen2 := s.Snapshot()
	if gen2.Generation() != 2 || len(gen2.Policies()) != 1 {
		t.Fatalf("after update: generation %d, %d policies", gen2.Generation(), len(gen2.Policies()))
	}
	if d := decideBoth(t, gen2, web, webWorkload); d != allowedBy("app/allow", 0) {
		t.Errorf("web after update: %v", d)
	}
	if d := decideBoth(t, gen2, sleep, webWorkload); d != noneMatched {
		t.Errorf("sleep after update: %v", d)
	}
	// An old snapshot does not change.
	if d := decideBoth(t, gen1, sleep, webWorkload); d != allowedBy("app/allow", 0) {
		t.Errorf("generation 1 changed after an update: %v", d)
	}

	// More policies, listed by namespace and name; applicable ones in evaluation order.
	more := mustParse(t, docs(
		doc("app", "b-deny", "action: DENY\nrules:\n- {}"),
		doc("istio-system", "global", "rules:\n- {}"),
		doc("istio-system", "a-deny", "action: DENY\nrules:\n- {}"),
		doc("app", "other-workload", "selector:\n  matchLabels: {app: db}"),
		doc("app", "waypoint", "targetRef: {kind: Service, name: web}\nrules:\n- {}"),
		doc("zzz", "elsewhere", "rules: []"),
	), Options{})
	if err := s.Put(more...); err != nil {
		t.Fatal(err)
	}
	snap := s.Snapshot()
	if got, want := strings.Join(namesOf(snap.Policies()), " "), "app/allow app/b-deny app/other-workload app/waypoint istio-system/a-deny istio-system/global zzz/elsewhere"; got != want {
		t.Errorf("Policies:\n got %s\nwant %s", got, want)
	}
	if got, want := strings.Join(namesOf(snap.Applicable(webWorkload)), " "), "istio-system/a-deny app/b-deny istio-system/global app/allow"; got != want {
		t.Errorf("Applicable:\n got %s\nwant %s", got, want)
	}
	if d := decideBoth(t, snap, web, webWorkload); d != deniedBy("istio-system/a-deny", 0) {
		t.Errorf("with DENY policies: %v", d)
	}
	// A workload in the root namespace sees the root namespace's policies once.
	inRoot := Workload{Namespace: "istio-system"}
	if got, want := strings.Join(namesOf(snap.Applicable(inRoot)), " "), "istio-system/a-deny istio-system/global"; got != want {
		t.Errorf("Applicable in the root namespace:\n got %s\nwant %s", got, want)
	}
	if e := snap.Explain(web, inRoot); len(e.Deny) != 1 || len(e.Allow) != 1 {
		t.Errorf("Explain in the root namespace: %d DENY, %d ALLOW policies, want 1 and 1", len(e.Deny), len(e.Allow))
	}

	// Delete.
	if !s.Delete("istio-system", "a-deny") || !s.Delete("app", "b-deny") {
		t.Fatal("Delete of existing policies returned false")
	}
	if s.Delete("app", "b-deny") || s.Delete("nowhere", "x") {
		t.Error("Delete of a missing policy returned true")
	}
	if d := decideBoth(t, s.Snapshot(), web, webWorkload); d != allowedBy("istio-system/global", 0) {
		t.Errorf("after deletes: %v", d)
	}
	if s.Generation() != 5 {
		t.Errorf("generation %d after 3 puts and 2 deletes, want 5", s.Generation())
	}
	s.Delete("zzz", "elsewhere")
	if _, ok := s.Snapshot().ns["zzz"]; ok {
		t.Error("an emptied namespace is still indexed")
	}

	// Replace: the whole set, last duplicate wins.
	if err := s.Replace([]*Policy{allowSleep, allowWeb}); err != nil {
		t.Fatal(err)
	}
	if got := namesOf(s.Snapshot().Policies()); len(got) != 1 || s.Snapshot().Get("app", "allow") != allowWeb {
		t.Errorf("after Replace: %v", got)
	}
}

func TestStorePutIsAllOrNothing(t *testing.T) {
	s := mustStore(t, Options{}, mustParse(t, doc("app", "keep", "rules:\n- {}"), Options{})...)
	good := mustParse(t, doc("app", "good", "rules: []"), Options{})[0]
	bad := &Policy{Name: "bad", Namespace: "app", Scope: ScopeNamespace,
		Rules: []Rule{{Clauses: []Clause{{Matches: []Match{{Principals: []StringMatch{{Kind: Exact}}}}}}}}}
	err := s.Put(good, bad)
	if err == nil || !strings.Contains(err.Error(), "app/bad") {
		t.Fatalf("Put with an invalid policy: %v", err)
	}
	if s.Generation() != 1 || s.Snapshot().Get("app", "good") != nil {
		t.Error("a failed Put changed the store")
	}
	// A policy translated with another root namespace would be placed wrongly.
	global := mustParse(t, doc("mesh", "g", "rules: []"), Options{RootNamespace: "mesh"})[0]
	if err := s.Put(global); err == nil || !strings.Contains(err.Error(), "root namespace is istio-system") {
		t.Errorf("Put of a policy with another root: %v", err)
	}
	if err := s.Put(nil); err == nil {
		t.Error("Put(nil) succeeded")
	}
	if err := s.Replace([]*Policy{bad}); err == nil || s.Snapshot().Get("app", "keep") == nil {
		t.Errorf("a failed Replace changed the store: %v", err)
	}
}

func TestSubscribe(t *testing.T) {
	s := NewStore(Options{})
	ch, cancel := s.Subscribe()
	p := mustParse(t, doc("app", "p", "rules: []"), Options{})[0]
	if err := s.Put(p); err != nil {
		t.Fatal(err)
	}
	select {
	case g := <-ch:
		if g != 1 {
			t.Errorf("got generation %d, want 1", g)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no notification")
	}
	// A reader that falls behind gets the newest generation, once.
	for range 3 {
		s.Put(p)
	}
	if g := <-ch; g != 4 {
		t.Errorf("got generation %d, want the newest, 4", g)
	}
	select {
	case g := <-ch:
		t.Errorf("stale notification %d", g)
	default:
	}
	// Nothing changes, nothing is sent.
	s.Delete("app", "missing")
	select {
	case g := <-ch:
		t.Errorf("notification %d without a change", g)
	default:
	}
	cancel()
	cancel() // idempotent
	if _, open := <-ch; open {
		t.Error("channel open after cancel")
	}
	s.Put(p) // must not block or panic with no subscriber
}

// The proxy's loop: a connection allowed now is closed when a new policy denies it.
func TestRecheckLiveConnectionsOnChange(t *testing.T) {
	s := NewStore(Options{})
	updates, cancel := s.Subscribe()
	defer cancel()
	live := []Connection{conn(webID), conn("spiffe://cluster.local/ns/client/sa/sleep")}
	closed := map[string]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range updates {
			snap := s.Snapshot()
			for _, c := range live {
				if !snap.Decide(c, webWorkload).Allow {
					closed[c.SrcPrincipal] = true
				}
			}
			if len(closed) > 0 {
				return
			}
		}
	}()
	if err := s.Put(mustParse(t, doc("app", "deny-sleep", "action: DENY\nrules:\n- from:\n  - source: {principals: [\"*/sa/sleep\"]}"), Options{})...); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("no re-check")
	}
	if !closed["spiffe://cluster.local/ns/client/sa/sleep"] || closed[webID] {
		t.Errorf("closed %v, want only sleep", closed)
	}
}

// Readers decide while a writer flips between a policy that allows and one that denies;
// every answer must be one of the two, with its own reason (run with -race).
func TestConcurrentReadsDuringWrites(t *testing.T) {
	allow := mustParse(t, doc("app", "p", "action: ALLOW\nrules:\n- from:\n  - source: {namespaces: [client]}"), Options{})[0]
	deny := mustParse(t, doc("app", "p", "action: DENY\nrules:\n- from:\n  - source: {namespaces: [client]}"), Options{})[0]
	s := mustStore(t, Options{}, allow)
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for r := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := conn(webID)
			w := Workload{Namespace: "app", Labels: map[string]string{"r": fmt.Sprint(r)}}
			for n := 0; !stop.Load(); n++ {
				d := s.Decide(c, w)
				if d != allowedBy("app/p", 0) && d != deniedBy("app/p", 0) {
					errs <- fmt.Sprintf("impossible decision %v", d)
					return
				}
			}
		}()
	}
	for i := range 300 {
		p := allow
		if i%2 == 0 {
			p = deny
		}
		if err := s.Put(p); err != nil {
			t.Fatal(err)
		}
		if i%50 == 0 {
			s.Delete("app", "unrelated")
			s.Put(mustParse(t, doc("other", fmt.Sprint("x", i), "rules: []"), Options{})...)
		}
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
