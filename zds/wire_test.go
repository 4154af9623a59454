package zds

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/nftmesh/nftmesh/zds/zdspb"
)

// These tests pin the wire format to Istio's field numbers without trusting the generated code:
// the bytes are taken apart (or built) with protowire alone.

// wf is one expected field: number, wire type, and a value that is a uint64 (varint), a string
// (bytes, compared raw) or a []wf (bytes holding a nested message).
type wf struct {
	num protowire.Number
	typ protowire.Type
	val any
}

func checkFields(t *testing.T, path string, b []byte, want []wf) {
	t.Helper()
	for i, w := range want {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			t.Fatalf("%s field #%d: bad tag: %v (rest %x)", path, i, protowire.ParseError(n), b)
		}
		b = b[n:]
		if num != w.num || typ != w.typ {
			t.Fatalf("%s field #%d: got number %d type %d, want number %d type %d", path, i, num, typ, w.num, w.typ)
		}
		where := fmt.Sprintf("%s.%d", path, num)
		switch typ {
		case protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				t.Fatalf("%s: bad varint", where)
			}
			b = b[n:]
			if v != w.val.(uint64) {
				t.Errorf("%s = %d, want %d", where, v, w.val)
			}
		case protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				t.Fatalf("%s: bad length-delimited value", where)
			}
			b = b[n:]
			switch wv := w.val.(type) {
			case string:
				if string(v) != wv {
					t.Errorf("%s = %q, want %q", where, v, wv)
				}
			case []wf:
				checkFields(t, where, v, wv)
			default:
				t.Fatalf("%s: bad expectation %T", where, w.val)
			}
		default:
			t.Fatalf("%s: unexpected wire type %d", where, typ)
		}
	}
	if len(b) != 0 {
		t.Errorf("%s: %d unexpected trailing bytes %x", path, len(b), b)
	}
}

func TestWireEncoding(t *testing.T) {
	const bt, vt = protowire.BytesType, protowire.VarintType
	info := &zdspb.WorkloadInfo{Name: "sleep-1", Namespace: "default", ServiceAccount: "sleep"}
	tests := []struct {
		name string
		msg  proto.Message
		want []wf
	}{
		{"hello V1", &zdspb.ZdsHello{Version: zdspb.Version_V1}, []wf{{1, vt, uint64(1)}}},
		{"hello NOT_USED is empty", &zdspb.ZdsHello{}, nil},
		{"workload info", info, []wf{{1, bt, "sleep-1"}, {2, bt, "default"}, {3, bt, "sleep"}}},
		{"request add", &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Add{Add: &zdspb.AddWorkload{Uid: "u1", WorkloadInfo: info}}},
			[]wf{{1, bt, []wf{{1, bt, "u1"}, {2, bt, []wf{{1, bt, "sleep-1"}, {2, bt, "default"}, {3, bt, "sleep"}}}}}}},
		{"request keep is field 5", &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Keep{Keep: &zdspb.KeepWorkload{Uid: "u2"}}},
			[]wf{{5, bt, []wf{{1, bt, "u2"}}}}},
		{"request del, uid is field 2", &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Del{Del: &zdspb.DelWorkload{Uid: "u3"}}},
			[]wf{{2, bt, []wf{{2, bt, "u3"}}}}},
		{"request snapshot sent", &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_SnapshotSent{SnapshotSent: &zdspb.SnapshotSent{}}},
			[]wf{{3, bt, []wf{}}}},
		{"response ack ok", &zdspb.WorkloadResponse{Payload: &zdspb.WorkloadResponse_Ack{Ack: &zdspb.Ack{}}},
			[]wf{{1, bt, []wf{}}}},
		{"response ack error", &zdspb.WorkloadResponse{Payload: &zdspb.WorkloadResponse_Ack{Ack: &zdspb.Ack{Error: "boom"}}},
			[]wf{{1, bt, []wf{{1, bt, "boom"}}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := proto.MarshalOptions{Deterministic: true}.Marshal(tt.msg)
			if err != nil {
				t.Fatal(err)
			}
			checkFields(t, "", b, tt.want)
		})
	}
}

// TestWireDecoding builds messages byte by byte, the way another implementation (Istio's agent or
// ztunnel) would put them on the wire, and reads them with the generated types.
func TestWireDecoding(t *testing.T) {
	msg := func(fields ...[]byte) []byte { return bytes.Join(fields, nil) }
	str := func(num protowire.Number, s string) []byte {
		return protowire.AppendString(protowire.AppendTag(nil, num, protowire.BytesType), s)
	}
	sub := func(num protowire.Number, b []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), b)
	}

	t.Run("hello", func(t *testing.T) {
		var h zdspb.ZdsHello
		b := protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 1)
		if err := proto.Unmarshal(b, &h); err != nil || h.GetVersion() != zdspb.Version_V1 {
			t.Fatalf("got %v, %v; want V1", h.GetVersion(), err)
		}
	})
	tests := []struct {
		name string
		b    []byte
		want *zdspb.WorkloadRequest
	}{
		{"add", sub(1, msg(str(1, "u1"), sub(2, msg(str(1, "n"), str(2, "ns"), str(3, "sa"))))),
			&zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Add{Add: &zdspb.AddWorkload{Uid: "u1",
				WorkloadInfo: &zdspb.WorkloadInfo{Name: "n", Namespace: "ns", ServiceAccount: "sa"}}}}},
		{"keep", sub(5, str(1, "u2")), &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Keep{Keep: &zdspb.KeepWorkload{Uid: "u2"}}}},
		{"del", sub(2, str(2, "u3")), &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Del{Del: &zdspb.DelWorkload{Uid: "u3"}}}},
		{"snapshot sent", sub(3, nil), &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_SnapshotSent{SnapshotSent: &zdspb.SnapshotSent{}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got zdspb.WorkloadRequest
			if err := proto.Unmarshal(tt.b, &got); err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(&got, tt.want) {
				t.Fatalf("got %v, want %v", &got, tt.want)
			}
		})
	}
	t.Run("ack", func(t *testing.T) {
		var r zdspb.WorkloadResponse
		if err := proto.Unmarshal(sub(1, str(1, "nope")), &r); err != nil || r.GetAck() == nil || r.GetAck().GetError() != "nope" {
			t.Fatalf("got %v, %v", &r, err)
		}
	})
}

// TestDescriptor checks the names another implementation sees (package, messages, enum values).
func TestDescriptor(t *testing.T) {
	fd := zdspb.File_zds_zds_proto
	if got := fd.Package(); got != "istio.workload.zds" {
		t.Fatalf("package %q", got)
	}
	var names []string
	for i := 0; i < fd.Messages().Len(); i++ {
		names = append(names, string(fd.Messages().Get(i).Name()))
	}
	want := "ZdsHello WorkloadInfo AddWorkload KeepWorkload DelWorkload SnapshotSent WorkloadRequest Ack WorkloadResponse"
	if got := strings.Join(names, " "); got != want {
		t.Errorf("messages %q, want %q", got, want)
	}
	v := fd.Enums().ByName("Version").Values()
	if v.Len() != 2 || v.ByNumber(0).Name() != "NOT_USED" || v.ByNumber(1).Name() != "V1" {
		t.Errorf("enum Version wrong")
	}
	oneof := fd.Messages().ByName("WorkloadRequest").Oneofs().ByName("payload")
	fields := map[protoreflect.Name]protoreflect.FieldNumber{}
	for i := 0; i < oneof.Fields().Len(); i++ {
		f := oneof.Fields().Get(i)
		fields[f.Name()] = f.Number()
	}
	if fmt.Sprint(fields) != "map[add:1 del:2 keep:5 snapshot_sent:3]" {
		t.Errorf("WorkloadRequest.payload = %v", fields)
	}
}
