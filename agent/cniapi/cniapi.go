// Package cniapi is what the CNI plugin (cmd/nftmesh-cni) and the node agent say to each
// other: one JSON request per CNI call, over HTTP on a unix socket that only root on the
// node can reach. It imports nothing of Kubernetes, so the plugin binary stays small.
package cniapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// DefaultSocket is where the agent listens for its CNI plugin.
const DefaultSocket = "/var/run/nftmesh/cni.sock"

// Request is one CNI call, with what the container runtime told the plugin.
type Request struct {
	Command      string       `json:"command"` // ADD or DEL
	ContainerID  string       `json:"containerID"`
	NetNS        string       `json:"netns"` // CNI_NETNS
	PodName      string       `json:"podName"`
	PodNamespace string       `json:"podNamespace"`
	PodUID       string       `json:"podUID"`
	IPs          []netip.Addr `json:"ips"` // from the primary CNI's prevResult
}

func (r Request) String() string {
	return fmt.Sprintf("%s %s/%s (uid %s, netns %s)", r.Command, r.PodNamespace, r.PodName, r.PodUID, r.NetNS)
}

// Check reports the first missing field, naming it.
func (r Request) Check() error {
	switch {
	case r.Command != "ADD" && r.Command != "DEL":
		return fmt.Errorf("command %q is not ADD or DEL", r.Command)
	case r.PodName == "" || r.PodNamespace == "":
		return errors.New("K8S_POD_NAME and K8S_POD_NAMESPACE are required in CNI_ARGS")
	case r.Command == "ADD" && r.NetNS == "":
		return errors.New("CNI_NETNS is required for ADD")
	}
	return nil
}

// Response is the agent's answer: whether the pod is now in the mesh, and why (or why not).
type Response struct {
	Enrolled bool   `json:"enrolled"`
	Reason   string `json:"reason"`
	Error    string `json:"error,omitempty"`
}

// Handler is the agent's side. An error from Add fails the CNI ADD, so the pod does not
// start outside the mesh.
type Handler interface {
	Add(ctx context.Context, r Request) (Response, error)
	Del(ctx context.Context, r Request) error
}

const path = "/v1/cni"

// maxRequest bounds a request body; a real one is a few hundred bytes.
const maxRequest = 1 << 20

// Server serves a Handler on a unix socket.
type Server struct {
	ln   net.Listener
	path string
	sock os.FileInfo // the socket file this server made
	srv  *http.Server
}

// Listen creates the socket (and its directory, 0700) at sock, replacing a stale one.
func Listen(sock string, h Handler, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		return nil, err
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, err
	}
	// Go would unlink the path on Close even after a newer agent (a rolling update that
	// overlaps them) has bound its own socket there: Close unlinks only ours.
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(sock, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	ours, err := os.Lstat(sock)
	if err != nil {
		ln.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+path, func(w http.ResponseWriter, req *http.Request) {
		var r Request
		dec := json.NewDecoder(io.LimitReader(req.Body, maxRequest))
		if err := dec.Decode(&r); err != nil {
			reply(w, http.StatusBadRequest, Response{Error: "bad request: " + err.Error()})
			return
		}
		if err := r.Check(); err != nil {
			reply(w, http.StatusBadRequest, Response{Error: err.Error()})
			return
		}
		if r.Command == "DEL" {
			if err := h.Del(req.Context(), r); err != nil {
				log.Warn("cni del failed", "request", r.String(), "error", err)
				reply(w, http.StatusInternalServerError, Response{Error: err.Error()})
				return
			}
			reply(w, http.StatusOK, Response{})
			return
		}
		resp, err := h.Add(req.Context(), r)
		if err != nil {
			log.Error("cni add failed", "request", r.String(), "error", err)
			resp.Error = err.Error()
			reply(w, http.StatusInternalServerError, resp)
			return
		}
		reply(w, http.StatusOK, resp)
	})
	s := &Server{ln: ln, path: sock, sock: ours, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}}
	go s.srv.Serve(ln)
	return s, nil
}

func reply(w http.ResponseWriter, code int, r Response) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(r)
}

// Close stops serving (calls in progress are cut) and removes the socket, if it is still
// the one this server made.
func (s *Server) Close() error {
	err := s.srv.Close()
	if fi, lerr := os.Lstat(s.path); lerr == nil && os.SameFile(fi, s.sock) {
		os.Remove(s.path)
	}
	return err
}

// ErrAgentUnreachable is a call that never reached the agent (not running, no socket).
var ErrAgentUnreachable = errors.New("nftmesh agent unreachable")

// Call sends r to the agent at sock and waits for its answer until ctx ends. An error
// Response comes back as an error with the agent's text.
func Call(ctx context.Context, sock string, r Request) (Response, error) {
	body, err := json.Marshal(r)
	if err != nil {
		return Response{}, err
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent"+path, bytes.NewReader(body))
	if err != nil {
		return Response{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return Response{}, fmt.Errorf("%w at %s: %w", ErrAgentUnreachable, sock, err)
		}
		return Response{}, err
	}
	defer resp.Body.Close()
	var out Response
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxRequest)).Decode(&out); err != nil {
		return Response{}, fmt.Errorf("agent answered %s: %w", resp.Status, err)
	}
	if resp.StatusCode != http.StatusOK {
		return out, fmt.Errorf("agent: %s", out.Error)
	}
	return out, nil
}
