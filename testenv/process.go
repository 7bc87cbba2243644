package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// proc is a server process started in its own process group, with its
// output appended to a file.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // exit status, valid once done is closed
}

// startProc starts name with args and env, in dir, appending its stdout and
// stderr to outPath. The process leads a new process group (so Kill can end
// it with its children) and, on Linux, gets SIGTERM when the test binary dies.
func startProc(name string, args, env []string, dir, outPath string) (*proc, error) {
	out, err := os.OpenFile(outPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("testenv: %w", err)
	}
	cmd := exec.Command(name, args...)
	cmd.Env = env
	cmd.Dir = dir
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		_ = out.Close()
		return nil, fmt.Errorf("testenv: starting %s: %w", name, err)
	}
	// For sweepStale: a directory whose server still runs is not removed.
	_ = os.WriteFile(filepath.Join(dir, "server.pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		_ = out.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitError describes how the process ended; call it only once exited.
func (p *proc) exitError() error {
	if p.err == nil {
		return errors.New("exited with status 0")
	}
	return p.err
}

// signal sends sig to the process itself.
func (p *proc) signal(sig syscall.Signal) error {
	if p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("testenv: signal %v to pid %d: %w", sig, p.cmd.Process.Pid, err)
	}
	return nil
}

// signalGroup sends sig to the process group.
func (p *proc) signalGroup(sig syscall.Signal) error {
	if p.exited() {
		return nil
	}
	pid := p.cmd.Process.Pid
	if err := syscall.Kill(-pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("testenv: %v to process group %d: %w", sig, pid, err)
	}
	return nil
}

// killGroup sends SIGKILL to the process group and waits up to 10 s for the
// process to be reaped.
func (p *proc) killGroup() error {
	if p.exited() {
		return nil
	}
	pid := p.cmd.Process.Pid
	if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("testenv: SIGKILL to process group %d: %w", pid, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("testenv: process %d still running 10 s after SIGKILL", pid)
	}
}

// wait waits for the process to exit or ctx to end.
func (p *proc) wait(ctx context.Context) error {
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
