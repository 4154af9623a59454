//go:build race

package rawio

import (
	"runtime"
	"unsafe"
)

// syscall.RawSyscall is invisible to the race detector. These tell it what syscall.Read and
// Write tell it: the kernel wrote p (read) or read p (write), and I/O orders what comes
// before a write before what comes after a read.
var ioSync int64

func raceReadDone(p []byte) {
	if len(p) > 0 {
		runtime.RaceWriteRange(unsafe.Pointer(&p[0]), len(p))
	}
	runtime.RaceAcquire(unsafe.Pointer(&ioSync))
}

func raceWriteStart() { runtime.RaceReleaseMerge(unsafe.Pointer(&ioSync)) }

func raceWriteDone(p []byte) {
	if len(p) > 0 {
		runtime.RaceReadRange(unsafe.Pointer(&p[0]), len(p))
	}
}

const raceEnabled = true
