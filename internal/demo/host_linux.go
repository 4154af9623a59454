package demo

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// host is what the demo made on this machine, so that it can all be removed again: network
// namespaces (named nftmesh-demo-<pid>-<name>) and processes (stopped by PID).
type host struct {
	prefix string

	mu    sync.Mutex
	netns []string
	procs []*proc
}

func newHost() *host { return &host{prefix: fmt.Sprintf("nftmesh-demo-%d-", os.Getpid())} }

// newNetns makes a network namespace with lo up; its name is the demo's prefix and name.
func (h *host) newNetns(name string) (string, error) {
	full := h.prefix + name
	if out, err := exec.Command("ip", "netns", "add", full).CombinedOutput(); err != nil {
		return "", fmt.Errorf("ip netns add %s: %v: %s", full, err, out)
	}
	h.mu.Lock()
	h.netns = append(h.netns, full)
	h.mu.Unlock()
	if err := h.ip(full, "link set lo up"); err != nil {
		return "", err
	}
	return full, nil
}

// ip runs `ip -batch -` in namespace ns.
func (h *host) ip(ns string, lines ...string) error {
	cmd := exec.Command("ip", "-netns", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ip -netns %s: %v: %s", ns, err, out)
	}
	return nil
}

// sysctl writes network sysctls in ns (only net.*: they are per namespace).
func (h *host) sysctl(ns string, kv ...string) error {
	args := []string{"netns", "exec", ns, "sysctl", "-q", "-w"}
	for i := 0; i < len(kv); i += 2 {
		args = append(args, kv[i]+"="+kv[i+1])
	}
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("sysctl in %s: %v: %s", ns, err, out)
	}
	return nil
}

// run runs a command to completion in ns ("" for the demo's own namespace) and returns
// its output.
func (h *host) run(ns string, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	if ns != "" {
		cmd = exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// proc is a long-running process the demo started: an agent, a proxy, an app.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *syncBuffer
	done chan struct{}
	err  error
}

// start runs name args in ns ("" for the demo's namespace) with its output in the proc's
// log (and in extra, if given).
func (h *host) start(procName, ns string, extra io.Writer, name string, args ...string) (*proc, error) {
	cmd := exec.Command(name, args...)
	if ns != "" {
		// ip execs the program in place: the process is the program itself.
		cmd = exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	}
	p := &proc{name: procName, cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	var w io.Writer = p.log
	if extra != nil {
		w = io.MultiWriter(p.log, extra)
	}
	cmd.Stdout, cmd.Stderr = w, w
	// Should the demo die, its processes die with it. The kernel signals when the thread
	// that forked ends, so the fork happens on a thread kept for the process's life.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", procName, err)
	}
	h.mu.Lock()
	h.procs = append(h.procs, p)
	h.mu.Unlock()
	return p, nil
}

// stop sends SIGTERM and waits, then SIGKILL.
func (p *proc) stop(wait time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(wait):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// cleanup stops every process (newest first) and deletes every namespace.
func (h *host) cleanup() []error {
	h.mu.Lock()
	procs, nss := h.procs, h.netns
	h.procs, h.netns = nil, nil
	h.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].stop(5 * time.Second)
	}
	var errs []error
	for _, ns := range nss {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %v: %s", ns, err, out))
		}
	}
	return errs
}

// syncBuffer is a bytes.Buffer safe for a process's writes and the demo's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
