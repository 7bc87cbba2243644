package nanite

import (
	"os"
	"strconv"
	"strings"
)

// LoadAverage returns the one-minute load average of the machine, Nanite's
// default agent status. It returns 0 where /proc/loadavg is not available.
func LoadAverage() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return 0
	}
	return v
}
