package hbone

import (
	"io"
	"net"
	"testing"
	"time"
)

// BenchmarkRoundTrip1K: 1 KiB request, 1 KiB echoed response, one at a time, through one
// tunnel to the echo upstream. "direct" uses the tunnel's Write and Read; "proxied" puts
// it between two sockets as the proxy does (ReadFrom the app socket, WriteTo it), which
// is where goroutine hand-offs on the client side show. Run with -cpu 1,2.
func BenchmarkRoundTrip1K(b *testing.B) {
	e := newEnv(b)
	ctx := testCtx(b, time.Hour)
	msg := make([]byte, 1024)
	resp := make([]byte, 1024)
	rtt := func(b *testing.B, w io.Writer, r io.Reader) {
		for b.Loop() {
			if _, err := w.Write(msg); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(r, resp); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "µs/rtt")
	}
	b.Run("direct", func(b *testing.B) {
		c, err := e.connect(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		rtt(b, c, c)
	})
	b.Run("proxied", func(b *testing.B) {
		c, err := e.connect(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		l := listen(b, "tcp4")
		defer l.Close()
		app, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		defer app.Close()
		pc, err := l.Accept()
		if err != nil {
			b.Fatal(err)
		}
		defer pc.Close()
		go c.(io.ReaderFrom).ReadFrom(pc)
		go c.(io.WriterTo).WriteTo(pc)
		rtt(b, app, app)
	})
}
