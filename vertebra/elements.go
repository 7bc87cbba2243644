package vertebra

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/nanite-go/nanite/vertebra/values"
)

// Namespaces.
const (
	// NS is Vertebra's namespace: the op lifecycle elements and the typed
	// values.
	NS = values.NS
	// NSMeta is this project's namespace for the <meta> extension element
	// (deadline, request id, selector, tags, hop record, signature,
	// sequence numbers). Peers that do not know it may omit it.
	NSMeta = "urn:nanite:op:0"
)

// Kind is the name of a lifecycle element.
type Kind string

// The lifecycle elements. "result", Vertebra's older name for data, is
// accepted on input and read as KindData.
const (
	KindOp    Kind = "op"
	KindAck   Kind = "ack"
	KindNack  Kind = "nack"
	KindData  Kind = "data"
	KindFinal Kind = "final"
	KindError Kind = "error"
)

// Scopes of an op: where a Caller sends it.
const (
	ScopeDirect = "direct" // to the one JID given
	ScopeSingle = "single" // to one of the JIDs found, trying them until one accepts
	ScopeAll    = "all"    // to all JIDs found
)

// Element is one protocol element: the payload of an IQ-set (or, for the
// op echo, of the IQ-result).
type Element struct {
	Kind  Kind
	Token string // T for an op, T:S for everything the responder sends and the echo
	Type  string // op: the operation, "/actor/method"
	Scope string // op: direct, single or all (informational)
	// Payload is the JSON of the element's typed values (see package
	// values): the op's arguments, a data's result, the body of a nack or
	// error (see ErrorBody). nil when there are none.
	Payload json.RawMessage
	Meta    Meta
}

// Meta is the project extension <meta xmlns="urn:nanite:op:0">. Its zero
// value is not written.
type Meta struct {
	// Timeout is the time the op has left, as its sender saw it when it
	// sent the stanza (attribute deadline-ms). Relative, so that clocks
	// need not agree; each resend carries the time then left. 0: none.
	Timeout   time.Duration
	RequestID string   // attribute request-id: the caller's id of the request
	Selector  string   // attribute selector: how a cluster picks its agent (least_loaded, ...)
	Tags      []string // <tag>: agents must carry these tags
	Hops      []Hop    // <hop>: the bridges the op crossed, oldest first
	// Signature and Certificate are opaque (made and checked by the
	// security package), base64 on the wire.
	Signature   []byte
	Certificate []byte
	// Origin, on an op relayed by a bridge for a caller of its cluster, is
	// the request as that caller signed it (a Nanite envelope; base64 on
	// the wire, at most 2 MiB): the far side checks both the bridge's
	// signature and the caller's (docs/bridge.md).
	Origin []byte

	// Seq numbers the responder's stanzas of one op: 1 for ack or nack,
	// then 2, 3, ... (attribute seq). A caller uses it to restore the
	// order after resends. 0: none.
	Seq int
	// Intermediate marks a data as an intermediate result (attribute key,
	// present even when Key is empty); a data without it is a result.
	Intermediate bool
	Key          string
	// Batch, on an op, says that the caller accepts the responder's
	// stanzas folded into <batch> elements (attribute batch="1"); see
	// Batch.
	Batch bool
	// Compact, on an op that also has Batch, says that the caller accepts
	// the echo of a quick op as one <done> element (attribute
	// compact="1"); see AppendDone.
	Compact bool
	// Agent, on a data, names the agent that produced it (attribute
	// agent): a cluster answering for several agents (selector all) says
	// which one gave which result.
	Agent string
	// Persistent, on an op for a Nanite cluster, asks the bridge to relay
	// it as a persistent request (attribute persistent="1": durable
	// message, publisher confirm; docs/protocol.md).
	Persistent bool
	// Failed, on a data, says that this agent failed (attribute
	// failed="1"): the payload is an error body {"code", "message"}. Used
	// with Agent for one agent of a fan-out; the op itself goes on.
	Failed bool
}

// Hop is one bridge an op crossed.
type Hop struct {
	By string    // the bridge's JID
	At time.Time // when it relayed the op
}

func (m *Meta) isZero() bool {
	return m.Timeout == 0 && m.RequestID == "" && m.Selector == "" && len(m.Tags) == 0 &&
		len(m.Hops) == 0 && m.Signature == nil && m.Certificate == nil && m.Origin == nil && m.Seq == 0 && !m.Intermediate && !m.Batch && !m.Compact && m.Agent == "" && !m.Failed && !m.Persistent
}

// ErrorBody is the payload of a nack or error: {"code": ..., "message": ...}.
type ErrorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// ErrBadRequest: an element is malformed. Decoding errors wrap it; the
// receiver answers such an IQ with a bad-request stanza error.
var ErrBadRequest = errors.New("vertebra: bad request")

func badRequest(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadRequest, fmt.Sprintf(format, args...))
}

// AppendTokens appends the XML tokens of the element.
func (e *Element) AppendTokens(toks []xml.Token) ([]xml.Token, error) {
	name := xml.Name{Space: NS, Local: string(e.Kind)}
	st := xml.StartElement{Name: name, Attr: []xml.Attr{{Name: xml.Name{Local: "token"}, Value: e.Token}}}
	if e.Type != "" {
		st.Attr = append(st.Attr, xml.Attr{Name: xml.Name{Local: "type"}, Value: e.Type})
	}
	if e.Scope != "" {
		st.Attr = append(st.Attr, xml.Attr{Name: xml.Name{Local: "scope"}, Value: e.Scope})
	}
	toks = append(toks, st)
	var err error
	if toks, err = values.AppendPayload(toks, e.Payload); err != nil {
		return toks, err
	}
	if !e.Meta.isZero() {
		toks = e.Meta.appendTokens(toks)
	}
	return append(toks, xml.EndElement{Name: name}), nil
}

func (m *Meta) appendTokens(toks []xml.Token) []xml.Token {
	name := xml.Name{Space: NSMeta, Local: "meta"}
	st := xml.StartElement{Name: name}
	attr := func(k, v string) { st.Attr = append(st.Attr, xml.Attr{Name: xml.Name{Local: k}, Value: v}) }
	if m.Seq > 0 {
		attr("seq", strconv.Itoa(m.Seq))
	}
	if m.Intermediate {
		attr("key", m.Key)
	}
	if m.Timeout > 0 {
		ms := m.Timeout.Milliseconds()
		if ms < 1 {
			ms = 1
		}
		attr("deadline-ms", strconv.FormatInt(ms, 10))
	}
	if m.RequestID != "" {
		attr("request-id", m.RequestID)
	}
	if m.Selector != "" {
		attr("selector", m.Selector)
	}
	if m.Batch {
		attr("batch", "1")
	}
	if m.Compact {
		attr("compact", "1")
	}
	if m.Agent != "" {
		attr("agent", m.Agent)
	}
	if m.Failed {
		attr("failed", "1")
	}
	if m.Persistent {
		attr("persistent", "1")
	}
	toks = append(toks, st)
	text := func(local, s string) []xml.Token {
		n := xml.Name{Local: local}
		return append(toks, xml.StartElement{Name: n}, xml.CharData(s), xml.EndElement{Name: n})
	}
	for _, t := range m.Tags {
		toks = text("tag", t)
	}
	for _, h := range m.Hops {
		n := xml.Name{Local: "hop"}
		hs := xml.StartElement{Name: n, Attr: []xml.Attr{{Name: xml.Name{Local: "by"}, Value: h.By}}}
		if !h.At.IsZero() {
			hs.Attr = append(hs.Attr, xml.Attr{Name: xml.Name{Local: "at"}, Value: h.At.UTC().Format(time.RFC3339Nano)})
		}
		toks = append(toks, hs, xml.EndElement{Name: n})
	}
	if m.Signature != nil {
		toks = text("signature", base64.StdEncoding.EncodeToString(m.Signature))
	}
	if m.Certificate != nil {
		toks = text("certificate", base64.StdEncoding.EncodeToString(m.Certificate))
	}
	if m.Origin != nil {
		toks = text("origin", base64.StdEncoding.EncodeToString(m.Origin))
	}
	return append(toks, xml.EndElement{Name: name})
}

// Limits on what DecodeElement accepts besides the values' own limits.
const (
	maxTokenLen = 256      // token, type, scope and meta attributes
	maxMetaList = 64       // tags, hops
	maxBlob     = 64 << 10 // signature and certificate, decoded
	maxOrigin   = 2 << 20  // origin envelope, decoded
)

// DecodeElement reads the element that start opens (the rest of it from r)
// with the value limits lim. Unknown child elements, missing or oversized
// attributes and malformed values are errors wrapping ErrBadRequest (and a
// *values.Error for values).
func DecodeElement(r xml.TokenReader, start xml.StartElement, lim values.Limits) (*Element, error) {
	if start.Name.Space != NS {
		return nil, badRequest("element {%s}%s is not a Vertebra element", start.Name.Space, start.Name.Local)
	}
	e := &Element{Kind: Kind(start.Name.Local)}
	switch e.Kind {
	case KindOp, KindAck, KindNack, KindData, KindFinal, KindError:
	case "result":
		e.Kind = KindData
	default:
		return nil, badRequest("unknown element <%s>", start.Name.Local)
	}
	for _, a := range start.Attr {
		if a.Name.Space != "" {
			continue
		}
		switch a.Name.Local {
		case "token":
			e.Token = a.Value
		case "type":
			e.Type = a.Value
		case "scope":
			e.Scope = a.Value
		default:
			continue
		}
		if len(a.Value) > maxTokenLen {
			return nil, badRequest("<%s> attribute %s longer than %d bytes", e.Kind, a.Name.Local, maxTokenLen)
		}
	}
	if e.Token == "" {
		return nil, badRequest("<%s> without a token", start.Name.Local)
	}
	if e.Kind == KindOp && e.Type == "" {
		return nil, badRequest("<op> without a type")
	}
	pd := values.NewPayloadDecoder(lim)
	seenMeta := false
	for {
		tok, err := r.Token()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, badRequest("<%s>: %v", start.Name.Local, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			if strings.Trim(string(t), " \t\r\n") != "" {
				return nil, badRequest("text inside <%s>", start.Name.Local)
			}
		case xml.StartElement:
			switch {
			case t.Name.Space == NS && values.IsValue(t.Name.Local):
				if err := pd.Add(r, t); err != nil {
					return nil, fmt.Errorf("%w: <%s>: %w", ErrBadRequest, start.Name.Local, err)
				}
			case t.Name.Space == NSMeta && t.Name.Local == "meta" && !seenMeta:
				seenMeta = true
				if err := e.Meta.decode(r, t); err != nil {
					return nil, err
				}
			default:
				return nil, badRequest("unknown child element {%s}%s in <%s>", t.Name.Space, t.Name.Local, start.Name.Local)
			}
		case xml.EndElement:
			e.Payload = pd.Payload()
			return e, nil
		}
	}
}

func (m *Meta) decode(r xml.TokenReader, start xml.StartElement) error {
	for _, a := range start.Attr {
		if a.Name.Space != "" {
			continue
		}
		if len(a.Value) > maxTokenLen {
			return badRequest("meta attribute %s longer than %d bytes", a.Name.Local, maxTokenLen)
		}
		switch a.Name.Local {
		case "seq":
			n, err := strconv.Atoi(a.Value)
			if err != nil || n < 1 {
				return badRequest("meta seq %q is not a positive integer", a.Value)
			}
			m.Seq = n
		case "key":
			m.Intermediate, m.Key = true, a.Value
		case "deadline-ms":
			n, err := strconv.ParseInt(a.Value, 10, 64)
			if err != nil || n < 1 || n > int64(365*24*time.Hour/time.Millisecond) {
				return badRequest("meta deadline-ms %q is not a positive number of milliseconds", a.Value)
			}
			m.Timeout = time.Duration(n) * time.Millisecond
		case "request-id":
			m.RequestID = a.Value
		case "selector":
			m.Selector = a.Value
		case "batch":
			m.Batch = a.Value == "1" || a.Value == "true"
		case "compact":
			m.Compact = a.Value == "1" || a.Value == "true"
		case "agent":
			m.Agent = a.Value
		case "failed":
			m.Failed = a.Value == "1" || a.Value == "true"
		case "persistent":
			m.Persistent = a.Value == "1" || a.Value == "true"
		}
	}
	for {
		tok, err := r.Token()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return badRequest("<meta>: %v", err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			if strings.Trim(string(t), " \t\r\n") != "" {
				return badRequest("text inside <meta>")
			}
		case xml.EndElement:
			return nil
		case xml.StartElement:
			if t.Name.Space != NSMeta {
				return badRequest("unknown child element {%s}%s in <meta>", t.Name.Space, t.Name.Local)
			}
			switch t.Name.Local {
			case "tag", "signature", "certificate", "origin":
				limit, blob := maxTokenLen, maxBlob
				if t.Name.Local == "origin" {
					blob = maxOrigin
				}
				if t.Name.Local != "tag" {
					limit = blob * 4 / 3 * 2 // base64 with generous whitespace
				}
				s, err := readText(r, t, limit)
				if err != nil {
					return err
				}
				switch t.Name.Local {
				case "tag":
					if len(m.Tags) >= maxMetaList {
						return badRequest("more than %d tags", maxMetaList)
					}
					m.Tags = append(m.Tags, strings.TrimSpace(s))
				default:
					b, err := decodeBase64(s)
					if err != nil || len(b) > blob {
						return badRequest("meta %s is not base64 of at most %d bytes", t.Name.Local, blob)
					}
					switch t.Name.Local {
					case "signature":
						m.Signature = b
					case "certificate":
						m.Certificate = b
					default:
						m.Origin = b
					}
				}
			case "hop":
				if len(m.Hops) >= maxMetaList {
					return badRequest("more than %d hops", maxMetaList)
				}
				var h Hop
				for _, a := range t.Attr {
					switch a.Name.Local {
					case "by":
						h.By = a.Value
					case "at":
						at, err := time.Parse(time.RFC3339Nano, a.Value)
						if err != nil {
							return badRequest("hop time %q is not RFC 3339", a.Value)
						}
						h.At = at
					}
				}
				if h.By == "" || len(h.By) > 3*1023 {
					return badRequest("hop without a valid by attribute")
				}
				if _, err := readText(r, t, 0); err != nil {
					return err
				}
				m.Hops = append(m.Hops, h)
			default:
				return badRequest("unknown child element {%s}%s in <meta>", t.Name.Space, t.Name.Local)
			}
		}
	}
}

// readText reads the text of a simple element up to its end.
func readText(r xml.TokenReader, start xml.StartElement, limit int) (string, error) {
	var b []byte
	for {
		tok, err := r.Token()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return "", badRequest("<%s>: %v", start.Name.Local, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			if len(b)+len(t) > limit {
				return "", badRequest("<%s> longer than %d bytes", start.Name.Local, limit)
			}
			b = append(b, t...)
		case xml.StartElement:
			return "", badRequest("unknown child element {%s}%s in <%s>", t.Name.Space, t.Name.Local, start.Name.Local)
		case xml.EndElement:
			return string(b), nil
		}
	}
}

func decodeBase64(s string) ([]byte, error) {
	s = strings.Map(func(r rune) rune {
		if r == ' ' || r == '\t' || r == '\n' || r == '\r' {
			return -1
		}
		return r
	}, s)
	return base64.StdEncoding.DecodeString(s)
}

// errorPayload is the payload of a nack or error.
func errorPayload(code, msg string) json.RawMessage {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false)
	_ = e.Encode(ErrorBody{Code: code, Message: msg})
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// parseErrorBody reads the payload of a nack or error. Vertebra peers may
// send anything: a struct with code and message, a string, or nothing.
func parseErrorBody(p json.RawMessage) ErrorBody {
	var b ErrorBody
	if len(p) == 0 {
		return b
	}
	var s string
	if json.Unmarshal(p, &s) == nil {
		b.Message = s
		return b
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(p, &m) == nil {
		_ = json.Unmarshal(m["code"], &b.Code)
		for _, k := range []string{"message", "reason", "error", "response"} {
			if json.Unmarshal(m[k], &b.Message) == nil && b.Message != "" {
				break
			}
		}
		if b.Message != "" || b.Code != "" {
			return b
		}
	}
	b.Message = string(p)
	return b
}

// MaxBatch is the most elements a <batch> may hold.
const MaxBatch = 64

// AppendBatch appends <batch xmlns="urn:nanite:op:0"> holding els, in
// order. A responder sends its stanzas of one op folded this way (one
// IQ-set, one confirmation) to a caller whose op had Meta.Batch; a
// component responder may also answer the op itself with a batch that
// starts with the echo and holds the whole op.
func AppendBatch(toks []xml.Token, els []*Element) ([]xml.Token, error) {
	name := xml.Name{Space: NSMeta, Local: "batch"}
	toks = append(toks, xml.StartElement{Name: name})
	for _, el := range els {
		var err error
		if toks, err = el.AppendTokens(toks); err != nil {
			return toks, err
		}
	}
	return append(toks, xml.EndElement{Name: name}), nil
}

// DecodeBatch reads the <batch> element that start opens: at most MaxBatch
// lifecycle elements of one op (the same token), nothing else.
func DecodeBatch(r xml.TokenReader, start xml.StartElement, lim values.Limits) ([]*Element, error) {
	if start.Name.Space != NSMeta || start.Name.Local != "batch" {
		return nil, badRequest("element {%s}%s is not a batch", start.Name.Space, start.Name.Local)
	}
	var els []*Element
	for {
		tok, err := r.Token()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, badRequest("<batch>: %v", err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			if strings.Trim(string(t), " \t\r\n") != "" {
				return nil, badRequest("text inside <batch>")
			}
		case xml.StartElement:
			if len(els) == MaxBatch {
				return nil, badRequest("more than %d elements in <batch>", MaxBatch)
			}
			el, err := DecodeElement(r, t, lim)
			if err != nil {
				return nil, err
			}
			if len(els) > 0 && el.Token != els[0].Token {
				return nil, badRequest("elements of different ops in <batch>")
			}
			els = append(els, el)
		case xml.EndElement:
			if len(els) == 0 {
				return nil, badRequest("empty <batch>")
			}
			return els, nil
		}
	}
}

// decodeAnyBatch reads a <batch>: either a responder's stanzas of one or
// several ops (lifecycle elements, and <done> for a whole quick op) or
// several ops (<op> or <call>, ops true), at most MaxBatch elements.
func decodeAnyBatch(r xml.TokenReader, start xml.StartElement, lim values.Limits) (els []*Element, ops bool, err error) {
	if start.Name.Space != NSMeta || start.Name.Local != "batch" {
		return nil, false, badRequest("element {%s}%s is not a batch", start.Name.Space, start.Name.Local)
	}
	children := 0
	for {
		tok, err := r.Token()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, false, badRequest("<batch>: %v", err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			if strings.Trim(string(t), " \t\r\n") != "" {
				return nil, false, badRequest("text inside <batch>")
			}
		case xml.StartElement:
			if children == MaxBatch {
				return nil, false, badRequest("more than %d elements in <batch>", MaxBatch)
			}
			children++
			var el *Element
			var done []*Element
			switch t.Name {
			case callName:
				el, err = DecodeCall(r, t, lim)
			case doneName:
				// A whole quick op's stanzas (its echo went before).
				done, err = DecodeDone(r, t, lim)
				if err == nil {
					el, done = done[1], done[2:]
				}
			default:
				el, err = DecodeElement(r, t, lim)
			}
			if err != nil {
				return nil, false, err
			}
			if len(els) == 0 {
				ops = el.Kind == KindOp
			} else if (el.Kind == KindOp) != ops {
				return nil, false, badRequest("ops and other elements in one <batch>")
			}
			els = append(els, el)
			els = append(els, done...)
		case xml.EndElement:
			if len(els) == 0 {
				return nil, false, badRequest("empty <batch>")
			}
			return els, ops, nil
		}
	}
}
