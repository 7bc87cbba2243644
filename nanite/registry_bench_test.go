package nanite

// Benchmarks of the mapper's registry with a large fleet (no broker). They
// back the "a mapper holds 10,000 agents" target: selection cost per request,
// heartbeat and reaper cost, and memory per agent.
//
//	go test ./nanite -run '^$' -bench 'Registry|Mapper' -benchmem

import (
	"fmt"
	"runtime"
	"testing"
	"time"
)

// Shape of the synthetic fleet.
const (
	benchFleetSize     = 10000
	benchFleetServices = 5 // services per agent, all agents offer all of them
	benchService       = "/svc2/run"
)

var benchFleetSizes = []int{1000, benchFleetSize}

// benchAgentID is the identity of agent i of a synthetic fleet.
func benchAgentID(i int) string { return fmt.Sprintf("agent-%06d-5f0c9a1e2b3d", i) }

// benchAgentTags are the three tags of agent i: one of 4 zones, one of 10
// roles and one of 2 generations, so that the pair zone-1+role-3 matches one
// agent in 20.
func benchAgentTags(i int) []string {
	return []string{fmt.Sprintf("zone-%d", i%4), fmt.Sprintf("role-%d", i%10), fmt.Sprintf("gen-%d", i%2)}
}

func benchAgentServices() []ServiceInfo {
	out := make([]ServiceInfo, benchFleetServices)
	for s := range out {
		out[s] = ServiceInfo{Name: fmt.Sprintf("/svc%d/run", s), Idempotent: s%2 == 0}
	}
	return out
}

// benchAgentState is the registration of agent i, with a load spread over
// [0, 4) so that least-loaded selection has a real order to keep.
func benchAgentState(i int) AgentState {
	return AgentState{
		Identity:  benchAgentID(i),
		Queue:     AgentQueue(benchAgentID(i)),
		Services:  benchAgentServices(),
		Tags:      benchAgentTags(i),
		Status:    float64(i%400) / 100,
		Version:   Version,
		Heartbeat: DefaultHeartbeatInterval,
	}
}

func benchRegistry(n int) *registry {
	r := newRegistry(1)
	now := time.Now()
	for i := range n {
		r.upsert(benchAgentState(i), now)
	}
	return r
}

// benchSelectors are the selection cases measured; each costs a pick plus
// the pending increment and decrement that one request makes.
var benchSelectors = []struct {
	name string
	opts requestOptions
}{
	{"least_loaded", requestOptions{selector: SelectLeastLoaded, tagMatch: MatchAll}},
	{"rr", requestOptions{selector: SelectRoundRobin, tagMatch: MatchAll}},
	{"random", requestOptions{selector: SelectRandom, tagMatch: MatchAll}},
	{"least_loaded+tags", requestOptions{selector: SelectLeastLoaded, tags: []string{"zone-1", "role-3"}, tagMatch: MatchAll}},
	{"rr+tags", requestOptions{selector: SelectRoundRobin, tags: []string{"zone-1", "role-3"}, tagMatch: MatchAll}},
	{"random+tags", requestOptions{selector: SelectRandom, tags: []string{"zone-1", "role-3"}, tagMatch: MatchAll}},
	{"target", requestOptions{selector: SelectLeastLoaded, target: benchAgentID(4321), tagMatch: MatchAll}},
}

// BenchmarkRegistryPick measures the registry's cost of routing one
// request: pick, then the pending +1 (sent) and -1 (answered) that
// re-order the least-loaded heaps of every service the agent offers.
// Comparing agents=1000 with agents=10000 shows how each case scales.
func BenchmarkRegistryPick(b *testing.B) {
	for _, sel := range benchSelectors {
		for _, n := range benchFleetSizes {
			b.Run(fmt.Sprintf("%s/agents=%d", sel.name, n), func(b *testing.B) {
				r := benchRegistry(n)
				o := sel.opts
				if o.target != "" {
					o.target = benchAgentID(n / 2)
				}
				for b.Loop() {
					got := r.pick(benchService, &o, nil)
					if len(got) != 1 {
						b.Fatalf("picked %d agents", len(got))
					}
					id := got[0].Identity
					r.addPending(id, 1)
					r.addPending(id, -1)
				}
			})
		}
	}
}

// BenchmarkRegistryPickOnly is the pick alone, without pending accounting.
func BenchmarkRegistryPickOnly(b *testing.B) {
	for _, sel := range benchSelectors {
		b.Run(fmt.Sprintf("%s/agents=%d", sel.name, benchFleetSize), func(b *testing.B) {
			r := benchRegistry(benchFleetSize)
			o := sel.opts
			for b.Loop() {
				if got := r.pick(benchService, &o, nil); len(got) != 1 {
					b.Fatalf("picked %d agents", len(got))
				}
			}
		})
	}
}

// BenchmarkRegistryPendingBurst keeps 64 requests outstanding, as a busy
// requester does: every op sends one (pick + pending+1) and answers the
// oldest (pending-1), so the heap order really changes.
func BenchmarkRegistryPendingBurst(b *testing.B) {
	for _, n := range benchFleetSizes {
		b.Run(fmt.Sprintf("least_loaded/agents=%d", n), func(b *testing.B) {
			r := benchRegistry(n)
			o := requestOptions{selector: SelectLeastLoaded, tagMatch: MatchAll}
			var ring [64]string
			i := 0
			for b.Loop() {
				got := r.pick(benchService, &o, nil)
				if old := ring[i%64]; old != "" {
					r.addPending(old, -1)
				}
				ring[i%64] = got[0].Identity
				r.addPending(got[0].Identity, 1)
				i++
			}
		})
	}
}

// BenchmarkRegistryHeartbeat is the registry part of a heartbeat: a new
// status re-orders the agent in the heaps of all its services.
func BenchmarkRegistryHeartbeat(b *testing.B) {
	for _, n := range benchFleetSizes {
		b.Run(fmt.Sprintf("agents=%d", n), func(b *testing.B) {
			r := benchRegistry(n)
			ids := make([]string, n)
			for i := range ids {
				ids[i] = benchAgentID(i)
			}
			now := time.Now()
			i := 0
			for b.Loop() {
				// Every heartbeat brings a new status (i/n is the pass), so
				// that each one re-orders the heaps: the worst case.
				if !r.heartbeat(ids[i%n], float64((i/n+i)%400)/100, 0, now) {
					b.Fatal("unknown agent")
				}
				i++
			}
		})
	}
}

// BenchmarkRegistryUpsert re-registers known agents (what every agent does
// when a mapper starts and advertises).
func BenchmarkRegistryUpsert(b *testing.B) {
	r := benchRegistry(benchFleetSize)
	states := make([]AgentState, benchFleetSize)
	for i := range states {
		states[i] = benchAgentState(i)
	}
	now := time.Now()
	i := 0
	for b.Loop() {
		r.upsert(states[i%benchFleetSize], now)
		i++
	}
}

// BenchmarkRegistryExpired is one reaper pass over the fleet (the mapper
// runs it every 250 ms, so 4 passes a second).
func BenchmarkRegistryExpired(b *testing.B) {
	for _, n := range benchFleetSizes {
		b.Run(fmt.Sprintf("agents=%d", n), func(b *testing.B) {
			r := benchRegistry(n)
			now := time.Now()
			timeout := func(s *AgentState) time.Duration { return 3 * s.Heartbeat }
			for b.Loop() {
				if ids := r.expired(now, timeout); len(ids) != 0 {
					b.Fatalf("%d expired", len(ids))
				}
			}
			perSec := float64(b.Elapsed().Nanoseconds()) / float64(b.N) * 4 / 1e9
			b.ReportMetric(perSec*100, "core%@4/s")
		})
	}
}

// BenchmarkRegistryMemory reports the heap held per registered agent (5
// services, 3 tags, identities of 25 bytes) in a registry of 10,000.
func BenchmarkRegistryMemory(b *testing.B) {
	var total float64
	for b.Loop() {
		before := heapInUse()
		r := newRegistry(1)
		now := time.Now()
		for i := range benchFleetSize {
			// The strings are allocated here, as a decoded registration's
			// would be, so that they count.
			r.upsert(benchAgentState(i), now)
		}
		after := heapInUse()
		runtime.KeepAlive(r)
		total += float64(after-before) / benchFleetSize
	}
	b.ReportMetric(total/float64(b.N), "B/agent")
}

// heapInUse returns the live heap after a full collection.
func heapInUse() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
