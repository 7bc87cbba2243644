package nanite

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/testenv"
)

// sessionSecure is testPKI.secure with session keys on and, when window >
// 0, a verifier with that window.
func (k *testPKI) sessionSecure(name string, role security.Role, policy Authorizer, seal bool, window, lifetime time.Duration) *Secure {
	k.t.Helper()
	s := k.secure(name, role, policy, seal)
	if window > 0 {
		v, err := security.NewVerifier(security.VerifierConfig{Roots: k.roots, Revoked: k.revoked, Window: window})
		if err != nil {
			k.t.Fatal(err)
		}
		s.Verifier = v
	}
	s.Sessions, s.SessionLifetime = true, lifetime
	return s
}

func statsOf(st map[string]int64, keys ...string) map[string]int64 {
	out := map[string]int64{}
	for _, k := range keys {
		out[k] = st[k]
	}
	return out
}

// Sessions are set up in the first signed request and used from then on,
// both ways, for results and intermediate results; registrations and
// heartbeats stay signed.
func TestSessionKeys(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	pol := mustPolicy(t, testPolicy)
	var calls atomic.Int64
	ids := []string{"agent-k1", "agent-k2"}
	agents := map[string]*Agent{}
	for _, name := range ids {
		id := name
		agents[name], _ = c.agent(AgentConfig{Identity: name, Secure: k.sessionSecure(name, security.RoleAgent, pol, false, 0, 0)}, testActor(&id, &calls))
	}
	m, _ := c.mapper(MapperConfig{Identity: "req-k", Secure: k.sessionSecure("req-k", security.RoleMapper, nil, false, 0, 0)})
	waitAgents(t, m, "/echo/say", 2)

	const n = 10
	for i := range n {
		resp, err := m.Request(t.Context(), "/echo/say", i, WithTarget("agent-k1"))
		var got int
		if err != nil || resp.Decode(&got) != nil || got != i {
			t.Fatalf("request %d: %v %v", i, resp, err)
		}
	}
	ms := m.Stats()
	want := map[string]int64{"session_offers": 1, "sessions_established": 1, "signed_requests_sent": 1,
		"session_requests_sent": n - 1, "session_results": n, "signed_results": 0, "session_fallbacks": 0, "sessions_declined": 0}
	if got := statsOf(ms, "session_offers", "sessions_established", "signed_requests_sent", "session_requests_sent",
		"session_results", "signed_results", "session_fallbacks", "sessions_declined"); !mapsEqual(got, want) {
		t.Fatalf("mapper stats %v, want %v", got, want)
	}
	as := agents["agent-k1"].Stats()
	want = map[string]int64{"sessions_accepted": 1, "signed_requests": 1, "session_requests": n - 1, "session_replies": n, "signed_replies": 0, "sessions_held": 1}
	if got := statsOf(as, "sessions_accepted", "signed_requests", "session_requests", "session_replies", "signed_replies", "sessions_held"); !mapsEqual(got, want) {
		t.Fatalf("agent stats %v, want %v", got, want)
	}

	// Intermediate results come in the session too.
	var mu sync.Mutex
	var steps []string
	if _, err := m.Request(t.Context(), "/echo/stream", nil, WithTarget("agent-k1"), OnIntermediate(func(i Intermediate) {
		mu.Lock()
		steps = append(steps, string(i.Payload))
		mu.Unlock()
	})); err != nil || len(steps) != 3 {
		t.Fatalf("stream: %v %v", steps, err)
	}
	if got := agents["agent-k1"].Stats()["session_replies"]; got != n+4 {
		t.Fatalf("session replies %d after the stream, want %d", got, n+4)
	}

	// A fan-out: one session per agent.
	for range 3 {
		resp, err := m.Request(t.Context(), "/echo/who", nil, WithSelector(SelectAll))
		if err != nil || len(resp.Results) != 2 {
			t.Fatalf("fan-out: %v %v", resp, err)
		}
	}
	if got := m.Stats()["sessions_established"]; got != 2 {
		t.Fatalf("sessions established %d, want 2", got)
	}
	if st := m.Stats(); st["bad_packets"] != 0 || st["signed_results"] != 0 {
		t.Fatalf("mapper stats %v", st)
	}
	for _, name := range ids {
		if st := agents[name].Stats(); st["bad_packets"] != 0 || st["signed_replies"] != 0 {
			t.Fatalf("agent %s stats %v", name, st)
		}
	}
	// Registrations and heartbeats are still signed (the mapper verified
	// envelopes from the agents all along).
	if v := m.cfg.Secure.Verifier.Stats(); v.Verified == 0 || v.SessionVerified == 0 {
		t.Fatalf("mapper verifier %v", v)
	}
}

func mapsEqual(a, b map[string]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// A mapper with sessions and an agent without: the agent answers the offer
// signed, and the mapper signs from then on without offering again.
func TestSessionDeclined(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	id := "agent-plainsig"
	a, _ := c.agent(AgentConfig{Identity: id, Secure: k.secure(id, security.RoleAgent, nil, false)}, testActor(&id, nil))
	m, _ := c.mapper(MapperConfig{Identity: "req-d", Secure: k.sessionSecure("req-d", security.RoleMapper, nil, false, 0, 0)})
	waitAgents(t, m, "/echo/say", 1)
	for i := range 5 {
		if _, err := m.Request(t.Context(), "/echo/say", i); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]int64{"session_offers": 1, "sessions_declined": 1, "signed_requests_sent": 5, "session_requests_sent": 0, "signed_results": 5}
	if got := statsOf(m.Stats(), "session_offers", "sessions_declined", "signed_requests_sent", "session_requests_sent", "signed_results"); !mapsEqual(got, want) {
		t.Fatalf("mapper stats %v, want %v", got, want)
	}
	if st := a.Stats(); st["bad_packets"] != 0 {
		t.Fatalf("agent stats %v", st)
	}
}

// The refusals of session packets, on a real agent: forged MAC, replay,
// another session's id, a name that is not the session's peer, an unknown
// or ended session (answered unknown_session), a session used the wrong
// way, a revoked peer; and the policy applies to the session's peer.
func TestSessionRefusals(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	pol := mustPolicy(t, testPolicy)
	var calls atomic.Int64
	agentID := "agent-sess"
	a, _ := c.agent(AgentConfig{Identity: agentID, Secure: k.sessionSecure(agentID, security.RoleAgent, pol, false, 0, 0)}, testActor(&agentID, &calls))
	m1, _ := c.mapper(MapperConfig{Identity: "req-s1", Secure: k.sessionSecure("req-s1", security.RoleMapper, nil, false, 0, 0)})
	m2, _ := c.mapper(MapperConfig{Identity: "req-s2", Secure: k.sessionSecure("req-s2", security.RoleMapper, nil, false, 0, 0)})
	intruder, _ := c.mapper(MapperConfig{Identity: "intruder", Secure: k.sessionSecure("intruder", security.RoleMapper, nil, false, 0, 0)})
	for _, m := range []*Mapper{m1, m2, intruder} {
		waitAgents(t, m, "/echo/say", 1)
	}
	for _, m := range []*Mapper{m1, m2} {
		for range 2 {
			if _, err := m.Request(t.Context(), "/echo/say", "x"); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The policy judges the session's peer: the intruder gets a session
	// (authentication) and a refusal (authorization), in the session.
	for range 2 {
		_, err := intruder.Request(t.Context(), "/echo/say", "x")
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != CodeUnauthorized || !strings.Contains(re.Message, "intruder may not call") {
			t.Fatalf("intruder: %v", err)
		}
	}
	if st := intruder.Stats(); st["sessions_established"] != 1 || st["session_results"] != 2 {
		t.Fatalf("intruder stats %v", st)
	}
	calls.Store(0)

	session := func(m *Mapper) *security.Session {
		st := m.cfg.Secure.sessions()
		st.mu.Lock()
		defer st.mu.Unlock()
		s := st.peers[agentID].cur
		if s == nil {
			t.Fatalf("%s has no session", m.id)
		}
		return s
	}
	s1, s2 := session(m1), session(m2)
	l, replies, replyQ := rawRequester(t, c.url)
	n := 0
	request := func(from string) []byte {
		n++
		p := &Packet{Kind: KindRequest, Type: "/echo/say", Payload: json.RawMessage(`"hi"`), From: from,
			Token: "tok-" + string(rune('a'+n)), ReplyTo: replyQ, To: agentID, Deadline: time.Now().Add(time.Minute).UnixMilli()}
		b, err := p.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	send := func(raw []byte) {
		t.Helper()
		if err := l.publish(t.Context(), message{Key: AgentQueue(agentID), Body: raw}); err != nil {
			t.Fatal(err)
		}
	}
	answer := func() (*Packet, bool) {
		t.Helper()
		select {
		case d := <-replies:
			inSession := security.IsSessionEnvelope(d.Body)
			var body []byte
			if inSession {
				e, err := security.ParseSessionEnvelope(d.Body)
				if err != nil {
					t.Fatal(err)
				}
				body = e.Body
			} else {
				var err error
				if body, _, err = k.verifier().VerifyEnvelope(d.Body, security.RoleAgent); err != nil {
					t.Fatalf("the agent's answer is neither in a session nor signed: %v", err)
				}
			}
			p, err := DecodePacket(body, 0)
			if err != nil {
				t.Fatal(err)
			}
			return p, inSession
		case <-time.After(10 * time.Second):
			t.Fatal("no answer")
		}
		return nil, false
	}

	// The baseline: a request made in m1's session runs, answered in it.
	good := s1.Wrap(request("req-s1"))
	send(good)
	if p, inSession := answer(); p.Error != nil || string(p.Payload) != `"hi"` || !inSession {
		t.Fatalf("good request: %+v %v", p, inSession)
	}
	if calls.Load() != 1 {
		t.Fatalf("calls %d", calls.Load())
	}

	flipMAC := func(env []byte) []byte {
		b := bytes.Clone(env)
		i := bytes.Index(b, []byte(`"mac":"`)) + len(`"mac":"`)
		b[i] ^= 1 // 0-9a-f stay hex digits... mostly; either way it is refused
		if b[i] == 'g' || b[i] == '`' {
			b[i] = '0'
		}
		return b
	}
	// A session the agent never heard of.
	unknownEnv := bytes.Replace(s1.Wrap(request("req-s1")), []byte(s1.ID), []byte(strings.Repeat("0", 32)), 1)
	resultPkt, _ := (&Packet{Kind: KindResult, Token: "tok-r", From: "req-s1", Payload: json.RawMessage(`1`)}).Encode()
	cases := []struct {
		name, reason, code string
		raw                []byte
	}{
		{"forged MAC", "bad_mac", CodeUnauthorized, flipMAC(s1.Wrap(request("req-s1")))},
		{"tampered payload", "bad_mac", CodeUnauthorized, bytes.Replace(s1.Wrap(request("req-s1")), []byte(`"hi"`), []byte(`"ho"`), 1)},
		{"replayed packet", "replay", CodeUnauthorized, good},
		{"another session's id", "bad_mac", CodeUnauthorized, bytes.Replace(s1.Wrap(request("req-s1")), []byte(s1.ID), []byte(s2.ID), 1)},
		{"another mapper's name in the session", "name_mismatch", CodeUnauthorized, s1.Wrap(request("req-s2"))},
		{"unknown session", "unknown_session", CodeUnknownSession, unknownEnv},
		{"a result sent to the agent", "session_misuse", CodeUnauthorized, func() []byte {
			// A request-shaped envelope whose body is a result: refused
			// after the MAC, and answered from the packet's reply_to (none).
			return s1.Wrap(resultPkt)
		}()},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := a.Stats()["rejected_"+tc.reason]
			send(tc.raw)
			if tc.reason != "session_misuse" {
				p, inSession := answer()
				if p.Error == nil || p.Error.Code != tc.code || inSession {
					t.Fatalf("answered %+v (in session: %v)", p, inSession)
				}
			}
			eventually(t, "rejected_"+tc.reason+" counted", 5*time.Second, func() bool {
				return a.Stats()["rejected_"+tc.reason] == before+1
			})
			if calls.Load() != 1 {
				t.Fatalf("the handler ran for a refused request (%d calls)", calls.Load())
			}
		})
	}

	// Revocation applies to a session's peer at once.
	k.revoked.Set(nil, []string{"req-s1"})
	send(s1.Wrap(request("req-s1")))
	if p, _ := answer(); p.Error == nil || !strings.Contains(p.Error.Message, "revoked") {
		t.Fatalf("revoked peer: %+v", p)
	}
	k.revoked.Set(nil, nil)
	send(s1.Wrap(request("req-s1")))
	if p, _ := answer(); p.Error != nil {
		t.Fatalf("after un-revoking: %+v", p.Error)
	}
	if calls.Load() != 2 {
		t.Fatalf("calls %d", calls.Load())
	}
}

// A session ends: the mapper offers the next one before, and the agent
// refuses a request in an ended session (unknown_session, with the reason
// session_expired).
func TestSessionRenewal(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	id := "agent-renew"
	// A short window makes short sessions possible (at least four
	// windows); 1 s still absorbs a slow test machine.
	const window, lifetime = time.Second, 4 * time.Second
	a, _ := c.agent(AgentConfig{Identity: id, Secure: k.sessionSecure(id, security.RoleAgent, nil, false, window, 0)}, testActor(&id, nil))
	m, _ := c.mapper(MapperConfig{Identity: "req-r", Secure: k.sessionSecure("req-r", security.RoleMapper, nil, false, window, lifetime)})
	waitAgents(t, m, "/echo/say", 1)
	end := time.Now().Add(6 * time.Second)
	i := 0
	for time.Now().Before(end) {
		if _, err := m.Request(t.Context(), "/echo/say", i); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		i++
		time.Sleep(20 * time.Millisecond)
	}
	st := m.Stats()
	if st["sessions_established"] < 2 || st["session_fallbacks"] != 0 || st["session_requests_sent"] < int64(i)/2 {
		t.Fatalf("after %d requests in %v: %v", i, 6*time.Second, st)
	}
	t.Logf("%d requests: %v", i, statsOf(st, "session_offers", "sessions_established", "signed_requests_sent", "session_requests_sent"))

	// Idle past the end: the mapper does not use an ended session.
	last := func() *security.Session {
		s := m.cfg.Secure.sessions()
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.peers[id].cur
	}()
	time.Sleep(time.Until(last.Expires) + 100*time.Millisecond)
	before := m.Stats()["session_offers"]
	if _, err := m.Request(t.Context(), "/echo/say", 0); err != nil {
		t.Fatal(err)
	}
	if st := m.Stats(); st["session_offers"] != before+1 || st["session_fallbacks"] != 0 {
		t.Fatalf("after the end: %v", st)
	}
	// A request in the ended session is refused as unknown_session.
	l, replies, replyQ := rawRequester(t, c.url)
	p := &Packet{Kind: KindRequest, Type: "/echo/say", Payload: json.RawMessage(`1`), From: "req-r",
		Token: "tok-late", ReplyTo: replyQ, To: id, Deadline: time.Now().Add(time.Minute).UnixMilli()}
	body, _ := p.Encode()
	if err := l.publish(t.Context(), message{Key: AgentQueue(id), Body: last.Wrap(body)}); err != nil {
		t.Fatal(err)
	}
	if ans := nextSigned(t, k, replies); ans.Error == nil || ans.Error.Code != CodeUnknownSession {
		t.Fatalf("request in an ended session: %+v", ans)
	}
	if a.Stats()["rejected_session_expired"] != 1 {
		t.Fatalf("agent stats %v", a.Stats())
	}
}

func nextSigned(t *testing.T, k *testPKI, ch chan *delivery) *Packet {
	t.Helper()
	select {
	case d := <-ch:
		body, _, err := k.verifier().VerifyEnvelope(d.Body, security.RoleAgent)
		if err != nil {
			t.Fatalf("answer not signed: %v", err)
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

// An agent that restarts forgets its sessions: the first request in the
// old session is answered unknown_session, and the mapper sends it again,
// signed, with a new offer.
func TestSessionAgentRestart(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	id := "agent-restart"
	ident := k.ident(id, security.RoleAgent)
	agentSecure := func() *Secure {
		return &Secure{Identity: ident, Verifier: k.verifier(), Sessions: true} // new process state
	}
	_, stop := c.agent(AgentConfig{Identity: id, Secure: agentSecure()}, testActor(&id, nil))
	m, _ := c.mapper(MapperConfig{Identity: "req-restart", Secure: k.sessionSecure("req-restart", security.RoleMapper, nil, false, 0, 0)})
	waitAgents(t, m, "/echo/say", 1)
	for i := range 3 {
		if _, err := m.Request(t.Context(), "/echo/say", i); err != nil {
			t.Fatal(err)
		}
	}
	stop()
	eventually(t, "the agent gone", 10*time.Second, func() bool { return len(m.Agents()) == 0 })
	a2, _ := c.agent(AgentConfig{Identity: id, Secure: agentSecure()}, testActor(&id, nil))
	waitAgents(t, m, "/echo/say", 1)
	for i := range 3 {
		resp, err := m.Request(t.Context(), "/echo/say", i)
		var got int
		if err != nil || resp.Decode(&got) != nil || got != i {
			t.Fatalf("request %d after the restart: %v", i, err)
		}
	}
	want := map[string]int64{"session_fallbacks": 1, "session_offers": 2, "sessions_established": 2, "session_unknown_ignored": 0}
	if got := statsOf(m.Stats(), "session_fallbacks", "session_offers", "sessions_established", "session_unknown_ignored"); !mapsEqual(got, want) {
		t.Fatalf("mapper stats %v, want %v", got, want)
	}
	want = map[string]int64{"rejected_unknown_session": 1, "sessions_accepted": 1, "signed_requests": 1, "session_requests": 2}
	if got := statsOf(a2.Stats(), "rejected_unknown_session", "sessions_accepted", "signed_requests", "session_requests"); !mapsEqual(got, want) {
		t.Fatalf("agent stats %v, want %v", got, want)
	}
}

// An unknown_session answer that the mapper did not cause (forged, or for
// a request it signed) never fails a request nor makes it resend.
func TestSessionUnknownAnswerIgnored(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	id := "agent-slow"
	ident := k.ident(id, security.RoleAgent)
	c.agent(AgentConfig{Identity: id, Secure: &Secure{Identity: ident, Verifier: k.verifier(), Sessions: true}}, testActor(&id, nil))
	m, _ := c.mapper(MapperConfig{Identity: "req-u", Secure: k.sessionSecure("req-u", security.RoleMapper, nil, false, 0, 0)})
	waitAgents(t, m, "/echo/say", 1)
	if _, err := m.Request(t.Context(), "/echo/say", 0); err != nil { // sets up the session
		t.Fatal(err)
	}
	// A slow request in the session; while it runs, "the agent" (someone
	// with its key, here the test) answers unknown_session for it twice,
	// and for a token the mapper never sent.
	l, _, _ := rawRequester(t, c.url)
	done := make(chan error, 1)
	go func() {
		_, err := m.Request(t.Context(), "/echo/slow", 1500, WithTimeout(10*time.Second))
		done <- err
	}()
	var token string
	eventually(t, "the slow request sent in the session", 5*time.Second, func() bool {
		st := m.cfg.Secure.sessions()
		st.mu.Lock()
		defer st.mu.Unlock()
		for k, c := range st.sent {
			if k.agent == id && c.sid != "" {
				token = k.token
			}
		}
		return token != ""
	})
	for _, tok := range []string{token, token, "not-ours"} {
		body, _ := (&Packet{Kind: KindResult, Token: tok, From: id, Error: &ErrorBody{Code: CodeUnknownSession, Message: "forged"}}).Encode()
		env, _ := ident.Sign(body)
		if err := l.publish(t.Context(), message{Key: ReplyQueue(m.instance), Body: env}); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("the slow request failed: %v", err)
	}
	st := m.Stats()
	// The first answer matched a copy sent in the session: one resend (a
	// duplicate to the agent, which runs the request once); the others
	// are ignored.
	if st["session_fallbacks"] != 1 || st["session_unknown_ignored"] != 2 {
		t.Fatalf("mapper stats %v", st)
	}
}

// Sealed payloads stay sealed with sessions: what the broker sees (its
// firehose) holds session envelopes with sealed payloads, never the
// plaintext.
func TestSessionSealed(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	r := testenv.Rabbit(t)
	u, err := url.Parse(c.url)
	if err != nil {
		t.Fatal(err)
	}
	vhost := strings.TrimPrefix(u.Path, "/")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if out, err := r.Ctl(ctx, "trace_on", "-p", vhost); err != nil {
		t.Fatalf("trace_on: %v %s", err, out)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = r.Ctl(ctx, "trace_off", "-p", vhost)
	})
	var mu sync.Mutex
	var seen [][]byte
	tq := "trace-" + NewIdentity("q")
	tl := newLink(linkConfig{URL: c.url, Name: "tracer", Logger: testLogger(t),
		Setup: func(tp topology) error {
			if err := tp.Queue(queueSpec{Name: tq, Exclusive: true, AutoDelete: true}); err != nil {
				return err
			}
			return tp.Bind(tq, "amq.rabbitmq.trace", "publish.#", nil)
		},
		Consumers: []consumerSpec{{Queue: tq, AutoAck: true, Handle: func(d delivery) {
			mu.Lock()
			seen = append(seen, bytes.Clone(d.Body))
			mu.Unlock()
		}}},
	})
	lctx, lcancel := context.WithCancel(context.Background())
	ldone := make(chan struct{})
	go func() { _ = tl.run(lctx); close(ldone) }()
	t.Cleanup(func() { lcancel(); <-ldone })
	if err := tl.waitReady(t.Context()); err != nil {
		t.Fatal(err)
	}

	id := "agent-sealed"
	c.agent(AgentConfig{Identity: id, Secure: k.sessionSecure(id, security.RoleAgent, nil, false, 0, 0)}, testActor(&id, nil))
	m, _ := c.mapper(MapperConfig{Identity: "req-sealed", Secure: k.sessionSecure("req-sealed", security.RoleMapper, nil, true, 0, 0)})
	waitAgents(t, m, "/echo/say", 1)
	const secret = "s3cr3t-payload"
	for i := range 5 {
		resp, err := m.Request(t.Context(), "/echo/say", map[string]any{"secret": secret, "i": i})
		var got map[string]any
		if err != nil || resp.Decode(&got) != nil || got["secret"] != secret {
			t.Fatalf("sealed request %d: %v %v", i, got, err)
		}
	}
	if st := m.Stats(); st["session_results"] != 5 || st["session_requests_sent"] != 4 {
		t.Fatalf("mapper stats %v", st)
	}
	var inSession int
	eventually(t, "the broker's view", 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		inSession = 0
		for _, b := range seen {
			if bytes.Contains(b, []byte(secret)) {
				t.Fatalf("the broker saw the plaintext: %s", b)
			}
			if security.IsSessionEnvelope(b) {
				if !bytes.Contains(b, []byte(`"sealed":"`)) {
					t.Fatalf("a session packet without a sealed payload: %s", b)
				}
				inSession++
			}
		}
		return inSession >= 9 // 4 requests and 5 results
	})
}

// A request sent in a session that comes back dead-lettered is ours only
// if it carries our session's MAC.
func TestSessionOpenOwnDeadLetter(t *testing.T) {
	k := newPKI(t)
	me := k.sessionSecure("req-me", security.RoleMapper, nil, false, 0, 0)
	agent := k.ident("agent-dl", security.RoleAgent)
	if _, err := me.Verifier.VerifyCert(agent.Cert.Raw, "agent-dl", security.RoleAgent); err != nil {
		t.Fatal(err)
	}
	sess, _, err := me.Verifier.NewSession(me.Identity, "agent-dl", 0, security.RoleAgent)
	if err != nil {
		t.Fatal(err)
	}
	st := me.sessions()
	st.byID[sess.ID] = sess
	body, _ := (&Packet{Kind: KindRequest, Type: "/a/b", Token: "t1", ReplyTo: "q", From: "req-me"}).Encode()
	if p, err := me.openOwn(sess.Wrap(body), 0); err != nil || p.Token != "t1" {
		t.Fatalf("own dead letter in a session: %v", err)
	}
	other, _, _ := me.Verifier.NewSession(me.Identity, "agent-dl", 0, security.RoleAgent) // not stored
	if _, err := me.openOwn(other.Wrap(body), 0); err == nil {
		t.Fatal("a dead letter in a session we do not hold was accepted")
	}
	forged := bytes.Replace(sess.Wrap(body), []byte(`"t1"`), []byte(`"t2"`), 1)
	if _, err := me.openOwn(forged, 0); err == nil {
		t.Fatal("a tampered dead letter was accepted")
	}
}

// A session offer travels in the packet's "session" member, which the
// codec leaves to encoding/json both ways.
func TestSessionOfferCodec(t *testing.T) {
	p := &Packet{Kind: KindRequest, Type: "/a/b", Token: "t", ReplyTo: "q", From: "m", To: "a",
		Payload: json.RawMessage(`{"x":1}`), Session: json.RawMessage(`{"id":"00ff","exp":1,"key":"TlM="}`)}
	checkEncode(t, p)
	b, err := p.encodeTrusted()
	if err != nil || !bytes.Contains(b, []byte(`"session":{"id":"00ff"`)) {
		t.Fatalf("%s %v", b, err)
	}
	checkDecode(t, b)
	back, err := DecodePacket(b, 0)
	if err != nil || string(back.Session) != string(p.Session) || string(back.Payload) != `{"x":1}` {
		t.Fatalf("%+v %v", back, err)
	}
}

// A mapper forgets requests past their deadline, ended sessions and agents
// with nothing left.
func TestSessionMapperSweep(t *testing.T) {
	k := newPKI(t)
	me := k.sessionSecure("req-sweep", security.RoleMapper, nil, false, 0, 0)
	agent := k.ident("agent-sweep", security.RoleAgent)
	if _, err := me.Verifier.VerifyCert(agent.Cert.Raw, "agent-sweep", security.RoleAgent); err != nil {
		t.Fatal(err)
	}
	st := me.sessions()
	sess, _, offer := st.forRequest(me, "agent-sweep")
	if sess != nil || offer == nil || len(st.byID) != 1 {
		t.Fatalf("first request: %v %s", sess, offer)
	}
	st.remember(sentKey{"t1", "agent-sweep"}, sentCopy{offer: "x", until: time.Now().Add(time.Minute)})
	st.mu.Lock()
	st.sweepLocked(time.Now())
	if len(st.sent) != 1 || len(st.peers) != 1 || len(st.byID) != 1 {
		t.Fatalf("swept too early: %d %d %d", len(st.sent), len(st.peers), len(st.byID))
	}
	st.sweepLocked(time.Now().Add(time.Hour))
	if len(st.sent) != 0 || len(st.peers) != 0 || len(st.byID) != 0 {
		t.Fatalf("not swept: %d %d %d", len(st.sent), len(st.peers), len(st.byID))
	}
	st.mu.Unlock()
}

// A mapper daemon relays agent-originated requests in its sessions with
// the target agents: the origin (the asking agent's signed request) travels
// inside the session packet, and the policy still judges the agent that
// asked.
func TestSessionRelayedOrigin(t *testing.T) {
	c := newCluster(t)
	k := newPKI(t)
	pol := mustPolicy(t, testPolicy)
	daemon, _ := c.mapper(MapperConfig{Identity: "daemon-s", ServeAgentRequests: true, Secure: k.sessionSecure("daemon-s", security.RoleMapper, nil, false, 0, 0)})
	var counted atomic.Int64
	counter, _ := c.agent(AgentConfig{Identity: "agent-counter-s", Secure: k.sessionSecure("agent-counter-s", security.RoleAgent, pol, false, 0, 0)},
		NewActor("counter").Expose("incr", func(ctx context.Context, r *Request) (any, error) {
			if r.Caller != "agent-caller-s" {
				return nil, errors.New("caller " + r.Caller)
			}
			return counted.Add(1), nil
		}),
		NewActor("echo").Expose("say", func(ctx context.Context, r *Request) (any, error) { return "no", nil }))
	caller, _ := c.agent(AgentConfig{Identity: "agent-caller-s", Secure: k.sessionSecure("agent-caller-s", security.RoleAgent, pol, false, 0, 0)})
	waitAgents(t, daemon, "/counter/incr", 1)
	eventually(t, "the caller agent up", 10*time.Second, func() bool { return caller.link.connected() })
	for i := range 3 {
		if _, err := caller.Request(t.Context(), "/counter/incr", nil, WithTimeout(10*time.Second)); err != nil || counted.Load() != int64(i+1) {
			t.Fatalf("relayed request %d: %v (count %d)", i, err, counted.Load())
		}
	}
	_, err := caller.Request(t.Context(), "/echo/say", nil, WithTimeout(5*time.Second))
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeUnauthorized || !strings.Contains(re.Message, "agent-caller-s") {
		t.Fatalf("relayed request outside the policy: %v", err)
	}
	if st := daemon.Stats(); st["sessions_established"] != 1 || st["session_requests_sent"] != 3 || st["session_results"] != 4 {
		t.Fatalf("daemon stats %v", st)
	}
	if st := counter.Stats(); st["session_requests"] != 3 || st["rejected_name_mismatch"] != 0 {
		t.Fatalf("agent stats %v", st)
	}
}

func TestSessionLifetime(t *testing.T) {
	k := newPKI(t)
	for _, c := range []struct{ window, set, want time.Duration }{
		{0, 0, security.DefaultSessionLifetime},
		{0, time.Minute, 4 * security.DefaultWindow},
		{time.Second, time.Minute, time.Minute},
		{0, 5 * time.Hour, security.MaxSessionLifetime},
		{30 * time.Minute, 0, security.MaxSessionLifetime},
	} {
		if got := k.sessionSecure("req-l", security.RoleMapper, nil, false, c.window, c.set).lifetime(); got != c.want {
			t.Errorf("window %v, SessionLifetime %v: %v, want %v", c.window, c.set, got, c.want)
		}
	}
}
