package benchmark

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"

	nb "github.com/nanite-go/nanite/nanite/benchmark"
)

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report: a header with the definitions, a table with
// one row per side in each cell, the cross-site request against its legs
// with PASS/MISS, errors and counters.
func (r *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "nanite bench-bridge: %s\n", r.Servers)
	if r.ServersNote != "" {
		fmt.Fprintf(&b, "  servers: %s\n", r.ServersNote)
	}
	fmt.Fprintf(&b, "  %s, GOMAXPROCS=%d, %d CPUs, started %s", r.GoVersion, r.GOMAXPROCS, r.NumCPU,
		r.Started.Format("2006-01-02 15:04:05"))
	if r.LoadStart != "" {
		fmt.Fprintf(&b, ", load average %s at the start, %s at the end", r.LoadStart, r.LoadEnd)
	}
	per := fmt.Sprintf("%gs", r.DurationSec)
	if r.Requests > 0 {
		per = fmt.Sprintf("%d requests", r.Requests)
	}
	fmt.Fprintf(&b, "\n  payload %s; each cell: %s per side in %d rounds, order %s; after %gs warmup per side; "+
		"N outstanding = N goroutines each making sequential requests\n", nb.FormatBytes(r.Payload), per, r.Rounds, r.Order, r.WarmupSec)
	width := 0
	for _, d := range r.Definitions {
		width = max(width, len(d.Name))
	}
	for _, d := range r.Definitions {
		fmt.Fprintf(&b, "  %-*s  %s\n", width+1, d.Name+":", d.What)
	}
	fmt.Fprintf(&b, "  targets: cross p50 <= %.2fx the sum of raw legs at %d outstanding; cross req/s >= %.2fx xmpp at %d outstanding\n",
		r.Targets.P50Ratio, r.Targets.P50Outstanding, r.Targets.ThroughputRatio, r.Targets.ThroughputOutstanding)
	fmt.Fprintf(&b, "  cpu/req: CPU time per request of this process (requesters, echo servers and agents, mappers, bridges); "+
		"srv/req: of the brokers and prosody together (when known); allocs: heap allocations per request in this process\n\n")
	if _, err := io.WriteString(w, b.String()); err != nil {
		return err
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "out\tload\t|\tside\tp50\tp99\treq/s\tcpu/req\tsrv/req\tallocs\terrors\t")
	for _, c := range r.Cells {
		for i, m := range c.Results {
			row := []string{"", ""}
			if i == 0 {
				row = []string{fmt.Sprint(c.Outstanding), "-"}
				if c.Load1 > 0 {
					row[1] = fmt.Sprintf("%.1f", c.Load1)
				}
			}
			row = append(row, "|", m.Side, nb.FormatMicros(m.P50us), nb.FormatMicros(m.P99us), fmt.Sprintf("%.0f", m.RPS),
				nb.FormatMicros(m.CPUus), nb.FormatMicros(m.BrokerCPUus), fmt.Sprintf("%.0f", m.AllocsPerReq), fmt.Sprint(m.Errors))
			fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	project, chain := false, false
	for _, c := range r.Cells {
		project = project || c.SumProjectP50us > 0
		chain = chain || c.P50VsChain > 0
	}
	if _, err := fmt.Fprintln(w, "\ncross-site request against its legs (same cells, same run):"); err != nil {
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	head := "out\t|\tsum of raw legs p50\tcross p50\tx sum\ttarget\t|\txmpp req/s\tcross req/s\tx xmpp\ttarget\tcpu-bound x xmpp\t"
	if project {
		head += "|\tsum of project legs p50\tx project\t"
	}
	if chain {
		head += "|\tx raw-chain p50\tx raw-chain req/s\t"
	}
	fmt.Fprintln(tw, head)
	for _, c := range r.Cells {
		var xr, cr float64
		if x := c.Result(SideXMPP); x != nil {
			xr = x.RPS
		}
		var cp float64
		if x := c.Result(SideCross); x != nil {
			cr, cp = x.RPS, x.P50us
		}
		row := []string{fmt.Sprint(c.Outstanding), "|", nb.FormatMicros(c.SumRawP50us), nb.FormatMicros(cp), nb.FormatRatio(c.P50VsSum),
			nb.FormatVerdict(c.P50Target, c.P50Pass), "|", count(xr), count(cr), nb.FormatRatio(c.RPSVsXMPP), nb.FormatVerdict(c.RPSTarget, c.RPSPass),
			nb.FormatRatio(c.CPUBoundVsXMPP)}
		if project {
			row = append(row, "|", nb.FormatMicros(c.SumProjectP50us), nb.FormatRatio(c.P50VsProject))
		}
		if chain {
			row = append(row, "|", nb.FormatRatio(c.P50VsChain), nb.FormatRatio(c.RPSVsChain))
		}
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if _, err := fmt.Fprintln(w, "  cpu-bound x xmpp: xmpp's CPU per request over cross's, this process and the servers together: the throughput\n"+
		"  ratio to expect when the machine's CPU limits both, steadier than req/s on a shared machine; the servers' CPU\n"+
		"  includes their idle spinning, which weighs more on slower sides"); err != nil {
		return err
	}

	var notes []string
	for _, c := range r.Cells {
		for _, m := range c.Results {
			if m.Errors > 0 {
				notes = append(notes, fmt.Sprintf("  %s at %d outstanding: %d errors, first: %s", m.Side, c.Outstanding, m.Errors, m.FirstErr))
			}
		}
	}
	if len(notes) > 0 {
		if _, err := fmt.Fprintf(w, "\nerrors:\n%s\n", strings.Join(notes, "\n")); err != nil {
			return err
		}
	}
	if len(r.Counters) > 0 {
		keys := make([]string, 0, len(r.Counters))
		for k := range r.Counters {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var kv []string
		for _, k := range keys {
			kv = append(kv, fmt.Sprintf("%s=%d", k, r.Counters[k]))
		}
		if _, err := fmt.Fprintf(w, "\ncounters (warmups and set-up included): %s\n", strings.Join(kv, " ")); err != nil {
			return err
		}
	}
	return nil
}

func count(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", x)
}
