package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// nodeHBONEClient is an HBONE client written with Node.js's own HTTP/2 stack (nghttp2
// inside Node, not Go's x/net): TLS 1.3 with a client certificate, ALPN h2, no SNI (the
// target is an IP), the server's chain checked against the mesh CA and its SPIFFE ID
// checked in checkServerIdentity (there is no host name to check); then CONNECT
// <authority>, the app's greeting, an echo, END_STREAM. It prints one JSON object.
//
// argv: target (ip:port or [ip6]:port), authority, ca.pem, cert.pem, key.pem, the
// server's expected SPIFFE ID.
const nodeHBONEClient = `'use strict';
const http2 = require('http2');
const fs = require('fs');
const [target, authority, caFile, certFile, keyFile, wantID] = process.argv.slice(2);
const result = {status: 0, alpn: '', tls: '', server: '', greeting: '', echo: '', error: ''};
let printed = false;
function finish(err) {
  if (printed) return;
  printed = true;
  if (err) result.error = String(err && err.message || err);
  process.stdout.write(JSON.stringify(result) + '\n');
  clearTimeout(timer);
  session.close();
  if (err) process.exitCode = 1;
}
const timer = setTimeout(() => { finish(new Error('timeout')); process.exit(2); }, 8000);
const session = http2.connect('https://' + target, {
  ca: fs.readFileSync(caFile),
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
  minVersion: 'TLSv1.3',
  maxVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  // servername omitted: the target is an IP address, so no SNI is sent.
  checkServerIdentity: (host, cert) => {
    const sans = (cert.subjectaltname || '').split(', ');
    if (!sans.includes('URI:' + wantID)) {
      return new Error('server identity ' + cert.subjectaltname + ', want ' + wantID);
    }
    return undefined;
  },
});
session.on('error', (e) => finish(e));
session.on('connect', (s, socket) => {
  result.alpn = socket.alpnProtocol;
  result.tls = socket.getProtocol();
  result.server = socket.getPeerCertificate().subjectaltname;
});
const req = session.request({':method': 'CONNECT', ':authority': authority});
req.setEncoding('utf8');
let buf = '';
req.on('response', (headers) => {
  result.status = headers[':status'];
  if (result.status !== 200) { finish(); return; }
  req.write('ping\n');
});
req.on('data', (d) => {
  buf += d;
  const lines = buf.split('\n');
  if (lines.length >= 3) {
    result.greeting = lines[0];
    result.echo = lines[1];
    req.end();
  }
});
req.on('end', () => finish());
req.on('error', (e) => finish(e));
`

// testNodeHTTP2: Node.js's http2 client, with a certificate for ambient-demo/sleep from
// the mesh CA, opens an HBONE CONNECT to httpbin (IPv4 and IPv6) from the outside
// namespace and gets 200 and the app's bytes. The proxy uses the TCP peer address as the
// tunnel's source, so the app sees the outside namespace's address.
func testNodeHTTP2(t *testing.T, m *Mesh) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("needs node (Node.js) on PATH: %v", err)
		}
		t.Skipf("needs node (Node.js) on PATH: %v", err)
	}
	dir := t.TempDir()
	cert, err := m.Issuer.Certificate(context.Background(), m.Sleep.Identity())
	if err != nil {
		t.Fatal(err)
	}
	var chain bytes.Buffer
	for _, der := range cert.Certificate {
		pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"hbone.js": []byte(nodeHBONEClient), "ca.pem": m.CACert, "cert.pem": chain.Bytes(),
		"key.pem": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range families {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		cmd := exec.CommandContext(ctx, "ip", "netns", "exec", m.Outside.NS.Name, node, filepath.Join(dir, "hbone.js"),
			m.hboneAddr(f).String(), m.appAddr(f).String(),
			filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"),
			m.Httpbin.Identity().String())
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		runErr := cmd.Run()
		cancel()
		var res struct {
			Status                                   int
			ALPN, TLS, Server, Greeting, Echo, Error string
		}
		if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
			t.Fatalf("%s: node: %v, output %q, stderr %q", f.name, runErr, stdout.String(), stderr.String())
		}
		t.Logf("%s: node: %+v", f.name, res)
		if runErr != nil || res.Error != "" {
			t.Errorf("%s: node: %v: %s (stderr %q)", f.name, runErr, res.Error, stderr.String())
		}
		if res.Status != 200 || res.ALPN != "h2" || res.TLS != "TLSv1.3" {
			t.Errorf("%s: node got status %d over %q %q, want 200 over h2 TLSv1.3", f.name, res.Status, res.ALPN, res.TLS)
		}
		if res.Server != "URI:"+m.Httpbin.Identity().String() {
			t.Errorf("%s: server certificate SAN %q, want httpbin's SPIFFE ID", f.name, res.Server)
		}
		if ap, err := netip.ParseAddrPort(res.Greeting); err != nil || ap.Addr().Unmap() != m.Outside.Addr(f) {
			t.Errorf("%s: greeting %q, want the app's line with the client's address %s", f.name, res.Greeting, m.Outside.Addr(f))
		}
		if res.Echo != "ping" {
			t.Errorf("%s: echo %q, want %q", f.name, res.Echo, "ping")
		}
		m.Node1.Proxy.AccessLine(t, map[string]string{
			"direction": "inbound", "src.identity": m.Sleep.Identity().String(),
			"dst.hbone_addr": m.appAddr(f).String(),
		}, srcIP(m.Outside.Addr(f)))
	}
}
