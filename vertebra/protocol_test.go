package vertebra

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp"
	"mellium.im/xmpp/component"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/vertebra/values"
)

// rawPeer is a component speaking the protocol by hand, to test what the
// Endpoint does with duplicates, lost confirmations, odd orders and
// malformed elements. A component session, unlike a client's, does not
// answer IQs its handler leaves unanswered, so the peer can "lose" them.
type rawPeer struct {
	s    *xmpp.Session
	addr jid.JID
	in   chan rawIn
	// confirm decides whether to answer a received IQ-set (nil: always).
	confirm func(el *Element, id string) bool
	// lastDone: the last answer to sendTokensBatch was a compact <done>.
	lastDone bool
}

type rawIn struct {
	iq stanza.IQ
	el *Element
}

func startRawPeer(t *testing.T, p interface{ ComponentAddr() string }, local string, domain ...string) *rawPeer {
	t.Helper()
	dom := testComponent
	if len(domain) > 0 {
		dom = domain[0]
	}
	s, err := Dial(ctxTimeout(t, 5*time.Second), DialConfig{JID: jid.MustParse(dom), Secret: testSecret, Addr: p.ComponentAddr()})
	if err != nil {
		t.Fatal(err)
	}
	rp := &rawPeer{s: s, addr: jid.MustParse(local + "@" + dom + "/raw"), in: make(chan rawIn, 100)}
	var mu sync.Mutex
	m := mux.New(component.NSAccept, mux.IQ(stanza.SetIQ, xml.Name{Space: NS}, mux.IQHandlerFunc(
		func(iq stanza.IQ, tr xmlstream.TokenReadEncoder, start *xml.StartElement) error {
			el, err := DecodeElement(tr, *start, values.DefaultLimits)
			if err != nil {
				return writeIQError(tr, iq, stanza.Modify, stanza.BadRequest, err.Error())
			}
			rp.in <- rawIn{iq: iq, el: el}
			mu.Lock()
			ok := rp.confirm == nil || rp.confirm(el, iq.ID)
			mu.Unlock()
			if !ok {
				return nil
			}
			return writeIQResult(tr, iq, nil)
		})))
	done := make(chan struct{})
	go func() { _ = s.Serve(m); close(done) }()
	t.Cleanup(func() { _ = s.Close(); _ = s.Conn().Close(); <-done })
	return rp
}

// send sends an IQ-set carrying el (with the given IQ id) and returns the
// answer: the echo token of a result, or the stanza error.
func (rp *rawPeer) send(t *testing.T, to jid.JID, id string, el *Element) (string, error) {
	t.Helper()
	toks, err := el.AppendTokens(nil)
	if err != nil {
		t.Fatal(err)
	}
	return rp.sendTokens(t, to, id, toks)
}

func (rp *rawPeer) sendTokens(t *testing.T, to jid.JID, id string, payload []xml.Token) (string, error) {
	t.Helper()
	tok, _, err := rp.sendTokensBatch(t, to, id, payload)
	return tok, err
}

// sendTokensBatch is sendTokens that also returns the elements of a
// <batch> answer.
func (rp *rawPeer) sendTokensBatch(t *testing.T, to jid.JID, id string, payload []xml.Token) (string, []*Element, error) {
	t.Helper()
	resp, err := rp.s.SendIQ(ctxTimeout(t, 5*time.Second), &tokenSlice{toks: iqTokens(id, rp.addr, to, payload)})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Close()
	tok, err := resp.Token()
	if err != nil {
		t.Fatal(err)
	}
	start := tok.(xml.StartElement)
	iq, err := stanza.UnmarshalIQError(resp, start)
	if err != nil {
		return "", nil, err
	}
	if iq.Type != stanza.ResultIQ {
		t.Fatalf("answer of type %s", iq.Type)
	}
	for {
		tok, err := resp.Token()
		if err != nil {
			return "", nil, nil
		}
		if st, ok := tok.(xml.StartElement); ok && st.Name.Local == "op" {
			return attrValue(st.Attr, "token"), nil, nil
		}
		if st, ok := tok.(xml.StartElement); ok && st.Name.Local == "done" {
			rp.lastDone = true
			els, err := DecodeDone(resp, st, values.Limits{})
			if err != nil {
				t.Fatal(err)
			}
			return els[0].Token, els[1:], nil
		}
		if st, ok := tok.(xml.StartElement); ok && st.Name.Local == "batch" {
			rp.lastDone = false
			els, err := DecodeBatch(resp, st, values.Limits{})
			if err != nil {
				t.Fatal(err)
			}
			return els[0].Token, els[1:], nil
		}
	}
}

func (rp *rawPeer) next(t *testing.T) rawIn {
	t.Helper()
	select {
	case in := <-rp.in:
		return in
	case <-time.After(5 * time.Second):
		t.Fatal("nothing received for 5 s")
		return rawIn{}
	}
}

func TestDuplicateOpNotRunTwice(t *testing.T) {
	p := runProsody(t)
	actors := &fakeActors{}
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: actors})
	rp := startRawPeer(t, p, "caller")

	op := &Element{Kind: KindOp, Token: "T1", Type: "/echo/say", Payload: json.RawMessage(`"once"`),
		Meta: Meta{Timeout: 5 * time.Second}}
	tok1, err := rp.send(t, a.JID(), "op-1", op)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok1, "T1:") {
		t.Fatalf("echo token %q", tok1)
	}
	// The same op again (a resend: same IQ id, same token) while it runs
	// or after: same echo, not run again.
	tok2, err := rp.send(t, a.JID(), "op-1", op)
	if err != nil || tok2 != tok1 {
		t.Fatalf("duplicate: echo %q, %v; want %q", tok2, err, tok1)
	}
	var kinds []string
	for len(kinds) < 3 {
		in := rp.next(t)
		if in.el.Token != tok1 {
			t.Fatalf("token %q, want %q", in.el.Token, tok1)
		}
		kinds = append(kinds, fmt.Sprintf("%s#%d", in.el.Kind, in.el.Meta.Seq))
	}
	if got := strings.Join(kinds, " "); got != "ack#1 data#2 final#3" {
		t.Errorf("received %s", got)
	}
	time.Sleep(100 * time.Millisecond)
	// Even a resend after the op ended is recognised.
	if tok3, err := rp.send(t, a.JID(), "op-1", op); err != nil || tok3 != tok1 {
		t.Fatalf("late duplicate: %q, %v", tok3, err)
	}
	time.Sleep(100 * time.Millisecond)
	if n := actors.runs.Load(); n != 1 {
		t.Errorf("handler ran %d times", n)
	}
	if st := a.Endpoint().Stats(); st.DuplicateOps != 2 || st.OpsServed != 1 {
		t.Errorf("stats %+v", st)
	}
	select {
	case in := <-rp.in:
		t.Errorf("unexpected %s after the end", in.el.Kind)
	default:
	}
}

func TestResponderResendsUnconfirmed(t *testing.T) {
	p := runProsody(t)
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: &fakeActors{},
		Endpoint: Config{RetryInitial: 50 * time.Millisecond, RetryMax: 100 * time.Millisecond}})
	rp := startRawPeer(t, p, "caller")
	// Lose the first confirmation of each stanza.
	seen := map[string]bool{}
	rp.confirm = func(el *Element, id string) bool {
		first := !seen[id]
		seen[id] = true
		return !first
	}
	tok, err := rp.send(t, a.JID(), "op-2", &Element{Kind: KindOp, Token: "T2", Type: "/echo/stream"})
	if err != nil {
		t.Fatal(err)
	}
	ids := map[int]string{}
	counts := map[int]int{}
	all := func() bool { // ack, 3 intermediates, result, final: each twice
		for seq := 1; seq <= 6; seq++ {
			if counts[seq] < 2 {
				return false
			}
		}
		return true
	}
	for !all() {
		in := rp.next(t)
		if in.el.Token != tok {
			t.Fatalf("token %q", in.el.Token)
		}
		seq := in.el.Meta.Seq
		if id, ok := ids[seq]; ok && id != in.iq.ID {
			t.Errorf("resend of #%d with a new IQ id", seq)
		}
		ids[seq] = in.iq.ID
		counts[seq]++
	}
	if len(counts) != 6 {
		t.Errorf("received %v", counts)
	}
	if st := a.Endpoint().Stats(); st.Resent < 6 {
		t.Errorf("stats %+v", st)
	}
}

// TestCallerOrdersAndDeduplicates: a responder that sends out of order,
// twice, and the older <result> element.
func TestCallerOrdersAndDeduplicates(t *testing.T) {
	p := runProsody(t)
	alice := NewEndpoint(Config{})
	startConn(t, clientDial(t, p, "alice"), alice)
	rp := startRawPeer(t, p, "responder")

	type outcome struct {
		res *Result
		err error
	}
	var data []string
	done := make(chan outcome, 1)
	go func() {
		res, err := alice.Call(ctxTimeout(t, 10*time.Second), rp.addr, "/x/y", json.RawMessage(`{"n":1}`),
			OnData(func(d Data) { data = append(data, string(d.Payload)) }))
		done <- outcome{res, err}
	}()
	in := rp.next(t)
	if in.el.Kind != KindOp || in.el.Type != "/x/y" || string(in.el.Payload) != `{"n":1}` || in.el.Meta.Timeout <= 0 {
		t.Fatalf("op %+v", in.el)
	}
	// The echo went as the IQ-result (written by the raw peer's handler,
	// without a token: the caller must cope). Now the responder's stanzas:
	tok := in.el.Token + ":S"
	send := func(id string, el *Element) {
		el.Token = tok
		if _, err := rp.send(t, alice.LocalAddr(), id, el); err != nil {
			t.Errorf("%s: %v", id, err)
		}
	}
	send("s2", &Element{Kind: KindData, Payload: json.RawMessage(`"two"`), Meta: Meta{Seq: 3}})
	send("s1", &Element{Kind: KindData, Payload: json.RawMessage(`"one"`), Meta: Meta{Seq: 2}})
	send("s1", &Element{Kind: KindData, Payload: json.RawMessage(`"one"`), Meta: Meta{Seq: 2}}) // duplicate
	send("s0", &Element{Kind: KindAck, Meta: Meta{Seq: 1}})
	send("s3", &Element{Kind: KindFinal, Meta: Meta{Seq: 4}})
	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	if got := strings.Join(data, " "); got != `"one" "two"` {
		t.Errorf("data %s", got)
	}
	if st := alice.Stats(); st.DuplicateStanzas != 1 {
		t.Errorf("stats %+v", st)
	}

	// A plain Vertebra peer: no sequence numbers, <result> for data.
	done2 := make(chan outcome, 1)
	go func() {
		res, err := alice.Call(ctxTimeout(t, 10*time.Second), rp.addr, "/x/z", nil)
		done2 <- outcome{res, err}
	}()
	in = rp.next(t)
	name := xml.Name{Space: NS, Local: "result"}
	toks := []xml.Token{xml.StartElement{Name: name, Attr: []xml.Attr{{Name: xml.Name{Local: "token"}, Value: in.el.Token + ":S"}}},
		xml.StartElement{Name: xml.Name{Local: "string"}, Attr: []xml.Attr{{Name: xml.Name{Local: "name"}, Value: "out"}}},
		xml.CharData("plain"), xml.EndElement{Name: xml.Name{Local: "string"}}, xml.EndElement{Name: name}}
	for i, el := range []*Element{{Kind: KindAck}, nil, {Kind: KindFinal}} {
		id := fmt.Sprintf("p%d", i)
		if el == nil {
			if _, err := rp.sendTokens(t, alice.LocalAddr(), id, toks); err != nil {
				t.Fatal(err)
			}
			continue
		}
		el.Token = in.el.Token + ":S"
		if _, err := rp.send(t, alice.LocalAddr(), id, el); err != nil {
			t.Fatal(err)
		}
	}
	o = <-done2
	if o.err != nil || string(o.res.Value()) != `{"out":"plain"}` {
		t.Fatalf("plain peer: %v, %v", o.res, o.err)
	}

	// Stanzas for unknown ops are refused with item-not-found.
	_, err := rp.send(t, alice.LocalAddr(), "x1", &Element{Kind: KindData, Token: "nope:S"})
	if !errors.Is(err, stanza.Error{Condition: stanza.ItemNotFound}) {
		t.Errorf("unknown token: %v", err)
	}
}

func TestBadRequests(t *testing.T) {
	p := runProsody(t)
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: &fakeActors{}})
	rp := startRawPeer(t, p, "caller")
	for i, c := range []struct {
		name string
		xml  string
	}{
		{"unknown child", `<op xmlns="NS" token="t" type="/echo/say"><foo/></op>`},
		{"unknown child in another namespace", `<op xmlns="NS" token="t" type="/echo/say"><foo xmlns="urn:x"/></op>`},
		{"unknown meta child", `<op xmlns="NS" token="t" type="/echo/say"><meta xmlns="urn:nanite:op:0"><x/></meta></op>`},
		{"no token", `<op xmlns="NS" type="/echo/say"/>`},
		{"no type", `<op xmlns="NS" token="t"/>`},
		{"unknown element", `<frobnicate xmlns="NS" token="t"/>`},
		{"bad value", `<op xmlns="NS" token="t" type="/echo/say"><i4>x</i4></op>`},
		{"mixed values", `<op xmlns="NS" token="t" type="/echo/say"><i4>1</i4><i4 name="a">2</i4></op>`},
		{"text", `<op xmlns="NS" token="t" type="/echo/say">hello</op>`},
		{"bad deadline", `<op xmlns="NS" token="t" type="/echo/say"><meta xmlns="urn:nanite:op:0" deadline-ms="-5"/></op>`},
		{"too deep", `<op xmlns="NS" token="t" type="/echo/say">` + strings.Repeat("<list>", 100) + strings.Repeat("</list>", 100) + `</op>`},
	} {
		toks := mustTokens(t, strings.ReplaceAll(c.xml, `"NS"`, `"`+NS+`"`))
		_, err := rp.sendTokens(t, a.JID(), fmt.Sprintf("bad-%d", i), toks)
		if !errors.Is(err, stanza.Error{Condition: stanza.BadRequest}) {
			t.Errorf("%s: %v, want bad-request", c.name, err)
		}
	}
	// Still serving.
	if _, err := rp.send(t, a.JID(), "good", &Element{Kind: KindOp, Token: "t", Type: "/echo/say"}); err != nil {
		t.Fatal(err)
	}
}

func mustTokens(t *testing.T, s string) []xml.Token {
	t.Helper()
	d := xml.NewDecoder(strings.NewReader(s))
	var toks []xml.Token
	for {
		tok, err := d.Token()
		if err != nil {
			break
		}
		toks = append(toks, xml.CopyToken(tok))
	}
	return toks
}

// TestComponents: an endpoint on a component serves ops for any JID of its
// domain, and calls from the component to a client.
func TestComponents(t *testing.T) {
	p := runProsody(t)
	var to atomic.Value
	comp := NewEndpoint(Config{Handler: OpHandlerFunc(func(ctx context.Context, req *Request, w *Reply) error {
		to.Store(req.To.String())
		return w.Data(ctx, json.RawMessage(`"`+req.To.String()+`"`))
	})})
	startConn(t, componentDial(p), comp)
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: &fakeActors{}})

	// client → component, to a JID with a localpart (a "cluster").
	cluster := jid.MustParse("app@" + testComponent)
	res, err := a.Endpoint().Call(ctxTimeout(t, 5*time.Second), cluster, "/any/thing", nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Value()) != `"app@nanite.site-a.test"` || !res.From.Equal(cluster) {
		t.Errorf("result %s from %v", res.Value(), res.From)
	}
	// component → client, sent from a JID of the component's domain.
	res, err = comp.Call(ctxTimeout(t, 5*time.Second), a.JID(), "/echo/say", json.RawMessage(`[1,2]`),
		WithFrom(jid.MustParse("app@"+testComponent+"/bridge")))
	if err != nil || string(res.Value()) != `[1,2]` {
		t.Fatalf("component call: %v %v", res, err)
	}
	// component → component.
	res, err = comp.Call(ctxTimeout(t, 5*time.Second), jid.MustParse("other@"+testComponent), "/x/y", nil)
	if err != nil || string(res.Value()) != `"other@nanite.site-a.test"` {
		t.Fatalf("component to itself: %v %v", res, err)
	}
}

// TestHeldEcho: a component responder answers a quick op from a caller
// that accepts batches with one IQ-result holding the whole op, and
// answers a duplicate with the same.
func TestHeldEcho(t *testing.T) {
	p := runProsody(t)
	var runs atomic.Int64
	comp := NewEndpoint(Config{Handler: streamHandler(&runs)})
	startConn(t, componentDial(p), comp)
	rp := startRawPeer(t, p, "caller", testComponent2)
	to := jid.MustParse("svc@" + testComponent)
	op := &Element{Kind: KindOp, Token: "T", Type: "/test/stream", Meta: Meta{Batch: true}}
	toks, _ := op.AppendTokens(nil)
	describe := func(els []*Element) string {
		var s []string
		for _, el := range els {
			s = append(s, describeElement(el))
		}
		return strings.Join(s, "; ")
	}
	tok, els, err := rp.sendTokensBatch(t, to, "op-1", toks)
	if err != nil {
		t.Fatal(err)
	}
	want := `ack seq=1; data seq=2 key=progress {"step":1}; data seq=3 key=progress {"step":2}; ` +
		`data seq=4 key=progress {"step":3}; data seq=5 "done"; final seq=6`
	if !strings.HasPrefix(tok, "T:") || describe(els) != want {
		t.Fatalf("echo %q with %s", tok, describe(els))
	}
	tok2, els2, err := rp.sendTokensBatch(t, to, "op-1", toks)
	if err != nil || tok2 != tok || describe(els2) != want {
		t.Fatalf("duplicate: %q %s %v", tok2, describe(els2), err)
	}
	if runs.Load() != 1 {
		t.Errorf("ran %d times", runs.Load())
	}
	select {
	case in := <-rp.in:
		t.Errorf("unexpected IQ-set %s", in.el.Kind)
	case <-time.After(100 * time.Millisecond):
	}

	// A caller that accepts the compact echo gets a quick op's result as one
	// <done>, and the same for a duplicate; an op with more than one
	// result, a result without a payload, or a payload that XML text would
	// change still come as a batch.
	compact := func(token, typ string, payload string) (string, []*Element, bool) {
		t.Helper()
		op := &Element{Kind: KindOp, Token: token, Type: typ, Meta: Meta{Batch: true, Compact: true}}
		if payload != "" {
			op.Payload = json.RawMessage(payload)
		}
		toks, err := op.AppendTokens(nil)
		if err != nil {
			t.Fatal(err)
		}
		tok, els, err := rp.sendTokensBatch(t, to, "id-"+token, toks)
		if err != nil || !strings.HasPrefix(tok, token+":") {
			t.Fatalf("%s: echo %q, %v", typ, tok, err)
		}
		return tok, els, rp.lastDone
	}
	tokC, els, done := compact("C1", "/test/echo", `{"a":[1,"x",null],"b":{"c":true}}`)
	if want := `ack seq=1; data seq=2 {"a":[1,"x",null],"b":{"c":true}}; final seq=3`; !done || describe(els) != want {
		t.Errorf("compact echo: done %v, %s; want %s", done, describe(els), want)
	}
	tokC2, els2, done2 := compact("C1", "/test/echo", `{"a":[1,"x",null],"b":{"c":true}}`)
	if tokC2 != tokC || !done2 || describe(els2) != describe(els) {
		t.Errorf("duplicate of a compact echo: %q done %v %s", tokC2, done2, describe(els2))
	}
	if _, els, done := compact("C2", "/test/stream", ""); done || describe(els) != want {
		t.Errorf("streamed op with compact offered: done %v, %s", done, describe(els))
	}
	if _, els, done := compact("C3", "/test/raw", `[1,`+"\r"+`2]`); done || describe(els) != `ack seq=1; data seq=2 [1,2]; final seq=3` {
		t.Errorf("payload with a carriage return: done %v, %s", done, describe(els))
	}
	if _, els, done := compact("C4", "/test/none", ""); !done || describe(els) != `ack seq=1; final seq=2` {
		t.Errorf("op without a result: done %v, %s", done, describe(els))
	}

	// A slow op: the echo leaves after Hold; the rest comes as IQ-sets.
	op = &Element{Kind: KindOp, Token: "T2", Type: "/test/slow", Meta: Meta{Batch: true, Timeout: 300 * time.Millisecond}}
	toks, _ = op.AppendTokens(nil)
	t0 := time.Now()
	tok, els, err = rp.sendTokensBatch(t, to, "op-2", toks)
	if err != nil || !strings.HasPrefix(tok, "T2:") {
		t.Fatalf("slow op: %q %v", tok, err)
	}
	if d := time.Since(t0); d > 200*time.Millisecond {
		t.Errorf("echo after %v", d)
	}
	if len(els) > 0 && describe(els) != "ack seq=1" {
		t.Errorf("echo holds %s", describe(els))
	}
}
