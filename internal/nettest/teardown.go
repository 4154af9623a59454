package nettest

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"time"
)

// NetnsCount returns the kernel's count of live network namespaces (the net_namespace
// slab), or -1 when it cannot be read.
func NetnsCount() int {
	f, err := os.Open("/proc/slabinfo")
	if err != nil {
		return -1
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 1 && fields[0] == "net_namespace" {
			n, err := strconv.Atoi(fields[1])
			if err != nil {
				return -1
			}
			return n
		}
	}
	return -1
}

// WaitNetnsTeardown waits until the kernel has freed namespaces down to within slack of
// before. The kernel tears a namespace down after its last reference goes, in a worker
// thread, for milliseconds of CPU each: a benchmark that starts meanwhile shares the CPUs
// with it. Others may be making namespaces too: it gives up once the count has stopped
// falling for 2 s, or after 30 s.
func WaitNetnsTeardown(before, slack int) {
	if before < 0 {
		return
	}
	deadline := time.Now().Add(30 * time.Second)
	last, lastChange := NetnsCount(), time.Now()
	for last > before+slack && time.Now().Before(deadline) && time.Since(lastChange) < 2*time.Second {
		time.Sleep(20 * time.Millisecond)
		if n := NetnsCount(); n < last {
			last, lastChange = n, time.Now()
		}
	}
}
