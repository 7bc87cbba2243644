//go:build unix && !linux

package testenv

import "syscall"

// sysProcAttr puts a server in its own process group. Outside Linux there is
// no parent-death signal: only Main and Close stop servers.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
