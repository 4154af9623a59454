package kernel

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/textdiff"
	"github.com/nftmesh/nftmesh/ruleset"
)

// The encoding of every golden ruleset, recorded: the netlink batch Apply sends, message by
// message, without root and without sending. The root tests check that what we send is
// right (nft lists it back as rendered, in TestApplyTranslationPrintsBack here and for
// every golden in package dataplane); these recordings make any change to the bytes
// visible. The recordings were made when google/nftables encoded the batches, and
// encode_linux.go keeps the bytes: TestDirectEncodingMatchesGoogle compares the two.

var update = flag.Bool("update", false, "rewrite the recorded netlink batches in testdata")

const (
	goldenDir   = "../fixtures/golden"
	intentDir   = "../fixtures/intents"
	recordedDir = "testdata"
)

type encodeCase struct {
	name   string // of the recording: testdata/<name>.batch
	golden string // the golden file the table renders to
	table  *ruleset.Table
	live   *Live // what the namespace holds: nil for a create
}

// encodeCases compiles every golden ruleset from its intent (fixtures/golden/<intent>.<target>.nft)
// for a create, and adds a replace of a host table whose pod IP sets hold elements.
func encodeCases(t *testing.T) []encodeCase {
	t.Helper()
	goldens, err := filepath.Glob(filepath.Join(goldenDir, "*.nft"))
	if err != nil || len(goldens) == 0 {
		t.Fatalf("no golden rulesets in %s: %v", goldenDir, err)
	}
	var cases []encodeCase
	for _, g := range goldens {
		name := strings.TrimSuffix(filepath.Base(g), ".nft")
		intent, target, _ := strings.Cut(name, ".")
		data, err := os.ReadFile(filepath.Join(intentDir, intent+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		in, err := compiler.Parse(data)
		if err != nil {
			t.Fatalf("%s: %v", intent, err)
		}
		tbl, err := compiler.Compile(in, compiler.Target(target))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		golden, err := os.ReadFile(g)
		if err != nil {
			t.Fatal(err)
		}
		if tbl.Render() != string(golden) {
			t.Fatalf("%s: the compiled table is not the golden one: run `just golden`", g)
		}
		cases = append(cases, encodeCase{name: name, golden: g, table: tbl})
		if name == "default-dualstack.host" {
			cases = append(cases, encodeCase{name: "replace-" + name, golden: g, table: tbl, live: withPodIPs(tbl)})
		}
	}
	return cases
}

// withPodIPs is a live table with the runtime sets of t holding elements, which a replace
// carries over.
func withPodIPs(t *ruleset.Table) *Live {
	live := &Live{Name: t.Name}
	for _, s := range t.Sets {
		ls := &LiveSet{Name: s.Name, Type: s.Type}
		if s.Runtime {
			for i, a := range []string{"10.244.0.5", "10.244.0.9", "fd00:10:244::5"} {
				if addr := netip.MustParseAddr(a); addr.Is4() == (s.Type == ruleset.SetTypeIPv4Addr) {
					ls.Elements = append(ls.Elements, LiveElement{Key: addr, Comment: fmt.Sprintf("uid-%d", i)})
				}
			}
		}
		live.Sets = append(live.Sets, ls)
	}
	return live
}

// encodeBatch encodes the transaction as Apply does and returns the batch it sends, with
// sequence numbers from 1: sendBatch numbers from the socket's counter, and nothing else
// in the bytes varies (set IDs are batch-local).
func encodeBatch(t *testing.T, c encodeCase) []byte {
	t.Helper()
	b, err := encodeApply(c.table, c.live, c.table.RuleBodies())
	if err != nil {
		t.Fatal(err)
	}
	b.stamp(1)
	return b.buf
}

// googleBatch is the same transaction encoded by google/nftables, as production did
// before encode_linux.go (google_linux_test.go), framed as sendBatch framed it.
func googleBatch(t *testing.T, c encodeCase) []byte {
	t.Helper()
	var batch []netlink.Message
	enc, err := newEncoder(func(b []netlink.Message) error {
		if batch != nil {
			t.Error("a second batch for one transaction")
		}
		batch = b
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	writes, err := queueApplyGoogle(enc.Conn, c.table, c.live, c.table.RuleBodies())
	if err != nil {
		t.Fatal(err)
	}
	if err := enc.Flush(); err != nil {
		t.Fatal(err)
	}
	if writes != len(batch)-2 {
		t.Errorf("google/nftables: %d writes for a batch of %d messages between BEGIN and END", writes, len(batch)-2)
	}
	return frameBatch(batch, 1)
}

var msgNames = map[uint16]string{
	unix.NFNL_MSG_BATCH_BEGIN: "batch-begin",
	unix.NFNL_MSG_BATCH_END:   "batch-end",
}

func init() {
	for typ, name := range map[int]string{
		unix.NFT_MSG_NEWTABLE: "newtable", unix.NFT_MSG_DELTABLE: "deltable",
		unix.NFT_MSG_NEWSET: "newset", unix.NFT_MSG_NEWSETELEM: "newsetelem", unix.NFT_MSG_DELSETELEM: "delsetelem",
		unix.NFT_MSG_NEWCHAIN: "newchain", unix.NFT_MSG_NEWRULE: "newrule",
	} {
		msgNames[uint16(unix.NFNL_SUBSYS_NFTABLES<<8|typ)] = name
	}
}

// message is one framed netlink message: its header fields and all its bytes.
type message struct {
	typ, flags uint16
	seq        uint32
	raw, body  []byte
}

func splitBatch(t *testing.T, buf []byte) []message {
	t.Helper()
	var out []message
	for len(buf) > 0 {
		l := int(binary.NativeEndian.Uint32(buf[0:4]))
		if l < unix.NLMSG_HDRLEN || l > len(buf) {
			t.Fatalf("malformed message of length %d", l)
		}
		out = append(out, message{
			typ:   binary.NativeEndian.Uint16(buf[4:6]),
			flags: binary.NativeEndian.Uint16(buf[6:8]),
			seq:   binary.NativeEndian.Uint32(buf[8:12]),
			raw:   buf[:l],
			body:  buf[unix.NLMSG_HDRLEN:l],
		})
		buf = buf[min(nlmsgAlign(l), len(buf)):]
	}
	return out
}

// nameAttr is, by message type, the attribute that names what the message writes.
var nameAttr = map[int]uint16{
	unix.NFT_MSG_NEWTABLE:   unix.NFTA_TABLE_NAME,
	unix.NFT_MSG_DELTABLE:   unix.NFTA_TABLE_NAME,
	unix.NFT_MSG_NEWSET:     unix.NFTA_SET_NAME,
	unix.NFT_MSG_NEWSETELEM: unix.NFTA_SET_ELEM_LIST_SET,
	unix.NFT_MSG_DELSETELEM: unix.NFTA_SET_ELEM_LIST_SET,
	unix.NFT_MSG_NEWCHAIN:   unix.NFTA_CHAIN_NAME,
}

// label names what a message writes: the table, set or chain, or the rule by its chain
// and stamp.
func label(m message) string {
	if m.typ>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.body) < 4 {
		return ""
	}
	ad, err := netlink.NewAttributeDecoder(m.body[4:])
	if err != nil {
		return "(undecodable: " + err.Error() + ")"
	}
	typ := int(m.typ & 0xff)
	var name, chain, stamp string
	for ad.Next() {
		switch {
		case typ == unix.NFT_MSG_NEWRULE && ad.Type() == unix.NFTA_RULE_CHAIN:
			chain = ad.String()
		case typ == unix.NFT_MSG_NEWRULE && ad.Type() == unix.NFTA_RULE_USERDATA:
			stamp, _ = userdata.GetString(ad.Bytes(), stampType)
		case ad.Type() == nameAttr[typ] && typ != unix.NFT_MSG_NEWRULE:
			name = ad.String()
		}
	}
	if typ == unix.NFT_MSG_NEWRULE {
		return chain + ": " + stamp
	}
	return name
}

// dump prints a framed batch one message a line: sequence, type, flags, length, the first
// 8 bytes of the sha256 of the whole message, and what it writes.
func dump(t *testing.T, c encodeCase, buf []byte) string {
	t.Helper()
	var b strings.Builder
	what := "create"
	if c.live != nil {
		what = "replace (its pod IP sets holding elements)"
	}
	fmt.Fprintf(&b, "# The netlink batch Conn.Apply sends to %s the table of %s.\n", what, strings.TrimPrefix(filepath.ToSlash(c.golden), "../"))
	b.WriteString("# One message a line: sequence, type, flags, length, sha256 of its bytes (first 8), what it writes.\n")
	b.WriteString("# Written by `just golden` (go test ./kernel -run 'TestEncodeGolden$' -update).\n")
	for _, m := range splitBatch(t, buf) {
		name, ok := msgNames[m.typ]
		if !ok {
			name = fmt.Sprintf("type-%#04x", m.typ)
		}
		sum := sha256.Sum256(m.raw)
		line := fmt.Sprintf("%-3d %-11s %#04x %4d %x %s", m.seq, name, m.flags, len(m.raw), sum[:8], label(m))
		b.WriteString(strings.TrimRight(line, " ") + "\n")
	}
	return b.String()
}

func TestEncodeGolden(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		// Netlink headers and some expression data (marks, registers) are native-endian.
		t.Skip("the recordings are of a little-endian machine's encoding")
	}
	cases := encodeCases(t)
	want := map[string]bool{}
	for _, c := range cases {
		path := filepath.Join(recordedDir, c.name+".batch")
		want[filepath.Base(path)] = true
		t.Run(c.name, func(t *testing.T) {
			buf := encodeBatch(t, c)
			if again := encodeBatch(t, c); string(again) != string(buf) {
				t.Fatal("encoding the same table twice gave different bytes")
			}
			got := dump(t, c, buf)
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			recorded, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run `just golden` to record it)", err)
			}
			if d := textdiff.Unified(path, "encoded", string(recorded), got); d != "" {
				t.Errorf("the netlink encoding changed (run `just golden` if intended):\n%s", d)
				// The recording keeps digests only: show the bytes of what is new.
				old := map[string]bool{}
				for _, l := range strings.Split(string(recorded), "\n") {
					old[l] = true
				}
				lines := strings.Split(got, "\n")[3:]
				for i, m := range splitBatch(t, buf) {
					if !old[lines[i]] {
						t.Logf("message %d now:\n%s", m.seq, hex.Dump(m.raw))
					}
				}
			}
		})
	}
	// A recording no golden ruleset produces is stale.
	existing, _ := filepath.Glob(filepath.Join(recordedDir, "*.batch"))
	for _, f := range existing {
		if !want[filepath.Base(f)] {
			if *update {
				os.Remove(f)
				continue
			}
			t.Errorf("stale recording %s: no golden ruleset encodes to it", f)
		}
	}
}
