package values

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// NS is the namespace of Vertebra's protocol elements and typed values.
const NS = "http://xmlschema.engineyard.com/agent/api"

// The value element names.
const (
	TypeString   = "string"
	TypeI4       = "i4"
	TypeInt      = "int" // accepted on input, written as i4
	TypeBoolean  = "boolean"
	TypeDouble   = "double"
	TypeStruct   = "struct"
	TypeList     = "list"
	TypeBase64   = "base64"           // input only
	TypeDateTime = "dateTime.iso8601" // input only
	TypeNil      = "nil"
	TypeRes      = "res" // input only
)

// Attributes of value elements.
const (
	attrName       = "name"        // the member or argument name
	attrNameBase64 = "name-base64" // the name in base64, when it has a tab, CR or LF
	attrEnc        = "enc"         // enc="base64" on a string holding a CR
)

// IsValue reports whether local is the name of a value element.
func IsValue(local string) bool {
	switch local {
	case TypeString, TypeI4, TypeInt, TypeBoolean, TypeDouble, TypeStruct, TypeList,
		TypeBase64, TypeDateTime, TypeNil, TypeRes:
		return true
	}
	return false
}

// Errors wrapped by [*Error].
var (
	// ErrInvalid: malformed value (wrong text for its type, unknown type,
	// stray text or elements, bad structure).
	ErrInvalid = errors.New("vertebra/values: invalid value")
	// ErrLimit: the value is nested too deep, too large or has too many
	// elements (see Limits).
	ErrLimit = errors.New("vertebra/values: limit exceeded")
	// ErrUnrepresentable: the JSON cannot be written as a typed value (a
	// character XML cannot carry, invalid JSON).
	ErrUnrepresentable = errors.New("vertebra/values: not representable")
)

// Error describes a value that cannot be converted. Path locates it:
// element names from the outermost value, with [i] for list items and
// .name for named members.
type Error struct {
	Path   string
	Detail string
	Err    error // ErrInvalid, ErrLimit or ErrUnrepresentable
}

func (e *Error) Error() string {
	if e.Path == "" {
		return "vertebra/values: " + e.Detail
	}
	return "vertebra/values: " + e.Path + ": " + e.Detail
}

func (e *Error) Unwrap() error { return e.Err }

// Limits bound what a decoder accepts. Zero fields take the defaults of
// DefaultLimits.
type Limits struct {
	MaxDepth  int // nesting of struct and list elements
	MaxBytes  int // size of the JSON produced, and of any one text
	MaxValues int // number of value elements
}

// DefaultLimits are the limits used where none are given.
var DefaultLimits = Limits{MaxDepth: 64, MaxBytes: 16 << 20, MaxValues: 1 << 20}

func (l Limits) orDefault() Limits {
	if l.MaxDepth <= 0 {
		l.MaxDepth = DefaultLimits.MaxDepth
	}
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultLimits.MaxBytes
	}
	if l.MaxValues <= 0 {
		l.MaxValues = DefaultLimits.MaxValues
	}
	return l
}

// Marshal returns the XML of the unnamed value element for the JSON v, with
// its xmlns (for tests, logs and documentation).
func Marshal(v []byte) ([]byte, error) {
	toks, err := AppendValue(nil, v)
	if err != nil {
		return nil, err
	}
	// The outermost element declares the namespace its children inherit.
	if st, ok := toks[0].(xml.StartElement); ok {
		st.Name.Space = NS
		toks[0] = st
	}
	if end, ok := toks[len(toks)-1].(xml.EndElement); ok {
		end.Name.Space = NS
		toks[len(toks)-1] = end
	}
	var b bytes.Buffer
	e := xml.NewEncoder(&b)
	for _, t := range toks {
		if err := e.EncodeToken(t); err != nil {
			return nil, fmt.Errorf("vertebra/values: %w", err)
		}
	}
	if err := e.Flush(); err != nil {
		return nil, fmt.Errorf("vertebra/values: %w", err)
	}
	return b.Bytes(), nil
}

// Unmarshal converts one value element, the only element of data, to JSON.
func Unmarshal(data []byte, lim Limits) ([]byte, error) {
	d := xml.NewDecoder(bytes.NewReader(data))
	var start *xml.StartElement
	for start == nil {
		tok, err := d.Token()
		if err == io.EOF {
			return nil, &Error{Detail: "no value element", Err: ErrInvalid}
		}
		if err != nil {
			return nil, &Error{Detail: "malformed XML: " + err.Error(), Err: ErrInvalid}
		}
		switch t := tok.(type) {
		case xml.StartElement:
			start = &t
		case xml.CharData:
			if !isSpace(t) {
				return nil, &Error{Detail: "text outside the value element", Err: ErrInvalid}
			}
		}
	}
	out, err := ReadValue(d, *start, lim)
	if err != nil {
		return nil, err
	}
	for {
		tok, err := d.Token()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return nil, &Error{Detail: "malformed XML: " + err.Error(), Err: ErrInvalid}
		}
		switch t := tok.(type) {
		case xml.StartElement:
			return nil, &Error{Detail: "more than one element", Err: ErrInvalid}
		case xml.CharData:
			if !isSpace(t) {
				return nil, &Error{Detail: "text after the value element", Err: ErrInvalid}
			}
		}
	}
}

func isSpace(b []byte) bool {
	for _, c := range b {
		switch c {
		case ' ', '\t', '\n', '\r':
		default:
			return false
		}
	}
	return true
}

func trimSpace(s string) string { return strings.Trim(s, " \t\n\r") }

// isJSONNumber reports whether s is a number in JSON syntax.
func isJSONNumber(s string) bool {
	i := 0
	if i < len(s) && s[i] == '-' {
		i++
	}
	if i == len(s) {
		return false
	}
	switch {
	case s[i] == '0':
		i++
	case s[i] >= '1' && s[i] <= '9':
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
	default:
		return false
	}
	if i < len(s) && s[i] == '.' {
		i++
		j := i
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		if i == j {
			return false
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		j := i
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		if i == j {
			return false
		}
	}
	return i == len(s)
}

// isInt32 reports whether the JSON number s is an integer that fits in 32
// bits.
func isInt32(s string) bool {
	if strings.ContainsAny(s, ".eE") {
		return false
	}
	_, err := strconv.ParseInt(s, 10, 32)
	return err == nil
}

// isXMLChar reports whether r may appear in an XML 1.0 document.
func isXMLChar(r rune) bool {
	return r == 0x09 || r == 0x0A || r == 0x0D ||
		r >= 0x20 && r <= 0xD7FF ||
		r >= 0xE000 && r <= 0xFFFD ||
		r >= 0x10000 && r <= 0x10FFFF
}

// badXMLChar returns the first character of s that XML cannot carry.
func badXMLChar(s string) (rune, bool) {
	for _, r := range s {
		if !isXMLChar(r) {
			return r, true
		}
	}
	return 0, false
}
