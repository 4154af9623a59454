package netns

import (
	"errors"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// DoHere's thread that cannot go back home is never given back to the scheduler: its
// goroutine exits still locked, and the Go runtime ends the thread (or, for the main
// thread, parks it for good). The way back is made to fail by a "home" descriptor that is
// not a network namespace. Needs root (setns).
func TestDoHereThreadThatCannotComeBackEnds(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for setns")
	}
	self, err := Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	notNS, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(notNS)
	homeNS = func() (int, error) { return notNS, nil }
	defer func() { homeNS = home }()

	var tid int
	err = self.DoHere(func() error { tid = unix.Gettid(); return nil })
	if err == nil || !strings.Contains(err.Error(), "setns back to own namespace") {
		t.Fatalf("DoHere with no way back: %v, want an error about setns back", err)
	}
	// The runtime ends the thread; the main thread, which it never ends, it parks for
	// good instead. Either way no goroutine runs on it again.
	if tid != os.Getpid() {
		task := "/proc/self/task/" + itoa(tid)
		deadline := time.Now().Add(5 * time.Second)
		for {
			if _, err := os.Stat(task); errors.Is(err, os.ErrNotExist) {
				break // the thread is gone
			}
			if time.Now().After(deadline) {
				t.Fatalf("thread %d still exists after its way back failed", tid)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	var mu sync.Mutex
	seen := map[int]bool{}
	var wg sync.WaitGroup
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				mu.Lock()
				seen[unix.Gettid()] = true
				mu.Unlock()
				runtime.Gosched()
			}
		}()
	}
	wg.Wait()
	if seen[tid] {
		t.Errorf("thread %d, lost in a namespace, ran goroutines again", tid)
	}
	homeNS = home
	if err := self.DoHere(func() error { return nil }); err != nil {
		t.Errorf("DoHere after a thread was lost: %v", err)
	}
}

func itoa(i int) string {
	var b [20]byte
	n := len(b)
	for {
		n--
		b[n] = byte('0' + i%10)
		if i /= 10; i == 0 {
			return string(b[n:])
		}
	}
}
