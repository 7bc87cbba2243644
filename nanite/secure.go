package nanite

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanite-go/nanite/security"
)

// Secure turns on secure mode for an agent or a mapper (docs/security.md):
// every packet it sends is signed by its identity, every packet it receives
// must carry a valid signature from a certificate of the configured CA with
// the right role and name, within the replay window, and not seen before.
// Agents also enforce the authorization policy before running a handler,
// and with Seal request payloads and results are sealed end to end.
type Secure struct {
	// Identity signs what this participant sends. Its name must be the
	// agent's or mapper's identity.
	Identity *security.Identity
	// Verifier checks what arrives (roots, revocations, replay window).
	Verifier *security.Verifier
	// Policy decides which callers may call which services; agents consult
	// it before running a handler. Nil allows every verified caller.
	Policy Authorizer
	// Seal seals request payloads to the agent chosen for them, and
	// results (and intermediate results) back to the requester, so that
	// neither the broker nor a relaying mapper or bridge can read them.
	Seal bool

	// Sessions turns on session keys (docs/security.md, "Session keys";
	// nanite/session.go), on both sides: a mapper sets up a session with
	// each agent whose certificate carries a sealing key, in its first
	// signed request, and from then on authenticates the requests to that
	// agent and the agent's results with an HMAC under the session's key
	// instead of signatures; an agent accepts sessions offered to it, and
	// signed requests as before. Everything else stays signed.
	Sessions bool
	// SessionLifetime is how long a mapper's session lasts (default
	// security.DefaultSessionLifetime; at least four times the verifier's
	// window, at most security.MaxSessionLifetime); it offers a new one
	// when three quarters of it have passed.
	SessionLifetime time.Duration
	// MaxSessions bounds the sessions an agent holds (default
	// security.DefaultMaxSessions, at most
	// security.DefaultMaxSessionsPerPeer per peer name). When it is full,
	// new offers are refused and their mappers go on signing.
	MaxSessions int

	// state is the sessions' run-time state (made on first use).
	state atomic.Pointer[sessionState]
}

// Authorizer decides whether a caller may call a service on an agent with
// the given tags. *security.Policy and *security.PolicyHolder satisfy it.
type Authorizer interface {
	Decide(c security.Caller, service string, agentTags []string) security.Decision
}

func (s *Secure) check(id string) error {
	if s == nil {
		return nil
	}
	if s.Identity == nil || s.Verifier == nil {
		return errors.New("nanite: secure mode needs an Identity and a Verifier")
	}
	if s.Identity.Name != id {
		return fmt.Errorf("nanite: secure mode: certificate name %q is not the identity %q", s.Identity.Name, id)
	}
	return nil
}

// wrap signs an outgoing body; in plain mode it returns body unchanged.
// omitCert leaves the certificate out (heartbeats: the receivers have it
// from the registration).
func (s *Secure) wrap(body []byte, omitCert bool) ([]byte, error) {
	if s == nil {
		return body, nil
	}
	var opts []security.SignOption
	if omitCert {
		opts = append(opts, security.OmitCert())
	}
	env, err := s.Identity.Sign(body, opts...)
	if err != nil {
		return nil, fmt.Errorf("nanite: sign: %w", err)
	}
	return env, nil
}

// inbound is an incoming packet with who sent it.
type inbound struct {
	pkt *Packet
	// peer signed the message (nil in plain mode).
	peer *security.Peer
	// caller is who asked: the signer of the origin envelope for a relayed
	// request, else peer.
	caller *security.Peer
	// sess is the session the message came in (nil: signed).
	sess *security.Session
}

// errNameMismatch: a packet names a sender other than its signer.
var errNameMismatch = errors.New("nanite: packet sender is not its signer")

// open verifies (in secure mode) and decodes one incoming message. roles
// are the roles allowed to sign it. raw is a delivery's body, which nobody
// changes afterwards: the packet's payload refers to it.
func (s *Secure) open(raw []byte, max int, roles ...security.Role) (inbound, error) {
	return s.openInto(nil, raw, max, roles...)
}

// openInto is open decoding into *dst (a new packet when dst is nil).
func (s *Secure) openInto(dst *Packet, raw []byte, max int, roles ...security.Role) (inbound, error) {
	if s == nil {
		p, err := decodePacketInto(dst, raw, max, true)
		return inbound{pkt: p}, err
	}
	body, peer, err := s.Verifier.VerifyEnvelope(raw, roles...)
	if err != nil {
		return inbound{}, err
	}
	return s.decodeInto(dst, body, peer, max)
}

// decode decodes the body of a verified message from peer and checks that
// the packet names its sender as peer.
func (s *Secure) decode(body []byte, peer *security.Peer, max int) (inbound, error) {
	return s.decodeInto(nil, body, peer, max)
}

// decodeInto is decode into *dst (a new packet when dst is nil).
func (s *Secure) decodeInto(dst *Packet, body []byte, peer *security.Peer, max int) (inbound, error) {
	p, err := decodePacketInto(dst, body, max, true)
	if err != nil {
		return inbound{pkt: p, peer: peer}, err
	}
	in := inbound{pkt: p, peer: peer, caller: peer}
	switch p.Kind {
	case KindRegister, KindHeartbeat, KindUnregister:
		if p.Identity != peer.Name {
			return in, fmt.Errorf("%w: %s %q signed by %q", errNameMismatch, p.Kind, p.Identity, peer.Name)
		}
	case KindRequest, KindPush:
		if len(p.Origin) > 0 {
			if peer.Role != security.RoleMapper && peer.Role != security.RoleBridge {
				return in, fmt.Errorf("%w: only mappers and bridges relay requests, not %s %q", errNameMismatch, peer.Role, peer.Name)
			}
			origin, err := s.verifyOrigin(p)
			if err != nil {
				return in, err
			}
			in.caller = origin
		} else if p.From != peer.Name {
			return in, fmt.Errorf("%w: request from %q signed by %q", errNameMismatch, p.From, peer.Name)
		}
	default:
		if p.From != peer.Name {
			return in, fmt.Errorf("%w: %s from %q signed by %q", errNameMismatch, p.Kind, p.From, peer.Name)
		}
	}
	return in, nil
}

// openOwn decodes one of our own requests that came back from the
// dead-letter exchange. In secure mode it must carry our own valid
// signature: anyone with write access to the vhost could otherwise fail our
// requests with made-up dead letters. (It is not window- or replay-checked:
// it is our packet, seen before.)
func (s *Secure) openOwn(raw []byte, max int) (*Packet, error) {
	if s == nil {
		return decodeOwned(raw, max)
	}
	if security.IsSessionEnvelope(raw) {
		return s.openOwnSession(raw, max) // session.go
	}
	env, err := security.ParseEnvelope(raw)
	if err != nil {
		return nil, err
	}
	pub, ok := s.Identity.Cert.PublicKey.(ed25519.PublicKey)
	if env.Signer != s.Identity.Name || !ok || !ed25519.Verify(pub, env.SignedBytes(), env.Sig) {
		return nil, &security.Error{Reason: "bad_signature", Signer: env.Signer, Detail: "dead letter not signed by us"}
	}
	return decodeOwned(env.Body, max)
}

// verifyOrigin checks the original caller's envelope carried by a relayed
// request: its certificate and signature, and that it is the same request
// (token, service, requester). Freshness and replay were checked by the
// relay that received it first; the relay's own envelope is fresh.
func (s *Secure) verifyOrigin(p *Packet) (*security.Peer, error) {
	env, err := security.ParseEnvelope(p.Origin)
	if err != nil {
		return nil, fmt.Errorf("nanite: origin envelope: %w", err)
	}
	peer, err := s.Verifier.VerifyCert(env.Cert, env.Signer)
	if err != nil {
		return nil, fmt.Errorf("nanite: origin envelope: %w", err)
	}
	pub, ok := peer.Cert.PublicKey.(ed25519.PublicKey)
	if !ok || !ed25519.Verify(pub, env.SignedBytes(), env.Sig) {
		return nil, &security.Error{Reason: "bad_signature", Signer: env.Signer, Detail: "origin envelope"}
	}
	var orig Packet
	if err := json.Unmarshal(env.Body, &orig); err != nil {
		return nil, fmt.Errorf("nanite: origin envelope body: %w", err)
	}
	if orig.Token != p.Token || orig.Type != p.Type || orig.From != env.Signer || p.From != env.Signer {
		return nil, fmt.Errorf("%w: relayed request does not match its origin (token, service or requester)", errNameMismatch)
	}
	return peer, nil
}

// OpenOrigin verifies an origin envelope (a request as its caller signed
// it, e.g. Request.Origin relayed by a bridge) with v: certificate chain,
// role among roles, time window and replay (v's nonce cache), signature;
// then decodes the request. The caller is who signed it: peer.Name is the
// request's From, or an error.
func OpenOrigin(v *security.Verifier, raw []byte, maxPayload int, roles ...security.Role) (*Packet, *security.Peer, error) {
	body, peer, err := v.VerifyEnvelope(raw, roles...)
	if err != nil {
		return nil, nil, err
	}
	if maxPayload <= 0 {
		maxPayload = DefaultMaxPayload
	}
	p, err := DecodePacket(body, maxPayload)
	if err != nil {
		return nil, nil, err
	}
	if p.Kind != KindRequest && p.Kind != KindPush {
		return nil, nil, fmt.Errorf("nanite: origin is a %s, not a request", p.Kind)
	}
	if p.From != peer.Name {
		return nil, nil, fmt.Errorf("%w: request from %q signed by %q", errNameMismatch, p.From, peer.Name)
	}
	return p, peer, nil
}

// rejectReason is the counter name for a refused packet.
func rejectReason(err error) string {
	switch {
	case errors.Is(err, errNameMismatch):
		return "name_mismatch"
	case errors.Is(err, ErrTooLarge):
		return "too_large"
	case errors.Is(err, errBadPacket):
		return "malformed"
	case errors.Is(err, errSessionMisuse):
		return "session_misuse"
	}
	if r := security.Reason(err); r != "" && r != "error" {
		return r
	}
	return "other"
}

// peekRequest extracts the token and reply queue of a request that failed
// verification, so that the requester can be told (without trusting it for
// anything else).
func peekRequest(raw []byte) (token, replyTo string) {
	body := raw
	if security.IsSessionEnvelope(raw) {
		env, err := security.ParseSessionEnvelope(raw)
		if err != nil {
			return "", ""
		}
		body = env.Body
	} else if security.IsEnvelope(raw) {
		env, err := security.ParseEnvelope(raw)
		if err != nil {
			return "", ""
		}
		body = env.Body
	}
	var p struct {
		Kind    Kind   `json:"packet"`
		Token   string `json:"token"`
		ReplyTo string `json:"reply_to"`
	}
	if json.Unmarshal(body, &p) != nil || p.Kind != KindRequest {
		return "", ""
	}
	return p.Token, p.ReplyTo
}

// sealPayload seals a payload for a recipient, bound to its purpose.
func sealPayload(to security.SealKey, payload json.RawMessage, info ...string) ([]byte, error) {
	if to.IsZero() {
		return nil, fmt.Errorf("nanite: cannot seal: %w", security.ErrNoSealKey)
	}
	b, err := security.Seal(to, security.SealInfo(info...), payload)
	if err != nil {
		return nil, fmt.Errorf("nanite: seal: %w", err)
	}
	return b, nil
}

// counters is a set of named counters (rejections by reason).
type counters struct {
	mu sync.Mutex
	m  map[string]int64
}

func (c *counters) add(name string) {
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]int64{}
	}
	c.m[name]++
	c.mu.Unlock()
}

func (c *counters) into(dst map[string]int64, prefix string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	keys := make([]string, 0, len(c.m))
	for k := range c.m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		dst[prefix+k] = c.m[k]
	}
}
