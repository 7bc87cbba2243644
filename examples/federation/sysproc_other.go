//go:build unix && !linux

package main

import "syscall"

// sysProcAttr: outside Linux there is no parent-death signal; the example
// stops its children itself.
func sysProcAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }
