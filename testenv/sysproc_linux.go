package testenv

import "syscall"

// sysProcAttr puts a server in its own process group and asks the kernel to
// send it SIGTERM when the thread that started it dies. Go never ends its
// threads while the program runs (unless a goroutine exits while locked to
// one with runtime.LockOSThread), so in practice that is when the test
// binary exits, however it exits. Both RabbitMQ and prosody shut down
// cleanly on SIGTERM.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}
