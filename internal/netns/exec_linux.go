package netns

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Sockets belong to the network namespace of the thread that made them, and keep it
// for life. So nftmesh makes all the sockets an operation needs in one visit: a worker
// goroutine, locked to its OS thread for good, enters the namespace, runs a short
// function that only opens sockets, and comes back. If it cannot come back, the worker
// exits still locked, which ends the thread: no thread ever returns to the scheduler in
// a foreign namespace. Reusing the threads (instead of one new thread per visit) is what
// keeps a visit in the microseconds.

type nsCall struct {
	fd   int
	fn   func() error
	done chan error
}

var (
	nsWorkersOnce sync.Once
	nsCalls       chan nsCall
)

// Do runs fn on a thread inside the namespace. fn must be short and must not start
// goroutines that expect to be in the namespace. The descriptor is held for the whole call
// (through the file's SyscallConn), so a concurrent Close cannot free its number for
// another file, and the work never lands in some other namespace.
func (n *NS) Do(fn func() error) error {
	// Errors are not prefixed with the namespace: callers name it as they wrap.
	rc, err := n.file.SyscallConn()
	if err != nil {
		return err
	}
	nsWorkersOnce.Do(func() {
		nsCalls = make(chan nsCall)
		for i := 0; i < max(2, runtime.GOMAXPROCS(0)); i++ {
			go nsWorker()
		}
	})
	var callErr error
	err = rc.Control(func(fd uintptr) {
		done := make(chan error, 1)
		nsCalls <- nsCall{fd: int(fd), fn: fn, done: done}
		callErr = <-done
	})
	if err != nil {
		return err
	}
	return callErr
}

func nsWorker() {
	runtime.LockOSThread() // never unlocked: see above
	home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		// Without a way home this thread must never leave; answer callers with the error.
		for call := range nsCalls {
			call.done <- fmt.Errorf("netns worker: open own namespace: %w", err)
		}
		return
	}
	for call := range nsCalls {
		if err := unix.Setns(call.fd, unix.CLONE_NEWNET); err != nil {
			call.done <- fmt.Errorf("setns: %w", err)
			continue
		}
		err := runGuarded(call.fn)
		if back := unix.Setns(home, unix.CLONE_NEWNET); back != nil {
			call.done <- errors.Join(err, fmt.Errorf("setns back to own namespace: %w", back))
			go nsWorker() // a replacement; this thread ends with this goroutine
			return
		}
		call.done <- err
	}
}

func runGuarded(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic in namespace: %v", r)
		}
	}()
	return fn()
}

// DoHere runs fn on a thread inside the namespace, like Do, without handing it to another
// thread: a new goroutine locks itself to its thread (the caller's own, unless the
// scheduler moves it), enters the namespace, runs fn and comes back, while the caller
// waits. Do's hand-off to a pooled thread costs two context switches and wakeups, which
// this kind of VM makes dear: about 60 µs of a fresh enroll's 0.2-0.35 ms on the 2-vCPU
// VM of issue #15 (the new goroutine still costs a wakeup or two of an idle thread:
// about 40-50 µs more than visiting from the caller's own goroutine, which could not be
// given up if its thread failed to come back). If the thread cannot come back, the
// goroutine exits still locked and the Go runtime ends the thread with it, as
// containernetworking/plugins' pkg/ns does: no thread ever returns to the scheduler in a
// foreign namespace. fn has Do's limits: short, and no goroutines that expect to be in
// the namespace.
func (n *NS) DoHere(fn func() error) error {
	rc, err := n.file.SyscallConn()
	if err != nil {
		return err
	}
	var callErr error
	err = rc.Control(func(fd uintptr) { // holds the descriptor, as Do does
		done := make(chan error, 1)
		go visit(int(fd), fn, done)
		callErr = <-done
	})
	if err != nil {
		return err
	}
	return callErr
}

var (
	homeMu sync.Mutex
	homeFD = -1
)

// home returns a descriptor of the namespace every unlocked thread is in: the one a
// visiting thread goes back to. It is opened once, from a thread that is not locked (the
// first visit's, before it moves): nftmesh never leaves such a thread elsewhere. A failure
// (EMFILE at the descriptor limit) is not kept: the next visit tries again.
func home() (int, error) {
	homeMu.Lock()
	defer homeMu.Unlock()
	if homeFD >= 0 {
		return homeFD, nil
	}
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open own namespace: %w", err)
	}
	homeFD = fd
	return fd, nil
}

// homeNS is home, replaced by a test that makes the way back fail.
var homeNS = home

// visit is DoHere's goroutine.
func visit(fd int, fn func() error, done chan<- error) {
	back, err := homeNS()
	if err != nil {
		done <- err
		return
	}
	runtime.LockOSThread()
	if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread() // still home
		done <- fmt.Errorf("setns: %w", err)
		return
	}
	err = runGuarded(fn)
	if errBack := unix.Setns(back, unix.CLONE_NEWNET); errBack != nil {
		// Stay locked: this thread ends with this goroutine.
		done <- errors.Join(err, fmt.Errorf("setns back to own namespace: %w", errBack))
		return
	}
	runtime.UnlockOSThread()
	done <- err
}
