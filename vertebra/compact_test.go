package vertebra

import (
	"encoding/json"
	"encoding/xml"
	"sync"
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
}
