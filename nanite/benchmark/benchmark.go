// Package benchmark measures an in-cluster nanite request against a raw
// AMQP request/reply baseline, side by side on the same broker in the same
// run, because absolute numbers drift on shared machines; and nanite's
// secure mode (signed, and signed with sealed payloads) beside plain mode.
//
// The raw baseline is a plain amqp091-go RPC: an echo consumer on a queue
// (prefetch equal to the agent's, manual ack after replying) answers to the
// requester's exclusive reply queue, matched by correlation id. Each nanite
// mode is a request through an embedded nanite.Mapper to one nanite.Agent
// serving an echo actor; the secure modes give both a nanite.Secure with
// identities of one CA, their own verifiers, and (on the agent) a one-rule
// allow policy. Each cell (payload size × outstanding requests) runs every
// mode, interleaved in ABBA order (raw, plain, signed, …, signed, plain,
// raw) so that drift hits all alike, and reports p50, p99, throughput, CPU
// per request and the ratios of each mode to raw and to plain.
//
// The package needs a broker URL; it does not start one (cmd/nanite's bench
// command starts a private one through testenv when given none).
package benchmark

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanite-go/nanite/nanite"
)

// Defaults.
const (
	DefaultDuration = 3 * time.Second
	DefaultWarmup   = 500 * time.Millisecond
	DefaultRounds   = 2
	// RequestTimeout bounds every single request of every mode.
	RequestTimeout = 30 * time.Second
)

// DefaultOutstanding and DefaultPayloads are the cells measured by default.
var (
	DefaultOutstanding = []int{1, 8, 64}
	DefaultPayloads    = []int{100, 10 * 1024}
)

// The targets: plain nanite throughput at least 0.8× raw at 64
// outstanding and p50 within 1.25× raw sequentially (the core issue);
// signed throughput at least 0.6× plain at 64 outstanding (the security
// issue; session keys are held to the same target).
const (
	TargetThroughputRatio       = 0.8
	TargetThroughputOutstanding = 64
	TargetP50Ratio              = 1.25
	TargetP50Outstanding        = 1
	TargetSignedRatio           = 0.6
)

// ProfileLabel is the pprof label key under which every goroutine of a
// mode (its requesters, and its agent's and mapper's goroutines) runs, so
// that a CPU profile of a run can be cut by mode:
// go tool pprof -tagfocus=mode=signed:hybrid.
const ProfileLabel = "mode"

// Config configures a run. Only URL is required.
type Config struct {
	// URL of the broker and vhost, amqp://user:pass@host:port/vhost.
	URL string
	// BrokerNote describes the broker in the report (e.g. "private node
	// started by testenv").
	BrokerNote string
	// Duration each mode runs in each cell, split over Rounds (default 3 s).
	Duration time.Duration
	// Requests, when > 0, replaces Duration: each mode makes this many
	// requests per cell (split over Rounds).
	Requests int
	// Warmup each mode runs, unmeasured, before each cell (default 500 ms;
	// negative for none).
	Warmup time.Duration
	// Rounds is how many times each mode runs in each cell, in the order
	// of Modes, then reversed, and so on (default 2, i.e. ABBA).
	Rounds int
	// Outstanding lists the concurrency levels: N goroutines each making
	// sequential requests (default 1, 8, 64).
	Outstanding []int
	// Payloads lists payload sizes in bytes (default 100 and 10240).
	Payloads []int
	// Modes lists what is measured (default DefaultModes; see ParseModes):
	// "raw", "plain", "signed", "sealed", "session", "signed:KEM",
	// "sealed:KEM", "session:KEM".
	Modes []string
	// KEMs are the sealing KEMs that "signed" and "sealed" are measured
	// with, each in turn: "hybrid" (ML-KEM-768+X25519) and/or "x25519"
	// (default DefaultKEMs, both).
	KEMs []string
	// Prefetch of the raw echo consumer and of the agents (default
	// nanite.DefaultPrefetch).
	Prefetch int
	// RawSpawn makes the raw echo server handle each message in a goroutine
	// of its own, as the agent does, instead of in its delivery loop. It
	// shows how much of the difference is that design choice.
	RawSpawn bool
	// Progress, when set, receives a line as each cell starts.
	Progress func(string)
	// Logger receives the agents' and mappers' logs (default discard).
	Logger *slog.Logger
	// BrokerCPU, when set, reports the broker's CPU time so far, so that
	// the broker's share of each request is reported too (see ProcessCPU).
	BrokerCPU func() time.Duration

	modes []Mode
}

// Report is the outcome of a run.
type Report struct {
	Broker      string    `json:"broker"`
	BrokerNote  string    `json:"broker_note,omitempty"`
	Started     time.Time `json:"started"`
	GoVersion   string    `json:"go_version"`
	GOMAXPROCS  int       `json:"gomaxprocs"`
	NumCPU      int       `json:"num_cpu"`
	LoadStart   string    `json:"load_average_start,omitempty"` // /proc/loadavg: 1, 5, 15 minutes
	LoadEnd     string    `json:"load_average_end,omitempty"`
	Prefetch    int       `json:"prefetch"`
	DurationSec float64   `json:"duration_per_mode_s,omitempty"`
	Requests    int       `json:"requests_per_mode,omitempty"`
	WarmupSec   float64   `json:"warmup_s"`
	Rounds      int       `json:"rounds"`
	Modes       []string  `json:"modes"`
	Order       string    `json:"order"`
	Baseline    string    `json:"baseline"`
	NaniteSide  string    `json:"nanite"`
	SecureSide  string    `json:"secure,omitempty"`
	Targets     Targets   `json:"targets"`
	Cells       []Cell    `json:"cells"`
	// Figures are the security issue's figures: each secure mode against
	// plain at TargetThroughputOutstanding, one per payload.
	Figures []Figure `json:"figures,omitempty"`
	// Counters are the agents' and mappers' refusal and failure counters
	// at the end of the run, by mode (zeros omitted). Mappers also count
	// the registrations and heartbeats of the other modes' agents that
	// they refuse (plain mappers cannot decode signed packets and signed
	// ones refuse unsigned packets).
	Counters map[string]map[string]int64 `json:"counters,omitempty"`
}

// Targets restates the targets the cells are checked against.
type Targets struct {
	ThroughputRatio       float64 `json:"throughput_ratio_min"`
	ThroughputOutstanding int     `json:"throughput_at_outstanding"`
	P50Ratio              float64 `json:"p50_ratio_max"`
	P50Outstanding        int     `json:"p50_at_outstanding"`
	SignedRatio           float64 `json:"signed_vs_plain_throughput_min"`
}

// Cell is one payload size at one concurrency.
type Cell struct {
	Payload     int `json:"payload_bytes"`
	Outstanding int `json:"outstanding"`
	// Load1 is the machine's 1-minute load average when the cell ended
	// (Linux; 0 elsewhere).
	Load1   float64  `json:"load1,omitempty"`
	Results []Result `json:"modes"`
}

// Result is one mode in a cell.
type Result struct {
	Mode string `json:"mode"`
	Measure
	// Ratios to raw and to plain: p50, req/s, CPU per request (0 when the
	// other did not run, or for the mode itself).
	P50VsRaw   float64 `json:"p50_vs_raw,omitempty"`
	RPSVsRaw   float64 `json:"req_per_s_vs_raw,omitempty"`
	CPUVsRaw   float64 `json:"cpu_vs_raw,omitempty"`
	P50VsPlain float64 `json:"p50_vs_plain,omitempty"`
	RPSVsPlain float64 `json:"req_per_s_vs_plain,omitempty"`
	CPUVsPlain float64 `json:"cpu_vs_plain,omitempty"`
	// Target describes the target that applies to this mode in this cell
	// ("p50<=1.25x raw", "req/s>=0.80x raw", "req/s>=0.60x plain" or ""),
	// Pass whether it was met.
	Target string `json:"target,omitempty"`
	Pass   *bool  `json:"pass,omitempty"`
}

// Figure is a secure mode against plain in one cell.
type Figure struct {
	Payload     int     `json:"payload_bytes"`
	Outstanding int     `json:"outstanding"`
	Mode        string  `json:"mode"`
	RPSVsPlain  float64 `json:"req_per_s_vs_plain"`
	P50VsPlain  float64 `json:"p50_vs_plain"`
	CPUVsPlain  float64 `json:"cpu_vs_plain,omitempty"`
	// CPUBound is plain's CPU per request over this mode's, this process
	// and the broker together: the throughput ratio to expect when the
	// machine's CPU is what limits both (as when everything runs on one
	// machine), steadier than req/s on a shared, noisy machine. 0 when a
	// CPU time is unknown.
	CPUBound float64 `json:"cpu_bound_ratio,omitempty"`
	Target   string  `json:"target,omitempty"`
	Pass     *bool   `json:"pass,omitempty"`
}

// Measure is one mode's measurement in a cell.
type Measure struct {
	Requests int     `json:"requests"`
	Errors   int     `json:"errors"`
	Seconds  float64 `json:"seconds"`
	RPS      float64 `json:"req_per_s"`
	P50us    float64 `json:"p50_us"`
	P90us    float64 `json:"p90_us"`
	P99us    float64 `json:"p99_us"`
	MaxUs    float64 `json:"max_us"`
	MeanUs   float64 `json:"mean_us"`
	// CPUus is the CPU time of this process (requesters plus the echo
	// server or agent, and the mapper) per request, in µs; 0 where it
	// cannot be measured. The broker's CPU is not included.
	CPUus float64 `json:"cpu_us_per_req,omitempty"`
	// BrokerCPUus is the broker's CPU time per request, in µs, when the
	// broker's process is known (0 otherwise). Other users of the broker
	// add to it.
	BrokerCPUus float64 `json:"broker_cpu_us_per_req,omitempty"`
	// AllocsPerReq and BytesPerReq are this process's heap allocations per
	// request (runtime.MemStats), both sides of the request together.
	AllocsPerReq float64 `json:"allocs_per_req"`
	BytesPerReq  float64 `json:"bytes_per_req"`
	FirstErr     string  `json:"first_error,omitempty"`
	latencies    []time.Duration
	cpu, broker  time.Duration
	mallocs      uint64
	allocBytes   uint64
}

// side is one way of making echo requests.
type side interface {
	name() string
	do(ctx context.Context, payload []byte) error
	close() error
}

func (c *Config) defaults() error {
	if c.URL == "" {
		return errors.New("benchmark: no broker URL")
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
	if len(c.Outstanding) == 0 {
		c.Outstanding = DefaultOutstanding
	}
	if len(c.Payloads) == 0 {
		c.Payloads = DefaultPayloads
	}
	for _, n := range c.Outstanding {
		if n <= 0 {
			return fmt.Errorf("benchmark: outstanding must be positive, not %d", n)
		}
	}
	for _, n := range c.Payloads {
		if n < 2 {
			return fmt.Errorf("benchmark: payload must be at least 2 bytes (a JSON string), not %d", n)
		}
	}
	if c.Prefetch <= 0 {
		c.Prefetch = nanite.DefaultPrefetch
	}
	modes, err := ParseModes(c.Modes, c.KEMs)
	if err != nil {
		return err
	}
	if len(modes) == 0 {
		return errors.New("benchmark: no mode to measure")
	}
	c.modes = modes
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Progress == nil {
		c.Progress = func(string) {}
	}
	if c.BrokerCPU == nil {
		c.BrokerCPU = func() time.Duration { return 0 }
	}
	return nil
}

// Run measures every cell and returns the report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	var names []string
	for _, m := range cfg.modes {
		names = append(names, m.Name)
	}
	rep := &Report{
		Broker: RedactURL(cfg.URL), BrokerNote: cfg.BrokerNote, Started: time.Now(),
		GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(),
		LoadStart: loadAverage(),
		Prefetch:  cfg.Prefetch, WarmupSec: max(cfg.Warmup, 0).Seconds(), Rounds: cfg.Rounds,
		Modes: names, Order: order(names, cfg.Rounds),
		Baseline: fmt.Sprintf("amqp091-go request/reply: echo consumer on a queue with prefetch %d "+
			"(nanite.DefaultPrefetch=%d), echoing %s, manual ack after the reply is published, replying to the "+
			"requester's exclusive auto-ack reply queue matched by correlation id; one connection for "+
			"the echo server and one for the requester, as nanite's agent and mapper",
			cfg.Prefetch, nanite.DefaultPrefetch, rawMode(cfg.RawSpawn)),
		NaniteSide: fmt.Sprintf("nanite.Mapper.Request (least_loaded) through an embedded mapper to one "+
			"nanite.Agent (prefetch %d) serving an echo actor; each mode has its own agent, mapper and service", cfg.Prefetch),
		Targets: Targets{TargetThroughputRatio, TargetThroughputOutstanding, TargetP50Ratio, TargetP50Outstanding,
			TargetSignedRatio},
	}
	if slices.ContainsFunc(cfg.modes, func(m Mode) bool { return m.Secure }) {
		rep.SecureSide = "nanite.Secure on agent and mapper: Ed25519 identities of one CA (role agent, " +
			"role mapper) whose sealing keys use the mode's KEM, one security.Verifier each (defaults: " +
			"60 s window, replay and certificate caches), a one-rule allow policy on the agent " +
			"(the mapper may call the mode's echo service); every envelope carries the signer's " +
			"certificate except heartbeats; sealed: Seal=true (request sealed to the agent, result to the mapper); " +
			"session: Sessions=true (the first request signed with an HPKE-sealed session key, then " +
			"requests and results authenticated with HMAC-SHA256 under it; docs/security.md, Session keys)"
	}
	if cfg.Requests > 0 {
		rep.Requests = cfg.Requests
	} else {
		rep.DurationSec = cfg.Duration.Seconds()
	}

	var sides []side
	defer func() {
		for _, s := range sides {
			_ = s.close()
		}
	}()
	var ca *secureCA
	for _, m := range cfg.modes {
		var (
			s   side
			err error
		)
		if m.Secure && ca == nil {
			if ca, err = newSecureCA(); err != nil {
				return nil, err
			}
		}
		// The goroutines a side starts (connections, consumers, the agent's
		// handlers) carry the mode's profile label.
		pprof.Do(ctx, pprof.Labels(ProfileLabel, m.Name), func(ctx context.Context) {
			if m.Name == ModeRaw {
				s, err = newRawSide(ctx, cfg.URL, cfg.Prefetch, cfg.RawSpawn)
			} else {
				s, err = newNaniteSide(ctx, cfg.URL, cfg.Prefetch, cfg.Logger, m, ca)
			}
		})
		if err != nil {
			return nil, fmt.Errorf("benchmark: mode %s: %w", m.Name, err)
		}
		sides = append(sides, s)
	}
	// Every mode's mapper must route to its own agent only.
	for _, s := range sides {
		if n, ok := s.(*naniteSide); ok {
			if err := n.checkRouting(); err != nil {
				return nil, err
			}
		}
	}

	total := len(cfg.Payloads) * len(cfg.Outstanding)
	k := 0
	for _, size := range cfg.Payloads {
		payload := makePayload(size)
		for _, out := range cfg.Outstanding {
			k++
			load := ""
			if l := loadAverage(); l != "" {
				load = ", load average " + l
			}
			cfg.Progress(fmt.Sprintf("cell %d/%d: payload %s, %d outstanding%s", k, total, FormatBytes(size), out, load))
			cell, err := runCell(ctx, &cfg, sides, payload, out)
			if err != nil {
				return rep, err
			}
			rep.Cells = append(rep.Cells, cell)
		}
	}
	rep.LoadEnd = loadAverage()
	rep.Figures = figures(rep.Cells)
	for _, s := range sides {
		if n, ok := s.(*naniteSide); ok {
			if c := n.counters(); len(c) > 0 {
				if rep.Counters == nil {
					rep.Counters = map[string]map[string]int64{}
				}
				rep.Counters[n.name()] = c
			}
		}
	}
	return rep, nil
}

func rawMode(spawn bool) string {
	if spawn {
		return "in a goroutine per message (--raw-spawn, as the agent does)"
	}
	return "in its delivery loop"
}

// order describes the interleaving of the modes for n rounds.
func order(names []string, rounds int) string {
	var s []string
	for r := range rounds {
		these := slices.Clone(names)
		if r%2 == 1 {
			slices.Reverse(these)
		}
		s = append(s, strings.Join(these, ", "))
	}
	return strings.Join(s, "; ")
}

func runCell(ctx context.Context, cfg *Config, sides []side, payload []byte, out int) (Cell, error) {
	cell := Cell{Payload: len(payload), Outstanding: out}
	ss := make([]Side, len(sides))
	for i, s := range sides {
		ss[i] = sideAdapter{s}
	}
	ms, err := MeasureCell(ctx, ss, payload, out, Schedule{Duration: cfg.Duration, Requests: cfg.Requests,
		Warmup: cfg.Warmup, Rounds: cfg.Rounds, ServerCPU: cfg.BrokerCPU})
	if err != nil {
		return cell, err
	}
	for i, s := range sides {
		cell.Results = append(cell.Results, Result{Mode: s.name(), Measure: ms[i]})
	}
	cell.Load1 = load1()
	cell.judge()
	return cell, nil
}

// sideAdapter makes a side of this package a Side.
type sideAdapter struct{ s side }

func (a sideAdapter) Name() string                                 { return a.s.name() }
func (a sideAdapter) Do(ctx context.Context, payload []byte) error { return a.s.do(ctx, payload) }

// Result returns the result of the named mode, nil if it did not run.
func (c *Cell) Result(mode string) *Result {
	for i := range c.Results {
		if c.Results[i].Mode == mode {
			return &c.Results[i]
		}
	}
	return nil
}

// judge computes the ratios and checks the targets.
func (c *Cell) judge() {
	raw, plain := c.Result(ModeRaw), c.Result(ModePlain)
	for i := range c.Results {
		r := &c.Results[i]
		if r.Requests == 0 {
			continue
		}
		if raw != nil && r != raw && raw.Requests > 0 {
			r.P50VsRaw, r.RPSVsRaw, r.CPUVsRaw = quo(r.P50us, raw.P50us), quo(r.RPS, raw.RPS), quo(r.CPUus, raw.CPUus)
		}
		if plain != nil && r != plain && r != raw && plain.Requests > 0 {
			r.P50VsPlain, r.RPSVsPlain, r.CPUVsPlain = quo(r.P50us, plain.P50us), quo(r.RPS, plain.RPS), quo(r.CPUus, plain.CPUus)
		}
		var pass bool
		switch base, _, _ := strings.Cut(r.Mode, ":"); {
		case base == ModePlain && c.Outstanding == TargetP50Outstanding && r.P50VsRaw > 0:
			r.Target, pass = fmt.Sprintf("p50<=%.2fx raw", TargetP50Ratio), r.P50VsRaw <= TargetP50Ratio
		case base == ModePlain && c.Outstanding == TargetThroughputOutstanding && r.RPSVsRaw > 0:
			r.Target, pass = fmt.Sprintf("req/s>=%.2fx raw", TargetThroughputRatio), r.RPSVsRaw >= TargetThroughputRatio
		case (base == ModeSigned || base == ModeSession) && c.Outstanding == TargetThroughputOutstanding && r.RPSVsPlain > 0:
			r.Target, pass = fmt.Sprintf("req/s>=%.2fx plain", TargetSignedRatio), r.RPSVsPlain >= TargetSignedRatio
		default:
			continue
		}
		r.Pass = &pass
	}
}

func quo(a, b float64) float64 {
	if a == 0 || b == 0 {
		return 0
	}
	return a / b
}

// figures picks the secure modes' results at TargetThroughputOutstanding.
func figures(cells []Cell) []Figure {
	var fs []Figure
	for _, c := range cells {
		if c.Outstanding != TargetThroughputOutstanding {
			continue
		}
		plain := c.Result(ModePlain)
		for _, r := range c.Results {
			if base, _, _ := strings.Cut(r.Mode, ":"); base != ModeSigned && base != ModeSealed && base != ModeSession || r.RPSVsPlain == 0 {
				continue
			}
			f := Figure{Payload: c.Payload, Outstanding: c.Outstanding, Mode: r.Mode,
				RPSVsPlain: r.RPSVsPlain, P50VsPlain: r.P50VsPlain, CPUVsPlain: r.CPUVsPlain, Target: r.Target, Pass: r.Pass}
			if plain.CPUus > 0 && plain.BrokerCPUus > 0 && r.CPUus > 0 && r.BrokerCPUus > 0 {
				f.CPUBound = (plain.CPUus + plain.BrokerCPUus) / (r.CPUus + r.BrokerCPUus)
			}
			fs = append(fs, f)
		}
	}
	return fs
}

// runSlice runs out workers, each making sequential requests, for d (or
// until reqs requests in all when reqs > 0).
func runSlice(ctx context.Context, s Side, payload []byte, out int, d time.Duration, reqs int, brokerCPU func() time.Duration) (*Measure, error) {
	m := &Measure{}
	var (
		mu       sync.Mutex
		count    atomic.Int64
		errCount atomic.Int64
		firstErr atomic.Value
		wg       sync.WaitGroup
	)
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	cpu0, broker0 := processCPU(), brokerCPU()
	start := time.Now()
	end := start.Add(d)
	for range out {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pprof.SetGoroutineLabels(pprof.WithLabels(ctx, pprof.Labels(ProfileLabel, s.Name())))
			lat := make([]time.Duration, 0, 1024)
			for ctx.Err() == nil {
				if reqs > 0 {
					if count.Add(1) > int64(reqs) {
						break
					}
				} else if !time.Now().Before(end) {
					break
				}
				t0 := time.Now()
				rctx, cancel := context.WithTimeout(ctx, RequestTimeout)
				err := s.Do(rctx, payload)
				cancel()
				if err != nil {
					if errCount.Add(1) == 1 {
						firstErr.Store(err.Error())
					}
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			m.latencies = append(m.latencies, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	m.cpu = processCPU() - cpu0
	runtime.ReadMemStats(&ms1)
	m.mallocs, m.allocBytes = ms1.Mallocs-ms0.Mallocs, ms1.TotalAlloc-ms0.TotalAlloc
	if b := brokerCPU(); b > 0 && broker0 > 0 {
		m.broker = b - broker0
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.Seconds = elapsed.Seconds()
	m.Requests = len(m.latencies)
	m.Errors = int(errCount.Load())
	if e, ok := firstErr.Load().(string); ok {
		m.FirstErr = e
	}
	if m.Errors > 0 && m.Requests == 0 {
		return nil, fmt.Errorf("benchmark: every %s request failed: %s", s.Name(), m.FirstErr)
	}
	return m, nil
}

func (m *Measure) merge(o *Measure) {
	m.latencies = append(m.latencies, o.latencies...)
	m.Requests += o.Requests
	m.Errors += o.Errors
	m.Seconds += o.Seconds
	m.cpu += o.cpu
	m.broker += o.broker
	m.mallocs += o.mallocs
	m.allocBytes += o.allocBytes
	if m.FirstErr == "" {
		m.FirstErr = o.FirstErr
	}
}

func (m *Measure) finish() {
	if m.Seconds > 0 {
		m.RPS = float64(m.Requests) / m.Seconds
	}
	if m.Requests > 0 && m.cpu > 0 {
		m.CPUus = us(m.cpu) / float64(m.Requests)
	}
	if m.Requests > 0 {
		m.AllocsPerReq = float64(m.mallocs) / float64(m.Requests)
		m.BytesPerReq = float64(m.allocBytes) / float64(m.Requests)
	}
	if m.Requests > 0 && m.broker > 0 {
		m.BrokerCPUus = us(m.broker) / float64(m.Requests)
	}
	if len(m.latencies) == 0 {
		return
	}
	slices.Sort(m.latencies)
	m.P50us = us(Percentile(m.latencies, 0.50))
	m.P90us = us(Percentile(m.latencies, 0.90))
	m.P99us = us(Percentile(m.latencies, 0.99))
	m.MaxUs = us(m.latencies[len(m.latencies)-1])
	var sum time.Duration
	for _, l := range m.latencies {
		sum += l
	}
	m.MeanUs = us(sum) / float64(len(m.latencies))
	m.latencies = nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// Percentile returns the nearest-rank p-quantile (0 < p ≤ 1) of sorted.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p+0.999999999) - 1
	i = min(max(i, 0), len(sorted)-1)
	return sorted[i]
}

// makePayload returns a JSON string of exactly size bytes, so that both
// sides carry the same bytes and the nanite side needs no re-encoding.
func makePayload(size int) []byte {
	b := make([]byte, size)
	b[0], b[size-1] = '"', '"'
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	for i := 1; i < size-1; i++ {
		b[i] = alphabet[i%len(alphabet)]
	}
	return b
}

// RedactURL hides the password of an AMQP URL.
func RedactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}
