package dataplane

import (
	"strings"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/kernel"
)

// A dormant table (every chain off) and objects nftmesh did not write are drift for the
// Manager and for Diff (`nftmesh diff --netns`), and the next apply replaces the table,
// flags cleared (issue #11 item 3).
func TestDormantTableAndForeignObjectsAreDrift(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	m := quietManager()
	d := podDesired(t, "default-dualstack")
	if _, err := m.Apply(ns.Handle, d); err != nil {
		t.Fatal(err)
	}
	if res, err := m.Apply(ns.Handle, d); err != nil || res.Action != kernel.Unchanged {
		t.Fatalf("second apply: %+v %v", res, err)
	}
	ns.MustRun(t, "nft", "add", "table", "inet", "nftmesh", "{ flags dormant; }")
	ns.MustRun(t, "nft", "add", "counter", "inet", "nftmesh", "c")
	diff, err := Diff(ns.Handle, d)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"-\t# table flags: dormant\n", "-\t# counter c was not written by nftmesh"} {
		if !strings.Contains(diff, want) {
			t.Errorf("diff does not show %q:\n%s", want, diff)
		}
	}
	res, err := m.Apply(ns.Handle, d)
	if err != nil || res.Action != kernel.Replaced {
		t.Fatalf("apply over a dormant table: %+v %v, want replaced", res, err)
	}
	if out := nftTable(t, ns); strings.Contains(out, "dormant") || strings.Contains(out, "counter c") {
		t.Errorf("the replace left the flag or the counter:\n%s", out)
	}
	if diff, err := Diff(ns.Handle, d); err != nil || diff != "" {
		t.Errorf("diff after the replace: %v\n%s", err, diff)
	}
}
