package benchmark

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report as a header and a table, one row per cell.
func (r *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	broker := r.Broker
	if r.BrokerNote != "" {
		broker += " (" + r.BrokerNote + ")"
	}
	fmt.Fprintf(&b, "nanite bench: broker %s\n", broker)
	fmt.Fprintf(&b, "  %s, GOMAXPROCS=%d, %d CPUs, started %s\n", r.GoVersion, r.GOMAXPROCS, r.NumCPU,
		r.Started.Format("2006-01-02 15:04:05"))
	fmt.Fprintf(&b, "  raw:    %s\n", r.Baseline)
	fmt.Fprintf(&b, "  nanite: %s\n", r.NaniteSide)
	per := fmt.Sprintf("%gs", r.DurationSec)
	if r.Requests > 0 {
		per = fmt.Sprintf("%d requests", r.Requests)
	}
	fmt.Fprintf(&b, "  each cell: %s per side in %d rounds, order %s, after %gs warmup per side; "+
		"N outstanding = N goroutines each making sequential requests\n", per, r.Rounds, r.Order, r.WarmupSec)
	fmt.Fprintf(&b, "  targets: nanite throughput >= %.2fx raw at %d outstanding; nanite p50 <= %.2fx raw at %d outstanding\n",
		r.Targets.ThroughputRatio, r.Targets.ThroughputOutstanding, r.Targets.P50Ratio, r.Targets.P50Outstanding)
	fmt.Fprintf(&b, "  cpu/req: CPU time per request of this process (requesters, echo server or agent, mapper); brk/req: of the broker process (when known)\n\n")
	if _, err := io.WriteString(w, b.String()); err != nil {
		return err
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "payload\tout\t|\traw p50\tp99\treq/s\tcpu/req\tbrk/req\t|\tnanite p50\tp99\treq/s\tcpu/req\tbrk/req\t|\tp50 x\treq/s x\t|\ttarget\t")
	for _, c := range r.Cells {
		row := []string{FormatBytes(c.Payload), fmt.Sprint(c.Outstanding)}
		row = append(row, measureCols(c.Raw)...)
		row = append(row, measureCols(c.Nanite)...)
		row = append(row, "|", ratio(c.P50Ratio), ratio(c.ThroughputRatio), "|", verdict(c))
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var notes []string
	for _, c := range r.Cells {
		for _, m := range []struct {
			side string
			m    *Measure
		}{{"raw", c.Raw}, {"nanite", c.Nanite}} {
			if m.m != nil && m.m.Errors > 0 {
				notes = append(notes, fmt.Sprintf("  %s %s/%d: %d errors, first: %s", m.side,
					FormatBytes(c.Payload), c.Outstanding, m.m.Errors, m.m.FirstErr))
			}
		}
	}
	if len(notes) > 0 {
		_, err := fmt.Fprintf(w, "\nerrors:\n%s\n", strings.Join(notes, "\n"))
		return err
	}
	return nil
}

func measureCols(m *Measure) []string {
	if m == nil {
		return []string{"|", "-", "-", "-", "-", "-"}
	}
	return []string{"|", FormatMicros(m.P50us), FormatMicros(m.P99us), fmt.Sprintf("%.0f", m.RPS),
		FormatMicros(m.CPUus), FormatMicros(m.BrokerCPUus)}
}

func ratio(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", x)
}

func verdict(c Cell) string {
	if c.Pass == nil {
		return "-"
	}
	v := "MISS"
	if *c.Pass {
		v = "PASS"
	}
	switch c.Target {
	case "p50":
		return fmt.Sprintf("p50<=%.2fx %s", TargetP50Ratio, v)
	case "throughput":
		return fmt.Sprintf("req/s>=%.2fx %s", TargetThroughputRatio, v)
	}
	return v
}

// FormatMicros prints a duration given in µs: "183µs", "1.24ms".
func FormatMicros(us float64) string {
	switch {
	case us == 0:
		return "-"
	case us < 10000:
		return fmt.Sprintf("%.0fµs", us)
	case us < 1e6:
		return fmt.Sprintf("%.2fms", us/1000)
	}
	return fmt.Sprintf("%.2fs", us/1e6)
}

// FormatBytes prints a size: "100 B", "10 KiB".
func FormatBytes(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}
