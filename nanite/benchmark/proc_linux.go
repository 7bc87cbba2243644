package benchmark

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// FindProcess returns the pid of a process whose command line contains
// every one of the given strings (0 when none or more than one does).
func FindProcess(contains ...string) int {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	found := 0
	for _, d := range dirs {
		cmd, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil {
			continue
		}
		ok := true
		for _, s := range contains {
			if !bytes.Contains(cmd, []byte(s)) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		if found != 0 {
			return 0
		}
		found, _ = strconv.Atoi(filepath.Base(d))
	}
	return found
}

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc on every
// architecture Go supports.
const clockTicks = 100

// ProcessCPU returns a function reporting the user plus system CPU time of
// process pid so far (0 once it cannot be read).
func ProcessCPU(pid int) func() time.Duration {
	path := filepath.Join("/proc", strconv.Itoa(pid), "stat")
	return func() time.Duration {
		b, err := os.ReadFile(path)
		if err != nil {
			return 0
		}
		// The command name (field 2) may hold spaces; fields after it
		// start past the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			return 0
		}
		f := strings.Fields(string(b[i+1:]))
		// f[0] is field 3 (state); utime and stime are fields 14 and 15.
		if len(f) < 13 {
			return 0
		}
		ut, err1 := strconv.ParseInt(f[11], 10, 64)
		st, err2 := strconv.ParseInt(f[12], 10, 64)
		if err1 != nil || err2 != nil {
			return 0
		}
		return time.Duration(ut+st) * time.Second / clockTicks
	}
}

// loadAverage returns the 1, 5 and 15-minute load averages of the machine
// ("4.36 6.80 6.56"), or "" when they cannot be read.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// load1 returns the 1-minute load average (0 when it cannot be read).
func load1() float64 {
	f := strings.Fields(loadAverage())
	if len(f) == 0 {
		return 0
	}
	x, _ := strconv.ParseFloat(f[0], 64)
	return x
}
