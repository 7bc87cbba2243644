package nanite

// Session keys in the cluster (Secure.Sessions; docs/security.md, "Session
// keys"). Everything of the feature that is not in package security is
// here; agent.go, mapper.go and codec.go only call in:
//
//   - Mapper.send encodes requests with encodeRequest: MAC'd in the
//     session with the agent when there is one, else signed, carrying an
//     offer while the session is being set up.
//   - Mapper.handleReply opens with openResult (session results) and
//     passes every reply to sessionReply first (confirmation, decline,
//     unknown_session fallback).
//   - Agent.handleDelivery opens with openRequest (session requests,
//     offers) and answers with wrapReply (in the request's session).
//   - Cached answers sent to other requesters go through forAnyone
//     (signed: a MAC proves nothing to them).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanite-go/nanite/security"
)

// CodeUnknownSession is the error code of an agent's answer to a request in
// a session it does not hold (it restarted, or the session ended). It is
// signed, but the agent cannot tell who sent the request: the mapper takes
// it only for a request of its own that it sent to that agent in a session,
// and then sends that request again, signed, with a new offer.
const CodeUnknownSession = "unknown_session"

// Timing of a mapper's sessions.
const (
	// sessionPendingTimeout: an offer not confirmed by a result in its
	// session within this time is given up, and the next request offers a
	// new one.
	sessionPendingTimeout = 30 * time.Second
	// sessionDeclineBackoff: after an agent answered an offer signed
	// (sessions off, or its store full), requests to it are signed without
	// offers for this long.
	sessionDeclineBackoff = 5 * time.Minute
)

// errSessionMisuse: a session message that is not a request to the
// responder nor a result to the initiator.
var errSessionMisuse = errors.New("nanite: wrong packet kind for its session")

// sessionState is the run-time state of a Secure's sessions.
type sessionState struct {
	// Agent side: the sessions offered to us, by id.
	store *security.SessionStore

	// Mapper side.
	mu        sync.Mutex
	peers     map[string]*peerSessions     // by agent
	byID      map[string]*security.Session // ours, until they end (plus grace)
	sent      map[sentKey]sentCopy         // requests sent in a session or with an offer
	lastSweep time.Time

	c sessionCounters
}

type sessionCounters struct {
	// mapper
	requestsMAC, requestsSigned, resultsMAC, resultsSigned, offers, established,
	declined, fallbacks, unknownIgnored, offerErrors atomic.Int64
	// agent
	inMAC, inSigned, repliesMAC, repliesSigned, accepted, refused atomic.Int64
}

// peerSessions is a mapper's sessions with one agent.
type peerSessions struct {
	cur           *security.Session // confirmed: requests go in it
	renewAt       time.Time         // when to offer the next one
	pending       *security.Session // offered, not yet confirmed
	offer         json.RawMessage   // the pending session's offer
	offeredAt     time.Time
	declinedUntil time.Time
}

type sentKey struct{ token, agent string }

type sentCopy struct {
	sid   string // the session the copy was sent in ("" if signed)
	offer string // the session the copy offered ("" if none)
	until time.Time
}

// sessions returns the run-time state, made on first use.
func (s *Secure) sessions() *sessionState {
	if st := s.state.Load(); st != nil {
		return st
	}
	st := &sessionState{
		store: security.NewSessionStore(s.MaxSessions, 0),
		peers: map[string]*peerSessions{},
		byID:  map[string]*security.Session{},
		sent:  map[sentKey]sentCopy{},
	}
	if s.state.CompareAndSwap(nil, st) {
		return st
	}
	return s.state.Load()
}

// lifetime is the mapper's session lifetime: SessionLifetime (default
// security.DefaultSessionLifetime), at least four windows (a session is not
// used in its last window, and is renewed in its last quarter), at most
// security.MaxSessionLifetime.
func (s *Secure) lifetime() time.Duration {
	l := s.SessionLifetime
	if l <= 0 {
		l = security.DefaultSessionLifetime
	}
	return min(max(l, 4*s.Verifier.Window()), security.MaxSessionLifetime)
}

// ---------------------------------------------------------------------------
// Mapper side

// encodeRequest encodes a request or push for agent and authenticates it:
// in the session with the agent when there is one, else signed (with the
// session offer while one is being set up). In plain mode it only encodes.
func (s *Secure) encodeRequest(pkt *Packet, agent string) ([]byte, error) {
	if s == nil || !s.Sessions || pkt.Kind != KindRequest {
		body, err := pkt.encodeTrusted()
		if err == nil {
			body, err = s.wrap(body, false)
		}
		return body, err
	}
	st := s.sessions()
	sess, offerID, offer := st.forRequest(s, agent)
	if offer != nil {
		cp := *pkt
		cp.Session = offer
		pkt = &cp
	}
	body, err := pkt.encodeTrusted()
	if err != nil {
		return nil, err
	}
	until := pkt.deadlineTime()
	if until.IsZero() {
		until = time.Now().Add(DefaultRequestTimeout)
	}
	until = until.Add(2 * s.Verifier.Window())
	if sess != nil {
		st.c.requestsMAC.Add(1)
		st.remember(sentKey{pkt.Token, agent}, sentCopy{sid: sess.ID, until: until})
		return sess.Wrap(body), nil
	}
	st.c.requestsSigned.Add(1)
	if offerID != "" {
		st.remember(sentKey{pkt.Token, agent}, sentCopy{offer: offerID, until: until})
	}
	return s.wrap(body, false)
}

// forRequest returns the session to send a request to agent in, or the
// offer to put in the signed request (or neither: signed, no offer).
func (st *sessionState) forRequest(s *Secure, agent string) (*security.Session, string, json.RawMessage) {
	now := time.Now()
	st.mu.Lock()
	defer st.mu.Unlock()
	ps := st.peers[agent]
	if ps == nil {
		ps = &peerSessions{}
		st.peers[agent] = ps
	}
	if now.Before(ps.declinedUntil) {
		return nil, "", nil
	}
	// A session is not used in its last window: the agent's clock may be
	// that much ahead.
	if ps.cur != nil && !now.Before(ps.cur.Expires.Add(-s.Verifier.Window())) {
		ps.cur = nil
	}
	if ps.pending != nil && now.Sub(ps.offeredAt) > sessionPendingTimeout {
		ps.pending, ps.offer = nil, nil
	}
	if ps.cur != nil && (ps.pending != nil || now.Before(ps.renewAt)) {
		return ps.cur, "", nil
	}
	// No session, or time to renew: this request goes signed, offering
	// the pending session (a new one if there is none).
	if ps.pending == nil {
		sess, offer, err := s.Verifier.NewSession(s.Identity, agent, s.lifetime(), security.RoleAgent)
		if err == nil {
			ps.offer, err = json.Marshal(offer)
		}
		if err != nil {
			// No sealing key, certificate unknown or revoked: sign.
			st.c.offerErrors.Add(1)
			ps.declinedUntil = now.Add(sessionDeclineBackoff)
			return nil, "", nil
		}
		st.c.offers.Add(1)
		ps.pending, ps.offeredAt = sess, now
		st.byID[sess.ID] = sess
	}
	return nil, ps.pending.ID, ps.offer
}

func (st *sessionState) remember(k sentKey, c sentCopy) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.sent[k] = c
	now := time.Now()
	if since := now.Sub(st.lastSweep); since > time.Minute || len(st.sent) > 256 && since > time.Second {
		st.sweepLocked(now)
	}
}

// sweepLocked forgets requests past their deadline (plus the window),
// sessions past their end (plus the time in which results are still
// taken), and agents with nothing left.
func (st *sessionState) sweepLocked(now time.Time) {
	st.lastSweep = now
	for k, c := range st.sent {
		if now.After(c.until) {
			delete(st.sent, k)
		}
	}
	for id, s := range st.byID {
		if now.After(s.Expires.Add(10 * time.Minute)) {
			delete(st.byID, id)
		}
	}
	for agent, ps := range st.peers {
		if ps.cur != nil && now.After(ps.cur.Expires) {
			ps.cur = nil
		}
		if ps.pending != nil && now.Sub(ps.offeredAt) > sessionPendingTimeout {
			ps.pending, ps.offer = nil, nil
		}
		if ps.cur == nil && ps.pending == nil && now.After(ps.declinedUntil) {
			delete(st.peers, agent)
		}
	}
}

// lookupOut finds one of our sessions (the initiator's) by id.
func (st *sessionState) lookupOut(id string) *security.Session {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.byID[id]
}

// openResult is open for a mapper's reply queue: results and intermediate
// results may come signed or in one of its sessions.
func (s *Secure) openResult(raw []byte, max int, roles ...security.Role) (inbound, error) {
	return s.openResultInto(nil, raw, max, roles...)
}

// openResultInto is openResult decoding into *dst (a new packet when dst
// is nil).
func (s *Secure) openResultInto(dst *Packet, raw []byte, max int, roles ...security.Role) (inbound, error) {
	if s == nil || !security.IsSessionEnvelope(raw) {
		return s.openInto(dst, raw, max, roles...)
	}
	st := s.sessions()
	body, sess, err := s.Verifier.VerifySessionEnvelope(raw, st.lookupOut, roles...)
	if err != nil {
		return inbound{}, err
	}
	in, err := s.decodeInto(dst, body, sess.Peer, max)
	in.sess = sess
	if err != nil {
		return in, err
	}
	if !sess.IsInitiator() || (in.pkt.Kind != KindResult && in.pkt.Kind != KindIntermediate) {
		return in, fmt.Errorf("%w: %s in session %s", errSessionMisuse, in.pkt.Kind, sess.ID)
	}
	st.mu.Lock()
	if ps := st.peers[sess.Responder]; ps != nil && ps.pending == sess {
		// The agent holds the key: the session is set up.
		ps.cur, ps.pending, ps.offer = sess, nil, nil
		life := sess.Expires.Sub(ps.offeredAt)
		ps.renewAt = ps.offeredAt.Add(life * 3 / 4)
		st.c.established.Add(1)
	}
	st.mu.Unlock()
	return in, nil
}

// openOwnSession is openOwn for one of our requests sent in a session.
func (s *Secure) openOwnSession(raw []byte, max int) (*Packet, error) {
	e, err := security.ParseSessionEnvelope(raw)
	if err != nil {
		return nil, err
	}
	sess := s.sessions().lookupOut(e.ID)
	if sess == nil {
		return nil, &security.Error{Reason: "bad_mac", Detail: "dead letter in a session we do not hold"}
	}
	body, err := sess.OpenOwn(raw)
	if err != nil {
		return nil, err
	}
	return DecodePacket(body, max)
}

// sessionReply is the mapper's session bookkeeping for a reply that opened
// (signed or in a session). It returns true when it consumed the reply: an
// unknown_session answer, which never completes a request.
func (m *Mapper) sessionReply(in inbound) bool {
	sec := m.cfg.Secure
	p := in.pkt
	if sec == nil {
		return false
	}
	if p.Kind == KindResult && p.Error != nil && p.Error.Code == CodeUnknownSession {
		m.sessionFallback(p)
		return true
	}
	if !sec.Sessions || (p.Kind != KindResult && p.Kind != KindIntermediate) {
		return false
	}
	st := sec.sessions()
	if in.sess != nil {
		st.c.resultsMAC.Add(1)
	} else {
		st.c.resultsSigned.Add(1)
	}
	if p.Kind != KindResult {
		return false
	}
	k := sentKey{p.Token, p.From}
	st.mu.Lock()
	defer st.mu.Unlock()
	c, ok := st.sent[k]
	if !ok {
		return false
	}
	delete(st.sent, k)
	if in.sess == nil && c.offer != "" {
		// The agent answered a request that offered a session outside
		// it: it does not take sessions (or has no room). Sign for a
		// while.
		if ps := st.peers[p.From]; ps != nil && ps.pending != nil && ps.pending.ID == c.offer {
			ps.pending, ps.offer = nil, nil
			ps.declinedUntil = time.Now().Add(sessionDeclineBackoff)
			st.c.declined.Add(1)
			m.log.Info("agent declined a session; signing requests to it", "agent", p.From)
		}
	}
	return false
}

// sessionFallback handles an unknown_session answer: only for a request of
// ours that is still waiting for that agent and whose copy went to it in a
// session, that session is dropped and the request sent again, once,
// signed with a new offer. Anything else is ignored (counted).
func (m *Mapper) sessionFallback(p *Packet) {
	st := m.cfg.Secure.sessions()
	agent := p.From
	k := sentKey{p.Token, agent}
	st.mu.Lock()
	c, ok := st.sent[k]
	if ok && c.sid != "" {
		delete(st.sent, k)
		if ps := st.peers[agent]; ps != nil && ps.cur != nil && ps.cur.ID == c.sid {
			ps.cur = nil
		}
	}
	st.mu.Unlock()
	if !ok || c.sid == "" {
		st.c.unknownIgnored.Add(1)
		m.log.Debug("ignored an unknown_session answer", "agent", agent, "token", p.Token)
		return
	}
	m.mu.Lock()
	mc := m.out[p.Token]
	var pkt Packet
	if mc != nil && mc.sentTo.has(agent) {
		pkt = *mc.pkt
		pkt.Attempt = mc.attempts
	} else {
		mc = nil
	}
	m.mu.Unlock()
	if mc == nil {
		return
	}
	st.c.fallbacks.Add(1)
	m.log.Info("agent does not know our session; sending the request again, signed", "agent", agent, "token", p.Token)
	go func() {
		deadline := pkt.deadlineTime()
		if deadline.IsZero() {
			deadline = time.Now().Add(m.cfg.RequestTimeout)
		}
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		defer cancel()
		if err := m.send(ctx, deadline, &pkt, agent, AgentQueue(agent)); err != nil {
			m.agentGone(mc, agent, CodeNotDelivered, err.Error())
		}
	}()
}

// ---------------------------------------------------------------------------
// Agent side

// openRequest is open for an agent's queue: requests may come signed or in
// a session offered to this agent, and a signed request may offer one.
func (s *Secure) openRequest(raw []byte, max int, roles ...security.Role) (inbound, error) {
	return s.openRequestInto(nil, raw, max, roles...)
}

// openRequestInto is openRequest decoding into *dst (a new packet when dst
// is nil).
func (s *Secure) openRequestInto(dst *Packet, raw []byte, max int, roles ...security.Role) (inbound, error) {
	if s == nil || !security.IsSessionEnvelope(raw) {
		in, err := s.openInto(dst, raw, max, roles...)
		if err == nil && s != nil && s.Sessions && in.pkt.Kind == KindRequest {
			st := s.sessions()
			st.c.inSigned.Add(1)
			if len(in.pkt.Session) > 0 {
				in.pkt.sess = s.acceptOffer(st, in)
			}
		}
		return in, err
	}
	st := s.sessions()
	body, sess, err := s.Verifier.VerifySessionEnvelope(raw, st.store.Get, roles...)
	if err != nil {
		return inbound{}, err
	}
	in, err := s.decodeInto(dst, body, sess.Peer, max)
	in.sess = sess
	if err != nil {
		return in, err
	}
	if sess.IsInitiator() || in.pkt.Kind != KindRequest {
		return in, fmt.Errorf("%w: %s in session %s", errSessionMisuse, in.pkt.Kind, sess.ID)
	}
	st.c.inMAC.Add(1)
	in.pkt.Session = nil // offers count only in signed packets
	in.pkt.sess = sess
	return in, nil
}

// acceptOffer opens the session offer of a verified, signed request from
// in.peer and stores the session. A bad offer (or no room) is counted and
// logged, and the request is served signed.
func (s *Secure) acceptOffer(st *sessionState, in inbound) *security.Session {
	var offer security.SessionOffer
	err := json.Unmarshal(in.pkt.Session, &offer)
	if err == nil {
		if old := st.store.Get(offer.ID); old != nil && old.Peer.Name == in.peer.Name {
			return old // offered again while the mapper waits for its confirmation
		}
	}
	var sess *security.Session
	if err == nil {
		sess, err = s.Verifier.AcceptSession(s.Identity, in.peer, &offer)
	}
	if err == nil {
		sess, err = st.store.Add(sess, time.Now())
	}
	if err != nil {
		st.c.refused.Add(1) // (and by reason in the verifier's stats)
		return nil
	}
	st.c.accepted.Add(1)
	return sess
}

// wrapReply authenticates an agent's answer to p: in p's session while it
// lasts, else signed.
func (s *Secure) wrapReply(p *Packet, body []byte) ([]byte, error) {
	if s == nil {
		return body, nil
	}
	if p.sess != nil && time.Now().Before(p.sess.Expires) {
		s.sessions().c.repliesMAC.Add(1)
		return p.sess.Wrap(body), nil
	}
	if s.Sessions {
		s.sessions().c.repliesSigned.Add(1)
	}
	return s.wrap(body, false)
}

// forAnyone turns an answer made in a session into a signed one, for a
// requester other than the one it was made for (or a second copy for the
// same one: the first is a replay). Other bodies are returned unchanged.
func (s *Secure) forAnyone(body []byte) []byte {
	if s == nil || !security.IsSessionEnvelope(body) {
		return body
	}
	e, err := security.ParseSessionEnvelope(body)
	if err != nil {
		return body
	}
	signed, err := s.wrap(e.Body, false)
	if err != nil {
		return body
	}
	return signed
}

// rejectCode is the error code of the answer to a request refused by
// secure mode.
func rejectCode(err error) string {
	if errors.Is(err, security.ErrUnknownSession) || errors.Is(err, security.ErrSessionExpired) {
		return CodeUnknownSession
	}
	return CodeUnauthorized
}

// sessionStats adds the session counters to a Stats map (when Sessions is
// on).
func (s *Secure) sessionStats(out map[string]int64) {
	if s == nil || !s.Sessions {
		return
	}
	st := s.sessions()
	c := &st.c
	for k, v := range map[string]*atomic.Int64{
		"session_requests_sent": &c.requestsMAC, "signed_requests_sent": &c.requestsSigned,
		"session_results": &c.resultsMAC, "signed_results": &c.resultsSigned,
		"session_offers": &c.offers, "sessions_established": &c.established,
		"sessions_declined": &c.declined, "session_fallbacks": &c.fallbacks,
		"session_unknown_ignored": &c.unknownIgnored, "session_offer_errors": &c.offerErrors,
		"session_requests": &c.inMAC, "signed_requests": &c.inSigned,
		"session_replies": &c.repliesMAC, "signed_replies": &c.repliesSigned,
		"sessions_accepted": &c.accepted, "session_offers_refused": &c.refused,
	} {
		out[k] = v.Load()
	}
	out["sessions_held"] = int64(st.store.Len())
}
