package vertebra

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nanite-go/nanite/vertebra/values"
)

// The compact echo. A quick op that a component answers in its echo (see
// AppendBatch) is, most of the time, exactly an ack, one result and a
// final: the batch then spends nine elements (batch, op, ack, data, final,
// three <meta>, the value) on what one element says. For a caller that
// offered it (Meta.Compact), the responder sends instead
//
//	<done xmlns="urn:nanite:op:0" token="T:S">{"the":"result"}</done>
//
// in the IQ-result: the echo, ack (seq 1), a data holding the JSON text as
// its payload (seq 2), and final (seq 3); an empty <done/> is an ack and a
// final (seq 2). An agent attribute is the data's Meta.Agent (a cluster
// naming the agent that answered). The payload is JSON text, not typed values: both ends are
// this project's, and XML elements are what the XMPP server and both
// parsers spend most of their time on (docs/xmpp.md, "Batching").

// compactDone reports whether els (the elements an echo carries) can be
// sent as a <done>, and with which payload (nil: none).
func compactDone(els []*Element) (payload json.RawMessage, agent string, ok bool) {
	// Only the plain elements: no meta but their numbers (no key, agent,
	// failed mark, signature...), no payload but the result's.
	plain := func(el *Element, kind Kind, payload bool) bool {
		m := el.Meta
		m.Seq = 0
		if kind == KindData {
			m.Agent = ""
		}
		return el.Kind == kind && m.isZero() && el.Type == "" && el.Scope == "" && (len(el.Payload) > 0) == payload
	}
	switch len(els) {
	case 2:
		return nil, "", plain(els[0], KindAck, false) && plain(els[1], KindFinal, false)
	case 3:
		d := els[1]
		if plain(els[0], KindAck, false) && plain(d, KindData, true) && plain(els[2], KindFinal, false) &&
			len(d.Meta.Agent) <= maxTokenLen && xmlSafeText(d.Payload) {
			return d.Payload, d.Meta.Agent, true
		}
	}
	return nil, "", false
}

// plainlyEncodes reports, cheaply, that values.AppendPayload cannot fail
// on b: valid JSON well within the nesting limit, with no escape sequence
// (which could stand for a character XML cannot carry) and no such
// character itself. False says nothing: the encoder decides.
func plainlyEncodes(b []byte) bool {
	return !bytes.ContainsRune(b, '\\') && xmlSafeText(b) && json.Valid(b) && jsonDepth(b) < values.DefaultLimits.MaxDepth/2
}

// xmlSafeText reports whether b goes through XML text unchanged: valid
// UTF-8 without characters XML 1.0 cannot carry (C0 controls but tab and
// newline, U+FFFE, U+FFFF) and without carriage returns (which XML turns
// into newlines).
func xmlSafeText(b []byte) bool {
	for i := 0; i < len(b); {
		c := b[i]
		if c < utf8.RuneSelf {
			if c < 0x20 && c != '\t' && c != '\n' {
				return false
			}
			i++
			continue
		}
		r, n := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && n == 1 || r == 0xFFFE || r == 0xFFFF {
			return false
		}
		i += n
	}
	return true
}

var doneName = xml.Name{Space: NSMeta, Local: "done"}

// AppendDone appends the compact echo <done> of the op with token (T:S)
// that was acked, gave payload as its one result (nil: none; from agent
// when not "") and ended with final. A responder sends it only to a caller whose op had
// Meta.Compact, and only for payloads that pass through XML text intact.
func AppendDone(toks []xml.Token, token, agent string, payload json.RawMessage) []xml.Token {
	st := xml.StartElement{Name: doneName, Attr: []xml.Attr{{Name: xml.Name{Local: "token"}, Value: token}}}
	if agent != "" {
		st.Attr = append(st.Attr, xml.Attr{Name: xml.Name{Local: "agent"}, Value: agent})
	}
	toks = append(toks, st)
	if len(payload) > 0 {
		toks = append(toks, xml.CharData(payload))
	}
	return append(toks, xml.EndElement{Name: doneName})
}

// DecodeDone reads the <done> element that start opens and returns what
// it stands for: the op's echo (its token), ack, the data (when it holds a
// payload) and final, numbered as the responder would have. The payload
// must be JSON within lim (bytes and nesting).
func DecodeDone(r xml.TokenReader, start xml.StartElement, lim values.Limits) ([]*Element, error) {
	if start.Name != doneName {
		return nil, badRequest("element {%s}%s is not a done", start.Name.Space, start.Name.Local)
	}
	token := attrValue(start.Attr, "token")
	if token == "" || len(token) > maxTokenLen {
		return nil, badRequest("<done> without a valid token")
	}
	agent := attrValue(start.Attr, "agent")
	if len(agent) > maxTokenLen {
		return nil, badRequest("<done> attribute agent longer than %d bytes", maxTokenLen)
	}
	text, err := readJSONText(r, start, lim)
	if err != nil {
		return nil, err
	}
	els := []*Element{{Kind: KindOp, Token: token}, {Kind: KindAck, Token: token, Meta: Meta{Seq: 1}}}
	if text != nil {
		els = append(els, &Element{Kind: KindData, Token: token, Payload: text, Meta: Meta{Seq: 2, Agent: agent}})
	}
	return append(els, &Element{Kind: KindFinal, Token: token, Meta: Meta{Seq: len(els)}}), nil
}

// jsonDepth returns the deepest nesting of arrays and objects in valid
// JSON text.
func jsonDepth(b []byte) int {
	depth, most := 0, 0
	inString, escaped := false, false
	for _, c := range b {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '[' || c == '{':
			depth++
			most = max(most, depth)
		case c == ']' || c == '}':
			depth--
		}
	}
	return most
}

// readJSONText reads the text of the element that start opens, up to its
// end: JSON within lim (bytes and nesting), or nothing (nil).
func readJSONText(r xml.TokenReader, start xml.StartElement, lim values.Limits) (json.RawMessage, error) {
	maxBytes, maxDepth := lim.MaxBytes, lim.MaxDepth
	if maxBytes <= 0 {
		maxBytes = values.DefaultLimits.MaxBytes
	}
	if maxDepth <= 0 {
		maxDepth = values.DefaultLimits.MaxDepth
	}
	name := start.Name.Local
	var text []byte
	for {
		tok, err := r.Token()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, badRequest("<%s>: %v", name, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			if len(text)+len(t) > maxBytes {
				return nil, badRequest("<%s> longer than %d bytes", name, maxBytes)
			}
			text = append(text, t...)
		case xml.StartElement:
			return nil, badRequest("unknown child element {%s}%s in <%s>", t.Name.Space, t.Name.Local, name)
		case xml.EndElement:
			if strings.Trim(string(text), " \t\r\n") == "" {
				return nil, nil
			}
			if !json.Valid(text) {
				return nil, badRequest("<%s> holds no valid JSON", name)
			}
			if d := jsonDepth(text); d > maxDepth {
				return nil, badRequest("<%s>: JSON nested %d levels, more than %d", name, d, maxDepth)
			}
			return text, nil
		}
	}
}

// The compact op. Once a peer has answered with <done> it is known to be
// this project's, and later ops to it that carry nothing but attributes
// (no tags, signature, certificate or origin; hop record allowed) go as
//
//	<call xmlns="urn:nanite:op:0" token="T" type="/actor/method"
//	      deadline-ms="9999" request-id="..." selector="..." hops="by at by at"
//	      >"the arguments as JSON"</call>
//
// instead of <op> with typed values and a <meta> (and a <hop> element per
// bridge); batch and compact are true unless an attribute says "0" (only
// callers that read <done> send <call>). A peer that refuses it (an older
// one) is sent <op> again and not sent <call> any more.

var callName = xml.Name{Space: NSMeta, Local: "call"}

// compactOp reports whether op can be sent as a <call>.
func compactOp(op *Element) bool {
	m := op.Meta
	if len(m.Tags) > 0 || m.Signature != nil || m.Certificate != nil || m.Origin != nil || m.Seq != 0 ||
		m.Intermediate || m.Agent != "" || m.Failed || !xmlSafeText(op.Payload) {
		return false
	}
	for _, h := range m.Hops {
		if h.By == "" || strings.ContainsAny(h.By, " \t\r\n") {
			return false
		}
	}
	return true
}

// AppendCall appends op (an op that compactOp accepts) as a <call>.
func AppendCall(toks []xml.Token, op *Element) []xml.Token {
	st := xml.StartElement{Name: callName, Attr: make([]xml.Attr, 0, 8)}
	attr := func(k, v string) { st.Attr = append(st.Attr, xml.Attr{Name: xml.Name{Local: k}, Value: v}) }
	attr("token", op.Token)
	attr("type", op.Type)
	if op.Scope != "" {
		attr("scope", op.Scope)
	}
	m := &op.Meta
	if m.Timeout > 0 {
		attr("deadline-ms", strconv.FormatInt(max(m.Timeout.Milliseconds(), 1), 10))
	}
	if m.RequestID != "" {
		attr("request-id", m.RequestID)
	}
	if m.Selector != "" {
		attr("selector", m.Selector)
	}
	if len(m.Hops) > 0 {
		var b strings.Builder
		for i, h := range m.Hops {
			if i > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(h.By)
			b.WriteByte(' ')
			if h.At.IsZero() {
				b.WriteByte('-')
			} else {
				b.WriteString(h.At.UTC().Format(time.RFC3339Nano))
			}
		}
		attr("hops", b.String())
	}
	if m.Persistent {
		attr("persistent", "1")
	}
	// A <call> goes only to peers that read <done>, from callers that do:
	// batch and compact are its default, said only when false.
	if !m.Batch {
		attr("batch", "0")
	}
	if !m.Compact {
		attr("compact", "0")
	}
	toks = append(toks, st)
	if len(op.Payload) > 0 {
		toks = append(toks, xml.CharData(op.Payload))
	}
	return append(toks, xml.EndElement{Name: callName})
}

// DecodeCall reads the <call> element that start opens as the op it
// stands for, with the same limits as DecodeElement (and lim for the JSON).
func DecodeCall(r xml.TokenReader, start xml.StartElement, lim values.Limits) (*Element, error) {
	if start.Name != callName {
		return nil, badRequest("element {%s}%s is not a call", start.Name.Space, start.Name.Local)
	}
	el := &Element{Kind: KindOp}
	var metaAttrs []xml.Attr
	for _, a := range start.Attr {
		if a.Name.Space != "" {
			continue
		}
		switch a.Name.Local {
		case "token", "type", "scope":
			if len(a.Value) > maxTokenLen {
				return nil, badRequest("<call> attribute %s longer than %d bytes", a.Name.Local, maxTokenLen)
			}
			switch a.Name.Local {
			case "token":
				el.Token = a.Value
			case "type":
				el.Type = a.Value
			default:
				el.Scope = a.Value
			}
		case "hops":
			f := strings.Fields(a.Value)
			if len(f)%2 != 0 || len(f)/2 > maxMetaList {
				return nil, badRequest("<call> hops is not at most %d pairs of a JID and a time", maxMetaList)
			}
			for i := 0; i < len(f); i += 2 {
				h := Hop{By: f[i]}
				if len(h.By) > 3*1023 {
					return nil, badRequest("<call> hop by a JID longer than %d bytes", 3*1023)
				}
				if f[i+1] != "-" {
					at, err := time.Parse(time.RFC3339Nano, f[i+1])
					if err != nil {
						return nil, badRequest("<call> hop time %q is not RFC 3339", f[i+1])
					}
					h.At = at
				}
				el.Meta.Hops = append(el.Meta.Hops, h)
			}
		default:
			metaAttrs = append(metaAttrs, a)
		}
	}
	if el.Token == "" {
		return nil, badRequest("<call> without a token")
	}
	if el.Type == "" {
		return nil, badRequest("<call> without a type")
	}
	// The rest are <meta>'s attributes, read as there.
	hops := el.Meta.Hops
	if err := el.Meta.decode(emptyReader{}, xml.StartElement{Name: xml.Name{Space: NSMeta, Local: "meta"}, Attr: metaAttrs}); err != nil {
		return nil, err
	}
	el.Meta.Hops = hops
	if attrValue(start.Attr, "batch") == "" {
		el.Meta.Batch = true
	}
	if attrValue(start.Attr, "compact") == "" {
		el.Meta.Compact = true
	}
	el.Meta.Seq, el.Meta.Intermediate, el.Meta.Key, el.Meta.Agent, el.Meta.Failed = 0, false, "", "", false
	p, err := readJSONText(r, start, lim)
	if err != nil {
		return nil, err
	}
	el.Payload = p
	return el, nil
}

// emptyReader is the end of an element with nothing in it.
type emptyReader struct{}

func (emptyReader) Token() (xml.Token, error) { return xml.EndElement{}, nil }
