package kernel

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/ruleset"
)

// The direct encoding (encode_linux.go) must produce exactly the bytes google/nftables
// produced for the same transaction (google_linux_test.go), as sendBatch framed them:
// those are the bytes the recordings in testdata hold and that the root tests checked
// against nft. No root needed.

// sameBatch compares two framed batches message by message and reports the first
// message that differs: its position, what it writes, the offset of the first differing
// byte (in the message and in the batch), and both messages in hex.
func sameBatch(t *testing.T, direct, google []byte) {
	t.Helper()
	if bytes.Equal(direct, google) {
		return
	}
	d, g := splitBatch(t, direct), splitBatch(t, google)
	at := 0 // offset of message i in the batch
	for i := 0; i < min(len(d), len(g)); i++ {
		if !bytes.Equal(d[i].raw, g[i].raw) {
			off := 0
			for off < min(len(d[i].raw), len(g[i].raw)) && d[i].raw[off] == g[i].raw[off] {
				off++
			}
			t.Fatalf("message %d of %d (%s %s) differs at byte %d (batch offset %d): direct %d bytes, google/nftables %d bytes\ndirect:\n%sgoogle/nftables:\n%s",
				i, len(g), msgName(g[i].typ), label(g[i]), off, at+off, len(d[i].raw), len(g[i].raw), hex.Dump(d[i].raw), hex.Dump(g[i].raw))
		}
		at += nlmsgAlign(len(g[i].raw))
	}
	t.Fatalf("the batches hold %d (direct) and %d (google/nftables) messages; the first %d are equal", len(d), len(g), min(len(d), len(g)))
}

func msgName(typ uint16) string {
	if n, ok := msgNames[typ]; ok {
		return n
	}
	return fmt.Sprintf("type-%#04x", typ)
}

// Every golden intent (creates, and the replace carrying elements) encodes to the same
// bytes both ways.
func TestDirectEncodingMatchesGoogle(t *testing.T) {
	for _, c := range encodeCases(t) {
		t.Run(c.name, func(t *testing.T) {
			compareEncodings(t, c)
		})
	}
}

func compareEncodings(t *testing.T, c encodeCase) {
	t.Helper()
	b, err := encodeApply(c.table, c.live, c.table.RuleBodies())
	if err != nil {
		t.Fatal(err)
	}
	b.stamp(1)
	google := googleBatch(t, c)
	sameBatch(t, b.buf, google)
	if n := len(splitBatch(t, google)) - 2; b.writes() != n {
		t.Errorf("direct encoding counts %d writes, the batch holds %d", b.writes(), n)
	}
}

// Edge cases beyond the goldens: every construct of the model, a replace whose runtime
// sets hold more elements (with the longest comments) than one message carries, sets
// with no elements, a pod intent with many rules.
func TestDirectEncodingEdgeCases(t *testing.T) {
	every := everyConstruct()
	host := hostTable(t)
	big := &Live{Name: host.Name}
	for _, s := range host.Sets {
		ls := &LiveSet{Name: s.Name, Type: s.Type}
		for i := range 12000 {
			a := podIPv4(i)
			if s.Type == ruleset.SetTypeIPv6Addr {
				a = podIPv6(i)
			}
			ls.Elements = append(ls.Elements, LiveElement{Key: a, Comment: strings.Repeat("u", 250)})
		}
		big.Sets = append(big.Sets, ls)
	}
	noComments := &Live{Name: host.Name}
	for _, s := range big.Sets {
		ls := &LiveSet{Name: s.Name, Type: s.Type}
		for _, e := range s.Elements {
			ls.Elements = append(ls.Elements, LiveElement{Key: e.Key})
		}
		noComments.Sets = append(noComments.Sets, ls)
	}
	// A live table whose sets differ from the desired ones in type, or hold ports: only
	// a runtime set of the same name and type carries its elements.
	mixed := withPodIPs(host)
	mixed.Sets = append(mixed.Sets, &LiveSet{Name: host.Sets[0].Name, Type: ruleset.SetTypeInetService, Elements: []LiveElement{{Port: 53, Comment: "x"}}})
	runtimePorts := &ruleset.Table{Name: "t", Sets: []*ruleset.Set{{Name: "p", Type: ruleset.SetTypeInetService, Runtime: true, Ports: []uint16{1}}}}
	cases := []encodeCase{
		{name: "every construct", table: every},
		{name: "every construct, replace", table: every, live: &Live{Name: every.Name}},
		{name: "host, replace carrying 2x12000 elements", table: host, live: big},
		{name: "host, replace carrying 2x12000 elements without comments", table: host, live: noComments},
		{name: "host, replace with sets of other types", table: host, live: mixed},
		{name: "runtime ports, create", table: runtimePorts},
		{name: "runtime ports, replace", table: runtimePorts, live: &Live{Name: "t", Sets: []*LiveSet{{Name: "p", Type: ruleset.SetTypeInetService, Elements: []LiveElement{{Port: 8080, Comment: "a"}, {Port: 53}}}}}},
		{name: "1000 reroute interfaces", table: rerouteTable(t, 1000)},
		{name: "empty table", table: &ruleset.Table{Name: "empty"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { compareEncodings(t, c) })
	}
}

// Deleting the table, and the single-element changes of AddElement and DeleteElement.
func TestDirectEncodingOfSmallTransactions(t *testing.T) {
	google := func(queue func(*nftables.Conn) error) []byte {
		t.Helper()
		var batch []netlink.Message
		enc, err := newEncoder(func(b []netlink.Message) error { batch = b; return nil })
		if err != nil {
			t.Fatal(err)
		}
		if err := queue(enc.Conn); err != nil {
			t.Fatal(err)
		}
		if err := enc.Flush(); err != nil {
			t.Fatal(err)
		}
		return frameBatch(batch, 1)
	}
	direct := func(b *batch) []byte { b.stamp(1); return b.buf }

	t.Run("delete table", func(t *testing.T) {
		sameBatch(t, direct(encodeDelete("nftmesh")), google(func(c *nftables.Conn) error {
			c.DelTable(nfTable("nftmesh"))
			return nil
		}))
	})
	for _, addr := range []netip.Addr{netip.MustParseAddr("10.244.1.7"), netip.MustParseAddr("fd00:10:244::1:7")} {
		typ := ruleset.SetTypeIPv4Addr
		if addr.Is6() {
			typ = ruleset.SetTypeIPv6Addr
		}
		set := &nftables.Set{Table: nfTable("nftmesh"), Name: "pod_ips", KeyType: setTypes[typ]}
		owner := "0b0e2c3a-5d6f-4a1b-9c8d-7e6f5a4b3c2d"
		for _, c := range []struct {
			name     string
			del, add bool
		}{{"add", false, true}, {"hand over", true, true}, {"delete", true, false}} {
			t.Run(c.name+" "+addr.String(), func(t *testing.T) {
				comment := owner
				if !c.add {
					comment = ""
				}
				sameBatch(t, direct(encodeElementChange("nftmesh", "pod_ips", addr, comment, c.del, c.add)), google(func(conn *nftables.Conn) error {
					if c.del {
						if err := conn.SetDeleteElements(set, []nftables.SetElement{{Key: addr.AsSlice()}}); err != nil {
							return err
						}
					}
					if c.add {
						return conn.SetAddElements(set, []nftables.SetElement{{Key: addr.AsSlice(), Comment: owner}})
					}
					return nil
				}))
			})
		}
	}
}

// A lookup of a set the table does not define fails both ways, with the same words.
func TestDirectEncodingUndefinedSet(t *testing.T) {
	tbl := &ruleset.Table{Name: "t", Chains: []*ruleset.Chain{{Name: "c", Rules: []ruleset.Rule{{
		Matches:    []ruleset.Match{ruleset.Addr{Family: ruleset.IPv4, Dir: ruleset.Source, Set: "nope"}},
		Statements: []ruleset.Statement{ruleset.Verdict{Kind: ruleset.Accept}},
	}}}}}
	_, err := encodeApply(tbl, nil, tbl.RuleBodies())
	enc, _ := newEncoder(func([]netlink.Message) error { return nil })
	_, gerr := queueApplyGoogle(enc.Conn, tbl, nil, tbl.RuleBodies())
	if err == nil || gerr == nil || err.Error() != gerr.Error() {
		t.Errorf("direct: %v; google/nftables: %v; want the same error", err, gerr)
	}
}

// FuzzDirectEncoding compiles intents (the fixtures seed the corpus) for both targets and
// compares both encodings of the create and of a replace carrying elements.
func FuzzDirectEncoding(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(intentDir, "*.yaml"))
	if len(files) == 0 {
		f.Fatal("no intents to seed the corpus")
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		in, err := compiler.Parse(data)
		if err != nil {
			return
		}
		for _, target := range []compiler.Target{compiler.TargetPod, compiler.TargetHost} {
			tbl, err := compiler.Compile(in, target)
			if err != nil {
				continue
			}
			if tbl.ValidateBodies(tbl.RuleBodies()) != nil {
				continue // Apply refuses it before encoding
			}
			compareEncodings(t, encodeCase{table: tbl})
			compareEncodings(t, encodeCase{table: tbl, live: withPodIPs(tbl)})
		}
	})
}
