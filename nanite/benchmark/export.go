package benchmark

import (
	"context"
	"slices"
	"time"
)

// What other benchmarks built on this one use (bridge/benchmark): the
// measurement of a cell (warmup, interleaved rounds, percentiles, CPU and
// allocations per request) over sides of their own, and the raw AMQP
// baseline.

// Side is one way of making echo requests.
type Side interface {
	// Name labels the side in errors and in CPU profiles (ProfileLabel).
	Name() string
	// Do makes one request and returns when its answer is in.
	Do(ctx context.Context, payload []byte) error
}

// Schedule says how MeasureCell runs the sides of a cell.
type Schedule struct {
	// Duration each side runs, split over Rounds (default DefaultDuration).
	Duration time.Duration
	// Requests, when > 0, replaces Duration: each side makes this many
	// requests (split over Rounds).
	Requests int
	// Warmup each side runs, unmeasured, before the cell (default none).
	Warmup time.Duration
	// Rounds is how many times each side runs, in order, then reversed,
	// and so on (default DefaultRounds: ABBA).
	Rounds int
	// ServerCPU, when set, reports the CPU time so far of the server
	// processes (brokers, XMPP server): Measure.BrokerCPUus per request.
	ServerCPU func() time.Duration
}

// MeasureCell runs every side with out outstanding requests (out goroutines
// each making sequential requests) of payload, as Schedule says, and
// returns one finished Measure per side, in the order of sides. It fails
// when every request of a side failed.
func MeasureCell(ctx context.Context, sides []Side, payload []byte, out int, sch Schedule) ([]Measure, error) {
	if sch.Duration <= 0 {
		sch.Duration = DefaultDuration
	}
	if sch.Rounds <= 0 {
		sch.Rounds = DefaultRounds
	}
	if sch.ServerCPU == nil {
		sch.ServerCPU = func() time.Duration { return 0 }
	}
	ms := make([]Measure, len(sides))
	if sch.Warmup > 0 {
		for _, s := range sides {
			if _, err := runSlice(ctx, s, payload, out, sch.Warmup, 0, sch.ServerCPU); err != nil {
				return nil, err
			}
		}
	}
	perRound := sch.Duration / time.Duration(sch.Rounds)
	reqs := 0
	if sch.Requests > 0 {
		reqs = max(sch.Requests/sch.Rounds, 1)
	}
	for r := range sch.Rounds {
		idx := make([]int, len(sides))
		for i := range idx {
			idx[i] = i
		}
		if r%2 == 1 {
			slices.Reverse(idx)
		}
		for _, i := range idx {
			part, err := runSlice(ctx, sides[i], payload, out, perRound, reqs, sch.ServerCPU)
			if err != nil {
				return nil, err
			}
			ms[i].merge(part)
		}
	}
	for i := range ms {
		ms[i].finish()
	}
	return ms, nil
}

// Order describes the interleaving of MeasureCell's rounds over sides named
// names: "a, b; b, a".
func Order(names []string, rounds int) string { return order(names, rounds) }

// MakePayload returns a JSON string of exactly size bytes (at least 2).
func MakePayload(size int) []byte { return makePayload(size) }

// LoadAverage returns the machine's 1, 5 and 15-minute load averages
// ("4.36 6.80 6.56"), or "" where they cannot be read.
func LoadAverage() string { return loadAverage() }

// Load1 returns the machine's 1-minute load average (0 where it cannot be
// read).
func Load1() float64 { return load1() }

// RawEcho is the raw AMQP request/reply baseline of the package doc: an
// amqp091-go echo consumer (in its delivery loop) and a requester with an
// exclusive reply queue, each on its own connection.
type RawEcho struct {
	r    *rawSide
	name string
}

// NewRawEcho declares the echo queue on the broker and vhost of url, starts
// the echo consumer (prefetch as given; nanite.DefaultPrefetch is the
// agent's) and checks one round trip. name is the side's name.
func NewRawEcho(ctx context.Context, name, url string, prefetch int) (*RawEcho, error) {
	r, err := newRawSide(ctx, url, prefetch, false)
	if err != nil {
		return nil, err
	}
	return &RawEcho{r: r, name: name}, nil
}

// NewRawRelay is NewRawEcho whose server answers each request, in a
// goroutine of its own, with what relay returns for its body (an error:
// an empty answer, which Do counts as an error).
func NewRawRelay(ctx context.Context, name, url string, prefetch int, relay func(context.Context, []byte) ([]byte, error)) (*RawEcho, error) {
	r, err := newRawRelay(ctx, url, prefetch, true, relay)
	if err != nil {
		return nil, err
	}
	return &RawEcho{r: r, name: name}, nil
}

// Name returns the side's name.
func (e *RawEcho) Name() string { return e.name }

// Call makes one request and returns the answer's body.
func (e *RawEcho) Call(ctx context.Context, payload []byte) ([]byte, error) {
	return e.r.call(ctx, payload)
}

// Do makes one request and checks that the answer has the payload's size.
func (e *RawEcho) Do(ctx context.Context, payload []byte) error { return e.r.do(ctx, payload) }

// Close closes both connections.
func (e *RawEcho) Close() error { return e.r.close() }
