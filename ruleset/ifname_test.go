package ruleset

import (
	"strings"
	"testing"
)

// A trailing '*' is nft's prefix wildcard; a '*' anywhere else, alone, or escaped has
// no single meaning and is refused, with the name in the error.
func TestInterfaceNameWildcard(t *testing.T) {
	for _, ok := range []string{"eth1", "eth*", "v*", "abcdefghijklmn*"} {
		if err := ValidateInterfaceName(ok); err != nil {
			t.Errorf("ValidateInterfaceName(%q) = %v, want nil", ok, err)
		}
	}
	for name, want := range map[string]string{
		"*":     "needs a prefix",
		"e*th":  "only allowed at the end",
		"**":    "only allowed at the end",
		"*eth":  "only allowed at the end",
		`eth\*`: "escaped",
		`eth\`:  `holds '\\'`,
	} {
		err := ValidateInterfaceName(name)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), strconvQuote(name)) {
			t.Errorf("ValidateInterfaceName(%q) = %v, want an error naming it and containing %q", name, err, want)
		}
	}
	tbl := &Table{Name: "t", Chains: []*Chain{{Name: "c", Rules: []Rule{
		{Matches: []Match{Interface{Name: "e*th"}}, Statements: []Statement{Verdict{Kind: Accept}}},
	}}}}
	if err := tbl.Validate(); err == nil || !strings.Contains(err.Error(), `"e*th"`) {
		t.Errorf("Validate of iifname \"e*th\" = %v, want an error naming it", err)
	}
}

func TestInterfaceWildcardRender(t *testing.T) {
	for _, tc := range []struct {
		m      Interface
		text   string
		prefix string
		wild   bool
	}{
		{Interface{Name: "eth*"}, `iifname "eth*"`, "eth", true},
		{Interface{Out: true, Name: "veth*", Negate: true}, `oifname != "veth*"`, "veth", true},
		{Interface{Name: "eth1"}, `iifname "eth1"`, "eth1", false},
	} {
		if got := renderMatch(tc.m); got != tc.text {
			t.Errorf("render %+v = %s, want %s", tc.m, got, tc.text)
		}
		if p, ok := tc.m.Wildcard(); ok != tc.wild || (ok && p != tc.prefix) {
			t.Errorf("%+v.Wildcard() = %q, %v; want %q, %v", tc.m, p, ok, tc.prefix, tc.wild)
		}
	}
}

func strconvQuote(s string) string { return `"` + strings.ReplaceAll(s, `\`, `\\`) + `"` }
