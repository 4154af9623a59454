package kernel

import (
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
)

// Table flags, and objects in the table nftmesh did not write, are drift (issue #11 item
// 3: a dormant table, every chain off, read as unchanged): the live table does not match,
// renders them as comment lines, and the next apply replaces the table, clearing them;
// also behind a cache entry, since any commit moves the generation.
func TestForeignObjectsAndFlagsAreDrift(t *testing.T) {
	nettest.Require(t, "nft")
	edits := map[string]struct {
		nft  []string
		line string // in Live.Render
	}{
		"dormant":   {[]string{"add", "table", "inet", "nftmesh", "{ flags dormant; }"}, "\t# table flags: dormant\n"},
		"counter":   {[]string{"add", "counter", "inet", "nftmesh", "c"}, "\t# counter c was not written by nftmesh"},
		"quota":     {[]string{"add", "quota", "inet", "nftmesh", "q", "{ over 100 bytes }"}, "\t# quota q was not written by nftmesh"},
		"limit":     {[]string{"add", "limit", "inet", "nftmesh", "l", "{ rate 10/second }"}, "\t# limit l was not written by nftmesh"},
		"flowtable": {[]string{"add", "flowtable", "inet", "nftmesh", "f", "{ hook ingress priority 0; devices = { lo }; }"}, "\t# flowtable f was not written by nftmesh"},
		"extra set": {[]string{"add", "set", "inet", "nftmesh", "extra", "{ type ipv4_addr; }"}, "\tset extra {"},
	}
	for name, edit := range edits {
		t.Run(name, func(t *testing.T) {
			ns := nettest.New(t)
			c := openNS(t, ns)
			cache := NewCache()
			tbl := everyConstruct()
			if _, err := c.Apply(tbl, cache); err != nil {
				t.Fatal(err)
			}
			if res, err := c.Apply(everyConstruct(), cache); err != nil || res.Action != Unchanged {
				t.Fatalf("verifying apply: %+v %v", res, err) // and the cache holds the table
			}
			if _, err := ns.Run("", "nft", edit.nft...); err != nil {
				if name == "flowtable" {
					t.Skipf("this kernel has no flowtables (CONFIG_NF_FLOW_TABLE): %v", err)
				}
				t.Fatal(err)
			}
			live, err := c.ReadLive(tbl.Name, true)
			if err != nil {
				t.Fatal(err)
			}
			if live.Matches(tbl) {
				t.Error("drift not detected")
			}
			if r := live.Render(); !strings.Contains(r, edit.line) {
				t.Errorf("live table renders without %q:\n%s", edit.line, r)
			}
			res, err := c.Apply(everyConstruct(), cache)
			if err != nil || res.Action != Replaced {
				t.Fatalf("apply over drift: %+v %v, want replaced", res, err)
			}
			if got := nftList(t, ns, tbl.Name); got != tbl.Render() {
				t.Errorf("after the replace nft lists:\n%s", lineDiff(tbl.Render(), got))
			}
			if out := ns.MustRun(t, "nft", "list", "table", "inet", "nftmesh"); strings.Contains(out, "dormant") {
				t.Errorf("the replace left the table dormant:\n%s", out)
			}
			if res, err := c.Apply(everyConstruct(), cache); err != nil || res.Action != Unchanged {
				t.Errorf("apply after the replace: %+v %v, want unchanged", res, err)
			}
		})
	}
}
