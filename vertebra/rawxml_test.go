package vertebra

import (
	"bytes"
	"encoding/xml"
	"io"
	"reflect"
	"strings"
	"testing"

	"mellium.im/xmpp/jid"
)

// decodeAll reads the tokens of one stanza in a component stream: what a
// peer's parser sees, namespaces resolved, xmlns attributes left out.
func decodeAll(t *testing.T, stanza []byte) []xml.Token {
	t.Helper()
	doc := `<stream:stream xmlns="jabber:component:accept" xmlns:stream="http://etherx.jabber.org/streams">` + string(stanza) + `</stream:stream>`
	d := xml.NewDecoder(strings.NewReader(doc))
	var out []xml.Token
	depth := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("decode %s: %v", stanza, err)
		}
		switch v := tok.(type) {
		case xml.StartElement:
			depth++
			if depth == 1 {
				continue
			}
			var attrs []xml.Attr
			for _, a := range v.Attr {
				if a.Name.Local != "xmlns" && a.Name.Space != "xmlns" {
					attrs = append(attrs, a)
				}
			}
			v.Attr = attrs
			out = append(out, v)
		case xml.EndElement:
			depth--
			if depth == 0 {
				continue
			}
			out = append(out, v)
		case xml.CharData:
			if depth > 1 {
				// Adjacent text comes in one or several pieces.
				if n := len(out); n > 0 {
					if prev, ok := out[n-1].(xml.CharData); ok {
						out[n-1] = append(prev.Copy(), v...)
						continue
					}
				}
				out = append(out, v.Copy())
			}
		}
	}
	return out
}

// encodeStd renders toks as mellium does: through encoding/xml.
func encodeStd(t *testing.T, toks []xml.Token) []byte {
	t.Helper()
	var buf bytes.Buffer
	e := xml.NewEncoder(&buf)
	for _, tok := range toks {
		if err := e.EncodeToken(tok); err != nil {
			t.Fatalf("encode: %v", err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestAppendStanza(t *testing.T) {
	name := func(space, local string) xml.Name { return xml.Name{Space: space, Local: local} }
	attr := func(local, v string) xml.Attr { return xml.Attr{Name: name("", local), Value: v} }
	iq := xml.StartElement{Name: name("", "iq"), Attr: []xml.Attr{attr("type", "set"), attr("id", `a"b<c>&d`), attr("to", "x@y/z\t\n\r")}}
	batch := xml.StartElement{Name: name(NSMeta, "batch")}
	call := xml.StartElement{Name: name(NSMeta, "call"), Attr: []xml.Attr{attr("token", "T1"), {Name: name(xmlNS, "lang"), Value: "en"}}}
	op := xml.StartElement{Name: name(NS, "op"), Attr: []xml.Attr{attr("token", "T2")}}
	str := xml.StartElement{Name: name("", "string")}
	cases := []struct {
		name string
		toks []xml.Token
		want string // a part of the text appendStanza writes
	}{
		{"json text keeps its quotes", []xml.Token{iq, batch, call, xml.CharData(`{"a":"b & <c> ]]> ` + "\r" + `"}`), call.End(), batch.End(), iq.End()},
			`<call token="T1" xml:lang="en">{"a":"b &amp; &lt;c&gt; ]]&gt; &#xD;"}</call>`},
		{"children inherit the namespace", []xml.Token{iq, batch, call, call.End(), call, call.End(), batch.End(), iq.End()},
			`<batch xmlns="` + NSMeta + `"><call token`},
		{"another namespace is declared", []xml.Token{iq, batch, op, str, xml.CharData("é\u0001\uFFFE"), str.End(), op.End(), batch.End(), iq.End()},
			`<op xmlns="` + NS + `" token="T2"><string>é` + "\uFFFD\uFFFD" + `</string>`},
		{"attribute values are escaped", []xml.Token{iq, iq.End()},
			`<iq type="set" id="a&quot;b&lt;c&gt;&amp;d" to="x@y/z&#x9;&#xA;&#xD;">`},
		{"an xmlns attribute declares", []xml.Token{iq, xml.StartElement{Name: name("", "query"), Attr: []xml.Attr{attr("xmlns", "urn:x")}}, xml.EndElement{Name: name("", "query")}, iq.End()},
			`<query xmlns="urn:x"></query>`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b, ok := appendStanza(nil, c.toks)
			if !ok {
				t.Fatalf("not rendered: %v", c.toks)
			}
			if !strings.Contains(string(b), c.want) {
				t.Errorf("got\n%s\nwant it to contain\n%s", b, c.want)
			}
			if strings.HasPrefix(string(b), "<iq xmlns") {
				t.Errorf("the stanza declares a namespace: %s", b)
			}
			got, want := decodeAll(t, b), decodeAll(t, encodeStd(t, c.toks))
			if !reflect.DeepEqual(got, want) {
				t.Errorf("a parser reads\n%v\nfrom %s, and\n%v\nfrom encoding/xml's %s", got, b, want, encodeStd(t, c.toks))
			}
		})
	}
	// What it leaves to the encoder.
	for _, toks := range [][]xml.Token{
		nil,
		{iq},
		{iq, iq.End(), iq, iq.End()},
		{iq, xml.Comment("c"), iq.End()},
		{iq, xml.StartElement{Name: name("", "x"), Attr: []xml.Attr{{Name: name("urn:other", "a"), Value: "v"}}}, xml.EndElement{Name: name("", "x")}, iq.End()},
		{iq, xml.StartElement{Name: name("", "x"), Attr: []xml.Attr{attr("xmlns", "")}}, xml.EndElement{Name: name("", "x")}, iq.End()},
		{xml.StartElement{Name: name("urn:not-a-stanza", "iq")}, xml.EndElement{Name: name("urn:not-a-stanza", "iq")}},
		{xml.CharData("text"), iq, iq.End()},
		{iq.End()},
	} {
		if b, ok := appendStanza(nil, toks); ok {
			t.Errorf("rendered %v as %s; want it left to the encoder", toks, b)
		}
	}
}

func BenchmarkAppendStanza(b *testing.B) {
	toks := iqTokens("ID", jid.MustParse("a@b"), jid.MustParse("c@d"), AppendDone(nil, "TOKEN:SUFFIX", "agent@x/y", []byte(`{"a":"b","c":[1,2,3],"d":"`+strings.Repeat("x", 100)+`"}`)))
	b.Run("appendStanza", func(b *testing.B) {
		var buf []byte
		for b.Loop() {
			buf, _ = appendStanza(buf[:0], toks)
		}
	})
	b.Run("encoding/xml", func(b *testing.B) {
		var buf bytes.Buffer
		for b.Loop() {
			buf.Reset()
			e := xml.NewEncoder(&buf)
			for _, tok := range toks {
				_ = e.EncodeToken(tok)
			}
			_ = e.Flush()
		}
	})
}
