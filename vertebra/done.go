package vertebra

import (
	"encoding/json"
	"encoding/xml"
	"io"
	"strings"
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
	maxBytes, maxDepth := lim.MaxBytes, lim.MaxDepth
	if maxBytes <= 0 {
		maxBytes = values.DefaultLimits.MaxBytes
	}
	if maxDepth <= 0 {
		maxDepth = values.DefaultLimits.MaxDepth
	}
	var text []byte
	for {
		tok, err := r.Token()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, badRequest("<done>: %v", err)
		}
		if cd, ok := tok.(xml.CharData); ok {
			if len(text)+len(cd) > maxBytes {
				return nil, badRequest("<done> longer than %d bytes", maxBytes)
			}
			text = append(text, cd...)
			continue
		}
		if st, ok := tok.(xml.StartElement); ok {
			return nil, badRequest("unknown child element {%s}%s in <done>", st.Name.Space, st.Name.Local)
		}
		if _, ok := tok.(xml.EndElement); ok {
			break
		}
	}
	els := []*Element{{Kind: KindOp, Token: token}, {Kind: KindAck, Token: token, Meta: Meta{Seq: 1}}}
	if strings.Trim(string(text), " \t\r\n") != "" {
		if !json.Valid(text) {
			return nil, badRequest("<done> holds no valid JSON")
		}
		if d := jsonDepth(text); d > maxDepth {
			return nil, badRequest("<done>: JSON nested %d levels, more than %d", d, maxDepth)
		}
		els = append(els, &Element{Kind: KindData, Token: token, Payload: json.RawMessage(text), Meta: Meta{Seq: 2, Agent: agent}})
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
