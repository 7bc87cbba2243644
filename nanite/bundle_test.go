package nanite

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

type bundlePart struct {
	corr string
	body []byte
}

func TestBundleParts(t *testing.T) {
	parts := []bundlePart{{"t1", []byte(`{"v":1}`)}, {"", nil}, {"t3", bytes.Repeat([]byte{0, 0xff}, 200)}}
	var b []byte
	for _, p := range parts {
		b = appendBundlePart(b, p.corr, p.body)
	}
	var got []bundlePart
	if err := splitBundle(b, func(corr string, body []byte) { got = append(got, bundlePart{corr, body}) }); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(parts) {
		t.Fatalf("got %d parts, want %d", len(got), len(parts))
	}
	for i := range parts {
		if got[i].corr != parts[i].corr || !bytes.Equal(got[i].body, parts[i].body) {
			t.Errorf("part %d: got %q %q, want %q %q", i, got[i].corr, got[i].body, parts[i].corr, parts[i].body)
		}
	}
	var many []byte
	for range maxBundlePartsRead + 1 {
		many = appendBundlePart(many, "", nil)
	}
	for _, bad := range [][]byte{
		many,                            // more parts than a reader takes
		nil,                             // no part at all
		b[:len(b)-1],                    // the last body cut short
		append(b[:len(b):len(b)], 0x80), // a length whose varint never ends
		{2, 'a'},                        // a correlation id cut short
		{1, 'a', 5, 'x'},                // a body cut short
		{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, // a huge length
	} {
		calls := 0
		if err := splitBundle(bad, func(string, []byte) { calls++ }); err == nil || calls != 0 {
			t.Errorf("splitBundle(%x): err %v after %d parts, want an error before any", bad, err, calls)
		}
	}
}

func FuzzSplitBundle(f *testing.F) {
	f.Add(appendBundlePart(appendBundlePart(nil, "a", []byte("x")), "b", nil))
	f.Add([]byte{0x80})
	f.Fuzz(func(t *testing.T, b []byte) {
		var again []byte
		if err := splitBundle(b, func(corr string, body []byte) { again = appendBundlePart(again, corr, body) }); err != nil {
			return
		}
		// What splits reads back the same parts when written again
		// (varints may have been written longer than needed).
		var n, m int
		_ = splitBundle(again, func(string, []byte) { n++ })
		_ = splitBundle(b, func(string, []byte) { m++ })
		if n != m {
			t.Fatalf("%d parts written back as %d", m, n)
		}
	})
}

// TestBundlesSplitForReaders: a consumer that reads bundles gets each answer
// of one as a delivery with its correlation id; a malformed bundle is
// dropped whole; plain messages pass as they are.
func TestBundlesSplitForReaders(t *testing.T) {
	c := newCluster(t)
	id := NewIdentity("reader")
	got := make(chan delivery, 16)
	l := replyReader(t, c.url, id, consumerSpec{Bundles: true, Handle: func(d delivery) { got <- d }})
	pub := func(m message) {
		t.Helper()
		m.Key = ReplyQueue(id)
		if err := l.publish(t.Context(), m); err != nil {
			t.Fatal(err)
		}
	}
	var b []byte
	for i := range 3 {
		b = appendBundlePart(b, fmt.Sprintf("t%d", i), []byte(fmt.Sprintf(`{"n":%d}`, i)))
	}
	pub(message{Body: b, Type: BundleType, ContentType: BundleContentType})
	pub(message{Body: []byte{5, 'x'}, Type: BundleType, ContentType: BundleContentType})
	pub(message{Body: []byte(`{"n":9}`), CorrelationID: "plain"})
	want := []struct{ corr, body string }{{"t0", `{"n":0}`}, {"t1", `{"n":1}`}, {"t2", `{"n":2}`}, {"plain", `{"n":9}`}}
	for _, w := range want {
		select {
		case d := <-got:
			if d.CorrelationID != w.corr || string(d.Body) != w.body || d.Type == BundleType {
				t.Fatalf("got %q %s (type %q), want %q %s", d.CorrelationID, d.Body, d.Type, w.corr, w.body)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no delivery for %q", w.corr)
		}
	}
	select {
	case d := <-got:
		t.Fatalf("unexpected delivery %q %q", d.CorrelationID, d.Body)
	case <-time.After(200 * time.Millisecond):
	}
}

// replyReader starts a link that declares the reply queue of id and
// consumes it (auto-ack) with spec; it stops when the test ends.
func replyReader(t *testing.T, url, id string, spec consumerSpec) *link {
	t.Helper()
	spec.Queue, spec.AutoAck = ReplyQueue(id), true
	l := newLink(linkConfig{URL: url, Name: "reader " + id, Logger: testLogger(t),
		Setup: func(tp topology) error {
			if err := declareCommon(tp); err != nil {
				return err
			}
			return declareReplyQueue(tp, id)
		},
		Consumers: []consumerSpec{spec},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = l.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	wctx, wcancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer wcancel()
	if err := l.waitReady(wctx); err != nil {
		t.Fatal(err)
	}
	return l
}

// rawAnswers reads an agent's answers off the wire: each bundle split by
// hand, so that a test sees how they came.
type rawAnswers struct {
	mu      sync.Mutex
	byToken map[string][]byte
	dups    int
	bundles int
	plain   int
	bad     int
	all     chan struct{}
	want    int
}

func (r *rawAnswers) handle(d delivery) {
	r.mu.Lock()
	defer r.mu.Unlock()
	add := func(corr string, body []byte) {
		if _, ok := r.byToken[corr]; ok {
			r.dups++
		}
		r.byToken[corr] = append([]byte(nil), body...)
	}
	if d.Type == BundleType {
		r.bundles++
		if err := splitBundle(d.Body, add); err != nil {
			r.bad++
		}
	} else {
		r.plain++
		add(d.CorrelationID, d.Body)
	}
	if len(r.byToken) == r.want {
		select {
		case <-r.all:
		default:
			close(r.all)
		}
	}
}

// TestReplyBundles: an agent answers requests that came together, in its
// delivery loop and from handlers in goroutines of their own, in bundles
// when the requests say their requester reads them, never otherwise; every
// answer arrives once, intact, and every request is acknowledged after its
// answer is sent (none is back in the queue once the agent has stopped).
func TestReplyBundles(t *testing.T) {
	c := newCluster(t)
	gate := make(chan struct{})
	actor := NewActor("b").
		Expose("quick", func(_ context.Context, r *Request) (any, error) { return r.Payload, nil }).
		Expose("gated", func(ctx context.Context, r *Request) (any, error) {
			if string(r.Payload) == `"warm-up"` {
				time.Sleep(10 * quickHandler) // the method is slow from now on
				return r.Payload, nil
			}
			select {
			case <-gate:
			case <-ctx.Done():
			}
			return r.Payload, nil
		})
	identity := NewIdentity("bundler")
	l, _, _ := rawRequester(t, c.url)
	// Read the answers off the wire, each bundle split by hand.
	answers := &rawAnswers{}
	answersQ := ReplyQueue(identity + "-answers")
	replyReader(t, c.url, identity+"-answers", consumerSpec{Handle: answers.handle})
	// The agent's queue, made by a first run of it.
	_, stop := c.agent(AgentConfig{Identity: identity}, actor)
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/b/quick", 1)
	stop()

	expect := func(n int) {
		answers.mu.Lock()
		answers.byToken, answers.want, answers.all = map[string][]byte{}, n, make(chan struct{})
		answers.dups, answers.bundles, answers.plain, answers.bad = 0, 0, 0, 0
		answers.mu.Unlock()
	}
	publish := func(service, token, payload string, bundles bool) {
		t.Helper()
		body, _ := (&Packet{Kind: KindRequest, Type: service, Payload: json.RawMessage(payload),
			Token: token, ReplyTo: answersQ, Bundles: bundles, Deadline: time.Now().Add(time.Minute).UnixMilli()}).Encode()
		if err := l.publish(t.Context(), message{Key: AgentQueue(identity), Body: body, CorrelationID: token, ReplyTo: answersQ}); err != nil {
			t.Fatal(err)
		}
	}
	// check waits for the answers, stops the agent and checks them.
	check := func(name string, stop func(), payloads map[string]string) {
		t.Helper()
		select {
		case <-answers.all:
		case <-time.After(20 * time.Second):
			answers.mu.Lock()
			defer answers.mu.Unlock()
			t.Fatalf("%s: %d answers of %d", name, len(answers.byToken), answers.want)
		}
		stop()
		time.Sleep(100 * time.Millisecond) // a duplicate would be here by now
		answers.mu.Lock()
		defer answers.mu.Unlock()
		if answers.dups != 0 || answers.bad != 0 || len(answers.byToken) != len(payloads) {
			t.Fatalf("%s: %d answers of %d, %d duplicates, %d malformed bundles", name, len(answers.byToken), len(payloads), answers.dups, answers.bad)
		}
		for token, body := range answers.byToken {
			p, err := DecodePacket(body, 0)
			if err != nil || p.Token != token || p.Error != nil || string(p.Payload) != payloads[token] {
				t.Fatalf("%s: answer for %s: %s (%v), want payload %s", name, token, body, err, payloads[token])
			}
		}
		// Stopped, the agent has closed its channel: a delivery it had
		// not acknowledged would be back in its queue now.
		if n := queueLength(t, c.url, AgentQueue(identity)); n != 0 {
			t.Fatalf("%s: %d requests back in the agent's queue: acknowledgements lost", name, n)
		}
	}
	backlog := func(name, prefix string, bundles bool) {
		t.Helper()
		const n = 48
		expect(n)
		payloads := map[string]string{}
		for i := range n {
			token, payload := fmt.Sprintf("%s-%d", prefix, i), fmt.Sprintf(`{"i":%d}`, i)
			payloads[token] = payload
			publish("/b/quick", token, payload, bundles)
		}
		_, stop := c.agent(AgentConfig{Identity: identity}, actor)
		check(name, stop, payloads)
	}

	// In the delivery loop: a backlog of quick requests.
	backlog("quick, bundles read", "q", true)
	if answers.bundles == 0 {
		t.Errorf("48 quick requests at once were answered without a bundle (%d plain messages)", answers.plain)
	}
	backlog("quick, bundles not read", "n", false)
	if answers.bundles != 0 {
		t.Errorf("%d bundles sent to a requester that did not say it reads them", answers.bundles)
	}

	// Outside the loop: once the method is known to be slow, its requests
	// run in goroutines of their own; released at once, they answer
	// together.
	const n = 16
	expect(n + 1)
	a, stop := c.agent(AgentConfig{Identity: identity}, actor)
	payloads := map[string]string{"warm-up": `"warm-up"`}
	publish("/b/gated", "warm-up", `"warm-up"`, true)
	waitFor(t, "the warm-up answer", func() bool {
		answers.mu.Lock()
		defer answers.mu.Unlock()
		return len(answers.byToken) == 1
	})
	for i := range n {
		token, payload := fmt.Sprintf("g-%d", i), fmt.Sprintf(`{"g":%d}`, i)
		payloads[token] = payload
		publish("/b/gated", token, payload, true)
	}
	waitFor(t, "the gated requests in flight", func() bool { return a.Stats()["in_flight"] == n })
	close(gate)
	check("gated, bundles read", stop, payloads)
	if answers.bundles == 0 || a.Stats()["bundled_results"] == 0 {
		t.Errorf("%d requests answered at once from their goroutines without a bundle (%d plain messages)", n, answers.plain)
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// queueLength is the number of messages ready in queue.
func queueLength(t *testing.T, url, queue string) int {
	t.Helper()
	conn, err := amqp.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, amqp.Table(agentQueueSpec("").Args))
	if err != nil {
		t.Fatal(err)
	}
	return q.Messages
}
