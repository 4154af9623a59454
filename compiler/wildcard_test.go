package compiler

import (
	"strings"
	"testing"
)

// rerouteVirtualInterfaces: a trailing '*' is a prefix wildcard (as nft reads it); any
// other '*', an escaped one, or a wildcard that matches "lo" is an error naming the field
// and the value.
func TestRerouteWildcard(t *testing.T) {
	for _, tc := range []struct {
		names string
		want  []string // empty: accepted
	}{
		{`["eth*", eth1]`, nil},
		{`["e*th"]`, []string{"spec.pod.rerouteVirtualInterfaces[0]", `"e*th"`, "only allowed at the end"}},
		{`[eth0, "eth\\*"]`, []string{"spec.pod.rerouteVirtualInterfaces[1]", `"eth\\*"`, "escaped"}},
		{`["*"]`, []string{"spec.pod.rerouteVirtualInterfaces[0]", `"*"`}},
		{`["l*"]`, []string{"spec.pod.rerouteVirtualInterfaces[0]", `"l*" matches "lo"`}},
		{`["lo*"]`, []string{"spec.pod.rerouteVirtualInterfaces[0]", `"lo*" matches "lo"`}},
	} {
		in, err := Parse([]byte(header + "spec:\n  pod:\n    rerouteVirtualInterfaces: " + tc.names + "\n"))
		if err != nil {
			t.Fatalf("%s: %v", tc.names, err)
		}
		tbl, err := Compile(in, TargetPod)
		if tc.want == nil {
			if err != nil {
				t.Errorf("%s: %v", tc.names, err)
			} else if !strings.Contains(tbl.Render(), `iifname "eth*" meta l4proto tcp redirect to :15001`) {
				t.Errorf("%s: no wildcard rule in\n%s", tc.names, tbl.Render())
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: accepted", tc.names)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not contain %q", tc.names, err, w)
			}
		}
	}
}
