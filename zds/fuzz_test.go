package zds

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/nftmesh/nftmesh/internal/netns"
	"github.com/nftmesh/nftmesh/zds/zdspb"
)

// fuzzHandler accepts everything and closes what it is given.
type fuzzHandler struct{ adds, keeps, dels, snapshots int }

func (h *fuzzHandler) AddWorkload(_ context.Context, uid string, _ WorkloadInfo, ns *netns.NS) error {
	h.adds++
	return ns.Close()
}
func (h *fuzzHandler) KeepWorkload(context.Context, string) error { h.keeps++; return nil }
func (h *fuzzHandler) DelWorkload(context.Context, string) error  { h.dels++; return nil }
func (h *fuzzHandler) SnapshotDone(context.Context, map[string]bool) error {
	h.snapshots++
	return nil
}

func marshalReq(f *testing.F, r *zdspb.WorkloadRequest) []byte {
	f.Helper()
	b, err := proto.Marshal(r)
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzClientHandle is what the proxy does with one packet from the agent: the message bytes
// (fuzzed) and the descriptors that came with it (none, the proxy's own network namespace,
// /dev/null, or two). It must never panic; every descriptor must be closed or handed to the
// handler (which closes it); an Add reaches the handler only with a uid and exactly one
// network namespace; a refused request is an error that says what was wrong; and a
// second SnapshotSent, or a Keep after the snapshot, is refused.
//
//	go test ./zds -run '^$' -fuzz FuzzClientHandle -fuzztime 60s
func FuzzClientHandle(f *testing.F) {
	info := &zdspb.WorkloadInfo{Name: "httpbin-1", Namespace: "demo", ServiceAccount: "httpbin"}
	add := marshalReq(f, &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Add{Add: &zdspb.AddWorkload{Uid: "uid-1", WorkloadInfo: info}}})
	keep := marshalReq(f, &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Keep{Keep: &zdspb.KeepWorkload{Uid: "uid-2"}}})
	del := marshalReq(f, &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_Del{Del: &zdspb.DelWorkload{Uid: "uid-1"}}})
	snap := marshalReq(f, &zdspb.WorkloadRequest{Payload: &zdspb.WorkloadRequest_SnapshotSent{SnapshotSent: &zdspb.SnapshotSent{}}})
	// fds: 0 none, 1 our netns, 2 /dev/null, 3 netns and /dev/null. repeat: send it twice.
	for _, fds := range []uint8{0, 1, 2, 3} {
		f.Add(add, fds, false)
	}
	f.Add(keep, uint8(0), true)
	f.Add(keep, uint8(1), false)
	f.Add(del, uint8(0), false)
	f.Add(snap, uint8(0), true)
	f.Add(append(append([]byte(nil), snap...), keep...), uint8(0), true) // SnapshotSent then Keep: last wins
	f.Add([]byte{}, uint8(0), false)
	f.Add([]byte{0xb2, 0x06, 0x00}, uint8(1), false) // unknown field 102
	f.Add([]byte{0x0a, 0xff}, uint8(0), false)       // truncated
	f.Fuzz(func(t *testing.T, data []byte, fds uint8, repeat bool) {
		h := &fuzzHandler{}
		s := &clientSession{c: &Client{Handler: h}, named: map[string]bool{}}
		var req zdspb.WorkloadRequest
		decodes := proto.Unmarshal(data, &req) == nil
		rounds := 1
		if repeat {
			rounds = 2
		}
		for round := 0; round < rounds; round++ {
			files := openFiles(t, fds%4)
			before := *h
			wasDone := s.snapshotDone
			err := s.handle(context.Background(), data, files)
			for _, f := range files {
				if f.Fd() != ^uintptr(0) {
					t.Fatalf("descriptor %s left open (err %v)", f.Name(), err)
				}
			}
			if err != nil && (err.Error() == "" || !strings.HasPrefix(err.Error(), "zds: ")) {
				t.Fatalf("error %q does not say it is ZDS's", err)
			}
			if !decodes {
				if !errors.Is(err, errMalformed) {
					t.Fatalf("undecodable message: error %v, want malformed", err)
				}
				continue
			}
			if _, isAdd := req.Payload.(*zdspb.WorkloadRequest_Add); !isAdd && fds%4 != 0 {
				if err == nil || *h != before {
					t.Fatalf("descriptors accepted with a request other than Add (err %v)", err)
				}
				continue
			}
			switch p := req.Payload.(type) {
			case *zdspb.WorkloadRequest_Add:
				handed := h.adds - before.adds
				wantHanded := p.Add.GetUid() != "" && fds%4 == 1
				if (handed == 1) != wantHanded || (err == nil) != wantHanded {
					t.Fatalf("add uid %q with fds %d: handed %d, err %v", p.Add.GetUid(), fds%4, handed, err)
				}
			case *zdspb.WorkloadRequest_Keep:
				if wasDone && err == nil {
					t.Fatal("keep after the snapshot accepted")
				}
			case *zdspb.WorkloadRequest_SnapshotSent:
				if wasDone != (err != nil) {
					t.Fatalf("SnapshotSent with snapshotDone=%v: err %v", wasDone, err)
				}
				if err == nil && h.snapshots != before.snapshots+1 {
					t.Fatal("SnapshotSent accepted but not handed over")
				}
			case nil:
				if err == nil {
					t.Fatal("a request without a known payload was accepted")
				}
			}
		}
	})
}

// openFiles opens what a packet carries: 0 nothing, 1 the process's network namespace,
// 2 /dev/null (not a namespace), 3 both.
func openFiles(t *testing.T, kind uint8) []*os.File {
	t.Helper()
	var files []*os.File
	open := func(path string) {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	if kind&1 != 0 {
		open("/proc/thread-self/ns/net")
	}
	if kind&2 != 0 {
		open(os.DevNull)
	}
	return files
}
