package vertebra

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp/disco"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/ping"
	"mellium.im/xmpp/stanza"
)

// fakeActors is a Handler like nanite's Dispatcher with an "echo" actor.
type fakeActors struct {
	runs atomic.Int64
}

func (f *fakeActors) Services() []string {
	return []string{"/echo/fail", "/echo/say", "/echo/slow", "/echo/stream"}
}

func (f *fakeActors) Call(ctx context.Context, service string, payload json.RawMessage, from string,
	emit func(ctx context.Context, key string, data json.RawMessage) error) (json.RawMessage, error) {
	f.runs.Add(1)
	switch service {
	case "/echo/say":
		if payload == nil {
			return json.RawMessage("null"), nil
		}
		return payload, nil
	case "/echo/stream":
		for i := 1; i <= 3; i++ {
			if err := emit(ctx, "progress", json.RawMessage(fmt.Sprintf(`{"step":%d,"of":3}`, i))); err != nil {
				return nil, err
			}
		}
		return json.RawMessage(`{"steps":3}`), nil
	case "/echo/slow":
		var ms int
		_ = json.Unmarshal(payload, &ms)
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return json.RawMessage(fmt.Sprintf(`{"slept_ms":%d}`, ms)), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	case "/echo/fail":
		return nil, &Error{Code: "handler_error", Message: "failed as asked"}
	}
	return nil, &Error{Code: CodeUnknown, Message: "no " + service}
}

func startAgent(t *testing.T, cfg AgentConfig) *Agent {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	a, err := NewAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	select {
	case <-a.Ready():
	case err := <-done:
		t.Fatalf("agent: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("agent not connected after 10 s")
	}
	return a
}

func TestAgent(t *testing.T) {
	p := runProsody(t)
	actors := &fakeActors{}

	// carol watches the agent's presence (the agent sends it to its
	// "directory").
	watcher := NewEndpoint(Config{})
	statuses := make(chan string, 10)
	startConn(t, clientDial(t, p, "carol"), watcher, func(c *ConnConfig) {
		c.Options = append(c.Options, mux.Presence("", xml.Name{}, mux.PresenceHandlerFunc(
			func(pr stanza.Presence, r xmlstream.TokenReadEncoder) error {
				var st struct {
					Status string `xml:"status"`
				}
				_ = xml.NewTokenDecoder(r).Decode(&st)
				select {
				case statuses <- pr.From.String() + " " + st.Status:
				default:
				}
				return nil
			})))
	})

	ad := clientDial(t, p, "agent1")
	a := startAgent(t, AgentConfig{
		Dial:       ad,
		Handler:    actors,
		Authorizer: AllowJIDs("alice@" + testDomain),
		Load:       func() float64 { return 0.25 },
		Directory:  watcher.LocalAddr(),
		Endpoint:   Config{Logger: testLogger(t)},
	})
	agentJID := a.JID()
	if agentJID.String() != "agent1@site-a.test/test" {
		t.Errorf("agent JID %v", agentJID)
	}

	alice := NewEndpoint(Config{})
	aliceConn := startConn(t, clientDial(t, p, "alice"), alice)
	bob := NewEndpoint(Config{})
	startConn(t, clientDial(t, p, "bob"), bob)

	t.Run("presence with load", func(t *testing.T) {
		select {
		case s := <-statuses:
			if s != "agent1@site-a.test/test 0.25" {
				t.Errorf("presence %q", s)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no presence")
		}
	})

	t.Run("streamed results", func(t *testing.T) {
		var got []string
		res, err := alice.Call(ctxTimeout(t, 5*time.Second), agentJID, "/echo/stream", nil, OnData(func(d Data) {
			got = append(got, fmt.Sprintf("%s=%s", d.Key, d.Payload))
		}))
		if err != nil {
			t.Fatal(err)
		}
		want := []string{`progress={"step":1,"of":3}`, `progress={"step":2,"of":3}`, `progress={"step":3,"of":3}`, `={"steps":3}`}
		if !slices.Equal(got, want) {
			t.Errorf("got %q, want %q", got, want)
		}
		if string(res.Value()) != `{"steps":3}` {
			t.Errorf("result %s", res.Value())
		}
	})

	t.Run("unauthorized caller gets a nack", func(t *testing.T) {
		before := actors.runs.Load()
		_, err := bob.Call(ctxTimeout(t, 5*time.Second), agentJID, "/echo/say", json.RawMessage(`"hi"`))
		var oe *OpError
		if !errors.As(err, &oe) || !oe.Nack || oe.Code != CodeUnauthorized || !errors.Is(err, ErrNotAuthorized) {
			t.Fatalf("err = %v", err)
		}
		if actors.runs.Load() != before {
			t.Error("the handler ran for an unauthorized caller")
		}
	})

	t.Run("unknown op gets a nack", func(t *testing.T) {
		_, err := alice.Call(ctxTimeout(t, 5*time.Second), agentJID, "/echo/nothing", nil)
		var oe *OpError
		if !errors.As(err, &oe) || !oe.Nack || oe.Code != CodeUnknown {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("handler error", func(t *testing.T) {
		_, err := alice.Call(ctxTimeout(t, 5*time.Second), agentJID, "/echo/fail", nil)
		var oe *OpError
		if !errors.As(err, &oe) || oe.Nack || oe.Code != "handler_error" || oe.Message != "failed as asked" {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("deadline expiry", func(t *testing.T) {
		t0 := time.Now()
		_, err := alice.Call(ctxTimeout(t, 400*time.Millisecond), agentJID, "/echo/slow", json.RawMessage(`5000`))
		if !errors.Is(err, ErrDeadline) {
			t.Fatalf("err = %v", err)
		}
		if d := time.Since(t0); d < 350*time.Millisecond || d > 1500*time.Millisecond {
			t.Errorf("ended after %v", d)
		}
	})

	t.Run("disco#info lists the services", func(t *testing.T) {
		info, err := disco.GetInfo(ctxTimeout(t, 5*time.Second), "", agentJID, aliceConn.Session())
		if err != nil {
			t.Fatal(err)
		}
		var feats []string
		for _, f := range info.Features {
			feats = append(feats, f.Var)
		}
		for _, want := range []string{NS, NSMeta, ServiceFeature("/echo/say"), ServiceFeature("/echo/stream"), ping.NS} {
			if !slices.Contains(feats, want) {
				t.Errorf("disco#info features %q lack %q", feats, want)
			}
		}
	})

	t.Run("ping", func(t *testing.T) {
		if err := ping.Send(ctxTimeout(t, 5*time.Second), aliceConn.Session(), agentJID); err != nil {
			t.Fatal(err)
		}
	})
}

// TestReconnect restarts the server in the middle of an op: the agent and
// the caller reconnect with the same full JIDs, the agent resends its
// unconfirmed stanzas, and the op ends with its result.
func TestReconnect(t *testing.T) {
	p := runProsody(t)
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: &fakeActors{},
		Endpoint: Config{RetryInitial: 100 * time.Millisecond, RetryMax: 300 * time.Millisecond, Logger: testLogger(t)}})
	alice := NewEndpoint(Config{RetryInitial: 100 * time.Millisecond, RetryMax: 300 * time.Millisecond, Logger: testLogger(t)})
	startConn(t, clientDial(t, p, "alice"), alice)

	type outcome struct {
		res *Result
		err error
	}
	done := make(chan outcome, 1)
	acked := make(chan struct{})
	go func() {
		res, err := alice.Call(ctxTimeout(t, 15*time.Second), a.JID(), "/echo/slow", json.RawMessage(`1500`),
			OnAck(func(jid.JID) { close(acked) }))
		done <- outcome{res, err}
	}()
	select {
	case <-acked:
	case <-time.After(5 * time.Second):
		t.Fatal("no ack")
	}
	if err := p.Restart(ctxTimeout(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	select {
	case o := <-done:
		if o.err != nil {
			t.Fatalf("op across a server restart: %v", o.err)
		}
		if string(o.res.Value()) != `{"slept_ms":1500}` {
			t.Errorf("result %s", o.res.Value())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("op did not end")
	}
	t.Logf("agent %+v\ncaller %+v", a.Endpoint().Stats(), alice.Stats())

	// And ops keep working afterwards.
	res, err := alice.Call(ctxTimeout(t, 10*time.Second), a.JID(), "/echo/say", json.RawMessage(`"again"`))
	if err != nil || string(res.Value()) != `"again"` {
		t.Fatalf("after restart: %v %v", res, err)
	}
}

// TestResponderGoesAway: the responder disconnects mid-op; the caller gets
// a deadline error by its deadline.
func TestResponderGoesAway(t *testing.T) {
	p := runProsody(t)
	actors := &fakeActors{}
	a, err := NewAgent(AgentConfig{Dial: clientDial(t, p, "agent2"), Handler: actors, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = a.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	<-a.Ready()
	alice := NewEndpoint(Config{})
	startConn(t, clientDial(t, p, "alice"), alice)

	acked := make(chan struct{})
	go func() {
		<-acked
		cancel() // the agent goes away mid-op
	}()
	t0 := time.Now()
	_, err = alice.Call(ctxTimeout(t, 1500*time.Millisecond), a.JID(), "/echo/slow", json.RawMessage(`10000`),
		OnAck(func(jid.JID) { close(acked) }))
	var de *DeadlineError
	if !errors.As(err, &de) || de.Stage != "final" {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(t0); d > 2500*time.Millisecond {
		t.Errorf("error after %v", d)
	}
}

// TestPlaintextLoopback logs in without TLS, allowed only on loopback.
func TestPlaintextLoopback(t *testing.T) {
	p := runProsody(t)
	dc := clientDial(t, p, "dave")
	dc.TLSConfig, dc.AllowPlaintext = nil, true
	s, err := Dial(ctxTimeout(t, 5*time.Second), dc)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Conn().Close()
	if s.ConnectionState().Version != 0 {
		t.Error("TLS negotiated")
	}
	if s.LocalAddr().String() != "dave@site-a.test/test" {
		t.Errorf("bound %v", s.LocalAddr())
	}
}
