package values

import (
	"encoding/base64"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// ReadValue converts the value element opened by start to JSON, reading its
// content and end element from r.
func ReadValue(r xml.TokenReader, start xml.StartElement, lim Limits) ([]byte, error) {
	d := &decoder{r: r, lim: lim.orDefault()}
	if err := d.value(start, &path{}, 0); err != nil {
		return nil, err
	}
	return d.buf, nil
}

// PayloadDecoder assembles a payload from the value elements of an op,
// data, nack or error element (see the package documentation). All values
// added share one set of limits.
type PayloadDecoder struct {
	d       decoder
	named   int
	unnamed int
}

// NewPayloadDecoder returns a decoder with the limits lim.
func NewPayloadDecoder(lim Limits) *PayloadDecoder {
	return &PayloadDecoder{d: decoder{lim: lim.orDefault()}}
}

// Add converts the value element opened by start, reading the rest of it
// from r.
func (p *PayloadDecoder) Add(r xml.TokenReader, start xml.StartElement) error {
	p.d.r = r
	name, named := nameAttr(start)
	switch {
	case named && p.unnamed > 0, !named && p.named > 0:
		return &Error{Path: start.Name.Local, Detail: "named and unnamed values mixed", Err: ErrInvalid}
	case !named && p.unnamed > 0:
		return &Error{Path: start.Name.Local, Detail: "more than one unnamed value", Err: ErrInvalid}
	}
	if named {
		if p.named == 0 {
			p.d.buf = append(p.d.buf, '{')
		} else {
			p.d.buf = append(p.d.buf, ',')
		}
		p.named++
		p.d.buf = appendString(p.d.buf, name)
		p.d.buf = append(p.d.buf, ':')
		return p.d.value(start, &path{member: name, named: true}, 0)
	}
	p.unnamed++
	return p.d.value(start, &path{}, 0)
}

// Payload returns the JSON payload: nil when no value was added.
func (p *PayloadDecoder) Payload() []byte {
	if p.named > 0 {
		return append(p.d.buf, '}')
	}
	if p.unnamed == 0 {
		return nil
	}
	return p.d.buf
}

// nameAttr returns the name of a value: its name attribute, or its
// name-base64 attribute decoded (names with tabs or line breaks).
func nameAttr(start xml.StartElement) (string, bool) {
	for _, a := range start.Attr {
		if a.Name.Space != "" {
			continue
		}
		switch a.Name.Local {
		case attrName:
			return a.Value, true
		case attrNameBase64:
			b, err := base64.StdEncoding.DecodeString(a.Value)
			if err != nil || !utf8.Valid(b) {
				return "", false
			}
			return string(b), true
		}
	}
	return "", false
}

type decoder struct {
	r      xml.TokenReader
	lim    Limits
	buf    []byte
	values int
}

func (d *decoder) errf(p *path, sentinel error, format string, args ...any) error {
	return &Error{Path: p.String(), Detail: fmt.Sprintf(format, args...), Err: sentinel}
}

func (d *decoder) token(p *path) (xml.Token, error) {
	tok, err := d.r.Token()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, d.errf(p, ErrInvalid, "unexpected end of input")
		}
		return nil, d.errf(p, ErrInvalid, "malformed XML: %v", err)
	}
	return tok, nil
}

func (d *decoder) grow() error {
	if len(d.buf) > d.lim.MaxBytes {
		return &Error{Detail: fmt.Sprintf("value larger than %d bytes", d.lim.MaxBytes), Err: ErrLimit}
	}
	return nil
}

func (d *decoder) value(start xml.StartElement, p *path, depth int) error {
	p.elem = start.Name.Local
	if start.Name.Space != NS {
		return d.errf(p, ErrInvalid, "element {%s}%s is not a value", start.Name.Space, start.Name.Local)
	}
	d.values++
	if d.values > d.lim.MaxValues {
		return d.errf(p, ErrLimit, "more than %d values", d.lim.MaxValues)
	}
	switch start.Name.Local {
	case TypeStruct, TypeList:
		depth++
		if depth > d.lim.MaxDepth {
			return d.errf(p, ErrLimit, "nested deeper than %d", d.lim.MaxDepth)
		}
		return d.container(start, p, depth)
	}
	text, err := d.text(start, p)
	if err != nil {
		return err
	}
	switch start.Name.Local {
	case TypeString:
		if attrValue(start, attrEnc) == "base64" {
			b, err := base64.StdEncoding.DecodeString(strings.Map(dropSpace, text))
			if err != nil || !utf8.Valid(b) {
				return d.errf(p, ErrInvalid, "string with enc=\"base64\" is not base64 of UTF-8 text")
			}
			text = string(b)
		}
		d.buf = appendString(d.buf, text)
	case TypeRes:
		d.buf = appendString(d.buf, trimSpace(text))
	case TypeI4, TypeInt:
		s := trimSpace(text)
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil {
			return d.errf(p, ErrInvalid, "%q is not a 32-bit integer", clip(s))
		}
		d.buf = strconv.AppendInt(d.buf, n, 10)
	case TypeDouble:
		s := trimSpace(text)
		if isJSONNumber(s) {
			d.buf = append(d.buf, s...)
			break
		}
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			return d.errf(p, ErrInvalid, "%q is not a finite number", clip(s))
		}
		d.buf = strconv.AppendFloat(d.buf, f, 'g', -1, 64)
	case TypeBoolean:
		switch trimSpace(text) {
		case "1", "true":
			d.buf = append(d.buf, "true"...)
		case "0", "false":
			d.buf = append(d.buf, "false"...)
		default:
			return d.errf(p, ErrInvalid, "%q is not a boolean (1, 0, true or false)", clip(text))
		}
	case TypeNil:
		if trimSpace(text) != "" {
			return d.errf(p, ErrInvalid, "nil has text %q", clip(text))
		}
		d.buf = append(d.buf, "null"...)
	case TypeBase64:
		s := strings.Map(dropSpace, text)
		enc := base64.StdEncoding
		if len(s)%4 != 0 {
			enc = base64.RawStdEncoding
		}
		if _, err := enc.DecodeString(s); err != nil {
			return d.errf(p, ErrInvalid, "not base64: %v", err)
		}
		d.buf = appendString(d.buf, s)
	case TypeDateTime:
		t, err := parseDateTime(trimSpace(text))
		if err != nil {
			return d.errf(p, ErrInvalid, "%q is not an ISO 8601 date and time", clip(text))
		}
		d.buf = appendString(d.buf, t.Format(time.RFC3339Nano))
	default:
		return d.errf(p, ErrInvalid, "unknown value type <%s>", start.Name.Local)
	}
	return d.grow()
}

func dropSpace(r rune) rune {
	if r == ' ' || r == '\t' || r == '\n' || r == '\r' {
		return -1
	}
	return r
}

func attrValue(start xml.StartElement, local string) string {
	for _, a := range start.Attr {
		if a.Name.Local == local && a.Name.Space == "" {
			return a.Value
		}
	}
	return ""
}

// text reads the character data of a scalar up to its end element.
func (d *decoder) text(start xml.StartElement, p *path) (string, error) {
	var b []byte
	for {
		tok, err := d.token(p)
		if err != nil {
			return "", err
		}
		switch t := tok.(type) {
		case xml.CharData:
			if len(b)+len(t) > d.lim.MaxBytes {
				return "", d.errf(p, ErrLimit, "text longer than %d bytes", d.lim.MaxBytes)
			}
			b = append(b, t...)
		case xml.StartElement:
			return "", d.errf(p, ErrInvalid, "element <%s> inside <%s>", t.Name.Local, start.Name.Local)
		case xml.EndElement:
			if t.Name.Local != start.Name.Local {
				return "", d.errf(p, ErrInvalid, "malformed XML: </%s> closes <%s>", t.Name.Local, start.Name.Local)
			}
			return string(b), nil
		}
	}
}

func (d *decoder) container(start xml.StartElement, p *path, depth int) error {
	isStruct := start.Name.Local == TypeStruct
	open, closer := byte('['), byte(']')
	if isStruct {
		open, closer = '{', '}'
	}
	d.buf = append(d.buf, open)
	for n := 0; ; {
		tok, err := d.token(p)
		if err != nil {
			return err
		}
		switch t := tok.(type) {
		case xml.CharData:
			if !isSpace(t) {
				return d.errf(p, ErrInvalid, "text inside <%s>", start.Name.Local)
			}
		case xml.StartElement:
			if n > 0 {
				d.buf = append(d.buf, ',')
			}
			cp := &path{parent: p, index: n}
			if isStruct {
				name, ok := nameAttr(t)
				if !ok {
					cp.elem = t.Name.Local
					return d.errf(cp, ErrInvalid, "struct member without a name attribute")
				}
				cp = &path{parent: p, member: name, named: true}
				d.buf = appendString(d.buf, name)
				d.buf = append(d.buf, ':')
			}
			n++
			if err := d.value(t, cp, depth); err != nil {
				return err
			}
		case xml.EndElement:
			if t.Name.Local != start.Name.Local {
				return d.errf(p, ErrInvalid, "malformed XML: </%s> closes <%s>", t.Name.Local, start.Name.Local)
			}
			d.buf = append(d.buf, closer)
			return d.grow()
		}
	}
}

var dateTimeLayouts = []string{
	"20060102T15:04:05",
	"20060102T15:04:05Z07:00",
	"20060102T150405",
	"20060102T150405Z07:00",
	"2006-01-02T15:04:05",
	time.RFC3339,
}

func parseDateTime(s string) (time.Time, error) {
	var first error
	for _, l := range dateTimeLayouts {
		t, err := time.Parse(l, s)
		if err == nil {
			return t, nil
		}
		if first == nil {
			first = err
		}
	}
	return time.Time{}, first
}

// clip shortens s for an error message.
func clip(s string) string {
	const max = 40
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Unlike encoding/json it does not
// escape <, > and &, so that texts stay readable.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
