package benchmark

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nanite-go/nanite/nanite"
)

// EchoService is the service the benchmark agent serves.
const EchoService = "/bench/echo"

// naniteSide is an embedded mapper sending to one agent that echoes.
type naniteSide struct {
	agent  *nanite.Agent
	mapper *nanite.Mapper
	stop   context.CancelFunc
	ended  chan error
}

func (n *naniteSide) name() string { return "nanite" }

func newNaniteSide(ctx context.Context, url string, prefetch int, log *slog.Logger) (_ *naniteSide, err error) {
	agent, err := nanite.NewAgent(nanite.AgentConfig{URL: url, Prefetch: prefetch, Logger: log,
		Identity: nanite.NewIdentity("bench-agent")})
	if err != nil {
		return nil, err
	}
	agent.AddActor(nanite.NewActor("bench").Expose("echo", func(ctx context.Context, r *nanite.Request) (any, error) {
		return r.Payload, nil
	}))
	mapper, err := nanite.NewMapper(nanite.MapperConfig{URL: url, Logger: log, RequestTimeout: RequestTimeout,
		Identity: nanite.NewIdentity("bench-mapper")})
	if err != nil {
		return nil, err
	}
	runCtx, stop := context.WithCancel(context.Background())
	n := &naniteSide{agent: agent, mapper: mapper, stop: stop, ended: make(chan error, 2)}
	go func() { n.ended <- agent.Run(runCtx) }()
	go func() { n.ended <- mapper.Run(runCtx) }()
	defer func() {
		if err != nil {
			_ = n.close()
		}
	}()
	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	waitErr := make(chan error, 1)
	go func() { waitErr <- mapper.WaitForAgents(wctx, EchoService, 1) }()
	select {
	case err := <-waitErr:
		if err != nil {
			return nil, fmt.Errorf("benchmark: the echo agent did not register: %w", err)
		}
	case err := <-n.ended:
		n.ended <- err // for close
		return nil, fmt.Errorf("benchmark: nanite agent or mapper stopped: %v", err)
	}
	if err := n.do(wctx, []byte(`"ping"`)); err != nil {
		return nil, fmt.Errorf("benchmark: nanite echo does not answer: %w", err)
	}
	return n, nil
}

func (n *naniteSide) do(ctx context.Context, payload []byte) error {
	resp, err := n.mapper.Request(ctx, EchoService, json.RawMessage(payload))
	if err != nil {
		return err
	}
	if len(resp.Results) != 1 || len(resp.Results[0].Payload) != len(payload) {
		return fmt.Errorf("benchmark: nanite echo answered %d results", len(resp.Results))
	}
	return nil
}

func (n *naniteSide) close() error {
	n.stop()
	var errs []error
	for range 2 {
		select {
		case err := <-n.ended:
			if err != nil {
				errs = append(errs, err)
			}
		case <-time.After(15 * time.Second):
			return errors.New("benchmark: nanite agent or mapper did not stop")
		}
	}
	return errors.Join(errs...)
}
