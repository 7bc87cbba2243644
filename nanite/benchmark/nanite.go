package benchmark

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
)

// EchoService is the service the plain-mode benchmark agent serves. Each
// secure mode's agent serves a service of its own (ModeService), so that
// its mapper, which accepts the registrations of every agent of the
// benchmark's CA, routes only to it.
const EchoService = "/bench/echo"

// ModeService returns the echo service of a mode: EchoService for plain,
// "/bench-signed-hybrid/echo" and so on for the others.
func ModeService(mode string) string {
	if mode == ModePlain {
		return EchoService
	}
	return "/" + actorName(mode) + "/echo"
}

func actorName(mode string) string {
	if mode == ModePlain {
		return "bench"
	}
	return "bench-" + strings.ReplaceAll(mode, ":", "-")
}

// secureCA issues the identities of the secure modes.
type secureCA struct{ ca *security.CA }

func newSecureCA() (*secureCA, error) {
	ca, err := security.NewCA("nanite-bench-ca", 48*time.Hour)
	if err != nil {
		return nil, fmt.Errorf("benchmark: CA: %w", err)
	}
	return &secureCA{ca: ca}, nil
}

// secure returns the nanite.Secure of one participant of mode m; policy is
// the agent's (nil for a mapper).
func (c *secureCA) secure(name string, role security.Role, m Mode, policy nanite.Authorizer) (*nanite.Secure, error) {
	id, err := c.ca.Issue(name, role, 24*time.Hour, security.WithKEM(m.KEM))
	if err != nil {
		return nil, fmt.Errorf("benchmark: issue %s: %w", name, err)
	}
	v, err := security.NewVerifier(security.VerifierConfig{Roots: c.ca.Pool()})
	if err != nil {
		return nil, err
	}
	return &nanite.Secure{Identity: id, Verifier: v, Policy: policy, Seal: m.Seal, Sessions: m.Sessions}, nil
}

// naniteSide is an embedded mapper sending to one agent that echoes.
type naniteSide struct {
	mode    Mode
	service string
	agent   *nanite.Agent
	mapper  *nanite.Mapper
	stop    context.CancelFunc
	ended   chan error
}

func (n *naniteSide) name() string { return n.mode.Name }

func newNaniteSide(ctx context.Context, url string, prefetch int, log *slog.Logger, mode Mode, ca *secureCA) (_ *naniteSide, err error) {
	agentID, mapperID := nanite.NewIdentity("bench-agent"), nanite.NewIdentity("bench-mapper")
	if mode.Secure {
		suffix := strings.ReplaceAll(mode.Name, ":", "-")
		agentID = nanite.NewIdentity("bench-agent-" + suffix)
		mapperID = nanite.NewIdentity("bench-mapper-" + suffix)
	}
	service := ModeService(mode.Name)
	acfg := nanite.AgentConfig{URL: url, Prefetch: prefetch, Logger: log, Identity: agentID}
	mcfg := nanite.MapperConfig{URL: url, Logger: log, RequestTimeout: RequestTimeout, Identity: mapperID}
	if mode.Secure {
		// Agents check the policy before every handler: measure with one,
		// as deployed (a nil policy would skip the check).
		policy, err := security.NewPolicy([]security.Rule{{Name: "bench", Effect: security.Allow,
			Callers: []string{mapperID}, Services: []string{service}}})
		if err != nil {
			return nil, err
		}
		if acfg.Secure, err = ca.secure(agentID, security.RoleAgent, mode, policy); err != nil {
			return nil, err
		}
		if mcfg.Secure, err = ca.secure(mapperID, security.RoleMapper, mode, nil); err != nil {
			return nil, err
		}
	}
	agent, err := nanite.NewAgent(acfg)
	if err != nil {
		return nil, err
	}
	agent.AddActor(nanite.NewActor(actorName(mode.Name)).Expose("echo", func(ctx context.Context, r *nanite.Request) (any, error) {
		return r.Payload, nil
	}))
	mapper, err := nanite.NewMapper(mcfg)
	if err != nil {
		return nil, err
	}
	runCtx, stop := context.WithCancel(context.Background())
	n := &naniteSide{mode: mode, service: service, agent: agent, mapper: mapper, stop: stop, ended: make(chan error, 2)}
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
	go func() { waitErr <- mapper.WaitForAgents(wctx, service, 1) }()
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

// checkRouting fails unless the mapper knows exactly one agent offering
// the mode's service: its own.
func (n *naniteSide) checkRouting() error {
	var offering []string
	for _, a := range n.mapper.Agents() {
		for _, s := range a.Services {
			if s.Name == n.service {
				offering = append(offering, a.Identity)
			}
		}
	}
	if len(offering) != 1 || offering[0] != n.agent.Identity() {
		return fmt.Errorf("benchmark: mode %s: the mapper knows agents %v for %s, want only %s",
			n.mode.Name, offering, n.service, n.agent.Identity())
	}
	return nil
}

func (n *naniteSide) do(ctx context.Context, payload []byte) error {
	resp, err := n.mapper.Request(ctx, n.service, json.RawMessage(payload))
	if err != nil {
		return err
	}
	if len(resp.Results) != 1 || len(resp.Results[0].Payload) != len(payload) {
		return fmt.Errorf("benchmark: nanite echo answered %d results", len(resp.Results))
	}
	return nil
}

// counters returns the agent's and the mapper's refusal and failure
// counters that are not zero.
func (n *naniteSide) counters() map[string]int64 {
	out := map[string]int64{}
	for who, stats := range map[string]map[string]int64{"agent": n.agent.Stats(), "mapper": n.mapper.Stats()} {
		for k, v := range stats {
			if v == 0 {
				continue
			}
			switch {
			case strings.HasPrefix(k, "rejected_"), k == "bad_packets", k == "unauthorized", k == "failed",
				k == "timeouts", k == "retries", k == "duplicates", k == "expired", k == "agent_lost", k == "not_delivered",
				who == "mapper" && (k == "sessions_established" || k == "session_fallbacks" || k == "signed_requests_sent" || k == "session_requests_sent"):
				out[who+"."+k] = v
			}
		}
	}
	return out
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
