//go:build !linux

package benchmark

import "time"

// FindProcess is only implemented on Linux; elsewhere it finds nothing.
func FindProcess(contains ...string) int { return 0 }

// ProcessCPU is only implemented on Linux; elsewhere it reports 0.
func ProcessCPU(pid int) func() time.Duration { return func() time.Duration { return 0 } }
