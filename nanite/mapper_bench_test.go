package nanite

// Benchmarks of a Mapper holding 10,000 agents, fed synthetic deliveries
// (no broker): selection as Mapper.request does it under the mapper's lock,
// heartbeat processing through handleState (JSON decode included), and the
// memory a registration costs.
//
//	go test ./nanite -run '^$' -bench Mapper -benchmem

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"
)

// benchMapper returns a mapper (not running) that has processed the
// registrations of n agents through handleState.
func benchMapper(tb testing.TB, n int) *Mapper {
	tb.Helper()
	m, err := NewMapper(MapperConfig{URL: "amqp://bench.invalid/"})
	if err != nil {
		tb.Fatal(err)
	}
	for i := range n {
		m.handleState(delivery{Body: benchRegisterBody(tb, i)})
	}
	if got := len(m.reg.agents); got != n {
		tb.Fatalf("registered %d agents, want %d", got, n)
	}
	return m
}

// benchRegisterBody is the register packet agent i would send.
func benchRegisterBody(tb testing.TB, i int) []byte {
	st := float64(i%400) / 100
	p := &Packet{Kind: KindRegister, Identity: benchAgentID(i), From: benchAgentID(i), Status: &st,
		Queue: AgentQueue(benchAgentID(i)), Services: benchAgentServices(), Tags: benchAgentTags(i),
		Interval: DefaultHeartbeatInterval.Milliseconds(), AgentVer: Version, SentAtUnix: time.Now().UnixMilli()}
	body, err := p.Encode()
	if err != nil {
		tb.Fatal(err)
	}
	return body
}

// benchHeartbeatBody is a heartbeat of agent i with the given status, as
// Agent.statePacket builds it.
func benchHeartbeatBody(tb testing.TB, i int, status float64) []byte {
	p := &Packet{Kind: KindHeartbeat, Identity: benchAgentID(i), From: benchAgentID(i), Status: &status,
		InFlight: i % 3, SentAtUnix: time.Now().UnixMilli()}
	body, err := p.Encode()
	if err != nil {
		tb.Fatal(err)
	}
	return body
}

// BenchmarkMapperSelect is the mapper's selection cost per request with
// 10,000 agents, as Mapper.request and Mapper.finishCall pay it: under the
// mapper's lock pickLocked plus pending+1, then under the lock again
// pending-1 when the result arrives.
func BenchmarkMapperSelect(b *testing.B) {
	m := benchMapper(b, benchFleetSize)
	ctx := context.Background()
	deadline := time.Now().Add(time.Hour)
	for _, sel := range benchSelectors {
		b.Run(sel.name, func(b *testing.B) {
			o := sel.opts
			for b.Loop() {
				m.mu.Lock()
				targets, err := m.pickLocked(ctx, deadline, nil, benchService, &o, false)
				if err != nil {
					m.mu.Unlock()
					b.Fatal(err)
				}
				id := targets[0].Identity
				m.reg.addPending(id, 1)
				m.mu.Unlock()

				m.mu.Lock()
				m.reg.addPending(id, -1)
				m.mu.Unlock()
			}
		})
	}
}

// BenchmarkMapperHeartbeat is the cost of one heartbeat in a mapper that
// holds 10,000 agents: handleState on an encoded heartbeat packet (JSON
// decode and validation, lock, status update and heap re-order). It reports
// the share of one core that 10,000 agents at the default 2 s interval
// (5,000 heartbeats a second) cost, excluding the AMQP client's own receive
// path.
func BenchmarkMapperHeartbeat(b *testing.B) {
	m := benchMapper(b, benchFleetSize)
	// Two bodies per agent with different statuses, so that every heartbeat
	// changes the agent's load and re-orders its heaps (the worst case).
	const variants = 2
	bodies := make([][]byte, benchFleetSize*variants)
	for i := range bodies {
		bodies[i] = benchHeartbeatBody(b, i%benchFleetSize, float64((i/benchFleetSize)+i%400)/100)
	}
	adv := m.stats.advertises.Load()
	i := 0
	for b.Loop() {
		m.handleState(delivery{Body: bodies[i%len(bodies)]})
		i++
	}
	if m.stats.advertises.Load() != adv || m.stats.badPackets.Load() != 0 {
		b.Fatal("heartbeats were not all recognised")
	}
	nsPer := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	perSec := float64(benchFleetSize) / DefaultHeartbeatInterval.Seconds()
	b.ReportMetric(nsPer*perSec/1e9*100, "core%@10k/2s")
}

// BenchmarkMapperHeartbeatDecode is the JSON decode share of a heartbeat.
func BenchmarkMapperHeartbeatDecode(b *testing.B) {
	body := benchHeartbeatBody(b, 42, 1.25)
	for b.Loop() {
		if _, err := DecodePacket(body, DefaultMaxPayload); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMapperReap is one reaper pass (Mapper.reap, every 250 ms) over
// 10,000 live agents.
func BenchmarkMapperReap(b *testing.B) {
	m := benchMapper(b, benchFleetSize)
	for b.Loop() {
		m.reap()
	}
	if len(m.reg.agents) != benchFleetSize {
		b.Fatal("reaper dropped live agents")
	}
	nsPer := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(nsPer*4/1e9*100, "core%@4/s")
}

// BenchmarkMapperRegister is one registration through handleState of an
// agent the mapper already knows (every agent re-registers when a mapper
// starts).
func BenchmarkMapperRegister(b *testing.B) {
	m := benchMapper(b, benchFleetSize)
	bodies := make([][]byte, benchFleetSize)
	for i := range bodies {
		bodies[i] = benchRegisterBody(b, i)
	}
	i := 0
	for b.Loop() {
		m.handleState(delivery{Body: bodies[i%benchFleetSize]})
		i++
	}
}

// BenchmarkMapperMemory reports the heap a mapper holds per agent after
// 10,000 agents (5 services and 3 tags each) registered through
// handleState, measured with runtime.MemStats after full collections.
func BenchmarkMapperMemory(b *testing.B) {
	var total float64
	for b.Loop() {
		bodies := make([][]byte, benchFleetSize)
		for i := range bodies {
			bodies[i] = benchRegisterBody(b, i)
		}
		m, err := NewMapper(MapperConfig{URL: "amqp://bench.invalid/"})
		if err != nil {
			b.Fatal(err)
		}
		before := heapInUse()
		for i := range bodies {
			m.handleState(delivery{Body: bodies[i]})
		}
		after := heapInUse()
		if len(m.reg.agents) != benchFleetSize {
			b.Fatal("not all registered")
		}
		runtime.KeepAlive(m)
		runtime.KeepAlive(bodies) // freed after the measurement, not during it
		total += (float64(after) - float64(before)) / benchFleetSize
	}
	b.ReportMetric(total/float64(b.N), "B/agent")
}

// TestMapperFleetFigures prints the 10,000-agent figures in one place
// (NANITE_FLEET_FIGURES=1 go test ./nanite -run TestMapperFleetFigures -v).
// It asserts nothing about speed: these are measurements, not limits, and
// it is skipped unless asked for, because it takes about 15 s.
func TestMapperFleetFigures(t *testing.T) {
	if os.Getenv("NANITE_FLEET_FIGURES") == "" {
		t.Skip("set NANITE_FLEET_FIGURES=1 to print the 10,000-agent figures")
	}
	sel := testing.Benchmark(BenchmarkMapperHeartbeat)
	nsHB := float64(sel.T.Nanoseconds()) / float64(sel.N)
	mem := testing.Benchmark(BenchmarkMapperMemory)
	reap := testing.Benchmark(BenchmarkMapperReap)
	nsReap := float64(reap.T.Nanoseconds()) / float64(reap.N)
	t.Logf("agents: %d, %d services and %d tags each", benchFleetSize, benchFleetServices, 3)
	t.Logf("heartbeat: %.0f ns each; 10k agents at %v = %.0f/s = %.2f%% of one core",
		nsHB, DefaultHeartbeatInterval, benchFleetSize/DefaultHeartbeatInterval.Seconds(),
		nsHB*benchFleetSize/DefaultHeartbeatInterval.Seconds()/1e9*100)
	t.Logf("reaper: %.0f µs per pass, 4 passes/s = %.2f%% of one core", nsReap/1e3, nsReap*4/1e9*100)
	t.Logf("memory: %.0f bytes per agent", mem.Extra["B/agent"])
	m := benchMapper(t, benchFleetSize)
	ctx := context.Background()
	deadline := time.Now().Add(time.Hour)
	for _, s := range benchSelectors {
		o := s.opts
		r := testing.Benchmark(func(b *testing.B) {
			for b.Loop() {
				m.mu.Lock()
				targets, err := m.pickLocked(ctx, deadline, nil, benchService, &o, false)
				if err != nil {
					m.mu.Unlock()
					b.Fatal(err)
				}
				m.reg.addPending(targets[0].Identity, 1)
				m.reg.addPending(targets[0].Identity, -1)
				m.mu.Unlock()
			}
		})
		t.Logf("select %-18s %s", s.name+":", fmt.Sprintf("%8.0f ns/request", float64(r.T.Nanoseconds())/float64(r.N)))
	}
}

// BenchmarkRequestCodec is the JSON work of one request/reply round trip
// through a mapper and an agent, without AMQP: the mapper validates the
// payload and encodes the request packet; the agent decodes it, encodes the
// handler's result (an echo of the payload) and the result packet; the
// mapper decodes the result packet. The rest of a request's CPU is AMQP
// framing, syscalls, scheduling and bookkeeping.
func BenchmarkRequestCodec(b *testing.B) {
	for _, size := range []int{100, 10 * 1024} {
		b.Run(fmt.Sprintf("payload=%d", size), func(b *testing.B) {
			raw := make([]byte, size)
			for i := range raw {
				raw[i] = 'a'
			}
			raw[0], raw[size-1] = '"', '"'
			deadline := time.Now().Add(DefaultRequestTimeout).UnixMilli()
			b.SetBytes(int64(size))
			for b.Loop() {
				// Mapper: Request and send.
				body, err := marshalPayload(json.RawMessage(raw))
				if err != nil {
					b.Fatal(err)
				}
				req := &Packet{Kind: KindRequest, Type: "/bench/echo", Payload: body, From: "mapper-5f0c9a1e2b3d",
					Token: newToken(), ReplyTo: ReplyQueue("mapper-5f0c9a1e2b3d"), Selector: SelectLeastLoaded,
					TagMatch: MatchAll, Deadline: deadline}
				enc, err := req.Encode()
				if err != nil {
					b.Fatal(err)
				}
				// Agent: handleDelivery, run, reply.
				in, err := DecodePacket(enc, DefaultMaxPayload)
				if err != nil {
					b.Fatal(err)
				}
				var res any = in.Payload
				out, err := json.Marshal(res)
				if err != nil {
					b.Fatal(err)
				}
				rp := &Packet{Kind: KindResult, Token: in.Token, From: "agent-5f0c9a1e2b3d", Payload: out}
				renc, err := rp.Encode()
				if err != nil {
					b.Fatal(err)
				}
				// Mapper: handleReply.
				got, err := DecodePacket(renc, DefaultMaxPayload)
				if err != nil {
					b.Fatal(err)
				}
				if len(got.Payload) != size {
					b.Fatalf("payload of %d bytes came back as %d", size, len(got.Payload))
				}
			}
		})
	}
}
