package main

import "syscall"

// sysProcAttr puts a child in its own process group (Ctrl-C reaches only
// the example, which stops its children in order) and has the kernel send
// it SIGTERM if the example dies without stopping it.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}
