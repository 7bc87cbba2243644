package vertebra

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/vertebra/values"
)

// lockedBuffer collects what a session reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

var iqRE = regexp.MustCompile(`<iq[^>]*/>|<iq[\s\S]*?</iq>`)

// TestWireTranscript records the stanzas two clients receive from prosody
// during a streamed op, a refused op, a failed op and directory calls, and
// checks their shape. With VERTEBRA_TRANSCRIPT=file it writes them there
// (docs/xmpp.md quotes such a transcript).
func TestWireTranscript(t *testing.T) {
	p := runProsody(t)
	dir := NewDirectory(DirectoryConfig{})
	dirEP := NewEndpoint(Config{Handler: dir})
	startConn(t, componentDial(p), dirEP)
	dirJID := jid.MustParse("directory@" + testComponent)

	var agentIn, callerIn lockedBuffer
	ad := clientDial(t, p, "agent1")
	ad.JID = jid.MustParse("agent1@" + testDomain + "/agent")
	ad.TeeIn = &agentIn
	a := startAgent(t, AgentConfig{Dial: ad, Handler: &fakeActors{}, Authorizer: AllowJIDs("alice@"+testDomain, "carol@"+testDomain),
		Load: func() float64 { return 0.5 }, StatusInterval: time.Hour})
	cd := clientDial(t, p, "alice")
	cd.JID = jid.MustParse("alice@" + testDomain + "/cli")
	cd.TeeIn = &callerIn
	alice := NewEndpoint(Config{NoBatch: true}) // speaks like a plain Vertebra peer
	startConn(t, cd, alice)
	var carolIn lockedBuffer
	cd2 := clientDial(t, p, "carol")
	cd2.JID = jid.MustParse("carol@" + testDomain + "/cli")
	cd2.TeeIn = &carolIn
	carol := NewEndpoint(Config{}) // offers batching
	startConn(t, cd2, carol)
	time.Sleep(100 * time.Millisecond) // let presence settle
	mark := func() (int, int, int) { return len(agentIn.String()), len(callerIn.String()), len(carolIn.String()) }

	type section struct {
		title  string
		agent  string
		caller string
	}
	var sections []section
	record := func(title string, f func()) {
		a0, c0, k0 := mark()
		f()
		time.Sleep(100 * time.Millisecond) // the last confirmations
		sections = append(sections, section{title, agentIn.String()[a0:], callerIn.String()[c0:] + carolIn.String()[k0:]})
	}
	ctx := ctxTimeout(t, 10*time.Second)
	record("A streamed op: /echo/stream", func() {
		if _, err := alice.Call(ctx, a.JID(), "/echo/stream", json.RawMessage(`{"steps":3,"label":"demo"}`),
			WithMeta(Meta{RequestID: "req-42"})); err != nil {
			t.Fatal(err)
		}
	})
	record("A refused op (nack): /echo/nothing", func() {
		if _, err := alice.Call(ctx, a.JID(), "/echo/nothing", nil); err == nil {
			t.Fatal("no error")
		}
	})
	record("A failed op (error): /echo/fail", func() {
		if _, err := alice.Call(ctx, a.JID(), "/echo/fail", json.RawMessage(`"broken"`)); err == nil {
			t.Fatal("no error")
		}
	})
	record("The streamed op with batching: /echo/stream", func() {
		if _, err := carol.Call(ctx, a.JID(), "/echo/stream", json.RawMessage(`{"steps":3}`)); err != nil {
			t.Fatal(err)
		}
	})
	record("Advertise and discover, with batching, at a component", func() {
		if err := Advertise(ctx, carol, dirJID, []string{"/echo", "/cluster/rd00"}, time.Minute); err != nil {
			t.Fatal(err)
		}
		if _, err := Discover(ctx, carol, dirJID, "/echo/say", []string{"/cluster"}); err != nil {
			t.Fatal(err)
		}
	})

	var out strings.Builder
	for _, s := range sections {
		out.WriteString("## " + s.title + "\n\n")
		for _, side := range []struct{ who, text string }{{"the caller receives", s.caller}, {"the agent (agent1@site-a.test/agent) receives", s.agent}} {
			iqs := iqRE.FindAllString(side.text, -1)
			if len(iqs) == 0 {
				continue
			}
			out.WriteString("### " + side.who + "\n\n")
			for _, iq := range iqs {
				out.WriteString(iq + "\n")
			}
			out.WriteString("\n")
		}
	}
	text := out.String()
	if f := os.Getenv("VERTEBRA_TRANSCRIPT"); f != "" {
		if err := os.WriteFile(f, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Log("\n" + text)

	// The shape a plain client relies on, parsed (prosody rewrites quotes
	// and attribute order).
	var got []string
	for _, s := range sections[:3] {
		for _, iq := range iqRE.FindAllString(s.caller, -1) {
			got = append(got, describeIQ(t, iq))
		}
	}
	want := []string{
		"result op /echo/stream", "set ack seq=1", `set data seq=2 key=progress {"step":1,"of":3}`,
		`set data seq=3 key=progress {"step":2,"of":3}`, `set data seq=4 key=progress {"step":3,"of":3}`,
		`set data seq=5 {"steps":3}`, "set final seq=6",
		"result op /echo/nothing", `set nack seq=1 {"code":"unknown_service","message":"no service /echo/nothing here"}`,
		"result op /echo/fail", "set ack seq=1", `set error seq=2 {"code":"handler_error","message":"failed as asked"}`,
	}
	for _, s := range sections[3:] {
		for _, iq := range iqRE.FindAllString(s.caller, -1) {
			got = append(got, describeIQ(t, iq))
		}
	}
	want = append(want,
		"result op /echo/stream",
		`set batch[ack seq=1; data seq=2 key=progress {"step":1,"of":3}; data seq=3 key=progress {"step":2,"of":3}; `+
			`data seq=4 key=progress {"step":3,"of":3}; data seq=5 {"steps":3}; final seq=6]`,
		`result batch[op; ack seq=1; data seq=2 {"jid":"carol@site-a.test/cli","resources":2,"ttl":60}; final seq=3]`,
		`result batch[op; ack seq=1; data seq=2 {"jids":["carol@site-a.test/cli"]}; final seq=3]`,
	)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("caller received:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	op := iqRE.FindString(sections[0].agent)
	el := payloadOf(t, op)[0]
	if el.Kind != KindOp || el.Type != "/echo/stream" || el.Meta.RequestID != "req-42" || el.Meta.Timeout <= 0 ||
		string(el.Payload) != `{"steps":3,"label":"demo"}` {
		t.Errorf("agent received %+v", el)
	}
}

// payloadOf decodes the protocol element (or batch) of an IQ's text.
func payloadOf(t *testing.T, iq string) []*Element {
	t.Helper()
	d := xml.NewDecoder(strings.NewReader(iq))
	depth := 0
	for {
		tok, err := d.Token()
		if err != nil {
			return nil
		}
		if st, ok := tok.(xml.StartElement); ok {
			depth++
			if depth == 2 {
				if st.Name.Local == "done" { // the compact echo
					els, err := DecodeDone(d, st, values.Limits{})
					if err != nil {
						t.Fatalf("%s: %v", iq, err)
					}
					return els
				}
				if st.Name.Local == "batch" {
					els, err := DecodeBatch(d, st, values.Limits{})
					if err != nil {
						t.Fatalf("%s: %v", iq, err)
					}
					return els
				}
				el, err := DecodeElement(d, st, values.Limits{})
				if err != nil {
					t.Fatalf("%s: %v", iq, err)
				}
				return []*Element{el}
			}
		}
	}
}

func describeIQ(t *testing.T, iq string) string {
	typ := regexp.MustCompile(` type=['"](\w+)['"]`).FindStringSubmatch(iq)[1]
	els := payloadOf(t, iq)
	switch len(els) {
	case 0:
		return typ
	case 1:
		return typ + " " + describeElement(els[0])
	}
	var parts []string
	for _, el := range els {
		parts = append(parts, describeElement(el))
	}
	return typ + " batch[" + strings.Join(parts, "; ") + "]"
}

func describeElement(el *Element) string {
	s := string(el.Kind)
	if el.Type != "" {
		s += " " + el.Type
	}
	if el.Meta.Seq > 0 {
		s += fmt.Sprintf(" seq=%d", el.Meta.Seq)
	}
	if el.Meta.Intermediate {
		s += " key=" + el.Meta.Key
	}
	if el.Payload != nil {
		s += " " + string(el.Payload)
	}
	return s
}
