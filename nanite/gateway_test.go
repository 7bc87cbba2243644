package nanite

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"testing"
)

// TestGatewayTargetsAndMultiResult: a request whose target is an XMPP JID
// goes to the gateway agent tagged for that JID (full JID before bare
// JID), which sees the target and the selector; a gateway's MultiResult
// becomes one Result per record beside the local agents' results.
func TestGatewayTargetsAndMultiResult(t *testing.T) {
	c := newCluster(t)
	local := startEchoAgents(c, nil)[0]

	type seen struct{ gw, target, selector string }
	var mu sync.Mutex
	var got []seen
	gateway := func(name string) *Actor {
		return NewActor("echo").Expose("say", func(ctx context.Context, r *Request) (any, error) {
			mu.Lock()
			got = append(got, seen{name, r.Target, r.Selector})
			mu.Unlock()
			if r.Selector == SelectAll {
				return MultiResult{
					{Agent: "xmpp:app@b.test/one", Payload: json.RawMessage(`"one"`)},
					{Agent: "xmpp:app@b.test/two", Error: &ErrorBody{Code: CodeHandler, Message: "two failed"}},
				}, nil
			}
			return name, nil
		})
	}
	bare, _ := c.agent(AgentConfig{Identity: "gw-bare", Tags: []string{GatewayTag("app@b.test")}}, gateway("bare"))
	full, _ := c.agent(AgentConfig{Identity: "gw-full", Tags: []string{GatewayTag("app@b.test/special")}}, gateway("full"))
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/say", 3)

	ctx := t.Context()
	for _, tc := range []struct{ target, want string }{
		{"xmpp:app@b.test/agent-x", "bare"},
		{"xmpp:app@b.test", "bare"},
		{"xmpp:app@b.test/special", "full"},
	} {
		resp, err := m.Request(ctx, "/echo/say", "hi", WithTarget(tc.target))
		if err != nil {
			t.Fatalf("%s: %v", tc.target, err)
		}
		var s string
		if err := resp.Decode(&s); err != nil || s != tc.want {
			t.Errorf("%s: answered by %q (%v), want %q", tc.target, s, err, tc.want)
		}
	}
	mu.Lock()
	if len(got) != 3 || got[0].target != "xmpp:app@b.test/agent-x" || got[2].target != "xmpp:app@b.test/special" {
		t.Errorf("gateways saw %+v", got)
	}
	got = nil
	mu.Unlock()

	_, err := m.Request(ctx, "/echo/say", "hi", WithTarget("xmpp:app@c.test/x"))
	if !errors.Is(err, ErrNoAgent) {
		t.Errorf("target with no gateway: %v, want ErrNoAgent", err)
	}

	// Fan-out: the local agent's result and the two records in place of
	// the bare gateway's (the full one is tagged too and answers too).
	resp, err := m.Request(ctx, "/echo/say", "hi", WithSelector(SelectAll))
	if err != nil {
		t.Fatal(err)
	}
	var agents []string
	for _, r := range resp.Results {
		agents = append(agents, r.Agent)
		switch r.Agent {
		case "xmpp:app@b.test/one":
			if string(r.Payload) != `"one"` || r.Err != nil {
				t.Errorf("one: %s %v", r.Payload, r.Err)
			}
		case "xmpp:app@b.test/two":
			var re *RemoteError
			if !errors.As(r.Err, &re) || re.Code != CodeHandler || re.Message != "two failed" {
				t.Errorf("two: %v", r.Err)
			}
		}
	}
	slices.Sort(agents)
	want := []string{local.Identity(), "xmpp:app@b.test/one", "xmpp:app@b.test/one", "xmpp:app@b.test/two", "xmpp:app@b.test/two"}
	slices.Sort(want)
	if !slices.Equal(agents, want) {
		t.Errorf("fan-out results from %v, want %v", agents, want)
	}
	_, _ = bare, full
}

// TestSetActors: an agent replaces its services while it runs; mappers
// route by the new set at once, and the agent never leaves.
func TestSetActors(t *testing.T) {
	c := newCluster(t)
	mk := func(actor, method, answer string) *Actor {
		return NewActor(actor).Expose(method, func(ctx context.Context, r *Request) (any, error) { return answer, nil })
	}
	a, _ := c.agent(AgentConfig{Identity: "changing"}, mk("old", "x", "old"))
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/old/x", 1)
	a.SetActors(mk("new", "y", "new"), mk("more", "z", "more"))
	waitAgents(t, m, "/new/y", 1)
	ctx := t.Context()
	for svc, want := range map[string]string{"/new/y": "new", "/more/z": "more"} {
		resp, err := m.Request(ctx, svc, nil)
		var s string
		if err == nil {
			err = resp.Decode(&s)
		}
		if err != nil || s != want {
			t.Errorf("%s: %q %v, want %q", svc, s, err, want)
		}
	}
	if _, err := m.Request(ctx, "/old/x", nil); !errors.Is(err, ErrNoAgent) {
		t.Errorf("/old/x after SetActors: %v, want ErrNoAgent", err)
	}
	if _, err := m.Request(ctx, "/nanite/ping", nil, WithTarget("changing")); err != nil {
		t.Errorf("built-in services after SetActors: %v", err)
	}
	if got := len(a.Services()); got != 2+len(a.builtinActor().methods) {
		t.Errorf("Services() = %v", a.Services())
	}
}
