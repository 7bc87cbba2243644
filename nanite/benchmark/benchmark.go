// Package benchmark measures an in-cluster nanite request against a raw
// AMQP request/reply baseline, side by side on the same broker in the same
// run, because absolute numbers drift on shared machines.
//
// The raw baseline is a plain amqp091-go RPC: an echo consumer on a queue
// (prefetch equal to the agent's, manual ack after replying) answers to the
// requester's exclusive reply queue, matched by correlation id. The nanite
// side is a request through an embedded nanite.Mapper to one nanite.Agent
// serving an echo actor. Each cell (payload size × outstanding requests) runs
// both, alternating raw and nanite in ABBA order so that drift hits both
// alike, and reports p50, p99, throughput and their ratios.
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
	// RequestTimeout bounds every single request of both sides.
	RequestTimeout = 30 * time.Second
)

// DefaultOutstanding and DefaultPayloads are the cells measured by default.
var (
	DefaultOutstanding = []int{1, 8, 64}
	DefaultPayloads    = []int{100, 10 * 1024}
)

// The targets of the mission: in-cluster throughput at least 0.8× raw at 64
// outstanding, p50 within 1.25× raw sequentially.
const (
	TargetThroughputRatio       = 0.8
	TargetThroughputOutstanding = 64
	TargetP50Ratio              = 1.25
	TargetP50Outstanding        = 1
)

// Config configures a run. Only URL is required.
type Config struct {
	// URL of the broker and vhost, amqp://user:pass@host:port/vhost.
	URL string
	// BrokerNote describes the broker in the report (e.g. "private node
	// started by testenv").
	BrokerNote string
	// Duration each side runs in each cell, split over Rounds (default 3 s).
	Duration time.Duration
	// Requests, when > 0, replaces Duration: each side makes this many
	// requests per cell (split over Rounds).
	Requests int
	// Warmup each side runs, unmeasured, before each cell (default 500 ms;
	// negative for none).
	Warmup time.Duration
	// Rounds is how many times each side runs in each cell, in the order
	// raw, nanite, nanite, raw, raw, ... (default 2, i.e. ABBA).
	Rounds int
	// Outstanding lists the concurrency levels: N goroutines each making
	// sequential requests (default 1, 8, 64).
	Outstanding []int
	// Payloads lists payload sizes in bytes (default 100 and 10240).
	Payloads []int
	// Prefetch of the raw echo consumer and of the agent (default
	// nanite.DefaultPrefetch).
	Prefetch int
	// RawSpawn makes the raw echo server handle each message in a goroutine
	// of its own, as the agent does, instead of in its delivery loop. It
	// shows how much of the difference is that design choice.
	RawSpawn bool
	// Only runs one side: "raw" or "nanite" (default both).
	Only string
	// Progress, when set, receives a line as each cell starts.
	Progress func(string)
	// Logger receives the agent's and mapper's logs (default discard).
	Logger *slog.Logger
	// BrokerCPU, when set, reports the broker's CPU time so far, so that
	// the broker's share of each request is reported too (see ProcessCPU).
	BrokerCPU func() time.Duration
}

// Report is the outcome of a run.
type Report struct {
	Broker      string    `json:"broker"`
	BrokerNote  string    `json:"broker_note,omitempty"`
	Started     time.Time `json:"started"`
	GoVersion   string    `json:"go_version"`
	GOMAXPROCS  int       `json:"gomaxprocs"`
	NumCPU      int       `json:"num_cpu"`
	Prefetch    int       `json:"prefetch"`
	DurationSec float64   `json:"duration_per_side_s,omitempty"`
	Requests    int       `json:"requests_per_side,omitempty"`
	WarmupSec   float64   `json:"warmup_s"`
	Rounds      int       `json:"rounds"`
	Order       string    `json:"order"`
	Baseline    string    `json:"baseline"`
	NaniteSide  string    `json:"nanite"`
	Targets     Targets   `json:"targets"`
	Cells       []Cell    `json:"cells"`
}

// Targets restates the targets the cells are checked against.
type Targets struct {
	ThroughputRatio       float64 `json:"throughput_ratio_min"`
	ThroughputOutstanding int     `json:"throughput_at_outstanding"`
	P50Ratio              float64 `json:"p50_ratio_max"`
	P50Outstanding        int     `json:"p50_at_outstanding"`
}

// Cell is one payload size at one concurrency.
type Cell struct {
	Payload     int      `json:"payload_bytes"`
	Outstanding int      `json:"outstanding"`
	Raw         *Measure `json:"raw,omitempty"`
	Nanite      *Measure `json:"nanite,omitempty"`
	// P50Ratio is nanite p50 / raw p50; ThroughputRatio is nanite req/s /
	// raw req/s (0 when a side did not run).
	P50Ratio        float64 `json:"p50_ratio,omitempty"`
	ThroughputRatio float64 `json:"throughput_ratio,omitempty"`
	// Target names the target that applies to the cell ("p50",
	// "throughput" or ""), Pass whether it was met.
	Target string `json:"target,omitempty"`
	Pass   *bool  `json:"pass,omitempty"`
}

// Measure is one side of a cell.
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
	switch c.Only {
	case "", "raw", "nanite":
	default:
		return fmt.Errorf("benchmark: --only must be raw or nanite, not %q", c.Only)
	}
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
	rep := &Report{
		Broker: RedactURL(cfg.URL), BrokerNote: cfg.BrokerNote, Started: time.Now(),
		GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(),
		Prefetch: cfg.Prefetch, WarmupSec: max(cfg.Warmup, 0).Seconds(), Rounds: cfg.Rounds,
		Order: order(cfg.Rounds),
		Baseline: fmt.Sprintf("amqp091-go request/reply: echo consumer on a queue with prefetch %d "+
			"(nanite.DefaultPrefetch=%d), echoing %s, manual ack after the reply is published, replying to the "+
			"requester's exclusive auto-ack reply queue matched by correlation id; one connection for "+
			"the echo server and one for the requester, as nanite's agent and mapper",
			cfg.Prefetch, nanite.DefaultPrefetch, rawMode(cfg.RawSpawn)),
		NaniteSide: fmt.Sprintf("nanite.Mapper.Request (least_loaded) through an embedded mapper to one "+
			"nanite.Agent (prefetch %d) serving an echo actor", cfg.Prefetch),
		Targets: Targets{TargetThroughputRatio, TargetThroughputOutstanding, TargetP50Ratio, TargetP50Outstanding},
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
	if cfg.Only != "nanite" {
		raw, err := newRawSide(ctx, cfg.URL, cfg.Prefetch, cfg.RawSpawn)
		if err != nil {
			return nil, err
		}
		sides = append(sides, raw)
	}
	if cfg.Only != "raw" {
		n, err := newNaniteSide(ctx, cfg.URL, cfg.Prefetch, cfg.Logger)
		if err != nil {
			return nil, err
		}
		sides = append(sides, n)
	}

	total := len(cfg.Payloads) * len(cfg.Outstanding)
	k := 0
	for _, size := range cfg.Payloads {
		payload := makePayload(size)
		for _, out := range cfg.Outstanding {
			k++
			cfg.Progress(fmt.Sprintf("cell %d/%d: payload %s, %d outstanding", k, total, FormatBytes(size), out))
			cell, err := runCell(ctx, &cfg, sides, payload, out)
			if err != nil {
				return rep, err
			}
			rep.Cells = append(rep.Cells, cell)
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

// order describes the interleaving of the sides for n rounds.
func order(rounds int) string {
	var s []string
	for r := range rounds {
		if r%2 == 0 {
			s = append(s, "raw", "nanite")
		} else {
			s = append(s, "nanite", "raw")
		}
	}
	return strings.Join(s, ", ")
}

func runCell(ctx context.Context, cfg *Config, sides []side, payload []byte, out int) (Cell, error) {
	cell := Cell{Payload: len(payload), Outstanding: out}
	ms := make([]*Measure, len(sides))
	for i := range ms {
		ms[i] = &Measure{}
	}
	if cfg.Warmup > 0 {
		for _, s := range sides {
			if _, err := runSlice(ctx, s, payload, out, cfg.Warmup, 0, cfg.BrokerCPU); err != nil {
				return cell, err
			}
		}
	}
	perRound := cfg.Duration / time.Duration(cfg.Rounds)
	reqs := 0
	if cfg.Requests > 0 {
		reqs = max(cfg.Requests/cfg.Rounds, 1)
	}
	for r := range cfg.Rounds {
		idx := make([]int, len(sides))
		for i := range idx {
			idx[i] = i
		}
		if r%2 == 1 {
			slices.Reverse(idx)
		}
		for _, i := range idx {
			part, err := runSlice(ctx, sides[i], payload, out, perRound, reqs, cfg.BrokerCPU)
			if err != nil {
				return cell, err
			}
			ms[i].merge(part)
		}
	}
	for i, s := range sides {
		ms[i].finish()
		switch s.name() {
		case "raw":
			cell.Raw = ms[i]
		case "nanite":
			cell.Nanite = ms[i]
		}
	}
	cell.judge()
	return cell, nil
}

func (c *Cell) judge() {
	if c.Raw == nil || c.Nanite == nil || c.Raw.Requests == 0 || c.Nanite.Requests == 0 {
		return
	}
	if c.Raw.P50us > 0 {
		c.P50Ratio = c.Nanite.P50us / c.Raw.P50us
	}
	if c.Raw.RPS > 0 {
		c.ThroughputRatio = c.Nanite.RPS / c.Raw.RPS
	}
	var pass bool
	switch c.Outstanding {
	case TargetP50Outstanding:
		c.Target, pass = "p50", c.P50Ratio <= TargetP50Ratio
	case TargetThroughputOutstanding:
		c.Target, pass = "throughput", c.ThroughputRatio >= TargetThroughputRatio
	default:
		return
	}
	c.Pass = &pass
}

// runSlice runs out workers, each making sequential requests, for d (or
// until reqs requests in all when reqs > 0).
func runSlice(ctx context.Context, s side, payload []byte, out int, d time.Duration, reqs int, brokerCPU func() time.Duration) (*Measure, error) {
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
				err := s.do(rctx, payload)
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
		return nil, fmt.Errorf("benchmark: every %s request failed: %s", s.name(), m.FirstErr)
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
