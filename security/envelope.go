package security

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"strconv"
	"time"
)

// Envelope format constants.
const (
	EnvelopeVersion = 1
	AlgEd25519      = "ed25519"

	nonceLen    = 16       // random bytes, 32 hex characters on the wire
	maxCertSize = 16 << 10 // DER bytes
	sigDomain   = "nanite-envelope-v1\x00"
)

// Envelope is a signed packet as it travels:
//
//	{"v":1,"alg":"ed25519","signer":"agent-7f3a","cert":"MIIB...","ts":1767225600000,
//	 "nonce":"9f86d081884c7d659a2feaa0c55ad015","body":"eyJ2IjoxLC...","sig":"3q2+7w..."}
//
// Body is the whole inner packet (for nanite, its JSON with type, token,
// from, reply_to, target, deadline and payload), so the signature covers
// every header field that matters. The signature is Ed25519 over
// SignedBytes. Cert is the signer's certificate (DER), omitted with the
// OmitCert option. []byte fields are standard base64 in JSON.
type Envelope struct {
	Version int    `json:"v"`
	Alg     string `json:"alg"`
	Signer  string `json:"signer"`
	Cert    []byte `json:"cert,omitempty"`
	TS      int64  `json:"ts"` // Unix milliseconds of signing
	Nonce   string `json:"nonce"`
	Body    []byte `json:"body"`
	Sig     []byte `json:"sig"`
}

// SignedBytes returns the byte string the signature covers (integers
// big-endian):
//
//	"nanite-envelope-v1" 0x00
//	u16 len(alg)    alg
//	u16 len(signer) signer
//	u64 ts
//	u16 len(nonce)  nonce (the 32 hex characters)
//	u64 len(body)   body
//
// The certificate is not covered: it only supplies the key, and a
// certificate with another key does not verify the signature.
func (e *Envelope) SignedBytes() []byte {
	return appendSignedBytes(nil, e.Alg, e.Signer, e.TS, e.Nonce, e.Body)
}

func appendSignedBytes(b []byte, alg, signer string, ts int64, nonce string, body []byte) []byte {
	if b == nil {
		b = make([]byte, 0, len(sigDomain)+2+len(alg)+2+len(signer)+8+2+len(nonce)+8+len(body))
	}
	b = append(b, sigDomain...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(alg)))
	b = append(b, alg...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(signer)))
	b = append(b, signer...)
	b = binary.BigEndian.AppendUint64(b, uint64(ts))
	b = binary.BigEndian.AppendUint16(b, uint16(len(nonce)))
	b = append(b, nonce...)
	b = binary.BigEndian.AppendUint64(b, uint64(len(body)))
	return append(b, body...)
}

// SignOption changes how (*Identity).Sign makes an envelope.
type SignOption func(*signOptions)

type signOptions struct {
	omitCert bool
	at       time.Time
}

// OmitCert leaves the certificate out of the envelope (saving about 0.6 KB
// with an X25519 sealing key, 2.3 KB with a hybrid one). The receiver must
// already have verified the signer's certificate (from an earlier envelope or
// VerifyCert) or it rejects the envelope with ErrUnknownSigner.
func OmitCert() SignOption { return func(o *signOptions) { o.omitCert = true } }

// SignedAt sets the envelope's timestamp instead of the current time (for
// tests and tools).
func SignedAt(t time.Time) SignOption { return func(o *signOptions) { o.at = t } }

// Sign wraps body in a signed envelope with a fresh timestamp and random
// nonce. Sign every transmission separately: a receiver rejects a second
// copy of the same envelope as a replay.
func (id *Identity) Sign(body []byte, opts ...SignOption) ([]byte, error) {
	var o signOptions
	for _, opt := range opts {
		opt(&o)
	}
	if o.at.IsZero() {
		o.at = time.Now()
	}
	k := id.keys()
	if k == nil {
		return nil, errNoKeys
	}
	ts := o.at.UnixMilli()
	var nb [nonceLen]byte
	_, _ = rand.Read(nb[:]) // never fails
	var nonce [2 * nonceLen]byte
	hex.Encode(nonce[:], nb[:])

	msg := appendSignedBytes(nil, AlgEd25519, k.name, ts, string(nonce[:]), body)
	sig := ed25519.Sign(k.sign, msg)

	n := 120 + len(k.name) + base64.StdEncoding.EncodedLen(len(body))
	if !o.omitCert {
		n += len(k.certB64)
	}
	b := make([]byte, 0, n)
	b = append(b, `{"v":1,"alg":"ed25519","signer":"`...)
	b = append(b, k.name...) // ValidName: nothing to escape
	b = append(b, '"')
	if !o.omitCert {
		b = append(b, `,"cert":"`...)
		b = append(b, k.certB64...)
		b = append(b, '"')
	}
	b = append(b, `,"ts":`...)
	b = strconv.AppendInt(b, ts, 10)
	b = append(b, `,"nonce":"`...)
	b = append(b, nonce[:]...)
	b = append(b, `","body":"`...)
	b = base64.StdEncoding.AppendEncode(b, body)
	b = append(b, `","sig":"`...)
	b = base64.StdEncoding.AppendEncode(b, sig)
	b = append(b, `"}`...)
	return b, nil
}

// envelopePrefix is how every envelope made by Sign starts; the version
// digits follow.
const envelopePrefix = `{"v":`

// IsEnvelope reports, cheaply, whether b looks like an envelope rather than a
// plain packet: it starts with `{"v":` followed by digits and `,"alg":`,
// exactly as Sign writes it. (A nanite packet starts with `{"v":1,"packet":`.)
// Envelopes written differently are not recognised, and a receiver that
// requires envelopes rejects them as unsigned.
func IsEnvelope(b []byte) bool {
	if !bytes.HasPrefix(b, []byte(envelopePrefix)) {
		return false
	}
	i := len(envelopePrefix)
	j := i
	for j < len(b) && j-i < 4 && b[j] >= '0' && b[j] <= '9' {
		j++
	}
	return j > i && bytes.HasPrefix(b[j:], []byte(`,"alg":`))
}

// ParseEnvelope decodes and checks the form of an envelope without verifying
// anything: version and algorithm known (ErrUnsupported), a valid signer
// name, a certificate of at most 16 KiB if any, a positive timestamp, a
// 32-hex-digit nonce and a 64-byte signature (ErrMalformed). raw longer than
// DefaultMaxEnvelopeSize is rejected; a Verifier applies its own limit.
func ParseEnvelope(raw []byte) (*Envelope, error) {
	return parseEnvelope(raw, DefaultMaxEnvelopeSize)
}

func parseEnvelope(raw []byte, max int) (*Envelope, error) {
	if len(raw) > max {
		return nil, newError(ErrMalformed, "", nil, "envelope is %d bytes, the limit is %d", len(raw), max)
	}
	if !IsEnvelope(raw) {
		return nil, newError(ErrUnsigned, "", nil, "not an envelope")
	}
	if IsSessionEnvelope(raw) {
		return nil, newError(ErrUnsupported, "", nil, "a session envelope (%s), not a signed one", AlgSession)
	}
	var e Envelope
	if !decodeEnvelope(raw, &e) {
		e = Envelope{}
		if err := json.Unmarshal(raw, &e); err != nil {
			return nil, newError(ErrMalformed, "", err, "decode")
		}
	}
	if err := checkEnvelope(&e); err != nil {
		return nil, err
	}
	return &e, nil
}

// checkEnvelope is the form check of parseEnvelope after decoding.
func checkEnvelope(e *Envelope) error {
	if e.Version != EnvelopeVersion {
		return newError(ErrUnsupported, "", nil, "envelope version %d", e.Version)
	}
	if e.Alg != AlgEd25519 {
		return newError(ErrUnsupported, "", nil, "algorithm %.32q", e.Alg)
	}
	if !ValidName(e.Signer) {
		return newError(ErrMalformed, "", nil, "invalid signer %.140q", e.Signer)
	}
	if len(e.Cert) > maxCertSize {
		return newError(ErrMalformed, e.Signer, nil, "certificate is %d bytes, the limit is %d", len(e.Cert), maxCertSize)
	}
	if e.TS <= 0 {
		return newError(ErrMalformed, e.Signer, nil, "timestamp %d", e.TS)
	}
	if len(e.Nonce) != 2*nonceLen || !isLowerHex(e.Nonce) {
		return newError(ErrMalformed, e.Signer, nil, "nonce must be %d lowercase hex digits", 2*nonceLen)
	}
	if len(e.Sig) != ed25519.SignatureSize {
		return newError(ErrMalformed, e.Signer, nil, "signature is %d bytes, want %d", len(e.Sig), ed25519.SignatureSize)
	}
	return nil
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// VerifyEnvelope verifies a signed envelope and returns its body and signer.
// It checks, in this order, and stops at the first failure:
//
//  1. form: size limit, JSON, fields (ErrUnsigned for a plain packet,
//     ErrMalformed, ErrUnsupported);
//  2. the signer's certificate as VerifyCert does with claimedName = signer
//     and the given roles (no roles: any role); an envelope without a
//     certificate uses the signer's cached certificate (ErrUnknownSigner if
//     there is none);
//  3. the signature (ErrBadSignature);
//  4. the timestamp: at most Window into the past or the future, and not
//     before VerifierConfig.NotBefore (ErrOutsideWindow);
//  5. replay: the (signer, nonce) pair must be new (ErrReplay), and is then
//     remembered until the timestamp leaves the window (ErrReplayCacheFull
//     when there is no room).
//
// Every error is an *Error whose Reason the caller can count.
func (v *Verifier) VerifyEnvelope(raw []byte, roles ...Role) (body []byte, peer *Peer, err error) {
	body, peer, err = v.verifyEnvelope(raw, roles)
	if err != nil {
		v.count(err)
		return nil, nil, err
	}
	v.verified.Add(1)
	return body, peer, nil
}

func (v *Verifier) verifyEnvelope(raw []byte, roles []Role) ([]byte, *Peer, error) {
	e, err := parseEnvelope(raw, v.maxEnvelope)
	if err != nil {
		return nil, nil, err
	}
	now := v.now()
	var ce *certEntry
	if len(e.Cert) == 0 {
		ce, err = v.entryByName(e.Signer, now)
	} else {
		ce, err = v.certEntry(e.Cert, e.Signer, now)
	}
	if err != nil {
		return nil, nil, err
	}
	if err := v.checkEntry(ce, e.Signer, roles); err != nil {
		return nil, nil, err
	}
	if !ed25519.Verify(ce.pub, e.SignedBytes(), e.Sig) {
		return nil, nil, newError(ErrBadSignature, e.Signer, nil, "")
	}
	nowMs := now.UnixMilli()
	w := v.window.Milliseconds()
	if d := nowMs - e.TS; d > w {
		return nil, nil, newError(ErrOutsideWindow, e.Signer, nil, "signed %v ago, the window is %v",
			time.Duration(d)*time.Millisecond, v.window)
	} else if -d > w {
		return nil, nil, newError(ErrOutsideWindow, e.Signer, nil, "signed %v in the future, the window is %v",
			time.Duration(-d)*time.Millisecond, v.window)
	}
	if e.TS < v.notBefore {
		return nil, nil, newError(ErrOutsideWindow, e.Signer, nil, "signed %v before this verifier's NotBefore",
			time.Duration(v.notBefore-e.TS)*time.Millisecond)
	}
	var nonce [nonceLen]byte
	if _, err := hex.Decode(nonce[:], []byte(e.Nonce)); err != nil { // checked by parseEnvelope
		return nil, nil, newError(ErrMalformed, e.Signer, err, "nonce")
	}
	switch err := v.replay.add(e.Signer, nonce, e.TS, nowMs); err {
	case nil:
	case ErrReplay:
		return nil, nil, newError(ErrReplay, e.Signer, nil, "nonce %s signed at %d already seen", e.Nonce, e.TS)
	default:
		if last := v.lastWarn.Load(); nowMs-last > 10_000 && v.lastWarn.CompareAndSwap(last, nowMs) {
			v.log.Warn("security: replay cache full, rejecting envelopes", "size", v.replay.max, "window", v.window)
		}
		return nil, nil, newError(ErrReplayCacheFull, e.Signer, nil, "%d nonces inside the window", v.replay.max)
	}
	return e.Body, ce.peer, nil
}

// decodeEnvelope is json.Unmarshal(raw, e) for envelopes written the usual
// way, without encoding/json's validation pass and reflection, and with the
// three base64 fields decoded into one allocation. It returns false, leaving
// e in any state, for anything it does not handle exactly as encoding/json
// would: invalid JSON, unknown, duplicate or differently cased keys, null,
// escapes or non-ASCII bytes in strings, numbers that are not plain
// integers in range, base64 that does not decode. The caller then falls back
// to encoding/json, which makes the decision (FuzzDecodeEnvelope checks that
// both agree).
func decodeEnvelope(raw []byte, e *Envelope) bool {
	const (
		fV = 1 << iota
		fAlg
		fSigner
		fCert
		fTS
		fNonce
		fBody
		fSig
	)
	var (
		seen uint
		b64  [3][]byte // cert, body, sig as on the wire
	)
	d := envDecoder{b: raw}
	d.space()
	if !d.consume('{') {
		return false
	}
	d.space()
	if d.consume('}') {
		return d.end()
	}
	for {
		if !d.consume('"') {
			return false
		}
		key, ok := d.plainString()
		if !ok {
			return false
		}
		d.space()
		if !d.consume(':') {
			return false
		}
		d.space()
		var f uint
		switch string(key) {
		case "v":
			var n int64
			f, ok = fV, d.int(&n, strconv.IntSize)
			e.Version = int(n)
		case "alg":
			var s []byte
			f = fAlg
			if s, ok = d.stringValue(); ok {
				if string(s) == AlgEd25519 {
					e.Alg = AlgEd25519
				} else {
					e.Alg = string(s)
				}
			}
		case "signer":
			var s []byte
			f = fSigner
			if s, ok = d.stringValue(); ok {
				e.Signer = string(s)
			}
		case "cert":
			f = fCert
			b64[0], ok = d.base64Value()
		case "ts":
			f, ok = fTS, d.int(&e.TS, 64)
		case "nonce":
			var s []byte
			f = fNonce
			if s, ok = d.stringValue(); ok {
				e.Nonce = string(s)
			}
		case "body":
			f = fBody
			b64[1], ok = d.base64Value()
		case "sig":
			f = fSig
			b64[2], ok = d.base64Value()
		default:
			return false
		}
		if !ok || seen&f != 0 {
			return false
		}
		seen |= f
		d.space()
		if d.consume('}') {
			break
		}
		if !d.consume(',') {
			return false
		}
		d.space()
	}
	if !d.end() {
		return false
	}
	// One buffer for the decoded cert, body and signature, each slice capped
	// so that appending to one cannot overwrite the next. Like encoding/json,
	// a present but empty field decodes to an empty, non-nil slice.
	n := 0
	for _, s := range b64 {
		n += base64.StdEncoding.DecodedLen(len(s))
	}
	buf := make([]byte, n)
	dst := [3]*[]byte{&e.Cert, &e.Body, &e.Sig}
	flag := [3]uint{fCert, fBody, fSig}
	off := 0
	for i, s := range b64 {
		if seen&flag[i] == 0 {
			continue // absent: stays nil
		}
		m, err := base64.StdEncoding.Decode(buf[off:], s)
		if err != nil {
			return false
		}
		*dst[i] = buf[off : off+m : off+m]
		off += m
	}
	return true
}

// envDecoder reads the JSON of an envelope from b; see decodeEnvelope.
type envDecoder struct {
	b []byte
	i int
}

func (d *envDecoder) space() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

func (d *envDecoder) consume(c byte) bool {
	if d.i < len(d.b) && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

// end reports whether only whitespace is left.
func (d *envDecoder) end() bool {
	d.space()
	return d.i == len(d.b)
}

// plainString reads the rest of a string whose opening quote has been
// consumed, if it holds only printable ASCII without escapes.
func (d *envDecoder) plainString() ([]byte, bool) {
	start := d.i
	for d.i < len(d.b) {
		c := d.b[d.i]
		switch {
		case c == '"':
			s := d.b[start:d.i]
			d.i++
			return s, true
		case c == '\\' || c < 0x20 || c >= 0x80:
			return nil, false
		}
		d.i++
	}
	return nil, false
}

// stringValue reads a string value as plainString does (not null).
func (d *envDecoder) stringValue() ([]byte, bool) {
	if !d.consume('"') {
		return nil, false
	}
	return d.plainString()
}

// base64Value reads a string value without decoding it. It refuses raw
// line breaks, which base64.StdEncoding would skip but JSON does not allow
// in a string, and backslashes; base64 decoding refuses every other byte
// outside the alphabet.
func (d *envDecoder) base64Value() ([]byte, bool) {
	if !d.consume('"') {
		return nil, false
	}
	j := bytes.IndexByte(d.b[d.i:], '"')
	if j < 0 {
		return nil, false
	}
	s := d.b[d.i : d.i+j]
	if bytes.IndexByte(s, '\\') >= 0 || bytes.IndexByte(s, '\n') >= 0 || bytes.IndexByte(s, '\r') >= 0 {
		return nil, false
	}
	d.i += j + 1
	return s, true
}

// int reads an integer in JSON syntax (no fraction or exponent) that fits
// in bits bits.
func (d *envDecoder) int(n *int64, bits int) bool {
	start := d.i
	d.consume('-')
	digits := d.i
	for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		d.i++
	}
	if d.i == digits || d.b[digits] == '0' && d.i-digits > 1 {
		return false
	}
	v, err := strconv.ParseInt(string(d.b[start:d.i]), 10, bits)
	if err != nil {
		return false
	}
	*n = v
	return true
}
