package kernel

import (
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/internal/nettest"
	"github.com/nftmesh/nftmesh/ruleset"
)

// Every golden ruleset, applied through netlink (not `nft -f`), must be printed back by
// nft exactly as rendered: text and netlink encoding mean the same thing. This covers
// fixtures/intents/wildcard-interfaces-*.yaml, whose `iifname "veth*"` is a prefix
// wildcard in both.
func TestApplyEveryGoldenPrintsBack(t *testing.T) {
	nettest.Require(t, "nft")
	for _, c := range encodeCases(t) {
		if c.live != nil {
			continue // a replace; the create of the same golden is here
		}
		t.Run(c.name, func(t *testing.T) {
			want, err := os.ReadFile(c.golden)
			if err != nil {
				t.Fatal(err)
			}
			ns := nettest.New(t)
			conn := openNS(t, ns)
			if _, err := conn.Apply(c.table, nil); err != nil {
				t.Fatal(err)
			}
			if got := nftList(t, ns, c.table.Name); got != string(want) {
				t.Errorf("nft lists the applied golden differently:\n%s", lineDiff(string(want), got))
			}
		})
	}
}

// wildcardTable counts UDP arriving on interfaces named by prefix and exactly.
func wildcardTable() *ruleset.Table {
	udp := ruleset.MetaL4Proto{Proto: ruleset.UDP}
	count := []ruleset.Statement{ruleset.Counter{}}
	rule := func(name string, negate bool, comment string) ruleset.Rule {
		return ruleset.Rule{Matches: []ruleset.Match{ruleset.Interface{Name: name, Negate: negate}, udp}, Statements: count, Comment: comment}
	}
	return &ruleset.Table{Name: "nftmesh", Chains: []*ruleset.Chain{
		{Name: "raw_prerouting", Base: &ruleset.BaseChain{Type: ruleset.ChainTypeFilter, Hook: ruleset.HookPrerouting, Priority: ruleset.PriorityRaw}, Rules: []ruleset.Rule{
			rule("eth*", false, "wild"),
			rule("e*", false, "short"),
			rule("eth1", false, "exact"),
			rule("eth", false, "bare"),
			rule("eth*", true, "notwild"),
			rule("veth*", false, "other"),
		}},
		{Name: "raw_output", Base: &ruleset.BaseChain{Type: ruleset.ChainTypeFilter, Hook: ruleset.HookOutput, Priority: ruleset.PriorityRaw}, Rules: []ruleset.Rule{
			{Matches: []ruleset.Match{ruleset.Interface{Out: true, Name: "veth*", Negate: true}, udp}, Statements: count, Comment: "out"},
		}},
	}}
}

// `iifname "eth*"` applied through netlink is nft's prefix wildcard: nft prints it back
// as written (a literal "eth*" would print as "eth\*"), and a packet arriving on eth1
// matches it (and "e*", and "eth1"), but not "eth", "veth*" or `!= "eth*"`.
func TestInterfaceWildcard(t *testing.T) {
	nettest.Require(t, "nft")
	tbl := wildcardTable()
	if err := tbl.Validate(); err != nil {
		t.Fatal(err)
	}
	pod, peer := nettest.New(t), nettest.New(t)
	pod.IP(t,
		"link add eth1 type veth peer name peer1 netns "+peer.Name,
		"addr add 10.249.0.1/24 dev eth1",
		"link set eth1 up")
	peer.IP(t,
		"addr add 10.249.0.2/24 dev peer1",
		"link set peer1 up")
	pod.WaitUp(t, "eth1")
	peer.WaitUp(t, "peer1")

	conn := openNS(t, pod)
	if _, err := conn.Apply(tbl, nil); err != nil {
		t.Fatal(err)
	}
	if got := nftList(t, pod, tbl.Name); got != tbl.Render() {
		t.Fatalf("nft lists the applied table differently:\n%s", lineDiff(tbl.Render(), got))
	}

	err := peer.Do(func() error {
		// A socket per packet: the port unreachable that answers one would fail the
		// next write on the same connected socket.
		for i := 0; i < 3; i++ {
			c, err := net.Dial("udp4", "10.249.0.1:9")
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("x"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"wild": true, "short": true, "exact": true, "bare": false, "notwild": false, "other": false}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := ruleCounters(t, pod)
		ok := true
		for comment, hit := range want {
			if (got[comment] > 0) != hit {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("packets per rule %v; want a hit exactly on %v", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var counterLine = regexp.MustCompile(`counter packets (\d+) bytes \d+ comment "([^"]*)"`)

// ruleCounters maps each rule's comment to its packet count.
func ruleCounters(t *testing.T, ns *nettest.Netns) map[string]int {
	t.Helper()
	out := ns.MustRun(t, "nft", "list", "table", "inet", "nftmesh")
	got := map[string]int{}
	for _, l := range strings.Split(out, "\n") {
		if m := counterLine.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			got[m[2]] = n
		}
	}
	return got
}
