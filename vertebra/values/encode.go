package values

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
)

// AppendValue appends to toks the tokens of an unnamed value element for the
// JSON document v. The elements have no namespace: they inherit NS from the
// element they are written in.
func AppendValue(toks []xml.Token, v []byte) ([]xml.Token, error) {
	return appendTop(toks, v, "", false)
}

// AppendNamed is like AppendValue with a name attribute (a struct member or
// a named argument).
func AppendNamed(toks []xml.Token, name string, v []byte) ([]xml.Token, error) {
	return appendTop(toks, v, name, true)
}

// AppendPayload appends the value elements of a payload (see the package
// documentation): nothing for a nil or empty payload, one named element per
// member of a non-empty object, otherwise one unnamed element.
func AppendPayload(toks []xml.Token, payload []byte) ([]xml.Token, error) {
	p := bytes.TrimSpace(payload)
	if len(p) == 0 {
		return toks, nil
	}
	if p[0] != '{' {
		return AppendValue(toks, p)
	}
	e := newEncoder(toks, p)
	if _, err := e.dec.Token(); err != nil { // '{'
		return toks, e.fail(nil, err)
	}
	if !e.dec.More() {
		// {} has no members to name: send it as one unnamed <struct/>.
		return AppendValue(toks, p)
	}
	top := &path{}
	for i := 0; e.dec.More(); i++ {
		kt, err := e.dec.Token()
		if err != nil {
			return toks, e.fail(top, err)
		}
		key, _ := kt.(string)
		vt, err := e.dec.Token()
		if err != nil {
			return toks, e.fail(top, err)
		}
		if err := e.value(&path{parent: nil, member: key, named: true}, key, true, vt, 0); err != nil {
			return toks, err
		}
	}
	if _, err := e.dec.Token(); err != nil { // '}'
		return toks, e.fail(top, err)
	}
	if err := e.end(); err != nil {
		return toks, err
	}
	return e.toks, nil
}

func appendTop(toks []xml.Token, v []byte, name string, named bool) ([]xml.Token, error) {
	e := newEncoder(toks, v)
	tok, err := e.dec.Token()
	if err != nil {
		return toks, e.fail(nil, err)
	}
	p := &path{}
	if named {
		p = &path{member: name, named: true}
	}
	if err := e.value(p, name, named, tok, 0); err != nil {
		return toks, err
	}
	if err := e.end(); err != nil {
		return toks, err
	}
	return e.toks, nil
}

type encoder struct {
	dec  *json.Decoder
	toks []xml.Token
}

func newEncoder(toks []xml.Token, v []byte) *encoder {
	d := json.NewDecoder(bytes.NewReader(v))
	d.UseNumber()
	return &encoder{dec: d, toks: toks}
}

// end checks that nothing follows the JSON value.
func (e *encoder) end() error {
	if _, err := e.dec.Token(); err != io.EOF {
		return &Error{Detail: "invalid JSON: data after the value", Err: ErrUnrepresentable}
	}
	return nil
}

func (e *encoder) fail(p *path, err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return &Error{Path: p.String(), Detail: "invalid JSON: " + err.Error(), Err: ErrUnrepresentable}
}

func (e *encoder) start(local, name string, named bool, attrs ...xml.Attr) {
	st := xml.StartElement{Name: xml.Name{Local: local}}
	if named {
		if strings.ContainsAny(name, "\t\n\r") {
			// XML normalises these in attribute values.
			st.Attr = []xml.Attr{{Name: xml.Name{Local: attrNameBase64}, Value: base64.StdEncoding.EncodeToString([]byte(name))}}
		} else {
			st.Attr = []xml.Attr{{Name: xml.Name{Local: attrName}, Value: name}}
		}
	}
	st.Attr = append(st.Attr, attrs...)
	e.toks = append(e.toks, st)
}

func (e *encoder) end1(local string) {
	e.toks = append(e.toks, xml.EndElement{Name: xml.Name{Local: local}})
}

func (e *encoder) scalar(local, name string, named bool, text string, attrs ...xml.Attr) {
	e.start(local, name, named, attrs...)
	if text != "" {
		e.toks = append(e.toks, xml.CharData(text))
	}
	e.end1(local)
}

func (e *encoder) value(p *path, name string, named bool, tok json.Token, depth int) error {
	if named {
		if r, bad := badXMLChar(name); bad {
			return &Error{Path: p.String(), Detail: fmt.Sprintf("member name has character %U, which XML cannot carry", r), Err: ErrUnrepresentable}
		}
	}
	switch t := tok.(type) {
	case json.Delim:
		depth++
		if depth > DefaultLimits.MaxDepth {
			return &Error{Path: p.String(), Detail: fmt.Sprintf("nested deeper than %d", DefaultLimits.MaxDepth), Err: ErrLimit}
		}
		local, closer := TypeStruct, json.Delim('}')
		if t == '[' {
			local, closer = TypeList, ']'
		}
		e.start(local, name, named)
		for i := 0; e.dec.More(); i++ {
			cp := &path{parent: p, index: i}
			cname, cnamed := "", false
			if t == '{' {
				kt, err := e.dec.Token()
				if err != nil {
					return e.fail(p, err)
				}
				cname, cnamed = kt.(string), true
				cp = &path{parent: p, member: cname, named: true}
			}
			vt, err := e.dec.Token()
			if err != nil {
				return e.fail(cp, err)
			}
			if err := e.value(cp, cname, cnamed, vt, depth); err != nil {
				return err
			}
		}
		ct, err := e.dec.Token()
		if err != nil {
			return e.fail(p, err)
		}
		if ct != closer {
			return &Error{Path: p.String(), Detail: "invalid JSON", Err: ErrUnrepresentable}
		}
		e.end1(local)
	case string:
		if r, bad := badXMLChar(t); bad {
			return &Error{Path: p.String(), Detail: fmt.Sprintf("string has character %U, which XML cannot carry", r), Err: ErrUnrepresentable}
		}
		if strings.ContainsRune(t, '\r') {
			// XML turns CR (and CR LF) in text into LF, and servers do not
			// keep the &#xD; that would protect it.
			e.scalar(TypeString, name, named, base64.StdEncoding.EncodeToString([]byte(t)),
				xml.Attr{Name: xml.Name{Local: attrEnc}, Value: "base64"})
			break
		}
		e.scalar(TypeString, name, named, t)
	case json.Number:
		s := string(t)
		if isInt32(s) {
			e.scalar(TypeI4, name, named, s)
		} else {
			e.scalar(TypeDouble, name, named, s)
		}
	case bool:
		e.scalar(TypeBoolean, name, named, strconv.Itoa(b2i(t)))
	case nil:
		e.scalar(TypeNil, name, named, "")
	default:
		return &Error{Path: p.String(), Detail: fmt.Sprintf("invalid JSON token %v", tok), Err: ErrUnrepresentable}
	}
	return nil
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// path locates a value for error messages; it is rendered only on error.
type path struct {
	parent *path
	member string
	named  bool
	index  int
	elem   string // element name, when known (decoding)
}

func (p *path) String() string {
	if p == nil {
		return ""
	}
	var parts []string
	for q := p; q != nil; q = q.parent {
		var s string
		switch {
		case q.named:
			s = "." + strconv.Quote(q.member)
			if isIdent(q.member) {
				s = "." + q.member
			}
		case q.parent != nil:
			s = "[" + strconv.Itoa(q.index) + "]"
		case q.elem != "":
			s = "<" + q.elem + ">"
		}
		parts = append(parts, s)
	}
	var b []byte
	for i := len(parts) - 1; i >= 0; i-- {
		b = append(b, parts[i]...)
	}
	if len(b) == 0 {
		return ""
	}
	if b[0] == '.' {
		b = b[1:]
	}
	return string(b)
}

func isIdent(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range []byte(s) {
		if !(c == '_' || c == '-' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}
