package vertebra

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/vertebra/values"
)

// encodeElement renders an element as XML text.
func encodeElement(t testing.TB, el *Element) []byte {
	t.Helper()
	toks, err := el.AppendTokens(nil)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	e := xml.NewEncoder(&b)
	for _, tk := range toks {
		if err := e.EncodeToken(tk); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// decodeElement parses the XML text of one element.
func decodeElement(data []byte, lim values.Limits) (*Element, error) {
	d := xml.NewDecoder(bytes.NewReader(data))
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, badRequest("no element: %v", err)
		}
		if st, ok := tok.(xml.StartElement); ok {
			return DecodeElement(d, st, lim)
		}
	}
}

func TestElementRoundTrip(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 600, time.UTC)
	for _, el := range []*Element{
		{Kind: KindOp, Token: "T", Type: "/echo/say", Scope: ScopeDirect, Payload: json.RawMessage(`{"a":1,"b":["x",null]}`),
			Meta: Meta{Timeout: 1500 * time.Millisecond, RequestID: "r-1", Selector: "least_loaded", Tags: []string{"eu", "web"},
				Hops:      []Hop{{By: "nanite.site-a.test", At: at}, {By: "nanite.site-b.test"}},
				Signature: []byte{0, 1, 2, 255}, Certificate: []byte("-----BEGIN CERTIFICATE-----")}},
		{Kind: KindOp, Token: "T", Type: "/x/y"},
		{Kind: KindAck, Token: "T:S", Meta: Meta{Seq: 1}},
		{Kind: KindData, Token: "T:S", Payload: json.RawMessage(`"v"`), Meta: Meta{Seq: 2, Intermediate: true, Key: "progress"}},
		{Kind: KindData, Token: "T:S", Payload: json.RawMessage(`{"k":""}`), Meta: Meta{Seq: 3, Intermediate: true}},
		{Kind: KindData, Token: "T:S", Payload: json.RawMessage(`[]`), Meta: Meta{Seq: 4}},
		{Kind: KindData, Token: "T:S", Payload: json.RawMessage(`1`), Meta: Meta{Seq: 5, Agent: "app@nanite.b.test/agent-1"}},
		{Kind: KindData, Token: "T:S", Payload: json.RawMessage(`{"code":"x","message":"y"}`), Meta: Meta{Seq: 6, Agent: "agent-2", Failed: true}},
		{Kind: KindOp, Token: "T:S", Type: "/a/b", Payload: json.RawMessage(`1`), Meta: Meta{Signature: []byte{1, 2}, Origin: []byte(`{"env":1}`), Persistent: true}},
		{Kind: KindFinal, Token: "T:S"},
		{Kind: KindNack, Token: "T:S", Payload: errorPayload(CodeUnauthorized, "no")},
		{Kind: KindError, Token: "T:S", Payload: errorPayload(CodeHandler, "boom <&>")},
	} {
		x := encodeElement(t, el)
		got, err := decodeElement(x, values.Limits{})
		if err != nil {
			t.Fatalf("%s: %v", x, err)
		}
		if !reflect.DeepEqual(got, el) {
			t.Errorf("%s:\n got %+v\nwant %+v", x, got, el)
		}
	}
}

func TestElementWire(t *testing.T) {
	el := &Element{Kind: KindOp, Token: "T", Type: "/echo/say", Payload: json.RawMessage(`{"n":1}`),
		Meta: Meta{Timeout: 2 * time.Second, Tags: []string{"eu"}}}
	want := `<op xmlns="http://xmlschema.engineyard.com/agent/api" token="T" type="/echo/say">` +
		`<i4 name="n">1</i4><meta xmlns="urn:nanite:op:0" deadline-ms="2000"><tag>eu</tag></meta></op>`
	if got := string(encodeElement(t, el)); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

func TestParseErrorBody(t *testing.T) {
	for in, want := range map[string]ErrorBody{
		`{"code":"c","message":"m"}`: {Code: "c", Message: "m"},
		`"just text"`:                {Message: "just text"},
		`{"reason":"r"}`:             {Message: "r"},
		`[1]`:                        {Message: "[1]"},
		``:                           {},
	} {
		if got := parseErrorBody(json.RawMessage(in)); got != want {
			t.Errorf("%s: %+v, want %+v", in, got, want)
		}
	}
}

var fuzzElementLimits = values.Limits{MaxDepth: 16, MaxBytes: 1 << 16, MaxValues: 1024}

// FuzzDecodeElement: seed corpus in testdata/fuzz/FuzzDecodeElement.
func FuzzDecodeElement(f *testing.F) {
	ns := ` xmlns="` + NS + `"`
	for _, s := range []string{
		`<op` + ns + ` token="T" type="/a/b"><string name="x">y</string><meta xmlns="urn:nanite:op:0" deadline-ms="100" request-id="r"><tag>t</tag><hop by="a" at="2026-01-02T03:04:05Z"/><signature>AAE=</signature></meta></op>`,
		`<data` + ns + ` token="T:S"><list><i4>1</i4></list><meta xmlns="urn:nanite:op:0" seq="2" key="k"/></data>`,
		`<result` + ns + ` token="T:S"><struct name="r"/></result>`,
		`<error` + ns + ` token="T:S"><string name="message">m</string></error>`,
		`<op` + ns + ` token="T" type="/a/b"><unknown/></op>`,
		`<op` + ns + ` token="T"/>`,
		`<nack` + ns + `/>`,
		`<op` + ns + ` token="T" type="/a/b"><meta xmlns="urn:nanite:op:0" seq="0"/></op>`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		el, err := decodeElement(data, fuzzElementLimits)
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error does not wrap ErrBadRequest: %v", err)
			}
			return
		}
		// What decodes re-encodes and decodes to the same element, except
		// for fields that are normalised (empty Signature vs nil).
		x, err := encodeTry(el)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", el, err)
		}
		el2, err := decodeElement(x, fuzzElementLimits)
		if err != nil {
			t.Fatalf("decode of re-encoded %s: %v", x, err)
		}
		x2, err := encodeTry(el2)
		if err != nil || !bytes.Equal(x, x2) {
			t.Fatalf("not a fixed point:\n%s\n%s", x, x2)
		}
	})
}

func encodeTry(el *Element) ([]byte, error) {
	toks, err := el.AppendTokens(nil)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	e := xml.NewEncoder(&b)
	for _, tk := range toks {
		if err := e.EncodeToken(tk); err != nil {
			return nil, err
		}
	}
	if err := e.Flush(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func TestDecodeElementTruncated(t *testing.T) {
	x := `<op xmlns="` + NS + `" token="T" type="/a/b"><string name="x">y</string>`
	d := xml.NewDecoder(strings.NewReader(x))
	tok, _ := d.Token()
	_, err := DecodeElement(d, tok.(xml.StartElement), values.Limits{})
	if !errors.Is(err, ErrBadRequest) || errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "EOF") {
		t.Errorf("truncated: %v", err)
	}
}

// The compact echo: what AppendDone writes DecodeDone reads back as the
// elements it stands for; malformed ones are refused as bad requests.
func TestDone(t *testing.T) {
	render := func(toks []xml.Token) string {
		b := encodeXML(toks)
		if b == nil {
			t.Fatal("tokens do not encode")
		}
		return string(b)
	}
	decode := func(text string, lim values.Limits) ([]*Element, error) {
		return decodeFirst(text, func(r xml.TokenReader, st xml.StartElement) ([]*Element, error) {
			return DecodeDone(r, st, lim)
		})
	}
	describeAll := func(els []*Element) string {
		var s []string
		for _, el := range els {
			s = append(s, describeElement(el)+" "+el.Token)
		}
		return strings.Join(s, "; ")
	}
	payload := `{"s":"<&>\"\u2028","n":[1.50,-0,1e400],"t":"x",	
"nl":"a\nb"}`
	els, err := decode(render(AppendDone(nil, "T:S", "", json.RawMessage(payload))), values.Limits{})
	if want := `op T:S; ack seq=1 T:S; data seq=2 ` + payload + ` T:S; final seq=3 T:S`; err != nil || describeAll(els) != want {
		t.Errorf("round trip: %v\n got %s\nwant %s", err, describeAll(els), want)
	}
	els, err = decode(render(AppendDone(nil, "T:S", "app@x.test/a1", json.RawMessage(`1`))), values.Limits{})
	if err != nil || len(els) != 4 || els[2].Meta.Agent != "app@x.test/a1" || string(els[2].Payload) != "1" {
		t.Errorf("with an agent: %v %s", err, describeAll(els))
	}
	els, err = decode(render(AppendDone(nil, "T:S", "", nil)), values.Limits{})
	if want := `op T:S; ack seq=1 T:S; final seq=2 T:S`; err != nil || describeAll(els) != want {
		t.Errorf("without a result: %v %s", err, describeAll(els))
	}
	for _, c := range []struct{ name, text string }{
		{"no token", `<done xmlns='urn:nanite:op:0'>1</done>`},
		{"long token", `<done xmlns='urn:nanite:op:0' token='` + strings.Repeat("x", 300) + `'>1</done>`},
		{"not JSON", `<done xmlns='urn:nanite:op:0' token='T:S'>{"a":</done>`},
		{"two values", `<done xmlns='urn:nanite:op:0' token='T:S'>1 2</done>`},
		{"child element", `<done xmlns='urn:nanite:op:0' token='T:S'><string xmlns='http://xmlschema.engineyard.com/agent/api'>x</string></done>`},
		{"too deep", `<done xmlns='urn:nanite:op:0' token='T:S'>` + strings.Repeat("[", 65) + strings.Repeat("]", 65) + `</done>`},
		{"too long", `<done xmlns='urn:nanite:op:0' token='T:S'>"` + strings.Repeat("x", 100) + `"</done>`},
		{"cut short", `<done xmlns='urn:nanite:op:0' token='T:S'>[1,`},
	} {
		lim := values.Limits{}
		if c.name == "too long" {
			lim.MaxBytes = 64
		}
		if _, err := decode(c.text, lim); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%s: %v, want a bad request", c.name, err)
		}
	}
	// Depth is counted outside strings only.
	if _, err := decode(`<done xmlns='urn:nanite:op:0' token='T:S'>"`+strings.Repeat("[{", 100)+`\""</done>`, values.Limits{}); err != nil {
		t.Errorf("brackets inside a string: %v", err)
	}

	// What may be compacted: plain ack, one result, final, with XML-safe JSON.
	ack, fin := &Element{Kind: KindAck, Meta: Meta{Seq: 1}}, &Element{Kind: KindFinal, Meta: Meta{Seq: 3}}
	data := func(p string, m Meta) *Element {
		m.Seq = 2
		return &Element{Kind: KindData, Payload: json.RawMessage(p), Meta: m}
	}
	for _, c := range []struct {
		name string
		els  []*Element
		ok   bool
	}{
		{"result", []*Element{ack, data(`"x"`, Meta{}), fin}, true},
		{"no result", []*Element{ack, fin}, true},
		{"intermediate", []*Element{ack, data(`1`, Meta{Intermediate: true, Key: "k"}), fin}, false},
		{"named agent", []*Element{ack, data(`1`, Meta{Agent: "a@b/c"}), fin}, true},
		{"failed agent", []*Element{ack, data(`{}`, Meta{Agent: "a", Failed: true}), fin}, false},
		{"signed", []*Element{ack, data(`1`, Meta{Signature: []byte{1}}), fin}, false},
		{"carriage return", []*Element{ack, data("[1,\r2]", Meta{}), fin}, false},
		{"U+FFFF", []*Element{ack, data("\"\uffff\"", Meta{}), fin}, false},
		{"control character", []*Element{ack, data("\"\x01\"", Meta{}), fin}, false},
		{"invalid UTF-8", []*Element{ack, data("\"\xff\"", Meta{}), fin}, false},
		{"two results", []*Element{ack, data(`1`, Meta{}), data(`2`, Meta{}), fin}, false},
		{"error", []*Element{ack, {Kind: KindError, Payload: errorPayload("c", "m")}}, false},
		{"nack", []*Element{{Kind: KindNack, Payload: errorPayload("c", "m")}}, false},
	} {
		if _, _, ok := compactDone(c.els); ok != c.ok {
			t.Errorf("%s: compact %v, want %v", c.name, ok, c.ok)
		}
	}
}

// TestCallElement: what AppendCall writes DecodeCall reads back; malformed
// ones are bad requests; what compactOp leaves as <op>.
func TestCallElement(t *testing.T) {
	decode := func(text string) (*Element, error) {
		return decodeFirst(text, func(r xml.TokenReader, st xml.StartElement) (*Element, error) {
			return DecodeCall(r, st, values.Limits{})
		})
	}
	at := time.Date(2026, 11, 26, 1, 2, 3, 4, time.UTC)
	op := &Element{Kind: KindOp, Token: "T", Type: "/a/b", Scope: ScopeSingle, Payload: json.RawMessage(`[1,{"a":"<x>"}]`),
		Meta: Meta{Timeout: 1500 * time.Millisecond, RequestID: "r", Selector: "all", Persistent: true, Batch: true, Compact: true,
			Hops: []Hop{{By: "b1.test", At: at}, {By: "b2.test"}}}}
	if !compactOp(op) {
		t.Fatal("a plain op is not compacted")
	}
	text := string(encodeXML(AppendCall(nil, op)))
	got, err := decode(text)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, op) {
		t.Errorf("round trip of %s:\n got %+v\nwant %+v", text, got, op)
	}
	if strings.Contains(text, "batch=") || strings.Contains(text, "compact=") {
		t.Errorf("a <call> says batch or compact when true: %s", text)
	}
	// False is said, and read back.
	plain := *op
	plain.Meta.Batch, plain.Meta.Compact = false, false
	text = string(encodeXML(AppendCall(nil, &plain)))
	if got, err = decode(text); err != nil || !reflect.DeepEqual(got, &plain) {
		t.Errorf("round trip of %s:\n got %+v, %v\nwant %+v", text, got, err, &plain)
	}
	for _, c := range []struct{ name, text string }{
		{"no token", `<call xmlns='urn:nanite:op:0' type='/a/b'/>`},
		{"no type", `<call xmlns='urn:nanite:op:0' token='T'/>`},
		{"odd hops", `<call xmlns='urn:nanite:op:0' token='T' type='/a/b' hops='b1.test'/>`},
		{"bad hop time", `<call xmlns='urn:nanite:op:0' token='T' type='/a/b' hops='b1.test yesterday'/>`},
		{"bad deadline", `<call xmlns='urn:nanite:op:0' token='T' type='/a/b' deadline-ms='-5'/>`},
		{"not JSON", `<call xmlns='urn:nanite:op:0' token='T' type='/a/b'>{</call>`},
		{"child element", `<call xmlns='urn:nanite:op:0' token='T' type='/a/b'><meta/></call>`},
		{"long type", `<call xmlns='urn:nanite:op:0' token='T' type='` + strings.Repeat("a", 300) + `'/>`},
	} {
		if _, err := decode(c.text); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%s: %v, want a bad request", c.name, err)
		}
	}
	for name, m := range map[string]func(*Element){
		"tags":                      func(e *Element) { e.Meta.Tags = []string{"eu"} },
		"signature":                 func(e *Element) { e.Meta.Signature = []byte{1} },
		"certificate":               func(e *Element) { e.Meta.Certificate = []byte{1} },
		"origin":                    func(e *Element) { e.Meta.Origin = []byte{1} },
		"hop by a JID with a space": func(e *Element) { e.Meta.Hops = []Hop{{By: "a@b/c d"}} },
		"payload with a CR":         func(e *Element) { e.Payload = json.RawMessage("[1,\r2]") },
	} {
		e := *op
		e.Meta.Hops = slices.Clone(op.Meta.Hops)
		m(&e)
		if compactOp(&e) {
			t.Errorf("%s: compacted", name)
		}
	}
}

// decodeFirst reads the first element of text with decode.
func decodeFirst[T any](text string, decode func(xml.TokenReader, xml.StartElement) (T, error)) (T, error) {
	d := xml.NewDecoder(strings.NewReader(text))
	for {
		tok, err := d.Token()
		if err != nil {
			var zero T
			return zero, err
		}
		if st, ok := tok.(xml.StartElement); ok {
			return decode(d, st)
		}
	}
}

// FuzzPlainlyEncodes: what plainlyEncodes lets through without encoding
// it (sendLocked) always encodes.
func FuzzPlainlyEncodes(f *testing.F) {
	for _, s := range []string{`"a"`, `{"a":[1,2,{"b":null}]}`, `{}`, `[]`, `1e400`, `-0.5`, `true`, `"\u0001"`, `{"\b":1}`,
		`"\ufffe"`, `{"a":1}{`, `[1,]`, "\"\x01\"", "\"\xff\"", strings.Repeat("[", 40) + strings.Repeat("]", 40),
		strings.Repeat("[", 70) + strings.Repeat("]", 70), `{"a b":"<&>"}`, `"` + "\uFFFF" + `"`, ` 7 `} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if !plainlyEncodes(b) {
			return
		}
		if _, err := values.AppendPayload(nil, b); err != nil {
			t.Errorf("plainlyEncodes(%q) but AppendPayload: %v", b, err)
		}
	})
}
