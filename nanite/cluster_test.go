package nanite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

// cluster runs agents and mappers against a fresh vhost on the package's
// shared broker.
type cluster struct {
	t   *testing.T
	url string
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	r := testenv.Rabbit(t)
	return &cluster{t: t, url: r.NewVhost(t)}
}

func testLogger(t *testing.T) *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("NANITE_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(&testWriter{t: t}, &slog.HandlerOptions{Level: level}))
}

// agent starts an agent serving actors; it stops when the test ends.
func (c *cluster) agent(cfg AgentConfig, actors ...*Actor) (*Agent, context.CancelFunc) {
	c.t.Helper()
	if cfg.URL == "" {
		cfg.URL = c.url
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(c.t)
	}
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = 200 * time.Millisecond
	}
	if cfg.Status == nil {
		cfg.Status = func() float64 { return 0 }
	}
	a, err := NewAgent(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	for _, act := range actors {
		a.AddActor(act)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				c.t.Errorf("agent %s: %v", a.Identity(), err)
			}
		})
	}
	c.t.Cleanup(stop)
	return a, stop
}

// mapper starts a mapper; it stops when the test ends.
func (c *cluster) mapper(cfg MapperConfig) (*Mapper, context.CancelFunc) {
	c.t.Helper()
	if cfg.URL == "" {
		cfg.URL = c.url
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(c.t)
	}
	m, err := NewMapper(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				c.t.Errorf("mapper: %v", err)
			}
		})
	}
	c.t.Cleanup(stop)
	return m, stop
}

func waitAgents(t *testing.T, m *Mapper, service string, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := m.WaitForAgents(ctx, service, n); err != nil {
		t.Fatal(err)
	}
}

// testActor serves the services the tests use.
func testActor(id *string, calls *atomic.Int64) *Actor {
	return NewActor("echo").
		Expose("say", func(ctx context.Context, r *Request) (any, error) {
			if calls != nil {
				calls.Add(1)
			}
			return r.Payload, nil
		}).
		Expose("who", func(ctx context.Context, r *Request) (any, error) {
			if calls != nil {
				calls.Add(1)
			}
			return *id, nil
		}, Idempotent()).
		Expose("slow", func(ctx context.Context, r *Request) (any, error) {
			var ms int
			_ = r.Decode(&ms)
			select {
			case <-time.After(time.Duration(ms) * time.Millisecond):
				return *id, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}).
		Expose("stream", func(ctx context.Context, r *Request) (any, error) {
			for i := 1; i <= 3; i++ {
				if err := r.Intermediate(ctx, "progress", i); err != nil {
					return nil, err
				}
			}
			return "done", nil
		}).
		Expose("fail", func(ctx context.Context, r *Request) (any, error) {
			return nil, errors.New("it failed on purpose")
		}).
		Expose("panic", func(ctx context.Context, r *Request) (any, error) {
			panic("boom")
		})
}

func startEchoAgents(c *cluster, tags ...[]string) []*Agent {
	var out []*Agent
	for _, tg := range tags {
		id := new(string)
		a, _ := c.agent(AgentConfig{Tags: tg}, testActor(id, nil))
		*id = a.Identity()
		out = append(out, a)
	}
	return out
}

func TestRequestResultAndIntermediate(t *testing.T) {
	c := newCluster(t)
	startEchoAgents(c, nil)
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/say", 1)

	resp, err := m.Request(t.Context(), "/echo/say", map[string]any{"n": 1, "s": "x"})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := resp.Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got["n"] != float64(1) || got["s"] != "x" {
		t.Fatalf("echo returned %v", got)
	}

	var mu sync.Mutex
	var steps []string
	resp, err = m.Request(t.Context(), "/echo/stream", nil, OnIntermediate(func(i Intermediate) {
		mu.Lock()
		steps = append(steps, i.Key+"="+string(i.Payload))
		mu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(steps) != "[progress=1 progress=2 progress=3]" {
		t.Fatalf("intermediate results %v", steps)
	}
	if string(resp.Results[0].Payload) != `"done"` {
		t.Fatalf("final %s", resp.Results[0].Payload)
	}

	// "/nanite" alone is the built-in actor's index.
	resp, err = m.Request(t.Context(), "/nanite", nil)
	if err != nil {
		t.Fatal(err)
	}
	var info AgentInfo
	if err := resp.Decode(&info); err != nil || info.Identity == "" || len(info.Services) == 0 {
		t.Fatalf("/nanite index: %+v %v", info, err)
	}
}

func TestSelectors(t *testing.T) {
	c := newCluster(t)
	agents := startEchoAgents(c, []string{"web", "eu"}, []string{"web", "us"}, []string{"db", "eu"})
	ids := map[string]bool{}
	for _, a := range agents {
		ids[a.Identity()] = true
	}
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/who", 3)
	who := func(opts ...RequestOption) string {
		t.Helper()
		resp, err := m.Request(t.Context(), "/echo/who", nil, opts...)
		if err != nil {
			t.Fatal(err)
		}
		var id string
		if err := resp.Decode(&id); err != nil {
			t.Fatal(err)
		}
		if resp.Results[0].Agent != id {
			t.Fatalf("result from %s claims %s", resp.Results[0].Agent, id)
		}
		return id
	}

	t.Run("all", func(t *testing.T) {
		resp, err := m.Request(t.Context(), "/echo/who", nil, WithSelector(SelectAll))
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, r := range resp.Results {
			seen[r.Agent] = true
		}
		if len(resp.Results) != 3 || len(seen) != 3 {
			t.Fatalf("all: %d results from %v", len(resp.Results), seen)
		}
	})
	t.Run("rr", func(t *testing.T) {
		// A registration that arrives meanwhile (agents answer the
		// mapper's advertise and heartbeat-triggered advertise requests
		// when they get them) re-orders the turn: such a round is
		// started over.
		var seen map[string]int
		for try := 0; ; try++ {
			before := m.Stats()["registrations"]
			seen = map[string]int{}
			for range 6 {
				seen[who(WithSelector(SelectRoundRobin))]++
			}
			if m.Stats()["registrations"] == before || try == 5 {
				break
			}
		}
		for id := range ids {
			if seen[id] != 2 {
				t.Fatalf("round robin over 6 requests: %v", seen)
			}
		}
	})
	t.Run("random", func(t *testing.T) {
		seen := map[string]bool{}
		for range 40 {
			id := who(WithSelector(SelectRandom))
			if !ids[id] {
				t.Fatalf("random picked unknown agent %s", id)
			}
			seen[id] = true
		}
		if len(seen) < 2 {
			t.Fatalf("40 random requests all went to %v", seen)
		}
	})
	t.Run("target", func(t *testing.T) {
		for _, a := range agents {
			if got := who(WithTarget(a.Identity())); got != a.Identity() {
				t.Fatalf("target %s answered by %s", a.Identity(), got)
			}
		}
		_, err := m.Request(t.Context(), "/echo/who", nil, WithTarget("agent-nosuch"))
		if !errors.Is(err, ErrNoAgent) {
			t.Fatalf("unknown target: %v", err)
		}
	})
	t.Run("tags", func(t *testing.T) {
		// all tags must match by default
		if got := who(WithTags("web", "us")); got != agents[1].Identity() {
			t.Fatalf("web+us answered by %s", got)
		}
		resp, err := m.Request(t.Context(), "/echo/who", nil, WithSelector(SelectAll), WithTags("eu"))
		if err != nil || len(resp.Results) != 2 {
			t.Fatalf("all eu: %v %v", resp, err)
		}
		// any: us or db = agents 1 and 2
		resp, err = m.Request(t.Context(), "/echo/who", nil, WithSelector(SelectAll), WithTags("us", "db"), MatchAnyTag())
		if err != nil || len(resp.Results) != 2 {
			t.Fatalf("all us|db: %v %v", resp, err)
		}
		for _, r := range resp.Results {
			if r.Agent == agents[0].Identity() {
				t.Fatalf("any-match picked %s, which has neither tag", r.Agent)
			}
		}
		_, err = m.Request(t.Context(), "/echo/who", nil, WithTags("web", "db"))
		if !errors.Is(err, ErrNoAgent) {
			t.Fatalf("no agent has web and db: %v", err)
		}
	})
	t.Run("least_loaded_spreads_a_burst", func(t *testing.T) {
		// Every agent reports load 0: without in-flight accounting the
		// whole burst would go to one of them.
		var wg sync.WaitGroup
		var mu sync.Mutex
		seen := map[string]int{}
		for range 9 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := m.Request(t.Context(), "/echo/slow", 300)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				seen[resp.Results[0].Agent]++
				mu.Unlock()
			}()
		}
		wg.Wait()
		for id := range ids {
			if seen[id] != 3 {
				t.Fatalf("a burst of 9 over 3 idle agents: %v", seen)
			}
		}
	})
}

func TestDeadline(t *testing.T) {
	c := newCluster(t)
	agents := startEchoAgents(c, nil, nil)
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/slow", 2)

	_, err := m.Request(t.Context(), "/echo/slow", 5000, WithTimeout(300*time.Millisecond))
	var te *TimeoutError
	if !errors.As(err, &te) || !errors.Is(err, ErrTimeout) {
		t.Fatalf("want a timeout, got %v", err)
	}
	if len(te.Missing) != 1 {
		t.Fatalf("timeout should name the silent agent: %v", te)
	}

	// The context's deadline counts too.
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if _, err := m.Request(ctx, "/echo/slow", 5000); !errors.Is(err, ErrTimeout) {
		t.Fatalf("context deadline: %v", err)
	}

	// After the timed-out requests (whose handlers were cancelled at the
	// deadline), both agents still answer a fan-out. Partial results of a
	// fan-out are TestFanOutPartialTimeout's.
	resp, err := m.Request(t.Context(), "/echo/who", nil, WithSelector(SelectAll), WithTimeout(2*time.Second))
	answered := map[string]bool{}
	if resp != nil {
		for _, r := range resp.Results {
			answered[r.Agent] = true
		}
	}
	if err != nil || !answered[agents[0].Identity()] || !answered[agents[1].Identity()] {
		t.Fatalf("all who: %v %v", resp, err)
	}
}

func TestFanOutPartialTimeout(t *testing.T) {
	c := newCluster(t)
	mk := func(name string) *Actor {
		return NewActor("mixed").Expose("run", func(ctx context.Context, r *Request) (any, error) {
			if name == "slow" {
				<-ctx.Done()
				return nil, ctx.Err()
			}
			return name, nil
		})
	}
	c.agent(AgentConfig{Identity: NewIdentity("fast")}, mk("fast"))
	sa, _ := c.agent(AgentConfig{Identity: NewIdentity("slow")}, mk("slow"))
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/mixed/run", 2)
	resp, err := m.Request(t.Context(), "/mixed/run", nil, WithSelector(SelectAll), WithTimeout(500*time.Millisecond))
	var te *TimeoutError
	if !errors.As(err, &te) {
		t.Fatalf("want timeout, got %v", err)
	}
	if len(te.Missing) != 1 || te.Missing[0] != sa.Identity() {
		t.Fatalf("missing %v, want [%s]", te.Missing, sa.Identity())
	}
	if resp == nil || len(resp.Results) != 1 || string(resp.Results[0].Payload) != `"fast"` {
		t.Fatalf("partial results: %+v", resp)
	}
}

func TestErrorsFromAgents(t *testing.T) {
	c := newCluster(t)
	a := startEchoAgents(c, nil)[0]
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/say", 1)

	_, err := m.Request(t.Context(), "/nosuch/service", nil)
	if !errors.Is(err, ErrNoAgent) {
		t.Fatalf("unknown service: %v", err)
	}
	_, err = m.Request(t.Context(), "not-a-service", nil)
	if err == nil {
		t.Fatal("malformed service name accepted")
	}

	_, err = m.Request(t.Context(), "/echo/fail", nil)
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeHandler || re.Agent != a.Identity() || !errors.Is(err, ErrRemote) {
		t.Fatalf("handler error: %v", err)
	}
	_, err = m.Request(t.Context(), "/echo/panic", nil)
	if !errors.As(err, &re) || re.Code != CodePanic {
		t.Fatalf("handler panic: %v", err)
	}
	// The agent survived the panic.
	if _, err := m.Request(t.Context(), "/echo/say", "still here"); err != nil {
		t.Fatalf("after panic: %v", err)
	}
	if got := a.Stats()["panics"]; got != 1 {
		t.Fatalf("panics counted %d", got)
	}
}

// rawRequester publishes hand-made messages to an agent's queue and reads the
// answers from its own reply queue, to test what the agent does with bad
// input.
func rawRequester(t *testing.T, url string) (*link, chan *delivery, string) {
	t.Helper()
	id := NewIdentity("raw")
	got := make(chan *delivery, 16)
	l := newLink(linkConfig{URL: url, Name: "raw", Logger: testLogger(t),
		Setup: func(tp topology) error {
			if err := declareCommon(tp); err != nil {
				return err
			}
			return declareReplyQueue(tp, id)
		},
		Consumers: []consumerSpec{{Queue: ReplyQueue(id), AutoAck: true, Handle: func(d delivery) { got <- &d }}},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = l.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	if err := l.waitReady(t.Context()); err != nil {
		t.Fatal(err)
	}
	return l, got, ReplyQueue(id)
}

func nextPacket(t *testing.T, ch chan *delivery) *Packet {
	t.Helper()
	select {
	case d := <-ch:
		p, err := DecodePacket(d.Body, 0)
		if err != nil {
			t.Fatalf("answer does not decode: %v: %s", err, d.Body)
		}
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("no answer")
	}
	return nil
}

func TestBadInput(t *testing.T) {
	c := newCluster(t)
	var calls atomic.Int64
	id := new(string)
	a, _ := c.agent(AgentConfig{MaxPayload: 4096}, testActor(id, &calls))
	*id = a.Identity()
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/say", 1)
	l, replies, replyQ := rawRequester(t, c.url)
	pub := func(body []byte, token string) {
		t.Helper()
		if err := l.publish(t.Context(), message{Key: AgentQueue(a.Identity()), Body: body, CorrelationID: token, ReplyTo: replyQ}); err != nil {
			t.Fatal(err)
		}
	}

	pub([]byte(`{"v":1,"packet":"request","type":"/echo/say",`), "t-garbage")
	if p := nextPacket(t, replies); p.Token != "t-garbage" || p.Error == nil || p.Error.Code != CodeBadRequest {
		t.Fatalf("truncated JSON answered with %+v", p)
	}
	pub([]byte(`{"v":1,"packet":"frobnicate","token":"t-kind","reply_to":"`+replyQ+`"}`), "t-kind")
	if p := nextPacket(t, replies); p.Token != "t-kind" || p.Error == nil || p.Error.Code != CodeBadRequest {
		t.Fatalf("unknown kind answered with %+v", p)
	}
	big, _ := json.Marshal(&Packet{Version: 1, Kind: KindRequest, Type: "/echo/say", Token: "t-big", ReplyTo: replyQ,
		Payload: json.RawMessage(`"` + strings.Repeat("x", 5000) + `"`)})
	pub(big, "t-big")
	if p := nextPacket(t, replies); p.Token != "t-big" || p.Error == nil || p.Error.Code != CodeTooLarge {
		t.Fatalf("oversized payload answered with %+v", p)
	}
	unknown, _ := (&Packet{Kind: KindRequest, Type: "/nope/x", Token: "t-unknown", ReplyTo: replyQ}).Encode()
	pub(unknown, "t-unknown")
	if p := nextPacket(t, replies); p.Error == nil || p.Error.Code != CodeUnknown {
		t.Fatalf("unknown service answered with %+v", p)
	}
	expired, _ := (&Packet{Kind: KindRequest, Type: "/echo/say", Token: "t-exp", ReplyTo: replyQ,
		Deadline: time.Now().Add(-time.Second).UnixMilli()}).Encode()
	pub(expired, "t-exp")
	if p := nextPacket(t, replies); p.Error == nil || p.Error.Code != CodeExpired {
		t.Fatalf("expired request answered with %+v", p)
	}
	if calls.Load() != 0 {
		t.Fatalf("a handler ran for bad input (%d)", calls.Load())
	}
	st := a.Stats()
	if st["bad_packets"] != 3 || st["too_large"] != 1 || st["unknown_service"] != 1 || st["expired"] != 1 {
		t.Fatalf("counters %v", st)
	}
	// The mapper refuses an oversized payload before sending it.
	if _, err := m.Request(t.Context(), "/echo/say", string(make([]byte, 2<<20))); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("mapper accepted 2 MiB payload: %v", err)
	}
	// Still serving.
	if _, err := m.Request(t.Context(), "/echo/say", "ok"); err != nil {
		t.Fatal(err)
	}
}

func TestDuplicateNotRunTwice(t *testing.T) {
	c := newCluster(t)
	var calls atomic.Int64
	id := new(string)
	a, _ := c.agent(AgentConfig{}, testActor(id, &calls))
	*id = a.Identity()
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/say", 1) // its queue exists
	l, replies, replyQ := rawRequester(t, c.url)
	body, _ := (&Packet{Kind: KindRequest, Type: "/echo/say", Payload: json.RawMessage(`"once"`), Token: "t-dup", ReplyTo: replyQ,
		Deadline: time.Now().Add(time.Minute).UnixMilli()}).Encode()
	send := func() {
		t.Helper()
		if err := l.publish(t.Context(), message{Key: AgentQueue(a.Identity()), Body: body, CorrelationID: "t-dup"}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(p *Packet) {
		t.Helper()
		if p.Kind != KindResult || string(p.Payload) != `"once"` {
			t.Fatalf("answer %+v", p)
		}
	}
	// Twice at once: the second arrives while the first may still run;
	// either way the requester gets an answer and the handler runs once.
	send()
	send()
	check(nextPacket(t, replies))
	// Once more after it finished: answered from the cache.
	send()
	check(nextPacket(t, replies))
	if calls.Load() != 1 {
		t.Fatalf("handler ran %d times for one token", calls.Load())
	}
	eventually(t, "both duplicates counted", 5*time.Second, func() bool { return a.Stats()["duplicates"] == 2 })
	if calls.Load() != 1 {
		t.Fatalf("handler ran %d times for one token", calls.Load())
	}
}
