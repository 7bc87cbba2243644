//go:build !linux

package benchmark

import "time"

// FindProcess is only implemented on Linux; elsewhere it finds nothing.
func FindProcess(contains ...string) int { return 0 }

// ProcessCPU is only implemented on Linux; elsewhere it reports 0.
func ProcessCPU(pid int) func() time.Duration { return func() time.Duration { return 0 } }

// loadAverage is only read on Linux.
func loadAverage() string { return "" }

// load1 is only read on Linux.
func load1() float64 { return 0 }
