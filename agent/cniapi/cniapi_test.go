package cniapi

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

type okHandler struct{}

func (okHandler) Add(ctx context.Context, r Request) (Response, error) {
	return Response{Enrolled: true}, nil
}
func (okHandler) Del(ctx context.Context, r Request) error { return nil }

// An old agent that stops after a new one has bound the socket (a rolling update that
// overlaps them) leaves the new one's socket in place.
func TestOldAgentKeepsNewSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "cni.sock")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	old, err := Listen(sock, okHandler{}, log)
	if err != nil {
		t.Fatal(err)
	}
	cur, err := Listen(sock, okHandler{}, log)
	if err != nil {
		t.Fatal(err)
	}
	old.Close()
	if _, err := Call(context.Background(), sock, Request{Command: "ADD", PodName: "a", PodNamespace: "b", NetNS: "/x"}); err != nil {
		t.Fatalf("ADD to the new agent after the old one closed: %v", err)
	}
	cur.Close()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("the last agent's Close left its socket: %v", err)
	}
}
