package nanite_test

// The conformance tests of docs/protocol.md. The "raw" agent and the "raw"
// requester below speak the protocol with nothing but amqp091-go calls and
// JSON maps written from the document, the way a Python or Ruby program
// would; they never use the nanite package's types. The other side of each
// conversation is the real nanite.Mapper or nanite.Agent.
//
// Run with -v to see every packet that crossed the wire (the examples in
// docs/protocol.md were captured this way).

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// The names of docs/protocol.md, written out on purpose instead of using the
// package's constants: the test checks the document, not the code against
// itself.
const (
	wireRegistration = "nanite.registration"
	wireHeartbeat    = "nanite.heartbeat"
	wireAdvertise    = "nanite.advertise"
	wireDead         = "nanite.dead"
	wireMapperQueue  = "nanite.mapper.requests"
	wireOffline      = "nanite.offline"
	wireReplyHeader  = "nanite-reply-to"
)

// rawTopology declares the common topology of docs/protocol.md
// ("Topology"), which every participant declares identically.
func rawTopology(t *testing.T, ch *amqp.Channel) {
	t.Helper()
	for _, e := range []struct{ name, kind string }{
		{wireRegistration, "fanout"}, {wireHeartbeat, "fanout"}, {wireAdvertise, "fanout"}, {wireDead, "headers"},
	} {
		if err := ch.ExchangeDeclare(e.name, e.kind, true, false, false, false, nil); err != nil {
			t.Fatalf("declare exchange %s: %v", e.name, err)
		}
	}
	for _, q := range []string{wireMapperQueue, wireOffline} {
		if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-dead-letter-exchange": wireDead}); err != nil {
			t.Fatalf("declare queue %s: %v", q, err)
		}
	}
}

// rawAgentQueue declares the durable request queue of an agent.
func rawAgentQueue(t *testing.T, ch *amqp.Channel, id string) string {
	t.Helper()
	q := "nanite.agent." + id
	if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{
		"x-dead-letter-exchange": wireDead,
		"x-expires":              int64(24 * time.Hour / time.Millisecond),
	}); err != nil {
		t.Fatalf("declare queue %s: %v", q, err)
	}
	return q
}

// rawReplyQueue declares a reply queue and binds it to the dead-letter
// exchange so that requests that expire unread come back to it.
func rawReplyQueue(t *testing.T, ch *amqp.Channel, id string) string {
	t.Helper()
	q := "nanite.reply." + id
	if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{
		"x-expires": int64(10 * time.Minute / time.Millisecond),
	}); err != nil {
		t.Fatalf("declare queue %s: %v", q, err)
	}
	if err := ch.QueueBind(q, "", wireDead, false, amqp.Table{"x-match": "all", wireReplyHeader: q}); err != nil {
		t.Fatalf("bind %s: %v", q, err)
	}
	return q
}

func rawDial(t *testing.T, url string) (*amqp.Connection, *amqp.Channel) {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	return conn, ch
}

func rawConsume(t *testing.T, conn *amqp.Connection, queue string, autoAck bool) <-chan amqp.Delivery {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	if err := ch.Qos(16, 0, false); err != nil {
		t.Fatalf("qos: %v", err)
	}
	ds, err := ch.Consume(queue, "", autoAck, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	return ds
}

// rawStateQueue declares an exclusive, auto-deleted queue bound to a fanout,
// as a mapper does to see registrations or heartbeats.
func rawStateQueue(t *testing.T, ch *amqp.Channel, exchange string) string {
	t.Helper()
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatalf("declare state queue: %v", err)
	}
	if err := ch.QueueBind(q.Name, "", exchange, false, nil); err != nil {
		t.Fatalf("bind state queue: %v", err)
	}
	return q.Name
}

func rawPublish(t *testing.T, ch *amqp.Channel, exchange, key string, mandatory bool, pub amqp.Publishing, packet map[string]any) []byte {
	t.Helper()
	body, err := json.Marshal(packet)
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	pub.Body = body
	pub.ContentType = "application/json"
	if pub.Type == "" {
		pub.Type, _ = packet["packet"].(string)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ch.PublishWithContext(ctx, exchange, key, mandatory, false, pub); err != nil {
		t.Errorf("publish %s: %v", pub.Type, err)
	}
	return body
}

// rawPacket decodes a packet into a JSON map.
func rawPacket(t *testing.T, body []byte) map[string]any {
	t.Helper()
	var p map[string]any
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatalf("packet is not JSON: %v: %s", err, body)
	}
	if v, _ := p["v"].(float64); v != 1 {
		t.Errorf(`packet has "v" %v, want 1: %s`, p["v"], body)
	}
	return p
}

// rawNext returns the next delivery for which match is true, skipping the
// others, within 10 seconds.
func rawNext(t *testing.T, ds <-chan amqp.Delivery, what string, match func(amqp.Delivery, map[string]any) bool) (amqp.Delivery, map[string]any) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case d, ok := <-ds:
			if !ok {
				t.Fatalf("waiting for %s: consumer closed", what)
			}
			p := rawPacket(t, d.Body)
			if match == nil || match(d, p) {
				t.Logf("wire %s: %s", what, d.Body)
				return d, p
			}
		case <-timeout:
			t.Fatalf("no %s within 10s", what)
		}
	}
}

func isKind(kind string) func(amqp.Delivery, map[string]any) bool {
	return func(_ amqp.Delivery, p map[string]any) bool { return p["packet"] == kind }
}

func isKindFrom(kind, from string) func(amqp.Delivery, map[string]any) bool {
	return func(_ amqp.Delivery, p map[string]any) bool { return p["packet"] == kind && p["identity"] == from }
}

// background runs f until the test ends (or stop is called) and waits for it.
func background(t *testing.T, name string, f func(context.Context) error) (stop func()) {
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := f(ctx); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return stop
}

func eventuallyTrue(t *testing.T, what string, within time.Duration, f func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !f() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func findAgent(m *nanite.Mapper, id string) (nanite.AgentState, bool) {
	for _, a := range m.Agents() {
		if a.Identity == id {
			return a, true
		}
	}
	return nanite.AgentState{}, false
}

// rawAgent is a minimal agent written from docs/protocol.md alone.
type rawAgent struct {
	t     *testing.T
	id    string
	queue string
	ch    *amqp.Channel

	heartbeats atomic.Bool // send heartbeats while true

	mu         sync.Mutex
	requests   []amqp.Delivery // every request and push received
	advertises []string        // the exchange each advertise came through
	wg         sync.WaitGroup
}

const rawHeartbeatMS = 300

var rawServices = []map[string]any{
	{"name": "/raw/echo", "idempotent": true},
	{"name": "/raw/stream"},
	// Registered but not served: an agent that lost an actor since it
	// registered. Requests for it get the unknown_service error.
	{"name": "/raw/retired"},
}

func startRawAgent(t *testing.T, url, id string) *rawAgent {
	conn, ch := rawDial(t, url)
	rawTopology(t, ch)
	a := &rawAgent{t: t, id: id, ch: ch}
	a.queue = rawAgentQueue(t, ch, id)
	if err := ch.QueueBind(a.queue, "", wireAdvertise, false, nil); err != nil {
		t.Fatalf("bind agent queue to %s: %v", wireAdvertise, err)
	}
	rawReplyQueue(t, ch, id)
	ds := rawConsume(t, conn, a.queue, false)

	a.register()
	a.heartbeats.Store(true)
	a.wg.Add(2)
	go a.serve(ds)
	done := make(chan struct{})
	go a.heartbeat(done)
	t.Cleanup(func() {
		close(done)
		_ = conn.Close() // ends serve
		a.wg.Wait()
	})
	return a
}

func (a *rawAgent) state(kind string) map[string]any {
	p := map[string]any{"v": 1, "packet": kind, "identity": a.id, "from": a.id,
		"status": 0.25, "sent_at": time.Now().UnixMilli()}
	if kind == "register" {
		p["queue"] = a.queue
		p["services"] = rawServices
		p["tags"] = []string{"raw", "lang:none"}
		p["heartbeat_ms"] = rawHeartbeatMS
		p["agent_version"] = "raw-0"
	}
	return p
}

func (a *rawAgent) register() {
	body := rawPublish(a.t, a.ch, wireRegistration, "", false, amqp.Publishing{}, a.state("register"))
	a.t.Logf("wire register (raw agent): %s", body)
}

func (a *rawAgent) unregister() {
	rawPublish(a.t, a.ch, wireRegistration, "", false, amqp.Publishing{}, a.state("unregister"))
}

func (a *rawAgent) heartbeat(done <-chan struct{}) {
	defer a.wg.Done()
	tick := time.NewTicker(rawHeartbeatMS * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			if a.heartbeats.Load() {
				rawPublish(a.t, a.ch, wireHeartbeat, "", false, amqp.Publishing{}, a.state("heartbeat"))
			}
		}
	}
}

func (a *rawAgent) reply(replyTo string, packet map[string]any) {
	token, _ := packet["token"].(string)
	rawPublish(a.t, a.ch, "", replyTo, false, amqp.Publishing{CorrelationId: token}, packet)
}

func (a *rawAgent) serve(ds <-chan amqp.Delivery) {
	defer a.wg.Done()
	for d := range ds {
		var p map[string]any
		if err := json.Unmarshal(d.Body, &p); err != nil {
			a.t.Errorf("raw agent: bad packet: %v", err)
			_ = d.Ack(false)
			continue
		}
		switch p["packet"] {
		case "advertise":
			a.mu.Lock()
			a.advertises = append(a.advertises, d.Exchange)
			a.mu.Unlock()
			a.t.Logf("wire advertise (via exchange %q): %s", d.Exchange, d.Body)
			a.register()
		case "request", "push":
			a.mu.Lock()
			a.requests = append(a.requests, d)
			a.mu.Unlock()
			a.handle(p)
		default:
			a.t.Errorf("raw agent: unexpected packet %v on its queue", p["packet"])
		}
		_ = d.Ack(false) // after handling: at-least-once
	}
}

func (a *rawAgent) handle(p map[string]any) {
	token, _ := p["token"].(string)
	replyTo, _ := p["reply_to"].(string)
	if p["packet"] == "push" || replyTo == "" {
		return // a push is never answered
	}
	result := map[string]any{"v": 1, "packet": "result", "token": token, "from": a.id}
	switch p["type"] {
	case "/raw/echo":
		result["payload"] = p["payload"]
	case "/raw/stream":
		a.reply(replyTo, map[string]any{"v": 1, "packet": "intermediate", "token": token, "from": a.id,
			"key": "progress", "payload": 50})
		result["payload"] = map[string]any{"done": true}
	default:
		result["error"] = map[string]any{"code": "unknown_service",
			"message": "agent " + a.id + " does not offer " + p["type"].(string)}
	}
	a.reply(replyTo, result)
}

func (a *rawAgent) lastRequest() amqp.Delivery {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.requests) == 0 {
		a.t.Fatal("raw agent received no request")
	}
	return a.requests[len(a.requests)-1]
}

func (a *rawAgent) advertisedVia(exchange string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Contains(a.advertises, exchange)
}

func startMapper(t *testing.T, cfg nanite.MapperConfig) *nanite.Mapper {
	t.Helper()
	m, err := nanite.NewMapper(cfg)
	if err != nil {
		t.Fatal(err)
	}
	background(t, "mapper "+m.Identity(), m.Run)
	return m
}

// TestProtocolRawAgent: an agent written from the document alone registers,
// heartbeats, answers a nanite.Mapper's requests (with an intermediate
// result and an error), leaves, is asked to advertise itself again, and is
// dropped when it goes silent.
func TestProtocolRawAgent(t *testing.T) {
	url := testenv.Rabbit(t).NewVhost(t)
	ctx := t.Context()
	m := startMapper(t, nanite.MapperConfig{URL: url, Warmup: 200 * time.Millisecond})
	raw := startRawAgent(t, url, "raw-agent-1")

	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := m.WaitForAgents(wctx, "/raw/echo", 1); err != nil {
		t.Fatal(err)
	}

	t.Run("registered", func(t *testing.T) {
		st, ok := findAgent(m, raw.id)
		if !ok {
			t.Fatalf("mapper does not list %s: %+v", raw.id, m.Agents())
		}
		want := []nanite.ServiceInfo{{Name: "/raw/echo", Idempotent: true}, {Name: "/raw/stream"}, {Name: "/raw/retired"}}
		if !reflect.DeepEqual(st.Services, want) {
			t.Errorf("services = %+v, want %+v", st.Services, want)
		}
		if !reflect.DeepEqual(st.Tags, []string{"raw", "lang:none"}) {
			t.Errorf("tags = %v", st.Tags)
		}
		if st.Queue != "nanite.agent.raw-agent-1" || st.Status != 0.25 || st.Version != "raw-0" ||
			st.Heartbeat != rawHeartbeatMS*time.Millisecond {
			t.Errorf("agent state = %+v", st)
		}
	})

	t.Run("request", func(t *testing.T) {
		resp, err := m.Request(ctx, "/raw/echo", map[string]string{"hello": "world"}, nanite.WithTimeout(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		var got map[string]string
		if err := resp.Decode(&got); err != nil || got["hello"] != "world" {
			t.Errorf("result = %v, %v", got, err)
		}
		if resp.Results[0].Agent != raw.id {
			t.Errorf("answered by %q", resp.Results[0].Agent)
		}

		// What the mapper put on the wire, as the document says.
		d := raw.lastRequest()
		p := rawPacket(t, d.Body)
		t.Logf("wire request: %s", d.Body)
		// The reply queue is named after the mapper's instance: its
		// identity, a dot and a per-process suffix.
		replyTo, _ := p["reply_to"].(string)
		if !strings.HasPrefix(replyTo, "nanite.reply."+m.Identity()+".") {
			t.Errorf("reply_to %q is not the mapper instance's reply queue", replyTo)
		}
		if p["packet"] != "request" || p["type"] != "/raw/echo" || p["from"] != m.Identity() ||
			p["reply_to"] != replyTo || p["selector"] != "least_loaded" || p["token"] != resp.Token {
			t.Errorf("request packet = %v", p)
		}
		// No type and no nanite-reply-to on a request to an agent queue.
		if d.CorrelationId != resp.Token || d.ReplyTo != replyTo || d.Type != "" ||
			d.ContentType != "application/json" || len(d.Headers) != 0 {
			t.Errorf("request properties: correlation_id %q reply_to %q type %q content_type %q headers %v",
				d.CorrelationId, d.ReplyTo, d.Type, d.ContentType, d.Headers)
		}
		if d.DeliveryMode == amqp.Persistent {
			t.Errorf("a non-persistent request has delivery_mode 2")
		}
		ms, err := strconv.ParseInt(d.Expiration, 10, 64)
		if err != nil || ms <= 0 || ms > 5000 {
			t.Errorf("expiration = %q, want milliseconds until the deadline (<= 5000)", d.Expiration)
		}
		deadline, _ := p["deadline"].(float64)
		if left := time.Until(time.UnixMilli(int64(deadline))); left <= 0 || left > 5*time.Second {
			t.Errorf("deadline %v is %v away", p["deadline"], left)
		}
	})

	t.Run("persistent", func(t *testing.T) {
		if _, err := m.Request(ctx, "/raw/echo", "kept", nanite.Persistent(), nanite.WithTags("raw")); err != nil {
			t.Fatal(err)
		}
		d := raw.lastRequest()
		p := rawPacket(t, d.Body)
		t.Logf("wire persistent request: %s", d.Body)
		if d.DeliveryMode != amqp.Persistent || p["persistent"] != true {
			t.Errorf("persistent request: delivery_mode %d, packet %v", d.DeliveryMode, p)
		}
		if tags, _ := p["tags"].([]any); len(tags) != 1 || tags[0] != "raw" {
			t.Errorf("tags = %v", p["tags"])
		}
	})

	t.Run("intermediate", func(t *testing.T) {
		var mu sync.Mutex
		var inter []nanite.Intermediate
		resp, err := m.Request(ctx, "/raw/stream", nil, nanite.OnIntermediate(func(i nanite.Intermediate) {
			mu.Lock()
			inter = append(inter, i)
			mu.Unlock()
		}))
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(inter) != 1 || inter[0].Agent != raw.id || inter[0].Key != "progress" || string(inter[0].Payload) != "50" {
			t.Errorf("intermediate results = %+v", inter)
		}
		if string(resp.Results[0].Payload) != `{"done":true}` {
			t.Errorf("final result = %s", resp.Results[0].Payload)
		}
	})

	t.Run("unknown service", func(t *testing.T) {
		_, err := m.Request(ctx, "/raw/retired", nil)
		var re *nanite.RemoteError
		if !errors.As(err, &re) || re.Code != nanite.CodeUnknown || re.Agent != raw.id {
			t.Fatalf("err = %v, want a RemoteError %s from %s", err, nanite.CodeUnknown, raw.id)
		}
	})

	t.Run("push", func(t *testing.T) {
		raw.mu.Lock()
		n := len(raw.requests)
		raw.mu.Unlock()
		if err := m.Push(ctx, "/raw/echo", "fire and forget"); err != nil {
			t.Fatal(err)
		}
		eventuallyTrue(t, "push arrives", 5*time.Second, func() bool {
			raw.mu.Lock()
			defer raw.mu.Unlock()
			return len(raw.requests) > n
		})
		d := raw.lastRequest()
		p := rawPacket(t, d.Body)
		t.Logf("wire push: %s", d.Body)
		if p["packet"] != "push" || p["reply_to"] != nil || d.ReplyTo != "" || p["token"] == nil {
			t.Errorf("push packet = %v (reply_to property %q)", p, d.ReplyTo)
		}
	})

	t.Run("heartbeats keep it", func(t *testing.T) {
		time.Sleep(5 * rawHeartbeatMS * time.Millisecond)
		st, ok := findAgent(m, raw.id)
		if !ok || time.Since(st.LastSeen) > 3*rawHeartbeatMS*time.Millisecond {
			t.Fatalf("agent after 5 heartbeat intervals: %+v (listed: %v)", st, ok)
		}
	})

	t.Run("unregister then advertise", func(t *testing.T) {
		raw.heartbeats.Store(false)
		time.Sleep(100 * time.Millisecond) // let a heartbeat being sent land before the unregister
		raw.unregister()
		eventuallyTrue(t, "unregistered agent dropped", 5*time.Second, func() bool {
			_, ok := findAgent(m, raw.id)
			return !ok
		})
		// A heartbeat from an agent the mapper does not know makes it send
		// an advertise packet straight to the agent's queue; the agent
		// answers by registering again.
		raw.heartbeats.Store(true)
		eventuallyTrue(t, "agent registered again after advertise", 5*time.Second, func() bool {
			_, ok := findAgent(m, raw.id)
			return ok
		})
		if !raw.advertisedVia("") {
			t.Errorf("no advertise came through the default exchange")
		}
	})

	t.Run("new mapper advertises", func(t *testing.T) {
		m2 := startMapper(t, nanite.MapperConfig{URL: url})
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := m2.WaitForAgents(wctx, "/raw/stream", 1); err != nil {
			t.Fatal(err)
		}
		eventuallyTrue(t, "advertise through the fanout", 5*time.Second, func() bool { return raw.advertisedVia(wireAdvertise) })
	})

	t.Run("silent agent dropped", func(t *testing.T) {
		raw.heartbeats.Store(false)
		took := eventuallyTrue(t, "silent agent dropped", 5*time.Second, func() bool {
			_, ok := findAgent(m, raw.id)
			return !ok
		})
		// Three heartbeat intervals (at least one second) without a packet.
		if took < 500*time.Millisecond {
			t.Errorf("dropped after %v, sooner than the timeout", took)
		}
	})
}

// TestProtocolRawRequester: a requester written from the document alone
// learns a real nanite.Agent from its registration, sends it requests on its
// queue and reads results, intermediate results and errors from its own reply
// queue; it also sees the broker's dead-lettering and returns, and makes an
// agent-originated request through a mapper daemon.
func TestProtocolRawRequester(t *testing.T) {
	url := testenv.Rabbit(t).NewVhost(t)
	ctx := t.Context()

	var adds atomic.Int64
	agent, err := nanite.NewAgent(nanite.AgentConfig{URL: url, Identity: "go-agent-1", Tags: []string{"go"},
		HeartbeatInterval: rawHeartbeatMS * time.Millisecond, Status: func() float64 { return 0.5 }})
	if err != nil {
		t.Fatal(err)
	}
	agent.AddActor(nanite.NewActor("calc").Expose("add", func(ctx context.Context, r *nanite.Request) (any, error) {
		adds.Add(1)
		var in struct{ A, B int }
		if err := r.Decode(&in); err != nil {
			return nil, err
		}
		if err := r.Intermediate(ctx, "step", "adding"); err != nil {
			return nil, err
		}
		return map[string]int{"sum": in.A + in.B}, nil
	}, nanite.Idempotent()))

	const me = "raw-requester-1"
	conn, ch := rawDial(t, url)
	rawTopology(t, ch)
	replyQ := rawReplyQueue(t, ch, me)
	regs := rawConsume(t, conn, rawStateQueue(t, ch, wireRegistration), true)
	beats := rawConsume(t, conn, rawStateQueue(t, ch, wireHeartbeat), true)
	replies := rawConsume(t, conn, replyQ, true)
	returns := ch.NotifyReturn(make(chan amqp.Return, 4))

	stopAgent := background(t, "agent", agent.Run)
	// A mapper daemon for the agent-originated request below.
	daemon := startMapper(t, nanite.MapperConfig{URL: url, ServeAgentRequests: true, ServeFailsafe: true})

	var agentQ string
	t.Run("register", func(t *testing.T) {
		// The agent registers when it connects; an advertise makes it (and
		// every other agent) register again.
		rawPublish(t, ch, wireAdvertise, "", false, amqp.Publishing{}, map[string]any{"v": 1, "packet": "advertise", "from": me})
		d, p := rawNext(t, regs, "register", isKindFrom("register", "go-agent-1"))
		agentQ, _ = p["queue"].(string)
		if agentQ != "nanite.agent.go-agent-1" || p["from"] != "go-agent-1" || p["status"] != 0.5 ||
			p["heartbeat_ms"] != float64(rawHeartbeatMS) || p["agent_version"] == nil || p["sent_at"] == nil {
			t.Errorf("register packet = %v", p)
		}
		if d.Type != "register" || d.ContentType != "application/json" {
			t.Errorf("register properties: type %q content_type %q", d.Type, d.ContentType)
		}
		var services []string
		for _, s := range p["services"].([]any) {
			svc := s.(map[string]any)
			services = append(services, svc["name"].(string))
			if svc["name"] == "/calc/add" && svc["idempotent"] != true {
				t.Errorf("/calc/add not idempotent: %v", svc)
			}
		}
		if !slices.Contains(services, "/calc/add") || !slices.Contains(services, "/nanite/ping") {
			t.Errorf("services = %v", services)
		}
		if tags, _ := p["tags"].([]any); len(tags) != 1 || tags[0] != "go" {
			t.Errorf("tags = %v", p["tags"])
		}
	})
	if agentQ == "" {
		t.FailNow()
	}

	t.Run("declarations are equivalent", func(t *testing.T) {
		// Another client re-declares the agent's queue as the document
		// says, with x-expires as a 32-bit integer (what most clients send
		// for 86400000): the broker must accept it as the same queue.
		c, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.QueueDeclare(agentQ, true, false, false, false, amqp.Table{
			"x-dead-letter-exchange": wireDead, "x-expires": int32(86400000),
		}); err != nil {
			t.Fatalf("re-declaring %s as documented: %v", agentQ, err)
		}
		rawTopology(t, c)
	})

	t.Run("heartbeat", func(t *testing.T) {
		_, p := rawNext(t, beats, "heartbeat", isKindFrom("heartbeat", "go-agent-1"))
		if p["status"] != 0.5 || p["services"] != nil {
			t.Errorf("heartbeat packet = %v", p)
		}
	})

	request := func(token, service string, payload any, deadline time.Time) map[string]any {
		p := map[string]any{"v": 1, "packet": "request", "type": service, "from": me,
			"token": token, "reply_to": replyQ, "deadline": deadline.UnixMilli()}
		if payload != nil {
			p["payload"] = payload
		}
		return p
	}
	send := func(t *testing.T, queue string, p map[string]any, expiration string) {
		body := rawPublish(t, ch, "", queue, true, amqp.Publishing{
			CorrelationId: p["token"].(string), ReplyTo: replyQ, Expiration: expiration,
			Headers: amqp.Table{wireReplyHeader: replyQ}, DeliveryMode: amqp.Persistent,
		}, p)
		t.Logf("wire request (raw): %s", body)
	}
	resultFor := func(token string) func(amqp.Delivery, map[string]any) bool {
		return func(d amqp.Delivery, p map[string]any) bool { return p["token"] == token && p["packet"] == "result" }
	}

	var firstAnswer []byte
	t.Run("request", func(t *testing.T) {
		send(t, agentQ, request("tok-1", "/calc/add", map[string]int{"a": 2, "b": 3}, time.Now().Add(10*time.Second)), "10000")
		d, p := rawNext(t, replies, "intermediate", func(_ amqp.Delivery, p map[string]any) bool { return p["token"] == "tok-1" })
		if p["packet"] != "intermediate" || p["key"] != "step" || p["payload"] != "adding" || p["from"] != "go-agent-1" ||
			d.CorrelationId != "tok-1" || d.Type != "" {
			t.Errorf("intermediate = %v (correlation_id %q, type %q)", p, d.CorrelationId, d.Type)
		}
		d, p = rawNext(t, replies, "result", resultFor("tok-1"))
		if sum := p["payload"].(map[string]any)["sum"]; sum != 5.0 || p["from"] != "go-agent-1" || p["error"] != nil {
			t.Errorf("result = %v", p)
		}
		if d.CorrelationId != "tok-1" || d.Type != "" || d.ContentType != "application/json" {
			t.Errorf("result properties: correlation_id %q type %q content_type %q", d.CorrelationId, d.Type, d.ContentType)
		}
		firstAnswer = d.Body
	})

	t.Run("duplicate answered from cache", func(t *testing.T) {
		// The same token again (a redelivery or a retry): the agent answers
		// with the result it already sent and does not run the handler.
		send(t, agentQ, request("tok-1", "/calc/add", map[string]int{"a": 2, "b": 3}, time.Now().Add(10*time.Second)), "10000")
		d, _ := rawNext(t, replies, "result (duplicate)", resultFor("tok-1"))
		if string(d.Body) != string(firstAnswer) {
			t.Errorf("duplicate answered %s, first answer was %s", d.Body, firstAnswer)
		}
		if n := adds.Load(); n != 1 {
			t.Errorf("handler ran %d times, want 1", n)
		}
	})

	t.Run("unknown service", func(t *testing.T) {
		send(t, agentQ, request("tok-2", "/calc/nope", nil, time.Now().Add(10*time.Second)), "10000")
		_, p := rawNext(t, replies, "result (unknown service)", resultFor("tok-2"))
		if e, _ := p["error"].(map[string]any); e == nil || e["code"] != "unknown_service" || e["message"] == "" {
			t.Errorf("result = %v", p)
		}
	})

	t.Run("handler error", func(t *testing.T) {
		send(t, agentQ, request("tok-3", "/calc/add", "not an object", time.Now().Add(10*time.Second)), "10000")
		_, p := rawNext(t, replies, "result (handler error)", resultFor("tok-3"))
		if e, _ := p["error"].(map[string]any); e == nil || e["code"] != "handler_error" {
			t.Errorf("result = %v", p)
		}
	})

	t.Run("deadline passed", func(t *testing.T) {
		// No AMQP expiration, so the broker delivers it; the agent sees the
		// deadline has passed and does not run it.
		before := adds.Load()
		send(t, agentQ, request("tok-4", "/calc/add", map[string]int{}, time.Now().Add(-time.Second)), "")
		_, p := rawNext(t, replies, "result (expired)", resultFor("tok-4"))
		if e, _ := p["error"].(map[string]any); e == nil || e["code"] != "expired" {
			t.Errorf("result = %v", p)
		}
		if adds.Load() != before {
			t.Errorf("the handler ran an expired request")
		}
	})

	t.Run("push", func(t *testing.T) {
		before := adds.Load()
		body := rawPublish(t, ch, "", agentQ, true, amqp.Publishing{CorrelationId: "tok-5"},
			map[string]any{"v": 1, "packet": "push", "type": "/calc/add", "from": me, "token": "tok-5",
				"payload": map[string]int{"a": 1, "b": 1}})
		t.Logf("wire push (raw): %s", body)
		eventuallyTrue(t, "push handled", 5*time.Second, func() bool { return adds.Load() == before+1 })
	})

	t.Run("dead-lettered back to the requester", func(t *testing.T) {
		// The queue of an agent that died: nobody consumes it. The request
		// expires there and the broker routes it back through nanite.dead.
		ghostQ := rawAgentQueue(t, ch, "ghost-agent-1")
		send(t, ghostQ, request("tok-6", "/calc/add", nil, time.Now().Add(200*time.Millisecond)), "200")
		d, p := rawNext(t, replies, "dead-lettered request", func(_ amqp.Delivery, p map[string]any) bool { return p["token"] == "tok-6" })
		deaths, _ := d.Headers["x-death"].([]any)
		if p["packet"] != "request" || len(deaths) == 0 {
			t.Fatalf("dead-lettered delivery: packet %v, headers %v", p, d.Headers)
		}
		if death := deaths[0].(amqp.Table); death["reason"] != "expired" || death["queue"] != ghostQ {
			t.Errorf("x-death = %v", death)
		}
	})

	t.Run("mandatory return", func(t *testing.T) {
		send(t, "nanite.agent.nobody", request("tok-7", "/calc/add", nil, time.Now().Add(5*time.Second)), "5000")
		select {
		case r := <-returns:
			if r.ReplyCode != amqp.NoRoute || r.CorrelationId != "tok-7" || r.RoutingKey != "nanite.agent.nobody" {
				t.Errorf("return = code %d %q, correlation_id %q, key %q", r.ReplyCode, r.ReplyText, r.CorrelationId, r.RoutingKey)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no basic.return for a request to a queue that does not exist")
		}
	})

	t.Run("agent-originated request", func(t *testing.T) {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := daemon.WaitForAgents(wctx, "/calc/add", 1); err != nil {
			t.Fatal(err)
		}
		p := request("tok-8", "/calc/add", map[string]int{"a": 20, "b": 22}, time.Now().Add(10*time.Second))
		p["selector"] = "all"
		p["tags"] = []string{"go"}
		send(t, wireMapperQueue, p, "10000")
		_, res := rawNext(t, replies, "aggregated result", resultFor("tok-8"))
		if res["from"] != daemon.Identity() {
			t.Errorf("aggregated result from %v, want the mapper %s", res["from"], daemon.Identity())
		}
		results, _ := res["results"].([]any)
		if len(results) != 1 {
			t.Fatalf("results = %v", res["results"])
		}
		r := results[0].(map[string]any)
		if r["agent"] != "go-agent-1" || r["payload"].(map[string]any)["sum"] != 42.0 {
			t.Errorf("results[0] = %v", r)
		}
	})

	t.Run("unregister", func(t *testing.T) {
		stopAgent()
		_, p := rawNext(t, regs, "unregister", isKindFrom("unregister", "go-agent-1"))
		if p["from"] != "go-agent-1" {
			t.Errorf("unregister packet = %v", p)
		}
	})
}
