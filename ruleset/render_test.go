// These tests use the shared every-construct table, which imports ruleset: hence the
// external test package.
package ruleset_test

import (
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/internal/rulesettest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
)

func TestRenderEveryConstruct(t *testing.T) {
	tbl := rulesettest.EveryConstruct()
	if err := tbl.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	got := tbl.Render()
	if got != rulesettest.EveryConstructText {
		t.Errorf("Render mismatch:\n%s", lineDiff(rulesettest.EveryConstructText, got))
	}
	if again := rulesettest.EveryConstruct().Render(); again != got {
		t.Error("Render is not deterministic")
	}
}

// The real nft must accept the rendered text and print the same text back.
func TestRenderMatchesNFTPrintBack(t *testing.T) {
	nettest.Require(t, "nft")
	ns := nettest.New(t)
	text := rulesettest.EveryConstruct().Render()
	if back := ns.NFTPrintBack(t, text, "nftmesh"); back != text {
		t.Errorf("nft prints the table back differently:\n%s", lineDiff(text, back))
	}
}

func lineDiff(want, got string) string {
	return textdiff.Unified("want", "got", want, got)
}
