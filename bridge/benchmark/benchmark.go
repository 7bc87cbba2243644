package benchmark

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/nanite-go/nanite/bridge"
	"github.com/nanite-go/nanite/nanite"
	nb "github.com/nanite-go/nanite/nanite/benchmark"
)

// The sides a run can measure (Config.Sides).
const (
	SideAMQPA   = "amqp-a"   // raw AMQP RPC at site A
	SideXMPP    = "xmpp"     // raw XMPP component round trip
	SideAMQPB   = "amqp-b"   // raw AMQP RPC at site B
	SideCross   = "cross"    // requester at A → bridge A → XMPP → bridge B → agent at B and back
	SideNaniteA = "nanite-a" // diagnostic: nanite in-cluster request at A
	SideOp      = "op"       // diagnostic: vertebra op between the raw components
	SideNaniteB = "nanite-b" // diagnostic: nanite in-cluster request at B
	// SideRawChain is diagnostic: cross's path with nothing of the project
	// in it (raw AMQP RPC at A to a raw relay, raw IQ to a raw relay at B,
	// raw AMQP RPC at B, and back).
	SideRawChain = "raw-chain"
)

// DefaultSides are measured by default: the raw legs and the cross-site
// request. AllSides adds the diagnostic sides, in the order they run.
var (
	DefaultSides = []string{SideAMQPA, SideXMPP, SideAMQPB, SideCross}
	AllSides     = []string{SideAMQPA, SideXMPP, SideAMQPB, SideNaniteA, SideOp, SideNaniteB, SideRawChain, SideCross}
)

// Defaults.
const (
	DefaultPayload  = 100
	DefaultDuration = 3 * time.Second
	DefaultWarmup   = 500 * time.Millisecond
	DefaultRounds   = 2
)

// DefaultOutstanding are the numbers of outstanding requests measured by
// default.
var DefaultOutstanding = []int{1, 8, 64}

// The targets (mission: "cross-site request: p50 within 1.3× the sum of its
// raw legs; throughput at least 0.5× the raw XMPP round trip"). The p50
// target is checked sequentially, where a sum of latencies means what it
// says; the throughput target at 64 outstanding, as the in-cluster one.
const (
	TargetP50Ratio              = 1.3
	TargetP50Outstanding        = 1
	TargetThroughputRatio       = 0.5
	TargetThroughputOutstanding = 64
)

// EchoService is the service of the echo agent at B that the cross-site
// request calls (and nanite-b too); LocalEchoService that of the echo
// agent at A (nanite-a), which must not be /bench/echo, or the requester
// at A would pick it instead of the proxy for B.
const (
	EchoService      = "/bench/echo"
	LocalEchoService = "/bench-local/echo"
)

// Domains are the component domains on the XMPP server: the two bridges'
// and the two raw components'.
type Domains struct {
	BridgeA, BridgeB, RawA, RawB string
}

// DefaultDomains are the component domains StartServers configures.
var DefaultDomains = Domains{
	BridgeA: "nanite.site-a.bench", BridgeB: "nanite.site-b.bench",
	RawA: "raw.site-a.bench", RawB: "raw.site-b.bench",
}

func (d Domains) list() []string { return []string{d.BridgeA, d.BridgeB, d.RawA, d.RawB} }

// Config configures a run. URLA, URLB, XMPPAddr and Secret are required
// (see StartServers).
type Config struct {
	// URLA and URLB are the brokers and vhosts of sites A and B,
	// amqp://user:pass@host:port/vhost (two vhosts of one broker will do;
	// they must differ).
	URLA, URLB string
	// XMPPAddr is the XMPP server's component listener (host:port) and
	// Secret the secret of the four components of Domains.
	XMPPAddr, Secret string
	// Domains are the component domains (default DefaultDomains).
	Domains Domains
	// ServersNote describes the servers in the report.
	ServersNote string
	// ServerCPU, when set, reports the CPU time so far of the server
	// processes (brokers and XMPP server), reported per request.
	ServerCPU func() time.Duration

	// Payload is the size in bytes of the payload, a JSON string (default
	// 100, at least 2).
	Payload int
	// Outstanding lists the numbers of outstanding requests: N goroutines
	// each making sequential requests (default 1, 8, 64).
	Outstanding []int
	// Duration each side runs in each cell, split over Rounds (default 3 s).
	Duration time.Duration
	// Requests, when > 0, replaces Duration: each side makes this many
	// requests per cell.
	Requests int
	// Warmup each side runs, unmeasured, before each cell (default 500 ms;
	// negative for none).
	Warmup time.Duration
	// Rounds: the sides run in order, then reversed, and so on (default 2).
	Rounds int
	// Sides to measure (default DefaultSides; AllSides adds the diagnostic
	// ones). They run in the order of AllSides.
	Sides []string
	// BridgeOptions, when set, adjusts the options of the bridge of site
	// "a" or "b" (Logger is already set from Logger).
	BridgeOptions func(site string, o *bridge.Options)

	// Progress, when set, receives a line as each cell starts.
	Progress func(string)
	// Logger receives the bridges', agents' and mappers' logs (default
	// discard).
	Logger *slog.Logger
}

func (c *Config) defaults() error {
	var missing []string
	for name, v := range map[string]string{"URLA": c.URLA, "URLB": c.URLB, "XMPPAddr": c.XMPPAddr, "Secret": c.Secret} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return fmt.Errorf("benchmark: no %s (see StartServers)", strings.Join(missing, ", "))
	}
	if c.URLA == c.URLB {
		return errors.New("benchmark: sites A and B need different vhosts (or brokers)")
	}
	if c.Domains == (Domains{}) {
		c.Domains = DefaultDomains
	}
	for _, d := range c.Domains.list() {
		if d == "" {
			return errors.New("benchmark: every component domain must be given")
		}
	}
	if c.Payload == 0 {
		c.Payload = DefaultPayload
	}
	if c.Payload < 2 {
		return fmt.Errorf("benchmark: payload must be at least 2 bytes (a JSON string), not %d", c.Payload)
	}
	if len(c.Outstanding) == 0 {
		c.Outstanding = DefaultOutstanding
	}
	for _, n := range c.Outstanding {
		if n <= 0 {
			return fmt.Errorf("benchmark: outstanding must be positive, not %d", n)
		}
	}
	if c.Duration <= 0 {
		c.Duration = DefaultDuration
	}
	if c.Warmup == 0 {
		c.Warmup = DefaultWarmup
	}
	if c.Rounds <= 0 {
		c.Rounds = DefaultRounds
	}
	sides, err := ParseSides(c.Sides)
	if err != nil {
		return err
	}
	c.Sides = sides
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Progress == nil {
		c.Progress = func(string) {}
	}
	if c.ServerCPU == nil {
		c.ServerCPU = func() time.Duration { return 0 }
	}
	return nil
}

// ParseSides checks side names and puts them in the order of AllSides
// ("all" stands for AllSides; nil or empty for DefaultSides).
func ParseSides(names []string) ([]string, error) {
	if len(names) == 0 {
		return slices.Clone(DefaultSides), nil
	}
	want := map[string]bool{}
	for _, n := range names {
		n = strings.TrimSpace(n)
		switch {
		case n == "all":
			for _, s := range AllSides {
				want[s] = true
			}
		case slices.Contains(AllSides, n):
			want[n] = true
		default:
			return nil, fmt.Errorf("benchmark: unknown side %q (want %s or all)", n, strings.Join(AllSides, ", "))
		}
	}
	var out []string
	for _, s := range AllSides {
		if want[s] {
			out = append(out, s)
		}
	}
	return out, nil
}

// Report is the outcome of a run.
type Report struct {
	Servers     string    `json:"servers"`
	ServersNote string    `json:"servers_note,omitempty"`
	Started     time.Time `json:"started"`
	GoVersion   string    `json:"go_version"`
	GOMAXPROCS  int       `json:"gomaxprocs"`
	NumCPU      int       `json:"num_cpu"`
	LoadStart   string    `json:"load_average_start,omitempty"` // /proc/loadavg: 1, 5, 15 minutes
	LoadEnd     string    `json:"load_average_end,omitempty"`
	Payload     int       `json:"payload_bytes"`
	DurationSec float64   `json:"duration_per_side_s,omitempty"`
	Requests    int       `json:"requests_per_side,omitempty"`
	WarmupSec   float64   `json:"warmup_s"`
	Rounds      int       `json:"rounds"`
	Sides       []string  `json:"sides"`
	Order       string    `json:"order"`
	// Definitions say what each side measures, and what the sum of the raw
	// legs is.
	Definitions []Definition `json:"definitions"`
	Targets     Targets      `json:"targets"`
	Cells       []Cell       `json:"cells"`
	// Counters are the bridges' and the XMPP endpoints' counters at the
	// end of the run (zeros omitted).
	Counters map[string]int64 `json:"counters,omitempty"`
}

// Definition says what a side (or a derived figure) is.
type Definition struct {
	Name string `json:"name"`
	What string `json:"what"`
}

// Targets restates the targets.
type Targets struct {
	P50Ratio              float64 `json:"cross_p50_vs_sum_of_raw_legs_max"`
	P50Outstanding        int     `json:"p50_at_outstanding"`
	ThroughputRatio       float64 `json:"cross_req_per_s_vs_xmpp_min"`
	ThroughputOutstanding int     `json:"throughput_at_outstanding"`
}

// Cell is one number of outstanding requests.
type Cell struct {
	Outstanding int `json:"outstanding"`
	// Load1 is the machine's 1-minute load average when the cell ended.
	Load1   float64  `json:"load1,omitempty"`
	Results []Result `json:"sides"`
	// SumRawP50us is p50(amqp-a) + p50(xmpp) + p50(amqp-b) (0 unless all
	// three ran); P50VsSum is cross's p50 over it.
	SumRawP50us float64 `json:"sum_of_raw_legs_p50_us,omitempty"`
	P50VsSum    float64 `json:"cross_p50_vs_sum,omitempty"`
	// SumProjectP50us is p50(nanite-a) + p50(op) + p50(nanite-b) (0
	// unless all three ran); P50VsProject is cross's p50 over it: what the
	// bridges add beyond the nanite and ops protocols themselves.
	SumProjectP50us float64 `json:"sum_of_project_legs_p50_us,omitempty"`
	P50VsProject    float64 `json:"cross_p50_vs_project_legs,omitempty"`
	// P50VsChain is cross's p50 over raw-chain's: the same path, processes
	// and machine, with nothing of the project in it.
	P50VsChain float64 `json:"cross_p50_vs_raw_chain,omitempty"`
	// RPSVsChain is cross's throughput over raw-chain's.
	RPSVsChain float64 `json:"cross_req_per_s_vs_raw_chain,omitempty"`
	// RPSVsXMPP is cross's throughput over xmpp's.
	RPSVsXMPP float64 `json:"cross_req_per_s_vs_xmpp,omitempty"`
	// CPUBoundVsXMPP is xmpp's CPU per request over cross's, this process
	// and the servers together: the throughput ratio to expect when the
	// machine's CPU limits both (as when everything shares one machine),
	// steadier than req/s on a shared machine. 0 when a CPU time is
	// unknown.
	CPUBoundVsXMPP float64 `json:"cross_cpu_bound_vs_xmpp,omitempty"`
	// The targets that apply in this cell and whether they were met.
	P50Target string `json:"p50_target,omitempty"`
	P50Pass   *bool  `json:"p50_pass,omitempty"`
	RPSTarget string `json:"req_per_s_target,omitempty"`
	RPSPass   *bool  `json:"req_per_s_pass,omitempty"`
}

// Result is one side in a cell.
type Result struct {
	Side string `json:"side"`
	nb.Measure
}

// Result returns the result of the named side, nil if it did not run.
func (c *Cell) Result(side string) *Result {
	for i := range c.Results {
		if c.Results[i].Side == side && c.Results[i].Requests > 0 {
			return &c.Results[i]
		}
	}
	return nil
}

// judge computes the derived figures and checks the targets.
func (c *Cell) judge() {
	quo := func(a, b float64) float64 {
		if a == 0 || b == 0 {
			return 0
		}
		return a / b
	}
	cross := c.Result(SideCross)
	if a, x, b := c.Result(SideAMQPA), c.Result(SideXMPP), c.Result(SideAMQPB); a != nil && x != nil && b != nil {
		c.SumRawP50us = a.P50us + x.P50us + b.P50us
	}
	if a, o, b := c.Result(SideNaniteA), c.Result(SideOp), c.Result(SideNaniteB); a != nil && o != nil && b != nil {
		c.SumProjectP50us = a.P50us + o.P50us + b.P50us
	}
	if cross == nil {
		return
	}
	c.P50VsSum = quo(cross.P50us, c.SumRawP50us)
	c.P50VsProject = quo(cross.P50us, c.SumProjectP50us)
	if ch := c.Result(SideRawChain); ch != nil {
		c.P50VsChain, c.RPSVsChain = quo(cross.P50us, ch.P50us), quo(cross.RPS, ch.RPS)
	}
	if x := c.Result(SideXMPP); x != nil {
		c.RPSVsXMPP = quo(cross.RPS, x.RPS)
		if x.CPUus > 0 && x.BrokerCPUus > 0 && cross.CPUus > 0 && cross.BrokerCPUus > 0 {
			c.CPUBoundVsXMPP = (x.CPUus + x.BrokerCPUus) / (cross.CPUus + cross.BrokerCPUus)
		}
	}
	if c.Outstanding == TargetP50Outstanding && c.P50VsSum > 0 {
		pass := c.P50VsSum <= TargetP50Ratio
		c.P50Target, c.P50Pass = fmt.Sprintf("p50<=%.2fx sum of raw legs", TargetP50Ratio), &pass
	}
	if c.Outstanding == TargetThroughputOutstanding && c.RPSVsXMPP > 0 {
		pass := c.RPSVsXMPP >= TargetThroughputRatio
		c.RPSTarget, c.RPSPass = fmt.Sprintf("req/s>=%.2fx xmpp", TargetThroughputRatio), &pass
	}
}

// side is a Side that a run sets up and closes.
type side interface {
	nb.Side
	Close() error
}

// Run sets up every side, measures every cell and returns the report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	rep := &Report{
		Servers: fmt.Sprintf("site A %s, site B %s, XMPP server %s (components %s)", nb.RedactURL(cfg.URLA),
			nb.RedactURL(cfg.URLB), cfg.XMPPAddr, strings.Join(cfg.Domains.list(), ", ")),
		ServersNote: cfg.ServersNote, Started: time.Now(),
		GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(),
		LoadStart: nb.LoadAverage(), Payload: cfg.Payload, WarmupSec: max(cfg.Warmup, 0).Seconds(),
		Rounds: cfg.Rounds, Sides: cfg.Sides, Order: nb.Order(cfg.Sides, cfg.Rounds),
		Definitions: definitions(cfg),
		Targets:     Targets{TargetP50Ratio, TargetP50Outstanding, TargetThroughputRatio, TargetThroughputOutstanding},
	}
	if cfg.Requests > 0 {
		rep.Requests = cfg.Requests
	} else {
		rep.DurationSec = cfg.Duration.Seconds()
	}

	env := &sites{cfg: &cfg}
	defer env.close()
	var sides []nb.Side
	for _, name := range cfg.Sides {
		cfg.Progress("setting up " + name)
		var (
			s   nb.Side
			err error
		)
		// The goroutines a side starts (connections, sessions, bridges,
		// agents) carry its profile label: go tool pprof -tagfocus=mode=cross.
		pprof.Do(ctx, pprof.Labels(nb.ProfileLabel, name), func(ctx context.Context) {
			s, err = env.side(ctx, name)
		})
		if err != nil {
			return nil, fmt.Errorf("benchmark: side %s: %w", name, err)
		}
		sides = append(sides, s)
	}

	payload := nb.MakePayload(cfg.Payload)
	sch := nb.Schedule{Duration: cfg.Duration, Requests: cfg.Requests, Warmup: cfg.Warmup, Rounds: cfg.Rounds,
		ServerCPU: cfg.ServerCPU}
	for k, out := range cfg.Outstanding {
		load := ""
		if l := nb.LoadAverage(); l != "" {
			load = ", load average " + l
		}
		cfg.Progress(fmt.Sprintf("cell %d/%d: payload %s, %d outstanding%s", k+1, len(cfg.Outstanding),
			nb.FormatBytes(cfg.Payload), out, load))
		ms, err := nb.MeasureCell(ctx, sides, payload, out, sch)
		if err != nil {
			return rep, err
		}
		cell := Cell{Outstanding: out, Load1: nb.Load1()}
		for i, s := range sides {
			cell.Results = append(cell.Results, Result{Side: s.Name(), Measure: ms[i]})
		}
		cell.judge()
		rep.Cells = append(rep.Cells, cell)
	}
	rep.LoadEnd = nb.LoadAverage()
	rep.Counters = env.counters()
	return rep, nil
}

func definitions(cfg Config) []Definition {
	d := cfg.Domains
	all := map[string]string{
		SideAMQPA: "raw AMQP RPC at site A: amqp091-go echo consumer (prefetch " + fmt.Sprint(nanite.DefaultPrefetch) +
			", echoing in its delivery loop, ack after the reply) answering to the requester's exclusive reply queue " +
			"by correlation id; one connection each (nanite/benchmark's raw baseline)",
		SideXMPP: "raw XMPP component round trip: " + d.RawA + " sends an IQ-set carrying the payload as text to " +
			"echo@" + d.RawB + ", which answers with an IQ-result carrying it back (mellium sessions, through the XMPP server)",
		SideAMQPB: "raw AMQP RPC at site B, as amqp-a",
		SideNaniteA: "nanite request at A: the requester's embedded mapper to an echo agent at A (" + LocalEchoService +
			"); what one AMQP leg of cross costs in nanite",
		SideOp: "vertebra op from " + d.RawA + " to an echo handler at echo@" + d.RawB +
			" (op, echo with ack+data+final batched, as bridge B answers); what the XMPP leg of cross costs in the ops protocol",
		SideNaniteB: "nanite request at B: an embedded mapper at B to the echo agent at B (" + EchoService + ")",
		SideRawChain: "cross's path with nothing of the project in it: a raw AMQP RPC at A to a raw relay (amqp091-go, " +
			"a goroutine per request) that sends the payload in an IQ-set from " + d.RawA + " to relay@" + d.RawB +
			", whose handler makes a raw AMQP RPC at B (as amqp-b) and answers with its result; what the machine " +
			"charges for the chain of four processes that cross crosses",
		SideCross: "requester at A (embedded nanite mapper) asks " + EchoService + " -> bridge A's proxy agent -> op from A's " +
			"cluster JID to B's over XMPP -> bridge B's mapper -> echo agent at B, and back; every answer must equal the payload",
	}
	var out []Definition
	for _, s := range cfg.Sides {
		out = append(out, Definition{s, all[s]})
	}
	out = append(out, Definition{"sum of raw legs", "p50(amqp-a) + p50(xmpp) + p50(amqp-b) in the same cell: " +
		"a request crossing AMQP at A, XMPP and AMQP at B with nothing of the project in it"})
	if cfg.has(SideNaniteA) && cfg.has(SideOp) && cfg.has(SideNaniteB) {
		out = append(out, Definition{"sum of project legs", "p50(nanite-a) + p50(op) + p50(nanite-b): " +
			"the same legs in nanite and the ops protocol; cross over it is what the bridges add"})
	}
	return out
}

func (c *Config) has(side string) bool { return slices.Contains(c.Sides, side) }
