package kernel

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/internal/rulesettest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
)

var everyConstruct = rulesettest.EveryConstruct

func lineDiff(want, got string) string {
	return textdiff.Unified("want", "got", want, got)
}

func openNS(t *testing.T, ns *nettest.Netns) *Conn {
	t.Helper()
	c, err := Dial(ns.Handle)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func nftList(t *testing.T, ns *nettest.Netns, table string) string {
	t.Helper()
	out, err := ns.Run("", "nft", "-y", "list", "table", "inet", table)
	if err != nil {
		t.Fatal(err)
	}
	return counterValues(out)
}

func counterValues(s string) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if i := strings.Index(l, "counter packets "); i >= 0 {
			rest := l[i+len("counter packets "):]
			// drop "N bytes M"
			fields := strings.SplitN(rest, " ", 4)
			if len(fields) >= 3 {
				l = l[:i] + "counter"
				if len(fields) == 4 {
					l += " " + fields[3]
				}
			}
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "\n")
}

// Applying through netlink must give exactly the rendered text when nft lists it back:
// this checks the translation of every construct against nft's own decoding.
func TestApplyTranslationPrintsBack(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	c := openNS(t, ns)
	tbl := everyConstruct()
	res, err := c.Apply(tbl, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Action != Created || res.Writes == 0 {
		t.Errorf("first apply: %+v, want created with writes", res)
	}
	if got := nftList(t, ns, tbl.Name); got != tbl.Render() {
		t.Errorf("nft lists the applied table differently:\n%s", lineDiff(tbl.Render(), got))
	}
	live, err := c.ReadLive(tbl.Name, true)
	if err != nil {
		t.Fatal(err)
	}
	if got := live.Render(); got != tbl.Render() {
		t.Errorf("live table renders differently:\n%s", lineDiff(tbl.Render(), got))
	}
	if !live.Matches(tbl) {
		t.Error("live table does not match what was just applied")
	}
}

func TestApplyIdempotentAndReplace(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	c := openNS(t, ns)
	tbl := everyConstruct()
	if _, err := c.Apply(tbl, nil); err != nil {
		t.Fatal(err)
	}
	gen, err := c.Generation()
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Apply(everyConstruct(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Action != Unchanged || res.Writes != 0 {
		t.Errorf("second apply: %+v, want unchanged with 0 writes", res)
	}
	if gen2, _ := c.Generation(); gen2 != gen {
		t.Errorf("an unchanged apply committed a transaction: generation %d -> %d", gen, gen2)
	}

	// A changed table is replaced.
	changed := everyConstruct()
	changed.Chains[0].Rules[1].Comment = "changed"
	res, err = c.Apply(changed, nil)
	if err != nil || res.Action != Replaced {
		t.Fatalf("changed apply: %+v, %v", res, err)
	}
	if got := nftList(t, ns, tbl.Name); got != changed.Render() {
		t.Errorf("after replace:\n%s", lineDiff(changed.Render(), got))
	}
}

// Edits by others are drift: Apply puts the table back.
func TestApplyRepairsDrift(t *testing.T) {
	nettest.Require(t, "nft")
	edits := map[string][]string{
		"rule deleted":      {"flush", "chain", "inet", "nftmesh", "nat_output"},
		"rule added":        {"add", "rule", "inet", "nftmesh", "helper", "counter"},
		"chain added":       {"add", "chain", "inet", "nftmesh", "extra"},
		"chain deleted":     {"delete", "chain", "inet", "nftmesh", "filter_input"},
		"policy changed":    {"add", "chain", "inet", "nftmesh", "filter_input", "{ type filter hook input priority 0; policy accept; }"},
		"element added":     {"add", "element", "inet", "nftmesh", "pods_v4", "{ 10.9.9.9 }"},
		"table deleted":     {"delete", "table", "inet", "nftmesh"},
		"rule replaced":     {"insert", "rule", "inet", "nftmesh", "mangle_output", "accept"},
		"set element gone":  {"delete", "element", "inet", "nftmesh", "ports", "{ 53 }"},
		"base chain hooked": {"add", "chain", "inet", "nftmesh", "extra2", "{ type filter hook forward priority 0; }"},
	}
	for name, edit := range edits {
		t.Run(name, func(t *testing.T) {
			ns := nettest.New(t)
			c := openNS(t, ns)
			tbl := everyConstruct()
			if _, err := c.Apply(tbl, nil); err != nil {
				t.Fatal(err)
			}
			ns.MustRun(t, "nft", edit...)
			live, err := c.ReadLive(tbl.Name, true)
			if err != nil {
				t.Fatal(err)
			}
			if live.Matches(tbl) {
				t.Fatal("drift not detected")
			}
			res, err := c.Apply(tbl, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.Action == Unchanged {
				t.Fatalf("drift not repaired: %+v", res)
			}
			if got := nftList(t, ns, tbl.Name); got != tbl.Render() {
				t.Errorf("after repair:\n%s", lineDiff(tbl.Render(), got))
			}
		})
	}
}

// Runtime set elements survive a replace of the table.
func TestReplaceKeepsRuntimeElements(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	c := openNS(t, ns)
	tbl := everyConstruct()
	tbl.Sets[2].Runtime = true // empty_v6
	if _, err := c.Apply(tbl, nil); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "nft", "add", "element", "inet", "nftmesh", "empty_v6", `{ fd00::7 comment "uid-1" }`)
	if live, _ := c.ReadLive(tbl.Name, true); !live.Matches(tbl) {
		t.Error("an element in a runtime set counted as drift")
	}
	changed := everyConstruct()
	changed.Sets[2].Runtime = true
	changed.Chains[0].Rules[0].Comment = "v2"
	if res, err := c.Apply(changed, nil); err != nil || res.Action != Replaced {
		t.Fatalf("%+v %v", res, err)
	}
	live, err := c.ReadLive(tbl.Name, true)
	if err != nil {
		t.Fatal(err)
	}
	var kept []LiveElement
	for _, s := range live.Sets {
		if s.Name == "empty_v6" {
			kept = s.Elements
		}
	}
	if len(kept) != 1 || kept[0].Key != netip.MustParseAddr("fd00::7") || kept[0].Comment != "uid-1" {
		t.Errorf("runtime elements after replace: %+v", kept)
	}
}

func TestDelete(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	c := openNS(t, ns)
	if _, err := c.Apply(everyConstruct(), nil); err != nil {
		t.Fatal(err)
	}
	if existed, err := c.Delete("nftmesh"); err != nil || !existed {
		t.Fatalf("delete: %v %v", existed, err)
	}
	if out := ns.MustRun(t, "nft", "list", "tables"); strings.Contains(out, "nftmesh") {
		t.Errorf("table still there: %s", out)
	}
	if existed, err := c.Delete("nftmesh"); err != nil || existed {
		t.Errorf("second delete: %v %v, want a no-op", existed, err)
	}
}

// With a cache, a no-op apply after a verified one is one generation request; any
// commit by anyone sends it back to a full read, which finds drift.
func TestCacheSkipsReadsUntilSomethingCommits(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	c := openNS(t, ns)
	cache := NewCache()
	tbl := everyConstruct()
	if res, err := c.Apply(tbl, cache); err != nil || res.Action != Created {
		t.Fatalf("%+v %v", res, err)
	}
	// First no-op: a full read that verifies and fills the cache.
	before := c.raw.requests
	if res, err := c.Apply(everyConstruct(), cache); err != nil || res.Action != Unchanged {
		t.Fatalf("%+v %v", res, err)
	}
	if n := c.raw.requests - before; n < 4 {
		t.Errorf("verifying read sent %d requests, want a full read", n)
	}
	before = c.raw.requests
	if res, err := c.Apply(everyConstruct(), cache); err != nil || res.Action != Unchanged {
		t.Fatalf("%+v %v", res, err)
	}
	if n := c.raw.requests - before; n != 1 {
		t.Errorf("cached no-op sent %d requests, want 1 (the generation)", n)
	}
	// A changed table is not answered from the cache.
	changed := everyConstruct()
	changed.Chains[1].Rules[0].Comment = "new"
	if res, err := c.Apply(changed, cache); err != nil || res.Action != Replaced {
		t.Fatalf("changed: %+v %v", res, err)
	}
	c.Apply(changed, cache) // verify and cache
	// Someone else's commit, even to another table, bumps the generation.
	ns.MustRun(t, "nft", "flush", "chain", "inet", "nftmesh", "helper")
	if res, err := c.Apply(changed, cache); err != nil || res.Action != Replaced {
		t.Errorf("drift behind a cached entry: %+v %v, want replaced", res, err)
	}
	if got := nftList(t, ns, tbl.Name); got != changed.Render() {
		t.Errorf("after repair:\n%s", lineDiff(changed.Render(), got))
	}
}

// Check reads only; ApplyChecked acts on Check's read while the generation has not moved
// (no second read), and reads again when it has, so a commit in between is seen.
func TestCheckThenApplyChecked(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	c := openNS(t, ns)
	cache := NewCache()
	tbl := everyConstruct()
	// Unknown content: Check does not read, and does not hold.
	chk, err := c.Check(tbl, cache)
	if err != nil || chk.Holds() || chk.read {
		t.Fatalf("check of a new table: holds=%v read=%v %v", chk.Holds(), chk.read, err)
	}
	if res, err := c.ApplyChecked(chk); err != nil || res.Action != Created {
		t.Fatalf("%+v %v", res, err)
	}
	// Content this cache wrote: Check reads, holds, and writes nothing.
	gen, _ := c.Generation()
	if chk, err = c.Check(everyConstruct(), cache); err != nil || !chk.Holds() {
		t.Fatalf("check after the write: holds=%v %v", chk.Holds(), err)
	}
	if g, _ := c.Generation(); g != gen {
		t.Errorf("Check committed: generation %d -> %d", gen, g)
	}

	// Drift: Check reads and does not hold; ApplyChecked, nothing committed since,
	// writes from that read: one generation request and the batch.
	ns.MustRun(t, "nft", "add", "chain", "inet", "nftmesh", "drift")
	if chk, err = c.Check(everyConstruct(), cache); err != nil || chk.Holds() || !chk.read {
		t.Fatalf("check of drift: holds=%v read=%v %v", chk.Holds(), chk.read, err)
	}
	before := c.raw.requests
	if res, err := c.ApplyChecked(chk); err != nil || res.Action != Replaced {
		t.Fatalf("%+v %v", res, err)
	}
	if n := c.raw.requests - before; n != 2 {
		t.Errorf("ApplyChecked after an unraced check sent %d requests, want 2 (generation, batch)", n)
	}

	// Drift, Check, then someone repairs it: ApplyChecked sees the commit, reads again
	// and writes nothing.
	ns.MustRun(t, "nft", "add", "chain", "inet", "nftmesh", "drift")
	if chk, err = c.Check(everyConstruct(), cache); err != nil || chk.Holds() {
		t.Fatalf("check of drift: holds=%v %v", chk.Holds(), err)
	}
	ns.MustRun(t, "nft", "delete", "chain", "inet", "nftmesh", "drift")
	if res, err := c.ApplyChecked(chk); err != nil || res.Action != Unchanged || res.Writes != 0 {
		t.Errorf("after the drift was repaired between check and apply: %+v %v, want unchanged", res, err)
	}
	if got := nftList(t, ns, tbl.Name); got != tbl.Render() {
		t.Errorf("the table:\n%s", lineDiff(tbl.Render(), got))
	}
}
