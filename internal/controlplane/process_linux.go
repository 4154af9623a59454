package controlplane

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"
)

// process is etcd or kube-apiserver, its output in a file.
type process struct {
	name, log string
	cmd       *exec.Cmd
	done      chan struct{} // closed when it has exited and been reaped
	exitErr   error         // set before done is closed
}

func startProcess(name, log, path string, args ...string) (*process, error) {
	out, err := os.Create(log)
	if err != nil {
		return nil, err
	}
	defer out.Close() // the child has its own copy
	p := &process{name: name, log: log, cmd: exec.Command(path, args...), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = out, out
	// SIGKILL when the test binary dies, so that a crash or a missing StopShared leaves
	// no control plane behind.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := spawn(p.cmd); err != nil {
		return nil, fmt.Errorf("controlplane: start %s: %w", name, err)
	}
	go func() {
		p.exitErr = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, then SIGKILL after 5 s, and waits for the exit. It says whether
// the process had exited already.
func (p *process) stop() (early bool) {
	if p.exited() {
		return true
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	return false
}

func (p *process) logContains(s string) bool {
	data, _ := os.ReadFile(p.log)
	return bytes.Contains(data, []byte(s))
}

func (p *process) tail() string {
	return fmt.Sprintf("--- %s, last lines of its output:\n%s", p.name, tailLines(p.log, 30))
}

// Pdeathsig fires when the thread that started the child ends, not the process, and Go
// ends threads that a goroutine leaves locked (internal/netns does so on purpose). So
// children start from one goroutine locked to its thread for the life of the process.
var (
	spawnOnce sync.Once
	spawns    chan spawnCall
)

type spawnCall struct {
	cmd  *exec.Cmd
	done chan error
}

func spawn(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawns = make(chan spawnCall)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread lives as long as the process
			for c := range spawns {
				c.done <- c.cmd.Start()
			}
		}()
	})
	c := spawnCall{cmd: cmd, done: make(chan error)}
	spawns <- c
	return <-c.done
}
