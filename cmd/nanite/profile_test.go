package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestProfiles(t *testing.T) {
	dir := t.TempDir()
	cpu, tr, mem := filepath.Join(dir, "cpu.pprof"), filepath.Join(dir, "run.trace"), filepath.Join(dir, "mem.pprof")
	stop, err := startProfiles(cpu, tr)
	if err != nil {
		stop()
		t.Fatal(err)
	}
	x := 0
	for i := range 1_000_000 {
		x += i % 7
	}
	_ = x
	stop()
	stop() // twice is harmless
	if err := writeMemProfile(mem); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{cpu, tr, mem} {
		if st, err := os.Stat(p); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v, %v", p, st, err)
		}
	}
	// A trace that cannot be written: an error, and the CPU profile
	// started before it is stopped by stop.
	stop, err = startProfiles(filepath.Join(dir, "cpu2.pprof"), filepath.Join(dir, "no", "such", "dir", "t"))
	if err == nil || !strings.Contains(err.Error(), "trace") {
		t.Errorf("trace in a missing directory: %v", err)
	}
	stop()
	stop, err = startProfiles(filepath.Join(dir, "cpu3.pprof"), "")
	if err != nil {
		t.Fatalf("CPU profile after a failed start: %v (the first one was not stopped)", err)
	}
	stop()
	if err := writeMemProfile(filepath.Join(dir, "no", "mem")); err == nil {
		t.Error("memory profile in a missing directory: no error")
	}
	if err := writeMemProfile(""); err != nil {
		t.Errorf("no memory profile asked: %v", err)
	}
}
