package policy

import (
	"net/netip"
	"strings"
	"testing"
)

func warningsOf(p *Policy) string {
	var b strings.Builder
	for _, w := range p.Warnings {
		b.WriteString(w.String() + "\n")
	}
	return b.String()
}

// A DENY (or ALLOW) on an IPv4-mapped IPv6 range never matches: connection addresses
// are unmapped before they are compared. Lint says so and gives the IPv4 form.
func TestWarnMappedIPv6(t *testing.T) {
	ps := mustParse(t, doc("app", "deny-mapped", `
		action: DENY
		rules:
		- from:
		  - source: {ipBlocks: ["::ffff:10.0.0.0/104", 10.1.0.0/16], notIpBlocks: ["::ffff:10.0.0.7"]}
		  when:
		  - {key: destination.ip, values: ["::ffff:192.168.0.0/120"]}
		`), Options{})
	got := warningsOf(ps[0])
	for _, w := range []string{
		`app/deny-mapped: rule 0: from[0].source.ipBlocks[0]: "::ffff:10.0.0.0/104" is an IPv4-mapped IPv6 address, but IPv4 connections are compared in their IPv4 form, so it never matches a connection; write "10.0.0.0/8"`,
		`from[0].source.notIpBlocks[0]: "::ffff:10.0.0.7" is an IPv4-mapped IPv6 address`,
		`so it never excludes a connection; write "10.0.0.7"`,
		`when[0].values[0]: "::ffff:192.168.0.0/120"`,
		`write "192.168.0.0/24"`,
	} {
		if !strings.Contains(got, w) {
			t.Errorf("warnings lack %q:\n%s", w, got)
		}
	}
	if strings.Contains(got, "10.1.0.0/16") {
		t.Errorf("a plain IPv4 block is warned about:\n%s", got)
	}
	// The warning is true: the mapped block does not deny 10.0.0.1, the IPv4 one does.
	snap := mustStore(t, Options{}, ps...).Snapshot()
	c := Connection{SrcIP: netip.MustParseAddr("10.0.0.1"), DstIP: netip.MustParseAddr("10.9.9.9"), DstPort: 80}
	if !snap.Decide(c, Workload{Namespace: "app"}).Allow {
		t.Error("a mapped DENY block matched an IPv4 source")
	}
}

// Port "0" is accepted by Istio's validation but no connection has it.
func TestWarnPortZero(t *testing.T) {
	ps := mustParse(t, doc("app", "zero", `
		rules:
		- to:
		  - operation: {ports: ["0", "80"], notPorts: ["0"]}
		- when:
		  - {key: destination.port, values: ["0"]}
		`), Options{})
	got := warningsOf(ps[0])
	for _, w := range []string{
		`app/zero: rule 0: to[0].operation.ports[0]: port "0": no connection has destination port 0, so it never matches a connection`,
		`app/zero: rule 0: to[0].operation.notPorts[0]: port "0": no connection has destination port 0, so it excludes no connection`,
		`app/zero: rule 1: when[0].values[0]: port "0"`,
	} {
		if !strings.Contains(got, w) {
			t.Errorf("warnings lack %q:\n%s", w, got)
		}
	}
	if strings.Contains(got, `"80"`) {
		t.Errorf("port 80 is warned about:\n%s", got)
	}
}

// Two policies with one namespace/name: the store keeps the last; both get a warning.
func TestWarnDuplicates(t *testing.T) {
	ps := mustParse(t, docs(doc("app", "a", "action: DENY\nrules: [{}]"), doc("app", "b", "{}"), doc("other", "a", "{}"), doc("app", "a", "{}")), Options{})
	WarnDuplicates(ps, []string{"f.yaml object 1", "f.yaml object 2", "f.yaml object 3", "g.yaml object 1"})
	if got := warningsOf(ps[0]); !strings.Contains(got, "app/a: app/a is defined again later (g.yaml object 1 replaces this one, f.yaml object 1), so this one is not enforced") {
		t.Errorf("first app/a: %q", got)
	}
	if got := warningsOf(ps[3]); !strings.Contains(got, "app/a: app/a is defined 2 times (here, g.yaml object 1); this last one replaces the others") {
		t.Errorf("last app/a: %q", got)
	}
	for _, i := range []int{1, 2} {
		if len(ps[i].Warnings) != 0 {
			t.Errorf("%s warned: %v", ps[i].Key(), ps[i].Warnings)
		}
	}
	WarnDuplicates(ps[1:3], nil) // no duplicates, no origins
	if len(ps[1].Warnings)+len(ps[2].Warnings) != 0 {
		t.Error("warnings without duplicates")
	}
}
