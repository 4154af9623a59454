package hbone

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// nodeClient is an HBONE client written against Node's own HTTP/2 stack (nghttp2 inside),
// so the server is checked against an implementation that is not Go's. It prints one JSON
// object on stdout.
const nodeClient = `'use strict';
const http2 = require('http2');
const fs = require('fs');
const [hbone, echoAuthority, denyAuthority, caFile, certFile, keyFile, serverID] = process.argv.slice(2);
const out = {};
const done = (err) => {
  if (err) out.error = String(err && err.stack || err);
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
};
setTimeout(() => done('timeout'), 20000).unref();

const client = http2.connect('https://' + hbone, {
  ca: fs.readFileSync(caFile),
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
  minVersion: 'TLSv1.3',
  maxVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  rejectUnauthorized: true,
  // Mesh identity, not a host name: the server must present the expected SPIFFE id.
  checkServerIdentity: (host, cert) =>
    (cert.subjectaltname || '').split(', ').includes('URI:' + serverID)
      ? undefined : new Error('unexpected server identity: ' + cert.subjectaltname),
});
client.on('error', done);
client.on('connect', (session, socket) => {
  out.alpn = socket.alpnProtocol;
  out.tls = socket.getProtocol();
});

function connect(authority) {
  return client.request({ ':method': 'CONNECT', ':authority': authority });
}

// 1. A tunnel to the echo server: 200, bytes both ways, END_STREAM each way.
const payload = Buffer.alloc(300000);
for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
const s = connect(echoAuthority);
s.on('error', done);
s.on('response', (h) => {
  out.status = h[':status'];
  s.write(payload.subarray(0, 1000));
  s.end(payload.subarray(1000)); // END_STREAM after the data
});
const chunks = [];
s.on('data', (c) => chunks.push(c));
s.on('end', () => {
  const got = Buffer.concat(chunks);
  out.echo_bytes = got.length;
  out.echo_ok = got.equals(payload);
  deny();
});

// 2. A tunnel the server's policy refuses: 401.
function deny() {
  const d = connect(denyAuthority);
  d.on('error', (e) => { out.deny_error = String(e); finish(); });
  d.on('response', (h) => { out.deny_status = h[':status']; });
  d.on('close', finish);
  d.resume();
  let finished = false;
  function finish() {
    if (finished) return;
    finished = true;
    out.deny_rst = d.rstCode;
    client.close(() => done());
  }
}
`

type nodeResult struct {
	ALPN       string `json:"alpn"`
	TLS        string `json:"tls"`
	Status     int    `json:"status"`
	EchoBytes  int    `json:"echo_bytes"`
	EchoOK     bool   `json:"echo_ok"`
	DenyStatus int    `json:"deny_status"`
	DenyError  string `json:"deny_error"`
	DenyRST    *int   `json:"deny_rst"`
	Error      string `json:"error"`
}

func nodePath(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/node"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("node"); err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("node is required under CI=true (the non-Go HTTP/2 peer)")
	}
	t.Skip("node not installed")
	return ""
}

// TestNodeHTTP2Peer: Node's http2 client opens HBONE tunnels with a client certificate:
// 200 and the echo on one, 401 from the Dialer on the other.
func TestNodeHTTP2Peer(t *testing.T) {
	node := nodePath(t)
	deny := netip.MustParseAddrPort("127.0.0.1:401")
	var mu sync.Mutex
	var seen []Request
	e := newEnv(t, withDial(func(ctx context.Context, req Request) (net.Conn, int, error) {
		mu.Lock()
		seen = append(seen, req)
		mu.Unlock()
		if req.Authority == deny {
			return nil, http.StatusUnauthorized, errors.New("policy: denied")
		}
		return dialTCP(ctx, req)
	}))

	dir := t.TempDir()
	pki := sharedPKI(t)
	_, certPEM, keyPEM := pki.leaf(t, clientID)
	files := map[string][]byte{
		"client.js": []byte(nodeClient),
		"ca.pem":    pki.caPEM,
		"cert.pem":  certPEM,
		"key.pem":   keyPEM,
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, filepath.Join(dir, "client.js"),
		e.hbone.String(), e.echo.addr.String(), deny.String(),
		filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), serverID)
	var stderr []byte
	cmd.Stderr = writerFunc(func(p []byte) (int, error) { stderr = append(stderr, p...); return len(p), nil })
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v\nstdout: %s\nstderr: %s", err, stdout, stderr)
	}
	var r nodeResult
	if err := json.Unmarshal(stdout, &r); err != nil {
		t.Fatalf("node output %q: %v\nstderr: %s", stdout, err, stderr)
	}
	t.Logf("node: %s", stdout)
	if r.Error != "" {
		t.Fatalf("node client failed: %s", r.Error)
	}
	if r.ALPN != "h2" || r.TLS != "TLSv1.3" {
		t.Errorf("node negotiated %s %s, want TLSv1.3 h2", r.TLS, r.ALPN)
	}
	if r.Status != 200 {
		t.Errorf("CONNECT status %d, want 200", r.Status)
	}
	if !r.EchoOK || r.EchoBytes != 300000 {
		t.Errorf("echo: ok=%v, %d bytes, want 300000", r.EchoOK, r.EchoBytes)
	}
	if r.DenyStatus != 401 {
		t.Errorf("denied CONNECT status %d, want 401 (error %q)", r.DenyStatus, r.DenyError)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 {
		t.Fatalf("Dialer saw %d requests, want 2", len(seen))
	}
	if certs := seen[0].PeerTLS.PeerCertificates; len(certs) == 0 || certs[0].URIs[0].String() != clientID {
		t.Errorf("node's client certificate not seen by the server")
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
