package security

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"time"
)

// Session keys (docs/security.md, "Session keys"): an opt-in alternative to
// signing every packet between one requester (the initiator, a mapper) and
// one agent (the responder). The initiator picks a random 32-byte key K and
// sends it, HPKE-sealed to the responder's sealing key, in a session offer
// inside an Ed25519-signed packet. From then on the packets of that pair
// carry an HMAC-SHA256 under K instead of a signature: a session envelope.
//
// A session envelope is written in exactly one way (no whitespace, fields
// in this order, lowercase hex), and read only in that way:
//
//	{"v":1,"alg":"hmac-sha256","sid":"<32 hex>","ts":<ms>,"nonce":"<32 hex>","mac":"<64 hex>","body":<body>}
//
// The body is the packet, not encoded: every byte after `"body":` up to the
// final `}`. The MAC is HMAC-SHA256(K, MACBytes): see sessionMACBytes.

// Session constants.
const (
	// AlgSession is the alg of a session envelope.
	AlgSession = "hmac-sha256"
	// SessionInfoLabel starts the HPKE info of a session offer.
	SessionInfoLabel = "nanite-session/1"
	// DefaultSessionLifetime is how long a session lasts by default; the
	// initiator offers a new one before it ends.
	DefaultSessionLifetime = 10 * time.Minute
	// MaxSessionLifetime is the longest session a responder accepts.
	MaxSessionLifetime = time.Hour
	// DefaultMaxSessions bounds a SessionStore; DefaultMaxSessionsPerPeer
	// bounds the sessions one peer name holds in it.
	DefaultMaxSessions        = 4096
	DefaultMaxSessionsPerPeer = 32

	sessionIDLen  = 16
	sessionKeyLen = 32
	sessionMACLen = sha256.Size
	sessionDomain = "nanite-session-mac-v1\x00"
)

// SessionDir is the direction of a session packet. It is part of the MAC
// input, so a packet cannot be reflected back to its sender.
type SessionDir uint8

// The two directions.
const (
	// ToResponder: from the initiator to the responder (requests).
	ToResponder SessionDir = 1
	// ToInitiator: from the responder to the initiator (results and
	// intermediate results).
	ToInitiator SessionDir = 2
)

func (d SessionDir) String() string {
	switch d {
	case ToResponder:
		return "initiator->responder"
	case ToInitiator:
		return "responder->initiator"
	}
	return fmt.Sprintf("dir(%d)", uint8(d))
}

// SessionOffer is what an initiator sends, inside a packet it signs, to set
// up a session: the session id, its end, and K sealed to the responder with
// the info SessionInfo(initiator, responder, id, expires).
type SessionOffer struct {
	ID      string `json:"id"`  // 32 lowercase hex digits
	Expires int64  `json:"exp"` // Unix milliseconds
	Key     []byte `json:"key"` // K, sealed (Seal format), base64 in JSON
}

// SessionInfo is the HPKE info that binds a sealed session key to its
// purpose, its two parties, its id and its end.
func SessionInfo(initiator, responder, id string, expires int64) []byte {
	return SealInfo(SessionInfoLabel, initiator, responder, id, strconv.FormatInt(expires, 10))
}

// Session is one side's view of a session: its id, the two parties, when it
// ends, the peer (the other side, as verified when the session was made) and
// the key. The key cannot be read from outside the package, and String,
// Format and LogValue never print it. A Session is safe for concurrent use.
type Session struct {
	ID        string
	Initiator string
	Responder string
	Expires   time.Time
	// Peer is the other party: the responder for the initiator, the
	// initiator (who signed the offer) for the responder.
	Peer *Peer

	initiator bool
	id        [sessionIDLen]byte
	entry     *certEntry // the peer's certificate, re-checked on every packet
	secret    func() *sessionKey
}

type sessionKey struct {
	key  [sessionKeyLen]byte
	macs sync.Pool // of hash.Hash, HMAC-SHA256 keyed with key
}

func newSession(id [sessionIDLen]byte, key [sessionKeyLen]byte, initiator bool) *Session {
	k := &sessionKey{key: key}
	k.macs.New = func() any { return hmac.New(sha256.New, k.key[:]) }
	return &Session{ID: hex.EncodeToString(id[:]), id: id, initiator: initiator, secret: keyFunc(k)}
}

// IsInitiator reports whether this side offered the session.
func (s *Session) IsInitiator() bool { return s.initiator }

// Sends is the direction of the packets this side sends; the other
// direction is the one it receives.
func (s *Session) Sends() SessionDir {
	if s.initiator {
		return ToResponder
	}
	return ToInitiator
}

func (s *Session) receives() SessionDir {
	if s.initiator {
		return ToInitiator
	}
	return ToResponder
}

func (s *Session) String() string {
	if s == nil {
		return "session(nil)"
	}
	return fmt.Sprintf("session %s %s->%s until %s", s.ID, s.Initiator, s.Responder, s.Expires.UTC().Format(time.RFC3339))
}

// Format prints String for every verb.
func (s *Session) Format(f fmt.State, verb rune) { _, _ = io.WriteString(f, s.String()) }

// LogValue logs the session without its key.
func (s *Session) LogValue() slog.Value {
	return slog.GroupValue(slog.String("id", s.ID), slog.String("initiator", s.Initiator),
		slog.String("responder", s.Responder), slog.Time("expires", s.Expires))
}

// Wrap puts body in a session envelope for the direction this side sends,
// with the current time and a random nonce. Wrap every transmission
// separately: a receiver rejects a second copy as a replay.
func (s *Session) Wrap(body []byte) []byte {
	return s.wrapAt(body, time.Now())
}

func (s *Session) wrapAt(body []byte, at time.Time) []byte {
	ts := at.UnixMilli()
	var nonce [nonceLen]byte
	_, _ = rand.Read(nonce[:]) // never fails
	var mac [sessionMACLen]byte
	s.mac(mac[:0], s.Sends(), ts, &nonce, body)
	return appendSessionEnvelope(make([]byte, 0, sessionEnvelopeOverhead+len(body)), &s.id, ts, &nonce, &mac, body)
}

// mac appends HMAC-SHA256(K, sessionMACBytes) to dst.
func (s *Session) mac(dst []byte, dir SessionDir, ts int64, nonce *[nonceLen]byte, body []byte) []byte {
	k := s.secret()
	h := k.macs.Get().(hash.Hash)
	h.Reset()
	var hdr [len(sessionDomain) + 1 + sessionIDLen + 8 + nonceLen + 8]byte
	b := append(hdr[:0], sessionDomain...)
	b = append(b, byte(dir))
	b = append(b, s.id[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(ts))
	b = append(b, nonce[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(len(body)))
	h.Write(b)
	h.Write(body)
	dst = h.Sum(dst)
	k.macs.Put(h)
	return dst
}

// The MAC covers (integers big-endian):
//
//	"nanite-session-mac-v1" 0x00
//	u8   direction (1 initiator->responder, 2 responder->initiator)
//	16   the session id (bytes)
//	u64  ts
//	16   the nonce (bytes)
//	u64  len(body)   body
//
// Every field but the body has a fixed length and the body is
// length-prefixed, so no two different packets have the same MAC input.
// sessionMACBytes returns it (for tests and auditors; the MAC is computed
// without building it).
func sessionMACBytes(dir SessionDir, id [sessionIDLen]byte, ts int64, nonce [nonceLen]byte, body []byte) []byte {
	b := append([]byte(sessionDomain), byte(dir))
	b = append(b, id[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(ts))
	b = append(b, nonce[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(len(body)))
	return append(b, body...)
}

// Session envelope syntax.
const (
	sessionPrefix = `{"v":1,"alg":"hmac-sha256","sid":"`
	// overhead: prefix, 32 hex, `","ts":`, up to 19 digits,
	// `,"nonce":"`, 32 hex, `","mac":"`, 64 hex, `","body":`, `}`
	sessionEnvelopeOverhead = len(sessionPrefix) + 32 + 7 + 19 + 10 + 32 + 9 + 64 + 10 + 1
)

func appendSessionEnvelope(b []byte, id *[sessionIDLen]byte, ts int64, nonce *[nonceLen]byte, mac *[sessionMACLen]byte, body []byte) []byte {
	b = append(b, sessionPrefix...)
	b = hex.AppendEncode(b, id[:])
	b = append(b, `","ts":`...)
	b = strconv.AppendInt(b, ts, 10)
	b = append(b, `,"nonce":"`...)
	b = hex.AppendEncode(b, nonce[:])
	b = append(b, `","mac":"`...)
	b = hex.AppendEncode(b, mac[:])
	b = append(b, `","body":`...)
	b = append(b, body...)
	return append(b, '}')
}

// IsSessionEnvelope reports, cheaply, whether b starts like a session
// envelope. (IsEnvelope is true for it too: it is an envelope, but not a
// signed one.)
func IsSessionEnvelope(b []byte) bool { return bytes.HasPrefix(b, []byte(sessionPrefix)) }

// SessionEnvelope is a parsed session envelope. Body aliases the bytes it
// was parsed from.
type SessionEnvelope struct {
	ID    string // the session id, 32 lowercase hex digits
	TS    int64  // Unix milliseconds
	Nonce string // 32 lowercase hex digits
	MAC   []byte // 32 bytes
	Body  []byte

	id    [sessionIDLen]byte
	nonce [nonceLen]byte
}

// ParseSessionEnvelope checks the form of a session envelope without
// verifying it: the exact syntax above, a positive timestamp, a non-empty
// body. It fails with ErrUnsigned if raw is not a session envelope at all
// and ErrMalformed otherwise. raw longer than DefaultMaxEnvelopeSize is
// rejected; a Verifier applies its own limit.
func ParseSessionEnvelope(raw []byte) (*SessionEnvelope, error) {
	return parseSessionEnvelope(raw, DefaultMaxEnvelopeSize)
}

func parseSessionEnvelope(raw []byte, max int) (*SessionEnvelope, error) {
	if len(raw) > max {
		return nil, newError(ErrMalformed, "", nil, "session envelope is %d bytes, the limit is %d", len(raw), max)
	}
	if !IsSessionEnvelope(raw) {
		return nil, newError(ErrUnsigned, "", nil, "not a session envelope")
	}
	var e SessionEnvelope
	bad := func(what string) (*SessionEnvelope, error) {
		return nil, newError(ErrMalformed, "", nil, "session envelope: %s", what)
	}
	r := raw[len(sessionPrefix):]
	hexField := func(dst []byte, n int, next string) bool {
		if len(r) < n+len(next) || !isLowerHex(string(r[:n])) || string(r[n:n+len(next)]) != next {
			return false
		}
		if dst != nil {
			_, _ = hex.Decode(dst, r[:n]) // checked
		}
		r = r[n+len(next):]
		return true
	}
	if !hexField(e.id[:], 2*sessionIDLen, `","ts":`) {
		return bad("sid")
	}
	e.ID = string(raw[len(sessionPrefix) : len(sessionPrefix)+2*sessionIDLen])
	i := 0
	for i < len(r) && i < 19 && r[i] >= '0' && r[i] <= '9' {
		i++
	}
	if i == 0 || r[0] == '0' {
		return bad("ts")
	}
	ts, err := strconv.ParseInt(string(r[:i]), 10, 64)
	if err != nil || ts <= 0 {
		return bad("ts")
	}
	e.TS = ts
	r = r[i:]
	const nonceKey = `,"nonce":"`
	if !bytes.HasPrefix(r, []byte(nonceKey)) {
		return bad("nonce")
	}
	r = r[len(nonceKey):]
	nonceHex := r
	if !hexField(e.nonce[:], 2*nonceLen, `","mac":"`) {
		return bad("nonce")
	}
	e.Nonce = string(nonceHex[:2*nonceLen])
	e.MAC = make([]byte, sessionMACLen)
	if !hexField(e.MAC, 2*sessionMACLen, `","body":`) {
		return bad("mac")
	}
	if len(r) < 2 || r[len(r)-1] != '}' {
		return bad("body")
	}
	e.Body = r[: len(r)-1 : len(r)-1]
	return &e, nil
}

// NewSession makes a session from self (the initiator) to the peer named
// peerName, whose certificate this verifier has verified before (from its
// registration) and which must still pass the per-packet checks
// (revocation, dates, roles) and carry a sealing key (ErrNoSealKey). It
// returns the session and the offer to send inside a signed packet.
func (v *Verifier) NewSession(self *Identity, peerName string, lifetime time.Duration, roles ...Role) (*Session, *SessionOffer, error) {
	k := self.keys()
	if k == nil {
		return nil, nil, errNoKeys
	}
	if lifetime <= 0 {
		lifetime = DefaultSessionLifetime
	}
	if lifetime > MaxSessionLifetime {
		lifetime = MaxSessionLifetime
	}
	now := v.now()
	ce, err := v.entryByName(peerName, now)
	if err == nil {
		err = v.checkEntry(ce, peerName, roles)
	}
	if err != nil {
		return nil, nil, err
	}
	if ce.peer.SealKey.IsZero() {
		return nil, nil, newError(ErrNoSealKey, peerName, nil, "no session without a sealing key")
	}
	var id [sessionIDLen]byte
	var key [sessionKeyLen]byte
	_, _ = rand.Read(id[:])
	_, _ = rand.Read(key[:])
	s := newSession(id, key, true)
	exp := now.Add(lifetime).UnixMilli()
	s.Initiator, s.Responder, s.Expires = k.name, peerName, time.UnixMilli(exp)
	s.Peer, s.entry = ce.peer, ce
	sealed, err := Seal(ce.peer.SealKey, SessionInfo(k.name, peerName, s.ID, exp), key[:])
	if err != nil {
		return nil, nil, err
	}
	return s, &SessionOffer{ID: s.ID, Expires: exp, Key: sealed}, nil
}

// AcceptSession opens a session offer that arrived in a packet verified by
// VerifyEnvelope: peer is who signed it (the initiator), self the
// responder. It fails with ErrBadOffer when the offer is malformed, already
// over, or ends more than MaxSessionLifetime (plus the window) from now, or
// when the key cannot be opened (sealed to another identity, bound to other
// parties, id or end, or tampered with).
func (v *Verifier) AcceptSession(self *Identity, peer *Peer, offer *SessionOffer) (*Session, error) {
	s, err := v.acceptSession(self, peer, offer)
	if err != nil {
		v.count(err)
		return nil, err
	}
	return s, nil
}

func (v *Verifier) acceptSession(self *Identity, peer *Peer, offer *SessionOffer) (*Session, error) {
	k := self.keys()
	if k == nil {
		return nil, errNoKeys
	}
	if peer == nil || peer.Cert == nil {
		return nil, newError(ErrBadOffer, "", nil, "no verified peer")
	}
	var id [sessionIDLen]byte
	if len(offer.ID) != 2*sessionIDLen || !isLowerHex(offer.ID) {
		return nil, newError(ErrBadOffer, peer.Name, nil, "session id must be %d lowercase hex digits", 2*sessionIDLen)
	}
	_, _ = hex.Decode(id[:], []byte(offer.ID))
	now := v.now()
	nowMs := now.UnixMilli()
	if offer.Expires <= nowMs {
		return nil, newError(ErrBadOffer, peer.Name, nil, "session %s ended %v ago", offer.ID, time.Duration(nowMs-offer.Expires)*time.Millisecond)
	}
	if max := nowMs + (MaxSessionLifetime + v.window).Milliseconds(); offer.Expires > max {
		return nil, newError(ErrBadOffer, peer.Name, nil, "session %s would last %v, the limit is %v", offer.ID,
			time.Duration(offer.Expires-nowMs)*time.Millisecond, MaxSessionLifetime)
	}
	ce, err := v.certEntry(peer.Cert.Raw, peer.Name, now)
	if err == nil {
		err = v.checkEntry(ce, peer.Name, nil)
	}
	if err != nil {
		return nil, err
	}
	key, err := self.OpenSealed(SessionInfo(peer.Name, k.name, offer.ID, offer.Expires), offer.Key)
	if err != nil {
		return nil, newError(ErrBadOffer, peer.Name, err, "session %s", offer.ID)
	}
	if len(key) != sessionKeyLen {
		return nil, newError(ErrBadOffer, peer.Name, nil, "session key is %d bytes, want %d", len(key), sessionKeyLen)
	}
	s := newSession(id, [sessionKeyLen]byte(key), false)
	clear(key)
	s.Initiator, s.Responder, s.Expires = peer.Name, k.name, time.UnixMilli(offer.Expires)
	s.Peer, s.entry = ce.peer, ce
	return s, nil
}

// VerifySessionEnvelope verifies a session envelope and returns its body
// and session. lookup finds a session by id (nil: unknown). It checks, in
// this order, and stops at the first failure:
//
//  1. form (ParseSessionEnvelope; ErrUnsigned, ErrMalformed);
//  2. the session: known (ErrUnknownSession) and not over (ErrSessionExpired;
//     the initiator accepts the responder's packets for twice the window
//     after the end, for results of requests sent just before it);
//  3. the peer's certificate, as on every signed packet: dates, revocation,
//     role among roles (no roles: any);
//  4. the MAC, for the direction this side receives, in constant time
//     (ErrBadMAC);
//  5. the timestamp window and NotBefore (ErrOutsideWindow);
//  6. replay: the (session, nonce) pair must be new (ErrReplay,
//     ErrReplayCacheFull), in the same cache as signed envelopes.
func (v *Verifier) VerifySessionEnvelope(raw []byte, lookup func(id string) *Session, roles ...Role) ([]byte, *Session, error) {
	body, s, err := v.verifySession(raw, lookup, roles)
	if err != nil {
		v.count(err)
		return nil, s, err
	}
	v.sessionVerified.Add(1)
	return body, s, nil
}

// replayScope is the replay cache's "signer" for a session: no certificate
// name contains a NUL byte, so it is distinct from every signer.
func replayScope(id string) string { return "\x00session:" + id }

func (v *Verifier) verifySession(raw []byte, lookup func(id string) *Session, roles []Role) ([]byte, *Session, error) {
	e, err := parseSessionEnvelope(raw, v.maxEnvelope)
	if err != nil {
		return nil, nil, err
	}
	s := lookup(e.ID)
	if s == nil {
		return nil, nil, newError(ErrUnknownSession, "", nil, "session %s", e.ID)
	}
	name := s.Peer.Name
	now := v.now()
	end := s.Expires
	if s.initiator {
		end = end.Add(2 * v.window)
	}
	if now.After(end) {
		return nil, s, newError(ErrSessionExpired, name, nil, "session %s ended %v ago", e.ID, now.Sub(s.Expires).Round(time.Millisecond))
	}
	ce := s.entry
	if now.Before(ce.from) || now.After(ce.until) {
		// Run the full check again to report the right error.
		if ce, err = v.certEntry(ce.peer.Cert.Raw, name, now); err != nil {
			return nil, s, err
		}
	}
	if err := v.checkEntry(ce, name, roles); err != nil {
		return nil, s, err
	}
	var mac [sessionMACLen]byte
	if !hmac.Equal(s.mac(mac[:0], s.receives(), e.TS, &e.nonce, e.Body), e.MAC) {
		return nil, s, newError(ErrBadMAC, name, nil, "session %s", e.ID)
	}
	nowMs := now.UnixMilli()
	w := v.window.Milliseconds()
	if d := nowMs - e.TS; d > w {
		return nil, s, newError(ErrOutsideWindow, name, nil, "sent %v ago, the window is %v", time.Duration(d)*time.Millisecond, v.window)
	} else if -d > w {
		return nil, s, newError(ErrOutsideWindow, name, nil, "sent %v in the future, the window is %v", time.Duration(-d)*time.Millisecond, v.window)
	}
	if e.TS < v.notBefore {
		return nil, s, newError(ErrOutsideWindow, name, nil, "sent %v before this verifier's NotBefore",
			time.Duration(v.notBefore-e.TS)*time.Millisecond)
	}
	switch err := v.replay.add(replayScope(e.ID), e.nonce, e.TS, nowMs); err {
	case nil:
	case ErrReplay:
		return nil, s, newError(ErrReplay, name, nil, "session %s nonce %s sent at %d already seen", e.ID, e.Nonce, e.TS)
	default:
		if last := v.lastWarn.Load(); nowMs-last > 10_000 && v.lastWarn.CompareAndSwap(last, nowMs) {
			v.log.Warn("security: replay cache full, rejecting envelopes", "size", v.replay.max, "window", v.window)
		}
		return nil, s, newError(ErrReplayCacheFull, name, nil, "%d nonces inside the window", v.replay.max)
	}
	return e.Body, s, nil
}

// OpenOwn checks a session envelope that this side wrapped and got back
// (a dead letter returned by the broker): the session id and the MAC for
// the direction this side sends. It checks neither the window nor the
// replay cache: the packet is ours and was seen before. It returns the body.
func (s *Session) OpenOwn(raw []byte) ([]byte, error) {
	e, err := ParseSessionEnvelope(raw)
	if err != nil {
		return nil, err
	}
	var mac [sessionMACLen]byte
	if e.id != s.id || !hmac.Equal(s.mac(mac[:0], s.Sends(), e.TS, &e.nonce, e.Body), e.MAC) {
		return nil, newError(ErrBadMAC, "", nil, "not a packet of session %s from this side", s.ID)
	}
	return e.Body, nil
}

// SessionStore holds the sessions a responder accepted, by id. It is
// bounded: at most max sessions, at most perPeer of them for one peer name
// (a new one from that peer replaces its oldest). When it is full of
// sessions that have not ended, Add refuses new ones (ErrSessionStoreFull):
// failing closed, the initiator goes on signing. Safe for concurrent use.
type SessionStore struct {
	max, perPeer int

	mu        sync.Mutex
	byID      map[string]*Session
	byPeer    map[string][]*Session // oldest first
	lastSweep time.Time
}

// NewSessionStore returns a store of at most max sessions (default
// DefaultMaxSessions), perPeer per peer name (default
// DefaultMaxSessionsPerPeer).
func NewSessionStore(max, perPeer int) *SessionStore {
	if max <= 0 {
		max = DefaultMaxSessions
	}
	if perPeer <= 0 {
		perPeer = DefaultMaxSessionsPerPeer
	}
	return &SessionStore{max: max, perPeer: perPeer, byID: map[string]*Session{}, byPeer: map[string][]*Session{}}
}

// Get returns the session with id, or nil. It may return a session that
// has ended (VerifySessionEnvelope says so).
func (st *SessionStore) Get(id string) *Session {
	st.mu.Lock()
	s := st.byID[id]
	st.mu.Unlock()
	return s
}

// Add stores s. A session whose id is already stored is not replaced: Add
// returns the stored one if it has the same initiator, else ErrBadOffer.
func (st *SessionStore) Add(s *Session, now time.Time) (*Session, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if old := st.byID[s.ID]; old != nil {
		if old.Peer.Name != s.Peer.Name {
			return nil, newError(ErrBadOffer, s.Peer.Name, nil, "session id %s is taken", s.ID)
		}
		return old, nil
	}
	if len(st.byID) >= st.max || now.Sub(st.lastSweep) > time.Minute {
		st.sweep(now)
	}
	peer := s.Peer.Name
	if l := st.byPeer[peer]; len(l) >= st.perPeer {
		st.removeLocked(l[0])
	}
	if len(st.byID) >= st.max {
		return nil, newError(ErrSessionStoreFull, peer, nil, "%d sessions", st.max)
	}
	st.byID[s.ID] = s
	st.byPeer[peer] = append(st.byPeer[peer], s)
	return s, nil
}

// Remove forgets the session with id.
func (st *SessionStore) Remove(id string) {
	st.mu.Lock()
	if s := st.byID[id]; s != nil {
		st.removeLocked(s)
	}
	st.mu.Unlock()
}

// Len is the number of sessions stored.
func (st *SessionStore) Len() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	return len(st.byID)
}

func (st *SessionStore) removeLocked(s *Session) {
	delete(st.byID, s.ID)
	l := st.byPeer[s.Peer.Name]
	for i, o := range l {
		if o == s {
			l = append(l[:i:i], l[i+1:]...)
			break
		}
	}
	if len(l) == 0 {
		delete(st.byPeer, s.Peer.Name)
	} else {
		st.byPeer[s.Peer.Name] = l
	}
}

func (st *SessionStore) sweep(now time.Time) {
	st.lastSweep = now
	for _, s := range st.byID {
		if now.After(s.Expires) {
			st.removeLocked(s)
		}
	}
}
