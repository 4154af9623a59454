package hbone

import (
	"encoding/binary"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// Benchmarks on loopback, each with its direct-TCP baseline measured in the same run:
//
//	go test -run '^$' -bench . -benchtime 3s ./proxy/hbone/
//
// Throughput: one long stream through one tunnel (client -> TLS/HTTP/2 -> server -> TCP ->
// upstream), in MB/s; "up" is client to upstream, "down" upstream to client.
// NewTunnel: tunnels opened, used for a 1-byte echo and closed in order, over one pooled
// connection.

const benchChunk = 256 << 10

// sink reads to EOF, then reports the byte count and closes.
func sink(c *net.TCPConn) {
	buf := make([]byte, benchChunk)
	var n int64
	for {
		k, err := c.Read(buf)
		n += int64(k)
		if err != nil {
			break
		}
	}
	binary.Write(c, binary.BigEndian, n)
}

// source reads a byte count, writes that many bytes and closes.
func source(c *net.TCPConn) {
	var n int64
	if binary.Read(c, binary.BigEndian, &n) != nil {
		return
	}
	buf := make([]byte, benchChunk)
	for n > 0 {
		k, err := c.Write(buf[:min(n, int64(len(buf)))])
		n -= int64(k)
		if err != nil {
			return
		}
	}
}

// cpuTime is the process's user+system CPU time: on a shared machine, CPU per byte is a
// steadier figure than wall-clock throughput.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func reportCPU(b *testing.B, start time.Duration) {
	mb := float64(b.N) * benchChunk / 1e6
	b.ReportMetric(float64((cpuTime()-start).Microseconds())/mb, "cpu-µs/MB")
}

func benchUp(b *testing.B, c net.Conn) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	cpu := cpuTime()
	defer func() { reportCPU(b, cpu) }()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	var n int64
	if err := binary.Read(c, binary.BigEndian, &n); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if n != int64(b.N)*benchChunk {
		b.Fatalf("sink got %d bytes, want %d", n, int64(b.N)*benchChunk)
	}
}

// drain reads c to EOF at its best: a tunnel through its WriteTo (what io.Copy in the
// proxy uses), a TCP socket with a 256 KiB buffer (io.Copy into io.Discard would read 8 KiB
// at a time and handicap the baseline).
func drain(c net.Conn) (int64, error) {
	if t, ok := c.(*clientConn); ok {
		return t.WriteTo(io.Discard)
	}
	buf := make([]byte, benchChunk)
	var n int64
	for {
		k, err := c.Read(buf)
		n += int64(k)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

func benchDown(b *testing.B, c net.Conn) {
	b.SetBytes(benchChunk)
	b.ResetTimer()
	cpu := cpuTime()
	defer func() { reportCPU(b, cpu) }()
	if err := binary.Write(c, binary.BigEndian, int64(b.N)*benchChunk); err != nil {
		b.Fatal(err)
	}
	n, err := drain(c)
	b.StopTimer()
	if err != nil || n != int64(b.N)*benchChunk {
		b.Fatalf("read %d bytes (%v), want %d", n, err, int64(b.N)*benchChunk)
	}
}

func BenchmarkThroughput(b *testing.B) {
	snk := newUpstream(b, "tcp4", sink)
	src := newUpstream(b, "tcp4", source)
	e := newEnv(b)
	for _, dir := range []struct {
		name string
		up   *upstream
		run  func(*testing.B, net.Conn)
	}{{"up", snk, benchUp}, {"down", src, benchDown}} {
		b.Run("tcp/"+dir.name, func(b *testing.B) {
			c, err := net.Dial("tcp", dir.up.addr.String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			dir.run(b, c)
		})
		b.Run("hbone/"+dir.name, func(b *testing.B) {
			c, err := e.connectTo(testCtx(b, 10*time.Second), dir.up.addr)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			dir.run(b, c)
		})
	}
}

func echoOnce(b *testing.B, c net.Conn) {
	if _, err := c.Write([]byte{1}); err != nil {
		b.Fatal(err)
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	var one [2]byte
	if n, err := io.ReadFull(c, one[:]); n != 1 || err != io.ErrUnexpectedEOF {
		b.Fatalf("echo: %d bytes, %v", n, err)
	}
	c.Close()
}

func BenchmarkNewTunnel(b *testing.B) {
	e := newEnv(b)
	ctx := testCtx(b, time.Hour)
	report := func(b *testing.B) {
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
	}
	b.Run("tcp", func(b *testing.B) {
		for b.Loop() {
			c, err := net.Dial("tcp", e.echo.addr.String())
			if err != nil {
				b.Fatal(err)
			}
			echoOnce(b, c)
		}
		report(b)
	})
	b.Run("hbone", func(b *testing.B) {
		for b.Loop() {
			c, err := e.connect(ctx)
			if err != nil {
				b.Fatal(err)
			}
			echoOnce(b, c)
		}
		report(b)
	})
	b.Run("hbone-parallel", func(b *testing.B) {
		b.SetParallelism(8) // 16 tunnels in flight on 2 cores
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				c, err := e.connect(ctx)
				if err != nil {
					b.Error(err)
					return
				}
				echoOnce(b, c)
			}
		})
		report(b)
	})
	if n := e.ln.accepted.Load(); n != 1 {
		b.Errorf("server accepted %d connections, want 1 (pooled)", n)
	}
}
