package benchmark

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
)

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report as a header, a table with one row per mode
// in each cell, the secure modes' figures against plain, and notes.
func (r *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	broker := r.Broker
	if r.BrokerNote != "" {
		broker += " (" + r.BrokerNote + ")"
	}
	fmt.Fprintf(&b, "nanite bench: broker %s\n", broker)
	fmt.Fprintf(&b, "  %s, GOMAXPROCS=%d, %d CPUs, started %s", r.GoVersion, r.GOMAXPROCS, r.NumCPU,
		r.Started.Format("2006-01-02 15:04:05"))
	if r.LoadStart != "" {
		fmt.Fprintf(&b, ", load average %s at the start, %s at the end", r.LoadStart, r.LoadEnd)
	}
	fmt.Fprintf(&b, "\n  raw:    %s\n", r.Baseline)
	fmt.Fprintf(&b, "  nanite: %s\n", r.NaniteSide)
	if r.SecureSide != "" {
		fmt.Fprintf(&b, "  secure: %s\n", r.SecureSide)
	}
	per := fmt.Sprintf("%gs", r.DurationSec)
	if r.Requests > 0 {
		per = fmt.Sprintf("%d requests", r.Requests)
	}
	fmt.Fprintf(&b, "  each cell: %s per mode in %d rounds, order %s; after %gs warmup per mode; "+
		"N outstanding = N goroutines each making sequential requests\n", per, r.Rounds, r.Order, r.WarmupSec)
	fmt.Fprintf(&b, "  targets: plain req/s >= %.2fx raw at %d outstanding; plain p50 <= %.2fx raw at %d outstanding; "+
		"signed and session req/s >= %.2fx plain at %d outstanding\n",
		r.Targets.ThroughputRatio, r.Targets.ThroughputOutstanding, r.Targets.P50Ratio, r.Targets.P50Outstanding,
		r.Targets.SignedRatio, r.Targets.ThroughputOutstanding)
	fmt.Fprintf(&b, "  cpu/req: CPU time per request of this process (requesters, echo server or agent, mapper); "+
		"brk/req: of the broker process (when known); x raw, x plain: ratios to raw and plain in the same cell\n\n")
	if _, err := io.WriteString(w, b.String()); err != nil {
		return err
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "payload\tout\tload\t|\tmode\tp50\tp99\treq/s\tcpu/req\tbrk/req\tallocs\t|\t"+
		"p50 x raw\treq/s x raw\tcpu x raw\t|\tp50 x plain\treq/s x plain\tcpu x plain\t|\ttarget\t")
	for _, c := range r.Cells {
		for i, m := range c.Results {
			row := []string{"", "", ""}
			if i == 0 {
				row = []string{FormatBytes(c.Payload), fmt.Sprint(c.Outstanding), "-"}
				if c.Load1 > 0 {
					row[2] = fmt.Sprintf("%.1f", c.Load1)
				}
			}
			row = append(row, "|", m.Mode, FormatMicros(m.P50us), FormatMicros(m.P99us), fmt.Sprintf("%.0f", m.RPS),
				FormatMicros(m.CPUus), FormatMicros(m.BrokerCPUus), fmt.Sprintf("%.0f", m.AllocsPerReq),
				"|", FormatRatio(m.P50VsRaw), FormatRatio(m.RPSVsRaw), FormatRatio(m.CPUVsRaw),
				"|", FormatRatio(m.P50VsPlain), FormatRatio(m.RPSVsPlain), FormatRatio(m.CPUVsPlain),
				"|", FormatVerdict(m.Target, m.Pass))
			fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	if len(r.Figures) > 0 {
		if _, err := fmt.Fprintf(w, "\nsecure mode against plain at %d outstanding (same cells, same run):\n",
			r.Targets.ThroughputOutstanding); err != nil {
			return err
		}
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "payload\tmode\treq/s x plain\tp50 x plain\tcpu/req x plain\tcpu-bound req/s x plain\ttarget\t")
		for _, f := range r.Figures {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", FormatBytes(f.Payload), f.Mode, FormatRatio(f.RPSVsPlain),
				FormatRatio(f.P50VsPlain), FormatRatio(f.CPUVsPlain), FormatRatio(f.CPUBound), FormatVerdict(f.Target, f.Pass))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if _, err := fmt.Fprintln(w, "  cpu-bound req/s x plain: plain's CPU per request over the mode's, this process and the broker together:\n"+
			"  the ratio to expect when the machine's CPU limits both, steadier than req/s on a shared machine"); err != nil {
			return err
		}
	}

	var notes []string
	for _, c := range r.Cells {
		for _, m := range c.Results {
			if m.Errors > 0 {
				notes = append(notes, fmt.Sprintf("  %s %s/%d: %d errors, first: %s", m.Mode,
					FormatBytes(c.Payload), c.Outstanding, m.Errors, m.FirstErr))
			}
		}
	}
	if len(notes) > 0 {
		if _, err := fmt.Fprintf(w, "\nerrors:\n%s\n", strings.Join(notes, "\n")); err != nil {
			return err
		}
	}
	if len(r.Counters) > 0 {
		var lines []string
		for _, mode := range r.Modes {
			c := r.Counters[mode]
			if len(c) == 0 {
				continue
			}
			keys := make([]string, 0, len(c))
			for k := range c {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			var kv []string
			for _, k := range keys {
				kv = append(kv, fmt.Sprintf("%s=%d", k, c[k]))
			}
			lines = append(lines, fmt.Sprintf("  %s: %s", mode, strings.Join(kv, " ")))
		}
		if _, err := fmt.Fprintf(w, "\ncounters (mappers also refuse the other modes' registrations and heartbeats):\n%s\n",
			strings.Join(lines, "\n")); err != nil {
			return err
		}
	}
	return nil
}

// FormatRatio prints a ratio with two decimals, "-" for none (0).
func FormatRatio(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", x)
}

// FormatVerdict prints a target and whether it was met ("... PASS",
// "... MISS"), "-" when it was not judged (nil).
func FormatVerdict(target string, pass *bool) string {
	if pass == nil {
		return "-"
	}
	if *pass {
		return target + " PASS"
	}
	return target + " MISS"
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
