package main

import (
	"errors"
	"fmt"
	"os"
	"runtime/pprof"
	"runtime/trace"
)

// startProfiles starts the CPU profile and the execution trace the bench
// commands were asked for (an empty path: not that one). stop ends them and
// closes their files; it must be called, also after an error (it then ends
// what did start).
func startProfiles(cpuProfile, tracePath string) (stop func(), err error) {
	var closers []func()
	stop = func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
		closers = nil
	}
	if cpuProfile != "" {
		f, err := os.Create(cpuProfile)
		if err != nil {
			return stop, fmt.Errorf("cpu profile: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			_ = f.Close()
			return stop, fmt.Errorf("cpu profile: %w", err)
		}
		closers = append(closers, func() { pprof.StopCPUProfile(); _ = f.Close() })
	}
	if tracePath != "" {
		f, err := os.Create(tracePath)
		if err != nil {
			return stop, fmt.Errorf("trace: %w", err)
		}
		if err := trace.Start(f); err != nil {
			_ = f.Close()
			return stop, fmt.Errorf("trace: %w", err)
		}
		closers = append(closers, func() { trace.Stop(); _ = f.Close() })
	}
	return stop, nil
}

// writeMemProfile writes the allocs profile (every allocation since the
// start, sampled; pprof -sample_index=alloc_space shows them) to path, if
// it is not empty.
func writeMemProfile(path string) error {
	if path == "" {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("memory profile: %w", err)
	}
	err = pprof.Lookup("allocs").WriteTo(f, 0)
	return errors.Join(err, f.Close())
}
