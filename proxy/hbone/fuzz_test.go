package hbone

import (
	"bytes"
	"net"
	"net/http"
	"strings"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// hpackBlock encodes header fields as a client would (pseudo-headers first, as given).
func hpackBlock(fields ...string) []byte {
	var b bytes.Buffer
	enc := hpack.NewEncoder(&b)
	for i := 0; i+1 < len(fields); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return b.Bytes()
}

// FuzzParseRequest feeds an arbitrary HPACK header block, as the payload of one HEADERS
// frame, through the server's framer (its HPACK decoder and limits) and parseRequest. It
// must never panic; a refusal is 400 or 431; an accepted CONNECT has method CONNECT, a
// valid unmapped authority with a port and no zone, and no pseudo-header among its
// regular fields; and ParseForwardedFor on its Forwarded header gives a valid address or
// nothing.
//
//	go test ./proxy/hbone -run '^$' -fuzz FuzzParseRequest -fuzztime 60s
func FuzzParseRequest(f *testing.F) {
	connect := []string{":method", "CONNECT", ":authority", "10.244.1.5:8080"}
	f.Add(hpackBlock(connect...), true)
	f.Add(hpackBlock(append(connect, "forwarded", `for="10.0.0.7:41234"`, "baggage", "k8s.cluster.name=Kubernetes")...), false)
	f.Add(hpackBlock(":method", "CONNECT", ":authority", "[fd00::5]:15008", "forwarded", `for="[fd00::7]:1"`), false)
	f.Add(hpackBlock(":method", "CONNECT", ":authority", "[::ffff:10.0.0.1]:80"), false)
	f.Add(hpackBlock(":method", "CONNECT", ":authority", "[fe80::1%eth0]:80"), false)
	f.Add(hpackBlock(":method", "CONNECT", ":authority", "10.0.0.1:0"), false)
	f.Add(hpackBlock(":method", "CONNECT", ":authority", "httpbin:8000"), false)
	f.Add(hpackBlock(":method", "GET", ":authority", "10.0.0.1:80", ":path", "/", ":scheme", "https"), false)
	f.Add(hpackBlock(":method", "CONNECT", ":authority", "10.0.0.1:80", ":protocol", "websocket"), false)
	f.Add(hpackBlock(":method", "CONNECT", ":authority", "10.0.0.1:80", "x", strings.Repeat("a", 20000)), false)
	f.Add(hpackBlock(":authority", "10.0.0.1:80", ":method", "CONNECT", ":method", "CONNECT"), false)
	f.Add([]byte{0x3f, 0xe1, 0xff, 0xff, 0x0f}, false) // a table size update past the limit
	f.Add([]byte{0x82}, false)                         // indexed :method GET
	f.Add([]byte{}, true)

	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	sc := &serverConn{raw: server}
	f.Fuzz(func(t *testing.T, block []byte, end bool) {
		var wire bytes.Buffer
		w := http2.NewFramer(&wire, nil)
		if err := w.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true, EndStream: end}); err != nil {
			return // too large for one frame
		}
		r := http2.NewFramer(nil, &wire)
		r.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		r.MaxHeaderListSize = maxHeaderListSize
		r.SetMaxReadFrameSize(maxFrameSize)
		fr, err := r.ReadFrame()
		if err != nil {
			return // a connection or stream error the read loop answers
		}
		mh, ok := fr.(*http2.MetaHeadersFrame)
		if !ok {
			t.Fatalf("a HEADERS frame read as %T", fr)
		}
		req, status := sc.parseRequest(mh)
		if status != 0 {
			if status != http.StatusBadRequest && status != http.StatusRequestHeaderFieldsTooLarge {
				t.Fatalf("refused with %d", status)
			}
			return
		}
		if mh.PseudoValue("method") != http.MethodConnect {
			t.Fatalf("accepted method %q", mh.PseudoValue("method"))
		}
		a := req.Authority
		if !a.IsValid() || a.Port() == 0 || a.Addr().Zone() != "" || a.Addr().Is4In6() {
			t.Fatalf("accepted authority %v from %q", a, mh.PseudoValue("authority"))
		}
		for k := range req.Header {
			if strings.HasPrefix(k, ":") {
				t.Fatalf("pseudo-header %q among the regular fields", k)
			}
		}
		if req.Forwarded != req.Header.Get("Forwarded") {
			t.Fatalf("Forwarded %q is not the header's %q", req.Forwarded, req.Header.Get("Forwarded"))
		}
		if ap, ok := ParseForwardedFor(req.Forwarded); ok && !ap.Addr().IsValid() {
			t.Fatalf("ParseForwardedFor(%q) = %v, true", req.Forwarded, ap)
		}
	})
}
