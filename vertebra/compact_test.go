package vertebra

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp/component"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/vertebra/values"
)

// TestCompactOp: a caller sends <op> to a peer it knows nothing of, and
// <call> once the peer answered with <done>; the op it stands for arrives
// whole (arguments as JSON, deadline, request id, selector, hop record,
// persistence). A peer that answers <done> but refuses <call> (an older
// one) gets the op again as <op>, and <op> from then on. Both peers are
// components on a real prosody, speaking the protocol by hand.
func TestCompactOp(t *testing.T) {
	p := runProsody(t)
	type got struct {
		kind string // "op" or "call"
		el   *Element
	}
	var mu sync.Mutex
	var received []got
	// peer answers every op with a <done> echoing the arguments; with
	// readsCall it also serves <call>.
	peer := func(readsCall bool) (stop func()) {
		s, err := Dial(ctxTimeout(t, 5*time.Second), DialConfig{JID: jid.MustParse(testComponent2), Secret: testSecret, Addr: p.ComponentAddr()})
		if err != nil {
			t.Fatal(err)
		}
		answer := func(kind string) mux.IQHandlerFunc {
			return func(iq stanza.IQ, tr xmlstream.TokenReadEncoder, start *xml.StartElement) error {
				var el *Element
				var err error
				if kind == "call" {
					el, err = DecodeCall(tr, *start, values.DefaultLimits)
				} else {
					el, err = DecodeElement(tr, *start, values.DefaultLimits)
				}
				if err != nil {
					return writeIQError(tr, iq, stanza.Modify, stanza.BadRequest, err.Error())
				}
				mu.Lock()
				received = append(received, got{kind, el})
				mu.Unlock()
				return writeIQResult(tr, iq, AppendDone(nil, el.Token+":S", "", el.Payload))
			}
		}
		opts := []mux.Option{mux.IQ(stanza.SetIQ, xml.Name{Space: NS, Local: "op"}, answer("op"))}
		if readsCall {
			opts = append(opts, mux.IQ(stanza.SetIQ, callName, answer("call")))
		}
		done := make(chan struct{})
		go func() { _ = s.Serve(mux.New(component.NSAccept, opts...)); close(done) }()
		var once sync.Once
		stop = func() { once.Do(func() { _ = s.Close(); _ = s.Conn().Close(); <-done }) }
		t.Cleanup(stop)
		return stop
	}
	caller := NewEndpoint(Config{})
	startConn(t, componentDial(p), caller)
	hop := Hop{By: "nanite.site-z.test", At: time.Date(2026, 1, 2, 3, 4, 5, 6000, time.UTC)}
	meta := Meta{RequestID: "r-1", Selector: "rr", Hops: []Hop{hop}, Persistent: true}
	args := json.RawMessage(`{"n":[1,2.50,"x<&>'\""],"b":true}`)
	call := func(to jid.JID) (got, json.RawMessage) {
		t.Helper()
		mu.Lock()
		n := len(received)
		mu.Unlock()
		res, err := caller.Call(ctxTimeout(t, 5*time.Second), to, "/x/y", args, WithMeta(meta))
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(received) != n+1 {
			t.Fatalf("the peer received %d ops, want 1", len(received)-n)
		}
		return received[n], res.Value()
	}

	stopNew := peer(true)
	to := jid.MustParse("app@" + testComponent2)
	first, v := call(to)
	if first.kind != "op" || string(v) != string(args) {
		t.Fatalf("first op: as %s, result %s", first.kind, v)
	}
	second, v := call(to)
	if second.kind != "call" || string(v) != string(args) {
		t.Fatalf("second op: as %s, result %s", second.kind, v)
	}
	el := second.el
	if el.Type != "/x/y" || string(el.Payload) != string(args) || el.Meta.RequestID != "r-1" || el.Meta.Selector != "rr" ||
		!el.Meta.Persistent || !el.Meta.Batch || !el.Meta.Compact || el.Meta.Timeout <= 0 || el.Meta.Timeout > 5*time.Second ||
		len(el.Meta.Hops) != 1 || el.Meta.Hops[0].By != hop.By || !el.Meta.Hops[0].At.Equal(hop.At) {
		t.Errorf("<call> read as %+v", el)
	}
	// Another JID of the same component is not known yet.
	if other, _ := call(jid.MustParse("other@" + testComponent2)); other.kind != "op" {
		t.Errorf("op to another JID as %s", other.kind)
	}
	// A signed op never goes as <call>.
	meta.Signature = []byte{1, 2, 3}
	if signed, _ := call(to); signed.kind != "op" || string(signed.el.Meta.Signature) != "\x01\x02\x03" {
		t.Errorf("signed op as %s", signed.kind)
	}
	meta.Signature = nil

	// Many ops at once to a peer that reads <call> but not <batch>es of
	// ops: the batch is refused, every op is sent again alone at once and
	// answered, and the peer is not sent <call>s or batches any more.
	echoAtOnce(t, caller, to, "/x/y", 40, WithMeta(Meta{RequestID: "many"}))
	if caller.Stats().OpBatches == 0 {
		t.Error("no batch of ops was tried")
	}
	if caller.knowsCompact(to) {
		t.Error("a peer that refused a batch of ops is still sent <call>s")
	}

	// The peer is replaced by one that does not read <call>.
	mu.Lock()
	received = nil
	mu.Unlock()
	stopNew()
	peer(false)
	deadline := time.Now().Add(5 * time.Second)
	for {
		res, err := caller.Call(ctxTimeout(t, 5*time.Second), to, "/x/y", args, WithMeta(meta))
		if err != nil {
			t.Fatalf("op to the older peer: %v", err)
		}
		if string(res.Value()) != string(args) {
			t.Fatalf("result %s", res.Value())
		}
		mu.Lock()
		kinds := len(received)
		mu.Unlock()
		if kinds > 0 || time.Now().After(deadline) {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, r := range received {
		if r.kind != "op" {
			t.Errorf("the older peer served a %s", r.kind)
		}
	}
	if len(received) != 1 {
		t.Errorf("the older peer received %d ops, want 1", len(received))
	}
	if caller.knowsCompact(to) {
		t.Error("the older peer is still taken to read <call>")
	}
	n := 0
	caller.queues.Range(func(k, v any) bool { n++; return true })
	if n != 0 {
		t.Errorf("%d queues of ops kept with no op under way", n)
	}
}

// TestOpBatches: between two endpoints of this project, many ops at once
// go as <batch>es of <call>s, answered with their echoes in one IQ-result,
// and quick ops' results come back in <batch>es of <done>s; streamed and
// failing ops in the same batches keep their stanzas, in order; every call
// gets exactly its own answer. Two components on a real prosody.
func TestOpBatches(t *testing.T) {
	p := runProsody(t)
	var runs atomic.Int64
	resp := NewEndpoint(Config{Handler: streamHandler(&runs)})
	startConn(t, DialConfig{JID: jid.MustParse(testComponent2), Secret: testSecret, Addr: p.ComponentAddr()}, resp)
	// Every echo must arrive in its batch's answer (<got> or held
	// stanzas): a lost one would be sent again after 30 s, and counted.
	caller := NewEndpoint(Config{RetryInitial: 30 * time.Second, RetryMax: 30 * time.Second})
	startConn(t, componentDial(p), caller)
	to := jid.MustParse("svc@" + testComponent2)
	// The first op teaches the caller that the peer is this project's.
	if _, err := caller.Call(ctxTimeout(t, 5*time.Second), to, "/test/echo", json.RawMessage(`1`)); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 3 || round < 8 && (caller.Stats().OpBatches == 0 || resp.Stats().ResultBatches == 0); round++ {
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for i := range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx := ctxTimeout(t, 20*time.Second)
				switch i % 8 {
				case 0: // streamed: intermediate results, then the result
					var keys []string
					res, err := caller.Call(ctx, to, "/test/stream", nil, OnData(func(d Data) {
						if d.Intermediate {
							keys = append(keys, string(d.Payload))
						}
					}))
					if err == nil && (string(res.Value()) != `"done"` || strings.Join(keys, ",") != `{"step":1},{"step":2},{"step":3}`) {
						err = fmt.Errorf("stream: %s after %v", res.Value(), keys)
					}
					errs <- err
				case 1: // failing
					_, err := caller.Call(ctx, to, "/test/fail", nil)
					var oe *OpError
					if !errors.As(err, &oe) || oe.Code != "boom" {
						errs <- fmt.Errorf("fail: %v", err)
						return
					}
					errs <- nil
				default:
					errs <- callEcho(ctx, caller, to, "/test/echo", i, json.RawMessage(fmt.Sprintf(`{"round":%d,"i":%d}`, round, i)))
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
	}
	cs, rs := caller.Stats(), resp.Stats()
	t.Logf("caller: %d batches of ops; responder: %d received, %d batches of results; resent %d/%d", cs.OpBatches, rs.OpBatchesReceived, rs.ResultBatches, cs.Resent, rs.Resent)
	if cs.OpBatches == 0 || rs.OpBatchesReceived != cs.OpBatches || rs.ResultBatches == 0 {
		t.Errorf("batches: caller sent %d, responder received %d and sent %d of results", cs.OpBatches, rs.OpBatchesReceived, rs.ResultBatches)
	}
	if n := runs.Load(); n != rs.OpsServed {
		t.Errorf("handler ran %d times for %d ops", n, rs.OpsServed)
	}
	if cs.OpsCalled != rs.OpsServed {
		t.Errorf("%d calls, %d ops served", cs.OpsCalled, rs.OpsServed)
	}
	if cs.Resent != 0 || rs.DuplicateOps != 0 {
		t.Errorf("%d ops sent again, %d duplicates received: echoes were lost", cs.Resent, rs.DuplicateOps)
	}
}

// TestCompactWithAgent: an XMPP agent (a c2s client, which cannot hold an
// op's echo) sends a quick op's ack, result and final to a caller that
// reads <done> as one <done> IQ-set; the caller then knows the agent reads
// <call> and, with many ops at once, batches of them. Real prosody.
func TestCompactWithAgent(t *testing.T) {
	p := runProsody(t)
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: &fakeActors{}})
	caller := NewEndpoint(Config{})
	startConn(t, componentDial(p), caller)
	res, err := caller.Call(ctxTimeout(t, 5*time.Second), a.JID(), "/echo/say", json.RawMessage(`"first"`))
	if err != nil || string(res.Value()) != `"first"` {
		t.Fatalf("first op: %v %v", res, err)
	}
	if !caller.knowsCompact(a.JID()) {
		t.Fatal("the agent's <done> was not taken as reading <call>")
	}
	echoAtOnce(t, caller, a.JID(), "/echo/say", 48)
	if caller.Stats().OpBatches == 0 {
		t.Error("no batch of ops to the agent")
	}
	// (The agent's last results are under way until their confirmations
	// arrive, just after the calls end.)
	for _, ep := range []*Endpoint{caller, a.Endpoint()} {
		n := -1
		for end := time.Now().Add(5 * time.Second); n != 0 && time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			n = 0
			ep.queues.Range(func(k, v any) bool { n++; return true })
		}
		if n != 0 {
			t.Errorf("%d queues kept with nothing under way", n)
		}
	}
	if !caller.knowsCompact(a.JID()) {
		t.Error("the agent refused a batch")
	}
}

// echoAtOnce makes n calls of the echoing service svc at to at once, each
// with its own argument, and checks that each gets exactly its argument.
// callEcho calls svc, an echo, as op i with arg, and checks that the
// result is arg.
func callEcho(ctx context.Context, caller *Endpoint, to jid.JID, svc string, i int, arg json.RawMessage, opts ...CallOption) error {
	res, err := caller.Call(ctx, to, svc, arg, opts...)
	if err == nil && string(res.Value()) != string(arg) {
		err = fmt.Errorf("op %d: result %s", i, res.Value())
	}
	return err
}

func echoAtOnce(t *testing.T, caller *Endpoint, to jid.JID, svc string, n int, opts ...CallOption) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- callEcho(ctxTimeout(t, 10*time.Second), caller, to, svc, i, json.RawMessage(fmt.Sprintf(`{"i":%d}`, i)), opts...)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// TestBatchEchoes: the echoes of a <batch> of ops come back at once, as
// a <got> list, while the ops still run; without them every op would be
// sent again when its wait for the echo is up.
func TestBatchEchoes(t *testing.T) {
	p := runProsody(t)
	release := make(chan struct{})
	resp := NewEndpoint(Config{Handler: OpHandlerFunc(func(ctx context.Context, req *Request, w *Reply) error {
		if string(req.Payload) != "0" {
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if err := w.Data(ctx, req.Payload); err != nil {
			return err
		}
		return w.Final(ctx)
	})})
	startConn(t, DialConfig{JID: jid.MustParse(testComponent2), Secret: testSecret, Addr: p.ComponentAddr()}, resp)
	caller := NewEndpoint(Config{RetryInitial: 700 * time.Millisecond, RetryMax: time.Second})
	startConn(t, componentDial(p), caller)
	to := jid.MustParse("svc@" + testComponent2)
	if _, err := caller.Call(ctxTimeout(t, 5*time.Second), to, "/test/echo", json.RawMessage(`0`)); err != nil {
		t.Fatal(err)
	}
	const n = 32
	errs := make(chan error, n)
	for i := range n {
		go func() {
			res, err := caller.Call(ctxTimeout(t, 20*time.Second), to, "/test/echo", json.RawMessage(strconv.Itoa(i+1)))
			if err == nil && string(res.Value()) != strconv.Itoa(i+1) {
				err = fmt.Errorf("op %d: result %s", i+1, res.Value())
			}
			errs <- err
		}()
	}
	// Longer than the wait for an echo, shorter than the ops' deadline.
	time.Sleep(2 * time.Second)
	close(release)
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	cs, rs := caller.Stats(), resp.Stats()
	if cs.OpBatches == 0 {
		t.Fatalf("no batch of ops sent (%+v)", cs)
	}
	if cs.Resent != 0 || rs.DuplicateOps != 0 {
		t.Errorf("%d IQ-sets sent again, %d duplicate ops received: the echoes of the batches were lost", cs.Resent, rs.DuplicateOps)
	}
}
