package nanite

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

// BenchmarkRoundTrip measures a request through an embedded mapper to one
// echo agent and back, on a real broker: the package's shared node, or the
// one NANITE_BENCH_AMQP names (for profiling against a long-running node).
// nanite bench compares the same path with a raw amqp091-go baseline; this
// benchmark is for CPU and allocation profiles of both sides together:
//
//	go test -run '^$' -bench RoundTrip -benchmem -cpuprofile cpu.out ./nanite
func BenchmarkRoundTrip(b *testing.B) {
	url := os.Getenv("NANITE_BENCH_AMQP")
	if url == "" {
		url = testenv.Rabbit(b).NewVhost(b)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	agent, err := NewAgent(AgentConfig{URL: url, Identity: NewIdentity("bench-agent"), Status: func() float64 { return 0 }})
	if err != nil {
		b.Fatal(err)
	}
	agent.AddActor(NewActor("bench").Expose("echo", func(_ context.Context, r *Request) (any, error) {
		return r.Payload, nil
	}))
	mapper, err := NewMapper(MapperConfig{URL: url})
	if err != nil {
		b.Fatal(err)
	}
	ended := make(chan error, 2)
	go func() { ended <- agent.Run(ctx) }()
	go func() { ended <- mapper.Run(ctx) }()
	defer func() {
		stop()
		<-ended
		<-ended
	}()
	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := mapper.WaitForAgents(wctx, "/bench/echo", 1); err != nil {
		b.Fatal(err)
	}
	for _, size := range []int{100, 10 << 10} {
		payload := make([]byte, size)
		payload[0], payload[size-1] = '"', '"'
		for i := 1; i < size-1; i++ {
			payload[i] = 'a' + byte(i%26)
		}
		do := func(b *testing.B) {
			resp, err := mapper.Request(ctx, "/bench/echo", json.RawMessage(payload), WithTimeout(30*time.Second))
			if err != nil {
				b.Error(err)
				return
			}
			if len(resp.Results[0].Payload) != size {
				b.Errorf("echo answered %d bytes, want %d", len(resp.Results[0].Payload), size)
			}
		}
		b.Run(fmt.Sprintf("payload=%d/outstanding=1", size), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				do(b)
			}
		})
		b.Run(fmt.Sprintf("payload=%d/outstanding=64", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(max(64/runtime.GOMAXPROCS(0), 1))
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					do(b)
				}
			})
		})
	}
}
