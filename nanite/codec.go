package nanite

// A hand-written JSON codec for Packet, the hot path of every request.
//
// It is equivalent to what packet.go did with encoding/json before:
//
//   - marshalPacket returns, byte for byte, what json.Marshal of the packet
//     (Version set, Payload nil) with the payload spliced in last returns,
//     and the same errors (it hands anything it does not encode itself to
//     encoding/json: a non-finite status, a result payload or an origin
//     that is not valid JSON).
//   - unmarshalPacket fills the Packet that json.Unmarshal fills, and fails
//     when json.Unmarshal fails. It decodes the common shapes itself and
//     hands everything else to json.Unmarshal: keys that are not an exact
//     match of a field tag (json.Unmarshal matches keys case-insensitively
//     and after unescaping), a key seen twice (json.Unmarshal merges into
//     slices and structs already decoded), a value of the wrong type,
//     numbers an int64 parse would not take, null inside arrays, nesting
//     deeper than maxDepth, and any syntax error (so that the error is
//     encoding/json's).
//   - validJSON is json.Valid.
//
// codec_test.go checks all three against encoding/json on fixed cases and
// with differential fuzz targets (seed corpus in testdata/fuzz).

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"strconv"
	"sync/atomic"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// maxDepth is how deeply nested arrays and objects the fast path accepts.
// Deeper input goes to encoding/json, whose limit (10000) then applies.
const maxDepth = 1000

// ---------------------------------------------------------------------------
// Encoding

// marshalPacket is the encoding of Packet.encodeTrusted: the packet with
// the current protocol version and p.Payload, if not empty, as its last
// member, spliced in unchanged.
func marshalPacket(p *Packet) ([]byte, error) {
	return appendMarshalPacket(nil, p)
}

// appendMarshalPacket is marshalPacket appending to buf (growing it when
// it is too small).
func appendMarshalPacket(buf []byte, p *Packet) ([]byte, error) {
	if n := packetSizeHint(p); cap(buf)-len(buf) < n {
		buf = slices.Grow(buf, n)
	}
	if b, ok := appendPacket(buf, p); ok {
		return b, nil
	}
	return marshalPacketJSON(p)
}

// marshalPacketJSON is marshalPacket with encoding/json (the fallback).
func marshalPacketJSON(p *Packet) ([]byte, error) {
	q := *p
	q.Version = ProtocolVersion
	q.Payload = nil
	b, err := json.Marshal(&q)
	if err != nil {
		return nil, fmt.Errorf("nanite: encode %s packet: %w", p.Kind, err)
	}
	if len(p.Payload) == 0 {
		return b, nil
	}
	out := make([]byte, 0, len(b)+len(`,"payload":`)+len(p.Payload))
	out = append(out, b[:len(b)-1]...)
	out = append(out, `,"payload":`...)
	out = append(out, p.Payload...)
	return append(out, '}'), nil
}

// packetSizeHint is about the size of p's encoding, so that appendPacket
// rarely grows its buffer.
func packetSizeHint(p *Packet) int {
	n := 64 + len(p.Kind) + len(p.Type) + len(p.Payload) + len(p.From) + len(p.Token) +
		len(p.ReplyTo) + len(p.Selector) + len(p.Target) + len(p.TagMatch) + len(p.Key) +
		len(p.Identity) + len(p.Queue) + len(p.AgentVer) + len(p.To) +
		base64.StdEncoding.EncodedLen(len(p.Sealed)) + len(p.Origin)
	if p.Error != nil {
		n += 32 + len(p.Error.Code) + len(p.Error.Message)
	}
	for _, t := range p.Tags {
		n += 3 + len(t)
	}
	for _, r := range p.Results {
		n += 48 + len(r.Agent) + len(r.Payload)
		if r.Error != nil {
			n += 32 + len(r.Error.Code) + len(r.Error.Message)
		}
	}
	for _, s := range p.Services {
		n += 32 + len(s.Name)
	}
	return n + 16*8 // member names
}

// appendPacket appends the encoding of p. It returns false if p holds
// something encoding/json would refuse to encode.
func appendPacket(b []byte, p *Packet) ([]byte, bool) {
	if len(p.Session) > 0 {
		return b, false // a session offer: rare, left to encoding/json
	}
	b = append(b, `{"v":`...)
	b = strconv.AppendInt(b, ProtocolVersion, 10)
	b = append(b, `,"packet":`...)
	b = appendString(b, string(p.Kind))
	b = appendStringMember(b, `,"type":`, p.Type)
	b = appendStringMember(b, `,"from":`, p.From)
	b = appendStringMember(b, `,"token":`, p.Token)
	b = appendStringMember(b, `,"reply_to":`, p.ReplyTo)
	b = appendStringMember(b, `,"selector":`, p.Selector)
	b = appendStringMember(b, `,"target":`, p.Target)
	if len(p.Tags) > 0 {
		b = append(b, `,"tags":[`...)
		for i, t := range p.Tags {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, t)
		}
		b = append(b, ']')
	}
	b = appendStringMember(b, `,"tag_match":`, p.TagMatch)
	if p.Persistent {
		b = append(b, `,"persistent":true`...)
	}
	if p.Failsafe {
		b = append(b, `,"offline_failsafe":true`...)
	}
	b = appendIntMember(b, `,"deadline":`, p.Deadline)
	b = appendIntMember(b, `,"attempt":`, int64(p.Attempt))
	if p.Bundles {
		b = append(b, `,"bundles":true`...)
	}
	b = appendStringMember(b, `,"key":`, p.Key)
	if p.Error != nil {
		b = append(b, `,"error":`...)
		b = appendErrorBody(b, p.Error)
	}
	if len(p.Results) > 0 {
		b = append(b, `,"results":[`...)
		for i := range p.Results {
			r := &p.Results[i]
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"agent":`...)
			b = appendString(b, r.Agent)
			if len(r.Payload) > 0 {
				// encoding/json validates, compacts and HTML-escapes the
				// output of a Marshaler such as json.RawMessage.
				b = append(b, `,"payload":`...)
				var ok bool
				if b, ok = appendCompact(b, r.Payload); !ok {
					return b, false
				}
			}
			if r.Error != nil {
				b = append(b, `,"error":`...)
				b = appendErrorBody(b, r.Error)
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	b = appendStringMember(b, `,"identity":`, p.Identity)
	b = appendStringMember(b, `,"queue":`, p.Queue)
	if len(p.Services) > 0 {
		b = append(b, `,"services":[`...)
		for i, s := range p.Services {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"name":`...)
			b = appendString(b, s.Name)
			if s.Idempotent {
				b = append(b, `,"idempotent":true`...)
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	if p.Status != nil {
		b = append(b, `,"status":`...)
		var ok bool
		if b, ok = appendFloat(b, *p.Status); !ok {
			return b, false
		}
	}
	b = appendIntMember(b, `,"in_flight":`, int64(p.InFlight))
	b = appendIntMember(b, `,"heartbeat_ms":`, p.Interval)
	b = appendStringMember(b, `,"agent_version":`, p.AgentVer)
	b = appendIntMember(b, `,"sent_at":`, p.SentAtUnix)
	b = appendStringMember(b, `,"to":`, p.To)
	if len(p.Sealed) > 0 {
		b = append(b, `,"sealed":"`...)
		b = base64.StdEncoding.AppendEncode(b, p.Sealed)
		b = append(b, '"')
	}
	if len(p.Origin) > 0 {
		b = append(b, `,"origin":`...)
		var ok bool
		if b, ok = appendCompact(b, p.Origin); !ok {
			return b, false
		}
	}
	if len(p.Hops) > 0 {
		b = append(b, `,"hops":[`...)
		for i, h := range p.Hops {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, h)
		}
		b = append(b, ']')
	}
	if len(p.Payload) > 0 {
		b = append(b, `,"payload":`...)
		b = append(b, p.Payload...)
	}
	return append(b, '}'), true
}

// appendStringMember appends name and s unless s is empty (omitempty).
func appendStringMember(b []byte, name, s string) []byte {
	if s == "" {
		return b
	}
	return appendString(append(b, name...), s)
}

// appendIntMember appends name and n unless n is 0 (omitempty).
func appendIntMember(b []byte, name string, n int64) []byte {
	if n == 0 {
		return b
	}
	return strconv.AppendInt(append(b, name...), n, 10)
}

func appendErrorBody(b []byte, e *ErrorBody) []byte {
	b = append(b, `{"code":`...)
	b = appendString(b, e.Code)
	b = append(b, `,"message":`...)
	b = appendString(b, e.Message)
	return append(b, '}')
}

// appendFloat appends f as encoding/json does (like ES6 number to string).
// It returns false for NaN and infinities, which encoding/json refuses.
func appendFloat(b []byte, f float64) ([]byte, bool) {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return b, false
	}
	format := byte('f')
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// Clean up e-09 to e-9.
		n := len(b)
		if n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b, true
}

const hexDigits = "0123456789abcdef"

// htmlSafe[c] is whether encoding/json writes the ASCII byte c as is in a
// string (it escapes control characters, '"', '\\', and '<', '>', '&').
var htmlSafe = func() (t [utf8.RuneSelf]bool) {
	for c := ' '; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
	}
	return t
}()

// safeByte is htmlSafe over all byte values (false from utf8.RuneSelf up).
var safeByte = func() (t [256]bool) {
	copy(t[:], htmlSafe[:])
	return t
}()

// appendString appends s as a JSON string exactly as encoding/json does
// with its default HTML escaping: short escapes for \b \f \n \r \t, \u00XX
// for other control characters and <, >, &, \ufffd for each byte of invalid
// UTF-8, and \u2028, \u2029.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	// Most strings (identities, tokens, queue names, services) need no
	// escaping at all: find the first byte that does, or none.
	i := 0
	for i < len(s) && safeByte[s[i]] {
		i++
	}
	if i == len(s) {
		b = append(b, s...)
		return append(b, '"')
	}
	start := 0
	for i < len(s) {
		c := s[i]
		if c < utf8.RuneSelf {
			if htmlSafe[c] {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
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
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// appendCompact appends the JSON value src without insignificant
// whitespace and with <, >, &, U+2028 and U+2029 escaped, as encoding/json
// writes the output of a json.Marshaler. It returns false if src is not
// valid JSON (or too deep for the fast path to tell).
func appendCompact(b, src []byte) ([]byte, bool) {
	if !fastValid(src) {
		return b, false
	}
	start := 0
	inString := false
	for i := 0; i < len(src); i++ {
		c := src[i]
		if !inString {
			switch c {
			case '"':
				inString = true
			case ' ', '\t', '\n', '\r':
				b = append(b, src[start:i]...)
				start = i + 1
			}
			continue
		}
		// In a string (src is valid, so <, >, & and U+2028/9 occur only
		// in strings).
		switch {
		case c == '\\':
			i++ // the escaped byte; the hex digits of \u are plain
		case c == '"':
			inString = false
		case c == '<' || c == '>' || c == '&':
			b = append(b, src[start:i]...)
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			start = i + 1
		case c == 0xE2 && i+2 < len(src) && src[i+1] == 0x80 && src[i+2]&^1 == 0xA8:
			b = append(b, src[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[src[i+2]&0xF])
			i += 2
			start = i + 1
		}
	}
	return append(b, src[start:]...), true
}

// ---------------------------------------------------------------------------
// Validation

// validJSON reports whether b is one valid JSON value, as json.Valid does.
func validJSON(b []byte) bool {
	d := decoder{b: b}
	if d.skipValue() && d.atEnd() {
		return true
	}
	if d.tooDeep {
		return json.Valid(b)
	}
	return false
}

// fastValid is validJSON without the fallback: false also for values
// nested more deeply than maxDepth.
func fastValid(b []byte) bool {
	d := decoder{b: b}
	return d.skipValue() && d.atEnd()
}

// ---------------------------------------------------------------------------
// Decoding

// unmarshalPacket is json.Unmarshal(b, p) for a zero p. With alias, the
// raw members (payload, origin, the payloads of results) are slices of b
// instead of copies (capped, so that appending to one copies it); only for
// a b that nobody changes afterwards.
func unmarshalPacket(b []byte, p *Packet, alias bool) error {
	d := decoder{b: b, alias: alias}
	if d.packet(p) {
		return nil
	}
	*p = Packet{}
	return json.Unmarshal(b, p)
}

// decoder reads JSON from b. Its methods return false both for invalid
// input and for valid input they leave to encoding/json; either way the
// caller falls back to encoding/json.
type decoder struct {
	b       []byte
	i       int // read offset
	depth   int // nesting of arrays and objects at i
	tooDeep bool
	alias   bool // raw values are slices of b, not copies
}

// Bits of Packet members seen, to detect duplicate keys.
const (
	fVersion uint32 = 1 << iota
	fKind
	fType
	fPayload
	fFrom
	fToken
	fReplyTo
	fSelector
	fTarget
	fTags
	fTagMatch
	fPersistent
	fFailsafe
	fDeadline
	fAttempt
	fKey
	fError
	fResults
	fIdentity
	fQueue
	fServices
	fStatus
	fInFlight
	fInterval
	fAgentVer
	fSentAt
	fTo
	fSealed
	fOrigin
	fHops
	fBundles
)

// packet decodes a whole input holding one Packet object.
func (d *decoder) packet(p *Packet) bool {
	var seen uint32
	ok := d.object(func(key []byte) bool {
		var f uint32
		var ok bool
		switch string(key) {
		case "v":
			f, ok = fVersion, d.int(&p.Version)
		case "packet":
			var s string
			f, ok = fKind, d.string(&s)
			p.Kind = Kind(s)
		case "type":
			f, ok = fType, d.recentString(&p.Type)
		case "payload":
			f, ok = fPayload, d.raw(&p.Payload)
		case "from":
			f, ok = fFrom, d.recentString(&p.From)
		case "token":
			f, ok = fToken, d.string(&p.Token)
		case "reply_to":
			f, ok = fReplyTo, d.recentString(&p.ReplyTo)
		case "selector":
			f, ok = fSelector, d.string(&p.Selector)
		case "target":
			f, ok = fTarget, d.string(&p.Target)
		case "tags":
			f, ok = fTags, d.strings(&p.Tags)
		case "tag_match":
			f, ok = fTagMatch, d.string(&p.TagMatch)
		case "persistent":
			f, ok = fPersistent, d.bool(&p.Persistent)
		case "offline_failsafe":
			f, ok = fFailsafe, d.bool(&p.Failsafe)
		case "deadline":
			f, ok = fDeadline, d.int64(&p.Deadline)
		case "attempt":
			f, ok = fAttempt, d.int(&p.Attempt)
		case "bundles":
			f, ok = fBundles, d.bool(&p.Bundles)
		case "key":
			f, ok = fKey, d.string(&p.Key)
		case "error":
			f, ok = fError, d.errorBody(&p.Error)
		case "results":
			f, ok = fResults, d.results(&p.Results)
		case "identity":
			f, ok = fIdentity, d.string(&p.Identity)
		case "queue":
			f, ok = fQueue, d.string(&p.Queue)
		case "services":
			f, ok = fServices, d.services(&p.Services)
		case "status":
			f, ok = fStatus, d.float(&p.Status)
		case "in_flight":
			f, ok = fInFlight, d.int(&p.InFlight)
		case "heartbeat_ms":
			f, ok = fInterval, d.int64(&p.Interval)
		case "agent_version":
			f, ok = fAgentVer, d.string(&p.AgentVer)
		case "sent_at":
			f, ok = fSentAt, d.int64(&p.SentAtUnix)
		case "to":
			f, ok = fTo, d.string(&p.To)
		case "sealed":
			f, ok = fSealed, d.byteSlice(&p.Sealed)
		case "origin":
			f, ok = fOrigin, d.raw(&p.Origin)
		case "hops":
			f, ok = fHops, d.strings(&p.Hops)
		case "session":
			return false // a session offer: rare, left to encoding/json
		default:
			return d.unknown(key)
		}
		if !ok || seen&f != 0 {
			return false
		}
		seen |= f
		return true
	})
	return ok && d.atEnd()
}

// object decodes an object at d.i (after whitespace), calling member for
// each key with d.i at its value (after whitespace). Keys must be ASCII
// without escapes. member must consume the value.
func (d *decoder) object(member func(key []byte) bool) bool {
	d.space()
	if !d.enter('{') {
		return false
	}
	d.space()
	if d.i < len(d.b) && d.b[d.i] == '}' {
		return d.leave()
	}
	for {
		key, ok := d.key()
		if !ok {
			return false
		}
		d.space()
		if d.i >= len(d.b) || d.b[d.i] != ':' {
			return false
		}
		d.i++
		d.space()
		if !member(key) {
			return false
		}
		d.space()
		if d.i >= len(d.b) {
			return false
		}
		switch d.b[d.i] {
		case ',':
			d.i++
			d.space()
		case '}':
			return d.leave()
		default:
			return false
		}
	}
}

// key reads a quoted key that is printable ASCII without escapes.
func (d *decoder) key() ([]byte, bool) {
	if d.i >= len(d.b) || d.b[d.i] != '"' {
		return nil, false
	}
	start := d.i + 1
	for i := start; i < len(d.b); i++ {
		switch c := d.b[i]; {
		case c == '"':
			d.i = i + 1
			return d.b[start:i], true
		case c < ' ' || c == '\\' || c >= utf8.RuneSelf:
			return nil, false
		}
	}
	return nil, false
}

// unknown skips the value of a key that is not a member name. A key with
// an upper-case letter may match a member case-insensitively as it does
// for encoding/json, which then decodes it.
func (d *decoder) unknown(key []byte) bool {
	for _, c := range key {
		if 'A' <= c && c <= 'Z' {
			return false
		}
	}
	return d.skipValue()
}

// enter consumes the opening bracket c of an array or object.
func (d *decoder) enter(c byte) bool {
	if d.i >= len(d.b) || d.b[d.i] != c {
		return false
	}
	d.i++
	d.depth++
	if d.depth > maxDepth {
		d.tooDeep = true
		return false
	}
	return true
}

// leave consumes the closing bracket of an array or object.
func (d *decoder) leave() bool {
	d.i++
	d.depth--
	return true
}

func (d *decoder) space() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// atEnd consumes trailing whitespace and reports whether the input ends.
func (d *decoder) atEnd() bool {
	d.space()
	return d.i == len(d.b)
}

// null consumes a null literal if there is one.
func (d *decoder) null() bool {
	if hasPrefix(d.b[d.i:], "null") {
		d.i += 4
		return true
	}
	return false
}

// string decodes a string or null (which leaves *s unchanged).
func (d *decoder) string(s *string) bool {
	if d.null() {
		return true
	}
	raw, plain, ok := d.scanString()
	if !ok {
		return false
	}
	*s = makeString(raw, plain)
	return true
}

// recentString is string for members whose values repeat from packet to
// packet (services, identities, reply queues): a value decoded lately is
// not allocated again (see recent).
func (d *decoder) recentString(s *string) bool {
	if d.null() {
		return true
	}
	raw, plain, ok := d.scanString()
	if !ok {
		return false
	}
	if plain {
		*s = recent(raw)
	} else {
		*s = makeString(raw, false)
	}
	return true
}

// recentStrings holds strings decoded lately, in slots picked by a cheap
// hash of their bytes; a value that collides with another in its slot
// replaces it.
var recentStrings [256]atomic.Pointer[string]

// recent returns the string of plain contents b: a constant of the
// protocol, one decoded lately, or a new one (then remembered).
func recent(b []byte) string {
	n := len(b)
	if n == 0 || n > 128 {
		return intern(b)
	}
	slot := &recentStrings[(uint(n)*37+uint(b[n-1])*7+uint(b[n/2])*3+uint(b[n/3]))&255]
	if p := slot.Load(); p != nil && *p == string(b) {
		return *p
	}
	s := intern(b)
	slot.Store(&s)
	return s
}

func (d *decoder) bool(v *bool) bool {
	switch {
	case hasPrefix(d.b[d.i:], "true"):
		*v = true
		d.i += 4
	case hasPrefix(d.b[d.i:], "false"):
		*v = false
		d.i += 5
	default:
		return d.null()
	}
	return true
}

// int64 decodes an integer or null (which leaves *v unchanged). Numbers
// with a fraction or an exponent, and numbers of more than 18 digits, go
// to encoding/json (which refuses the former and may take the latter).
func (d *decoder) int64(v *int64) bool {
	if d.null() {
		return true
	}
	raw, isInt, ok := d.scanNumber()
	if !ok || !isInt {
		return false
	}
	neg := raw[0] == '-'
	if neg {
		raw = raw[1:]
	}
	if len(raw) > 18 {
		return false
	}
	var n int64
	for _, c := range raw {
		n = n*10 + int64(c-'0')
	}
	if neg {
		n = -n
	}
	*v = n
	return true
}

func (d *decoder) int(v *int) bool {
	n := int64(*v)
	if !d.int64(&n) || int64(int(n)) != n {
		return false
	}
	*v = int(n)
	return true
}

// float decodes a number into a new float64, or null.
func (d *decoder) float(v **float64) bool {
	if d.null() {
		*v = nil
		return true
	}
	raw, _, ok := d.scanNumber()
	if !ok {
		return false
	}
	f, err := strconv.ParseFloat(string(raw), 64)
	if err != nil { // out of range: encoding/json fails
		return false
	}
	*v = &f
	return true
}

// raw copies any value as json.RawMessage.UnmarshalJSON does (null
// included), or with d.alias takes it as a slice of the input.
func (d *decoder) raw(v *json.RawMessage) bool {
	start := d.i
	if !d.skipValue() {
		return false
	}
	if d.alias {
		*v = json.RawMessage(d.b[start:d.i:d.i])
		return true
	}
	*v = append(json.RawMessage(nil), d.b[start:d.i]...)
	return true
}

// byteSlice decodes a string holding base64 (standard encoding, padded) into
// a new []byte, or null, as encoding/json decodes a []byte.
func (d *decoder) byteSlice(v *[]byte) bool {
	if d.null() {
		*v = nil
		return true
	}
	raw, plain, ok := d.scanString()
	if !ok {
		return false
	}
	if !plain {
		raw = []byte(makeString(raw, plain))
	}
	b := make([]byte, base64.StdEncoding.DecodedLen(len(raw)))
	n, err := base64.StdEncoding.Decode(b, raw)
	if err != nil {
		return false
	}
	*v = b[:n]
	return true
}

// strings decodes an array of strings, or null.
func (d *decoder) strings(v *[]string) bool {
	if d.null() {
		*v = nil
		return true
	}
	var buf [8]string
	s := buf[:0]
	ok := d.array(func() bool {
		var t string
		if d.null() { // encoding/json leaves a "" element
			return false
		}
		if !d.string(&t) {
			return false
		}
		s = append(s, t)
		return true
	})
	if !ok {
		return false
	}
	*v = append(make([]string, 0, len(s)), s...)
	return true
}

// services decodes an array of ServiceInfo objects, or null.
func (d *decoder) services(v *[]ServiceInfo) bool {
	if d.null() {
		*v = nil
		return true
	}
	var buf [16]ServiceInfo
	s := buf[:0]
	ok := d.array(func() bool {
		var si ServiceInfo
		var seen uint8
		ok := d.object(func(key []byte) bool {
			var f uint8
			var ok bool
			switch string(key) {
			case "name":
				f, ok = 1, d.string(&si.Name)
			case "idempotent":
				f, ok = 2, d.bool(&si.Idempotent)
			default:
				return d.unknown(key)
			}
			if !ok || seen&f != 0 {
				return false
			}
			seen |= f
			return true
		})
		s = append(s, si)
		return ok
	})
	if !ok {
		return false
	}
	*v = append(make([]ServiceInfo, 0, len(s)), s...)
	return true
}

// errorBody decodes an ErrorBody object into a new ErrorBody, or null.
func (d *decoder) errorBody(v **ErrorBody) bool {
	if d.null() {
		*v = nil
		return true
	}
	e := new(ErrorBody)
	var seen uint8
	ok := d.object(func(key []byte) bool {
		var f uint8
		var ok bool
		switch string(key) {
		case "code":
			f, ok = 1, d.string(&e.Code)
		case "message":
			f, ok = 2, d.string(&e.Message)
		default:
			return d.unknown(key)
		}
		if !ok || seen&f != 0 {
			return false
		}
		seen |= f
		return true
	})
	*v = e
	return ok
}

// results decodes an array of ResultRecord objects, or null.
func (d *decoder) results(v *[]ResultRecord) bool {
	if d.null() {
		*v = nil
		return true
	}
	s := []ResultRecord{}
	ok := d.array(func() bool {
		var r ResultRecord
		var seen uint8
		ok := d.object(func(key []byte) bool {
			var f uint8
			var ok bool
			switch string(key) {
			case "agent":
				f, ok = 1, d.string(&r.Agent)
			case "payload":
				f, ok = 2, d.raw(&r.Payload)
			case "error":
				f, ok = 4, d.errorBody(&r.Error)
			default:
				return d.unknown(key)
			}
			if !ok || seen&f != 0 {
				return false
			}
			seen |= f
			return true
		})
		s = append(s, r)
		return ok
	})
	*v = s
	return ok
}

// array decodes an array at d.i, calling elem with d.i at each element
// (after whitespace). elem must consume the element.
func (d *decoder) array(elem func() bool) bool {
	if !d.enter('[') {
		return false
	}
	d.space()
	if d.i < len(d.b) && d.b[d.i] == ']' {
		return d.leave()
	}
	for {
		if d.i >= len(d.b) || !elem() {
			return false
		}
		d.space()
		if d.i >= len(d.b) {
			return false
		}
		switch d.b[d.i] {
		case ',':
			d.i++
			d.space()
		case ']':
			return d.leave()
		default:
			return false
		}
	}
}

// skipValue consumes one value (after whitespace), checking its syntax.
func (d *decoder) skipValue() bool {
	d.space()
	if d.i >= len(d.b) {
		return false
	}
	switch d.b[d.i] {
	case '{':
		if !d.enter('{') {
			return false
		}
		d.space()
		if d.i < len(d.b) && d.b[d.i] == '}' {
			return d.leave()
		}
		for {
			if d.i >= len(d.b) || d.b[d.i] != '"' {
				return false
			}
			if _, _, ok := d.scanString(); !ok {
				return false
			}
			d.space()
			if d.i >= len(d.b) || d.b[d.i] != ':' {
				return false
			}
			d.i++
			if !d.skipValue() {
				return false
			}
			d.space()
			if d.i >= len(d.b) {
				return false
			}
			switch d.b[d.i] {
			case ',':
				d.i++
				d.space()
			case '}':
				return d.leave()
			default:
				return false
			}
		}
	case '[':
		return d.array(d.skipValue)
	case '"':
		_, _, ok := d.scanString()
		return ok
	case 't':
		return d.literal("true")
	case 'f':
		return d.literal("false")
	case 'n':
		return d.null()
	default:
		_, _, ok := d.scanNumber()
		return ok
	}
}

func (d *decoder) literal(lit string) bool {
	if hasPrefix(d.b[d.i:], lit) {
		d.i += len(lit)
		return true
	}
	return false
}

// stringStop[c] is whether the byte c ends the fast scan of a string:
// quote, backslash, control characters and non-ASCII bytes.
var stringStop = func() (t [256]bool) {
	for c := range t {
		t[c] = c < ' ' || c == '"' || c == '\\' || c >= utf8.RuneSelf
	}
	return t
}()

// scanString consumes a string at d.i (its opening quote) and returns its
// contents, escapes not processed, and whether they are printable ASCII
// without escapes. It checks escapes as the JSON grammar has them.
func (d *decoder) scanString() (raw []byte, plain, ok bool) {
	if d.i >= len(d.b) || d.b[d.i] != '"' {
		return nil, false, false
	}
	b := d.b
	start := d.i + 1
	plain = true
	for i := start; i < len(b); {
		for n := 0; i+8 <= len(b); n++ {
			if m := stringStopMask(binary.LittleEndian.Uint64(b[i:])); m != 0 {
				i += bits.TrailingZeros64(m) / 8
				break
			}
			i += 8
			if n == 16 && plain {
				// A long string, such as a payload: find its end with
				// the vectorised bytes.IndexByte, then check that the
				// bytes before it need no closer look.
				if q := bytes.IndexByte(b[i:], '"'); q >= 0 && plainRun(b[i:i+q]) {
					d.i = i + q + 1
					return b[start : i+q], true, true
				}
			}
		}
		for i < len(b) && !stringStop[b[i]] {
			i++
		}
		if i >= len(b) {
			break
		}
		switch c := b[i]; {
		case c == '"':
			d.i = i + 1
			return b[start:i], plain, true
		case c == '\\':
			plain = false
			if i+1 >= len(b) {
				return nil, false, false
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(b) || hex4(b[i+2:i+6]) < 0 {
					return nil, false, false
				}
				i += 6
			default:
				return nil, false, false
			}
		case c < ' ':
			return nil, false, false
		default: // non-ASCII: any byte is valid JSON here
			plain = false
			i++
		}
	}
	return nil, false, false
}

// plainRun reports whether b has no byte that stringStop flags other than
// '"' (none of b is one): no backslash (found with the vectorised
// bytes.IndexByte), no control character and no non-ASCII byte (32 bytes
// at a time).
func plainRun(b []byte) bool {
	if bytes.IndexByte(b, '\\') >= 0 {
		return false
	}
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	for len(b) >= 32 {
		// A byte below ' ' borrows into its high bit, one of 0x80 and up
		// has it set; borrows only flag bytes after a flagged one.
		w := b[:32:32]
		x0, x1 := binary.LittleEndian.Uint64(w[0:8]), binary.LittleEndian.Uint64(w[8:16])
		x2, x3 := binary.LittleEndian.Uint64(w[16:24]), binary.LittleEndian.Uint64(w[24:32])
		if ((x0-ones*' ')|x0|(x1-ones*' ')|x1|(x2-ones*' ')|x2|(x3-ones*' ')|x3)&highs != 0 {
			return false
		}
		b = b[32:]
	}
	for _, c := range b {
		if stringStop[c] {
			return false
		}
	}
	return true
}

// stringStopMask has the high bit set in the first byte of x (eight bytes
// read little-endian) that is a stringStop byte, if any: a byte less than
// 0x20, '"', '\\', or 0x80 and above. These are the usual "has a zero
// byte" and "has a byte less than n" tests; their borrows may flag later
// bytes too, never earlier ones, so only the lowest flag is exact.
func stringStopMask(x uint64) uint64 {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	quote := x ^ (ones * '"')
	backslash := x ^ (ones * '\\')
	less := (x - ones*' ') &^ x
	return (less | (quote-ones)&^quote | (backslash-ones)&^backslash | x) & highs
}

func hasPrefix(b []byte, s string) bool {
	return len(b) >= len(s) && string(b[:len(s)]) == s
}

// hex4 is the value of four hex digits, or -1.
func hex4(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return -1
		}
		r = r*16 + rune(c)
	}
	return r
}

// scanNumber consumes a number at d.i and returns its text and whether it
// has neither a fraction nor an exponent.
func (d *decoder) scanNumber() (raw []byte, isInt, ok bool) {
	b := d.b
	i := d.i
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i >= len(b):
		return nil, false, false
	case b[i] == '0':
		i++
	case '1' <= b[i] && b[i] <= '9':
		i = skipDigits(b, i+1)
	default:
		return nil, false, false
	}
	isInt = true
	if i < len(b) && b[i] == '.' {
		isInt = false
		i++
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return nil, false, false
		}
		i = skipDigits(b, i)
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		isInt = false
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return nil, false, false
		}
		i = skipDigits(b, i)
	}
	raw = b[d.i:i]
	d.i = i
	return raw, isInt, true
}

func skipDigits(b []byte, i int) int {
	for i < len(b) && '0' <= b[i] && b[i] <= '9' {
		i++
	}
	return i
}

// makeString is the string a JSON string with contents raw decodes to.
// plain contents (printable ASCII, no escapes) are taken as they are.
func makeString(raw []byte, plain bool) string {
	if plain {
		return intern(raw)
	}
	if bytes.IndexByte(raw, '\\') < 0 && utf8.Valid(raw) {
		return string(raw)
	}
	return unquote(raw)
}

// intern returns the constant for the protocol's fixed strings (kinds,
// selectors, match modes, error codes), saving an allocation for each, and
// a new string for others.
func intern(b []byte) string {
	switch string(b) {
	case string(KindRequest):
		return string(KindRequest)
	case string(KindPush):
		return string(KindPush)
	case string(KindResult):
		return string(KindResult)
	case string(KindIntermediate):
		return string(KindIntermediate)
	case string(KindRegister):
		return string(KindRegister)
	case string(KindUnregister):
		return string(KindUnregister)
	case string(KindHeartbeat):
		return string(KindHeartbeat)
	case string(KindAdvertise):
		return string(KindAdvertise)
	case SelectLeastLoaded:
		return SelectLeastLoaded
	case SelectAll: // and MatchAll
		return SelectAll
	case MatchAny:
		return MatchAny
	case SelectRandom:
		return SelectRandom
	case SelectRoundRobin:
		return SelectRoundRobin
	case CodeHandler:
		return CodeHandler
	case CodePanic:
		return CodePanic
	case CodeUnknown:
		return CodeUnknown
	case CodeBadRequest:
		return CodeBadRequest
	case CodeTooLarge:
		return CodeTooLarge
	case CodeExpired:
		return CodeExpired
	case CodeTimeout:
		return CodeTimeout
	case CodeShutdown:
		return CodeShutdown
	case CodeNoAgent:
		return CodeNoAgent
	case CodeNotDelivered:
		return CodeNotDelivered
	case CodeAgentLost:
		return CodeAgentLost
	case CodeUnauthorized:
		return CodeUnauthorized
	case CodeInternal:
		return CodeInternal
	}
	return string(b)
}

// unquote decodes the contents of a JSON string (valid escapes) as
// encoding/json does: invalid UTF-8 and unpaired surrogates become U+FFFD.
func unquote(s []byte) string {
	var buf [64]byte
	b := buf[:0]
	for r := 0; r < len(s); {
		c := s[r]
		switch {
		case c == '\\':
			switch s[r+1] {
			case 'b':
				b = append(b, '\b')
			case 'f':
				b = append(b, '\f')
			case 'n':
				b = append(b, '\n')
			case 'r':
				b = append(b, '\r')
			case 't':
				b = append(b, '\t')
			case 'u':
				rr := hex4(s[r+2:])
				r += 6
				if utf16.IsSurrogate(rr) {
					if r+6 <= len(s) && s[r] == '\\' && s[r+1] == 'u' {
						if dec := utf16.DecodeRune(rr, hex4(s[r+2:])); dec != unicode.ReplacementChar {
							r += 6
							b = utf8.AppendRune(b, dec)
							continue
						}
					}
					rr = unicode.ReplacementChar
				}
				b = utf8.AppendRune(b, rr)
				continue
			default: // '"', '\\', '/'
				b = append(b, s[r+1])
			}
			r += 2
		case c < utf8.RuneSelf:
			b = append(b, c)
			r++
		default:
			rr, size := utf8.DecodeRune(s[r:])
			b = utf8.AppendRune(b, rr)
			r += size
		}
	}
	return string(b)
}
