package nanite

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanite-go/nanite/security"
)

// testPKI is an application CA with a shared revocation list.
type testPKI struct {
	t       *testing.T
	ca      *security.CA
	roots   *x509.CertPool
	revoked *security.RevocationList
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	ca, err := security.NewCA("test-ca", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{t: t, ca: ca, roots: ca.Pool(), revoked: security.NewRevocationList(nil, nil)}
}

func (k *testPKI) ident(name string, role security.Role, opts ...security.IssueOption) *security.Identity {
	k.t.Helper()
	id, err := k.ca.Issue(name, role, time.Hour, opts...)
	if err != nil {
		k.t.Fatal(err)
	}
	return id
}

func (k *testPKI) verifier() *security.Verifier {
	k.t.Helper()
	v, err := security.NewVerifier(security.VerifierConfig{Roots: k.roots, Revoked: k.revoked})
	if err != nil {
		k.t.Fatal(err)
	}
	return v
}

func (k *testPKI) secure(name string, role security.Role, policy Authorizer, seal bool) *Secure {
	return &Secure{Identity: k.ident(name, role), Verifier: k.verifier(), Policy: policy, Seal: seal}
}

const testPolicy = `
rules:
  - name: requesters
    effect: allow
    callers: ["req-*", "role:bridge"]
    services: ["/echo/*", "/nanite/*", "/caller/*"]
  - name: agents-may-count
    effect: allow
    callers: ["role:agent"]
    services: ["/counter/*"]
`

func mustPolicy(t *testing.T, src string) *security.Policy {
	t.Helper()
	p, err := security.ParsePolicy([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestSecureRoundTrip(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	pol := mustPolicy(t, testPolicy)
	var calls atomic.Int64
	for _, name := range []string{"agent-s1", "agent-s2"} {
		id := name
		c.agent(AgentConfig{Identity: name, Secure: k.secure(name, security.RoleAgent, pol, false)}, testActor(&id, &calls))
	}
	m, _ := c.mapper(MapperConfig{Identity: "req-1", Secure: k.secure("req-1", security.RoleMapper, nil, true)})
	waitAgents(t, m, "/echo/say", 2)

	resp, err := m.Request(t.Context(), "/echo/say", map[string]string{"secret": "s3cr3t"})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]string
	if err := resp.Decode(&got); err != nil || got["secret"] != "s3cr3t" {
		t.Fatalf("sealed echo: %v %v", got, err)
	}
	var steps []string
	if _, err := m.Request(t.Context(), "/echo/stream", nil, OnIntermediate(func(i Intermediate) {
		steps = append(steps, string(i.Payload))
	})); err != nil || len(steps) != 3 || steps[2] != "3" {
		t.Fatalf("sealed stream: %v %v", steps, err)
	}
	resp, err = m.Request(t.Context(), "/echo/who", nil, WithSelector(SelectAll))
	if err != nil || len(resp.Results) != 2 {
		t.Fatalf("sealed fan-out: %v %v", resp, err)
	}
	if st := m.Stats(); st["bad_packets"] != 0 {
		t.Fatalf("mapper refused something: %v", st)
	}

	// Policy: the mapper's certificate name allows /echo/*, not /work/*.
	c.agent(AgentConfig{Identity: "agent-s3", Secure: k.secure("agent-s3", security.RoleAgent, pol, false)}, helperActor("agent-s3"))
	waitAgents(t, m, "/work/slow", 1)
	_, err = m.Request(t.Context(), "/work/slow", map[string]int{"ms": 1})
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeUnauthorized || !strings.Contains(re.Message, "default deny") {
		t.Fatalf("unauthorized service: %v", err)
	}
}

// Agent-originated requests in secure mode: the mapper daemon relays them
// with the original envelope, and the target agent authorizes the agent
// that asked, not the mapper.
func TestSecureAgentOriginated(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	pol := mustPolicy(t, testPolicy)
	c.mapper(MapperConfig{Identity: "daemon-1", ServeAgentRequests: true, Secure: k.secure("daemon-1", security.RoleMapper, nil, true)})
	var counted atomic.Int64
	c.agent(AgentConfig{Identity: "agent-counter", Secure: k.secure("agent-counter", security.RoleAgent, pol, false)},
		NewActor("counter").Expose("incr", func(ctx context.Context, r *Request) (any, error) {
			return counted.Add(1), nil
		}),
		NewActor("echo").Expose("say", func(ctx context.Context, r *Request) (any, error) { return "no", nil }))
	caller, _ := c.agent(AgentConfig{Identity: "agent-caller", Secure: k.secure("agent-caller", security.RoleAgent, pol, false)},
		NewActor("caller").Expose("go", func(ctx context.Context, r *Request) (any, error) {
			resp, err := r.Agent.Request(ctx, "/counter/incr", nil)
			if err != nil {
				return nil, err
			}
			var n int
			return n, resp.Decode(&n)
		}))
	m, _ := c.mapper(MapperConfig{Identity: "req-2", Secure: k.secure("req-2", security.RoleMapper, nil, false)})
	waitAgents(t, m, "", 2)
	if _, err := m.Request(t.Context(), "/caller/go", nil); err != nil || counted.Load() != 1 {
		t.Fatalf("relayed secure request: %v (count %d)", err, counted.Load())
	}
	// The policy gives agents /counter/* only: the relayed /echo/say is
	// refused on behalf of the agent that asked.
	_, err := caller.Request(t.Context(), "/echo/say", nil, WithTimeout(5*time.Second))
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeUnauthorized || !strings.Contains(re.Message, "agent-caller") {
		t.Fatalf("relayed request outside the policy: %v", err)
	}
}

// A secure mapper does not see agents that do not sign.
func TestSecureMapperIgnoresPlainAgents(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	m, _ := c.mapper(MapperConfig{Identity: "req-3", Secure: k.secure("req-3", security.RoleMapper, nil, false)})
	c.agent(AgentConfig{}, testActor(new(string), nil))
	eventually(t, "the plain registration refused", 5*time.Second, func() bool { return m.Stats()["rejected_unsigned"] > 0 })
	if len(m.Agents()) != 0 {
		t.Fatalf("secure mapper registered a plain agent: %v", m.Agents())
	}
}

// Every way a request can be forged or misused is refused by the agent, with
// a counted reason and an answer to the requester; the handler never runs.
func TestSecureRefusals(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	pol := mustPolicy(t, testPolicy)
	var calls atomic.Int64
	agentID := "agent-target"
	a, _ := c.agent(AgentConfig{Identity: agentID, Secure: k.secure(agentID, security.RoleAgent, pol, false)}, testActor(&agentID, &calls))
	other := k.ident("agent-other", security.RoleAgent)
	m, _ := c.mapper(MapperConfig{Identity: "req-watch", Secure: k.secure("req-watch", security.RoleMapper, nil, false)})
	waitAgents(t, m, "/echo/say", 1)
	l, replies, replyQ := rawRequester(t, c.url)

	requester := k.ident("req-raw", security.RoleMapper)
	otherCA := newPKI(t)
	stranger := otherCA.ident("req-raw", security.RoleMapper)
	expired := k.ident("req-old", security.RoleMapper, security.WithValidFrom(time.Now().Add(-3*time.Hour)))
	revoked := k.ident("req-revoked", security.RoleMapper)
	k.revoked.Set(nil, []string{"req-revoked"})
	asAgent := k.ident("agent-sneaky", security.RoleAgent)
	intruder := k.ident("intruder", security.RoleMapper)

	n := 0
	request := func(from string, mutate func(*Packet)) (*Packet, []byte) {
		n++
		p := &Packet{Kind: KindRequest, Type: "/echo/say", Payload: json.RawMessage(`"hi"`), From: from,
			Token: "tok-" + string(rune('a'+n)), ReplyTo: replyQ, To: agentID, Deadline: time.Now().Add(time.Minute).UnixMilli()}
		if mutate != nil {
			mutate(p)
		}
		b, err := p.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return p, b
	}
	sign := func(id *security.Identity, body []byte, opts ...security.SignOption) []byte {
		env, err := id.Sign(body, opts...)
		if err != nil {
			t.Fatal(err)
		}
		return env
	}
	send := func(raw []byte) {
		t.Helper()
		if err := l.publish(t.Context(), message{Key: AgentQueue(agentID), Body: raw}); err != nil {
			t.Fatal(err)
		}
	}
	answer := func() *Packet {
		t.Helper()
		select {
		case d := <-replies:
			body, _, err := k.verifier().VerifyEnvelope(d.Body, security.RoleAgent)
			if err != nil {
				t.Fatalf("the agent's answer is not signed: %v", err)
			}
			p, err := DecodePacket(body, 0)
			if err != nil {
				t.Fatal(err)
			}
			return p
		case <-time.After(10 * time.Second):
			t.Fatal("no answer")
		}
		return nil
	}

	// The baseline: a well-signed request runs.
	_, body := request("req-raw", nil)
	good := sign(requester, body)
	send(good)
	if p := answer(); p.Error != nil || string(p.Payload) != `"hi"` {
		t.Fatalf("good request: %+v %+v", p, p.Error)
	}
	if calls.Load() != 1 {
		t.Fatalf("calls %d", calls.Load())
	}

	tamper := func(env []byte, f func(*security.Envelope)) []byte {
		e, err := security.ParseEnvelope(env)
		if err != nil {
			t.Fatal(err)
		}
		f(e)
		b, _ := json.Marshal(e)
		return b
	}
	sealedForOther := func() []byte {
		_, body := request("req-raw", func(p *Packet) {
			sealed, err := sealPayload(other.SealKey(), p.Payload, p.Token, p.Type, agentID)
			if err != nil {
				t.Fatal(err)
			}
			p.Sealed, p.Payload = sealed, nil
		})
		return sign(requester, body)
	}
	cases := []struct {
		name, reason string
		raw          []byte
	}{
		{"unsigned", "unsigned", func() []byte { _, b := request("req-raw", nil); return b }()},
		{"forged signature", "bad_signature", tamper(sign(requester, func() []byte { _, b := request("req-raw", nil); return b }()),
			func(e *security.Envelope) { e.Sig[0] ^= 0xff })},
		{"tampered payload", "bad_signature", tamper(sign(requester, func() []byte { _, b := request("req-raw", nil); return b }()),
			func(e *security.Envelope) {
				e.Body = []byte(strings.Replace(string(e.Body), `"hi"`, `"ho"`, 1))
			})},
		{"wrong CA", "unknown_signer", sign(stranger, func() []byte { _, b := request("req-raw", nil); return b }())},
		{"expired certificate", "cert_expired", sign(expired, func() []byte { _, b := request("req-old", nil); return b }())},
		{"revoked certificate", "revoked", sign(revoked, func() []byte { _, b := request("req-revoked", nil); return b }())},
		{"name mismatch", "name_mismatch", sign(requester, func() []byte { _, b := request("req-someone-else", nil); return b }())},
		{"wrong role", "wrong_role", sign(asAgent, func() []byte { _, b := request("agent-sneaky", nil); return b }())},
		{"replayed packet", "replay", good},
		{"outside the window (past)", "outside_window", sign(requester, func() []byte { _, b := request("req-raw", nil); return b }(),
			security.SignedAt(time.Now().Add(-10*time.Minute)))},
		{"outside the window (future)", "outside_window", sign(requester, func() []byte { _, b := request("req-raw", nil); return b }(),
			security.SignedAt(time.Now().Add(10*time.Minute)))},
		{"unauthorized caller", "not_authorized", sign(intruder, func() []byte { _, b := request("intruder", nil); return b }())},
		{"signed for another agent", "misdelivered", sign(requester, func() []byte {
			_, b := request("req-raw", func(p *Packet) { p.To = "agent-other" })
			return b
		}())},
		{"sealed to another agent", "cannot_open", sealedForOther()},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := a.Stats()["rejected_"+tc.reason]
			send(tc.raw)
			p := answer()
			if p.Error == nil || p.Error.Code != CodeUnauthorized {
				t.Fatalf("answered %+v", p)
			}
			if got := a.Stats()["rejected_"+tc.reason]; got != before+1 {
				t.Fatalf("rejected_%s went from %d to %d; stats %v; answer %s", tc.reason, before, got, a.Stats(), p.Error.Message)
			}
			if calls.Load() != 1 {
				t.Fatalf("the handler ran for a refused request (%d calls)", calls.Load())
			}
		})
	}
}

func TestOpenOwnDeadLetter(t *testing.T) {
	k := newPKI(t)
	me := k.secure("req-me", security.RoleMapper, nil, false)
	other := k.ident("req-other", security.RoleMapper)
	body, _ := (&Packet{Kind: KindRequest, Type: "/a/b", Token: "t1", ReplyTo: "q", From: "req-me"}).Encode()
	mine, _ := me.Identity.Sign(body)
	if p, err := me.openOwn(mine, 0); err != nil || p.Token != "t1" {
		t.Fatalf("own dead letter: %v", err)
	}
	forged, _ := other.Sign(body)
	if _, err := me.openOwn(forged, 0); err == nil {
		t.Fatal("a dead letter signed by someone else was accepted")
	}
	if _, err := me.openOwn(body, 0); err == nil {
		t.Fatal("an unsigned dead letter was accepted in secure mode")
	}
}
